"""The pseudo-label rule of a run, chosen once: DACS's confidence share or class-adaptive thresholds.

:class:`ShareRule` is DACS's (Tranheden et al., WACV 2021) as CMDA runs it: argmax labels, one weight per
batch = the share of pixels whose confidence reaches ``dacs.pseudo_threshold``. :class:`AdaptiveRule`
(``dacs.pseudo_mode=adaptive``) is the class-adaptive threshold below. Both are called the same way,
``rule(teacher_fusion_logits, size) -> (labels, weight)``, so the step never asks which one it has.

Class-adaptive thresholds:

From the real-time DA project (seed realtime-da-bisenet.md): a pixel the teacher assigns to class c
is kept only if its confidence reaches ``min(median confidence of pixels assigned to c, cap)``
(cap 0.9); the others are ignored (label 255). Unlike that project's offline labels, the median here
is a *running* one: per class, a histogram of the teacher's confidences (``BINS`` bins over [0, 1])
decays by ``momentum`` each update and gains the batch's counts, and the median is read off its
cumulative sum (bin resolution 1/BINS). The histogram is part of the training state (checkpointed),
so a resumed run thresholds exactly as the uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.common import IGNORE
from train.config import DacsConfig
from train.uda.losses import ignore_rows, pseudo_labels

BINS = 1000


class AdaptiveThreshold:
    """Per-class running confidence histograms and the thresholds derived from them."""

    def __init__(self, num_classes: int, cap: float = 0.9, momentum: float = 0.99,
                 device: torch.device | str = "cpu") -> None:
        self.num_classes, self.cap, self.momentum = num_classes, cap, momentum
        self.hist = torch.zeros(num_classes, BINS, dtype=torch.float64, device=device)

    def update(self, prob: torch.Tensor, label: torch.Tensor) -> None:
        """Add the batch's confidences ``prob`` [B, H, W] of the argmax classes ``label`` [B, H, W]."""
        bins = (prob.detach().double() * BINS).long().clamp_(0, BINS - 1)
        counts = torch.zeros_like(self.hist).view(-1)
        counts.index_add_(0, (label.long() * BINS + bins).view(-1), torch.ones_like(bins, dtype=torch.float64).view(-1))
        self.hist.mul_(self.momentum).add_(counts.view(self.num_classes, BINS))

    def thresholds(self) -> torch.Tensor:
        """[C] thresholds: the running median's bin centre, capped; classes never seen get the cap."""
        cum = self.hist.cumsum(1)
        total = cum[:, -1:]
        idx = (cum < total / 2).sum(1).clamp(max=BINS - 1)
        median = (idx.double() + 0.5) / BINS
        return torch.where(total[:, 0] > 0, median.clamp(max=self.cap), torch.full_like(median, self.cap)).float()

    def apply(self, prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels with pixels below their class threshold set to 255 (after updating the medians)."""
        self.update(prob, label)
        thr = self.thresholds().to(prob.device)[label.long()]
        return torch.where(prob >= thr, label, torch.full_like(label, IGNORE))

    def pseudo_labels(self, fusion_logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's pseudo-labels at ``size`` with low-confidence pixels ignored, and a weight of 1
        (the thresholds replace DACS's confidence share)."""
        logits = F.interpolate(fusion_logits.float(), size=size, mode="bilinear", align_corners=False)
        prob, label = torch.softmax(logits, dim=1).max(dim=1)
        return self.apply(prob, label), torch.ones_like(prob)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"hist": self.hist.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.hist.copy_(state["hist"].to(self.hist.device))


class ShareRule:
    """DACS's rule: argmax labels weighted by the batch's share of confident pixels (no state)."""

    state_key = None

    def __init__(self, cfg: DacsConfig) -> None:
        self.cfg = cfg

    def __call__(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return pseudo_labels(logits, size, c.pseudo_threshold, c.pseudo_weight_ignore_top,
                             c.pseudo_weight_ignore_bottom)


class AdaptiveRule:
    """Per-class running-median thresholds (:class:`AdaptiveThreshold`, checkpointed under ``state_key``)."""

    state_key = "adaptive_threshold"

    def __init__(self, cfg: DacsConfig, num_classes: int, device: torch.device) -> None:
        self.cfg = cfg
        self.threshold = AdaptiveThreshold(num_classes, cfg.adaptive_cap, device=device)

    def __call__(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        pseudo, weight = self.threshold.pseudo_labels(logits, size)
        return pseudo, ignore_rows(weight, self.cfg.pseudo_weight_ignore_top, self.cfg.pseudo_weight_ignore_bottom)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.threshold.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.threshold.load_state_dict(state)


def pseudo_rule(cfg: DacsConfig, num_classes: int, device: torch.device) -> ShareRule | AdaptiveRule:
    """The run's rule from ``dacs.pseudo_mode``."""
    return AdaptiveRule(cfg, num_classes, device) if cfg.pseudo_mode == "adaptive" else ShareRule(cfg)
