"""Image-change maps: IC1 (two consecutive Cityscapes frames) and ISR (one image against its own shift).

Both are CMDA's stand-ins for events on RGB data: a log-intensity difference that is zeroed below a
threshold, clipped, and split into a positive part min-max scaled to [0, 1] and a negative part
min-max scaled to [-1, 0] (the Image Motion-Extractor of CMDA, Xia et al., ICCV 2023). This module holds

* the plain NumPy *reference* of both formulas (:func:`ic_reference`, :func:`isr_reference`,
  :func:`ic1_reference`): literal, step by step, one image at a time, the yardstick for the tests and
  for the batched torch ISR in ``train/data/isr.py``;
* the fast IC1 path the pipeline uses (:func:`ic1`, :func:`ic1_to_uint8`): integer grey conversion
  and a 256-entry log table instead of per-pixel ``log``, bit-identical to the reference.

All arithmetic is float32 like CMDA's (thresholds and clips are rounded to float32 before comparing,
which is what torch does when CMDA compares a float32 tensor with a float64 scalar).

The empty-part edge case: CMDA min-max scales the negative part with
``(a - min) / (max - min + 1e-8) - 1``; when no pixel is negative that is ``0 / 1e-8 - 1 = -1``
everywhere, so a frame pair with no darkening (or a flat image) comes out as "maximal darkening
everywhere". By default we leave a part with no non-zero entry at 0; ``cmda_compat=True`` reproduces
CMDA's -1. (The positive part has no such problem: an all-zero part maps to 0 either way.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# IC1 (annotated frame vs previous frame), CMDA's create_cityscapes_image_change.py.
IC1_LOG_ADD = 50.0
IC1_THRESHOLD = 0.1
IC1_CLIP = 0.8

#: Shift directions: one horizontal ('left'/'right') and one vertical ('up'/'down') part, or 'all'
#: (the average over the four single shifts).
DIRECTIONS = ("leftup", "leftdown", "rightup", "rightdown")


@dataclass(frozen=True)
class IsrParams:
    """ISR settings: grey values map to ``[v0, v1]`` before the log; threshold and clip are given as
    fractions of the log range ``ln(v1/v0)``; ``shift`` is the self-shift in pixels."""

    val_range: tuple[float, float]
    threshold: float
    clip: float
    shift: int

    @property
    def log_span(self) -> float:
        v0, v1 = self.val_range
        return float(np.log(v1) - np.log(v0))

    @property
    def threshold_log(self) -> np.float32:
        """Threshold on the log difference, rounded to float32 (what CMDA's comparison uses)."""
        return np.float32(self.log_span * self.threshold)

    @property
    def clip_log(self) -> np.float32:
        return np.float32(self.log_span * self.clip)


#: Cityscapes day images (CMDA source side).
ISR_DAY = IsrParams(val_range=(1.0, 10.0), threshold=0.03, clip=0.2, shift=3)
#: DSEC night images and mixed (ClassMix) images (CMDA ``isr_parms``).
ISR_NIGHT = IsrParams(val_range=(0.01, 1.01), threshold=0.005, clip=0.1, shift=1)


# ----------------------------------------------------------------------------- shared helpers
def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 grey [H, W], bit-equal to PIL's ``convert('L')`` (which CMDA uses).

    PIL's fixed-point ITU-R 601 luma, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``; OpenCV's
    RGB2GRAY rounds differently and disagrees on ~0.1% of pixels.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.int32)
    return ((c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def shift_grey(grey: np.ndarray, direction: str, s: int) -> np.ndarray:
    """Shift a [..., H, W] array by ``s`` pixels the way CMDA does (edges keep the original pixels).

    'right': ``[g[:, :s], g[:, :W-s]]``; 'left': ``[g[:, s:], g[:, W-s:]]``; 'down'/'up' the same on rows.
    """
    h, w = grey.shape[-2:]
    if direction == "right":
        return np.concatenate((grey[..., :, :s], grey[..., :, : w - s]), axis=-1)
    if direction == "left":
        return np.concatenate((grey[..., :, s:], grey[..., :, w - s :]), axis=-1)
    if direction == "down":
        return np.concatenate((grey[..., :s, :], grey[..., : h - s, :]), axis=-2)
    if direction == "up":
        return np.concatenate((grey[..., s:, :], grey[..., h - s :, :]), axis=-2)
    raise ValueError(f"unknown shift {direction!r} (left, right, up, down)")


def split_direction(direction: str) -> list[str]:
    """'rightdown' -> ['right', 'down']; 'all' -> the four single shifts."""
    if direction == "all":
        return ["up", "left", "down", "right"]
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r} (one of {', '.join(DIRECTIONS)} or 'all')")
    horizontal = "left" if direction.startswith("left") else "right"
    vertical = "up" if direction.endswith("up") else "down"
    return [horizontal, vertical]


# ----------------------------------------------------------------------------- reference (literal)
def _minmax_reference(a: np.ndarray, lo: float, hi: float, cmda_compat: bool) -> np.ndarray:
    """CMDA's ``tensor_normalize_to_range`` on one image, with our empty-part rule."""
    if not cmda_compat and not np.any(a):
        return np.zeros_like(a)
    amin, amax = a.min(), a.max()
    return (a - amin) / (amax - amin + np.float32(1e-8)) * np.float32(hi - lo) + np.float32(lo)


def ic_reference(
    log_front: np.ndarray, log_now: np.ndarray, threshold: float, clip: float, cmda_compat: bool = False
) -> np.ndarray:
    """The change map of one image pair from their float32 log images: ``d = log_now - log_front``,
    zero where ``|d| <= threshold``, positive part clipped to [0, clip] and scaled to [0, 1], negative
    part clipped to [-clip, 0] and scaled to [-1, 0], summed. Written as literally as CMDA's code."""
    thr, clp = np.float32(threshold), np.float32(clip)
    d = (log_now - log_front).astype(np.float32)
    d[np.abs(d) <= thr] = 0
    neg = d.copy()
    pos = d.copy()
    pos[pos < 0] = 0
    pos = np.clip(pos, np.float32(0), clp)
    pos = _minmax_reference(pos, 0.0, 1.0, cmda_compat)
    neg[neg > 0] = 0
    neg = np.clip(neg, -clp, np.float32(0))
    neg = _minmax_reference(neg, -1.0, 0.0, cmda_compat)
    return (pos + neg).astype(np.float32)


def _pil_grey(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def isr_reference(rgb: np.ndarray, params: IsrParams, direction: str = "rightdown", cmda_compat: bool = False):
    """ISR of one uint8 RGB image [H, W, 3] -> float32 [H, W] in [-1, 1] (slow, obviously correct).

    Grey via PIL, ``l = log(g/255 * (v1 - v0) + v0)`` per pixel, one change map per single shift
    (shifted image is "now", the original "front"), averaged.
    """
    v0, v1 = params.val_range
    grey = _pil_grey(rgb)

    def to_log(g: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(g, dtype=np.float32) / 255 * (v1 - v0) + v0)

    parts = split_direction(direction)
    out = np.zeros(grey.shape, np.float32)
    for part in parts:
        shifted = shift_grey(grey, part, params.shift)
        ic = ic_reference(to_log(grey), to_log(shifted), params.threshold_log, params.clip_log, cmda_compat)
        out = out + ic / np.float32(len(parts))
    return out


def ic1_reference(now_rgb: np.ndarray, prev_rgb: np.ndarray, cmda_compat: bool = False) -> np.ndarray:
    """IC1 of one frame pair (uint8 RGB) -> float32 [H, W] in [-1, 1], literal: ``log(I + 50)`` per pixel."""

    def to_log(g: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(g, dtype=np.float32) + np.float32(IC1_LOG_ADD))

    return ic_reference(to_log(_pil_grey(prev_rgb)), to_log(_pil_grey(now_rgb)), IC1_THRESHOLD, IC1_CLIP, cmda_compat)


# ----------------------------------------------------------------------------- fast IC1 (pipeline)
def isr_log_table(params: IsrParams) -> np.ndarray:
    """float32 [256]: the ISR log of every grey value, computed exactly as the reference does per pixel."""
    v0, v1 = params.val_range
    return np.log(np.arange(256, dtype=np.float32) / 255 * (v1 - v0) + v0)


def ic1_log_table() -> np.ndarray:
    """float32 [256]: ``log(g + 50)`` for every grey value."""
    return np.log(np.arange(256, dtype=np.float32) + np.float32(IC1_LOG_ADD))


def split_minmax(d: np.ndarray, threshold: float, clip: float, cmda_compat: bool = False) -> np.ndarray:
    """Zero / clip / split min-max / sum on one float32 difference image [H, W] (vectorised)."""
    thr, clp = np.float32(threshold), np.float32(clip)
    d = np.where(np.abs(d) <= thr, np.float32(0), d).astype(np.float32)
    pos = np.clip(d, np.float32(0), clp)
    neg = np.clip(d, -clp, np.float32(0))
    eps = np.float32(1e-8)
    pmin, pmax = pos.min(), pos.max()
    pos = (pos - pmin) / (pmax - pmin + eps)
    if cmda_compat or np.any(neg):
        nmin, nmax = neg.min(), neg.max()
        neg = (neg - nmin) / (nmax - nmin + eps) - np.float32(1)
    return (pos + neg).astype(np.float32)


def ic1(now_rgb: np.ndarray, prev_rgb: np.ndarray, cmda_compat: bool = False) -> np.ndarray:
    """IC1 float map [H, W] in [-1, 1] from the annotated frame and the previous one (uint8 RGB)."""
    if now_rgb.shape != prev_rgb.shape:
        raise ValueError(f"frame sizes differ: {now_rgb.shape} vs {prev_rgb.shape}")
    table = ic1_log_table()
    d = table[rgb_to_grey(now_rgb)] - table[rgb_to_grey(prev_rgb)]
    return split_minmax(d, IC1_THRESHOLD, IC1_CLIP, cmda_compat)


def ic1_to_uint8(d: np.ndarray) -> np.ndarray:
    """Storage form of IC1: ``round((d + 1) / 2 * 255)`` (NumPy rounds halves to even, as CMDA's ``np.around``)."""
    return np.around((d.astype(np.float32) + np.float32(1)) / np.float32(2) * np.float32(255)).astype(np.uint8)


