"""Random block masking of the mixed pass's event input (``loss.mask_events > 0``; the ``masked_event`` variant).

The L2-loss study announced a masked-event variant without publishing it; cmda's design hides
``loss.mask_events`` of the mixed sample's event grid in ``loss.mask_block`` px blocks (after the ClassMix
and any bank paste), so the student cannot lean on events alone where the image is informative.
"""

from __future__ import annotations

from train.config import LossConfig
from train.uda.components.base import Component, Tensors
from train.uda.mixing import block_mask


class MaskedEvents(Component):
    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def after_mix(self, mixed: Tensors) -> Tensors:
        events = mixed["events"]
        mixed["events"] = events * block_mask(events.shape, self.cfg.mask_events, self.cfg.mask_block, events.device)
        return mixed


def build(cfg, run) -> MaskedEvents | None:
    return MaskedEvents(cfg.loss) if cfg.loss.mask_events > 0 else None
