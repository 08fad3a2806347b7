"""DSRNSS dynamic and small object refinement as three switchable pieces (Rorisis/DSRNSS_codes, ``dsr.*``).

DSRNSS (Pan et al. 2023, Rorisis/DSRNSS_codes) adds three things to DACS self-training on night images:

1. **grouped ClassMix** — when ClassMix picks a class, its companions in the same sample come with it
   (pole <-> traffic light / traffic sign; rider -> bicycle / motorcycle), so a traffic light is never
   pasted without its pole nor a rider without the bike under it;
2. **a tail-class bank** — source pixels (image, events, label) of rider, truck, bus, motorcycle and
   bicycle from the last few source batches, pasted onto the mixed sample every ``paste_every`` iterations;
3. **prototype alignment** at the deepest encoder stage — per-class masked-mean prototypes of one domain
   classify the other domain's pixel features by cosine similarity (x 10) and vice versa.

All three are off unless ``dsr.enabled``.

In the step, :class:`Dsrnss` (below) implements the component hooks (:mod:`train.uda.components.base`):
``after_pseudo_labels`` keeps the teacher's deepest features and pushes the source batch's tail pixels into
the bank (before the paste, as DSRNSS); ``after_mix`` pastes the bank every ``paste_every`` iterations;
``source_terms`` / ``mixed_terms`` add ``dsr/proto`` and ``dsr/proto_mix`` from ``proto_start`` on. The
grouped ClassMix is the run's ClassMix function (:func:`train.uda.method.build_method`). The bank is saved
under ``"dsr_bank"``; under DDP it receives every rank's batch (:func:`train.common.collective.gather`), so
the ranks' banks stay equal.

Costs: grouped ClassMix and the bank are a few masked copies per iteration; the bank holds ``capacity``
batches of image + events (fp32) + label + mask (uint8, bool): 26 bytes per pixel per sample. The prototype loss works
at the deepest stage (1/32), a [classes x pixels] matrix per sample: negligible next to the encoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from train.common import IGNORE
from train.common.collective import gather, world
from train.config import TAIL_CLASSES, DsrConfig
from train.uda.components.base import Component, Tensors
from train.uda.mixing import classmix_draws

COMPANIONS: dict[int, tuple[int, ...]] = {5: (6, 7), 6: (5,), 7: (5,), 12: (17, 18)}
"""Class -> classes that come with it in grouped ClassMix: pole <-> traffic light / sign, rider -> bikes.

