"""Per-frame inference latency at the DSEC test geometry, and the event pipeline against the camera interval.

Three measurements, each a ratio taken in this process:

* **model**, per backbone (default MiT-B0 and B2, random weights, DAFormer head 256): PyTorch eager
  fp32 (``train.checkpoints.inference.predict_logits``, what ``cmda predict`` runs) against the ``cmda export``
  graph on onnxruntime's CPU provider, both on one 440x640 frame (image + 1-bin events);
* **event side**: read + voxelise + normalise one 50 ms window of a DSEC-rate recording (~330 k events,
  6.6 M/s), from a Blosc-compressed ``events.h5`` through the stream's own code, against the 50 ms
  between two images, pinned to one core (Blosc's decoder threads off); on synthetic uniformly random
  events (Blosc's worst case) and, with ``--events FILE``, on windows of the same size of a real file;
* on a CUDA machine also CUDA eager bf16 and onnxruntime's CUDA provider (when installed).

    python benchmarks/bench_infer.py                                  # B0 and B2, 440x640
    python benchmarks/bench_infer.py --backbones mit_b0 --height 64 --width 128 --iters 2   # a smoke run
    python benchmarks/bench_infer.py --no-model --events ../shared/data/real/prophesee_gen3_vga/events.h5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import blosc as numcodecs_blosc

from pipeline.calib import rectify_map_from_calibration, synthetic_calibration
from pipeline.dsec import EventFile
from pipeline.errors import InputError
from pipeline.events_h5 import write_events_h5
from pipeline.voxel import accumulate_voxels, events_norm, rectifier
from train.checkpoints.inference import predict_logits
from train.deploy.export import DeploymentGraph, _export_onnx
from train.deploy.onnx_runtime import ort_session
from train.models import CMDAModel

DSEC_RATE = 6.6e6  # events/s, DSEC night (as pipeline/config.py SampleConfig notes)
INTERVAL_MS = 50.0  # DSEC images are 20 Hz


def timed(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def ms(v: list[float]) -> str:
    return f"{statistics.median(v):8.1f} ms (min {min(v):.1f})"


def bench_model(backbone: str, args, tmp: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = CMDAModel(backbone, head_channels=args.head_channels).eval()
    h, w = args.height, args.width
    image = torch.randn(1, 3, h, w)
    ev1 = torch.rand(1, 1, h, w) * 2 - 1
    ev3 = ev1.repeat(1, 3, 1, 1)
    res: dict[str, float] = {}
    with torch.inference_mode():
        t = timed(lambda: predict_logits(model, image, ev3, ("fusion",), amp=False), args.warmup, args.iters)
    res["torch_cpu"] = statistics.median(t)
    print(f"{backbone} PyTorch eager fp32 CPU: {ms(t)}")
    if not args.no_onnx:
        path = tmp / f"{backbone}.onnx"
        t0 = time.perf_counter()
        _export_onnx(DeploymentGraph(model, bins=1), (image, ev1), path, False, "logits")
        print(f"{backbone} export: {time.perf_counter() - t0:.0f} s")
        sess = ort_session(path, args.threads)
        feed = {"image": image.numpy(), "events": ev1.numpy()}
        t = timed(lambda: sess.run(None, feed), args.warmup, args.iters)
        res["ort_cpu"] = statistics.median(t)
        print(f"{backbone} onnxruntime CPU fp32:  {ms(t)}  -> {res['torch_cpu'] / res['ort_cpu']:.2f}x PyTorch eager")
        if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
            import onnxruntime as ort

            cuda = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            t = timed(lambda: cuda.run(None, feed), args.warmup, args.iters)
            res["ort_cuda"] = statistics.median(t)
            print(f"{backbone} onnxruntime CUDA fp32: {ms(t)}")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        m, i, e = model.to(dev), image.to(dev), ev3.to(dev)

        def step():
            predict_logits(m, i, e, ("fusion",), amp=True)
            torch.cuda.synchronize()

        with torch.inference_mode():
            t = timed(step, args.warmup, args.iters)
        res["torch_cuda_bf16"] = statistics.median(t)
        print(f"{backbone} PyTorch eager bf16 CUDA: {ms(t)} ({1e3 / res['torch_cuda_bf16']:.0f} frames/s)")
    return res


@contextlib.contextmanager
def one_core():
    """Pin this process to one CPU and stop Blosc's own decoder threads, so "one core" is true.

    (numcodecs decodes on Blosc's global threads when called from the main thread; the kernels
    are single-threaded already.) Restores both afterwards. Where affinity cannot be set (macOS),
    says so and measures unpinned.
    """
    saved_threads = numcodecs_blosc.use_threads
    numcodecs_blosc.use_threads = False
    saved_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if saved_cpus:
        cpu = min(saved_cpus)
        os.sched_setaffinity(0, {cpu})
        where = f"pinned to CPU {cpu}"
    else:
        where = "NOT pinned (no sched_setaffinity here)"
    try:
        yield where
    finally:
        numcodecs_blosc.use_threads = saved_threads
        if saved_cpus:
            os.sched_setaffinity(0, saved_cpus)


def synthetic_events(path: Path, per_window: int, windows: int) -> None:
    """Uniformly random events at ``per_window`` per 50 ms: the worst case for Blosc (x, y and p barely compress)."""
    rng = np.random.default_rng(0)
    n = per_window * windows
    t = np.sort(rng.integers(0, int(windows * INTERVAL_MS * 1e3), n)).astype(np.uint32)
    write_events_h5(path, rng.integers(0, 640, n).astype(np.uint16), rng.integers(0, 480, n).astype(np.uint16),
                    rng.integers(0, 2, n).astype(np.uint8), t, 0)


def bench_events(args, path: Path, label: str) -> dict[str, float]:
    """Read + voxelise + normalise back-to-back windows of ``per_window`` events of ``path`` on one core.

    Windows follow each other as in ``cmda stream`` (each starts where the last ended); a file with
    fewer events than the windows need starts over from its beginning.
    """
    per_window = int(DSEC_RATE * INTERVAL_MS / 1e3 * args.rate_scale)
    rect = rectifier(rectify_map_from_calibration(synthetic_calibration(np.random.default_rng(1))))
    _ = rect.splat
    stages: dict[str, list[float]] = {"read": [], "voxelise": [], "normalise": []}
    with one_core() as where, EventFile(path) as ef:
        if ef.n_events < per_window:
            raise SystemExit(f"{path}: {ef.n_events} events, fewer than one window of {per_window}")
        a = 0
        for k in range(args.windows + 1):
            if a + per_window > ef.n_events:
                a = 0
            b = a + per_window
            t0 = time.perf_counter()
            ev = ef.read(a, b)
            t1 = time.perf_counter()
            grid = np.zeros((1, 1, 480, 640), np.float32)
            tt = ev["t"].astype(np.int64)
            accumulate_voxels(ev["x"], ev["y"], ev["p"], ev["t"], rect, np.zeros(1, np.int64), np.array([b - a]),
                              tt[:1], tt[-1:], grid)
            t2 = time.perf_counter()
            events_norm(grid[0], b - a)
            t3 = time.perf_counter()
            a = b
            if k == 0:
                continue  # first window: numba compilation / cache load, file opening
            stages["read"].append((t1 - t0) * 1e3)
            stages["voxelise"].append((t2 - t1) * 1e3)
            stages["normalise"].append((t3 - t2) * 1e3)
    total = [sum(v) for v in zip(*stages.values(), strict=True)]
    print(f"event side, {label}: {per_window} events per window, {args.windows} windows, {where}:")
    for s, v in stages.items():
        print(f"  {s:<10}{ms(v)}")
    print(f"  {'total':<10}{ms(total)}  = {statistics.median(total) / INTERVAL_MS * 100:.1f} % of the "
          f"{INTERVAL_MS:.0f} ms camera interval")
    return {"event_total": statistics.median(total)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="mit_b0,mit_b2")
    ap.add_argument("--height", type=int, default=440)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--head-channels", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0 = their default)")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--rate-scale", type=float, default=1.0, help="events per window x this (smoke runs)")
    ap.add_argument("--events", action="append", default=[], metavar="EVENTS_H5",
                    help="also time windows of this DSEC-format events.h5 (e.g. a real recording); repeatable")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    for path in args.events:  # check them before minutes of other measurements
        try:
            EventFile(path).close()
        except InputError as exc:
            ap.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.height}x{args.width}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        per_window = int(DSEC_RATE * INTERVAL_MS / 1e3 * args.rate_scale)
        synthetic_events(tmp / "events.h5", per_window, args.windows + 1)
        bench_events(args, tmp / "events.h5", "synthetic uniform random events")
        for path in args.events:
            bench_events(args, Path(path), str(path))
        if not args.no_model:
            for b in args.backbones.split(","):
                bench_model(b.strip(), args, tmp)


if __name__ == "__main__":
    main()
