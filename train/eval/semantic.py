"""Scoring and predicting an event-only DSEC-Semantic model: ESS's evaluation beside cmda's.

One confusion matrix over the whole test split, at 640x440 (the labels' size; the logits are upsampled to
the window's size before the argmax, as every cmda evaluation does). From it, three numbers, each named for
what it is (:mod:`pipeline.ess_metrics`, after ESS's ``evaluation/metrics.py`` in uzh-rpg/ess):

* **ESS mIoU** — the plain mean over the 11 classes, a class absent from both ground truth and prediction
  counting 0 (what ESS and the papers quoting it report);
* **cmda mIoU** — the mean over the classes annotated in the ground truth (cmda's headline everywhere);
* **pixel accuracy** — correct over non-ignored pixels (ESS's "Acc").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import ess_metrics
from pipeline.atomic import write_png, write_text
from pipeline.config import load_config
from pipeline.dsec_semantic import CLASSES as SEMANTIC_CLASSES
from pipeline.errors import InputError
from train.checkpoints.inference import predict_logits
from train.config import TrainConfig
from train.data.dsec_semantic import SemanticTest, window_channels
from train.eval.visualize import colorize, confusion_png, events_to_rgb, panel

OUTPUT = "events"
#: A Cityscapes trainId standing for each DSEC-Semantic class, to draw it in the Cityscapes palette
#: (background as sky, traffic sign as traffic sign, ...).
PALETTE_PROXY = np.array([10, 2, 4, 11, 5, 0, 1, 8, 13, 3, 7], np.int64)


def colorize_semantic(pred: np.ndarray) -> np.ndarray:
    """11-class map (255 = ignore) -> RGB in the Cityscapes colours of :data:`PALETTE_PROXY`; ignore black."""
    lab = np.asarray(pred, np.int64)
    proxy = np.where((lab >= 0) & (lab < len(PALETTE_PROXY)), PALETTE_PROXY[np.clip(lab, 0, 10)], 255)
    return colorize(proxy)


def ess_summary(conf: np.ndarray) -> dict[str, Any]:
    """Both mIoU conventions and pixel accuracy of one 11x11 confusion matrix, in percent."""
    return ess_metrics.summary(np.asarray(conf), SEMANTIC_CLASSES)


def semantic_table(s: dict[str, Any]) -> str:
    """Markdown: IoU per class, then the three headline numbers, each row saying which convention it is."""
    lines = ["| class | IoU |", "|---|---|"]
    lines += [f"| {c} | {v:.2f} |" for c, v in s["iou"].items()]
    lines += [f"| **ESS mIoU** (plain mean over all 11 classes; a class absent from ground truth and prediction "
              f"counts 0) | **{s['miou_ess']:.2f}** |",
              f"| **cmda mIoU** (mean over the {s['annotated_classes']} classes annotated in the ground truth) | "
              f"**{s['miou_annotated']:.2f}** |",
              f"| pixel accuracy (correct / non-ignored pixels; ESS's Acc) | {s['accuracy']:.2f} |"]
    return "\n".join(lines)


def check_channels(model: torch.nn.Module, dcfg) -> None:
    """The model's input channels must be the window's (``chunks x bins`` of ``dsec_semantic.window``, or ``chunks
    x`` its kind's channels)."""
    want = getattr(model, "in_chans", None)
    if want is not None and want != window_channels(dcfg):
        w = dcfg.dsec_semantic.window
        raise InputError(dcfg.source, f"the model takes {want} event channels, dsec_semantic.window gives "
                                      f"{w.chunks} x {window_channels(dcfg) // w.chunks} = {window_channels(dcfg)}: "
                                      "use the datasets.yaml the model was trained with (--config)")


def write_semantic_eval(res: dict[str, Any], cfg: TrainConfig, state: dict[str, Any], checkpoint: Path, *,
                        out: Path | None, teacher: bool) -> dict[str, Any]:
    """``cmda evaluate`` of an event-only model, from the events output's confusion over the test windows
    (``res``): metrics.json (cmda's summary plus ``ess``), iou.md, confusion_events.png."""
    ess = ess_summary(np.asarray(res["confusion"]))
    out = out or checkpoint.parent.parent / "eval" / checkpoint.stem
    summary = {"checkpoint": str(checkpoint), "iteration": state["iteration"], "domain": "night",
               "target": cfg.data.target, "weights": "teacher" if teacher else "student",
               "protocol": "DSEC-Semantic test windows at 640x440, one confusion matrix over the split",
               "outputs": {OUTPUT: {**res, "ess": ess}}}
    write_text(out / "metrics.json", json.dumps(summary, indent=2))
    table = semantic_table(ess)
    write_text(out / "iou.md", table + "\n")
    confusion_png(np.asarray(res["confusion"]), SEMANTIC_CLASSES, out / f"confusion_{OUTPUT}.png",
                  title=f"events only: ESS mIoU {ess['miou_ess']:.2f}, cmda mIoU {ess['miou_annotated']:.2f}")
    return {**summary, "table": table, "out": str(out)}


def predict_semantic(model: torch.nn.Module, cfg: TrainConfig, checkpoint: Path, device: torch.device, *,
                     out: Path | None, config: Path | None, split: str, limit: int) -> dict[str, Any]:
    """``cmda predict`` of an event-only model on DSEC-Semantic's ``split`` (test or train, both labelled):
    ``<seq>_<label>_pred.png`` and ``_panel.png`` (events | prediction | label); ESS's numbers over them."""
    if split not in ("test", "train"):
        raise InputError(None, f"--split must be test or train for dsec-semantic, not {split!r}")
    dcfg = load_config(config or cfg.data.datasets)
    check_channels(model, dcfg)
    data = SemanticTest(dcfg, split, limit)
    out = out or checkpoint.parent.parent / "predictions" / checkpoint.stem
    conf = np.zeros((len(SEMANTIC_CLASSES),) * 2, np.int64)
    for i in tqdm(range(len(data)), desc=f"predict {split}", unit="label"):
        item = data[i]
        logits = predict_logits(model, None, item["events"][None].to(device), (OUTPUT,), amp=cfg.run.amp,
                                scale=cfg.data.test_scale)
        pred = logits[OUTPUT].argmax(1)[0].cpu().numpy().astype(np.uint8)
        label = item["label"].numpy()
        conf += ess_metrics.confusion(pred, label)
        write_png(out / f"{item['name']}_pred.png", colorize_semantic(pred))
        write_png(out / f"{item['name']}_panel.png", panel([("events (window mean)", events_to_rgb(item["events"])),
                                                           ("prediction (events)", colorize_semantic(pred)),
                                                           ("label", colorize_semantic(label))]))
    return {"out": out, "frames": len(data), "split": split, "metrics": ess_summary(conf) if len(data) else {}}
