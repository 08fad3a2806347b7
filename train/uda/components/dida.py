"""DIDA's instance bank and instance-level soft cross-entropy (RainJamesY/DIDA, ``dida.*``).

DIDA (Yao & Li 2023, RainJamesY/DIDA) keeps a class-balanced bank of K source decoder embeddings
(256-d, the head's map before its classifier). A target pixel's teacher embedding is compared with every
bank entry; the similarities, calibrated by the student's own class score for each entry's class and
normalised over K, are a soft pseudo-label over *instances* that the student's similarities on the
mixed image must match (soft cross-entropy, weight 0.5). It complements the class-level pseudo-label
with an instance-level one.

How cmda computes it (and where it departs from the reference code):

- Everything stays at the decoder's 1/4 resolution: similarities are ``[B, K, H/4, W/4]`` (2 x 300 x
  128 x 128 fp32 = 39 MB for 512 crops) instead of DIDA's ``[B, K, 512, 512]`` (~0.6 GB each);
  ``DidaConfig.chunk`` bounds the pixels handled at once further.
- The bank starts empty: slot k belongs to class ``k % num_classes`` (class balance by construction,
  counts differ by at most one); an empty slot is filled with one boundary-pixel embedding of its class
  the first time that class has boundary pixels in a source batch (DIDA loads a pre-computed bank).
  Only filled slots take part in the similarities.
- Every ``update_every`` (50) iterations each *filled* slot of a class present on the boundary moves by
  EMA (``momentum`` 0.999) towards the mean boundary embedding of its class in the batch; DIDA's code
  also pulls the slots of absent classes towards zero, which cmda does not.
- Boundary pixels: a 3x3 neighbourhood (at 1/4 resolution) holding >= 2 distinct labels (DIDA's
  ``BPS_th = 2``); ignore pixels are never picked themselves.
- Similarities are DIDA's raw dot products normalised by their sum over K (the embeddings follow a
  ReLU, so they are non-negative). Calibration multiplies the teacher's similarity to entry k by the
  student's softmax probability of entry k's class (``calibrate = "prob"``); DIDA multiplies by the raw
  logit (``calibrate = "logit"`` restores it), which can turn negative.
- ``target_only`` (default True): the loss covers the mixed image's *target* pixels only (the teacher
  embedding comes from the target image, which pasted source pixels do not show); False = DIDA (all).

In the step, :class:`Dida` (below) implements the component hooks (:mod:`train.uda.components.base`): the
teacher's embedding from ``after_pseudo_labels``, ``dida/instance`` on each mixed micro-batch, and the bank
update in ``finish`` on the whole batch's source embeddings, after the loss (one change from DIDA's order, so
``run.accum`` stays exact). The bank is saved under ``"dida_bank"``; under DDP it is updated from the global
batch and takes rank 0's random picks (:mod:`train.common.collective`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from train.common import IGNORE
from train.common.collective import broadcast_, gather
from train.config import DidaConfig
from train.uda.components.base import Component, Tensors

EPS = 1e-10  # DIDA's `near_0` inside the log


def boundary_mask(label: torch.Tensor, min_labels: int = 2, num_classes: int = 19) -> torch.Tensor:
    """[B, h, w] bool: non-ignore pixels whose 3x3 window (clipped at the border) has >= ``min_labels``
    distinct labels (the ignore value counts as a label)."""
    lbl = torch.where(label >= num_classes, num_classes, label.long())
    present = F.one_hot(lbl, num_classes + 1).permute(0, 3, 1, 2).float()
    seen = F.max_pool2d(present, 3, stride=1, padding=1)  # zero padding: the border adds no label
    return (seen.sum(1) >= min_labels) & (label != IGNORE)


def labels_at(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] labels -> [B, h, w] by nearest neighbour."""
    if label.shape[-2:] == tuple(size):
        return label.long()
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


