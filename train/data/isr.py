"""Image Content Extractor input ("ISR", self-residual of a still image) as a batched torch function.

CMDA computes the ISR of every mixed training image in NumPy on the CPU (denormalise -> uint8 ->
PIL grey -> log -> shifted difference) and copies it back to the GPU each iteration. Here the same
formula runs on the batch where it already lives: integer grey conversion (PIL's exact fixed-point
luma), a 256-entry log table (grey values are integers, so ``log`` is a lookup and bit-identical to
the per-pixel NumPy reference in ``pipeline/image_change.py``), shifts by concatenation, per-image
min-max. Results match the reference to float32 rounding.

Input convention: RGB batches ``[B, 3, H, W]`` with values on the 0..255 scale, as a uint8 tensor or
a float tensor; floats are clamped to [0, 255] and truncated toward zero, exactly like CMDA's
``np.uint8(clamp(x, 0, 1) * 255)``. For network-normalised batches use :func:`denormalize_to_uint8`
(or :func:`isr_from_normalized`), which undoes the ImageNet normalisation the way CMDA's ``denorm`` does.

Shift direction: CMDA shifts once horizontally and once vertically and averages the two maps; the
direction pair is chosen by parity rules (:func:`cmda_direction`): from the crop offset and flip on the
source side, from the crop offset on the target side, and from the colour-jitter draw for mixed images.
Here ``direction`` is an argument (one string for the batch, or one per sample); ``'all'`` averages the
four single shifts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pipeline.image_change import DIRECTIONS, ISR_DAY, ISR_NIGHT, IsrParams, isr_log_table, split_direction
from train.common import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DIRECTIONS",
    "ISR_DAY",
    "ISR_NIGHT",
    "IsrParams",
    "cmda_direction",
    "denormalize_to_uint8",
    "image_content",
    "isr_from_normalized",
    "random_directions",
]



def cmda_direction(a: int, b: int) -> str:
    """CMDA's parity rule ``[['leftdown', 'leftup'], ['rightdown', 'rightup']][a % 2][b % 2]``.

    CMDA calls it with (crop x, crop y) for target images, (crop x, flip) for source images and
    (int(cj * 10), int(cj * 100)) with cj the colour-jitter draw for mixed images.
    """
    return (("leftdown", "leftup"), ("rightdown", "rightup"))[int(a) % 2][int(b) % 2]


def random_directions(n: int) -> list[str]:
    """``n`` direction pairs drawn uniformly from torch's RNG (the trainer's per-sample ISR shifts;
    CMDA derives them from crop/jitter parities instead, see :func:`cmda_direction`)."""
    return [DIRECTIONS[int(i)] for i in torch.randint(len(DIRECTIONS), (n,))]


def denormalize_to_uint8(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Network-normalised [B, 3, H, W] -> uint8 0..255, as CMDA: ``(x * std + mean) / 255``, clamp to [0, 1],
    ``* 255``, truncate."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x * s + m) / 255).clamp(0, 1).mul(255).to(torch.uint8)


# Module-level cache, safe to keep: at most 16 small read-only tables (one per ISR setting and
# device), never written after creation, identical whichever caller or thread builds them.
@functools.lru_cache(maxsize=16)
def _log_table(params: IsrParams, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(isr_log_table(params)).to(device)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] 0..255 -> int64 grey [B, H, W] with PIL's fixed-point luma."""
    # floats: clamp, then truncation toward zero like np.uint8
    c = images.to(torch.int32) if images.dtype == torch.uint8 else images.clamp(0, 255).to(torch.int32)
    g = (c[:, 0] * 19595 + c[:, 1] * 38470 + c[:, 2] * 7471 + 0x8000) >> 16
    return g.long()


