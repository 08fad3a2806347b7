"""DACS mixing on the training device: ClassMix masks, mixing, colour jitter, blur, event masking.

All functions take and return batched tensors; randomness comes from torch's generator, which the
training loop seeds per iteration (so a resumed run draws the same masks and augmentations).
"""

from __future__ import annotations

import kornia
import torch

from train.data import IMAGENET_MEAN, IMAGENET_STD


def class_masks(labels: torch.Tensor) -> torch.Tensor:
    """ClassMix masks [B, 1, H, W] (float 0/1): half of the classes present in the whole batch.

    As in CMDA, the classes are picked once over the batch (``torch.unique`` of all labels, the
    ignore value included when present) and each sample's mask marks its pixels of those classes.
    """
    classes = torch.unique(labels)
    n = classes.numel()
    chosen = classes[torch.randperm(n, device=labels.device)[: (n + n % 2) // 2]]
    return torch.isin(labels, chosen).unsqueeze(1).float()


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


def color_jitter(images: torch.Tensor, p: float, strength: float) -> torch.Tensor:
    """With probability ``p`` (one draw for the batch, as DACS), jitter brightness, contrast,
    saturation and hue by ``strength`` on the de-normalised image, then normalise again."""
    if torch.rand(()) >= p:
        return images
    jitter = kornia.augmentation.ColorJitter(strength, strength, strength, strength, p=1.0)
    return _renorm(jitter(_denorm(images).clamp(0, 1)))


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
