"""PIL's resampling as CMDA's Cityscapes loader applies it, for the pipeline and the trainer alike.

CMDA shrinks Cityscapes 2048x1024 -> 1024x512 with ``PIL.Image.resize`` (bilinear for the image and
the IC1 input, nearest for the label). ``cmda cityscapes`` writes those 1024x512 copies once and the
training loader falls back to the same functions for trees without them, so both paths give the same
bytes by construction (tests/test_cityscapes.py, tests/test_fidelity.py).
"""

from __future__ import annotations

import numpy as np
import torch


def resize_pil_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HW / HWC image -> ``size`` = (w, h) as ``PIL.Image.resize(size, BILINEAR)`` computes it.

    PIL's bilinear filter widens with the scale when shrinking (antialiased: at 2x the taps are
    [1, 3, 3, 1] / 8), unlike cv2's INTER_LINEAR, which samples 2 of every 4 pixels. torch's uint8
    ``interpolate(antialias=True)`` implements PIL's filter (equal at 2x, within 1 grey level at other
    scales; tested against Pillow) and is ~2x faster than Pillow on one thread.
    """
    # a read-only array (np.asarray of a PIL image) would make torch warn on every run: copy it then
    t = torch.from_numpy(np.require(a, requirements=["C", "W"]))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    return out[0].numpy() if a.ndim == 2 else np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # Pillow walks the source coordinate from a/2 in steps of a = n_in/n_out, adding in doubles, and
    # truncates: an exact multiple can land just below the integer (at scale 3.2, 24 -> 23).
    step = n_in / n_out
    pos = np.cumsum(np.concatenate([[step * 0.5], np.full(n_out - 1, step)]))
    return np.minimum(pos.astype(np.int64), n_in - 1)


def resize_pil_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HW label map -> ``size`` = (w, h) as ``PIL.Image.resize(size, NEAREST)``: output pixel x takes
    input ``~ floor((x + 0.5) * W / w)`` (the odd pixels at 2x; cv2's INTER_NEAREST takes the even ones)."""
    ys = _pil_nearest_index(a.shape[0], size[1])
    xs = _pil_nearest_index(a.shape[1], size[0])
    return np.ascontiguousarray(a[ys[:, None], xs[None, :]])
