"""Per-iteration cost of the peer components (``dsr``, ``dida``, ``adv``) against the baseline, in one process.

Times the training loop's own step (``train.dacs._step`` with :class:`train.peers.Peers`, + EMA update +
AdamW step) on synthetic batches (benchmarks/bench_train.py's ``fake_batch``) for the baseline and each
component alone and all three together. The configurations run round-robin, one iteration each per
round, so a machine whose load drifts slows them alike; each is reported as its median step time and
as a ratio to the baseline's. Peak memory: on CUDA ``max_memory_allocated`` per configuration; on a CPU,
with ``--rss``, each configuration is re-run in a fresh process and its peak resident set size
reported (ru_maxrss), plus DIDA's similarity maps by tensor size. Data loading is not measured.

    python benchmarks/bench_components.py --iters 10                       # CPU: mit_b0, crop 128
    python benchmarks/bench_components.py --rss                            # + peak RSS per configuration
    python benchmarks/bench_components.py --backbone mit_b5 --crop 512    # GPU figures

``peer_step`` below is the components' wiring as their module docstrings first described it, kept as a
worked example (tests/test_peer_wiring.py); the loop's own wiring is train/peers.py.
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
from train.adversarial import AdvConfig, Adversary
from train.config import LossConfig, TrainConfig, apply_layers, validate
from train.dacs import Context, _step
from train.dida import DidaConfig, InstanceBank, dida_terms
from train.dsr import DsrConfig, TailBank, grouped_class_masks, prototype_terms
from train.losses import pseudo_labels, segmentation_terms
from train.mixing import class_masks, mix
from train.models import CMDAModel, ic1_to_events
from train.peers import Peers
from train.schedule import ema_alpha, ema_update

CONFIGS = ("baseline", "dsr", "dida", "adv", "all")


class Components:
    """The three components' configs and states, as the loop would hold them."""

    def __init__(self, which: str, head_channels: int, device: torch.device):
        on = {which} if which != "all" else {"dsr", "dida", "adv"}
        self.dsr = DsrConfig(enabled="dsr" in on)
        self.dida = DidaConfig(enabled="dida" in on, dim=head_channels)
        self.adv = AdvConfig(enabled="adv" in on)
        self.bank = TailBank(self.dsr.bank_capacity, self.dsr.bank_classes)
        self.inst = InstanceBank(self.dida, device)
        self.adversary = Adversary(self.adv, 19, device) if self.adv.enabled else None


def peer_step(model, teacher, opt, batch: dict[str, torch.Tensor], comp: Components, it: int,
              loss_cfg: LossConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One iteration with the components wired per their contracts; returns (terms, extra metrics)."""
    src_img, src_evt, src_isr, src_lbl = (batch[k] for k in ("src_img", "src_evt", "src_isr", "src_lbl"))
    tgt_img, tgt_evt = batch["tgt_img"], batch["tgt_evt"]
    emb = ("fusion",) if comp.dida.enabled else ()
    extra: dict[str, float] = {}
    # 1. source pass
    out = model(image=src_img, events=src_evt, isr=src_isr, embeddings=emb)
    terms = segmentation_terms(out.logits, src_lbl, loss_cfg, prefix="src/")
    if comp.dsr.enabled and comp.dsr.bank:
        comp.bank.push(src_img, src_evt, src_lbl)
    if comp.dida.enabled:
        comp.inst.update(out.embeddings["fusion"], src_lbl, it)
    src_pred = out.logits["fusion"].detach()
    # 2. teacher pass, before the source backward (no_grad, no random draws in between)
    with torch.no_grad():
        t_out = teacher(image=tgt_img, events=tgt_evt, fuse_with="events", outputs=("fusion",), embeddings=emb)
        pseudo, pseudo_w = pseudo_labels(t_out.logits["fusion"], tgt_img.shape[-2:], 0.968)
    proto_on = comp.dsr.enabled and comp.dsr.proto_weight and it >= comp.dsr.proto_start
    f = comp.dsr.proto_features
    if proto_on:
        terms.update(prototype_terms(comp.dsr, source=(out.features[f][-1], src_lbl),
                                     target=(t_out.features[f][-1], pseudo)))
        keep_proto = out.features[f][-1].detach()
    sum(terms.values()).backward()
    del out
    # 3. ClassMix (+ tail-bank paste)
    with torch.no_grad():
        mask = grouped_class_masks(src_lbl) if comp.dsr.enabled and comp.dsr.grouped_mix else class_masks(src_lbl)
        mixed_img, mixed_evt = mix(mask, src_img, tgt_img), mix(mask, src_evt, tgt_evt)
        mixed_lbl, mixed_w = mix(mask, src_lbl, pseudo), mix(mask, torch.ones_like(pseudo_w), pseudo_w)
        if comp.dsr.enabled and comp.dsr.bank and comp.bank.should_paste(it, comp.dsr.paste_every):
            mixed_img, mixed_evt, mixed_lbl, mixed_w, _ = comp.bank.paste(mixed_img, mixed_evt, mixed_lbl, mixed_w)
        mixed_isr = torch.randn_like(mixed_img)
    # 4. mixed pass
    m_out = model(image=mixed_img, events=mixed_evt, isr=mixed_isr, embeddings=emb)
    mix_terms = segmentation_terms(m_out.logits, mixed_lbl, loss_cfg, mixed_w, prefix="mix/")
    if proto_on:
        mix_terms.update(prototype_terms(comp.dsr, source=(keep_proto, src_lbl),
                                         mixed=(m_out.features[f][-1], mixed_lbl)))
    if comp.dida.enabled:
        mix_terms.update(dida_terms(comp.dida, comp.inst, t_out.embeddings["fusion"], m_out.embeddings["fusion"],
                                    m_out.logits["fusion"], 1 - mask[:, 0]))
    tgt_w = 1 - mask[:, 0]
    if comp.adversary is not None:
        mix_terms.update(comp.adversary.generator_terms(m_out.logits["fusion"], tgt_w))
    sum(mix_terms.values()).backward()
    terms.update(mix_terms)
    if comp.adversary is not None:
        extra.update(comp.adversary.discriminator_step(src_pred, m_out.logits["fusion"].detach(), tgt_w))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms, extra


def synthetic_batch(b: int, size: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def img() -> torch.Tensor:
        return torch.randn(b, 3, size, size, generator=gen).to(device)

    cell = max(size // 16, 1)
    lbl = torch.randint(0, 19, (b, -(-size // cell), -(-size // cell)), generator=gen)
    lbl = lbl.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :size, :size].to(device)
    return {"src_img": img(), "src_evt": img(), "src_isr": img(), "src_lbl": lbl,
            "tgt_img": img(), "tgt_evt": img()}


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
        self.peers = Peers.build(cfg, device)
        gen = torch.Generator().manual_seed(0)
        self.batches = [fake_batch(args.batch, args.crop, device, gen) for _ in range(2)]
        self.amp = device.type == "cuda"
        self.times: list[float] = []

    def step(self, it: int, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if it:
            ema_update(self.teacher, self.model, ema_alpha(it, 0.999))
        torch.manual_seed(it)
        _step(self.cfg, self.batches[it % 2], Context(device=self.device), self.model, self.teacher, None, None,
              self.amp, ic1_to_events, None, self.peers, it)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
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
