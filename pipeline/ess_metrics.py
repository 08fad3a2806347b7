"""ESS's evaluation of DSEC-Semantic predictions, beside cmda's, as pure NumPy functions.

ESS (uzh-rpg/ess, evaluation/metrics.py; training/ess_trainer.py) accumulates one confusion matrix over
the whole test set, rows = ground truth, columns = prediction, pixels whose ground truth is 255 left out.
From it:

* IoU_c = TP / (TP + FP + FN) with the denominator clamped at 1e-12, so a class absent from both the
  ground truth and the predictions scores **0** (not NaN) and still counts;
* **ESS mIoU** = the plain mean of the 11 IoUs;
* **accuracy** = correct pixels / valid pixels.

cmda's mIoU is the mean over the classes present in the ground truth (:func:`miou_annotated`), the usual
Cityscapes-style reading; on the full DSEC-Semantic test set every class is annotated, so the two agree
there, and they differ on subsets (a sample tree, one sequence). Percentages, like ESS prints them.
"""

from __future__ import annotations

import numpy as np

from pipeline.dsec_semantic import IGNORE, NUM_CLASSES


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int = NUM_CLASSES, ignore: int = IGNORE) -> np.ndarray:
    """int64 (C, C) confusion, rows = ground truth, columns = prediction; ``ignore`` pixels left out.

    Predictions must be class ids 0..C-1 (an argmax); a ground-truth value outside 0..C-1 other than
    ``ignore`` is a ValueError (ESS would silently index another cell)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    keep = gt != ignore
    p = pred[keep].astype(np.int64)
    g = gt[keep].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions must be class ids 0..{num_classes - 1}, got {p.min()}..{p.max()}")
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"ground truth must be 0..{num_classes - 1} or {ignore}, got {g.min()}..{g.max()}")
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of every class in percent; 0 where TP + FP + FN = 0 (ESS's clamp at 1e-12)."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    return 100.0 * tp / np.maximum(union, 1e-12)


def miou_ess(conf: np.ndarray) -> float:
    """ESS's mIoU: the plain mean over all classes, absent-everywhere classes counting as 0."""
    return float(iou_per_class(conf).mean())


def miou_annotated(conf: np.ndarray) -> float:
    """cmda's mIoU: the mean over the classes that occur in the ground truth (NaN if none does)."""
    present = np.asarray(conf).sum(axis=1) > 0
    return float(iou_per_class(conf)[present].mean()) if present.any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correct pixels over valid (non-ignore) pixels, in percent (0 when there are none, as ESS clamps)."""
    conf = np.asarray(conf, np.float64)
    return float(100.0 * np.trace(conf) / max(conf.sum(), 1e-12))


def summary(conf: np.ndarray, class_names: tuple[str, ...] | None = None) -> dict[str, object]:
    """Both readings of one confusion matrix, labelled so a report can say which is which."""
    ious = iou_per_class(conf)
    names = class_names or tuple(str(c) for c in range(len(ious)))
    return {"miou_ess": miou_ess(conf), "miou_annotated": miou_annotated(conf), "accuracy": pixel_accuracy(conf),
            "iou": dict(zip(names, ious.tolist(), strict=True)),
            "annotated_classes": int((np.asarray(conf).sum(axis=1) > 0).sum())}
