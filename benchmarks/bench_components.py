"""Per-iteration cost of the peer components (``dsr``, ``dida``, ``adv``) against the baseline, in one process.

Times the trainer's own iteration (:func:`train.uda.step.iteration`: EMA update, passes, components,
AdamW step) on synthetic batches (benchmarks/bench_train.py's ``fake_batch``) for the baseline and each
component alone and all three together. The configurations run round-robin, one iteration each per
round, so a machine whose load drifts slows them alike; each is reported as its median step time and
as a ratio to the baseline's. Peak memory: on CUDA ``max_memory_allocated`` per configuration; on a CPU,
with ``--rss``, each configuration is re-run in a fresh process and its peak resident set size
reported (ru_maxrss), plus DIDA's similarity maps by tensor size. Data loading is not measured.

    python benchmarks/bench_components.py --iters 10                       # CPU: mit_b0, crop 128
    python benchmarks/bench_components.py --rss                            # + peak RSS per configuration
    python benchmarks/bench_components.py --backbone mit_b5 --crop 512    # GPU figures

"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.bench_train import fake_batch
from train.config import TrainConfig, apply_layers, validate
from train.models import CMDAModel
from train.uda.method import build_method
from train.uda.step import Networks, iteration

CONFIGS = ("baseline", "dsr", "dida", "adv", "all")


ON = {"baseline": (), "dsr": ("dsr",), "dida": ("dida",), "adv": ("adv",), "all": ("dsr", "dida", "adv")}


class Setup:
    """One configuration: settings, student, teacher, optimiser, the components' state, two batches."""

    def __init__(self, which: str, args, device: torch.device):
        cfg = TrainConfig()
        cfg.model.backbone, cfg.model.head_channels = args.backbone, args.head_channels
        cfg.data.crop, cfg.run.batch, cfg.run.iters = args.crop, args.batch, 40_000
        cfg.run.channels_last = device.type == "cuda"
        cfg.mic.block = max(1, 32 * args.crop // 512)
        apply_layers(cfg, sets=[f"{n}.enabled=true" for n in ON[which]] + [f"dida.dim={args.head_channels}"])
        self.cfg, self.device = validate(cfg), device
        torch.manual_seed(0)
        self.model = CMDAModel(args.backbone, head_channels=args.head_channels).to(device).train()
        if cfg.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.param_groups(6e-5, 0.01), lr=6e-5)
        self.method = build_method(cfg, device, None, None)
        self.nets = Networks(self.model, self.model, self.teacher, self.opt)
        gen = torch.Generator().manual_seed(0)
        self.batches = [fake_batch(args.batch, args.crop, device, gen) for _ in range(2)]
        self.amp = device.type == "cuda"
        self.times: list[float] = []

    def step(self, it: int, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        iteration(self.cfg, self.method, self.nets, self.batches[it % 2], it, seed=0)  # the trainer's own step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - t0)


def measure(names: list[str], args, device: torch.device) -> dict[str, dict[str, float]]:
    """Median step time per configuration, run round-robin; peak CUDA memory when on a GPU (one at a time)."""
    setups = {n: Setup(n, args, device) for n in names}
    for it in range(args.warmup + args.iters):
        for s in setups.values():
            s.step(it, timed=it >= args.warmup)
    out = {n: {"s_per_iter": statistics.median(s.times), "min_s": min(s.times)} for n, s in setups.items()}
    if device.type == "cuda":
        for n, s in setups.items():
            torch.cuda.reset_peak_memory_stats(device)
            s.step(args.warmup + args.iters, timed=False)
            out[n]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def peak_rss(which: str, args) -> float:
    """Peak resident set size (GiB) of a fresh process running ``which`` for warmup + 2 iterations."""
    cmd = [sys.executable, __file__, "--configs", which, "--iters", "2", "--warmup", str(args.warmup),
           "--backbone", args.backbone, "--crop", str(args.crop), "--batch", str(args.batch),
           "--head-channels", str(args.head_channels), "--device", "cpu", "--report-rss"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def dida_map_mib(args, bank_size: int = 300) -> float:
    """Size of one of DIDA's [B, K, H/4, W/4] fp32 similarity maps (cmda builds a few per micro-batch)."""
    return args.batch * bank_size * (args.crop // 4) ** 2 * 4 / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mit_b0")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--head-channels", type=int, default=256)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rss", action="store_true", help="CPU: peak RSS of each configuration in a fresh process")
    p.add_argument("--report-rss", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    names = args.configs.split(",")
    if args.report_rss:  # child of --rss: run, then print this process's peak RSS
        measure(names, args, device)
        print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
        return
    rows = measure(names, args, device)
    base = rows.get("baseline")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone}, crop {args.crop}, batch {args.batch}+{args.batch}, head {args.head_channels}, {where}; "
          f"{args.iters} round-robin iterations each; ratios to the baseline's median (and its fastest)")
    rss = {n: peak_rss(n, args) for n in names} if args.rss and device.type == "cpu" else {}
    for n, r in rows.items():
        ratio = f"{r['s_per_iter'] / base['s_per_iter']:5.2f}x ({r['min_s'] / base['min_s']:.2f}x)" if base else "   -"
        mem = f"  peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        mem += f"  peak RSS {rss[n] * 1024:.0f} MiB" if n in rss else ""
        print(f"  {n:9s} {r['s_per_iter'] * 1000:8.1f} ms/iter (fastest {r['min_s'] * 1000:.1f})  {ratio}{mem}")
    print(f"DIDA similarity map [B, K, H/4, W/4] fp32: {dida_map_mib(args):.1f} MiB each "
          f"(DIDA's own code: [B, K, H, W], {16 * dida_map_mib(args):.0f} MiB)")


if __name__ == "__main__":
    main()
