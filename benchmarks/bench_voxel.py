"""Voxelisation throughput: our Numba kernel vs CMDA-style torch put_, tonic, and plain HDF5 reading.

All methods run in one process on the same events (one synthetic DSEC sequence from the sample
generator, or any events.h5 given with --events), windowed exactly as CMDA windows them (one image
interval each), and the table prints events/s and ratios against the baselines, so machine noise
cancels. It also times cmda's own reader (EventFile.read: Blosc chunks read and decoded outside
HDF5's lock) on one thread against plain h5py. The second part times `cmda preprocess` end to
end on the same sequence against reading its events on one thread (plain h5py and EventFile.read)
and on two threads (EventFile.read), and reports the command's peak memory.

Fairness: every method is imported and warmed up (one untimed call) before timing, every method
is timed the same number of times (--repeats), and each row shows the median and the min-max
spread. The slow baselines (torch, tonic) run on the windows inside a prefix of
--baseline-events events (README's table uses the default); their events/s are per event of that
prefix. The settings used are printed first.

    python benchmarks/bench_voxel.py                      # generates a ~24 M-event sequence first
    python benchmarks/bench_voxel.py --events path/to/events.h5 --rectify-map path/to/rectify_map.h5
    python benchmarks/bench_voxel.py --stages             # also: one-thread time per preprocess stage
    python benchmarks/bench_voxel.py --frames 6 --rate 2e5 --repeats 1 --baseline-events 20000  # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import torch

from pipeline.dsec import EventFile, load_rectify_map
from pipeline.voxel import accumulate_voxels, first_decrease, invalid_events, rectifier

sys.path.insert(0, str(Path(__file__).parent))
from baselines import H, W, torch_put_voxels

READ_STEP = 1_000_000  # events per read, as preprocess's default representation.chunk_events


def kernel_all(x, y, p, t, rect, starts, stops, bins: int) -> None:
    """Every window through the project's kernel as `cmda preprocess` runs it: one reused grid."""
    buf = np.zeros((1, bins, H, W), np.float32)
    t_first, t_last = t[starts].astype(np.int64), t[stops - 1].astype(np.int64)
    for k in range(len(starts)):
        buf.fill(0)
        accumulate_voxels(x, y, p, t, rect, starts[k:k + 1], stops[k:k + 1], t_first[k:k + 1], t_last[k:k + 1], buf)


def baseline_all(fn, x, y, p, t, windows, rmap_t, bins: int) -> None:
    for a, b in windows:
        if rmap_t is None:
            fn(x[a:b], y[a:b], p[a:b], t[a:b], bins)
        else:
            fn(x[a:b], y[a:b], p[a:b], t[a:b], rmap_t, bins)


