"""Masked image consistency (MIC, Hoyer et al. CVPR 2023, Sec. 3) over images and events (``mic.*``).

After the DACS mixed pass the student sees the *target* batch once more: colour-jittered and blurred
as in DACS, then a random block mask hides ``ratio`` of the image (and, by default, exactly the same
blocks of the events); the ISR is recomputed from the masked image. The four outputs are trained
against the teacher's pseudo-labels of the unmasked target with the same confidence weight, times
``mic.lambda``. The pass has its own backward, so peak memory stays that of one pass, and only the
student receives gradient (the teacher never sees a masked input).

Two pure pieces, :func:`masked_inputs` (the pass's inputs) and :func:`mic_terms` (the student's pass and
its terms), and :class:`Mic`, the component that calls them from the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.common.device import autocast
from train.config import LossConfig, MicConfig, TrainConfig
from train.data.isr import ISR_NIGHT, isr_from_normalized, random_directions
from train.uda.components.base import Component, Tensors
from train.uda.losses import backward_scaled, segmentation_terms
from train.uda.mixing import block_mask, strong_augment


@dataclass
class MaskedBatch:
    image: torch.Tensor
    events: torch.Tensor
    isr: torch.Tensor | None  # None for an image-only target (its ISR is ``events``)
    image_mask: torch.Tensor  # [B, 1, H, W], 1 = visible
    events_mask: torch.Tensor | None  # None: events untouched

    def take(self, part: slice) -> MaskedBatch:
        """The micro-batch ``part`` (gradient accumulation)."""
        return MaskedBatch(self.image[part], self.events[part], None if self.isr is None else self.isr[part],
                           self.image_mask[part],
                           None if self.events_mask is None else self.events_mask[part])


def event_mask(image_mask: torch.Tensor, cfg: MicConfig) -> torch.Tensor | None:
    """The events' mask: the image's (``same``), a fresh draw (``independent``) or none (``none``)."""
    if cfg.events == "same":
        return image_mask
    if cfg.events == "independent":
        return block_mask(tuple(image_mask.shape), cfg.ratio, cfg.block, image_mask.device)
    return None


def masked_inputs(image: torch.Tensor, events: torch.Tensor, cfg: MicConfig, directions: list[str],
                  augment) -> MaskedBatch:
    """MIC's inputs from the target batch (normalised image, event grid).

    ``augment`` is the DACS strong augmentation (colour jitter then blur) as a function of the image
    batch, so MIC uses exactly the loop's augmentation settings (``mask_mode='separatetrgaug'``).
    """
    with torch.no_grad():
        aug = augment(image)
        m = block_mask(tuple(aug.shape), cfg.ratio, cfg.block, aug.device).to(aug.dtype)
        masked = aug * m
        em = event_mask(m, cfg)
        masked_events = events * em.to(events.dtype) if em is not None else events
        # Hidden blocks are 0 in normalised space (the mean colour), as in MIC; the ISR sees that image.
        isr = isr_from_normalized(masked, ISR_NIGHT, directions)
    return MaskedBatch(masked, masked_events, isr, m, em)


def mic_terms(student: torch.nn.Module, batch: MaskedBatch, pseudo: torch.Tensor, pseudo_weight: torch.Tensor,
              loss: LossConfig, cfg: MicConfig, amp: bool = False, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``mic.lambda * sum_k w_k CE(output_k)`` against the unmasked target's pseudo-labels and weight,
    backpropagated here (its own backward, so the pass's activations are freed before the next)."""
    with autocast(batch.image.device, amp):
        out = student(image=batch.image, events=batch.events, isr=batch.isr)
    terms = segmentation_terms(out.logits, pseudo, loss, pseudo_weight, prefix="mic/")
    return backward_scaled(terms, cfg.lambda_ * scale)


class Mic(Component):
    """MIC in the step: the masked target batch drawn after the mix, then a pass of its own per micro-batch."""

    def __init__(self, cfg: TrainConfig, target, amp: bool) -> None:
        self.cfg, self.target, self.amp = cfg, target, amp

    def start(self, it: int) -> None:
        self.batch = None

    def extra_inputs(self, inputs: Tensors, pseudo: torch.Tensor, weight: torch.Tensor) -> None:
        """The target batch, augmented as DACS's mixed image and block-masked (``separatetrgaug``)."""
        batch = masked_inputs(inputs["target_image"], inputs["target_events"], self.cfg.mic,
                              random_directions(pseudo.shape[0]), lambda im: strong_augment(self.cfg.dacs, im))
        self.batch, self.pseudo, self.weight = self.target.masked(batch), pseudo, weight

    def extra_pass(self, student: torch.nn.Module, x: Tensors, part: slice, scale: float) -> Tensors:
        if self.batch is None:
            return {}
        return mic_terms(student, self.batch.take(part), self.pseudo[part], self.weight[part], self.cfg.loss,
                         self.cfg.mic, self.amp, scale)


def build(cfg: TrainConfig, run) -> Mic | None:
    return Mic(cfg, run.target, run.amp) if cfg.mic.enabled else None
