"""Training-step speed and memory: the full DACS step, fp32 eager vs the project's default settings.

One iteration = EMA update, source pass + backward, teacher pseudo-labels, ClassMix + jitter/blur +
ISR recompute, mixed pass + backward, AdamW step: the trainer's own ``train.uda.step.iteration``,
on synthetic tensors of the training shapes (so data loading is not measured; see
bench_loader.py). Both configurations run in one process on the same model size and batch:

* ``fp32 eager``: float32, contiguous tensors, foreach AdamW;
* ``cmda default``: bf16 autocast, channels_last, fused AdamW (+ ``--compile``, + ``--checkpoint``).

    python benchmarks/bench_train.py                              # MiT-B5, 512x512, batch 2+2 (GPU)
    python benchmarks/bench_train.py --backbone mit_b0 --crop 128 --iters 5   # what a CPU can do
    python benchmarks/bench_train.py --profile 3    # cpu-sample's step under torch.profiler

``--profile N``: the ``cpu-sample`` preset's step (MiT-B0, 128x128, head 64, batch 2+2, the preset's DACS
settings, fp32 on the CPU) on the same synthetic batches, N iterations after --warmup under
``torch.profiler``: the step's phases (each function of ``train.uda.step`` wrapped in a
``record_function`` by this script only) and the top operations by self CPU time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from train.config import TrainConfig
from train.config.layers import apply_preset
from train.engine.build import build_optimizer
from train.models import CMDAModel
from train.uda import step as step_module
from train.uda.method import build_method
from train.uda.step import Networks, iteration

PHASES = ("ema_update", "teacher_pseudo_labels", "class_mix", "source_pass", "mixed_pass")


def fake_batch(b: int, size: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch in :class:`train.data.PairedBatches`' format: uint8 images and IC1, float events in [-1, 1]."""
    def img() -> torch.Tensor:
        return torch.randint(0, 256, (b, 3, size, size), generator=gen, dtype=torch.uint8).to(device)

    label = torch.randint(0, 19, (b, size // 32, size // 32), generator=gen)
    label = label.repeat_interleave(32, 1).repeat_interleave(32, 2).to(device)  # blocky, like real labels
    ic1 = torch.randint(0, 256, (b, 1, size, size), generator=gen, dtype=torch.uint8).to(device)
    events = (torch.rand(b, 1, size, size, generator=gen) * 2 - 1).to(device)
    return {"source_image": img(), "source_label": label, "source_ic1": ic1, "target_image": img(),
            "target_events": events}


def run(name: str, args, device: torch.device, *, amp: bool, channels_last: bool, fused: bool,
        compile_: bool, checkpoint: bool, accum: int = 1, mic: bool = False) -> dict[str, float]:
    cfg = TrainConfig()
    cfg.model.backbone, cfg.data.crop, cfg.run.batch = args.backbone, args.crop, args.batch
    cfg.run.channels_last, cfg.run.amp, cfg.run.accum, cfg.mic.enabled = channels_last, amp, accum, mic
    cfg.mic.block = max(1, 32 * args.crop // 512)
    torch.manual_seed(0)
    model = CMDAModel(args.backbone, checkpoint=checkpoint, head_channels=args.head_channels).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.param_groups(6e-5, 0.01), lr=6e-5, fused=fused if device.type == "cuda" else None)
    fwd = torch.compile(model) if compile_ else model
    method = build_method(cfg, device, None, None)
    nets = Networks(model, fwd, teacher, opt)
    gen = torch.Generator().manual_seed(0)
    batches = [fake_batch(args.batch, args.crop, device, gen) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        iteration(cfg, method, nets, batches[it % 2], it, seed=0)  # EMA, passes and optimiser step
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, teacher, opt, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "s_per_iter": statistics.median(times), "peak_gb": peak, "reserved_gb": reserved}


def _labelled(name: str, fn):
    def wrapper(*a, **k):
        with torch.profiler.record_function(f"phase: {name}"):
            return fn(*a, **k)
    return wrapper


def profile(args) -> None:
    """``cpu-sample``'s step under torch.profiler: phases, then the top operations by self CPU time."""
    cfg = apply_preset(TrainConfig(), "cpu-sample")
    torch.manual_seed(0)
    m = cfg.model  # the trainer's build_student, without ImageNet weights
    model = CMDAModel(m.backbone, num_classes=m.num_classes, drop_path=m.drop_path,
                      fusion_drop_path=m.fusion_drop_path, head_channels=m.head_channels, fusion=m.fusion)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    method = build_method(cfg, torch.device("cpu"), None, None)
    nets = Networks(model, model, teacher, opt)
    gen = torch.Generator().manual_seed(0)
    batches = [fake_batch(cfg.run.batch, cfg.data.crop, torch.device("cpu"), gen) for _ in range(2)]
    for name in PHASES:  # this process only: the trainer's code is not changed
        setattr(step_module, name, _labelled(name, getattr(step_module, name)))
    for it in range(args.warmup):
        step_module.iteration(cfg, method, nets, batches[it % 2], it, seed=0)
    acts = [torch.profiler.ProfilerActivity.CPU]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        for it in range(args.warmup, args.warmup + args.profile):
            with torch.profiler.record_function("iteration"):
                step_module.iteration(cfg, method, nets, batches[it % 2], it, seed=0)
    wall = (time.perf_counter() - t0) / args.profile
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "iteration")
    print(f"cpu-sample step ({cfg.model.backbone}, {cfg.data.crop}x{cfg.data.crop}, head {cfg.model.head_channels}, "
          f"batch {cfg.run.batch}+{cfg.run.batch}, {torch.get_num_threads()} threads), {args.profile} profiled "
          f"iterations after {args.warmup}: {wall:.3f} s/iteration under the profiler\n")
    print(f"{'phase':<36}{'ms/iter':>9}{'share':>8}")
    for e in sorted((e for e in events if e.key.startswith("phase: ")), key=lambda e: -e.cpu_time_total):
        print(f"{e.key[7:]:<36}{e.cpu_time_total / 1e3 / args.profile:>9.1f}{e.cpu_time_total / total:>8.1%}")
    print(f"\n{'operation (self CPU time)':<44}{'ms/iter':>9}{'share':>8}{'calls/iter':>12}")
    ops = sorted((e for e in events if not e.key.startswith("phase: ") and e.key != "iteration"),
                 key=lambda e: -e.self_cpu_time_total)
    for e in ops[:args.top]:
        print(f"{e.key:<44}{e.self_cpu_time_total / 1e3 / args.profile:>9.1f}"
              f"{e.self_cpu_time_total / total:>8.1%}{e.count / args.profile:>12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mit_b5")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--head-channels", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the default configuration")
    ap.add_argument("--checkpoint", action="store_true", help="gradient checkpointing in the default configuration")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation in the default configuration")
    ap.add_argument("--mic", action="store_true", help="also the default configuration + the MIC pass (its cost)")
    ap.add_argument("--profile", type=int, default=0, help="profile N iterations of cpu-sample's step instead")
    ap.add_argument("--top", type=int, default=15, help="--profile: operations listed")
    args = ap.parse_args()
    if args.profile:
        profile(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.backbone}, {args.crop}x{args.crop}, batch {args.batch}+{args.batch}, full DACS step, on {where}")
    rows = [run("fp32 eager", args, device, amp=False, channels_last=False, fused=False, compile_=False,
                checkpoint=False)]
    rows.append(run("cmda default (bf16 autocast, channels_last, fused AdamW"
                    + (", compile" if args.compile else "") + (", checkpointing" if args.checkpoint else "")
                    + (f", accum {args.accum}" if args.accum > 1 else "") + ")",
                    args, device, amp=True, channels_last=True, fused=True, compile_=args.compile,
                    checkpoint=args.checkpoint, accum=args.accum))
    if args.mic:
        rows.append(run("cmda default + MIC", args, device, amp=True, channels_last=True, fused=True,
                        compile_=args.compile, checkpoint=args.checkpoint, accum=args.accum, mic=True))
        print(f"MIC step cost: {rows[-1]['s_per_iter'] / rows[-2]['s_per_iter']:.2f}x the default step")
    base = rows[0]["s_per_iter"]
    print(f"\n{'configuration':<72}{'s/iter':>8}{'speed-up':>10}{'peak GB':>9}{'40k iters':>11}")
    for r in rows:
        hours = r["s_per_iter"] * 40_000 / 3600
        print(f"{r['name']:<72}{r['s_per_iter']:>8.3f}{base / r['s_per_iter']:>10.2f}{r['peak_gb']:>9.2f}"
              f"{hours:>10.1f}h")


if __name__ == "__main__":
    main()
