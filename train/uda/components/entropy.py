"""Entropy minimisation on the student's target prediction (ADVENT, Vu et al. CVPR 2019, Eq. 2 / 3).

The worked example of ``docs/adding-a-component.md``: one module, one settings section (``entropy.*``)
and one line in :data:`train.uda.method.COMPONENTS`; neither the step nor the engine changes. Off by
default (CMDA does not use it).

On the mixed pass, the student's fusion output is scored by its normalised Shannon entropy
``-sum_c p_c log p_c / log C`` per pixel, averaged over the mixed sample's *target* pixels (those ClassMix
kept from the night image, the ``target`` map the step provides), times ``entropy.weight``. Low entropy
means a confident prediction, so the term pushes the student towards confident night predictions,
what ADVENT's direct entropy loss does on the whole target image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.config import EntropyConfig
from train.uda.components.base import Component, Tensors


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] logits -> [B, H, W] entropy of the softmax, divided by log C (so it lies in [0, 1])."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


def entropy_term(logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy over the pixels where ``pixels`` [B, H, W] is 1 (at the logits' size)."""
    weight = F.interpolate(pixels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    return (normalised_entropy(logits) * weight).sum() / weight.sum().clamp(min=1.0)


class EntropyMinimisation(Component):
    """``ent/target``: ``entropy.weight`` x the mixed fusion output's entropy on its target pixels."""

    def __init__(self, cfg: EntropyConfig) -> None:
        self.cfg = cfg

    def mixed_terms(self, out, m: Tensors, part: slice) -> Tensors:
        return {"ent/target": self.cfg.weight * entropy_term(out.logits["fusion"], m["target"])}


def build(cfg, run) -> EntropyMinimisation | None:
    return EntropyMinimisation(cfg.entropy) if cfg.entropy.enabled else None
