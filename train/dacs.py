"""The DACS self-training loop for CMDA (FACTS §8).

:func:`train` builds a run (:func:`build`, :func:`restore`, :class:`RunFolder`) and hands it to
:func:`loop`, which runs the iterations; one iteration is :func:`iteration` (seed, lr, EMA,
optimiser step) around :func:`_step`'s named passes, top to bottom:
  1. EMA teacher update (a copy at iteration 0, then ``alpha = min(1 - 1/(it+1), 0.999)``).
  2. Source pass: day image + source "events" (CycleGAN(IC1), or IC1 itself without the
     generator) + day ISR -> four-output segmentation loss (+ source-side L2 term) -> backward.
  3. Teacher on the night image with, at random, the night events or the night ISR -> pseudo-labels
     and one confidence weight for the batch.
  4. ClassMix: half the classes of the source batch pasted onto the target; the mixed image gets
     colour jitter and blur, events are mixed only, the mixed ISR is recomputed from the mixed image.
  5. Mixed pass with pseudo weights (+ target-side L2 terms) -> backward -> optimiser step.
The peer components (DSRNSS ``dsr``, DIDA ``dida``, the discriminator ``adv``; train/peers.py) add one
call per step above through a :class:`train.peers.PeerStep`; with all three off they do nothing.

Image-only night targets (``data.target`` darkzurich / acdc, CMDA's cs2dz model) run the same passes;
only the second encoder's input differs, and :func:`_inputs` / :func:`_mix` say so in one call each
(:func:`train.night_data` builds it): the source pass gets the day ISR, the teacher the night ISR, the
mixed pass the ISR recomputed from the mixed image, each as the "events" input; there is no separate
ISR branch and no CycleGAN.

Randomness is re-seeded from (seed, rank, iteration) at the start of every iteration and batches
come from :class:`train.data.PairedBatches` by iteration number, so ``--resume`` reproduces the
uninterrupted run. Everything a run writes goes under its output folder; rank 0 writes.

Signals: the first Ctrl-C / SIGTERM stops after the iteration with a checkpoint, a second aborts
and checkpoints only a consistent state (:class:`StopFlag`); loader workers ignore both, so a
signal to the whole process group behaves like one to the trainer. Process-wide torch flags
(TF32, cudnn.benchmark) are set from the settings for the run and restored after it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import os
import signal
import time
from collections.abc import Iterator
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
from train.adaptive_threshold import AdaptiveThreshold
from train.checkpoint import (
    check_compatible,
    clean_stale_temps,
    find_checkpoint,
    load_checkpoint,
    load_model_state,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from train.config import TrainConfig, differences, image_only, to_dict, validate
from train.data import NightTest, PairedBatches, network_batch
from train.evaluate import evaluate
from train.inference import autocast, resolve_device
from train.isr import ISR_DAY, ISR_NIGHT, image_content, isr_from_normalized, random_directions
from train.losses import (
    ignore_rows,
    needed_source_features,
    pseudo_labels,
    segmentation_terms,
    source_feature_terms,
    target_feature_terms,
)
from train.mic import MaskedBatch, masked_inputs, mic_terms
from train.mixing import block_mask, color_jitter, gaussian_blur, mix
from train.night_data import ISR_DIRECTION, mixed_isr
from train.peers import Peers, PeerStep
from train.schedule import ema_alpha, ema_update, learning_rate, set_learning_rate

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
    dev = resolve_device(device, local_rank=local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Under torchrun even one process joins a process group (and trains through DDP), so a
    # `--nproc_per_node 1` run exercises NCCL exactly as a multi-GPU one does.
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not tdist.is_initialized():
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
    if image_only(cfg):  # no events on either side: the source's second input is the day ISR
        return mit, None
    gan = _weight_file(cfg.model.cyclegan, DEFAULT_CYCLEGAN, "CycleGAN weights",
                       "IC1 is used directly as the source events", say)
    return mit, gan


class StopFlag:
    """Signals and the run's consistency, in one place.

    The first Ctrl-C / SIGTERM asks the loop to stop after the current iteration (checkpoint, exit).
    A second one aborts at once (KeyboardInterrupt). The loop marks where its state is one
    consistent whole (student, optimiser, EMA teacher and iteration count all "after iteration N"):
    :meth:`changing` before the EMA update, :meth:`consistent` after the optimiser step. An abort
    may checkpoint only a consistent state, so a signal landing inside the optimiser step can never
    save an optimiser one step ahead of its iteration number.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.at: int | None = None  # iteration the state is consistent after; None while changing
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def changing(self) -> None:
        self.at = None

    def consistent(self, iteration: int) -> None:
        self.at = iteration

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"received {signal.Signals(signum).name}: stopping after this iteration (again to abort)")

    def ignore(self) -> None:
        """No more signals (while the last checkpoint is written after an abort)."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM while loader workers start: a forked worker inherits the mask, so a
    signal sent to the whole process group (timeout, Slurm, systemd) cannot kill it before
    :func:`_worker_init` ignores the signals; the main process gets the pending signal on unblock."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which checkpoints and then shuts
    them down; a worker killed by a process-group signal would end the run with a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@dataclass(frozen=True)
class WorkerFailure:
    """An InputError/OSError raised inside a loader worker, carried back as data: the DataLoader
    would re-raise it as ``RuntimeError: Caught InputError in DataLoader worker`` (a traceback)."""

    path: str | None
    problem: str


class ReportingBatches(torch.utils.data.Dataset):
    """:class:`PairedBatches` whose input errors come back as :class:`WorkerFailure` items."""

    def __init__(self, batches: PairedBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, it: int) -> dict[str, torch.Tensor] | WorkerFailure:
        try:
            return self.batches[it]
        except InputError as exc:
            return WorkerFailure(None if exc.path is None else str(exc.path), exc.problem)
        except OSError as exc:
            return WorkerFailure(exc.filename and str(exc.filename), exc.strerror or str(exc))


def _checked(batch: dict[str, torch.Tensor] | WorkerFailure) -> dict[str, torch.Tensor]:
    if isinstance(batch, WorkerFailure):
        raise InputError(batch.path, batch.problem)
    return batch


@contextlib.contextmanager
def backend_flags(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """TF32 matmuls and cudnn.benchmark are process-wide torch state: set them from the settings for
    the run on CUDA, and put the previous values back when it ends (a caller's own choice survives)."""
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cudnn, "benchmark")
    old = [getattr(o, n) for o, n in flags]
    torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    try:
        yield
    finally:
        for (o, n), v in zip(flags, old, strict=True):
            setattr(o, n, v)


