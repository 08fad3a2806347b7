"""Event camera simulation from rendered log-intensity frames (ESIM-style), plus background noise.

Each pixel keeps a reference log intensity. Between two renders at t0 and t1 the log intensity is
taken to change linearly; every time it crosses reference + C (an ON event, p = 1) or reference - C
(OFF, p = 0) an event is emitted at the interpolated crossing time and the reference moves by C, so
one step may emit several events per pixel. Thresholds vary a little per pixel, as in real sensors.
Background activity (leak and shot noise, a few hot pixels) is added uniformly in time.

The kernels are Numba ``nogil`` functions, so several sequences can be simulated on parallel threads.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _count_rows(L0, L1, ref, cpos, cneg):
    """Events per image row for one step, without changing the reference."""
    h, w = L1.shape
    counts = np.zeros(h, np.int64)
    for y in range(h):
        n = 0
        for x in range(w):
            d = L1[y, x] - ref[y, x]
            if d >= cpos[y, x]:
                n += int(d / cpos[y, x])
            elif -d >= cneg[y, x]:
                n += int(-d / cneg[y, x])
        counts[y] = n
    return counts


@njit(nogil=True, cache=True)
def _emit(L0, L1, ref, cpos, cneg, t0, t1, starts, xs, ys, ps, ts):
    """Write the step's events row by row at ``starts[y]`` and advance the references."""
    h, w = L1.shape
    dt = t1 - t0
    for y in range(h):
        k = starts[y]
        for x in range(w):
            r = ref[y, x]
            a = L0[y, x]
            b = L1[y, x]
            span = b - a
            d = b - r
            if d >= cpos[y, x]:
                c = cpos[y, x]
                n = int(d / c)
                pol = 1
            elif -d >= cneg[y, x]:
                c = -cneg[y, x]
                n = int(-d / cneg[y, x])
                pol = 0
            else:
                continue
            for i in range(1, n + 1):
                level = r + i * c
                frac = (level - a) / span if span != 0.0 else 1.0
                frac = min(max(frac, 0.0), 1.0)
                xs[k] = x
                ys[k] = y
                ps[k] = pol
                ts[k] = t0 + int(frac * dt)
                k += 1
            ref[y, x] = r + n * c


def step_events(L0: np.ndarray, L1: np.ndarray, ref: np.ndarray, cpos: np.ndarray, cneg: np.ndarray, t0: int,
                t1: int) -> dict[str, np.ndarray]:
    """Events between two log-intensity frames (t0, t1 in us), sorted by time; updates ``ref`` in place."""
    counts = _count_rows(L0, L1, ref, cpos, cneg)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    xs = np.empty(n, np.uint16)
    ys = np.empty(n, np.uint16)
    ps = np.empty(n, np.uint8)
    ts = np.empty(n, np.int64)
    _emit(L0, L1, ref, cpos, cneg, np.int64(t0), np.int64(t1), starts, xs, ys, ps, ts)
    order = np.argsort(ts, kind="stable")
    return {"x": xs[order], "y": ys[order], "p": ps[order], "t": ts[order]}


def count_events(frames: list[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    """How many events a run over consecutive log frames makes at each contrast threshold (for tuning)."""
    out = np.zeros(len(thresholds), np.int64)
    for j, c in enumerate(thresholds):
        ref = frames[0].copy()
        cmap = np.full_like(ref, c)
        for a, b in itertools.pairwise(frames):
            counts = _count_rows(a, b, ref, cmap, cmap)
            out[j] += counts.sum()
            # Advance the reference the way _emit does, without writing events.
            d = b - ref
            ref += np.where(d >= c, np.floor(d / c) * c, np.where(-d >= c, -np.floor(-d / c) * c, 0.0))
    return out


def merge_noise(events: dict[str, np.ndarray], rng: np.random.Generator, rate: float, t0: int, t1: int,
                shape: tuple[int, int], hot: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Add background events (Poisson, ``rate`` events/s over the sensor) in [t0, t1) and re-sort."""
    h, w = shape
    n = int(rng.poisson(rate * (t1 - t0) * 1e-6))
    if n == 0:
        return events
    flat = rng.integers(0, h * w, n)
    if hot is not None and hot.size:
        pick = rng.random(n) < 0.2  # a fifth of the noise comes from a few hot pixels
        flat[pick] = hot[rng.integers(0, hot.size, int(pick.sum()))]
    noise = {"x": (flat % w).astype(np.uint16), "y": (flat // w).astype(np.uint16),
             "p": rng.integers(0, 2, n).astype(np.uint8), "t": rng.integers(t0, t1, n).astype(np.int64)}
    merged = {k: np.concatenate([events[k], noise[k]]) for k in events}
    order = np.argsort(merged["t"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def threshold_maps(rng: np.random.Generator, c: float, shape: tuple[int, int], spread: float = 0.08
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel ON/OFF contrast thresholds around ``c`` (relative spread, clipped positive)."""
    cpos = c * np.clip(1 + spread * rng.standard_normal(shape), 0.5, 1.5)
    cneg = c * np.clip(1 + spread * rng.standard_normal(shape), 0.5, 1.5)
    return cpos.astype(np.float32), cneg.astype(np.float32)