class InstanceBank:
    """K class-balanced source embeddings; ``feats`` [K, dim], ``labels`` [K] (slot k -> class k % C),
    ``filled`` [K] bool."""

    def __init__(self, cfg: DidaConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        k = cfg.bank_size
        self.feats = torch.zeros(k, cfg.dim, device=device)
        self.labels = torch.arange(k, device=device) % cfg.num_classes
        self.filled = torch.zeros(k, dtype=torch.bool, device=device)

    @property
    def n_filled(self) -> int:
        return int(self.filled.sum())

    @torch.no_grad()
    def update(self, emb: torch.Tensor, label: torch.Tensor, iteration: int) -> None:
        """Fill empty slots from boundary pixels; every ``update_every`` iterations EMA the filled ones.

        ``emb`` [B, dim, h, w] (detached here), ``label`` [B, H, W] (downsampled by nearest).
        Slots filled in this call are not EMA-updated in it. Randomness: torch's global generator.
        """
        cfg = self.cfg
        emb = emb.detach().float()
        lbl = labels_at(label.to(emb.device), emb.shape[-2:])
        edge = boundary_mask(lbl, cfg.boundary_min_labels, cfg.num_classes)
        pix = emb.permute(0, 2, 3, 1)[edge]  # [N, dim]
        cls = lbl[edge]
        do_ema = cfg.update_every > 0 and iteration % cfg.update_every == 0
        before = self.filled.clone()
        for c in torch.unique(cls).tolist():
            if c >= cfg.num_classes:
                continue
            e = pix[cls == c]
            slots = (self.labels == c).nonzero()[:, 0]
            empty = slots[~self.filled[slots]]
            if empty.numel():
                pick = torch.randperm(e.shape[0], device=e.device)[: empty.numel()]
                dst = empty[: pick.numel()]
                self.feats[dst] = e[pick]
                self.filled[dst] = True
            if do_ema:
                old = slots[before[slots]]
                if old.numel():
                    self.feats[old] = cfg.momentum * self.feats[old] + (1 - cfg.momentum) * e.mean(0)

    def state_dict(self) -> dict:
        return {"feats": self.feats.cpu(), "labels": self.labels.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state: Mapping) -> None:
        dev = self.feats.device
        self.feats = state["feats"].to(dev).clone()
        self.labels = state["labels"].to(dev).clone()
        self.filled = state["filled"].to(dev).clone()


def similarities(emb: torch.Tensor, bank_feats: torch.Tensor) -> torch.Tensor:
    """Raw dot products [B, K, h, w] of pixel embeddings [B, dim, h, w] with bank rows [K, dim]."""
    return torch.einsum("bchw,kc->bkhw", emb.float(), bank_feats.float())


def normalise(sim: torch.Tensor) -> torch.Tensor:
    """DIDA's normalisation over K (dim 1): divide by the sum (similarities are non-negative)."""
    return sim / sim.sum(1, keepdim=True).clamp_min(EPS)


def calibrated_target(sim_teacher: torch.Tensor, student_logits: torch.Tensor, bank_labels: torch.Tensor,
                      mode: str = "prob") -> torch.Tensor:
    """Soft instance target [B, K, h, w]: teacher similarity x student score of each entry's class,
    normalised over K. ``student_logits`` [B, C, h, w] (detached here); mode "prob" uses its softmax,
    "logit" the raw logits (DIDA), "none" no calibration."""
    if mode == "none":
        return normalise(sim_teacher)
    lg = student_logits.detach().float()
    score = torch.softmax(lg, 1) if mode == "prob" else lg
    if mode not in ("prob", "logit"):
        raise ValueError(f"dida.calibrate must be 'prob', 'logit' or 'none', not {mode!r}")
    return normalise(sim_teacher * score.index_select(1, bank_labels))


def instance_loss(target: torch.Tensor, sim_student: torch.Tensor, pixel_weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Soft CE over K: mean over pixels of ``-sum_k target * log(p_student + 1e-10)``, p normalised by sum.

    ``pixel_weight`` [B, h, w]: per-pixel weights, the mean then taken over all pixels (mmseg's rule).
    """
    ce = -(target.detach() * torch.log(normalise(sim_student) + EPS)).sum(1)
    if pixel_weight is not None:
        ce = ce * pixel_weight
    return ce.mean()


def dida_terms(cfg: DidaConfig, bank: InstanceBank, teacher_emb: torch.Tensor, student_emb: torch.Tensor,
               student_logits: torch.Tensor, target_pixels: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """``{"dida/instance": weight x soft CE}`` at the embeddings' resolution (zero while the bank is empty).

    ``teacher_emb`` target image through the teacher, ``student_emb``/``student_logits`` the mixed image
    through the student (gradient flows through ``student_emb`` only); ``target_pixels`` [B, H, W] weight
    map (1 = target pixel), resized by nearest and used when ``cfg.target_only``.
    """
    if not cfg.enabled:
        return {}
    if bank.n_filled == 0:
        return {"dida/instance": student_emb.sum() * 0}
    size = student_emb.shape[-2:]
    if student_logits.shape[-2:] != size:
        student_logits = F.interpolate(student_logits, size=size, mode="bilinear", align_corners=False)
    if teacher_emb.shape[-2:] != size:
        teacher_emb = F.interpolate(teacher_emb, size=size, mode="bilinear", align_corners=False)
    weight = None
    if cfg.target_only and target_pixels is not None:
        weight = F.interpolate(target_pixels[:, None].float(), size=size, mode="nearest")[:, 0]
    keep = bank.filled
    feats, labels = bank.feats[keep], bank.labels[keep]
    h, w = student_emb.shape[-2:]
    n = h * w
    step = cfg.chunk if cfg.chunk > 0 else n
    # chunks over flattened pixels bound the [B, K, pixels] tensors; the sum over chunks / n = the mean
    t_flat, s_flat = teacher_emb.flatten(2), student_emb.flatten(2)
    l_flat = student_logits.flatten(2)
    w_flat = weight.flatten(1) if weight is not None else None
    total = student_emb.new_zeros((), dtype=torch.float32)
    for i in range(0, n, step):
        sl = slice(i, min(i + step, n))
        with torch.no_grad():
            tgt = calibrated_target(similarities(t_flat[:, :, sl, None], feats), l_flat[:, :, sl, None],
                                    labels, cfg.calibrate)
        part = instance_loss(tgt, similarities(s_flat[:, :, sl, None], feats),
                             None if w_flat is None else w_flat[:, sl, None])
        total = total + part * (sl.stop - sl.start) / n
    return {"dida/instance": cfg.weight * total}


# ---------------------------------------------------------------------- the component in the step
class Dida(Component):
    """DIDA in the step: the instance bank (``dida_bank``) and ``dida/instance`` on the mixed pass.

    The bank is updated in :meth:`finish`, *after* the iteration's instance loss, which therefore sees the
    bank as it was after the previous iteration: that keeps gradient accumulation exact (a departure from
    DIDA's order). Under DDP the bank is updated from every rank's embeddings, then takes rank 0's slots."""

    state_key = "dida_bank"
    embeddings = ("fusion",)

    def __init__(self, cfg: DidaConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.bank = InstanceBank(cfg, device)

    def start(self, it: int) -> None:
        self.it, self.teacher_emb = it, None
        self.bank_in: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_pseudo_labels(self, inputs: Tensors, teacher_out, pseudo: torch.Tensor) -> None:
        self.teacher_emb = teacher_out.embeddings["fusion"]

    def source_terms(self, out, x: Tensors, part: slice) -> Tensors:
        self.bank_in.append((out.embeddings["fusion"].detach(), x["source_label"]))
        return {}

    def mixed_terms(self, out, m: Tensors, part: slice) -> Tensors:
        return dida_terms(self.cfg, self.bank, self.teacher_emb[part], out.embeddings["fusion"],
                          out.logits["fusion"], m["target"])

    def finish(self) -> dict[str, float]:
        if self.bank_in:
            emb, lbl = (gather(torch.cat(t)) for t in zip(*self.bank_in, strict=True))  # DDP: the global batch
            self.bank.update(emb, lbl, self.it)
            broadcast_(self.bank.feats, self.bank.filled)  # DDP: rank 0's random picks
        return {"dida/bank_filled": float(self.bank.n_filled)}

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.bank.load_state_dict(state)


def build(cfg, run) -> Dida | None:
    return Dida(cfg.dida, run.device) if cfg.dida.enabled else None
