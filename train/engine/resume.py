"""Continuing a run: the settings a ``--resume`` may change, and the one place the checkpoint is read.

A resume continues the run as it was; a changed seed, lr, length or loss weight would silently make
it another run, so any difference is an error unless the user passes ``--resume-override``. Machine
settings (device, workers, output folder, checkpoints kept) may differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from train.checkpoints.files import check_compatible, find_checkpoint, load_checkpoint
from train.checkpoints.inference import checkpoint_config
from train.common.device import resolve_device
from train.config import TrainConfig, apply_layers, differences, set_value, to_dict, validate
from train.engine.run_folder import default_out


@dataclass
class ResumePoint:
    """A checkpoint to continue from, read once."""

    path: Path
    state: dict[str, Any]


@dataclass
class TrainRequest:
    """What ``cmda train`` was asked: the layers of settings, in the order they apply, and the resume."""

    variant: str | None = None
    preset: str | None = None
    target: str | None = None
    settings: Path | None = None
    sets: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    resume: Path | None = None


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


def configure(request: TrainRequest) -> tuple[TrainConfig, ResumePoint | None]:
    """The run's settings: defaults (or, with ``resume``, the run's own) under the request's layers, checked,
    with the device resolved and the run folder chosen. The checkpoint is read here, once."""
    point = None
    if request.resume is not None:  # the run's own settings, then only what is given here
        path = find_checkpoint(request.resume)
        point = ResumePoint(path, load_checkpoint(path))
        cfg = checkpoint_config(path, point.state)
        cfg.run.device = "auto"  # a machine setting: this machine's, unless given
        cfg.run.out = path.parent.parent.absolute()
        variant = request.variant
    else:
        cfg = TrainConfig()
        cfg.data.datasets = Path("datasets.yaml").absolute()
        variant = request.variant or "baseline"
    apply_layers(cfg, variant=variant, preset=request.preset, settings=request.settings, sets=request.sets,
                 flags=request.flags, target=request.target)
    validate(cfg)
    set_value(cfg, "run.device", str(resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))))
    cfg.run.out = (cfg.run.out or default_out(cfg)).absolute()
    return cfg, point
