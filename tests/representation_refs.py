"""Small NumPy ports of the reference definitions the representation kernels are checked against,
where no installable library has them. Written from the definitions (event coordinates are raw
integer pixels, as the references take them), in plain vectorised NumPy so that each line can be
read against its source:

* RVT ``data/utils/representations.py``: ``StackedHistogram.construct`` and
  ``MixedDensityEventStack.construct`` (float32 time arithmetic as torch does it);
* the representation study's ERGO-12 (uzh-rpg/event_representation_study,
  ``representations/optimized_representation.py``, ``representation_search/
  mixed_density_event_stack.py`` and ``operations.py``), with p fed as -1/+1;
* DSEC's ``VoxelGrid`` (uzh-rpg/DSEC ``scripts/dataset/representations.py``), with the base corner
  by truncation (as torch's ``.int()``) or, for the documented difference, by floor.
"""

from __future__ import annotations

import numpy as np


def rvt_stacked_histogram(x, y, p, t, bins, height, width, cutoff=None, fastmode=True):
    """RVT's stacked histogram, (2*bins, H, W) uint8. ``fastmode`` accumulates in uint8 (wraps)."""
    cutoff = 255 if cutoff is None else min(cutoff, 255)
    rep = np.zeros(2 * bins * height * width, np.uint8 if fastmode else np.int16)
    if len(t) == 0:
        return rep.astype(np.uint8).reshape(2 * bins, height, width)
    t = t.astype(np.int64)
    t_norm = (t - t[0]).astype(np.float32) / np.float32(max(int(t[-1] - t[0]), 1))
    t_idx = np.minimum(np.floor(t_norm * np.float32(bins)), bins - 1).astype(np.int64)
    idx = x.astype(np.int64) + width * y.astype(np.int64) + height * width * t_idx \
        + bins * height * width * p.astype(np.int64)
    np.add.at(rep, idx, np.ones(1, rep.dtype))
    rep = np.clip(rep, 0, cutoff).astype(np.uint8)
    return rep.reshape(2 * bins, height, width)


def rvt_mixed_density_stack(x, y, p, t, bins, height, width, cutoff=None):
    """RVT's mixed-density event stack, (bins, H, W) int8, with its int8 wrap-around."""
    rep = np.zeros(bins * height * width, np.int8)
    if len(t) == 0:
        return rep.reshape(bins, height, width)
    pol = p.astype(np.int64) * 2 - 1
    t = t.astype(np.int64)
    t_norm = (t - t[0]).astype(np.float32) / np.float32(max(int(t[-1] - t[0]), 1))
    t_norm = np.clip(t_norm, np.float32(1e-6), np.float32(1 - 1e-6))
    bin_float = np.float32(bins) - np.log(t_norm) / np.float32(np.log(0.5))
    t_idx = np.floor(np.maximum(bin_float, np.float32(0))).astype(np.int64)
    idx = x.astype(np.int64) + width * y.astype(np.int64) + height * width * t_idx
    np.add.at(rep, idx, pol.astype(np.int8))  # int8 accumulation wraps, as torch's put_ does
    rep = rep.reshape(bins, height, width)
    # cumsum_channel: channel i = sum of channels 0..i (an int64 sum written back into int8)
    cum = np.cumsum(rep.astype(np.int64), axis=0).astype(np.int8)
    if cutoff is not None:
        cum = np.clip(cum, -cutoff, cutoff).astype(np.int8)
    return cum


def _scatter(values, index, size, reduce):
    out = np.zeros(size, np.float64)
    if reduce == "max":
        np.maximum.at(out, index, values)  # values >= 0 here; empty cells stay 0 like torch_scatter
        return out
    np.add.at(out, index, values)
    if reduce == "mean":
        count = np.zeros(size, np.float64)
        np.add.at(count, index, 1.0)
        out /= np.maximum(count, 1.0)
    return out


