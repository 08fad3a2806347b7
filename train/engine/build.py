"""Building a run: weight files, data, the student and its teacher, the optimiser and the method.

Every rank and every run with one seed starts from the same weights (``torch.manual_seed(run.seed)``
before the model is made); the components are built after the optimiser in :data:`train.uda.method.COMPONENTS`
order, so their initial weights are part of the run's reproducibility.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.utils.data import Dataset

from pipeline.config import DatasetsConfig, load_config
from pipeline.errors import InputError
from train.checkpoints.cmda_layout import init_weights
from train.checkpoints.cyclegan import load_cyclegan
from train.checkpoints.files import load_model_state, restore_rng
from train.checkpoints.inference import REPRESENTATION_KEY
from train.config import DEFAULT_CYCLEGAN, TrainConfig, event_only, image_only
from train.data.batches import night_eval_set, training_batches
from train.data.dsec_semantic import window_channels
from train.data.events_input import EventInput, resolve
from train.engine.context import Context
from train.models import CMDAModel, EventOnlyModel
from train.uda.method import Method, build_method
from train.uda.step import Networks

Say = Callable[[str], Any]


@dataclass
class Run:
    """What one run trains with: the batches, the night evaluation set (rank 0), the networks, the method."""

    batches: Dataset  # PairedBatches, or SemanticBatches for DSEC-Semantic
    test: Dataset | None
    nets: Networks
    method: Method
    events: EventInput | None  # the event representation (checkpoints record it); None: an image-only target

    def checkpoint_extra(self) -> dict[str, Any]:
        """What every checkpoint of the run records besides the weights: the event representation."""
        return {} if self.events is None else {REPRESENTATION_KEY: self.events.record()}


def _weight_file(setting: str, default: Path, what: str, fallback: str, say: Say) -> Path | None:
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


def resolve_weights(cfg: TrainConfig, say: Say) -> tuple[Path | None, Path | None]:
    """ImageNet MiT file and CycleGAN file: explicit paths must exist; 'auto' uses them when present."""
    mit = _weight_file(cfg.model.pretrained, Path("pretrained") / f"{cfg.model.backbone}.pth",
                       "ImageNet MiT weights", "encoders start from random weights (CMDA uses ImageNet MiT)", say)
    if image_only(cfg) or cfg.data.source == "dsec-semantic":  # no translated source: day ISR, or real windows
        return mit, None
    gan = _weight_file(cfg.model.cyclegan, DEFAULT_CYCLEGAN, "CycleGAN weights",
                       "IC1 is used directly as the source events", say)
    return mit, gan


def new_model(cfg: TrainConfig, event_channels: int) -> CMDAModel | EventOnlyModel:
    """The untrained network ``cfg`` trains: CMDA's two-encoder model, or the event-only one (DSEC-Semantic)."""
    m = cfg.model
    if event_only(cfg):
        return EventOnlyModel(m.backbone, num_classes=m.num_classes, in_chans=event_channels, drop_path=m.drop_path,
                              checkpoint=m.checkpoint, head_channels=m.head_channels)
    return CMDAModel(m.backbone, num_classes=m.num_classes, drop_path=m.drop_path,
                     fusion_drop_path=m.fusion_drop_path, checkpoint=m.checkpoint,
                     head_channels=m.head_channels, fusion=m.fusion, event_chans=event_channels)


def encoder_channels(cfg: TrainConfig, dcfg: DatasetsConfig, events: EventInput | None) -> int:
    """The event encoder's input channels: DSEC-Semantic's window channels, the run's representation's, or 3
    (CMDA's voxel grid repeated to 3; an image-only target's ISR)."""
    if event_only(cfg):
        return window_channels(dcfg)
    return 3 if events is None else events.network_channels


