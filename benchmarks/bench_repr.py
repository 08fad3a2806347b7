"""Representation kernels' throughput beside tonic and evlib on the same events, one thread.

Every method runs in this one process on the same windows of synthetic DSEC-like events (640x480,
~330 k events per 50 ms window by default, as a DSEC night interval), with an identity rectify map
(the libraries take raw pixels; a real map costs the kernels one table lookup per event either
way). Each method is warmed up once (Numba compilation, imports), then timed --repeats times over
all windows; the table prints the median events/s, the min-max spread, and our kernel's ratio to
each reference. Thread pools are pinned to one thread before any import (Numba kernels here are
single-threaded; polars, which evlib runs on, and BLAS would otherwise use every core).

What each reference computes (docs/representations.md lists the exact differences):
* tonic 1.7: to_frame_numpy (n_time_bins), to_timesurface_numpy (dt, tau), to_voxel_grid_numpy;
* evlib 0.13: rvt.build_sparse_histogram (sparse table, not densified), create_time_surface +
  densify_time_surface, representations.time_surface (sparse table), create_voxel_grid +
  densify_voxel_grid;
* MDES and ERGO-12 have no library: their rows compare with the NumPy ports the tests use
  (tests/representation_refs.py), which say little about speed and are marked "port".

    python benchmarks/bench_repr.py                       # 3 windows x 330 k events, 3 repeats
    python benchmarks/bench_repr.py --windows 1 --events-per-window 50000 --repeats 1   # smoke run
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import representations as R  # noqa: E402
from pipeline.voxel import rectifier  # noqa: E402

H, W = 480, 640


def make_windows(n_windows: int, per_window: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """Windows of 50 ms with clustered positions (an edge sweeping the sensor) and a hot column."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_windows):
        t = np.sort(rng.integers(0, 50_000, per_window)).astype(np.int64) + k * 50_000
        cx = ((t - k * 50_000) / 50_000 * 500 + 70 * k) % W
        x = np.clip(cx + rng.normal(0, 60, per_window), 0, W - 1).astype(np.uint16)
        x[rng.random(per_window) < 0.03] = 321
        y = rng.integers(0, H, per_window).astype(np.uint16)
        p = rng.integers(0, 2, per_window).astype(np.uint8)
        out.append((x, y, p, t))
    return out


