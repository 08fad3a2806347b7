"""Exported models at run time: the optional deploy packages (onnx, onnxscript, onnxruntime, each a one-line
error naming the extra when missing), an onnxruntime CPU session, and :class:`OnnxModel`, an export of
``cmda export`` opened with its metadata for ``cmda stream`` and the benchmarks.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

DEPLOY_HINT = "install the deploy extra: pip install -e '.[deploy]'"
META_PREFIX = "cmda."  # the prefix of cmda's keys in an export's ONNX metadata


def require(module: str) -> Any:
    """Import an optional deploy package or say which extra provides it (InputError, exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(None, f"{module} is not installed; {DEPLOY_HINT}") from None


def ort_session(path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session (``threads`` 0 = onnxruntime's default)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise InputError(path, f"onnxruntime cannot load it as a model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None


@dataclass(frozen=True)
class OnnxModel:
    """An exported model as ``cmda stream`` and the benchmark use it: a session plus what it expects."""

    session: Any
    height: int | None  # None: dynamic
    width: int | None
    event_channels: int
    output: str
    metadata: dict[str, str]

    @property
    def representation(self) -> dict[str, Any] | None:
        """The event representation record the export carries (None: an older export, CMDA's voxel grid)."""
        try:
            record = json.loads(self.metadata.get("representation", "null"))
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def __call__(self, image: np.ndarray, events: np.ndarray) -> np.ndarray:
        """Labels [H, W] (uint8) for one normalised frame."""
        out = self.session.run(None, {"image": image, "events": events})[0]
        return out[0] if self.output == "labels" else out[0].argmax(0).astype(np.uint8)


def open_onnx(path: str | Path, threads: int = 0) -> OnnxModel:
    """Open an exported model (InputError when it is not one of ours or onnxruntime is missing)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model file not found")
    session = ort_session(path, threads)
    inputs = {i.name: i for i in session.get_inputs()}
    if set(inputs) == {"image", "isr"}:
        raise InputError(path, "an image + ISR model (inputs image and isr): `cmda stream` replays events, which "
                         "it never saw; feed it the image's ISR (train.data.image_only.night_isr) yourself")
    if set(inputs) != {"image", "events"}:
        raise InputError(path, f"not a cmda export: inputs are {sorted(inputs)}, expected image and events")
    shape_i, shape_e = inputs["image"].shape, inputs["events"].shape
    if len(shape_i) != 4 or len(shape_e) != 4 or shape_i[1] != 3 or not isinstance(shape_e[1], int):
        raise InputError(path, f"not a cmda export: input shapes {shape_i} and {shape_e}")
    h, w = shape_i[2], shape_i[3]
    meta = {k.removeprefix(META_PREFIX): v for k, v in session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(META_PREFIX)}
    return OnnxModel(session, h if isinstance(h, int) else None, w if isinstance(w, int) else None, shape_e[1],
                     session.get_outputs()[0].name, meta)


__all__ = ["DEPLOY_HINT", "META_PREFIX", "OnnxModel", "open_onnx", "ort_session", "require"]
