"""One training iteration of CMDA's DACS self-training, top to bottom (:func:`iteration`).

1. seed, learning rate, EMA teacher (a copy at iteration 0, then ``alpha = min(1 - 1/(it+1), alpha_max)``);
2. inputs: normalised images, the second encoder's inputs for both domains (the run's target kind);
3. pseudo-labels: the EMA teacher on the night image fused with the events or, at random, the night ISR;
4. mix: ClassMix pastes half the source classes onto the target; the mixed image gets colour jitter and
   blur; the events are only mixed; the mixed ISR is recomputed from the mixed image;
5. the components' inputs (MIC's masked target batch);
6. per micro-batch (``run.accum``): the source pass, the mixed pass with the pseudo weights, and each
   component's pass of its own, each with its own backward (losses scaled by 1/accum);
7. the components' finish (bank updates, the discriminator's step);
8. the optimiser step.

Everything random is drawn on the full batch before the passes, from torch's generator re-seeded from
(seed, rank, iteration) in step 1, so gradient accumulation gives the full batch's step and a resumed
run repeats the uninterrupted one. Sources: DACS (Tranheden et al., WACV 2021), DAFormer's
``mmseg/models/uda/dacs.py`` (lhoyer/DAFormer), CMDA's ``mmseg/models/uda/dacs.py`` (XiaRho/CMDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.common.device import autocast
from train.config import TrainConfig
from train.uda.components.base import Tensors
from train.uda.losses import (
    backward_scaled,
    needed_source_features,
    segmentation_terms,
    source_feature_terms,
    target_feature_terms,
)
from train.uda.method import Method
from train.uda.mixing import mix
from train.uda.schedule import ema_alpha, ema_update, learning_rate, set_learning_rate


@dataclass
class Networks:
    """What one iteration trains: the student (its weights), its forward (compiled and/or in DDP), the
    EMA teacher (None for a source-only run) and the optimiser."""

    student: torch.nn.Module
    forward: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer


class NonFiniteLoss(ArithmeticError):
    """A loss term is NaN or infinite: the optimiser step is not taken."""

    def __init__(self, term: str, value: float) -> None:
        super().__init__(f"loss term '{term}' is {value}")
        self.term, self.value = term, value


def iteration(cfg: TrainConfig, method: Method, nets: Networks, batch: Tensors, it: int, seed: int
              ) -> tuple[Tensors, dict[str, float]]:
    """Iteration ``it``: the loss terms (already backpropagated) and the metrics (lr, pseudo-labels, components)."""
    torch.manual_seed(seed * 1_000_003 + it)  # 1. seed, learning rate, EMA teacher
    lr = learning_rate(it, cfg.run.iters, cfg.optim)
    set_learning_rate(nets.optimizer, lr)
    if nets.teacher is not None and it > 0:
        ema_update(nets.teacher, nets.student, ema_alpha(it, cfg.dacs.ema_alpha))
    for c in method.components:
        c.start(it)
    x = method.target.inputs(batch)  # 2. inputs
    metrics: dict[str, float] = {}
    mixed = None
    if nets.teacher is not None:
        pseudo, weight, metrics = teacher_pseudo_labels(cfg, method, nets.teacher, x)  # 3. pseudo-labels
        mixed = class_mix(cfg, method, x, pseudo, weight)  # 4. ClassMix + strong augmentation
        for c in method.components:  # 5. the components' inputs (MIC)
            c.extra_inputs(x, pseudo, weight)
    terms: Tensors = {}
    scale = 1.0 / cfg.run.accum
    for part in micro_batches(x["source_label"].shape[0], cfg.run.accum):  # 6. the passes
        x_part = take(x, part)
        t, keep = source_pass(cfg, method, nets.forward, x_part, part, scale)
        if mixed is not None:
            t.update(mixed_pass(cfg, method, nets.forward, take(mixed, part), keep, part, scale))
        for c in method.components:
            t.update(c.extra_pass(nets.forward, x_part, part, scale))
        for k, v in t.items():
            terms[k] = terms[k] + v if k in terms else v
    for c in method.components:  # 7. the components' finish
        metrics.update(c.finish())
    raise_if_not_finite(terms)  # 8. the optimiser step
    nets.optimizer.step()
    nets.optimizer.zero_grad(set_to_none=True)
    return terms, {"lr": lr, **metrics}


def teacher_mode(teacher: torch.nn.Module) -> None:
    """Teacher as in DACS: train mode (batch statistics) but no dropout and no drop path."""
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
            m.eval()


@torch.no_grad()
def teacher_pseudo_labels(cfg: TrainConfig, method: Method, teacher: torch.nn.Module, x: Tensors
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The teacher's pseudo-labels and weights for the target batch (the run's rule), and their metrics."""
    teacher_mode(teacher)
    drawn = bool(torch.rand(()) < cfg.dacs.teacher_events_p)
    inputs, used_events = method.target.teacher_inputs(x, drawn)
    size = x["target_events"].shape[-2:]
    with autocast(x["target_events"].device, method.amp):
        out = teacher(**inputs, embeddings=method.embeddings)
    pseudo, weight = method.pseudo_rule(out.logits[method.target.output], size)
    for c in method.components:
        c.after_pseudo_labels(x, out, pseudo)
    return pseudo, weight, {"pseudo/weight": float(weight.mean()), "pseudo/teacher_events": float(used_events)}