def best_eval(log_path: Path) -> tuple[float, int] | None:
    """(night mIoU, iteration) of the best evaluation logged so far (a resumed run's log has already
    been cut back to its checkpoint), or None."""
    if not log_path.exists():
        return None
    evals = [(r["eval/mIoU"], r["iter"]) for r in map(json.loads, filter(None, log_path.read_text().splitlines()))
             if "eval/mIoU" in r]
    return max(evals, key=lambda e: e[0]) if evals else None



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


# ---------------------------------------------------------------------- building a run
@dataclass
class Parts:
    """What one run trains with: the batches, the networks, the optimiser."""

    batches: PairedBatches
    test: NightTest | None
    model: torch.nn.Module
    fwd: torch.nn.Module  # model, compiled and/or wrapped in DDP
    teacher: torch.nn.Module | None
    gan: torch.nn.Module | None
    imnet: torch.nn.Module | None
    opt: torch.optim.Optimizer
    threshold: AdaptiveThreshold | None = None  # dacs.pseudo_mode=adaptive: running per-class medians
    peers: Peers = field(default_factory=Peers)  # dsr/dida/adv: tail bank, instance bank, discriminator


def night_eval_set(dcfg, cfg: TrainConfig, limit: int = 0) -> torch.utils.data.Dataset:
    """The labelled night frames a run is scored on: DSEC's test frames, or an image-only target's val split."""
    if image_only(cfg):
        from train.night_data import NightTargetEval

        return NightTargetEval(dcfg, cfg.data, "val", limit=limit)
    return NightTest(dcfg, cfg.data, limit=limit)