Applied to a fixpoint, so a picked traffic light brings its pole and, through the pole, the signs
(DSRNSS's order of checks gives the same closure)."""

DYNAMIC_SMALL: tuple[int, ...] = (5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
"""pole, traffic light, sign, person, rider, car, truck, bus, train, motorcycle, bicycle: DSRNSS's
'dynamic and small' list, which the prototype loss weighs up by ``DsrConfig.proto_class_weight``."""


# ---------------------------------------------------------------------- grouped ClassMix
def with_companions(chosen: torch.Tensor, present: torch.Tensor,
                    companions: Mapping[int, Sequence[int]] = COMPANIONS) -> torch.Tensor:
    """``chosen`` plus, to a fixpoint, every companion of a chosen class that is in ``present``.

    Both are 1-D integer tensors of class ids; the result is sorted and unique. Classes of ``chosen``
    that are not in ``present`` stay (they mask nothing in that sample anyway).
    """
    out = {int(c) for c in chosen.tolist()}
    have = {int(c) for c in present.tolist()}
    todo = list(out)
    while todo:
        c = todo.pop()
        for d in companions.get(c, ()):
            if d in have and d not in out:
                out.add(d)
                todo.append(d)
    return torch.tensor(sorted(out), dtype=chosen.dtype, device=chosen.device)


def grouped_class_masks(labels: torch.Tensor, companions: Mapping[int, Sequence[int]] = COMPANIONS,
                        per_sample: bool = True) -> torch.Tensor:
    """ClassMix masks [B, 1, H, W] as :func:`train.uda.mixing.class_masks` (the same draws, so the same
    random stream), each sample's set then grown by the companions present in that sample."""
    masks = []
    for lbl, chosen in zip(labels, classmix_draws(labels, per_sample), strict=True):
        picked = with_companions(chosen, torch.unique(lbl), companions)
        masks.append(torch.isin(lbl, picked))
    return torch.stack(masks).unsqueeze(1).float()


# ---------------------------------------------------------------------- tail-class bank
class TailBank:
    """FIFO of the tail-class pixels of the last ``capacity`` source batches.

    Each entry keeps image and events zeroed outside the tail pixels, the label (255 outside) and the
    boolean mask, detached. Batches without any tail pixel are not stored. ``paste`` copies entries
    oldest first onto a mixed batch (newer entries win where they overlap), touching only those pixels.
    """

    def __init__(self, capacity: int = 3, classes: Sequence[int] = TAIL_CLASSES):
        if capacity < 1:
            raise ValueError(f"bank capacity must be >= 1, not {capacity}")
        self.capacity = int(capacity)
        self.classes = tuple(int(c) for c in classes)
        self.entries: list[dict[str, torch.Tensor]] = []

    @property
    def n_entries(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def push(self, image: torch.Tensor, events: torch.Tensor | None, label: torch.Tensor) -> bool:
        """Store the tail pixels of one source batch ([B,C,H,W], [B,C,H,W] or None, [B,H,W]); False if none.

        ``events`` None (an image-only target has no event input): the entry holds image and label only."""
        mask = torch.isin(label, torch.tensor(self.classes, device=label.device))
        if not bool(mask.any()):
            return False
        m = mask.unsqueeze(1)
        self.entries.append({
            "image": torch.where(m, image.detach(), 0).clone(),
            **({} if events is None else {"events": torch.where(m, events.detach(), 0).clone()}),
            "label": torch.where(mask, label, IGNORE).to(torch.uint8),  # trainIds and 255 fit a byte
            "mask": mask.clone(),
        })
        del self.entries[: max(0, len(self.entries) - self.capacity)]
        return True

    @staticmethod
    def should_paste(iteration: int, every: int) -> bool:
        return every > 0 and iteration % every == 0

    @torch.no_grad()
    def paste(self, image: torch.Tensor, events: torch.Tensor | None, label: torch.Tensor,
              weight: torch.Tensor | None = None, offset: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """New tensors with every entry pasted (oldest first); pasted label pixels get weight 1.

        Returns ``(image, events, label, weight, pasted)`` with ``pasted`` the [B, H, W] boolean union.
        Entry sample ``(offset + i) % B_entry`` goes onto batch sample ``i`` (under DDP the entries hold
        every rank's batch and rank r passes ``offset = r * B``). Raises ValueError on a size mismatch.
        ``events`` None: only image, label and weight are pasted; an entry without events (pushed
        without them) leaves the events of the batch untouched under its pixels.
        """
        b, h, w = label.shape
        pasted = torch.zeros_like(label, dtype=torch.bool)
        image, label = image.clone(), label.clone()
        events = None if events is None else events.clone()
        weight = None if weight is None else weight.clone()
        for e in self.entries:
            if e["mask"].shape[-2:] != (h, w):
                raise ValueError(f"bank entry of size {tuple(e['mask'].shape[-2:])} cannot paste onto {(h, w)}")
            idx = (torch.arange(b, device=label.device) + offset) % e["mask"].shape[0]
            m = e["mask"][idx].to(label.device)
            m4 = m.unsqueeze(1)
            image = torch.where(m4, e["image"][idx].to(image), image)
            if events is not None and "events" in e:
                events = torch.where(m4, e["events"][idx].to(events), events)
            label = torch.where(m, e["label"][idx].to(label), label)
            if weight is not None:
                weight = torch.where(m, torch.ones_like(weight), weight)
            pasted |= m
        return image, events, label, weight, pasted

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "classes": list(self.classes),
                "entries": [{k: v.cpu() for k, v in e.items()} for e in self.entries]}

    def load_state_dict(self, state: Mapping, device: torch.device | str | None = None) -> None:
        self.capacity = int(state["capacity"])
        self.classes = tuple(int(c) for c in state["classes"])
        self.entries = [{k: v.to(device) if device is not None else v.clone() for k, v in e.items()}
                        for e in state["entries"]]


# ---------------------------------------------------------------------- prototype alignment
def _labels_at(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour label map at feature resolution ([H, W] -> [h, w]), as DSRNSS."""
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def class_weights(num_classes: int, up: float, classes: Sequence[int] = DYNAMIC_SMALL,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Per-class CE weights: ``up`` for the dynamic/small classes, 1 elsewhere."""
    w = torch.ones(num_classes, device=device)
    w[[c for c in classes if c < num_classes]] = up
    return w


def prototype_loss(feat_a: torch.Tensor, label_a: torch.Tensor, feat_b: torch.Tensor, label_b: torch.Tensor,
                   scale: float = 10.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One sample pair: CE(b's pixels vs a's prototypes) + CE(a's pixels vs b's prototypes).

    ``feat_*`` [C, h, w] (any resolution each), ``label_*`` [H, W] (255 ignored, downsampled by nearest).
    Only classes present in BOTH label maps take part: they are the softmax's classes, their pixels
    the CE's pixels; a class missing on either side contributes nothing. Prototypes are masked means
    (gradient flows through them and through the pixel features). Logits are
    ``scale * cos(pixel, prototype)``. ``weights`` [num_classes]: per-class CE weights, the CE being
    their weighted mean over pixels (torch's rule). Zero (with a graph) when no class is shared.
    """
    la = _labels_at(label_a, feat_a.shape[-2:]).flatten()
    lb = _labels_at(label_b, feat_b.shape[-2:]).flatten()
    shared = [c for c in torch.unique(la).tolist() if c != IGNORE and bool((lb == c).any())]
    if not shared:
        return (feat_a.sum() + feat_b.sum()) * 0
    fa = feat_a.flatten(1).float()  # [C, Na]
    fb = feat_b.flatten(1).float()
    cls = torch.tensor(shared, device=fa.device)
    ma = (la[None, :] == cls[:, None]).float()  # [S, Na]
    mb = (lb[None, :] == cls[:, None]).float()
    proto_a = (ma @ fa.T) / ma.sum(1, keepdim=True)  # [S, C]
    proto_b = (mb @ fb.T) / mb.sum(1, keepdim=True)
    w = None if weights is None else weights.to(fa.device)[cls].float()

    def ce(feat: torch.Tensor, mask: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        keep = mask.any(0)
        logits = scale * F.normalize(proto, dim=1) @ F.normalize(feat[:, keep], dim=0)  # [S, n]
        target = mask[:, keep].argmax(0)
        return F.cross_entropy(logits.T, target, weight=w)

    return ce(fb, mb, proto_a) + ce(fa, ma, proto_b)


def batch_prototype_loss(feat_a: torch.Tensor, label_a: torch.Tensor, feat_b: torch.Tensor,
                         label_b: torch.Tensor, scale: float = 10.0,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of :func:`prototype_loss` of sample pairs (i, i), as DSRNSS per image."""
    losses = [prototype_loss(fa, la, fb, lb, scale, weights)
              for fa, la, fb, lb in zip(feat_a, label_a, feat_b, label_b, strict=True)]
    return torch.stack(losses).mean()


def prototype_terms(cfg: DsrConfig, source: tuple[torch.Tensor, torch.Tensor],
                    target: tuple[torch.Tensor, torch.Tensor] | None = None,
                    mixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Named prototype terms: ``dsr/proto`` = w x P(source, target), ``dsr/proto_mix`` = w x f x
    P(source, mixed) (f = ``proto_mix_factor``), each pair given as ([B, C, h, w] features,
    [B, H, W] labels). Empty dict when the term is off (``enabled`` False or zero weight)."""
    if not (cfg.enabled and cfg.proto_weight):
        return {}
    feat_s, lbl_s = source
    weights = class_weights(cfg.num_classes, cfg.proto_class_weight, device=feat_s.device)
    terms = {}
    if target is not None:
        terms["dsr/proto"] = cfg.proto_weight * batch_prototype_loss(
            feat_s, lbl_s, target[0], target[1], cfg.proto_scale, weights)
    if mixed is not None and cfg.proto_mix_factor:
        terms["dsr/proto_mix"] = cfg.proto_weight * cfg.proto_mix_factor * batch_prototype_loss(
            feat_s, lbl_s, mixed[0], mixed[1], cfg.proto_scale, weights)
    return terms


# ---------------------------------------------------------------------- the component in the step
def _key(part: slice) -> int:
    return part.start or 0


class Dsrnss(Component):
    """DSRNSS in the step: the tail bank (``dsr_bank``) and the prototype terms; the grouped ClassMix is
    the run's ClassMix function (:func:`train.uda.method.build_method`), not a hook."""

    state_key: str | None = "dsr_bank"

    def __init__(self, cfg: DsrConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.bank = TailBank(cfg.bank_capacity, cfg.bank_classes) if cfg.bank else None
        self.state_key = "dsr_bank" if self.bank is not None else None  # no bank, nothing to keep
        self.it = 0

    def start(self, it: int) -> None:
        self.it, self.pasted = it, None
        self.teacher_deep = self.pseudo = None
        self.source_deep: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def proto(self) -> bool:
        """Prototype terms this iteration (non-zero weight, from ``dsr.proto_start``)."""
        return self.cfg.proto_weight > 0 and self.it >= self.cfg.proto_start

    def after_pseudo_labels(self, inputs: Tensors, teacher_out, pseudo: torch.Tensor) -> None:
        """Keep the teacher's deepest features; store the source batch's tail pixels (before the paste, as
        DSRNSS; under DDP every rank's batch, so the ranks' banks stay equal)."""
        if self.proto:
            self.teacher_deep, self.pseudo = teacher_out.features[self.cfg.proto_features][-1], pseudo
        if self.bank is not None:
            events = inputs.get("source_events")
            self.bank.push(gather(inputs["source_image"]), None if events is None else gather(events),
                           gather(inputs["source_label"]))

    def after_mix(self, mixed: Tensors) -> Tensors:
        """Paste the tail bank every ``dsr.paste_every`` iterations; pasted pixels stop being target pixels."""
        bank = self.bank
        if bank is None or not bank.should_paste(self.it, self.cfg.paste_every) or not bank.n_entries:
            return mixed
        image, events, label, weight, pasted = bank.paste(mixed["image"], mixed["events"], mixed["label"],
                                                          mixed["weight"], offset=world()[0] * mixed["label"].shape[0])
        self.pasted = float(pasted.float().mean())
        return {**mixed, "image": image, "events": events, "label": label, "weight": weight,
                "target": mixed["target"] * ~pasted}

    def source_terms(self, out, x: Tensors, part: slice) -> Tensors:
        """``dsr/proto``: source vs the teacher's target prototypes."""
        if not self.proto:
            return {}
        f = out.features[self.cfg.proto_features][-1]
        self.source_deep[_key(part)] = (f.detach(), x["source_label"])
        return prototype_terms(self.cfg, source=(f, x["source_label"]),
                               target=(self.teacher_deep[part], self.pseudo[part]))

    def mixed_terms(self, out, m: Tensors, part: slice) -> Tensors:
        """``dsr/proto_mix``: source vs mixed prototypes."""
        if not self.proto:
            return {}
        return prototype_terms(self.cfg, source=self.source_deep.pop(_key(part)),
                               mixed=(out.features[self.cfg.proto_features][-1], m["label"]))

    def finish(self) -> dict[str, float]:
        if self.bank is None:
            return {}
        return {"dsr/pasted": self.pasted or 0.0, "dsr/bank_entries": float(self.bank.n_entries)}

    def state_dict(self) -> dict | None:
        return None if self.bank is None else self.bank.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        if self.bank is not None:
            self.bank.load_state_dict(state, device=self.device)


def build(cfg, run) -> Dsrnss | None:
    return Dsrnss(cfg.dsr, run.device) if cfg.dsr.enabled else None
