"""Evaluation on the night benchmark (DSEC's test frames, or an image-only target's val split):
per-output confusion matrices, IoU tables, mIoU.

Used by the training loop (every ``eval_every`` iterations, student, fusion output) and by
``cmda evaluate CHECKPOINT`` (fusion, image and event outputs, tables and confusion-matrix PNGs).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import write_text
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.lock import exclusive
from train.checkpoints.inference import (
    REPRESENTATION_KEY,
    check_target,
    load_for_inference,
    predict_logits,
    record_channels,
)
from train.common import CLASSES, NUM_CLASSES
from train.common.device import resolve_device
from train.config import event_only, image_only
from train.data.batches import night_eval_set
from train.data.dsec_semantic import SemanticTest
from train.data.events_input import from_record
from train.data.image_only import DayIsr
from train.data.loaders import CityscapesVal
from train.eval.metrics import confusion, summarize
from train.eval.semantic import OUTPUT as SEMANTIC_OUTPUT
from train.eval.semantic import check_channels, write_semantic_eval
from train.eval.visualize import confusion_png

EVAL_OUTPUTS = ("fusion", "image", "events")


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device,
             outputs: tuple[str, ...] = EVAL_OUTPUTS, amp: bool = True, workers: int = 0,
             progress: bool = True, scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """Confusion matrix and summary per output over the whole dataset (``model.num_classes`` classes; items
    without an image are an event-only model's)."""
    was_training = model.training
    model.eval()
    n = getattr(model, "num_classes", NUM_CLASSES)
    conf = {o: torch.zeros(n, n, dtype=torch.int64) for o in outputs}
    loader = DataLoader(dataset, batch_size=1, num_workers=workers)
    try:
        for batch in tqdm(loader, desc="evaluate", unit="frame", disable=not progress, leave=False):
            image = batch["image"].to(device) if "image" in batch else None
            events = batch["events"].to(device)
            label = batch["label"].to(device)
            logits = predict_logits(model, image, events, outputs, amp, scale)
            for o in outputs:
                conf[o] += confusion(logits[o].argmax(1), label, n)
    finally:
        model.train(was_training)
    return {o: {**summarize(conf[o].numpy()), "confusion": conf[o].numpy().tolist()} for o in outputs}


def iou_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per class, one column per output, mIoU rows at the bottom."""
    outputs = list(results)
    lines = ["| class | " + " | ".join(outputs) + " |", "|---|" + "---|" * len(outputs)]
    for c in CLASSES:
        cells = []
        for o in outputs:
            v = results[o]["iou"][c]
            annotated = c in results[o]["classes"]
            cells.append("n/a" if v is None or not annotated else f"{100 * v:.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    n = results[outputs[0]]["n_classes"]
    lines.append(f"| **mIoU ({n} annotated classes)** | "
                 + " | ".join(f"**{100 * results[o]['mIoU']:.2f}**" for o in outputs) + " |")
    lines.append("| mIoU (19, mmseg-style) | "
                 + " | ".join(f"{100 * results[o]['mIoU19']:.2f}" for o in outputs) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: Path, *, datasets: Path | None = None, out: Path | None = None,
                        teacher: bool = False, device: str = "auto", limit: int = 0,
                        domain: str = "night", target: str | None = None) -> dict[str, Any]:
    """``cmda evaluate``: metrics.json, iou.md and one confusion-matrix PNG per output.

    An event-only checkpoint (``data.target=dsec-semantic``) is scored on DSEC-Semantic's test windows with
    ESS's mIoU, cmda's mIoU and pixel accuracy (:mod:`train.eval.semantic`).

    ``domain="night"``: the night benchmark the checkpoint trained for, or ``target``: DSEC's night test
    frames, or an image-only target's val split (Dark Zurich / ACDC night, labelled, scored at
    ``data.target_resize``; the "events" column is then the ISR branch). ``domain="day"``: the
    Cityscapes val frames at the training resolution, IC1 standing in for events: how much of the
    day skill survives the night is the gap adaptation has to close.
    """

    checkpoint = Path(checkpoint)
    out = out or checkpoint.parent.parent / "eval" / (checkpoint.stem + ("" if domain == "night" else "_day"))
    with run_folder_lock(checkpoint, out):
        return _evaluate_into(checkpoint, out, datasets=datasets, teacher=teacher, device=device, limit=limit,
                              domain=domain, target=target)


def run_folder_lock(checkpoint: Path, out: Path) -> contextlib.AbstractContextManager:
    """The lock of the run folder ``out`` lies in (the checkpoint's run), so an evaluation never writes
    into a run that a training is writing (the same lock as :func:`train.engine.run_folder.run_lock`)."""
    run = Path(os.path.abspath(checkpoint)).parent.parent
    inside = Path(os.path.abspath(out)).is_relative_to(run)
    if not (inside and (run / "config.json").exists()):
        return contextlib.nullcontext()
    return exclusive(run, "cmda process", "wait for it to finish, or evaluate into another folder with --out")


def _evaluate_into(checkpoint: Path, out: Path, *, datasets: Path | None, teacher: bool, device: str, limit: int,
                   domain: str, target: str | None) -> dict[str, Any]:
    dev = resolve_device(device)
    model, cfg, state = load_for_inference(checkpoint, teacher, dev)
    check_target(checkpoint, cfg, target)
    dcfg = load_config(datasets or cfg.data.datasets)
    if event_only(cfg):  # DSEC-Semantic: the test windows, ESS's numbers beside cmda's
        if domain != "night":
            raise InputError(None, "--domain day is for models with an image input; an event-only DSEC-Semantic "
                             "model is scored on its test windows only")
        check_channels(model, dcfg)
        res = evaluate(model, SemanticTest(dcfg, "test", limit), dev, (SEMANTIC_OUTPUT,), cfg.run.amp,
                       scale=cfg.data.test_scale)[SEMANTIC_OUTPUT]
        return write_semantic_eval(res, cfg, state, checkpoint, out=out, teacher=teacher)
    record = state.get(REPRESENTATION_KEY)
    if domain == "night":
        events = None if image_only(cfg) else from_record(record, dcfg, checkpoint)
        results = evaluate(model, night_eval_set(dcfg, cfg, limit, events), dev, EVAL_OUTPUTS, cfg.run.amp,
                           scale=cfg.data.test_scale)
    elif domain == "day":
        day = CityscapesVal(dcfg, cfg.data, limit=limit, channels=record_channels(record))
        if image_only(cfg):  # an image + ISR model takes the day ISR, not IC1, as its second input

            day = DayIsr(day)
        results = evaluate(model, day, dev, EVAL_OUTPUTS, cfg.run.amp)
    else:
        raise InputError(None, f"--domain must be night or day, got {domain!r}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": str(checkpoint), "iteration": state["iteration"], "domain": domain,
               "target": cfg.data.target,
               "weights": "teacher" if teacher else "student", "outputs": results}
    write_text(out / "metrics.json", json.dumps(summary, indent=2))
    table = iou_table(results)
    write_text(out / "iou.md", table + "\n")
    for o, r in results.items():
        confusion_png(np.asarray(r["confusion"]), CLASSES, out / f"confusion_{o}.png",
                      title=f"{o} output, mIoU {100 * r['mIoU']:.2f}")
    summary["table"] = table
    summary["out"] = str(out)
    return summary
