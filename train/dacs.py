"""The DACS self-training loop for CMDA (FACTS §8), in one readable function.

One iteration:
  1. EMA teacher update (a copy at iteration 0, then ``alpha = min(1 - 1/(it+1), 0.999)``).
  2. Source pass: day image + source "events" (CycleGAN(IC1), or IC1 itself without the
     generator) + day ISR -> four-output segmentation loss (+ source-side L2 term) -> backward.
  3. Teacher on the night image with, at random, the night events or the night ISR -> pseudo-labels
     and one confidence weight for the batch.
  4. ClassMix: half the classes of the source batch pasted onto the target; the mixed image gets
     colour jitter and blur, events are mixed only, the mixed ISR is recomputed from the mixed image.
  5. Mixed pass with pseudo weights (+ target-side L2 terms) -> backward -> optimiser step.

Randomness is re-seeded from (seed, rank, iteration) at the start of every iteration and batches
come from :class:`train.data.PairedBatches` by iteration number, so ``--resume`` reproduces the
uninterrupted run. Everything a run writes goes under its output folder; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.atomic import write_text
from pipeline.config import load_config
from pipeline.errors import InputError
from train.checkpoint import check_compatible, load_checkpoint, load_model_state, restore_rng, save_checkpoint
from train.config import TrainConfig, to_dict
from train.data import NightTest, PairedBatches, network_batch
from train.evaluate import evaluate
from train.inference import autocast
from train.isr import ISR_DAY, ISR_NIGHT, image_content, isr_from_normalized
from train.losses import (
    needed_source_features,
    pseudo_labels,
    segmentation_terms,
    source_feature_terms,
    target_feature_terms,
)
from train.mixing import block_mask, class_masks, color_jitter, gaussian_blur, mix
from train.schedule import ema_alpha, ema_update, learning_rate, set_learning_rate

DIRECTIONS = ("leftdown", "leftup", "rightdown", "rightup")
DEFAULT_CYCLEGAN = Path("pretrained/cityscapes_ICD_to_dsec_EN.pth")


# ---------------------------------------------------------------------- run context
@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_context(device: str) -> Context:
    """Single process, or one process per GPU under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local, dev)


def default_out(cfg: TrainConfig) -> Path:
    name = "source_only" if cfg.run.source_only else cfg.run.variant.replace("+", "_")
    return Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{name}"


def _weight_file(setting: str, default: Path, what: str, fallback: str, say) -> Path | None:
    if setting == "none":
        return None
    if setting == "auto":
        if default.exists():
            return default
        say(f"note: {default} not found: {fallback}")
        return None
    path = Path(setting)
    if not path.exists():
        raise InputError(path, f"{what} not found (pass 'none' to do without)")
    return path


def resolve_weights(cfg: TrainConfig, say) -> tuple[Path | None, Path | None]:
    """ImageNet MiT file and CycleGAN file: explicit paths must exist; 'auto' uses them when present."""
    mit = _weight_file(cfg.model.pretrained, Path("pretrained") / f"{cfg.model.backbone}.pth",
                       "ImageNet MiT weights", "encoders start from random weights (CMDA uses ImageNet MiT)", say)
    gan = _weight_file(cfg.model.cyclegan, DEFAULT_CYCLEGAN, "CycleGAN weights",
                       "IC1 is used directly as the source events", say)
    return mit, gan


class StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current iteration (checkpoint, exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"received {signal.Signals(signum).name}: stopping after this iteration (again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _ignore_sigint(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


def _teacher_mode(teacher: torch.nn.Module) -> None:
    """Teacher as in DACS: train mode (batch statistics) but no dropout and no drop path."""
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
            m.eval()


def _finite_or_raise(terms: dict[str, torch.Tensor], it: int, out: Path, last_ckpt: Path | None) -> None:
    # One device sync per iteration for the check; the per-term search only runs once it fails.
    if bool(torch.isfinite(torch.stack([v.detach().float() for v in terms.values()])).all()):
        return
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            keep = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise InputError(out, f"training diverged at iteration {it + 1}: loss term '{name}' is "
                             f"{value.detach().float().item()}; stopped ({keep}). Lower --lr or check the data.")


def feature_distance(feat: torch.Tensor, feat_imnet: torch.Tensor, label: torch.Tensor, classes: tuple[int, ...],
                     min_ratio: float, num_classes: int = 19) -> torch.Tensor:
    """DAFormer's ImageNet feature distance on thing-class cells of the deepest features."""
    scale = label.shape[-1] // feat.shape[-1]
    onehot = F.one_hot(torch.where(label == 255, num_classes, label), num_classes + 1).permute(0, 3, 1, 2).float()
    ratio = F.avg_pool2d(onehot, scale)
    share, cls = ratio.max(1)
    cls = torch.where((share >= min_ratio) & (cls < num_classes), cls, torch.full_like(cls, 255))
    mask = torch.isin(cls, torch.tensor(classes, device=label.device))
    if not mask.any():
        return feat.sum() * 0
    dist = torch.linalg.vector_norm((feat - feat_imnet).float(), dim=1)
    return dist[mask].mean()


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: Path | None = None) -> dict[str, Any]:
    from train.models import CMDAModel, ic1_to_events, load_cyclegan

    ctx = setup_context(cfg.run.device)
    say = tqdm.write if ctx.main else (lambda *_: None)
    if resume is not None and resume.is_dir():
        found = sorted(resume.glob("checkpoints/iter_*.pt")) or sorted(resume.glob("iter_*.pt"))
        if not found:
            raise InputError(resume, "no checkpoints/iter_*.pt to resume from")
        resume = found[-1]
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        check_compatible(resume, state, cfg.model.backbone, cfg.run.variant, cfg.run.source_only)
        cfg.run.out = cfg.run.out or resume.parent.parent
    out = cfg.run.out or default_out(cfg)
    seed = cfg.run.seed + 1_000 * ctx.rank
    cuda = ctx.device.type == "cuda"
    amp = cfg.run.amp and cuda
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # ---- data
    dcfg = load_config(cfg.data.datasets)
    batches = PairedBatches(dcfg, cfg.data, cfg.rcs, cfg.run.batch, seed, with_target=not cfg.run.source_only)
    test = NightTest(dcfg, cfg.data, limit=cfg.run.eval_max) if ctx.main else None

    # ---- models (same initial weights on every rank and in every run with this seed)
    mit_path, gan_path = resolve_weights(cfg, say)
    torch.manual_seed(cfg.run.seed)
    model = CMDAModel(cfg.model.backbone, num_classes=cfg.model.num_classes, drop_path=cfg.model.drop_path,
                      fusion_drop_path=cfg.model.fusion_drop_path, checkpoint=cfg.model.checkpoint,
                      head_channels=cfg.model.head_channels)
    if mit_path is not None:
        model.load_pretrained(mit_path)
    imnet = None
    if cfg.dacs.fd_lambda > 0:
        if mit_path is None:
            raise InputError(None, "the ImageNet feature distance (dacs.fd_lambda > 0) needs --pretrained weights")
        imnet = copy.deepcopy(model.backbone_image).eval().requires_grad_(False).to(ctx.device)
    if cfg.model.init and state is None:  # after the ImageNet copy: the feature distance keeps ImageNet
        from train.cmda_checkpoint import init_weights

        load_model_state(model, init_weights(cfg.model.init, cfg.model.backbone, cfg.model.num_classes,
                                             cfg.model.head_channels, say), Path(cfg.model.init))
        say(f"student initialised from {cfg.model.init} (teacher = a copy, fresh optimiser)")
    model.to(ctx.device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None if cfg.run.source_only else copy.deepcopy(model).requires_grad_(False)
    gan = load_cyclegan(gan_path, ctx.device) if gan_path is not None else None
    opt = torch.optim.AdamW(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=cuda)
    for g in opt.param_groups:  # head x10 (the model tags groups with lr_mult 1 or 10)
        g["lr_mult"] = cfg.optim.head_lr_mult if g.get("lr_mult", 1) > 1 else 1.0

    start = 0
    if state is not None:
        if state.get("optimizer") is None:
            raise InputError(resume, "holds no optimiser state (a converted or imported checkpoint): start from it "
                             "with --init instead of --resume")
        load_model_state(model, state["student"], resume)
        if teacher is not None:
            load_model_state(teacher, state["teacher"], resume)
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        restore_rng(state)
        say(f"resumed from {resume} at iteration {start}")
    fwd: torch.nn.Module = model
    if cfg.run.compile:
        fwd = torch.compile(model)
    if ctx.world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[ctx.local_rank] if cuda else None)

    # ---- outputs
    ckpt_dir = out / "checkpoints"
    log_path = out / "metrics.jsonl"
    writer = None
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
        if log_path.exists():  # drop lines from beyond the checkpoint of an interrupted run
            keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["iter"] <= start]
            write_text(log_path, "".join(k + "\n" for k in keep))
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
    last_ckpt: Path | None = resume

    def checkpoint(it: int) -> None:
        nonlocal last_ckpt
        if ctx.main:
            last_ckpt = save_checkpoint(ckpt_dir / f"iter_{it:06d}.pt", iteration=it, student=model,
                                        teacher=teacher, optimizer=opt, config=to_dict(cfg))

    def log(record: dict[str, Any]) -> None:
        if not ctx.main:
            return
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, int | float):
                    writer.add_scalar(k, v, record["iter"])

    def run_eval(it: int) -> dict[str, Any] | None:
        if not ctx.main or test is None:
            return None
        res = evaluate(model, test, ctx.device, ("fusion",), amp, progress=False, scale=cfg.data.test_scale)["fusion"]
        log({"iter": it, "eval/mIoU": res["mIoU"], "eval/mIoU19": res["mIoU19"]})
        say(f"iteration {it}: night mIoU {100 * res['mIoU']:.2f} ({res['n_classes']} classes, fusion output)")
        return res

    loader = DataLoader(batches, batch_size=None, sampler=range(start, cfg.run.iters),
                        num_workers=cfg.data.workers, pin_memory=cuda, worker_init_fn=_ignore_sigint,
                        prefetch_factor=2 if cfg.data.workers else None)
    model.train()
    say(f"training {'source-only' if cfg.run.source_only else cfg.run.variant} on {ctx.device} "
        f"({cfg.model.backbone}, {cfg.run.iters} iterations, batch {cfg.run.batch}+"
        f"{0 if cfg.run.source_only else cfg.run.batch}, crop {cfg.data.crop}) -> {out}")
    bar = tqdm(total=cfg.run.iters, initial=start, desc="train", unit="it", dynamic_ncols=True, disable=not ctx.main)
    result: dict[str, Any] = {"out": str(out)}
    it = start
    t_last, it_last = time.perf_counter(), start
    try:
        with StopFlag() as stop:
            for it, batch in zip(range(start, cfg.run.iters), loader, strict=False):
                torch.manual_seed(seed * 1_000_003 + it)
                lr = learning_rate(it, cfg.run.iters, cfg.optim)
                set_learning_rate(opt, lr)
                if teacher is not None and it > 0:
                    ema_update(teacher, model, ema_alpha(it, cfg.dacs.ema_alpha))
                try:
                    terms, extra = _step(cfg, batch, ctx, fwd, teacher, gan, imnet, amp, ic1_to_events)
                except torch.OutOfMemoryError:
                    raise InputError(out, f"CUDA out of memory at iteration {it + 1} (backbone {cfg.model.backbone}, "
                                     f"batch {cfg.run.batch}, crop {cfg.data.crop}): lower --batch or --crop, "
                                     "add --set model.checkpoint=true, or use a smaller --backbone") from None
                _finite_or_raise(terms, it, out, last_ckpt)
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = it + 1
                bar.update(1)
                if done % cfg.run.log_every == 0 or done == cfg.run.iters or done == start + 1:
                    now = time.perf_counter()
                    total = float(sum(v.detach().float() for v in terms.values()))
                    record = {"iter": done, "lr": lr, "loss/total": total,
                              **{f"loss/{k}": float(v.detach().float()) for k, v in terms.items()}, **extra,
                              "time/iter_s": (now - t_last) / (done - it_last)}
                    if cuda:
                        record["mem/peak_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                    t_last, it_last = now, done
                    log(record)
                    bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
                if done % cfg.run.ckpt_every == 0 or done == cfg.run.iters:
                    checkpoint(done)
                if done % cfg.run.eval_every == 0 or done == cfg.run.iters:
                    result["eval"] = run_eval(done)
                if stop.requested:
                    if done % cfg.run.ckpt_every and done != cfg.run.iters:
                        checkpoint(done)
                    say(f"stopped at iteration {done}; resume with --resume {last_ckpt}")
                    result["stopped"] = done
                    break
    except KeyboardInterrupt:  # second Ctrl-C mid-iteration: the last completed iteration is consistent
        if it > start:
            checkpoint(it)
        say(f"aborted; resume with --resume {last_ckpt}")
        result["stopped"] = it
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if ctx.main and log_path.exists():
        from train.visualize import loss_curve_png

        loss_curve_png(log_path, out / "loss_curve.png")
    result["checkpoint"] = str(last_ckpt) if last_ckpt else None
    return result


def _directions(n: int) -> list[str]:
    # CMDA derives the ISR shift direction from crop/jitter parities; we draw it at random per sample.
    return [DIRECTIONS[int(i)] for i in torch.randint(len(DIRECTIONS), (n,))]


def _step(cfg: TrainConfig, batch: dict[str, torch.Tensor], ctx: Context, fwd: torch.nn.Module,
          teacher: torch.nn.Module | None, gan: torch.nn.Module | None, imnet: torch.nn.Module | None, amp: bool,
          ic1_to_events) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One DACS iteration's forward/backward passes; returns the loss terms (already backpropagated)."""
    dev = ctx.device
    mem = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    raw = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    b = raw["source_image"].shape[0]
    with torch.no_grad():  # ISR from the exact uint8 images (CMDA computes it from the PIL image)
        src_isr = image_content(raw["source_image"], ISR_DAY, _directions(b)).contiguous(memory_format=mem)
        tgt_isr = (image_content(raw["target_image"], ISR_NIGHT, _directions(b)).contiguous(memory_format=mem)
                   if "target_image" in raw else None)
    batch = network_batch(raw, dev, mem)
    src_img, src_lbl, src_ic1 = batch["source_image"], batch["source_label"], batch["source_ic1"]
    with torch.no_grad():
        src_evt = ic1_to_events(gan, src_ic1) if gan is not None else src_ic1

    # 1. source pass
    with autocast(dev, amp):
        out = fwd(image=src_img, events=src_evt, isr=src_isr)
    terms = segmentation_terms(out.logits, src_lbl, cfg.loss, prefix="src/")
    terms.update(source_feature_terms(out.features, cfg.loss))
    if imnet is not None:
        with torch.no_grad(), autocast(dev, amp):
            feat_imnet = imnet(src_img)[-1]
        terms["src/fd"] = cfg.dacs.fd_lambda * feature_distance(
            out.features["image"][-1], feat_imnet, src_lbl, cfg.dacs.fd_classes, cfg.dacs.fd_scale_min_ratio)
    sum(terms.values()).backward()
    keep = {k: out.features[k][-1].detach() for k in needed_source_features(cfg.loss)}
    del out
    if teacher is None:
        return terms, {}

    # 2. pseudo-labels from the EMA teacher
    tgt_img, tgt_evt = batch["target_image"], batch["target_events"]
    with torch.no_grad():
        _teacher_mode(teacher)
        use_events = bool(torch.rand(()) < cfg.dacs.teacher_events_p)
        with autocast(dev, amp):
            t_out = teacher(image=tgt_img, events=tgt_evt if use_events else None,
                            isr=None if use_events else tgt_isr, fuse_with="events" if use_events else "isr",
                            outputs=("fusion",))
        pseudo, pseudo_w = pseudo_labels(t_out.logits["fusion"], tgt_img.shape[-2:], cfg.dacs.pseudo_threshold)

        # 3. ClassMix + strong augmentation of the mixed image; ISR recomputed from it
        mask = class_masks(src_lbl)
        mixed_img = mix(mask, src_img, tgt_img)
        mixed_img = color_jitter(mixed_img, cfg.dacs.jitter_p, cfg.dacs.jitter)
        mixed_img = gaussian_blur(mixed_img, cfg.dacs.blur_p, cfg.dacs.blur_sigma).contiguous(memory_format=mem)
        mixed_evt = mix(mask, src_evt, tgt_evt)
        if cfg.loss.mask_events > 0:
            mixed_evt = mixed_evt * block_mask(mixed_evt.shape, cfg.loss.mask_events, cfg.loss.mask_block, dev)
        mixed_evt = mixed_evt.contiguous(memory_format=mem)
        mixed_lbl = mix(mask, src_lbl, pseudo)
        mixed_w = mix(mask, torch.ones_like(pseudo_w), pseudo_w)
        mixed_isr = isr_from_normalized(mixed_img, ISR_NIGHT, _directions(b)).contiguous(memory_format=mem)

    # 4. mixed pass
    with autocast(dev, amp):
        m_out = fwd(image=mixed_img, events=mixed_evt, isr=mixed_isr)
    mix_terms = segmentation_terms(m_out.logits, mixed_lbl, cfg.loss, mixed_w, prefix="mix/")
    mix_terms.update(target_feature_terms(m_out.features, keep, cfg.loss))
    sum(mix_terms.values()).backward()
    terms.update(mix_terms)
    extra = {"pseudo/weight": float(pseudo_w.mean()), "pseudo/teacher_events": float(use_events)}
    return terms, extra

