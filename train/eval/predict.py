"""``cmda predict``: run a checkpoint on the DSEC night frames and write colour predictions and panels.

The model is rebuilt from the config stored in the checkpoint (never from today's defaults), so a
checkpoint of any backbone loads as it was trained, and a checkpoint whose weights do not fit that
config is refused with the mismatching keys named. Per frame it writes

* ``<seq>_<frame>_pred.png``: the predicted trainIds in the Cityscapes palette;
* ``<seq>_<frame>_panel.png``: image | events | prediction | label (no label column for train
  frames, which have none).

Test frames are cropped to the top ``data.test_rows`` rows (440), exactly what evaluation scores;
train frames are shown whole (480 rows, the area training crops come from). The logits (1/4 of the
input size) are upsampled bilinearly to the input size before the argmax, as evaluation does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import write_png
from pipeline.config import load_config
from pipeline.errors import InputError
from train.checkpoints.inference import REPRESENTATION_KEY, check_target, load_for_inference, predict_logits
from train.common import NUM_CLASSES
from train.common.device import resolve_device
from train.common.stopping import FrameStop
from train.config import TARGETS, TrainConfig, event_only, image_only
from train.data.events_input import from_record
from train.data.loaders import NightFrames, NightTest, normalize_image, three_channels
from train.eval.metrics import confusion, summarize
from train.eval.predict_image_only import NightPrediction, predict_loaded
from train.eval.semantic import predict_semantic
from train.eval.visualize import colorize, denormalize, events_to_rgb, panel

OUTPUT_CHOICES = ("fusion", "image", "events")
SPLITS = ("test", "train")


@dataclass
class PredictSummary:
    out: Path
    frames: int
    split: str
    output: str
    weights: str  # "student" or "teacher"
    iteration: int | None
    conf: np.ndarray | None = None  # [19, 19] over the frames written (test split only)
    metrics: dict[str, Any] = field(default_factory=dict)


def night_frames(cfg_path: Path, train_cfg: TrainConfig, split: str, limit: int, record: Any = None
                 ) -> tuple[int, Iterator[dict[str, Any]]]:
    """(count, frames) of ``split``: each frame a dict of image [3, H, W] (ImageNet-normalised), events
    [C, H, W] of the checkpoint's representation (``record``; None: CMDA's voxel grid), label [H, W] (None
    for train) and name ``<seq>_<frame>``."""
    ds = load_config(cfg_path)
    events = from_record(record, ds)
    if split == "test":
        test = NightTest(ds, train_cfg.data, limit=limit, events=events)

        def test_items() -> Iterator[dict[str, Any]]:
            for i in range(len(test)):
                yield test[i]

        return len(test), test_items()
    frames = NightFrames(ds, "train", train_cfg.data, events)
    n = min(len(frames), limit) if limit else len(frames)

    def train_items() -> Iterator[dict[str, Any]]:
        for i in range(n):
            image, events, row = frames.load(i)
            yield {"image": torch.from_numpy(normalize_image(image)),
                   "events": torch.from_numpy(three_channels(events)), "label": None,
                   "name": f"{row.sequence}_{row.frame:06d}"}

    return n, train_items()


@torch.inference_mode()
def frame_panel(image: np.ndarray, events: np.ndarray, pred: np.ndarray, label: np.ndarray | None,
                output: str, score: float | None = None) -> np.ndarray:
    """image | events | prediction | label (when there is one), with titles."""
    title = f"prediction ({output})" + (f", mIoU {100 * score:.1f}" if score is not None and np.isfinite(score)
                                        else "")
    cols = [("image", image), ("events", events_to_rgb(events)), (title, colorize(pred))]
    if label is not None:
        cols.append(("label", colorize(label)))
    return panel(cols)


def _predict_frame(model, item: dict[str, Any], out: Path, output: str, cfg: TrainConfig,
                   conf_total: torch.Tensor | None, dev: torch.device) -> int:
    """One frame's prediction PNG and panel (and its confusion added to ``conf_total``); returns 1."""
    image, events = item["image"][None].to(dev), item["events"][None].to(dev)
    logits = predict_logits(model, image, events, (output,), amp=cfg.run.amp, scale=cfg.data.test_scale)
    pred = logits[output].argmax(1)[0].cpu()
    label = item["label"]
    score = None
    if label is not None and conf_total is not None:
        conf = confusion(pred, label)
        conf_total += conf
        score = float(summarize(conf.numpy())["mIoU"])
    pred_np = pred.numpy().astype(np.uint8)
    write_png(out / f"{item['name']}_pred.png", colorize(pred_np))
    write_png(out / f"{item['name']}_panel.png", frame_panel(
        denormalize(item["image"]), item["events"].numpy(), pred_np,
        None if label is None else label.numpy(), output, score))
    return 1


