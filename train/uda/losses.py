"""Loss terms: the four-output segmentation loss and the L2 feature-loss variants as named terms.

Every function returns a dict ``{term name: scalar tensor}`` so the loop can log each term, check
each for NaN/inf by name, and sum them. Which terms exist is decided by the lambdas in
:class:`train.config.LossConfig` (a zero lambda adds no term and no graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.common import IGNORE
from train.config import LossConfig

SEG_OUTPUTS = ("fusion", "image", "isr", "events")


def weighted_ce(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise cross-entropy (ignore 255) at the label's size, optionally weighted per pixel.

    Averaged over ALL pixels, ignored ones included as zeros: mmseg's reduction, which DAFormer's
    pseudo-label weights are calibrated against.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), label, ignore_index=IGNORE, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def segmentation_terms(logits: dict[str, torch.Tensor], label: torch.Tensor, cfg: LossConfig,
                       weight: torch.Tensor | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """``w_k * CE(output_k)`` for every output present, with CMDA's weights (XiaRho/CMDA@9d25129 configs)."""
    terms = {}
    for name in SEG_OUTPUTS:
        w = getattr(cfg, name)
        if name in logits and w:
            terms[f"{prefix}{name}"] = w * weighted_ce(logits[name], label, weight)
    return terms


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def source_feature_terms(features: dict[str, list[torch.Tensor]], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """L2 terms computed inside the source pass (gradient to both sides)."""
    terms = {}
    if cfg.rgb_event_src:
        terms["l2/rgb_event_src"] = cfg.rgb_event_src * _mse(features["image"][-1], features["events"][-1])
    return terms


def target_feature_terms(mixed: dict[str, list[torch.Tensor]], source: dict[str, torch.Tensor],
                         cfg: LossConfig) -> dict[str, torch.Tensor]:
    """L2 terms between the mixed ("target") pass and DETACHED deepest source features.

    ``source`` maps "image", "events", "fusion" to deepest-stage source features, already detached
    by the caller (gradient flows only into the target side, as in the study).
    """
    terms = {}
    if cfg.fusion_st:
        terms["l2/fusion_st"] = cfg.fusion_st * _mse(mixed["fusion"][-1], source["fusion"])
    if cfg.rgb_st:
        terms["l2/rgb_st"] = cfg.rgb_st * _mse(mixed["image"][-1], source["image"])
    if cfg.event_s_rgb_t:
        terms["l2/event_s_rgb_t"] = cfg.event_s_rgb_t * _mse(mixed["image"][-1], source["events"])
    if cfg.event_st:
        terms["l2/event_st"] = cfg.event_st * _mse(mixed["events"][-1], source["events"])
    return terms


def needed_source_features(cfg: LossConfig) -> tuple[str, ...]:
    """Which deepest source features the target-side terms need (kept, detached, across passes)."""
    need = []
    if cfg.fusion_st:
        need.append("fusion")
    if cfg.rgb_st:
        need.append("image")
    if cfg.event_s_rgb_t or cfg.event_st:
        need.append("events")
    return tuple(need)


def pseudo_labels(fusion_logits: torch.Tensor, size: tuple[int, int], threshold: float,
                  ignore_top: int = 0, ignore_bottom: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher pseudo-labels and their weight map: argmax, and the share of confident pixels.

    DACS weighs every target pixel by one scalar: the fraction of pixels in the batch whose max
    softmax probability reaches ``threshold``. DAFormer then zeroes ``ignore_top`` rows at the top
    and ``ignore_bottom`` at the bottom of the weight map (after the share is computed).
    """
    logits = F.interpolate(fusion_logits.float(), size=size, mode="bilinear", align_corners=False)
    prob, label = torch.softmax(logits, dim=1).max(dim=1)
    share = (prob >= threshold).float().mean()
    return label, ignore_rows(share * torch.ones_like(prob), ignore_top, ignore_bottom)


def ignore_rows(weight: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """``weight`` [B, H, W] with its first ``top`` and last ``bottom`` rows set to 0 (a new tensor)."""
    if top < 0 or bottom < 0:
        raise ValueError(f"rows to ignore must be >= 0, got top {top}, bottom {bottom}")
    weight = weight.clone()
    if top:
        weight[:, :top] = 0
    if bottom:
        weight[:, weight.shape[1] - min(bottom, weight.shape[1]):] = 0
    return weight


def backward_scaled(terms: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Scale every term by ``scale`` (1/accum, times a component's weight), backpropagate their sum and
    return the scaled terms: the one place a pass of the step calls ``backward``."""
    terms = {k: v * scale for k, v in terms.items()}
    sum(terms.values()).backward()
    return terms
