"""DACS mixing on the training device: ClassMix masks, mixing, colour jitter, blur, event masking.

All functions take and return batched tensors; randomness comes from torch's generator, which the
training loop seeds per iteration (so a resumed run draws the same masks and augmentations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia
import torch

from pipeline.errors import InputError
from train.common import IMAGENET_MEAN, IMAGENET_STD
from train.config import DacsConfig


def classmix_draws(labels: torch.Tensor, per_sample: bool = True) -> list[torch.Tensor]:
    """The classes each sample pastes: ``ceil(n / 2)`` of the n values present anywhere in the batch
    (the ignore value 255 included when present), drawn without replacement per sample (CMDA/DACS)
    or, with ``per_sample=False``, once for the whole batch."""
    classes = torch.unique(labels)
    n = classes.numel()
    k = (n + n % 2) // 2
    shared = classes[torch.randperm(n, device=labels.device)[:k]]
    return [classes[torch.randperm(n, device=labels.device)[:k]] if per_sample else shared for _ in labels]


def class_masks(labels: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """ClassMix masks [B, 1, H, W] (float 0/1) from source labels [B, H, W].

    Each sample's mask marks its own pixels of the classes :func:`classmix_draws` picked for it (so a
    drawn class may be absent from that sample).
    """
    draws = classmix_draws(labels, per_sample)
    return torch.stack([torch.isin(label, chosen) for label, chosen in zip(labels, draws, strict=True)]
                       ).unsqueeze(1).float()


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Paste ``source`` onto ``target`` where ``mask`` is 1 (mask broadcasts over channels)."""
    if source.ndim == mask.ndim - 1:  # labels / weights [B, H, W]
        m = mask[:, 0]
        return torch.where(m.bool(), source, target)
    return mask * source + (1 - mask) * target


def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean) / 255.0


def _renorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * 255.0 - mean) / std


# ---------------------------------------------------------------------- colour jitter
def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5.8 semantics: additive, ``clamp(x + (f - 1), 0, 1)``; ``factor`` [B]."""
    return (x + (factor - 1).view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5.8 semantics: a pure scale, ``clamp(x * f, 0, 1)`` (no mean subtraction)."""
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5.8 semantics: in HSV, ``S * f`` clamped to [0, 1]."""
    h, s, v = kornia.color.rgb_to_hsv(x).unbind(1)
    s = (s * factor.view(-1, 1, 1)).clamp(0, 1)
    return kornia.color.hsv_to_rgb(torch.stack((h, s, v), 1)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5.8 semantics: in HSV (hue in radians), ``H + f * 2 pi`` wrapped to [0, 2 pi)."""
    h, s, v = kornia.color.rgb_to_hsv(x).unbind(1)
    h = torch.remainder(h + factor.view(-1, 1, 1) * 2 * math.pi, 2 * math.pi)
    return kornia.color.hsv_to_rgb(torch.stack((h, s, v), 1)).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class JitterParams:
    """Per-sample factors [B] and operation order [B, 4] (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor


def draw_jitter(n: int, strength: float, device: torch.device | str = "cpu") -> JitterParams:
    """Per-sample factors as kornia 0.5.8's ColorJitter(s, s, s, s) draws them for a batch of one
    (CMDA calls it once per sample): b, c, sat ~ U(1 - s, 1 + s), hue ~ U(-s, s), and a random order."""
    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(lo, hi)

    b, c, sat = u(1 - strength, 1 + strength), u(1 - strength, 1 + strength), u(1 - strength, 1 + strength)
    hue = u(-strength, strength)
    order = torch.stack([torch.randperm(4, device=device) for _ in range(n)]) if n else torch.zeros(0, 4)
    return JitterParams(b, c, sat, hue, order.long())


def cmda_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Colour jitter of RGB images [B, 3, H, W] in [0, 1] with kornia 0.5.8's operations, each
    sample with its own factors and order, every operation clamping to [0, 1]."""
    out = []
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for i in range(x.shape[0]):
        y = x[i:i + 1]
        for op in params.order[i].tolist():
            y = JITTER_OPS[op](y, factors[op][i:i + 1].to(y.dtype))
        out.append(y)
    return torch.cat(out) if out else x


def color_jitter(images: torch.Tensor, p: float, strength: float, impl: str = "cmda",
                 drawn: dict[str, float] | None = None) -> torch.Tensor:
    """With probability ``p`` (one draw for the batch, as CMDA: ``U(0, 1) > 0.2``), jitter
    brightness, contrast, saturation and hue by ``strength`` on the de-normalised image, then
    normalise again.

    ``impl="cmda"``: kornia 0.5.8's operations (CMDA's pinned release), factors and order per
    sample. ``impl="kornia"``: today's ``kornia.augmentation.ColorJitter`` (multiplicative
    brightness, mean-subtracted contrast, grey-blend saturation), which cmda used before.
    """
    if impl not in ("cmda", "kornia"):
        raise InputError(None, f"dacs.jitter_impl must be 'cmda' or 'kornia', not {impl!r}")
    u = torch.rand(())
    if drawn is not None:  # CMDA derives the mixed image's ISR direction from this draw (train.uda.targets)
        drawn["jitter"] = float(u)
    if u >= p:
        return images
    x = _denorm(images).clamp(0, 1)
    if impl == "kornia":
        jitter = kornia.augmentation.ColorJitter(strength, strength, strength, strength, p=1.0)
        return _renorm(jitter(x))
    return _renorm(cmda_jitter(x, draw_jitter(x.shape[0], strength, x.device)))


def gaussian_blur(images: torch.Tensor, p: float, sigma: tuple[float, float]) -> torch.Tensor:
    """With probability ``p``, Gaussian blur with sigma ~ U(sigma) and a kernel ~10% of the image."""
    if torch.rand(()) >= p:
        return images
    s = float(torch.empty(()).uniform_(*sigma))
    h, w = images.shape[-2:]
    k = round(0.1 * max(h, w))
    k += 1 - k % 2  # odd
    return kornia.filters.gaussian_blur2d(images, (k, k), (s, s))


def block_mask(shape: tuple[int, int, int, int], ratio: float, block: int, device: torch.device) -> torch.Tensor:
    """[B, 1, H, W] mask of 0s on a random ``ratio`` of ``block``-sized cells, 1 elsewhere."""
    b, _, h, w = shape
    gh, gw = -(-h // block), -(-w // block)
    keep = (torch.rand((b, 1, gh, gw), device=device) >= ratio).float()
    return keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :h, :w]


def strong_augment(cfg: DacsConfig, image: torch.Tensor, drawn: dict[str, float] | None = None) -> torch.Tensor:
    """DACS's strong augmentation of a normalised image batch: colour jitter, then Gaussian blur
    (``drawn`` receives the jitter's U(0, 1) draw)."""
    image = color_jitter(image, cfg.jitter_p, cfg.jitter, cfg.jitter_impl, drawn)
    return gaussian_blur(image, cfg.blur_p, cfg.blur_sigma)