def build(cfg: TrainConfig, ctx: Context, say, resuming: bool = False) -> Parts:
    """Data, models (same initial weights on every rank and in every run with this seed), optimiser."""
    from train.models import CMDAModel, load_cyclegan

    dcfg = load_config(cfg.data.datasets)
    seed = cfg.run.seed + 1_000 * ctx.rank
    batches = PairedBatches(dcfg, cfg.data, cfg.rcs, cfg.run.batch, seed, with_target=not cfg.run.source_only)
    test = night_eval_set(dcfg, cfg, cfg.run.eval_max) if ctx.main else None
    mit_path, gan_path = resolve_weights(cfg, say)
    torch.manual_seed(cfg.run.seed)
    model = CMDAModel(cfg.model.backbone, num_classes=cfg.model.num_classes, drop_path=cfg.model.drop_path,
                      fusion_drop_path=cfg.model.fusion_drop_path, checkpoint=cfg.model.checkpoint,
                      head_channels=cfg.model.head_channels, fusion=cfg.model.fusion)
    if mit_path is not None:
        model.load_pretrained(mit_path)
    imnet = None
    if cfg.dacs.fd_lambda > 0:
        if mit_path is None:
            raise InputError(None, "the ImageNet feature distance (dacs.fd_lambda > 0) needs --pretrained weights")
        imnet = copy.deepcopy(model.backbone_image).eval().requires_grad_(False).to(ctx.device)
    if cfg.model.init and not resuming:  # after the ImageNet copy: the feature distance keeps ImageNet
        from train.cmda_checkpoint import init_weights

        load_model_state(model, init_weights(cfg.model.init, cfg.model.backbone, cfg.model.num_classes,
                                             cfg.model.head_channels, say, cfg.model.fusion), Path(cfg.model.init))
        say(f"student initialised from {cfg.model.init} (teacher = a copy, fresh optimiser)")
    model.to(ctx.device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None if cfg.run.source_only else copy.deepcopy(model).requires_grad_(False)
    gan = load_cyclegan(gan_path, ctx.device) if gan_path is not None else None
    cuda = ctx.device.type == "cuda"
    opt = torch.optim.AdamW(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=cuda)
    for g in opt.param_groups:  # head x10 (the model tags groups with lr_mult 1 or 10)
        g["lr_mult"] = cfg.optim.head_lr_mult if g.get("lr_mult", 1) > 1 else 1.0
    threshold = (AdaptiveThreshold(cfg.model.num_classes, cfg.dacs.adaptive_cap, device=ctx.device)
                 if cfg.dacs.pseudo_mode == "adaptive" and teacher is not None else None)
    return Parts(batches, test, model, model, teacher, gan, imnet, opt, threshold,
                 Peers.build(cfg, ctx.device))


def restore(parts: Parts, state: dict[str, Any] | None, path: Path | None, say) -> int:
    """Load a checkpoint's weights, optimiser and RNG into ``parts``; returns the iteration to start at."""
    if state is None or path is None:
        return 0
    load_model_state(parts.model, state["student"], path)
    if parts.teacher is not None:
        load_model_state(parts.teacher, state["teacher"], path)
    parts.opt.load_state_dict(state["optimizer"])
    if parts.threshold is not None and state.get("adaptive_threshold") is not None:
        parts.threshold.load_state_dict(state["adaptive_threshold"])
    parts.peers.load_state_dict(state, path, say)
    restore_rng(state)
    say(f"resumed from {path} at iteration {int(state['iteration'])}")
    return int(state["iteration"])


def wrap(parts: Parts, cfg: TrainConfig, ctx: Context) -> None:
    """torch.compile and/or DistributedDataParallel around the student (after its weights are loaded)."""
    if cfg.run.compile:
        parts.fwd = torch.compile(parts.model)
    if tdist.is_initialized():
        cuda = ctx.device.type == "cuda"
        parts.fwd = torch.nn.parallel.DistributedDataParallel(parts.fwd, device_ids=[ctx.local_rank] if cuda else None)


def check_resume(cfg: TrainConfig, path: Path, state: dict[str, Any], override: bool) -> dict[str, list[Any]]:
    """The differences between ``cfg`` and the checkpoint's own settings: an error unless ``override``.

    A resume continues the run as it was; a changed seed, lr, length or loss weight would silently
    make it another run. Machine settings (device, workers, output folder) may differ.
    """
    if state.get("optimizer") is None:
        raise InputError(path, "holds no optimiser state (a converted or imported checkpoint): start from it "
                         "with --init instead of --resume")
    changes = differences(state.get("config") or {}, to_dict(cfg))
    if changes and not override:
        listed = "; ".join(f"{k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in changes.items())
        raise InputError(path, f"settings differ from the run's ({listed}); leave them out to continue the run "
                         "as it was, or pass --resume-override to change them")
    check_compatible(path, state, cfg.model.backbone, cfg.run.variant, cfg.run.source_only)
    return changes


def truncate_log(path: Path, start: int) -> None:
    """Keep metrics.jsonl's records up to iteration ``start`` (the checkpoint resumed from).

    A torn LAST line (a kill or a full disk while appending) is dropped; a broken line elsewhere is
    an InputError naming it, since it is not what the trainer writes.
    """
    if not path.exists():
        return
    from train.visualize import read_metrics_jsonl  # the one reader of the log (torn last line dropped)

    records = read_metrics_jsonl(path)
    for rec in records:
        if not isinstance(rec["iter"], int):
            raise InputError(path, f"a record has a non-integer 'iter': {rec['iter']!r}")
    keep = [json.dumps(rec) for rec in records if rec["iter"] <= start]
    write_text(path, "".join(k + "\n" for k in keep))


class RunFolder:
    """The run's files (rank 0 writes): config.json, metrics.jsonl, TensorBoard, checkpoints."""

    def __init__(self, out: Path, ctx: Context) -> None:
        self.out, self.main = out, ctx.main
        self.ckpt_dir = out / "checkpoints"
        self.log_path = out / "metrics.jsonl"
        self.writer = None

    def open(self, cfg: TrainConfig, start: int, saved: dict[str, Any] | None, changes: dict[str, list[Any]],
             say) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for p in clean_stale_temps(self.ckpt_dir):
            say(f"removed {p.name}: left by a checkpoint write that never finished")
        config = to_dict(cfg)
        old = self.out / "config.json"
        history = []
        if old.exists():
            with contextlib.suppress(ValueError, AttributeError):
                history = list(json.loads(old.read_text()).get("history", []))
        if changes and saved is not None:  # --resume-override: config.json keeps what the run had before
            history.append({"iter": start, "config": {k: v for k, v in saved.items() if k != "history"},
                            "changes": changes})
        if history:
            config["history"] = history
        write_text(old, json.dumps(config, indent=2))
        truncate_log(self.log_path, start)
        if changes:
            self.log({"iter": start, "resume_override": changes})
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start or None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, int | float):
                    self.writer.add_scalar(k, v, record["iter"])

    def checkpoint(self, it: int, parts: Parts, cfg: TrainConfig) -> Path | None:
        if not self.main:
            return None
        extra = {"adaptive_threshold": parts.threshold.state_dict()} if parts.threshold is not None else {}
        extra.update(parts.peers.state_dict())
        path = save_checkpoint(self.ckpt_dir / f"iter_{it:06d}.pt", iteration=it, student=parts.model,
                               teacher=parts.teacher, optimizer=parts.opt, config=to_dict(cfg), extra=extra)
        prune_checkpoints(self.ckpt_dir, cfg.run.keep_ckpts)
        return path

    def save_best(self, it: int, parts: Parts, cfg: TrainConfig, miou: float) -> None:
        """checkpoints/best.pt: the weights of the best night evaluation so far (no optimiser: not for resuming)."""
        if self.main:
            save_checkpoint(self.ckpt_dir / "best.pt", iteration=it, student=parts.model, teacher=parts.teacher,
                            optimizer=None, config=to_dict(cfg), extra={"best": {"eval/mIoU": miou, "iter": it}})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.main and self.log_path.exists():
            from train.visualize import loss_curve_png

            loss_curve_png(self.log_path, self.out / "loss_curve.png")


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: Path | None = None, override: bool = False) -> dict[str, Any]:
    """Train (or continue, from a checkpoint file or run folder) with ``cfg``; see the module docstring.

    With ``resume``, every setting but device, workers and output folder must equal the
    checkpoint's, unless ``override`` (then the changes are logged and kept in config.json).
    """
    validate(cfg)
    ctx = setup_context(cfg.run.device)
    say = tqdm.write if ctx.main else (lambda *_: None)
    path = find_checkpoint(resume) if resume is not None else None
    state = load_checkpoint(path) if path is not None else None
    changes: dict[str, list[Any]] = {}
    if state is not None and path is not None:
        changes = check_resume(cfg, path, state, override)
        cfg.run.out = cfg.run.out or path.parent.parent
    out = Path(cfg.run.out or default_out(cfg))
    cfg.run.out, cfg.run.device = out, str(ctx.device)  # config.json and checkpoints show resolved values
    with backend_flags(cfg, ctx.device):
        parts = build(cfg, ctx, say, resuming=state is not None)
        start = restore(parts, state, path, say)
        wrap(parts, cfg, ctx)
        run = RunFolder(out, ctx)
        run.open(cfg, start, state.get("config") if state else None, changes, say)
        try:
            result = loop(cfg, ctx, parts, run, start, path, say)
        finally:
            run.close()
    return result