def tonic_voxels(tf, x, y, p, t, bins: int):
    """tonic's voxel grid; ``tf`` is ``tonic.functional``, imported once outside the timing."""
    ev = np.empty(len(x), dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return tf.to_voxel_grid_numpy(ev, (W, H, 2), n_time_bins=bins)


def make_sequence(root: Path, frames: int, rate: float) -> Path:
    """One synthetic DSEC sequence with `frames` images at `rate` events/s; returns datasets.yaml."""
    from pipeline.config import load_config
    from pipeline.synthetic.sample import generate_sample

    cfg_path = root / "datasets.yaml"
    cfg_path.write_text(
        "dsec:\n  root: sample/DSEC_Night\n  out: processed\n  sequences:\n    zurich_city_09_a: {labelled: [0, 5]}\n"
        "cityscapes:\n  root: sample/cityscapes\n  out: processed/cityscapes\n"
        "sample:\n  cityscapes_train: 1\n  cityscapes_val: 1\n"
    )
    generate_sample(load_config(cfg_path), root / "sample", frames=frames, event_rate=rate)
    return cfg_path


def timings(fn, repeats: int, setup=None, warm: bool = True) -> list[float]:
    """Wall times of ``repeats`` calls after one untimed warm-up call; ``setup`` runs before each
    call (the warm-up included), outside the timing."""
    if warm:
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def rate_cell(n: int, times: list[float]) -> tuple[float, str]:
    """Median events/s and its min-max spread as text."""
    rates = [n / t for t in times]
    med = statistics.median(rates)
    return med, f"{med / 1e6:>9.1f} ({min(rates) / 1e6:.1f}-{max(rates) / 1e6:.1f})"


def read_plain(path: Path) -> None:
    """The baseline: plain h5py reads (HDF5 decompresses), READ_STEP events at a time."""
    with h5py.File(path, "r") as f:
        n_ev = f["events/t"].shape[0]
        for a in range(0, n_ev, READ_STEP):
            for k in "xypt":
                f[f"events/{k}"][a:a + READ_STEP]


def read_direct(path: Path, threads: int = 1) -> None:
    """cmda's EventFile.read (pread + decode outside HDF5's lock) on ``threads`` threads."""
    with EventFile(path) as ef:
        starts = range(0, ef.n_events, READ_STEP)
        if threads == 1:
            for a in starts:
                ef.read(a, a + READ_STEP)
            return
        ef.read(0, 1)  # build the chunk readers before the threads share them
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a: ef.read(a, a + READ_STEP), starts))


_CHILD = """
import json, resource, sys, time
from pipeline.config import load_config
from pipeline.preprocess import preprocess_sequence
cfg = load_config(sys.argv[1])
t0 = time.perf_counter()
preprocess_sequence(cfg, "zurich_city_09_a", workers=int(sys.argv[2]))
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # Linux carries ru_maxrss over from the forking parent; VmHWM is this program's own peak
    peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps([elapsed, peak]))
"""