def _shift(x: torch.Tensor, direction: str, s: int) -> torch.Tensor:
    """CMDA's shift by concatenation on [B, H, W] (see ``pipeline.image_change.shift_grey``)."""
    h, w = x.shape[-2:]
    if direction == "right":
        return torch.cat((x[..., :, :s], x[..., :, : w - s]), dim=-1)
    if direction == "left":
        return torch.cat((x[..., :, s:], x[..., :, w - s :]), dim=-1)
    if direction == "down":
        return torch.cat((x[..., :s, :], x[..., : h - s, :]), dim=-2)
    if direction == "up":
        return torch.cat((x[..., s:, :], x[..., h - s :, :]), dim=-2)
    raise ValueError(f"unknown shift {direction!r}")


def _split_minmax(d: torch.Tensor, thr: float, clip: float, cmda_compat: bool) -> torch.Tensor:
    """Zero / clip / per-image split min-max / sum on [B, H, W] float32."""
    d = torch.where(d.abs() <= thr, torch.zeros((), dtype=d.dtype, device=d.device), d)
    pos = d.clamp(0, clip)
    neg = d.clamp(-clip, 0)
    pmin = pos.amin(dim=(1, 2), keepdim=True)
    pmax = pos.amax(dim=(1, 2), keepdim=True)
    pos = (pos - pmin) / (pmax - pmin + 1e-8)
    nmin = neg.amin(dim=(1, 2), keepdim=True)
    nmax = neg.amax(dim=(1, 2), keepdim=True)
    scaled = (neg - nmin) / (nmax - nmin + 1e-8) - 1
    if not cmda_compat:  # a part with no negative pixel stays 0 instead of CMDA's -1 everywhere
        scaled = torch.where(nmin < 0, scaled, torch.zeros((), dtype=d.dtype, device=d.device))
    return pos + scaled


def _isr_one_direction(log_img: torch.Tensor, params: IsrParams, direction: str, cmda_compat: bool) -> torch.Tensor:
    parts = split_direction(direction)
    thr, clip = float(params.threshold_log), float(params.clip_log)
    out = torch.zeros_like(log_img)
    for part in parts:
        d = _shift(log_img, part, params.shift) - log_img  # shifted image is "now", original "front"
        out = out + _split_minmax(d, thr, clip, cmda_compat) / len(parts)
    return out


def image_content(
    images: torch.Tensor,
    params: IsrParams = ISR_DAY,
    direction: str | Sequence[str] = "rightdown",
    *,
    cmda_compat: bool = False,
) -> torch.Tensor:
    """ISR of an RGB batch [B, 3, H, W] (0..255 scale, uint8 or float) -> float32 [B, 3, H, W] in [-1, 1].

    ``params``: :data:`ISR_DAY` for Cityscapes day images, :data:`ISR_NIGHT` for DSEC night and mixed
    images. ``direction``: 'leftup', 'leftdown', 'rightup', 'rightdown' or 'all', for the whole batch
    or one per sample. ``cmda_compat``: reproduce CMDA's all -1 negative part when an image has no
    negative difference (see ``pipeline/image_change.py``). Runs on the batch's device; no gradient.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] RGB, got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if min(h, w) <= params.shift:
        raise ValueError(f"image {h}x{w} too small for a {params.shift}-pixel shift")
    directions = [direction] * b if isinstance(direction, str) else list(direction)
    if len(directions) != b:
        raise ValueError(f"{len(directions)} directions for a batch of {b}")
    with torch.no_grad():
        log_img = _log_table(params, images.device)[_grey(images)]
        out = torch.empty((b, h, w), dtype=torch.float32, device=images.device)
        for dname in dict.fromkeys(directions):
            idx = [i for i, di in enumerate(directions) if di == dname]
            sel = torch.tensor(idx, device=images.device)
            out[sel] = _isr_one_direction(log_img[sel], params, dname, cmda_compat)
    return out.unsqueeze(1).expand(b, 3, h, w).contiguous()


def isr_from_normalized(
    x: torch.Tensor,
    params: IsrParams = ISR_NIGHT,
    direction: str | Sequence[str] = "rightdown",
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cmda_compat: bool = False,
) -> torch.Tensor:
    """ISR of a network-normalised batch (e.g. the ClassMix-mixed, jittered image), as CMDA recomputes it."""
    return image_content(denormalize_to_uint8(x, mean, std), params, direction, cmda_compat=cmda_compat)
