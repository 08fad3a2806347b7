"""The peer components (DSRNSS ``dsr.*``, DIDA ``dida.*``, the light discriminator ``adv.*``) in the DACS loop.

train/dsr.py, dida.py and adversarial.py hold each component; this module holds what the loop keeps of
them between iterations (:class:`Peers`: the tail-class bank, the instance bank, the discriminator and
its optimiser, created in :func:`train.dacs.build`, saved in the checkpoint and restored on resume) and
one iteration's calls from the passes of :func:`train.dacs._step` (:class:`PeerStep`), so the loop
gets one explicit call per pass instead of flags threaded through it. With all three off every call
returns at once and draws no random number: the baseline's random stream and results are unchanged.

Where each component hooks in (full batch unless said, so ``run.accum`` > 1 gives the same result):

- after the teacher's pseudo-labels: :meth:`PeerStep.teacher` keeps its deepest features (DSRNSS
  prototypes) and decoder embedding (DIDA); :meth:`PeerStep.push_tail` stores the source batch's
  tail-class pixels in the bank (DSRNSS);
- ClassMix: :meth:`PeerStep.class_masks` (grouped ClassMix, the same random draws as CMDA's) and
  :meth:`PeerStep.paste_tail` (the bank pasted every ``dsr.paste_every`` iterations), which also
  returns the map of the mixed image's target pixels that DIDA and the discriminator weigh by;
- per micro-batch, before each pass's backward: :meth:`PeerStep.source` (``dsr/proto``) and
  :meth:`PeerStep.mixed` (``dsr/proto_mix``, ``dida/instance``, ``adv/generator``); with
  ``adv.input=target`` the generator term comes instead from a pass of its own on the target image
  (:meth:`PeerStep.target`, after the mixed pass);
- after the last pass: :meth:`PeerStep.finish` updates the instance bank from the whole batch's source
  embeddings and steps the discriminator on the whole batch's (detached) outputs. DIDA's bank is
  therefore updated *after* the iteration's instance loss, which sees the bank as it was after the
  previous iteration: that keeps gradient accumulation exact (departure from DIDA's order, README).

Under torchrun (DDP) the components' state stays the same on every rank (train/collective.py), so rank
0's checkpoint resumes them all: the tail bank stores every rank's source batch (rank r pastes the
entries' samples r*B .. r*B+B-1 onto its own), DIDA's bank is updated from every rank's embeddings and
then takes rank 0's slots (the random picks differ by rank), and the discriminator steps on the ranks'
mean gradient. The prototype terms need nothing: DDP averages their gradients with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.adversarial import Adversary
from train.collective import average_gradients, broadcast_, gather, world
from train.config import TrainConfig
from train.dida import InstanceBank, dida_terms
from train.dsr import TailBank, grouped_class_masks, prototype_terms
from train.inference import autocast
from train.mixing import class_masks

STATE_KEYS = {"tail": "dsr_bank", "instances": "dida_bank", "adversary": "adversary"}
"""Peers attribute -> checkpoint key (the module docstrings' names)."""


@dataclass
class Peers:
    """What the peer components keep across iterations (None where a component, or its bank, is off)."""

    tail: TailBank | None = None
    instances: InstanceBank | None = None
    adversary: Adversary | None = None
    device: torch.device | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, device: torch.device) -> Peers:
        """The components' state. Under DDP every rank builds the same (same seed; the discriminator's
        initial weights are broadcast from rank 0 all the same) and keeps it equal (module docstring)."""
        s = cfg.dsr
        peers = cls(
            tail=TailBank(s.bank_capacity, s.bank_classes) if s.enabled and s.bank else None,
            instances=InstanceBank(cfg.dida, device) if cfg.dida.enabled else None,
            adversary=Adversary(cfg.adv, cfg.model.num_classes, device) if cfg.adv.enabled else None,
            device=device)
        if peers.adversary is not None:
            broadcast_(*peers.adversary.disc.parameters())
        return peers

    def state_dict(self) -> dict[str, Any]:
        """``{checkpoint key: state}`` of the components that are on (a checkpoint's ``extra``)."""
        return {key: getattr(self, name).state_dict() for name, key in STATE_KEYS.items()
                if getattr(self, name) is not None}

    def load_state_dict(self, state: Mapping[str, Any], path: Path | None = None, say=print) -> None:
        """Restore from a checkpoint. A component switched on since (``--resume-override``) starts fresh."""
        for name, key in STATE_KEYS.items():
            part = getattr(self, name)
            if part is None:
                continue
            if state.get(key) is None:
                say(f"note: {path} holds no {key}: it starts empty (the component was off in that run)")
                continue
            if isinstance(part, TailBank):
                part.load_state_dict(state[key], device=self.device)
            else:
                part.load_state_dict(state[key])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.tail is not None:
            out["dsr/bank_entries"] = float(self.tail.n_entries)
        if self.instances is not None:
            out["dida/bank_filled"] = float(self.instances.n_filled)
        return out


