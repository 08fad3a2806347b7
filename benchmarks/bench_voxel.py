"""Voxelisation and reading throughput, every figure a ratio measured in the same process.

Kernel part: cmda's kernel, its pre-issue-24 multi-bin kernel (``baselines.event_by_event_voxels``),
tonic's ``to_voxel_grid_numpy`` and evlib's ``create_voxel_grid`` (the same formula as tonic,
computed with polars) run on the same events: the CMDA windows (one 50 ms image interval each)
inside the first --kernel-events events of one synthetic DSEC sequence (or any events.h5 given
with --events), and, with --real, of the real Prophesee recording in ../shared. Methods take
turns repeat by repeat (this VM's speed drifts over minutes), each timed call right after an
untimed call of the same method (so each runs with its own data in cache), one thread
everywhere (cmda's kernels are serial Numba; torch and polars are set to one thread). Each row
gives the median events/s over --repeats, its min-max, the events/s by process CPU time (what
the method cost even while other programs share the cores), and the median of the per-repeat
time ratios against cmda's kernel. torch ``put_`` (CMDA's own loader style) is slow and runs on
the windows in the first --baseline-events events only.

Read part: cmda's ``EventFile.read`` (Blosc chunks read and decoded outside HDF5's lock) against
plain h5py + hdf5plugin on one thread, 1 M-event reads of the whole file, interleaved, wall and
CPU time. --read-profile splits ``EventFile.read``'s CPU time into Blosc decoding, pread and the
rest. The last part times `cmda preprocess` end to end against reading on one and two threads,
with its peak memory; --stages adds the one-thread wall and CPU time of each preprocess stage.

    python benchmarks/bench_voxel.py                      # generates a ~24 M-event sequence first
    python benchmarks/bench_voxel.py --real --pairs 0     # kernels also on ../shared's real recording
    python benchmarks/bench_voxel.py --events path/to/events.h5 --rectify-map path/to/rectify_map.h5
    python benchmarks/bench_voxel.py --stages --read-profile
    python benchmarks/bench_voxel.py --frames 6 --rate 2e5 --repeats 1 --kernel-events 200000 \
        --baseline-events 20000                           # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline, not the venv's copy
from baselines import H, W, event_by_event_voxels, torch_put_voxels

from pipeline.dsec import EventFile, load_rectify_map
from pipeline.voxel import accumulate_voxels, first_decrease, invalid_events, rectifier

REPO = Path(__file__).resolve().parents[1]
READ_STEP = 1_000_000  # events per read, as preprocess's default representation.chunk_events
REAL = REPO.parent / "shared" / "data" / "real" / "prophesee_gen3_vga"


@dataclass
class Recording:
    """One recording's events, rectifier and CMDA windows (one 50 ms image interval each)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    p: np.ndarray
    t: np.ndarray
    rmap: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @classmethod
    def load(cls, name: str, events: Path, rectify_map: Path) -> Recording:
        with EventFile(events) as ef:
            n = ef.n_events
            ev = ef.read(0, n)
            ms = ef.ms_to_idx
        edges = np.unique(np.append(ms[::50], n - 1).clip(0, n - 1))  # inclusive window ends
        return cls(name, ev["x"], ev["y"], ev["p"], ev["t"], load_rectify_map(rectify_map), edges[:-1], edges[1:] + 1)

    def windows(self, limit: int) -> list[tuple[int, int]]:
        """The windows inside the first ``limit`` events (0: all), or one window of them."""
        limit = limit or len(self.t)
        inside = [(int(a), int(b)) for a, b in zip(self.starts, self.stops, strict=True) if b <= limit]
        return inside or [(0, min(limit, len(self.t)))]


