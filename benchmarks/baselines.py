"""Baselines the benchmarks compare against, written the straightforward way CMDA's loader works.

Not used by the product: they exist so every speed figure in README is a ratio measured against
them in the same process.
"""

from __future__ import annotations

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