@dataclass
class PeerStep:
    """One iteration's peer-component work; the loop calls its methods from the passes (module docstring)."""

    cfg: TrainConfig
    peers: Peers
    it: int
    _teacher_deep: torch.Tensor | None = None
    _teacher_emb: torch.Tensor | None = None
    _pseudo: torch.Tensor | None = None
    _source_deep: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _bank_in: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _adv_source: list[torch.Tensor] = field(default_factory=list)
    _adv_target: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _pasted: float | None = None

    @property
    def proto(self) -> bool:
        """DSRNSS prototype terms this iteration (on, non-zero weight, from ``dsr.proto_start``)."""
        s = self.cfg.dsr
        return s.enabled and s.proto_weight > 0 and self.it >= s.proto_start

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Outputs whose decoder embedding the passes must return (DIDA's fusion embedding)."""
        return ("fusion",) if self.peers.instances is not None else ()

    # ------------------------------------------------------------ teacher side and ClassMix (full batch)
    def teacher(self, t_out: Any, pseudo: torch.Tensor) -> None:
        """Keep what the passes compare against: the teacher's deepest features and decoder embedding."""
        if self.proto:
            self._teacher_deep = t_out.features[self.cfg.dsr.proto_features][-1]
            self._pseudo = pseudo
        if self.peers.instances is not None:
            self._teacher_emb = t_out.embeddings["fusion"]

    def push_tail(self, x: Mapping[str, torch.Tensor]) -> None:
        """DSRNSS: store this source batch's tail-class pixels (before the paste, as DSRNSS); under DDP
        every rank's batch, so the ranks' banks stay equal."""
        if self.peers.tail is not None:
            events = x.get("source_events")
            self.peers.tail.push(gather(x["source_image"]), None if events is None else gather(events),
                                 gather(x["source_label"]))

    def class_masks(self, labels: torch.Tensor, per_sample: bool) -> torch.Tensor:
        """ClassMix masks: DSRNSS's grouped ones when ``dsr.grouped_mix`` (the same random draws)."""
        if self.cfg.dsr.enabled and self.cfg.dsr.grouped_mix:
            return grouped_class_masks(labels, per_sample=per_sample)
        return class_masks(labels, per_sample)

    def paste_tail(self, image: torch.Tensor, events: torch.Tensor | None, label: torch.Tensor,
                   weight: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DSRNSS: paste the tail bank onto the mixed sample every ``dsr.paste_every`` iterations.

        Returns the (possibly pasted) image, events, label, weight and the [B, H, W] map of the mixed
        sample's target pixels (1 - ClassMix mask, 0 where the bank pasted source pixels)."""
        target = 1 - mask[:, 0]
        tail = self.peers.tail
        if tail is None or not tail.should_paste(self.it, self.cfg.dsr.paste_every) or not tail.n_entries:
            return image, events, label, weight, target
        image, events, label, weight, pasted = tail.paste(image, events, label, weight,
                                                          offset=world()[0] * label.shape[0])
        self._pasted = float(pasted.float().mean())
        return image, events, label, weight, target * ~pasted

    # ------------------------------------------------------------ the passes (per micro-batch ``part``)
    def source(self, out: Any, x: Mapping[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
        """Source pass, before its backward: ``dsr/proto`` (source vs the teacher's target prototypes);
        keeps the detached outputs the mixed pass and :meth:`finish` need."""
        terms: dict[str, torch.Tensor] = {}
        if self.proto:
            f = out.features[self.cfg.dsr.proto_features][-1]
            terms = prototype_terms(self.cfg.dsr, source=(f, x["source_label"]),
                                    target=(self._teacher_deep[part], self._pseudo[part]))
            self._source_deep[_key(part)] = (f.detach(), x["source_label"])
        if self.peers.instances is not None:
            self._bank_in.append((out.embeddings["fusion"].detach(), x["source_label"]))
        if self.peers.adversary is not None:
            self._adv_source.append(out.logits["fusion"].detach())
        return terms

    def mixed(self, out: Any, m: Mapping[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
        """Mixed pass, before its backward: ``dsr/proto_mix``, ``dida/instance``, ``adv/generator``."""
        terms: dict[str, torch.Tensor] = {}
        if self.proto:
            src = self._source_deep.pop(_key(part))
            terms.update(prototype_terms(self.cfg.dsr, source=src,
                                         mixed=(out.features[self.cfg.dsr.proto_features][-1], m["label"])))
        if self.peers.instances is not None:
            terms.update(dida_terms(self.cfg.dida, self.peers.instances, self._teacher_emb[part],
                                    out.embeddings["fusion"], out.logits["fusion"], m["target"]))
        adv = self.peers.adversary
        if adv is not None and not self.target_pass:
            terms.update(adv.generator_terms(out.logits["fusion"], m["target"]))
            self._adv_target.append((out.logits["fusion"].detach(), m["target"]))
        return terms

    @property
    def target_pass(self) -> bool:
        """``adv.input=target``: the discriminator sees a student pass on the plain target image."""
        return self.peers.adversary is not None and self.cfg.adv.input == "target"

    def target(self, fwd: torch.nn.Module, x: Mapping[str, torch.Tensor], amp: bool, scale: float
               ) -> dict[str, torch.Tensor]:
        """``adv.input=target``: the student's fusion output on the target image + events (the real-time
        project's target prediction), ``adv/generator`` on all its pixels, backpropagated here (own pass)."""
        img = x["target_image"]
        with autocast(img.device, amp):
            out = fwd(image=img, events=x["target_events"], outputs=("fusion",))
        logits = out.logits["fusion"]
        terms = {k: v * scale for k, v in self.peers.adversary.generator_terms(logits).items()}
        sum(terms.values()).backward()
        self._adv_target.append((logits.detach(), torch.ones_like(logits[:, 0], dtype=torch.float32)))
        return terms

    # ------------------------------------------------------------ after the passes (full batch)
    def finish(self) -> dict[str, float]:
        """Update DIDA's bank and step the discriminator on the whole batch; the components' metrics."""
        extra: dict[str, float] = {}
        bank = self.peers.instances
        if bank is not None and self._bank_in:
            emb, lbl = (gather(torch.cat(t)) for t in zip(*self._bank_in, strict=True))  # DDP: the global batch
            bank.update(emb, lbl, self.it)
            broadcast_(bank.feats, bank.filled)  # DDP: rank 0's random picks
        adv = self.peers.adversary
        if adv is not None and self._adv_target:
            tgt, w = (torch.cat(t) for t in zip(*self._adv_target, strict=True))
            extra["adv/lr"] = adv.set_lr(self.it, self.cfg.run.iters)
            extra.update(adv.discriminator_step(torch.cat(self._adv_source), tgt, w,
                                                reduce_grads=average_gradients))  # DDP: the ranks' mean
        if self.peers.tail is not None:
            extra["dsr/pasted"] = self._pasted or 0.0  # share of the mixed pixels pasted from the bank
        extra.update(self.peers.metrics())
        return extra


def _key(part: slice) -> int:
    return part.start or 0