@torch.no_grad()
def class_mix(cfg: TrainConfig, method: Method, x: Tensors, pseudo: torch.Tensor, weight: torch.Tensor) -> Tensors:
    """ClassMix: the source classes ``method.class_masks`` picks, pasted onto the target; ``target`` marks
    the mixed sample's night pixels (the components may paste more and mask events)."""
    mask = method.class_masks(x["source_label"], cfg.dacs.classmix_per_sample)
    mixed = {**method.target.mix_inputs(cfg.dacs, mask, x), "label": mix(mask, x["source_label"], pseudo),
             "weight": mix(mask, torch.ones_like(weight), weight), "target": 1 - mask[:, 0]}
    for c in method.components:
        mixed = c.after_mix(mixed)
    return method.target.finish_mix(mixed)


def source_pass(cfg: TrainConfig, method: Method, student: torch.nn.Module, x: Tensors, part: slice, scale: float
                ) -> tuple[Tensors, Tensors]:
    """The target kind's source inputs (day image + source events + day ISR) -> the outputs' loss (+ source L2,
    + components) -> backward. Also returns the detached deepest source features the target-side L2 terms
    compare against."""
    with autocast(x["source_label"].device, method.amp):
        out = student(**method.target.source_inputs(x), embeddings=method.embeddings)
    terms = segmentation_terms(out.logits, x["source_label"], cfg.loss, prefix="src/")
    terms.update(source_feature_terms(out.features, cfg.loss))
    for c in method.components:
        terms.update(c.source_terms(out, x, part))
    terms = backward_scaled(terms, scale)
    return terms, {k: out.features[k][-1].detach() for k in needed_source_features(cfg.loss)}


def mixed_pass(cfg: TrainConfig, method: Method, student: torch.nn.Module, m: Tensors, keep: Tensors, part: slice,
               scale: float) -> Tensors:
    """The mixed sample with the pseudo weights (+ target-side L2 terms, + components) -> backward."""
    with autocast(m["label"].device, method.amp):
        out = student(**method.target.mixed_inputs(m), embeddings=method.embeddings)
    terms = segmentation_terms(out.logits, m["label"], cfg.loss, m["weight"], prefix="mix/")
    terms.update(target_feature_terms(out.features, keep, cfg.loss))
    for c in method.components:
        terms.update(c.mixed_terms(out, m, part))
    return backward_scaled(terms, scale)


def raise_if_not_finite(terms: Tensors) -> None:
    """One device sync per iteration for the check; the per-term search runs only once it fails."""
    if bool(torch.isfinite(torch.stack([v.detach().float() for v in terms.values()])).all()):
        return
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise NonFiniteLoss(name, value.detach().float().item())


def micro_batches(b: int, accum: int) -> list[slice]:
    """``accum`` equal, consecutive slices of a batch of ``b`` (validation checks that accum divides b)."""
    size = b // accum
    return [slice(i * size, (i + 1) * size) for i in range(accum)]


def take(x: Tensors, part: slice) -> Tensors:
    return {k: v[part] for k, v in x.items()}
