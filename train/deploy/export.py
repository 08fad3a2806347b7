"""``cmda export``: a checkpoint's deployment graph as a self-contained ONNX model, checked before it is kept.

The deployment graph is what ``cmda predict`` computes for the fusion output of the student, and
nothing else: the image encoder, the event encoder, the fusion blocks and one head pass. The ISR
branch, the CycleGAN and the image/event auxiliary outputs are training-time machinery and are left
out. Inside the graph, as :func:`train.checkpoints.inference.predict_logits` does it:

* inputs: the ImageNet-normalised image ``[1, 3, H, W]`` and the normalised event grid ``[1, C, H, W]``;
* ``data.test_scale != 1``: both resized bilinearly to the training scale, logits resized back;
* output: logits ``[1, 19, H, W]`` (float32) or, with ``argmax``, the label map ``[1, H, W]`` (uint8).

With 1 bin the network's three event channels are copies of one grid, so the first convolution of
the event encoder is folded: its weights summed over the input channels, the graph takes one
channel, and the result is the same up to float rounding (tested). No padding: the MiT patch
embeddings are padded strided convolutions that ceil-divide any size, so 440x640 runs as it is
(stages 110x160 .. 14x20), exactly as evaluation runs it; padding to 448 rows would let attention see
the padded rows and change the logits.

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript, opset 20), which
handles SDPA and the bilinear resizes; weights are stored inside the one ``.onnx`` file. Before the
file is renamed into place the model is run on one frame with onnxruntime and compared with PyTorch.
Opening and running an export (and importing the optional deploy packages) is :mod:`train.deploy.onnx_runtime`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.config import load_config
from pipeline.errors import InputError
from train.checkpoints.files import disk_free, write_failure
from train.checkpoints.inference import REPRESENTATION_KEY, load_for_inference, predict_logits
from train.common.stopping import FrameStop
from train.config import TrainConfig, event_only, image_only
from train.data.events_input import from_record
from train.data.image_only import night_isr
from train.data.loaders import NightFrames, normalize_image
from train.deploy.onnx_runtime import META_PREFIX, ort_session, require
from train.models import CMDAModel

OPSET = 20
FP32_MAX_DIFF = 1e-3  # max |logit difference| an fp32 export may show against PyTorch
FP32_AGREEMENT = 0.999  # argmax agreement, fp32
FP16_AGREEMENT = 0.99  # argmax agreement, fp16


def load_model(path: str | Path, device: str | torch.device = "cpu", *, image_only_ok: bool = False
               ) -> tuple[CMDAModel, TrainConfig, dict[str, Any]]:
    """Checkpoint -> (student in eval mode, its training config, the raw state).

    The one place ``cmda export`` and ``cmda stream`` read a checkpoint (cmda's or CMDA's released
    one). An image + ISR model (``--target darkzurich``/``acdc``) is refused unless ``image_only_ok``:
    ``cmda stream`` would feed its ISR encoder events it never saw (``cmda export`` takes it, with an
    ``isr`` input instead of ``events``).
    """

    model, cfg, state = load_for_inference(path, teacher=False, device=device)
    if event_only(cfg):
        raise InputError(path, f"this is an event-only model (trained for {cfg.data.target}): `cmda export` and "
                         "`cmda stream` take image + events models; score or predict it with `cmda evaluate/predict`")
    if image_only(cfg) and not image_only_ok:
        raise InputError(path, f"this is an image + ISR model (trained for {cfg.data.target}, no event input): "
                         "`cmda stream` replays events, which it never saw; export it with `cmda export` (inputs "
                         f"image and isr), score or predict it with `cmda evaluate/predict --target {cfg.data.target}`")
    return model, cfg, state


def fold_event_channels(encoder: nn.Module) -> nn.Module:
    """A copy of an MiT encoder whose first convolution takes one channel instead of three copies of it.

    conv(repeat(x, 3)) = sum_c W[:, c] * x = conv'(x) with W' = sum_c W[:, c], so the one-channel
    encoder computes the same map (bias unchanged).
    """
    folded = copy.deepcopy(encoder)
    conv = folded.patch_embed1.proj
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    folded.patch_embed1.proj = new
    return folded


def event_channels(model: CMDAModel, bins: int) -> tuple[int, bool]:
    """(channels of the graph's event input, fold?) for a model fed ``bins``-bin grids."""
    in_chans = model.backbone_events.patch_embed1.proj.in_channels
    if bins == 1:
        return 1, True
    if bins == in_chans:
        return bins, False
    raise InputError(None, f"the model's event encoder takes {in_chans} channels; it can be fed 1-bin grids "
                     f"(repeated, folded into one channel here) or {in_chans}-bin grids, not {bins} bins")


def scaled_size(h: Any, w: Any, scale: float) -> tuple[Any, Any]:
    """The size predict_logits resizes a frame to for ``scale`` (same rounding, at least 32).

    With symbolic sizes (``--dynamic``) the exporter has no ``round``: the graph then rounds half up
    in integer arithmetic on ``scale`` as a fraction, which differs from Python's round-half-to-even
    only when ``size * scale`` lies exactly halfway between two integers.
    """
    if isinstance(h, int) and isinstance(w, int):
        return max(32, round(h * scale)), max(32, round(w * scale))
    frac = Fraction(scale).limit_denominator(10_000)
    num, den = frac.numerator, frac.denominator
    return (torch.sym_max(32, (2 * h * num + den) // (2 * den)), torch.sym_max(32, (2 * w * num + den) // (2 * den)))


class DeploymentGraph(nn.Module):
    """The student's fusion output as a function of (image, events): the graph that gets exported."""

    def __init__(self, model: CMDAModel, *, bins: int = 1, scale: float = 1.0, argmax: bool = False,
                 fp16: bool = False):
        super().__init__()
        channels, fold = event_channels(model, bins)
        self.event_channels = channels
        self.backbone_image = copy.deepcopy(model.backbone_image)
        self.backbone_events = fold_event_channels(model.backbone_events) if fold else copy.deepcopy(
            model.backbone_events)
        self.fusion_module = copy.deepcopy(model.fusion_module)
        self.decode_head = copy.deepcopy(model.decode_head)
        self.scale = float(scale)
        self.argmax = argmax
        self.fp16 = fp16
        self.eval()
        if fp16:
            self.half()

    def forward(self, image: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        if self.fp16:
            image, events = image.half(), events.half()
        if self.scale != 1.0:
            scaled = scaled_size(size[0], size[1], self.scale)
            image = F.interpolate(image, size=scaled, mode="bilinear", align_corners=False)
            events = F.interpolate(events, size=scaled, mode="bilinear", align_corners=False)
        fused = self.fusion_module(self.backbone_image(image), self.backbone_events(events))
        logits = self.decode_head(fused, dropout=False)
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1).to(torch.uint8) if self.argmax else logits


@dataclass
class ExportReport:
    out: Path
    backbone: str
    height: int
    width: int
    event_channels: int
    output: str  # "logits" or "labels"
    precision: str  # "fp32" or "fp16"
    dynamic: bool
    frame: str  # what the check ran on
    max_diff: float | None  # max |logit difference| (None for label output)
    agreement: float  # argmax agreement with PyTorch
    size_mb: float
    metadata: dict[str, str] = field(default_factory=dict)
    second_input: str = "events"  # "isr" for an image + ISR model


def isr_frame(height: int, width: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(what it is, normalised image [1,3,H,W], its night ISR [1,1,H,W]) to check an image + ISR export on:
    a fixed pseudo-random smooth image, its ISR computed from the uint8 pixels as ``cmda predict`` does."""

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return "a pseudo-random image and its ISR", normalize_image(img)[None], night_isr(img)[None].astype(np.float32)


def sample_frame(config: Path | None, cfg: TrainConfig, height: int, width: int, bins: int, record: Any = None
                 ) -> tuple[str, np.ndarray, np.ndarray]:
    """(what it is, image [1,3,H,W], events [1,bins,H,W]) to check the export on: the first DSEC night test
    frame when ``config`` points at a processed tree of that geometry, else a fixed pseudo-random frame."""
    if config is not None and Path(config).exists():
        try:

            dcfg = load_config(config)
            frames = NightFrames(dcfg, "test", cfg.data, from_record(record, dcfg))
            image, events, row = frames.load(0)
            if image.shape[0] >= height and image.shape[1] == width and events.shape[0] == bins:
                return (f"test frame {row.sequence}_{row.frame:06d}", normalize_image(image[:height])[None],
                        np.ascontiguousarray(events[None, :, :height]))
        except InputError:
            pass
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, height, width)).astype(np.float32)
    events = np.zeros((1, bins, height, width), np.float32)
    hit = rng.random((1, bins, height, width)) < 0.05
    events[hit] = rng.uniform(-1, 1, int(hit.sum())).astype(np.float32)
    return "a pseudo-random frame", image, events


def compare(onnx_out: np.ndarray, torch_out: np.ndarray, argmax: bool) -> tuple[float | None, float]:
    """(max |logit difference| or None for labels, argmax agreement)."""
    if argmax:
        return None, float(np.mean(onnx_out == torch_out))
    diff = float(np.max(np.abs(onnx_out.astype(np.float32) - torch_out)))
    return diff, float(np.mean(onnx_out.argmax(1) == torch_out.argmax(1)))


def _export_onnx(graph: DeploymentGraph, example: tuple[torch.Tensor, torch.Tensor], path: Path, dynamic: bool,
                 output: str, second: str = "events") -> None:
    dynamic_shapes = None
    if dynamic:
        h, w = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
        dynamic_shapes = {"image": {2: h, 3: w}, "events": {2: h, 3: w}}
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ..."
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, example, str(path), dynamo=True, opset_version=OPSET, external_data=False,
                              input_names=["image", second], output_names=[output], dynamic_shapes=dynamic_shapes,
                              verbose=False)
    finally:
        quiet.setLevel(level)


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, *, config: str | Path | None = None,
                      height: int = 0, width: int = 0, bins: int = 0, argmax: bool = False, fp16: bool = False,
                      dynamic: bool = False) -> ExportReport:
    """Export ``checkpoint``'s deployment graph to ``out`` (default: beside it, ``<name>.onnx``) and check it.

    ``height``/``width`` 0: the test geometry, ``data.test_rows`` x the event frame width (640, or the
    width of datasets.yaml's representation); ``bins`` 0: datasets.yaml's bins (1 without one).
    """
    require("onnx")  # all three up front: a missing one is one line before minutes of work
    require("onnxscript")
    require("onnxruntime")

    checkpoint = Path(checkpoint)
    model, cfg, state = load_model(checkpoint, image_only_ok=True)
    isr = image_only(cfg)  # an image + ISR model: the second input is the image's ISR (one channel, repeated)
    second = "isr" if isr else "events"
    record = state.get(REPRESENTATION_KEY)
    height, width, bins = _geometry(checkpoint, cfg, config, (height, width, bins), record)
    try:
        graph = DeploymentGraph(model, bins=bins, scale=cfg.data.test_scale, argmax=argmax, fp16=fp16)
    except InputError as exc:
        raise InputError(checkpoint, exc.problem) from None
    out = Path(out) if out is not None else checkpoint.with_suffix(".onnx")
    if out.is_dir():  # `--out exports/`: the checkpoint's name in that folder
        out = out / checkpoint.with_suffix(".onnx").name
    output = "labels" if argmax else "logits"
    frame, image, events = (isr_frame(height, width) if isr else
                            sample_frame(Path(config) if config else None, cfg, height, width, bins, record))
    expected = _reference(model, graph, cfg, image, events, argmax)
    meta = {"backbone": cfg.model.backbone, "bins": str(bins), "event_channels": str(graph.event_channels),
            "height": str(height), "width": str(width), "test_scale": repr(cfg.data.test_scale),
            "output": output, "precision": "fp16" if fp16 else "fp32", "dynamic": str(dynamic).lower(),
            "checkpoint": checkpoint.name, "iteration": str(state.get("iteration")),
            "variant": cfg.run.variant, "second_input": second, "target": cfg.data.target,
            "representation": json.dumps(record if isinstance(record, dict) else None)}
    try:
        with FrameStop(immediate=True), atomic_path(out) as tmp:  # a signal: the partial file goes, exit 130
            _export_with_metadata(checkpoint, graph, (torch.from_numpy(image), torch.from_numpy(events)), tmp,
                                  dynamic, output, second, meta)
            got = ort_session(tmp).run(None, {"image": image, second: events})[0]
            diff, agreement = _check_agreement(checkpoint, frame, got, expected, argmax, fp16)
            size_mb = os.path.getsize(tmp) / 2**20
    except OSError as exc:  # a full disk: name the file being written, not nothing or its hidden temporary
        if exc.filename is not None and not Path(exc.filename).name.startswith(f".{Path(out).name}."):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
    return ExportReport(out=out, backbone=cfg.model.backbone, height=height, width=width,
                        event_channels=graph.event_channels, output=output, precision=meta["precision"],
                        dynamic=dynamic, frame=frame, max_diff=diff, agreement=agreement, size_mb=size_mb,
                        metadata=meta, second_input=second)


def _geometry(checkpoint: Path, cfg, config: str | Path | None, asked: tuple[int, int, int],
              record: Any = None) -> tuple[int, int, int]:
    """(height, width, bins) of the exported graph: the asked values, 0 filled from the model's test geometry.
    ``bins`` is the event input's stored channels: the checkpoint's representation record fixes it (a
    different ``--bins`` is refused); without a record, datasets.yaml's voxel bins (1 without one)."""
    height, width, bins = asked
    rep = None
    if image_only(cfg):
        if bins not in (0, 1):
            raise InputError(checkpoint, f"an image + ISR model's second input is the image's ISR (one channel): "
                             f"--bins {bins} does not apply")
        height, width, bins = height or cfg.data.target_resize[1], width or cfg.data.target_resize[0], 1
    elif config is not None and Path(config).exists():
        rep = load_config(config).representation
    if isinstance(record, dict) and not image_only(cfg):
        stored = int(record.get("channels", 1))
        if bins not in (0, stored):
            raise InputError(checkpoint, f"the model was trained on {record.get('suffix', record.get('kind'))} "
                             f"({stored} channel(s)): --bins {bins} does not apply")
        bins = stored
    height = height or (min(cfg.data.test_rows, rep.height) if rep else cfg.data.test_rows)
    width = width or (rep.width if rep else 640)
    bins = bins or (rep.bins if rep else 1)
    if height < 32 or width < 32:
        raise InputError(None, f"--height and --width must be at least 32, got {height}x{width}")
    return height, width, bins


def _reference(model, graph: DeploymentGraph, cfg, image: np.ndarray, events: np.ndarray, argmax: bool) -> np.ndarray:
    """What the exported graph must reproduce: cmda predict's own computation (the unfolded model, three event
    channels, fp32)."""
    ev3 = torch.from_numpy(np.repeat(events, 3, axis=1) if graph.event_channels == 1 else events)
    logits = predict_logits(model, torch.from_numpy(image), ev3, ("fusion",), amp=False,
                            scale=cfg.data.test_scale)["fusion"]
    return (logits.argmax(1).to(torch.uint8) if argmax else logits).numpy()


def _export_with_metadata(checkpoint: Path, graph: DeploymentGraph, example: tuple, tmp: Path, dynamic: bool,
                          output: str, second: str, meta: dict[str, str]) -> None:
    """The ONNX file at ``tmp`` with cmda's metadata; an exporter failure is one line naming the checkpoint."""
    onnx = require("onnx")
    try:
        _export_onnx(graph, example, tmp, dynamic, output, second)
    except (InputError, OSError):
        raise
    except Exception as exc:
        if disk_free(tmp.parent) < 64 * 2**20:  # the exporter's own words for a full disk say nothing of it
            raise write_failure(tmp, exc) from exc
        raise InputError(checkpoint, f"the ONNX exporter failed for this setting ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]})") from None
    proto = onnx.load(str(tmp))
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    onnx.save(proto, str(tmp))


def _check_agreement(checkpoint: Path, frame: str, got: np.ndarray, expected: np.ndarray, argmax: bool,
                     fp16: bool) -> tuple[float | None, float]:
    """Refuse an exported graph that disagrees with PyTorch (so it is never written); its (max diff, agreement)."""
    diff, agreement = compare(got, expected, argmax)
    need = FP16_AGREEMENT if fp16 else FP32_AGREEMENT
    if agreement < need or (not fp16 and diff is not None and diff > FP32_MAX_DIFF):
        shown = "" if diff is None else f"max |logit difference| {diff:.2e}, "
        raise InputError(checkpoint, f"the exported model disagrees with PyTorch on {frame}: {shown}"
                         f"argmax agreement {100 * agreement:.3f} % (need >= {100 * need:g} %); not written")
    return diff, agreement


__all__ = ["DeploymentGraph", "ExportReport", "compare", "event_channels", "export_checkpoint", "fold_event_channels",
           "load_model", "scaled_size"]