def predict(checkpoint: str | Path, *, out: str | Path | None = None, config: str | Path | None = None,
            split: str = "test", limit: int = 0, output: str = "fusion", teacher: bool = False,
            device: str = "auto", target: str | None = None) -> PredictSummary | NightPrediction | dict[str, Any]:
    """Predict every frame of ``split`` (the first ``limit`` if > 0) and write the PNGs into ``out``
    (default: the run's ``predictions/<checkpoint name>/``, one folder per checkpoint as evaluate's
    ``eval/<checkpoint name>/``). ``config`` is the datasets.yaml, by default the one the run trained
    with. Returns counts and, for the test split, the confusion matrix and metrics over the frames written.

    ``target`` (default: the checkpoint's night target): an image-only target (darkzurich / acdc) hands
    over to :func:`train.eval.predict_image_only.predict_loaded` (val: colour PNGs and mIoU; test: the server's format).
    """
    checkpoint = Path(checkpoint)
    if target is not None and target not in TARGETS:
        raise InputError(None, f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    if output not in OUTPUT_CHOICES:
        raise InputError(None, f"--output must be one of {', '.join(OUTPUT_CHOICES)}, not {output!r}")
    if split not in (*SPLITS, "val"):
        raise InputError(None, f"--split must be test or train (val or test for an image-only target), "
                         f"not {split!r}")
    if limit < 0:
        raise InputError(None, f"--limit must be >= 0, got {limit}")
    dev = resolve_device(device)
    model, cfg, state = load_for_inference(checkpoint, teacher=teacher, device=dev)
    check_target(checkpoint, cfg, target)
    if event_only(cfg):
        if output != "events" and output != "fusion":
            raise InputError(None, f"--output {output}: an event-only model has the events output only")
        return predict_semantic(model, cfg, checkpoint, dev, out=Path(out) if out else None,
                                config=Path(config) if config else None, split=split, limit=limit)
    if image_only(cfg):
        return predict_loaded(model, cfg, checkpoint, dev, out=out, config=config, split=split, limit=limit,
                              output=output)
    if split not in SPLITS:
        raise InputError(None, f"--split must be test or train, not {split!r}")
    out = Path(out) if out is not None else checkpoint.parent.parent / "predictions" / checkpoint.stem
    total, frames = night_frames(Path(config or cfg.data.datasets), cfg, split, limit, state.get(REPRESENTATION_KEY))
    conf_total = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) if split == "test" else None
    count = 0
    with FrameStop() as stop:
        for item in tqdm(frames, total=total, desc=f"predict {split}", unit="frame"):
            count += _predict_frame(model, item, out, output, cfg, conf_total, dev)
            stop.check()
    summary = PredictSummary(out=out, frames=count, split=split, output=output,
                             weights="teacher" if teacher else "student", iteration=state.get("iteration"))
    if conf_total is not None and count:
        summary.conf = conf_total.numpy()
        summary.metrics = summarize(summary.conf)
    return summary


__all__ = ["OUTPUT_CHOICES", "PredictSummary", "frame_panel", "night_frames", "predict"]