def cmda_kernel(rec: Recording, rect, windows, buf: np.ndarray) -> None:
    """Every window through cmda's kernel as `cmda preprocess` runs it: into one grid ``buf`` (1, B,
    H, W) allocated outside the timing and zeroed before each window (the zeroing is timed; a
    freshly allocated 6-18 MB grid would add its page faults, 0.2-0.6 ms, to every call)."""
    for a, b in windows:
        buf.fill(0)
        accumulate_voxels(rec.x, rec.y, rec.p, rec.t, rect, np.array([a]), np.array([b]),
                          np.array([int(rec.t[a])]), np.array([int(rec.t[b - 1])]), buf)


def old_kernel(rec: Recording, rect, windows, buf: np.ndarray) -> None:
    """The same through the pre-issue-24 kernel (and the same argument check cmda's runs)."""
    sensor_h, sensor_w = rect.map_x.shape
    for a, b in windows:
        buf.fill(0)
        if invalid_events(rec.x[a:b], rec.y[a:b], rec.p[a:b], sensor_w, sensor_h) is not None:
            raise ValueError("invalid events")
        event_by_event_voxels(rec.x, rec.y, rec.p, rec.t, rect.map_x, rect.map_y, np.array([a]), np.array([b]),
                              np.array([int(rec.t[a])]), np.array([int(rec.t[b - 1])]), buf)


