"""Baselines the benchmarks compare against, written the straightforward way CMDA's loader works.

Not used by the product: they exist so every speed figure in README is a ratio measured against
them in the same process.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

H, W = 480, 640


def torch_put_voxels(x, y, p, t, rmap_t: torch.Tensor, bins: int) -> torch.Tensor:
    """The formula as CMDA's loader computes it: per-window torch tensors and put_(accumulate=True)."""
    xy = rmap_t[torch.from_numpy(y.astype(np.int64)), torch.from_numpy(x.astype(np.int64))]
    xs, ys = xy[:, 0], xy[:, 1]
    tt = torch.from_numpy(t.astype(np.int64))
    span = float(tt[-1] - tt[0])
    tn = (bins - 1) * ((tt - tt[0]).float() / span) if span > 0 else torch.zeros(len(tt))
    value = 2 * torch.from_numpy(p.astype(np.float32)) - 1
    grid = torch.zeros(bins * H * W)
    x0, y0, t0 = xs.int(), ys.int(), tn.int()
    for xl in (x0, x0 + 1):
        for yl in (y0, y0 + 1):
            for tl in (t0, t0 + 1):
                ok = (xl >= 0) & (xl < W) & (yl >= 0) & (yl < H) & (tl >= 0) & (tl < bins)
                w = value * (1 - (xl - xs).abs()) * (1 - (yl - ys).abs()) * (1 - (tl - tn).abs())
                idx = (tl.long() * H + yl.long()) * W + xl.long()
                grid.put_(idx[ok], w[ok], accumulate=True)
    return grid.view(bins, H, W)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def event_by_event_voxels(x, y, p, t, map_x, map_y, starts, stops, t_first, t_last, grids):  # pragma: no cover
    """cmda's multi-bin kernel before issue 24, kept verbatim as the baseline of the new one: every
    event computes its rectified position and adds its 8 weights straight into the (B, H, W) grid
    (bounds-checked), so consecutive events scatter over 6-18 MB. Same arguments as
    ``pipeline.voxel._accumulate_bands`` minus the tables and scratch; no input validation."""
    bins, height, width = grids.shape[1], grids.shape[2], grids.shape[3]
    scale = np.float32(bins - 1)
    for k in range(starts.shape[0]):
        g = grids[k]
        t0_k = t_first[k]
        span = t_last[k] - t0_k
        denom = np.float32(span)
        for i in range(starts[k], stops[k]):
            sx = np.int64(x[i])
            sy = np.int64(y[i])
            xf = map_x[sy, sx]
            yf = map_y[sy, sx]
            value = np.float32(2.0) * np.float32(p[i]) - np.float32(1.0)
            tn = scale * (np.float32(np.int64(t[i]) - t0_k) / denom) if span > 0 else np.float32(0.0)
            # int() truncates toward zero, like torch's .int(); floor would differ for x in (-1, 0).
            xi = np.int64(xf)
            yi = np.int64(yf)
            ti = np.int64(tn)
            for dt in range(2):
                tl = ti + dt
                if tl < 0 or tl >= bins:
                    continue
                wt = value * (np.float32(1.0) - abs(np.float32(tl) - tn))
                for dy in range(2):
                    yl = yi + dy
                    if yl < 0 or yl >= height:
                        continue
                    wty = wt * (np.float32(1.0) - abs(np.float32(yl) - yf))
                    for dx in range(2):
                        xl = xi + dx
                        if xl < 0 or xl >= width:
                            continue
                        g[tl, yl, xl] += wty * (np.float32(1.0) - abs(np.float32(xl) - xf))