def structured(x, y, p, t):
    ev = np.empty(len(x), dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def frame(x, y, p, t):
    import polars as pl

    return pl.DataFrame({"t": t, "x": x.astype(np.int64), "y": y.astype(np.int64), "polarity": p.astype(np.int64)})


def methods(tonic_fn, evlib_mod, refs) -> dict[str, list[tuple[str, Callable, Callable | None]]]:
    """Per kind: (name, fn(x, y, p, t), prepare or None). ``prepare`` converts the window into the
    method's input format outside the timing (tonic's structured array, evlib's DataFrame)."""
    rect = rectifier(np.stack(np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32)), -1))
    ours = {
        "histogram b10 c10": R.HistogramSettings(10, 10),
        "time_surface tau 50 ms, dt 10 ms x 5": R.TimeSurfaceSettings(50_000.0, 10_000, 5),
        "time_surface tau 50 ms at window end": R.TimeSurfaceSettings(50_000.0),
        "mdes b10 c32": R.MdesSettings(10, 32),
        "ergo12": R.Ergo12Settings(),
        "voxel_dsec b15 normalised": R.VoxelDsecSettings(15, True),
        # the same grid without DSEC's normalisation: how much of voxel_dsec's time the mean/std pass takes
        "voxel_dsec b15 raw": R.VoxelDsecSettings(15, False),
    }
    def kernel(s):
        return lambda x, y, p, t: R.build(s, x, y, p, t, rect)

    table: dict[str, list] = {k: [("cmda", kernel(s), None)] for k, s in ours.items()}
    if tonic_fn is not None:
        table["histogram b10 c10"].append(
            ("tonic to_frame_numpy", lambda ev: tonic_fn.to_frame_numpy(ev, (W, H, 2), n_time_bins=10), structured))
        table["time_surface tau 50 ms, dt 10 ms x 5"].append(
            ("tonic to_timesurface_numpy", lambda ev: tonic_fn.to_timesurface_numpy(ev, (W, H, 2), 10_000, 50_000.0),
             structured))
        for name in ("voxel_dsec b15 normalised", "voxel_dsec b15 raw"):
            table[name].append(
                ("tonic to_voxel_grid_numpy", lambda ev: tonic_fn.to_voxel_grid_numpy(ev.copy(), (W, H, 2), 15),
                 structured))
    if evlib_mod is not None:
        from evlib.representations import (
            create_time_surface,
            create_voxel_grid,
            densify_time_surface,
            densify_voxel_grid,
            time_surface,
        )
        from evlib.rvt.representation import build_sparse_histogram

        def ev_hist(df):
            t = df["t"]
            return build_sparse_histogram(df.rename({"polarity": "p"}), np.array([t.max()]), int(t.max() - t.min()),
                                          10, 10, H, W, False, engine="in-memory")

        def ev_ts(df):
            t0 = float(df["t"].min())
            n = int((df["t"].max() - t0 - 10_000) // 10_000 + 1)
            return densify_time_surface(create_time_surface(df, H, W, 10_000, 50_000.0), n, 2, H, W, 10_000,
                                        50_000.0, t0)

        table["histogram b10 c10"].append(("evlib rvt.build_sparse_histogram", ev_hist, frame))
        table["time_surface tau 50 ms, dt 10 ms x 5"].append(("evlib create+densify_time_surface", ev_ts, frame))
        table["time_surface tau 50 ms at window end"].append(
            ("evlib representations.time_surface", lambda df: time_surface(df, H, W, 50_000.0), frame))
        for name in ("voxel_dsec b15 normalised", "voxel_dsec b15 raw"):
            table[name].append(
                ("evlib create+densify_voxel_grid",
                 lambda df: densify_voxel_grid(create_voxel_grid(df, H, W, 15), 15, H, W), frame))
    table["mdes b10 c32"].append(("port: RVT MixedDensityEventStack (NumPy)",
                                  lambda x, y, p, t: refs.rvt_mixed_density_stack(x, y, p, t, 10, H, W, 32), None))
    table["ergo12"].append(("port: the study's ERGO-12 (NumPy)",
                            lambda x, y, p, t: refs.ergo12(x, y, p, t, H, W), None))
    return table


def time_method(fn, prepare, windows, repeats: int) -> list[float]:
    inputs = [(prepare(*w),) if prepare else w for w in windows]
    fn(*inputs[0])  # warm-up: compilation, imports, caches
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for args in inputs:
            fn(*args)
        runs.append(time.perf_counter() - start)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--events-per-window", type=int, default=330_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tonic_fn = evlib_mod = None
    try:
        tonic_fn = importlib.import_module("tonic.functional")
    except ImportError:
        print("tonic is not installed: its rows are skipped (pip install 'tonic>=1.7')")
    try:
        evlib_mod = importlib.import_module("evlib")
    except ImportError:
        print("evlib is not installed: its rows are skipped (pip install evlib)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    refs = importlib.import_module("representation_refs")
    windows = make_windows(args.windows, args.events_per_window)
    n = args.windows * args.events_per_window
    print(f"settings: {args.windows} windows x {args.events_per_window:,} events (50 ms each, {W}x{H}), "
          f"{args.repeats} repeats, one thread, identity rectify map")
    print(f"{'kind':38s} {'method':42s} {'Mev/s':>8s} {'min-max':>13s} {'cmda x':>7s}")
    for kind, rows in methods(tonic_fn, evlib_mod, refs).items():
        ours = None
        for name, fn, prepare in rows:
            runs = time_method(fn, prepare, windows, args.repeats)
            rate = n / statistics.median(runs) / 1e6
            spread = f"{n / max(runs) / 1e6:.2f}-{n / min(runs) / 1e6:.2f}"
            ours = rate if ours is None else ours
            ratio = "" if name == "cmda" else f"{ours / rate:.1f}"
            print(f"{kind:38s} {name:42s} {rate:8.2f} {spread:>13s} {ratio:>7s}", flush=True)


if __name__ == "__main__":
    main()
