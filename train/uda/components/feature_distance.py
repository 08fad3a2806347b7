"""ImageNet feature distance (DAFormer, Hoyer et al. CVPR 2022, Sec. 3.3; ``dacs.fd_lambda > 0``).

The student's deepest image features on thing-class cells of the source crop are pulled towards those of
a frozen copy of the ImageNet encoder, so the classes ImageNet knows well are not forgotten. CMDA's DSEC
config leaves it off (``imnet_feature_dist_lambda=0``); its Dark Zurich config keeps DAFormer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.common import IGNORE, NUM_CLASSES
from train.common.device import autocast
from train.config import DacsConfig
from train.uda.components.base import Component, Tensors


def feature_distance(feat: torch.Tensor, feat_imnet: torch.Tensor, label: torch.Tensor, classes: tuple[int, ...],
                     min_ratio: float, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Mean L2 distance between the two feature maps over the cells whose dominant class (share >=
    ``min_ratio``, DAFormer's ``imnet_feature_dist_scale_min_ratio``) is one of ``classes``."""
    scale = label.shape[-1] // feat.shape[-1]
    onehot = F.one_hot(torch.where(label == IGNORE, num_classes, label), num_classes + 1).permute(0, 3, 1, 2).float()
    ratio = F.avg_pool2d(onehot, scale)
    share, cls = ratio.max(1)
    cls = torch.where((share >= min_ratio) & (cls < num_classes), cls, torch.full_like(cls, IGNORE))
    mask = torch.isin(cls, torch.tensor(classes, device=label.device))
    if not mask.any():
        return feat.sum() * 0
    dist = torch.linalg.vector_norm((feat - feat_imnet).float(), dim=1)
    return dist[mask].mean()


class FeatureDistance(Component):
    """``src/fd``: the source pass's term against the frozen ImageNet encoder ``imnet``."""

    def __init__(self, cfg: DacsConfig, imnet: torch.nn.Module, amp: bool) -> None:
        self.cfg, self.imnet, self.amp = cfg, imnet, amp

    def source_terms(self, out, x: Tensors, part: slice) -> Tensors:
        with torch.no_grad(), autocast(x["source_image"].device, self.amp):
            feat_imnet = self.imnet(x["source_image"])[-1]
        c = self.cfg
        return {"src/fd": c.fd_lambda * feature_distance(out.features["image"][-1], feat_imnet, x["source_label"],
                                                         c.fd_classes, c.fd_scale_min_ratio)}


def build(cfg, run) -> FeatureDistance | None:
    """On when ``dacs.fd_lambda > 0`` (the engine then keeps a frozen ImageNet copy, ``run.imnet``)."""
    return FeatureDistance(cfg.dacs, run.imnet, run.amp) if cfg.dacs.fd_lambda > 0 else None