def build_student(cfg: TrainConfig, ctx: Context, mit_path: Path | None, resuming: bool, say: Say,
                  event_channels: int = 3) -> tuple[CMDAModel | EventOnlyModel, torch.nn.Module | None]:
    """The student (ImageNet weights, then ``model.init``) and, for the feature distance, a frozen copy of
    its ImageNet image encoder (taken before ``model.init``: the distance keeps ImageNet). ``event_channels``:
    the event encoder's input channels (the run's representation)."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    model = new_model(cfg, event_channels)
    if mit_path is not None:
        model.load_pretrained(mit_path)
    imnet = None
    if cfg.dacs.fd_lambda > 0:
        if mit_path is None:
            raise InputError(None, "the ImageNet feature distance (dacs.fd_lambda > 0) needs --pretrained weights")
        imnet = copy.deepcopy(model.backbone_image).eval().requires_grad_(False).to(ctx.device)
    if m.init and not resuming:
        load_model_state(model, init_weights(m.init, m.backbone, m.num_classes, m.head_channels, say, m.fusion),
                         Path(m.init))
        say(f"student initialised from {m.init} (teacher = a copy, fresh optimiser)")
    model.to(ctx.device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, imnet


def build_optimizer(cfg: TrainConfig, model: CMDAModel, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the head's parameter groups at ``optim.head_lr_mult`` (the model tags them lr_mult 10)."""
    o = cfg.optim
    opt = torch.optim.AdamW(model.param_groups(o.lr, o.weight_decay), lr=o.lr, betas=o.betas,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")
    for g in opt.param_groups:
        g["lr_mult"] = o.head_lr_mult if g.get("lr_mult", 1) > 1 else 1.0
    return opt


def build(cfg: TrainConfig, ctx: Context, say: Say, resuming: bool = False) -> Run:
    """Data, networks (same initial weights on every rank and in every run with this seed), method."""
    dcfg = load_config(cfg.data.datasets)
    seed = cfg.run.seed + 1_000 * ctx.rank
    events = None if image_only(cfg) or event_only(cfg) else resolve(cfg.representation.kind, dcfg)
    batches = training_batches(dcfg, cfg, seed, events)
    test = night_eval_set(dcfg, cfg, cfg.run.eval_max, events) if ctx.main else None
    mit_path, gan_path = resolve_weights(cfg, say)
    channels = encoder_channels(cfg, dcfg, events)
    model, imnet = build_student(cfg, ctx, mit_path, resuming, say, channels)
    teacher = None if cfg.run.source_only else copy.deepcopy(model).requires_grad_(False)
    gan = load_cyclegan(gan_path, ctx.device) if gan_path is not None else None
    opt = build_optimizer(cfg, model, ctx.device)
    method = build_method(cfg, ctx.device, gan, imnet, channels)
    return Run(batches, test, Networks(model, model, teacher, opt), method, events)


def restore(run: Run, state: dict[str, Any] | None, path: Path | None, say: Say) -> int:
    """Load a checkpoint's weights, optimiser, component state and RNG; returns the iteration to start at.
    A component switched on since (``--resume-override``) starts fresh, with a note."""
    if state is None or path is None:
        return 0
    load_model_state(run.nets.student, state["student"], path)
    if run.nets.teacher is not None:
        load_model_state(run.nets.teacher, state["teacher"], path)
    run.nets.optimizer.load_state_dict(state["optimizer"])
    for part in run.method.stateful():
        if state.get(part.state_key) is None:
            say(f"note: {path} holds no {part.state_key}: it starts empty (the component was off in that run)")
            continue
        part.load_state_dict(state[part.state_key])
    restore_rng(state)
    say(f"resumed from {path} at iteration {int(state['iteration'])}")
    return int(state["iteration"])


def wrap(run: Run, cfg: TrainConfig, ctx: Context) -> None:
    """torch.compile and/or DistributedDataParallel around the student (after its weights are loaded)."""
    if cfg.run.compile:
        run.nets.forward = torch.compile(run.nets.student)
    if tdist.is_initialized():
        cuda = ctx.device.type == "cuda"
        run.nets.forward = torch.nn.parallel.DistributedDataParallel(
            run.nets.forward, device_ids=[ctx.local_rank] if cuda else None)
