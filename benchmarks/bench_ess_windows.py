"""One DSEC-Semantic label's ESS window, precomputed once (cmda) vs sliced per sample (ESS's loader, in NumPy).

ESS builds every sample's input when it is drawn: read the last N events before the label, cut them into S
chunks, voxelise each (DSEC's VoxelGrid, torch ``put_``). cmda does it once per label into the window store
and the loader decodes one Blosc chunk. This times, on the same generated events and in one process:

* ``window``: :func:`pipeline.ess_windows.label_window` (read + check + Numba kernel, one thread);
* ``encode`` / ``decode``: the store's lz4 codec on that window (what preprocessing writes, what the loader reads);
* ``numpy``: the same window with a vectorised NumPy port of DSEC's VoxelGrid (``np.add.at``), the
  per-sample work a loader without a store repeats; ratios are against it.

Medians of ``--repeats`` after one warm-up call; the settings are printed first.

    python benchmarks/bench_ess_windows.py                         # ESS's setting: 2 M events, 20 x 5 bins
    python benchmarks/bench_ess_windows.py --events 200000 --chunks 4 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from pipeline.dsec import EventFile
from pipeline.ess_windows import count_chunks, label_window
from pipeline.events_h5 import write_events_h5
from pipeline.voxel import rectifier


def events(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``n`` events over ``n / 5e6`` s (a busy day scene), edges sweeping the sensor."""
    rng = np.random.default_rng(seed)
    duration = max(1, int(n / 5.0))
    t = np.sort(rng.integers(0, duration, n)).astype(np.uint32)
    cx = (t.astype(np.float64) / duration * 2000) % 640
    x = np.clip(cx + rng.normal(0, 60, n), 0, 639).astype(np.uint16)
    y = rng.integers(0, 480, n).astype(np.uint16)
    return x, y, rng.integers(0, 2, n).astype(np.uint8), t


def numpy_window(ev: dict[str, np.ndarray], rmap: np.ndarray, start, stop, bins: int) -> np.ndarray:
    out = np.zeros((len(start) * bins, 480, 640), np.float32)
    for k, (a, b) in enumerate(zip(start, stop, strict=True)):
        x, y, p, t = (ev[f][a:b] for f in "xypt")
        xf, yf = rmap[y, x, 0], rmap[y, x, 1]
        t = t.astype(np.int64)
        tn = np.float32(bins - 1) * ((t - t[0]).astype(np.float32) / np.float32(max(t[-1] - t[0], 1)))
        x0, y0, t0 = xf.astype(np.int64), yf.astype(np.int64), tn.astype(np.int64)
        val = 2 * p.astype(np.float32) - 1
        g = out[k * bins:(k + 1) * bins]
        for tl in (t0, t0 + 1):
            for yl in (y0, y0 + 1):
                for xl in (x0, x0 + 1):
                    ok = (xl >= 0) & (xl < 640) & (yl >= 0) & (yl < 480) & (tl >= 0) & (tl < bins)
                    w = val * (1 - np.abs(xl - xf)) * (1 - np.abs(yl - yf)) * (1 - np.abs(tl - tn))
                    np.add.at(g, (tl[ok], yl[ok], xl[ok]), w[ok])
    return out[:, :440]


def timed(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (Numba compile, page cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(f"settings: events={a.events:,} chunks={a.chunks} bins={a.bins} repeats={a.repeats} (median), one thread")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.h5"
        x, y, p, t = events(a.events + 1000)
        write_events_h5(path, x, y, p, t, 10**10)
        yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
        rmap = np.stack([xx * 1.02 - 6, yy * 1.01 - 2], -1).astype(np.float32)
        rect = rectifier(rmap)
        start, stop = count_chunks(np.array([a.events + 1000]), a.events, a.chunks)
        with EventFile(path) as ef:
            t_win, grid = timed(lambda: label_window(ef, rect, start[0], stop[0], a.bins), a.repeats)
            ev = ef.read(0, ef.n_events)
        t_np, ref = timed(lambda: numpy_window(ev, rmap, start[0], stop[0], a.bins), max(1, a.repeats // 3))
    codec = Blosc(cname="lz4", clevel=3, shuffle=Blosc.NOSHUFFLE)
    t_enc, blob = timed(lambda: codec.encode(grid), a.repeats)
    t_dec, _ = timed(lambda: codec.decode(blob), a.repeats)
    print(f"max |cmda - numpy| = {np.abs(grid - ref).max():.2e}")
    print(f"window {grid.shape} float32: {grid.nbytes / 2**20:.1f} MiB raw, {len(blob) / 2**20:.1f} MiB lz4-3")
    print(f"{'step':<34}{'seconds':>10}{'vs numpy':>10}")
    for name, sec in (("numpy VoxelGrid port (per sample)", t_np), ("cmda label_window (once)", t_win),
                      ("store encode (once)", t_enc), ("store decode (loader, per sample)", t_dec)):
        print(f"{name:<34}{sec:>10.3f}{t_np / sec:>9.1f}x")


if __name__ == "__main__":
    main()
