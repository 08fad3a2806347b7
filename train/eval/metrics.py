"""Segmentation metrics: confusion matrix, per-class IoU, and the mIoU conventions of the field.

DSEC night never annotates truck (trainId 14). CMDA logs a 19-class mean and converts it by
x19/18, which is only right if truck's IoU counted as 0. Here the headline mIoU averages over the
classes that are annotated in the evaluation set (ground-truth pixels > 0): 18 on DSEC night, truck
excluded rather than averaged as 0. The 19-class figure is reported too, computed as mmseg does
(mean over classes whose IoU is defined, i.e. union > 0), for comparison with published logs.
"""

from __future__ import annotations

import numpy as np
import torch

from train.common import CLASSES, IGNORE, NUM_CLASSES


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignore pixels dropped."""
    keep = label != IGNORE
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN where the class is neither in the ground truth nor predicted."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def summarize(conf: np.ndarray) -> dict[str, object]:
    """mIoU over annotated classes (headline), the mmseg-style 19-class mean, per-class IoU, accuracy."""
    conf = np.asarray(conf, dtype=np.int64)
    iou = iou_per_class(conf)
    annotated = conf.sum(1) > 0
    with np.errstate(invalid="ignore"):
        miou = float(np.mean(iou[annotated])) if annotated.any() else float("nan")
        miou19 = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    total = conf.sum()
    return {
        "mIoU": miou,
        "mIoU19": miou19,
        "classes": [CLASSES[i] for i in np.flatnonzero(annotated)] if len(conf) == NUM_CLASSES
        else [int(i) for i in np.flatnonzero(annotated)],
        "n_classes": int(annotated.sum()),
        "iou": {(CLASSES[i] if len(conf) == NUM_CLASSES else str(i)): (None if np.isnan(v) else float(v))
                for i, v in enumerate(iou)},
        "accuracy": float(np.diag(conf).sum() / total) if total else float("nan"),
    }