def _ergo_channel(x, y, p, ts, func, reduce, height, width):
    keep = {"polarity": slice(None), "count": slice(None), "timestamp": slice(None),
            "count_pos": p == 1, "timestamp_pos": p == 1, "count_neg": p == -1, "timestamp_neg": p == -1}[func]
    x, y, p, ts = x[keep], y[keep], p[keep], ts[keep]
    src = {"polarity": p.astype(np.float64), "timestamp": ts}.get(func.split("_")[0], np.ones(len(x)))
    index = x.astype(np.int64) + y.astype(np.int64) * width
    if reduce == "variance":
        res = _scatter(src**2, index, height * width, "mean") - _scatter(src, index, height * width, "mean") ** 2
    else:
        res = _scatter(src, index, height * width, reduce)
    return res.reshape(height, width)


ERGO12 = [(0, "polarity", "variance"), (3, "timestamp_neg", "variance"), (2, "count_neg", "mean"),
          (6, "polarity", "sum"), (5, "count_pos", "mean"), (6, "count", "sum"), (2, "timestamp_pos", "mean"),
          (5, "count_neg", "mean"), (1, "timestamp_neg", "max"), (0, "timestamp_pos", "max"),
          (4, "timestamp", "max"), (1, "count", "mean")]


def ergo12(x, y, p01, t, height, width):
    """ERGO-12 as the study builds it, (H, W, 12) float64, polarity fed as -1/+1."""
    p = p01.astype(np.int32) * 2 - 1
    t = t.astype(np.int64) - t.min()
    ts = t / (t.max() - t.min())
    n = len(x)
    third = n // 3
    windows = [np.arange(n)] + [np.arange(i * third, (i + 1) * third) for i in range(3)]
    idx, cur = np.arange(n), n
    for _ in range(3):  # each window drops the first (previous count // 2) of the one before
        cur //= 2
        idx = idx[cur:]
        windows.append(idx)
    rep = np.zeros((height, width, 12))
    for c, (w, func, reduce) in enumerate(ERGO12):
        k = windows[w]
        rep[:, :, c] = _ergo_channel(x[k], y[k], p[k], ts[k], func, reduce, height, width)
    return rep


def dsec_voxel_grid(xf, yf, p, t, bins, height, width, normalize, corner=np.trunc):
    """DSEC's VoxelGrid on float (rectified) coordinates, float32 as torch computes it."""
    grid = np.zeros(bins * height * width, np.float32)
    t = (t.astype(np.int64) - int(t[0])).astype(np.float32)
    t = t / t[-1]
    t_norm = np.float32(bins - 1) * t
    x0, y0, t0 = (corner(v).astype(np.int64) for v in (xf, yf, t_norm))
    value = (2 * p.astype(np.float32) - 1).astype(np.float32)
    for xl in (x0, x0 + 1):
        for yl in (y0, y0 + 1):
            for tl in (t0, t0 + 1):
                ok = (xl < width) & (xl >= 0) & (yl < height) & (yl >= 0) & (tl >= 0) & (tl < bins)
                w = value * (1 - np.abs(xl - xf)) * (1 - np.abs(yl - yf)) * (1 - np.abs(tl - t_norm))
                np.add.at(grid, (height * width * tl + width * yl + xl)[ok], w[ok].astype(np.float32))
    grid = grid.reshape(bins, height, width)
    if normalize:
        grid = dsec_normalize(grid)
    return grid


def dsec_normalize(grid):
    """DSEC's normalisation: over the non-zero cells, (v - mean) / unbiased std (or v - mean)."""
    grid = grid.copy()
    mask = grid != 0
    if mask.any():
        vals = grid[mask].astype(np.float64)
        mean = np.float32(vals.mean())
        std = np.float32(vals.std(ddof=1)) if vals.size > 1 else np.float32(np.nan)
        grid[mask] = (grid[mask] - mean) / std if std > 0 else grid[mask] - mean
    return grid