def iteration(cfg: TrainConfig, ctx: Context, parts: Parts, batch: dict[str, torch.Tensor], it: int, seed: int,
              out: Path, last_ckpt: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One training iteration: seed, lr, EMA teacher, the passes (:func:`_step`), checks, optimiser step."""
    from train.models import ic1_to_events

    torch.manual_seed(seed * 1_000_003 + it)
    lr = learning_rate(it, cfg.run.iters, cfg.optim)
    set_learning_rate(parts.opt, lr)
    if parts.teacher is not None and it > 0:
        ema_update(parts.teacher, parts.model, ema_alpha(it, cfg.dacs.ema_alpha))
    try:
        terms, extra = _step(cfg, batch, ctx, parts.fwd, parts.teacher, parts.gan, parts.imnet,
                             ctx.device.type == "cuda" and cfg.run.amp, ic1_to_events, parts.threshold,
                             parts.peers, it)
    except torch.OutOfMemoryError:
        raise InputError(out, f"CUDA out of memory at iteration {it + 1} (backbone {cfg.model.backbone}, "
                         f"batch {cfg.run.batch}, crop {cfg.data.crop}): lower --batch or --crop, "
                         "add --set model.checkpoint=true, or use a smaller --backbone") from None
    _finite_or_raise(terms, it, out, last_ckpt)
    parts.opt.step()
    parts.opt.zero_grad(set_to_none=True)
    return terms, {"lr": lr, **extra}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (one tiny all-reduce): ranks that stopped at
    different iterations would wait on each other's gradients forever."""
    t = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def metrics_record(done: int, terms: dict[str, torch.Tensor], extra: dict[str, float], seconds_per_iter: float,
                   device: torch.device) -> dict[str, Any]:
    """One metrics.jsonl line: lr, total and per-term losses, pseudo-label stats, s/iter, peak GPU memory."""
    record = {"iter": done, "lr": extra["lr"], "loss/total": float(sum(v.detach().float() for v in terms.values())),
              **{f"loss/{k}": float(v.detach().float()) for k, v in terms.items()},
              **{k: v for k, v in extra.items() if k != "lr"}, "time/iter_s": seconds_per_iter}
    if device.type == "cuda":
        record["mem/peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def loop(cfg: TrainConfig, ctx: Context, parts: Parts, run: RunFolder, start: int, resumed: Path | None,
         say) -> dict[str, Any]:
    """Iterations ``start`` .. ``run.iters``, logging, checkpoints, evaluation, stop and abort."""
    cuda = ctx.device.type == "cuda"
    amp = cfg.run.amp and cuda
    seed = cfg.run.seed + 1_000 * ctx.rank
    loader = DataLoader(ReportingBatches(parts.batches), batch_size=None, sampler=range(start, cfg.run.iters),
                        num_workers=cfg.data.workers, pin_memory=cuda, worker_init_fn=_worker_init,
                        prefetch_factor=2 if cfg.data.workers else None)
    parts.model.train()
    say(f"training {'source-only' if cfg.run.source_only else cfg.run.variant} on {ctx.device} "
        f"({cfg.model.backbone}, {cfg.run.iters} iterations, batch {cfg.run.batch}+"
        f"{0 if cfg.run.source_only else cfg.run.batch}, crop {cfg.data.crop}) -> {run.out}")
    bar = tqdm(total=cfg.run.iters, initial=start, desc="train", unit="it", dynamic_ncols=True, disable=not ctx.main)
    result: dict[str, Any] = {"out": str(run.out)}
    last_ckpt, saved_at = resumed, start
    t_last, it_last = time.perf_counter(), start

    def checkpoint(done: int) -> None:
        nonlocal last_ckpt, saved_at
        last_ckpt, saved_at = run.checkpoint(done, parts, cfg) or last_ckpt, done

    best = best_eval(run.log_path) if ctx.main else None  # (mIoU, iteration) of checkpoints/best.pt

    def run_eval(done: int) -> dict[str, Any] | None:
        nonlocal best
        if parts.test is None:
            return None
        res = evaluate(parts.model, parts.test, ctx.device, ("fusion",), amp, progress=False,
                       scale=cfg.data.test_scale)["fusion"]
        if best is None or res["mIoU"] > best[0]:  # the best night score so far: checkpoints/best.pt
            best = (res["mIoU"], done)
            run.save_best(done, parts, cfg, res["mIoU"])
        run.log({"iter": done, "eval/mIoU": res["mIoU"], "eval/mIoU19": res["mIoU19"], "eval/best_mIoU": best[0],
                 "eval/best_iter": best[1]})
        say(f"iteration {done}: night mIoU {100 * res['mIoU']:.2f} ({res['n_classes']} classes, fusion output); "
            f"best {100 * best[0]:.2f} at iteration {best[1]} (checkpoints/best.pt)")
        return res

    with StopFlag() as stop:
        stop.consistent(start)
        try:
            with signals_blocked():
                batches = iter(loader)
            for it, batch in zip(range(start, cfg.run.iters), batches, strict=False):
                stop.changing()
                terms, extra = iteration(cfg, ctx, parts, _checked(batch), it, seed, run.out, last_ckpt)
                done = it + 1
                stop.consistent(done)
                if ctx.world > 1:  # a signal to one rank stops every rank after the same iteration
                    stop.requested = _any_rank(stop.requested, ctx.device)
                bar.update(1)
                if done % cfg.run.log_every == 0 or done == cfg.run.iters or done == start + 1:
                    now = time.perf_counter()
                    record = metrics_record(done, terms, extra, (now - t_last) / (done - it_last), ctx.device)
                    t_last, it_last = now, done
                    run.log(record)
                    bar.set_postfix(loss=f"{record['loss/total']:.3f}", lr=f"{record['lr']:.2e}")
                if done % cfg.run.ckpt_every == 0 or done == cfg.run.iters:
                    checkpoint(done)
                if done % cfg.run.eval_every == 0 or done == cfg.run.iters:
                    result["eval"] = run_eval(done)
                if stop.requested:
                    if saved_at != done:
                        checkpoint(done)
                    say(f"stopped at iteration {done}; resume with --resume {last_ckpt}")
                    result["stopped"] = done
                    break
        except KeyboardInterrupt:  # second signal: keep only a consistent state (see StopFlag)
            stop.ignore()
            if stop.at is not None and stop.at > saved_at:
                checkpoint(stop.at)
            say(f"aborted; resume with --resume {last_ckpt}")
            result["stopped"] = stop.at if stop.at is not None else saved_at
        finally:
            bar.close()
    result["checkpoint"] = str(last_ckpt) if last_ckpt else None
    return result


def _step(cfg: TrainConfig, batch: dict[str, torch.Tensor], ctx: Context, fwd: torch.nn.Module,
          teacher: torch.nn.Module | None, gan: torch.nn.Module | None, imnet: torch.nn.Module | None, amp: bool,
          ic1_to_events, threshold: AdaptiveThreshold | None = None, peers: Peers | None = None, it: int = 0
          ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One DACS iteration's forward/backward passes; returns the loss terms (already backpropagated).

    Everything random about the iteration is drawn on the full batch first (ISR directions, the
    teacher's pseudo-labels, ClassMix, augmentation, the MIC mask), then the passes run over
    ``run.accum`` micro-batches with losses scaled by 1/accum: the gradient of the summed terms is the
    full batch's (every loss is a mean over equally sized micro-batches), and so are the logged terms.
    The peer components (``peers``, train/peers.py) hook into the passes through one :class:`PeerStep`.
    """
    mem = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    inputs = _inputs(batch, ctx.device, mem, gan, ic1_to_events, image_only(cfg))
    extra: dict[str, float] = {}
    mixed = masked = pseudo = pseudo_w = None
    peer = PeerStep(cfg, peers or Peers(), it)  # DSRNSS / DIDA / discriminator: nothing when all are off
    if teacher is not None:
        pseudo, pseudo_w, use_events, t_out = _pseudo_labels(cfg, inputs, teacher, amp, threshold,
                                                              peer.embeddings)  # 2. pseudo-labels
        peer.teacher(t_out, pseudo)  # teacher features / embedding for DSRNSS prototypes and DIDA
        peer.push_tail(inputs)  # DSRNSS tail-class bank
        mixed = _mix(cfg, inputs, pseudo, pseudo_w, mem, peer)  # 3. ClassMix + strong augmentation
        if cfg.mic.enabled:  # 5. MIC inputs: the target batch, augmented and block-masked
            masked = masked_inputs(inputs["target_image"], inputs["target_events"], cfg.mic,
                                   random_directions(pseudo.shape[0]), lambda im: _augment(cfg, im))
            if image_only(cfg):  # the second encoder sees the masked image's ISR
                masked = image_only_masked(masked, mem)
        extra = {"pseudo/weight": float(pseudo_w.mean()), "pseudo/teacher_events": float(use_events)}
    terms: dict[str, torch.Tensor] = {}
    scale = 1.0 / cfg.run.accum
    for part in micro_batches(inputs["source_image"].shape[0], cfg.run.accum):
        t, keep = _source_pass(cfg, take(inputs, part), fwd, imnet, amp, scale, peer, part)  # 1. source pass
        if mixed is not None:
            t.update(_mixed_pass(cfg, take(mixed, part), keep, fwd, amp, scale, peer, part))  # 4. mixed pass
        if peer.target_pass:  # adv.input=target: the student on the target image for the discriminator
            t.update(peer.target(fwd, take(inputs, part), amp, scale))
        if masked is not None:  # 5. MIC pass, own backward
            mic = mic_terms(fwd, masked.take(part), pseudo[part], pseudo_w[part], cfg.loss, cfg.mic, amp, scale)
            t.update(mic)
        for k, v in t.items():
            terms[k] = terms[k] + v if k in terms else v
    extra.update(peer.finish())  # DIDA bank update and discriminator step on the whole batch
    return terms, extra


def micro_batches(b: int, accum: int) -> list[slice]:
    """``accum`` equal, consecutive slices of a batch of ``b`` (validate() checks accum divides b)."""
    size = b // accum
    return [slice(i * size, (i + 1) * size) for i in range(accum)]


def take(x: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    return {k: v[part] for k, v in x.items()}


def _inputs(batch: dict[str, torch.Tensor], dev: torch.device, mem: torch.memory_format,
            gan: torch.nn.Module | None, ic1_to_events, image_only_target: bool = False) -> dict[str, torch.Tensor]:
    """Network inputs on the device: normalised images, ISR of both domains, source "events".

    ``image_only_target``: CMDA's cs2dz inputs instead (:func:`image_only_inputs`).
    """
    raw = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    b = raw["source_image"].shape[0]
    out = network_batch(raw, dev, mem)
    if image_only_target:
        return image_only_inputs(raw, out, mem)
    with torch.no_grad():  # ISR from the exact uint8 images (CMDA computes it from the PIL image)
        out["source_isr"] = image_content(raw["source_image"], ISR_DAY,
                                          random_directions(b)).contiguous(memory_format=mem)
        if "target_image" in raw:
            out["target_isr"] = image_content(raw["target_image"], ISR_NIGHT,
                                              random_directions(b)).contiguous(memory_format=mem)
        out["source_events"] = ic1_to_events(gan, out["source_ic1"]) if gan is not None else out["source_ic1"]
    return out


@torch.no_grad()
def image_only_inputs(raw: dict[str, torch.Tensor], out: dict[str, torch.Tensor], mem: torch.memory_format
                      ) -> dict[str, torch.Tensor]:
    """Second-encoder inputs of an image-only target, as CMDA's cs2dz model gets them: the source's
    "events" are the day image's ISR (day parameters, rightdown, on the final crop), the target's are the
    night ISR the loader cut from the whole resized image (already in ``out``); no separate ISR inputs."""
    out.pop("source_ic1", None)
    out["source_events"] = image_content(raw["source_image"], ISR_DAY, ISR_DIRECTION).contiguous(memory_format=mem)
    return out


def image_only_masked(masked: MaskedBatch, mem: torch.memory_format) -> MaskedBatch:
    """MIC's batch for an image-only target: the ISR of the masked image is the second input (mic.events
    does not apply), and there is no separate ISR branch."""
    return MaskedBatch(masked.image, mixed_isr(masked.image).contiguous(memory_format=mem), None,
                       masked.image_mask, None)


def _source_pass(cfg: TrainConfig, x: dict[str, torch.Tensor], fwd: torch.nn.Module, imnet: torch.nn.Module | None,
                 amp: bool, scale: float = 1.0, peer: PeerStep | None = None, part: slice = slice(None)
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Day image + source events + day ISR -> segmentation (+ source L2, + feature distance) -> backward.

    Returns the terms and the detached deepest source features the target-side L2 terms need.
    """
    dev = x["source_image"].device
    with autocast(dev, amp):
        out = fwd(image=x["source_image"], events=x["source_events"], isr=x.get("source_isr"),
                  embeddings=peer.embeddings if peer else ())
    terms = segmentation_terms(out.logits, x["source_label"], cfg.loss, prefix="src/")
    terms.update(source_feature_terms(out.features, cfg.loss))
    if imnet is not None:
        with torch.no_grad(), autocast(dev, amp):
            feat_imnet = imnet(x["source_image"])[-1]
        terms["src/fd"] = cfg.dacs.fd_lambda * feature_distance(
            out.features["image"][-1], feat_imnet, x["source_label"], cfg.dacs.fd_classes, cfg.dacs.fd_scale_min_ratio)
    if peer is not None:
        terms.update(peer.source(out, x, part))  # DSRNSS source/target prototypes
    terms = {k: v * scale for k, v in terms.items()}
    sum(terms.values()).backward()
    return terms, {k: out.features[k][-1].detach() for k in needed_source_features(cfg.loss)}


@torch.no_grad()
def _pseudo_labels(cfg: TrainConfig, x: dict[str, torch.Tensor], teacher: torch.nn.Module, amp: bool,
                   threshold: AdaptiveThreshold | None = None, embeddings: tuple[str, ...] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor, bool, Any]:
    """EMA teacher on the night image fused, at random, with the night events or the night ISR.

    ``threshold`` (``dacs.pseudo_mode=adaptive``): per-class thresholds instead of DACS's share rule.
    Also returns the teacher's output (its features and ``embeddings`` serve the peer components).
    """
    _teacher_mode(teacher)
    # an image-only target has no separate ISR: its "events" are the night ISR, the teacher's only choice
    use_events = bool(torch.rand(()) < cfg.dacs.teacher_events_p) or "target_isr" not in x
    img = x["target_image"]
    with autocast(img.device, amp):
        t_out = teacher(image=img, events=x["target_events"] if use_events else None,
                        isr=None if use_events else x["target_isr"], fuse_with="events" if use_events else "isr",
                        outputs=("fusion",), embeddings=embeddings)
    if threshold is not None:
        pseudo, weight = threshold.pseudo_labels(t_out.logits["fusion"], img.shape[-2:])
        weight = ignore_rows(weight, cfg.dacs.pseudo_weight_ignore_top, cfg.dacs.pseudo_weight_ignore_bottom)
    else:
        pseudo, weight = pseudo_labels(t_out.logits["fusion"], img.shape[-2:], cfg.dacs.pseudo_threshold,
                                       cfg.dacs.pseudo_weight_ignore_top, cfg.dacs.pseudo_weight_ignore_bottom)
    return pseudo, weight, use_events, t_out


def _augment(cfg: TrainConfig, image: torch.Tensor) -> torch.Tensor:
    """DACS's strong augmentation of a normalised image batch: colour jitter, then Gaussian blur."""
    image = color_jitter(image, cfg.dacs.jitter_p, cfg.dacs.jitter, cfg.dacs.jitter_impl)
    return gaussian_blur(image, cfg.dacs.blur_p, cfg.dacs.blur_sigma)


@torch.no_grad()
def _mix(cfg: TrainConfig, x: dict[str, torch.Tensor], pseudo: torch.Tensor, pseudo_w: torch.Tensor,
         mem: torch.memory_format, peer: PeerStep) -> dict[str, torch.Tensor]:
    """ClassMix (half the source classes pasted onto the target); the mixed image gets colour jitter
    and blur, the events are only mixed (optionally block-masked), the ISR is recomputed from the image.
    ``target``: the mixed sample's target pixels (1 - ClassMix mask, less what DSRNSS's bank pasted)."""
    src_lbl = x["source_label"]
    mask = peer.class_masks(src_lbl, cfg.dacs.classmix_per_sample)  # DSRNSS's grouped ClassMix when dsr is on
    image = _augment(cfg, mix(mask, x["source_image"], x["target_image"]))
    events = mix(mask, x["source_events"], x["target_events"])
    label, weight = mix(mask, src_lbl, pseudo), mix(mask, torch.ones_like(pseudo_w), pseudo_w)
    image, events, label, weight, target = peer.paste_tail(image, events, label, weight, mask)  # DSRNSS bank
    image = image.contiguous(memory_format=mem)
    if image_only(cfg):  # CMDA cs2dz: the mixed image's ISR is the second input (mixed_image_to_mixed_isr)
        return {"image": image, "events": mixed_isr(image).contiguous(memory_format=mem), "label": label,
                "weight": weight, "target": target}
    if cfg.loss.mask_events > 0:
        events = events * block_mask(events.shape, cfg.loss.mask_events, cfg.loss.mask_block, events.device)
    return {"image": image, "events": events.contiguous(memory_format=mem), "label": label, "weight": weight,
            "isr": isr_from_normalized(image, ISR_NIGHT,
                                       random_directions(image.shape[0])).contiguous(memory_format=mem),
            "target": target}


def _mixed_pass(cfg: TrainConfig, m: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], fwd: torch.nn.Module,
                amp: bool, scale: float = 1.0, peer: PeerStep | None = None, part: slice = slice(None)
                ) -> dict[str, torch.Tensor]:
    """Mixed batch with the pseudo weights (+ target-side L2 terms, + peer terms) -> backward."""
    with autocast(m["image"].device, amp):
        out = fwd(image=m["image"], events=m["events"], isr=m.get("isr"), embeddings=peer.embeddings if peer else ())
    terms = segmentation_terms(out.logits, m["label"], cfg.loss, m["weight"], prefix="mix/")
    terms.update(target_feature_terms(out.features, keep, cfg.loss))
    if peer is not None:
        terms.update(peer.mixed(out, m, part))  # DSRNSS mixed prototypes, DIDA instances, adversarial generator
    terms = {k: v * scale for k, v in terms.items()}
    sum(terms.values()).backward()
    return terms
