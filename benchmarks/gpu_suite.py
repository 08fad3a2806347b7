"""One command that measures everything a GPU can tell us about cmda, and checks its CUDA paths run.

    python benchmarks/gpu_suite.py                  # on a CUDA machine: ~5-8 minutes on one H100/H200
    python benchmarks/gpu_suite.py --smoke          # on the CPU: tiny model and sizes, seconds (tests run this)

Sections (each runs on its own; a failure is recorded and the suite goes on):

(a) ``train_step``: the full DACS step of ``benchmarks/bench_train.py`` for MiT-B5 at 512x512, batch 2+2:
    fp32 eager, the default (bf16 autocast, channels_last, fused AdamW), default + ``--compile``,
    default + activation checkpointing, default + ``--accum 2``: seconds per iteration, peak memory
    (allocated and reserved) and the projected time of 40k iterations.
(b) ``sample_run``: ``cmda train`` for 100 iterations on the bundled sample on CUDA, then ``cmda evaluate``
    (exit codes, night mIoU). The sample is built in the work folder unless ``--datasets`` names one.
(c) ``oom``: a deliberately too large batch, to see the out-of-memory path end in its one-line message.
(d) ``ddp``: ``torchrun --nproc_per_node 1`` (NCCL on CUDA, gloo with --smoke) for a few iterations.
(e) ``env``: GPU name, driver, torch, CUDA and cuDNN versions.
(f) ``components``: ``benchmarks/bench_components.py``'s step (the loop's ``_step`` + EMA + AdamW) for
    the baseline, DSRNSS, DIDA, the discriminator and all three, MiT-B5 at 512x512, batch 2+2:
    s/iter, ratio to the baseline (target <= 1.5x) and peak allocated memory (DIDA: <= +10 %).
(g) ``inference``: ``benchmarks/bench_infer.py`` for MiT-B0 and B2 at 440x640 (head 256): PyTorch eager
    fp32 on the CPU, CUDA eager bf16, onnxruntime (CPU, and its CUDA provider where installed), and the
    event side (read + voxelise + normalise 330 k events on one core); B2's end to end is the CUDA model
    plus the event side (target >= 30 frames/s).

Writes ``<out>/gpu_suite.json`` and ``<out>/gpu_suite.md`` (default out: runs/gpu_suite). Packages
needed beyond the project's own: none. A bare GPU machine needs a CUDA build of torch and then
``pip install -e .`` from the repository root (``--compile`` uses triton, which CUDA builds of torch
bring along).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_components  # noqa: E402
import bench_infer  # noqa: E402
import bench_train  # noqa: E402

REQUIREMENTS = "none beyond the project: a CUDA build of torch, then `pip install -e .`"

# What each section measures, at full size and for --smoke (CPU, seconds).
STEP_FULL = {"backbone": "mit_b5", "crop": 512, "batch": 2, "head_channels": 256, "iters": 10, "warmup": 3}
STEP_SMOKE = {"backbone": "mit_b0", "crop": 64, "batch": 2, "head_channels": 32, "iters": 1, "warmup": 0}
STEP_CONFIGS = (  # name, amp, channels_last, fused, compile, checkpoint, accum
    ("fp32 eager", False, False, False, False, False, 1),
    ("default (bf16, channels_last, fused AdamW)", True, True, True, False, False, 1),
    ("default + compile", True, True, True, True, False, 1),
    ("default + checkpointing", True, True, True, False, True, 1),
    ("default + accum 2", True, True, True, False, False, 2),
)
COMP_FULL = {"backbone": "mit_b5", "crop": 512, "batch": 2, "head_channels": 256, "iters": 10, "warmup": 3}
COMP_SMOKE = {"backbone": "mit_b0", "crop": 128, "batch": 1, "head_channels": 32, "iters": 1, "warmup": 0}
INFER_FULL = {"backbones": ("mit_b0", "mit_b2"), "height": 440, "width": 640, "head_channels": 256, "iters": 10,
              "warmup": 2, "threads": 0, "no_onnx": False, "windows": 20, "rate_scale": 1.0}
INFER_SMOKE = {"backbones": ("mit_b0",), "height": 64, "width": 128, "head_channels": 32, "iters": 1, "warmup": 0,
               "threads": 0, "no_onnx": True, "windows": 2, "rate_scale": 0.05}
SMOKE_SAMPLE_YAML = (
    "dsec:\n  root: data/sample/DSEC_Night\n  out: data/processed/dsec\n  test_split: rule\n  label_every: 6\n"
    "  sequences:\n    zurich_city_09_a: {labelled: [0, 13]}\n"
    "cityscapes:\n  root: data/sample/cityscapes\n  out: data/processed/cityscapes\n"
    "sample:\n  frames: 24\n  event_rate: 300000.0\n  cityscapes_train: 4\n  cityscapes_val: 1\n"
)


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "cpu_threads": torch.get_num_threads(), "gpu": None, "gpu_memory_gb": None, "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        if shutil.which("nvidia-smi"):
            res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout else None
    return info


def train_step(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    sizes = STEP_SMOKE if smoke else STEP_FULL
    args = argparse.Namespace(**sizes)
    rows = []
    for name, amp, cl, fused, compile_, ckpt, accum in STEP_CONFIGS:
        row: dict[str, Any] = {"name": name, **sizes, "accum": accum}
        if compile_ and smoke:  # inductor compiles a C++ kernel per op on the CPU: minutes, not seconds
            row.update(skipped="compile is measured on CUDA only")
            rows.append(row)
            continue
        try:
            r = bench_train.run(name, args, device, amp=amp, channels_last=cl, fused=fused, compile_=compile_,
                                checkpoint=ckpt, accum=accum)
            row.update(r)
            row["projected_40k_h"] = r["s_per_iter"] * 40_000 / 3600
        except torch.OutOfMemoryError as exc:
            row.update(error=f"out of memory: {str(exc).splitlines()[0]}")
            torch.cuda.empty_cache()
        except Exception as exc:  # recorded, the suite goes on
            row.update(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))
        rows.append(row)
    base = next((r["s_per_iter"] for r in rows if r["name"] == "fp32 eager" and "s_per_iter" in r), None)
    for r in rows:
        if base and "s_per_iter" in r:
            r["speedup_vs_fp32"] = base / r["s_per_iter"]
    return rows


def components(device: torch.device, smoke: bool) -> dict[str, Any]:
    """The peer components' step cost and peak memory against the baseline (bench_components)."""
    sizes = COMP_SMOKE if smoke else COMP_FULL
    try:
        rows = bench_components.measure(list(bench_components.CONFIGS), argparse.Namespace(**sizes), device)
    except torch.OutOfMemoryError as exc:
        return {**sizes, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # recorded, the suite goes on
        return {**sizes, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
    base = rows["baseline"]
    for r in rows.values():
        r["ratio"] = r["s_per_iter"] / base["s_per_iter"]
        if "peak_gib" in r:
            r["peak_ratio"] = r["peak_gib"] / base["peak_gib"]
    return {**sizes, "configs": rows}


def inference(work: Path, smoke: bool) -> dict[str, Any]:
    """Per-frame latency of the deployment models and the event side (bench_infer); ms per frame."""
    sizes = dict(INFER_SMOKE if smoke else INFER_FULL)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        sizes["no_onnx"], sizes["onnx_note"] = True, "onnxruntime not installed (pip install -e '.[deploy]')"
    args = argparse.Namespace(**sizes, events=[])
    out: dict[str, Any] = {**sizes, "models": {}}
    try:
        per_window = int(bench_infer.DSEC_RATE * bench_infer.INTERVAL_MS / 1e3 * args.rate_scale)
        bench_infer.synthetic_events(work / "bench_events.h5", per_window, args.windows + 1)
        out["event_side_ms"] = bench_infer.bench_events(args, work / "bench_events.h5", "synthetic")["event_total"]
    except Exception as exc:
        out["event_side_error"] = f"{type(exc).__name__}: {exc}"
    for b in args.backbones:
        try:
            res = bench_infer.bench_model(b, args, work)
        except Exception as exc:  # recorded, the suite goes on
            out["models"][b] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
            continue
        if "torch_cuda_bf16" in res and "event_side_ms" in out:
            res["end_to_end_fps_cuda"] = 1e3 / (res["torch_cuda_bf16"] + out["event_side_ms"])
        out["models"][b] = res
    return out


def _cmda(args: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _outcome(res: subprocess.CompletedProcess, seconds: float) -> dict[str, Any]:
    return {"exit": res.returncode, "seconds": round(seconds, 1), "stderr_tail": res.stderr.strip()[-600:]}


def prepare_sample(work: Path, smoke: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Build the synthetic sample and its artefacts in ``work`` (the same steps as `dvc repro`)."""
    yaml_path = work / "datasets.yaml"
    yaml_path.write_text(SMOKE_SAMPLE_YAML if smoke else (REPO / "datasets.yaml").read_text())
    steps = []
    for args in (["sample", "--out", "data/sample"], ["preprocess", "--all"], ["warp", "--all"], ["index"],
                 ["cityscapes"]):
        t0 = time.perf_counter()
        res = _cmda([*args, "--config", str(yaml_path)], work, timeout=600)
        steps.append({"step": args[0], **_outcome(res, time.perf_counter() - t0)})
        if res.returncode != 0:
            break
    return yaml_path, steps


def _train_args(datasets: Path, out: Path, iters: int, device: str, smoke: bool) -> list[str]:
    args = ["train", "--preset", "cpu-sample", "--iters", str(iters), "--device", device, "--out", str(out),
            "--config", str(datasets), "--set", f"run.eval_every={iters}", "--set", f"run.ckpt_every={iters}"]
    if smoke:
        args += ["--crop", "64", "--set", "data.source_resize=128,64", "--set", "data.test_scale=0.16",
                 "--set", "data.workers=0"]
    return args


def sample_run(work: Path, datasets: Path | None, device: str, smoke: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if datasets is None:
        datasets, result["prepare"] = prepare_sample(work, smoke)
        if any(s["exit"] != 0 for s in result["prepare"]):
            return result
    iters = 2 if smoke else 100
    run_dir = work / "sample_run"
    t0 = time.perf_counter()
    res = _cmda(_train_args(datasets, run_dir, iters, device, smoke), work, timeout=600)
    result["train"] = {"iters": iters, **_outcome(res, time.perf_counter() - t0)}
    ckpt = run_dir / "checkpoints" / f"iter_{iters:06d}.pt"
    if res.returncode != 0 or not ckpt.exists():
        return result
    t0 = time.perf_counter()
    res = _cmda(["evaluate", str(ckpt), "--device", device, "--config", str(datasets), "--out", str(work / "eval")],
                work, timeout=300)
    result["evaluate"] = _outcome(res, time.perf_counter() - t0)
    metrics = work / "eval" / "metrics.json"
    if res.returncode == 0 and metrics.exists():
        result["evaluate"]["night_mIoU_fusion"] = json.loads(metrics.read_text())["outputs"]["fusion"]["mIoU"]
    return result


def oom_check(work: Path, datasets: Path | None, device: str, smoke: bool) -> dict[str, Any]:
    """A batch far beyond the card: the run must end with exit 2 and the out-of-memory line."""
    if smoke:
        return {"skipped": "an out-of-memory error needs CUDA"}
    if datasets is None:
        datasets = work / "datasets.yaml"
    res = _cmda(["train", "--iters", "1", "--batch", "512", "--crop", "1024", "--device", device,
                 "--config", str(datasets), "--set", "data.workers=0", "--set", "model.pretrained=none",
                 "--out", str(work / "oom_run")], work, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return {"exit": res.returncode, "stderr_last_line": lines[-1] if lines else "",
            "ok": res.returncode == 2 and bool(lines) and "out of memory" in lines[-1]}


def ddp_check(work: Path, datasets: Path | None, device: str, smoke: bool) -> dict[str, Any]:
    if datasets is None:
        datasets = work / "datasets.yaml"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29533"]
    args = _train_args(datasets, work / "ddp_run", 3, device, smoke)
    t0 = time.perf_counter()
    res = subprocess.run([*torchrun, "-m", "cli", *args], cwd=work, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    return {"backend": "nccl" if device.startswith("cuda") else "gloo", **_outcome(res, time.perf_counter() - t0)}


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"# cmda GPU suite ({'smoke, CPU' if report['smoke'] else env.get('gpu')})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, driver {env['driver']}, "
             f"{report['seconds']:.0f} s in all", "", "| configuration | s/iter | speed-up vs fp32 | peak allocated GB "
             "| peak reserved GB | 40k iterations |", "|---|---|---|---|---|---|"]
    for r in report["train_step"]:
        if "s_per_iter" in r:
            lines.append(f"| {r['name']} | {r['s_per_iter']:.3f} | {r.get('speedup_vs_fp32', float('nan')):.2f} | "
                         f"{r['peak_gb']:.2f} | {r['reserved_gb']:.2f} | {r['projected_40k_h']:.1f} h |")
        else:
            lines.append(f"| {r['name']} | {r.get('error') or r.get('skipped')} | | | | |")
    sr = report["sample_run"]
    lines += ["", f"- sample run: train exit {sr.get('train', {}).get('exit')}, evaluate exit "
              f"{sr.get('evaluate', {}).get('exit')}, night mIoU (fusion) "
              f"{sr.get('evaluate', {}).get('night_mIoU_fusion')}",
              f"- out-of-memory path: {report['oom']}", f"- torchrun 1 process: {report['ddp']}"]
    comp = report.get("components") or {}
    if comp:
        lines += ["", f"Peer components ({comp.get('backbone')}, crop {comp.get('crop')}, batch {comp.get('batch')}+"
                  f"{comp.get('batch')}):", "", "| configuration | s/iter | vs baseline | peak GB | vs baseline |",
                  "|---|---|---|---|---|"]
        if "error" in comp:
            lines.append(f"| {comp['error']} | | | | |")
        for name, r in comp.get("configs", {}).items():
            peak = f"{r['peak_gib']:.2f} | {r['peak_ratio']:.2f}x" if "peak_gib" in r else "- | -"
            lines.append(f"| {name} | {r['s_per_iter']:.3f} | {r['ratio']:.2f}x | {peak} |")
    inf = report.get("inference") or {}
    if inf:
        side = f"{inf['event_side_ms']:.1f} ms" if "event_side_ms" in inf else inf.get("event_side_error")
        lines += ["", f"Inference ({inf.get('height')}x{inf.get('width')}, ms per frame; event side {side} on one "
                  "core):", "",
                  "| backbone | eager fp32 CPU | onnxruntime CPU | onnxruntime CUDA | eager bf16 CUDA "
                  "| end to end fps |",
                  "|---|---|---|---|---|---|"]
        for b, r in inf.get("models", {}).items():
            if "error" in r:
                lines.append(f"| {b} | {r['error']} | | | | |")
                continue
            cells = [r.get(k) for k in ("torch_cpu", "ort_cpu", "ort_cuda", "torch_cuda_bf16", "end_to_end_fps_cuda")]
            lines.append(f"| {b} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script, no figures)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_suite", help="folder for the report")
    ap.add_argument("--datasets", type=Path, default=None,
                    help="datasets.yaml of an already built sample (default: build one in the work folder)")
    ap.add_argument("--only", default="env,train_step,sample_run,oom,ddp,components,inference",
                    help="comma-separated sections")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: the GPU suite needs one (pass --smoke to check the script on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda:0")
    dev_arg = "cpu" if args.smoke else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    datasets = args.datasets.resolve() if args.datasets else None
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    report: dict[str, Any] = {"smoke": args.smoke, "requirements": REQUIREMENTS}
    report["env"] = env_info(device)
    report["train_step"] = train_step(device, args.smoke) if "train_step" in only else []
    report["sample_run"] = sample_run(work, datasets, dev_arg, args.smoke) if "sample_run" in only else {}
    if datasets is None and (work / "datasets.yaml").exists():
        datasets = work / "datasets.yaml"
    report["oom"] = oom_check(work, datasets, dev_arg, args.smoke) if "oom" in only else {}
    report["ddp"] = ddp_check(work, datasets, dev_arg, args.smoke) if "ddp" in only else {}
    report["components"] = components(device, args.smoke) if "components" in only else {}
    report["inference"] = inference(work, args.smoke) if "inference" in only else {}
    report["seconds"] = time.perf_counter() - t0
    (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (args.out / "gpu_suite.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
