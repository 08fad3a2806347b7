"""Loading a checkpoint for inference and running the model on full frames.

Shared by ``cmda evaluate`` and ``cmda predict``: the model is rebuilt from the config stored in the
checkpoint (never from today's defaults), weights load strictly, and logits are upsampled to the
input size before the argmax, exactly as evaluation scores them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from train.checkpoints.cmda_layout import load_any_checkpoint
from train.checkpoints.files import load_model_state
from train.common.device import autocast
from train.config import EVENT_ONLY_TARGETS, IMAGE_ONLY_TARGETS, TARGETS, TrainConfig, event_only, from_dict, image_only
from train.models import CMDAModel, EventOnlyModel
from train.models.event_only import input_channels

REPRESENTATION_KEY = "representation"
"""The checkpoint entry recording the event representation (train/data/events_input.py); absent = CMDA's voxel grid."""


def record_channels(record: Any) -> int:
    """The event encoder's input channels a representation record says (3 without one: CMDA's model)."""
    if isinstance(record, dict) and isinstance(record.get("network_channels"), int):
        return int(record["network_channels"])
    return 3


def checkpoint_config(path: Path, state: dict[str, Any]) -> TrainConfig:
    """The training config stored in a checkpoint, checked against the checkpoint's own backbone."""
    if not isinstance(state.get("config"), dict):
        raise InputError(path, "checkpoint has no training config")
    try:
        cfg = from_dict(state["config"])
    except InputError as exc:
        raise InputError(path, f"stored training config is not valid here: {exc.problem}") from None
    if state.get("backbone") not in (None, cfg.model.backbone):
        raise InputError(path, f"checkpoint says backbone {state['backbone']}, its config says {cfg.model.backbone}")
    return cfg


def build_model(cfg: TrainConfig, path: Path, empty: bool = False, event_channels: int = 3
                ) -> CMDAModel | EventOnlyModel:
    """An untrained model shaped like the one ``cfg`` trains (an unknown backbone is an InputError): CMDAModel,
    its event encoder taking ``event_channels`` channels (the checkpoint's representation record says how many),
    or for an event-only target an EventOnlyModel on ``event_channels`` input channels.

    ``empty=True`` skips the random initialisation (uninitialised CPU memory), for a strict load that then
    overwrites every parameter and buffer: building MiT-B5 that way takes a fraction of the time.
    """
    m = cfg.model
    try:
        with torch.device("meta") if empty else contextlib.nullcontext():
            if event_only(cfg):
                model = EventOnlyModel(m.backbone, num_classes=m.num_classes, in_chans=event_channels,
                                       drop_path=m.drop_path, head_channels=m.head_channels)
                return model.to_empty(device="cpu") if empty else model
            model = CMDAModel(m.backbone, num_classes=m.num_classes, drop_path=m.drop_path,
                              fusion_drop_path=m.fusion_drop_path, head_channels=m.head_channels, fusion=m.fusion,
                              event_chans=event_channels)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    return model.to_empty(device="cpu") if empty else model


def check_target(path: Path, cfg: TrainConfig, target: str | None) -> TrainConfig:
    """``cfg`` set to score on ``target`` (None: the night target the checkpoint trained on).

    A model's second encoder was trained on one kind of input: events (DSEC) or the night image's ISR
    (an image-only target). Running it on the other kind would give numbers that mean nothing, so that is
    an InputError naming the checkpoint; image-only targets may stand in for each other (Dark Zurich <-> ACDC).
    """

    if target is None or target == cfg.data.target:
        return cfg
    if target not in TARGETS:
        raise InputError(None, f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    if event_only(cfg) or target in EVENT_ONLY_TARGETS:
        raise InputError(path, f"this model was trained for {cfg.data.target}; {target} needs "
                         + ("an event-only model (`cmda train --target dsec-semantic`)" if target in EVENT_ONLY_TARGETS
                            else "an image input, and an event-only model has none"))
    if not image_only(cfg) and target in IMAGE_ONLY_TARGETS:
        raise InputError(path, f"this is an image + events model (trained for {cfg.data.target}): it needs events, "
                         f"and {target} has none; score it on DSEC, or train an image + ISR model with "
                         f"`cmda train --target {target}`")
    if image_only(cfg) and target not in IMAGE_ONLY_TARGETS:
        raise InputError(path, f"this is an image + ISR model (trained for {cfg.data.target}, no event input); "
                         f"it cannot take {target}'s events: score it with --target darkzurich or acdc")
    cfg.data.target = target
    return cfg


def load_for_inference(path: str | Path, teacher: bool = False, device: str | torch.device = "cpu"
                       ) -> tuple[CMDAModel, TrainConfig, dict[str, Any]]:
    """Checkpoint -> (model in eval mode on ``device``, its training config, the raw state).

    Reads cmda's checkpoints and CMDA's released mmcv checkpoints (converted in memory, strictly).
    """
    path = Path(path)
    state = load_any_checkpoint(path, teacher=teacher)
    cfg = checkpoint_config(path, state)
    key = "teacher" if teacher else "student"
    weights = state.get(key)
    if weights is None:
        why = " (a source-only run has no teacher; drop --teacher)" if teacher else ""
        raise InputError(path, f"checkpoint holds no {key} weights{why}")
    channels = (input_channels(weights) or 3) if event_only(cfg) else record_channels(state.get(REPRESENTATION_KEY))
    model = build_model(cfg, path, empty=True, event_channels=channels)
    load_model_state(model, weights, path)  # strict: every parameter and buffer comes from the file
    return model.eval().to(device), cfg, state


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor | None, events: torch.Tensor,
                   outputs: tuple[str, ...], amp: bool = True, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Logits at the input size for each requested output; only the encoders they need run.

    ``image`` may be None for an event-only model (outputs ``("events",)``).
    ``scale`` resizes the inputs first (bilinear) so a model trained on rescaled crops sees test
    frames at its training scale (``data.test_scale``); logits always come back at the input size.
    """
    size = events.shape[-2:]
    if scale != 1.0:
        scaled = (max(32, round(size[0] * scale)), max(32, round(size[1] * scale)))
        image = None if image is None else F.interpolate(image, size=scaled, mode="bilinear", align_corners=False)
        events = F.interpolate(events, size=scaled, mode="bilinear", align_corners=False)
    inputs: dict[str, torch.Tensor] = {}
    if any(o in ("image", "fusion") for o in outputs):
        inputs["image"] = image
    if any(o in ("events", "fusion") for o in outputs):
        inputs["events"] = events
    with autocast(events.device, amp):
        out = model(**inputs, outputs=outputs)
    return {k: F.interpolate(v.float(), size=size, mode="bilinear", align_corners=False)
            for k, v in out.logits.items()}