def peak_memory_of_preprocess(cfg_path: Path, workers: int) -> tuple[float, int]:
    """Wall time and peak resident memory of one preprocess run in a fresh interpreter that imports
    only what `cmda preprocess` imports (not this script's torch). The peak is the child's own
    high-water mark: /proc/self/status VmHWM on Linux (getrusage's ru_maxrss there includes the
    resident size of the parent it was forked from), getrusage elsewhere."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(cfg_path), str(workers)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    elapsed, peak = json.loads(res.stdout.strip().splitlines()[-1])
    return elapsed, int(peak)


def stage_breakdown(events: Path, rect, starts, stops, bins: int, clevel: int, cname: str) -> dict[str, float]:
    """One-thread seconds per stage of preprocess over the whole sequence: read, check (timestamp
    order + sensor bounds + polarity), kernel, encode (Blosc), write (atomic chunk files)."""
    from numcodecs import Blosc

    from pipeline.atomic import write_bytes

    codec = Blosc(cname=cname, clevel=clevel, shuffle=Blosc.NOSHUFFLE)
    out = Path(tempfile.mkdtemp(prefix="cmda-stages-"))
    spent = dict.fromkeys(("read", "check", "kernel", "encode", "write"), 0.0)
    buf = np.zeros((1, bins, H, W), np.float32)
    sensor_h, sensor_w = rect.map_x.shape
    try:
        with EventFile(events) as ef:
            warm = ef.read(starts[0], stops[0])  # untimed: load the compiled check and kernel code
            invalid_events(warm["x"], warm["y"], warm["p"], sensor_w, sensor_h)
            first_decrease(warm["t"])
            for k, (a, b) in enumerate(zip(starts, stops, strict=True)):
                t0 = time.perf_counter()
                ev = ef.read(a, b)
                t1 = time.perf_counter()
                first_decrease(ev["t"])
                invalid_events(ev["x"], ev["y"], ev["p"], sensor_w, sensor_h)
                t2 = time.perf_counter()
                buf.fill(0)
                t64 = ev["t"].astype(np.int64)
                accumulate_voxels(ev["x"], ev["y"], ev["p"], ev["t"], rect, np.array([0]), np.array([b - a]),
                                  t64[:1], t64[-1:], buf, checked=True)
                t3 = time.perf_counter()
                data = codec.encode(buf[0])
                t4 = time.perf_counter()
                write_bytes(out / f"c.{k}.0.0.0", data)
                t5 = time.perf_counter()
                for name, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    spent[name] += dt
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=Path, help="an events.h5 (default: generate a synthetic sequence)")
    ap.add_argument("--rectify-map", type=Path, help="its rectify_map.h5")
    ap.add_argument("--frames", type=int, default=80, help="images of the generated sequence (20 Hz)")
    ap.add_argument("--rate", type=float, default=6.6e6, help="events/s of the generated sequence")
    ap.add_argument("--bins", type=int, nargs="+", default=[1, 5, 15])
    ap.add_argument("--baseline-events", type=int, default=500_000,
                    help="prefix of events the slow baselines (torch, tonic) are timed on")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per method (after one warm-up)")
    ap.add_argument("--pairs", type=int, default=9, help="alternating preprocess/read pairs (0: skip that part)")
    ap.add_argument("--stages", action="store_true", help="also time each preprocess stage on one thread")
    ap.add_argument("--workdir", type=Path, help="keep generated data here (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread for every method: the kernel figure is per thread
    try:
        import tonic.functional as tonic_functional  # imported here, never inside a timed call
    except ImportError:
        tonic_functional = None

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmda-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = None
    if args.events is None:
        cfg_path = work / "datasets.yaml"
        if not cfg_path.exists():  # --workdir keeps a generated sequence for the next run
            print(f"generating a {args.frames}-frame sequence at {args.rate / 1e6:.1f} M events/s in {work} ...")
            make_sequence(work, args.frames, args.rate)
        seq = work / "sample" / "DSEC_Night" / "zurich_city_09_a" / "events" / "left"
        args.events, args.rectify_map = seq / "events.h5", seq / "rectify_map.h5"

    with EventFile(args.events) as ef:
        n = ef.n_events
        ev = ef.read(0, n)
        ms = ef.ms_to_idx
    rmap = load_rectify_map(args.rectify_map)
    maps = rectifier(rmap)
    # CMDA windows: one 50 ms image interval each (from ms_to_idx), inclusive ends
    edges = np.unique(np.append(ms[::50], n - 1).clip(0, n - 1))
    starts, stops = edges[:-1], edges[1:] + 1
    base_n = min(args.baseline_events, n)
    base_windows = [(a, b) for a, b in zip(starts, stops, strict=True) if b <= base_n] or [(0, base_n)]
    base_total = sum(b - a for a, b in base_windows)
    print(f"settings: events {args.events} ({n:,} events, {len(starts)} windows of ~"
          f"{np.mean(stops - starts) / 1e3:.0f} k events), bins {args.bins}, repeats {args.repeats} after one "
          f"warm-up each, baselines on the {len(base_windows)} window(s) in the first {base_total:,} events, "
          f"reads of {READ_STEP:,} events, torch threads 1, {os.cpu_count()} CPUs, tonic "
          f"{'present' if tonic_functional else 'absent'}")
    print(f"\n{'method':<44}{'bins':>5}{'M events/s (min-max)':>24}{'vs torch':>10}{'vs read':>9}")
    read_rate, cell = rate_cell(n, timings(functools.partial(read_plain, args.events), args.repeats))
    print(f"{'h5 read + Blosc/zstd decompress':<44}{'-':>5}{cell:>24}{'':>10}{1.0:>9.2f}")
    direct_rate, cell = rate_cell(n, timings(functools.partial(read_direct, args.events), args.repeats))
    print(f"{'cmda EventFile.read (chunks outside HDF5)':<44}{'-':>5}{cell:>24}{'':>10}"
          f"{direct_rate / read_rate:>9.2f}")
    x, y, p, t = ev["x"], ev["y"], ev["p"], ev["t"]
    rmap_t = torch.from_numpy(rmap)
    for bins in args.bins:
        rate_k, cell_k = rate_cell(n, timings(functools.partial(kernel_all, x, y, p, t, maps, starts, stops, bins),
                                              args.repeats))
        run_torch = functools.partial(baseline_all, torch_put_voxels, x, y, p, t, base_windows, rmap_t, bins)
        rate_t, cell_t = rate_cell(base_total, timings(run_torch, args.repeats))
        print(f"{'cmda Numba kernel (rectified, CMDA formula)':<44}{bins:>5}{cell_k:>24}"
              f"{rate_k / rate_t:>10.1f}{rate_k / read_rate:>9.2f}")
        print(f"{'torch put_(accumulate=True), CMDA-style':<44}{bins:>5}{cell_t:>24}{1.0:>10.1f}"
              f"{rate_t / read_rate:>9.2f}")
        if tonic_functional is not None:
            run_tonic = functools.partial(baseline_all, functools.partial(tonic_voxels, tonic_functional),
                                          x, y, p, t, base_windows, None, bins)
            rate_o, cell_o = rate_cell(base_total, timings(run_tonic, args.repeats))
            print(f"{'tonic to_voxel_grid_numpy (other formula)':<44}{bins:>5}{cell_o:>24}"
                  f"{rate_o / rate_t:>10.1f}{rate_o / read_rate:>9.2f}")
        else:
            print(f"{'tonic (not installed: pip install tonic)':<44}{bins:>5}")

    if args.stages:
        spent = stage_breakdown(args.events, maps, starts, stops, 1, 3, "lz4")
        total = sum(spent.values())
        print("\npreprocess stages on one thread, bins 1, lz4-3, whole sequence: " + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({v / total:.0%})" for k, v in spent.items()))

    # ---- cmda preprocess end to end vs reading
    if cfg_path is not None and args.pairs > 0:
        from pipeline.config import load_config
        from pipeline.preprocess import preprocess_sequence

        cfg = load_config(cfg_path)
        print(f"\ncmda preprocess on the same sequence ({os.cpu_count()} cores, dask threads, bins 1):")

        def fresh():
            # Outside the timing: remove the previous run's store and flush its dirty pages, so a
            # run does not pay for the previous one's writeback (it still writes its own ~1 MB/frame).
            shutil.rmtree(work / "processed", ignore_errors=True)
            os.sync()

        def preprocess():
            preprocess_sequence(cfg, "zurich_city_09_a")

        reads = {"h5py, 1 thread": functools.partial(read_plain, args.events),
                 "EventFile.read, 1 thread": functools.partial(read_direct, args.events, 1),
                 "EventFile.read, 2 threads": functools.partial(read_direct, args.events, 2)}
        fresh()
        preprocess()  # warm: imports, Numba cache load
        for read in reads.values():
            read()
        # Alternate preprocess with each read so a ratio compares runs taken moments apart (this
        # VM's speed drifts by +-15% over minutes); report the median ratio and its range.
        ratios: dict[str, list[float]] = {k: [] for k in reads}
        t_pres = []
        for _ in range(args.pairs):
            t_pre = timings(preprocess, 1, setup=fresh, warm=False)[0]
            t_pres.append(t_pre)
            for name, read in reads.items():
                ratios[name].append(timings(read, 1, setup=os.sync, warm=False)[0] / t_pre)
        print(f"  preprocess {n / statistics.median(t_pres) / 1e6:.1f} M events/s (median of {args.pairs} runs)")
        for name, rs in ratios.items():
            print(f"  vs read ({name}): ratio {statistics.median(rs):.3f} (range {min(rs):.2f}-{max(rs):.2f})")
        fresh()
        t_one, peak = peak_memory_of_preprocess(cfg_path, 0)
        print(f"  one run in a fresh process: {t_one:.2f} s, peak resident memory {peak / 2**20:.0f} MiB "
              "(VmHWM, or getrusage ru_maxrss where /proc is absent)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
