"""Per-iteration cost of the peer components (train/dsr.py, dida.py, adversarial.py) against the baseline.

Runs, in one process on synthetic tensors, a DACS step shaped like ``train.dacs._step`` (source pass +
backward, EMA-teacher pseudo-labels, ClassMix, mixed pass + backward, AdamW step) with the components
wired exactly as their module docstrings' loop-integration contracts say, and reports each
configuration's mean step time as a ratio to the baseline (and peak GPU memory on CUDA). The step here
is also a worked example of that wiring. Not measured: data loading, the ISR recomputation (random
ISR tensors stand in), colour jitter and blur (identical for every configuration).

    python benchmarks/bench_components.py --iters 3 --crop 64               # smoke run on a CPU
    python benchmarks/bench_components.py --backbone mit_b5 --crop 512 --device cuda   # GPU figures
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from train.adversarial import AdvConfig, Adversary
from train.config import LossConfig
from train.dida import DidaConfig, InstanceBank, dida_terms
from train.dsr import DsrConfig, TailBank, grouped_class_masks, prototype_terms
from train.losses import pseudo_labels, segmentation_terms
from train.mixing import class_masks, mix
from train.models import CMDAModel
from train.schedule import ema_update

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


def measure(which: str, args, device: torch.device) -> tuple[float, float | None]:
    torch.manual_seed(0)
    model = CMDAModel(args.backbone, head_channels=args.head_channels).to(device).train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    comp = Components(which, args.head_channels, device)
    gen = torch.Generator().manual_seed(1)
    batches = [synthetic_batch(args.batch, args.crop, device, gen) for _ in range(2)]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ema_update(teacher, model, 0.99)
        peer_step(model, teacher, opt, batches[it % 2], comp, it, LossConfig())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sum(times) / len(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mit_b0")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--head-channels", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (every 5th pastes the tail bank)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [(c, *measure(c, args, device)) for c in args.configs.split(",")]
    base = dict((c, t) for c, t, _ in rows).get("baseline")
    print(f"{args.backbone}, crop {args.crop}, batch {args.batch}+{args.batch}, head {args.head_channels}, "
          f"{device}, {args.iters} timed iterations")
    for c, t, peak in rows:
        ratio = f"{t / base:.2f}x" if base else "-"
        mem = f", peak {peak:.2f} GiB" if peak is not None else ""
        print(f"  {c:9s} {t * 1000:8.1f} ms/iter  {ratio}{mem}")


if __name__ == "__main__":
    main()