def tonic_kernel(tf, rec: Recording, windows, bins: int) -> None:
    """tonic's voxel grid per window; ``tf`` is ``tonic.functional``, imported outside the timing."""
    for a, b in windows:
        ev = np.empty(b - a, dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
        ev["x"], ev["y"], ev["t"], ev["p"] = rec.x[a:b], rec.y[a:b], rec.t[a:b], rec.p[a:b]
        tf.to_voxel_grid_numpy(ev, (W, H, 2), n_time_bins=bins)


def evlib_kernel(libs, rec: Recording, windows, bins: int) -> None:
    """evlib's voxel grid per window (polars, one thread), densified to an array as tonic returns."""
    pl, rep = libs
    for a, b in windows:
        df = pl.DataFrame({"x": rec.x[a:b], "y": rec.y[a:b], "t": rec.t[a:b].astype(np.int64),
                           "polarity": rec.p[a:b].astype(np.int8)})
        rep.densify_voxel_grid(rep.create_voxel_grid(df, H, W, n_time_bins=bins, engine="in-memory"), bins, H, W)


def torch_kernel(rec: Recording, windows, bins: int) -> None:
    rmap_t = torch.from_numpy(rec.rmap)
    for a, b in windows:
        torch_put_voxels(rec.x[a:b], rec.y[a:b], rec.p[a:b], rec.t[a:b], rmap_t, bins)


def optional_libraries() -> tuple[object | None, object | None]:
    """tonic.functional and (polars, evlib.representations), or None where not installed."""
    try:
        import tonic.functional as tonic_functional
    except ImportError:
        tonic_functional = None
    os.environ.setdefault("POLARS_MAX_THREADS", "1")  # read when polars is first imported
    try:
        import evlib.representations as evlib_rep
        import polars as pl
    except ImportError:
        return tonic_functional, None
    return tonic_functional, (pl, evlib_rep)


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


def interleaved(methods: dict[str, Callable[[], object]], repeats: int,
                rewarm: bool = False) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds of ``repeats`` calls of each method, the methods taking turns within
    each repeat (against the VM's drift), after one untimed warm-up call of each. ``rewarm``: one
    more untimed call right before each timed one, so a method is timed with its own tables and
    buffers in cache rather than after another method's (tonic's 37 MB float64 grids flush them:
    cmda's kernel measured 10-30 % slower right after tonic, its old kernel 2-7 %)."""
    for fn in methods.values():
        fn()
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if rewarm:
                fn()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[name][0].append(time.perf_counter() - t0)
            out[name][1].append(time.process_time() - c0)
    return out


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


def rate_row(name: str, bins: object, n: int, wall: list[float], cpu: list[float], ref: list[float] | None) -> str:
    """One table row: median events/s (min-max), events/s by CPU time, time ratio to ``ref``."""
    rates = [n / t for t in wall]
    ratio = f"{statistics.median(w / r for w, r in zip(wall, ref, strict=True)):.2f}" if ref else ""
    return (f"{name:<46}{bins!s:>5}{statistics.median(rates) / 1e6:>9.1f} ({min(rates) / 1e6:.1f}-"
            f"{max(rates) / 1e6:.1f}){'':<2}{n / statistics.median(cpu) / 1e6:>9.1f}{ratio:>10}")


def kernel_table(rec: Recording, bins_list, kernel_events: int, baseline_events: int, repeats: int, libs) -> None:
    """cmda's kernel against its old kernel, tonic and evlib on the same windows, then torch."""
    tonic_functional, evlib_libs = libs
    rect = rectifier(rec.rmap)
    windows = rec.windows(kernel_events)
    n = sum(b - a for a, b in windows)
    print(f"\n{rec.name}: {n:,} events in {len(windows)} window(s) of ~{n / len(windows) / 1e3:.0f} k events")
    print(f"{'method':<46}{'bins':>5}{'M events/s (min-max)':>22}{'by CPU':>9}{'x cmda':>10}")
    for bins in bins_list:
        buf = np.zeros((1, bins, H, W), np.float32)
        methods = {"cmda kernel (rectified, CMDA formula)": functools.partial(cmda_kernel, rec, rect, windows, buf)}
        if bins > 1:
            methods["cmda kernel before issue 24 (event by event)"] = functools.partial(
                old_kernel, rec, rect, windows, buf)
        if tonic_functional is not None:
            methods["tonic to_voxel_grid_numpy (other formula)"] = functools.partial(
                tonic_kernel, tonic_functional, rec, windows, bins)
        if evlib_libs is not None:
            methods["evlib create_voxel_grid (tonic's formula)"] = functools.partial(
                evlib_kernel, evlib_libs, rec, windows, bins)
        res = interleaved(methods, repeats, rewarm=True)
        ref = res["cmda kernel (rectified, CMDA formula)"][0]
        for name, (wall, cpu) in res.items():
            print(rate_row(name, bins, n, wall, cpu, None if wall is ref else ref))
        for missing, hint in (("tonic", tonic_functional), ("evlib", evlib_libs)):
            if hint is None:
                print(f"{missing + ' (not installed: pip install ' + missing + ')':<46}{bins:>5}")
        base = rec.windows(baseline_events)
        n_base = sum(b - a for a, b in base)
        (wall, cpu), = interleaved({"t": functools.partial(torch_kernel, rec, base, bins)}, repeats).values()
        print(rate_row(f"torch put_, CMDA-style (first {n_base / 1e3:.0f} k events)", bins, n_base, wall, cpu, None))


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
            # Drop each read as it arrives, as the one-thread loop does: keeping them all (list(...))
            # made the two-thread read fault in fresh pages for every read (4 GB on 290 M events).
            for _ in pool.map(lambda a: ef.read(a, a + READ_STEP), starts):
                pass


def read_table(path: Path, n: int, repeats: int) -> None:
    """EventFile.read against plain h5py on one thread, interleaved: events/s and speed ratios."""
    res = interleaved({"h5py": functools.partial(read_plain, path), "cmda": functools.partial(read_direct, path)},
                      repeats)
    (pw, pc), (dw, dc) = res["h5py"], res["cmda"]
    print(f"\nreading {path.name} ({n:,} events, {READ_STEP:,}-event reads, one thread, {repeats} interleaved repeats)")
    print(f"{'method':<46}{'M events/s (min-max)':>27}{'by CPU':>9}{'vs h5py':>9}{'by CPU':>8}")
    for name, wall, cpu in (("h5py + hdf5plugin (HDF5 decompresses)", pw, pc),
                            ("cmda EventFile.read (chunks outside HDF5)", dw, dc)):
        rates = [n / t for t in wall]
        r_wall = statistics.median(a / b for a, b in zip(pw, wall, strict=True))
        r_cpu = statistics.median(a / b for a, b in zip(pc, cpu, strict=True))
        print(f"{name:<46}{statistics.median(rates) / 1e6:>14.1f} ({min(rates) / 1e6:.1f}-{max(rates) / 1e6:.1f})"
              f"{n / statistics.median(cpu) / 1e6:>9.1f}{r_wall:>9.2f}{r_cpu:>8.2f}")


def read_profile(path: Path, repeats: int) -> None:
    """Where EventFile.read's CPU time goes: Blosc decoding and pread are timed inside the reader
    (wrapped for the duration), the rest is cmda's Python (chunk lookup, buffers, the copy of a
    window's boundary chunk) and opening the file (HDF5 open, chunk tables)."""
    import pipeline.h5chunks as h5c

    spent = {"decode": 0.0, "pread": 0.0}
    decompress, preadv = h5c._DECOMPRESS, os.preadv

    def timed(key, fn):
        def wrapper(*args):
            c0 = time.process_time()
            try:
                return fn(*args)
            finally:
                spent[key] += time.process_time() - c0
        return wrapper

    read_direct(path)  # warm
    h5c._DECOMPRESS, os.preadv = timed("decode", decompress), timed("pread", preadv)
    try:
        c0 = time.process_time()
        for _ in range(repeats):
            read_direct(path)
        total = time.process_time() - c0
    finally:
        h5c._DECOMPRESS, os.preadv = decompress, preadv
    rest = total - spent["decode"] - spent["pread"]
    print(f"EventFile.read CPU time over {repeats} whole-file passes: {total * 1e3 / repeats:.0f} ms per pass: "
          + ", ".join(f"{k} {v / total:.1%}" for k, v in (*spent.items(), ("the rest (cmda's Python, open)", rest))))


def stage_breakdown(events: Path, rect, starts, stops, bins: int, clevel: int, cname: str) -> dict[str, tuple]:
    """One-thread (wall, CPU) seconds per stage of preprocess over the whole sequence: read, check
    (timestamp order + sensor bounds + polarity), kernel, encode (Blosc), write (atomic chunk files)."""
    from numcodecs import Blosc

    from pipeline.atomic import write_bytes

    codec = Blosc(cname=cname, clevel=clevel, shuffle=Blosc.NOSHUFFLE)
    out = Path(tempfile.mkdtemp(prefix="cmda-stages-"))
    wall = dict.fromkeys(("read", "check", "kernel", "encode", "write"), 0.0)
    cpu = dict(wall)
    buf = np.zeros((1, bins, H, W), np.float32)
    sensor_h, sensor_w = rect.map_x.shape
    try:
        with EventFile(events) as ef:
            warm = ef.read(starts[0], stops[0])  # untimed: load the compiled check and kernel code
            invalid_events(warm["x"], warm["y"], warm["p"], sensor_w, sensor_h)
            first_decrease(warm["t"])
            for k, (a, b) in enumerate(zip(starts, stops, strict=True)):
                marks = [(time.perf_counter(), time.process_time())]
                ev = ef.read(a, b)
                marks.append((time.perf_counter(), time.process_time()))
                first_decrease(ev["t"])
                invalid_events(ev["x"], ev["y"], ev["p"], sensor_w, sensor_h)
                marks.append((time.perf_counter(), time.process_time()))
                buf.fill(0)
                t64 = ev["t"].astype(np.int64)
                accumulate_voxels(ev["x"], ev["y"], ev["p"], ev["t"], rect, np.array([0]), np.array([b - a]),
                                  t64[:1], t64[-1:], buf, checked=True)
                marks.append((time.perf_counter(), time.process_time()))
                data = codec.encode(buf[0])
                marks.append((time.perf_counter(), time.process_time()))
                write_bytes(out / f"c.{k}.0.0.0", data)
                marks.append((time.perf_counter(), time.process_time()))
                for i, name in enumerate(wall):
                    wall[name] += marks[i + 1][0] - marks[i][0]
                    cpu[name] += marks[i + 1][1] - marks[i][1]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {k: (wall[k], cpu[k]) for k in wall}


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


def bins_config(cfg_path: Path, bins: int) -> Path:
    """The generated datasets.yaml with ``representation.bins`` set (the child process reads it)."""
    text = "".join(ln for ln in cfg_path.read_text().splitlines(keepends=True) if not ln.startswith("representation"))
    other = cfg_path.with_name(f"datasets_bins{bins}.yaml")
    other.write_text(text + f"representation:\n  bins: {bins}\n")
    return other


def _wall_cpu(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def preprocess_table(cfg_path: Path, work: Path, events: Path, bins_list: list[int], pairs: int) -> None:
    """`cmda preprocess` (dask threads, default workers) against two-thread EventFile.read and one-thread
    h5py, wall and process CPU time, alternating run by run; then its peak memory in a fresh process.

    The CPU ratio says what the wall ratio would be with the cores to ourselves: on a machine whose
    other users take cores, both runs wait alike and the wall ratio drifts with the load."""
    from pipeline.config import load_config
    from pipeline.preprocess import preprocess_sequence

    with EventFile(events) as ef:
        n = ef.n_events

    def fresh():
        # Outside the timing: remove the previous run's store and flush its dirty pages, so a
        # run does not pay for the previous one's writeback (it still writes its own frames).
        shutil.rmtree(work / "processed", ignore_errors=True)
        os.sync()

    reads = {"EventFile.read, 2 threads": functools.partial(read_direct, events, 2),
             "h5py, 1 thread": functools.partial(read_plain, events)}
    print(f"\ncmda preprocess, {n:,} events ({os.cpu_count()} cores, dask threads), against reading the file; "
          f"{pairs} alternating runs, medians; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'bins':>5}{'preprocess M ev/s':>19}{'vs read':>28}{'wall ratio':>12}{'CPU ratio':>11}"
          f"{'peak RSS MiB':>14}")
    for bins in bins_list:
        cfg = load_config(bins_config(cfg_path, bins))
        fresh()
        preprocess_sequence(cfg, "zurich_city_09_a")  # warm: imports, Numba cache load
        pre: list[tuple[float, float]] = []
        ratios: dict[str, list[tuple[float, float]]] = {k: [] for k in reads}
        for _ in range(pairs):
            fresh()
            pre.append(_wall_cpu(functools.partial(preprocess_sequence, cfg, "zurich_city_09_a")))
            for name, read in reads.items():
                os.sync()
                w, c = _wall_cpu(read)
                ratios[name].append((w / pre[-1][0], c / pre[-1][1]))
        fresh()
        _, peak = peak_memory_of_preprocess(bins_config(cfg_path, bins), 0)
        rate = n / statistics.median(w for w, _ in pre) / 1e6
        for k, (name, rs) in enumerate(ratios.items()):
            first = f"{bins:>5}{rate:>19.1f}" if k == 0 else " " * 24
            print(f"{first}{name:>28}{statistics.median(r[0] for r in rs):>12.3f}"
                  f"{statistics.median(r[1] for r in rs):>11.3f}" + (f"{peak / 2**20:>14.0f}" if k == 0 else ""))
    print(f"  (load average {os.getloadavg()[0]:.2f} at the end; peak RSS: one run in a fresh process, VmHWM)")


def machine() -> str:
    """CPU model (as lscpu names it), cores and the checkout's commit, for the settings line."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{model}, {os.cpu_count()} cores, commit {commit}"


def measure_tables(args, libs) -> None:
    """The read table, the kernel tables (and --real's), --read-profile and --stages."""
    rec = Recording.load(f"{args.events}", args.events, args.rectify_map)
    n = len(rec.t)
    print(f"settings: {machine()}; events {args.events} ({n:,} events, {len(rec.starts)} windows), bins "
          f"{args.bins}, {args.repeats} interleaved repeats (kernels: each after an untimed call of its own), "
          f"kernels/tonic/evlib on the windows in the first {args.kernel_events or n:,} events, torch on the first "
          f"{args.baseline_events:,}, "
          f"one thread (serial Numba, torch threads 1, POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS')}), "
          f"tonic {'present' if libs[0] else 'absent'}, evlib {'present' if libs[1] else 'absent'}")
    read_table(args.events, n, args.repeats)
    if args.read_profile:
        read_profile(args.events, args.repeats)
    kernel_table(rec, args.bins, args.kernel_events, args.baseline_events, args.repeats, libs)
    if args.real:
        shared = Path(os.environ.get("CMDA_SHARED", REPO.parent / "shared"))
        folder = shared / "data" / "real" / "prophesee_gen3_vga"
        if (folder / "events.h5").exists():
            real = Recording.load(f"real Prophesee recording {folder}", folder / "events.h5", folder / "rectify_map.h5")
            kernel_table(real, args.bins, 0, args.baseline_events, args.repeats * 3, libs)
        else:
            print(f"\n--real: skipped, {folder} is absent (set CMDA_SHARED to the shared folder)")

    if args.stages:
        rect = rectifier(rec.rmap)
        for bins in args.preprocess_bins:
            spent = stage_breakdown(args.events, rect, rec.starts, rec.stops, bins, 3, "lz4")
            total = sum(w for w, _ in spent.values())
            print(f"\npreprocess stages on one thread, bins {bins}, lz4-3, whole sequence, wall (CPU): " + ", ".join(
                f"{k} {w * 1e3:.0f} ms ({c * 1e3:.0f}; {w / total:.0%})" for k, (w, c) in spent.items()))



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=Path, help="an events.h5 (default: generate a synthetic sequence)")
    ap.add_argument("--rectify-map", type=Path, help="its rectify_map.h5")
    ap.add_argument("--frames", type=int, default=80, help="images of the generated sequence (20 Hz)")
    ap.add_argument("--rate", type=float, default=6.6e6, help="events/s of the generated sequence")
    ap.add_argument("--bins", type=int, nargs="+", default=[1, 5, 15])
    ap.add_argument("--kernel-events", type=int, default=3_000_000,
                    help="the kernels, tonic and evlib run on the windows in this many first events (0: all)")
    ap.add_argument("--baseline-events", type=int, default=500_000,
                    help="prefix of events torch put_ is timed on")
    ap.add_argument("--real", action="store_true",
                    help="also time the kernels on the real Prophesee recording in ../shared (or $CMDA_SHARED)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per method (after one warm-up)")
    ap.add_argument("--pairs", type=int, default=9, help="alternating preprocess/read pairs (0: skip that part)")
    ap.add_argument("--preprocess-bins", type=int, nargs="+", default=[1, 5, 15], help="bins of the preprocess part")
    ap.add_argument("--preprocess-only", action="store_true",
                    help="only the preprocess part (no kernel or read tables: nothing loads the whole sequence)")
    ap.add_argument("--stages", action="store_true", help="also time each preprocess stage on one thread")
    ap.add_argument("--read-profile", action="store_true", help="split EventFile.read's CPU time by part")
    ap.add_argument("--workdir", type=Path, help="keep generated data here (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread for every method: the kernel figure is per thread
    libs = optional_libraries()  # imported here, never inside a timed call

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

    if not args.preprocess_only:
        measure_tables(args, libs)
    if cfg_path is not None and args.pairs > 0:
        preprocess_table(cfg_path, work, args.events, args.preprocess_bins, args.pairs)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
