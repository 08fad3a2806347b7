"""Pictures of what the network sees and predicts: palette, overlays, event images, tiled panels, plots.

Everything except the two plot writers is a pure function from arrays to ``uint8`` RGB arrays
``[H, W, 3]``, so the trainer, ``cmda predict`` and ``cmda inspect`` compose the same tiles and tests
can check pixels. Conventions:

* Labels / predictions are Cityscapes trainIds; the 19 class colours come from ``cityscapesscripts``
  (the official table, so our pictures match every other Cityscapes figure); 255 (ignore) and any
  other value outside 0..18 are black.
* Signed maps in [-1, 1] (events, IC1, ISR) are drawn on a white background: positive values shade
  towards pure red, negative towards pure blue, 0 stays white (the DSEC / ESS convention, and it
  leaves the empty majority of an event frame readable). ``background="black"`` is the dark variant.
* Plots use matplotlib's Agg canvas directly (no global backend switch, no display needed) and are
  written through :func:`pipeline.atomic.atomic_path`, so a reader never sees half a PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import trainId2label

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from train.common import NUM_CLASSES
from train.data.loaders import IMAGENET_MEAN, IMAGENET_STD

#: [19, 3] uint8 RGB colour of each trainId, from cityscapesscripts' label table.
PALETTE = np.array([trainId2label[i].color for i in range(NUM_CLASSES)], dtype=np.uint8)
# Lookup table with one extra black row that every out-of-range value (ignore included) maps to.
_LUT = np.concatenate([PALETTE, np.zeros((1, 3), np.uint8)])


POSITIVE = np.array([255, 0, 0], np.float32)  # red
NEGATIVE = np.array([0, 0, 255], np.float32)  # blue

TITLE_HEIGHT = 22
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _np(a: Any) -> np.ndarray:
    """Accept torch tensors too (callers often hold one), without importing torch here."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


# ---------------------------------------------------------------------- labels
def colorize(label: Any) -> np.ndarray:
    """trainId map [H, W] (any int dtype) -> [H, W, 3] uint8 RGB; 255 and other non-classes black."""
    lab = _np(label)
    if lab.ndim != 2:
        raise ValueError(f"expected a [H, W] label map, got shape {lab.shape}")
    lab = lab.astype(np.int64)
    idx = np.where((lab >= 0) & (lab < NUM_CLASSES), lab, NUM_CLASSES)
    return _LUT[idx]


def overlay(rgb: Any, label: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend the label colours onto ``rgb`` with weight ``alpha``; ignore pixels keep the plain image,
    so unlabelled regions stay visible instead of turning dark."""
    img = to_rgb(rgb)
    lab = _np(label)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"label {lab.shape} and image {img.shape[:2]} differ in size")
    out = img.astype(np.float32)
    colour = colorize(lab).astype(np.float32)
    keep = ((lab >= 0) & (lab < NUM_CLASSES))[..., None]
    out = np.where(keep, (1 - alpha) * out + alpha * colour, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- inputs
def events_to_rgb(events: Any, background: str = "white") -> np.ndarray:
    """Signed map [C, H, W] or [H, W] in [-1, 1] -> RGB: positive red, negative blue, 0 = background.

    Channels are averaged (the network input repeats one bin 3 times; for several bins the mean keeps
    the [-1, 1] range). Values beyond +-1 are clipped. ``background``: "white" or "black".
    """
    ev = _np(events).astype(np.float32)
    if ev.ndim == 3:
        ev = ev.mean(axis=0)
    if ev.ndim != 2:
        raise ValueError(f"expected [C, H, W] or [H, W] events, got shape {_np(events).shape}")
    if background not in ("white", "black"):
        raise ValueError(f"background must be 'white' or 'black', not {background!r}")
    v = np.clip(np.nan_to_num(ev), -1.0, 1.0)[..., None]
    colour = np.where(v >= 0, POSITIVE, NEGATIVE)
    mag = np.abs(v)
    base = np.float32(255.0 if background == "white" else 0.0)
    out = base + mag * (colour - base)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def denormalize(image_chw: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                ) -> np.ndarray:
    """ImageNet-normalised float [3, H, W] -> uint8 [H, W, 3] RGB (rounded, clipped to 0..255)."""
    x = _np(image_chw).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got shape {x.shape}")
    rgb = x.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def to_rgb(image: Any) -> np.ndarray:
    """uint8 grey [H, W] or RGB [H, W, 3] -> contiguous RGB [H, W, 3] uint8 (floats are clipped to 0..255)."""
    img = _np(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32)), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected [H, W] or [H, W, 3], got shape {img.shape}")
    return np.ascontiguousarray(img)


# ---------------------------------------------------------------------- layout
def title_strip(text: str, width: int, height: int = TITLE_HEIGHT) -> np.ndarray:
    """A dark strip [height, width, 3] with ``text`` in white, shrunk (then cut) to fit the width."""
    strip = np.full((height, width, 3), 32, np.uint8)
    if not text or width < 8:
        return strip
    scale, thickness = height / 40.0, 1
    (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    if tw > width - 8:
        scale *= max((width - 8) / tw, 0.3)
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        while tw > width - 8 and len(text) > 1:  # still too long at the smallest scale: cut it
            text = text[:-2] + "~"
            (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    y = (height + th) // 2
    cv2.putText(strip, text, (4, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return strip


def _pad(img: np.ndarray, height: int, width: int, value: int = 0) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    out = np.full((height, width, 3), value, np.uint8)
    out[:h, :w] = img
    return out


def panel(columns: Sequence[tuple[str, Any]], title_height: int = TITLE_HEIGHT) -> np.ndarray:
    """Tiles side by side, each under a title strip; width = sum of tile widths, height = tallest tile
    + ``title_height``. Shorter tiles are padded with black at the bottom."""
    if not columns:
        raise ValueError("panel needs at least one tile")
    tiles = [(title, to_rgb(img)) for title, img in columns]
    height = max(t.shape[0] for _, t in tiles)
    parts = [np.concatenate([title_strip(title, t.shape[1], title_height), _pad(t, height, t.shape[1])])
             for title, t in tiles]
    return np.concatenate(parts, axis=1)


def stack(rows: Sequence[Any], gap: int = 4) -> np.ndarray:
    """Panels one below the other, left-aligned, separated by ``gap`` white pixels; narrower rows
    are padded with white on the right."""
    if not rows:
        raise ValueError("stack needs at least one row")
    imgs = [to_rgb(r) for r in rows]
    width = max(r.shape[1] for r in imgs)
    parts: list[np.ndarray] = []
    for i, r in enumerate(imgs):
        if i and gap:
            parts.append(np.full((gap, width, 3), 255, np.uint8))
        parts.append(_pad(r, r.shape[0], width, 255))
    return np.concatenate(parts)


# ---------------------------------------------------------------------- plots
def _save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def row_normalize(conf: Any) -> np.ndarray:
    """Confusion counts [C, C] (rows = ground truth) -> each row divided by its sum; NaN rows where a
    class has no ground-truth pixel (so 'never annotated' is not drawn as 'never right')."""
    c = _np(conf).astype(np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square [C, C] matrix, got shape {c.shape}")
    sums = c.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums > 0, c / sums, np.nan)


def confusion_png(conf: Any, classes: Sequence[str], path: str | Path, title: str = "", dpi: int = 100) -> Path:
    """Row-normalised confusion matrix (rows = ground truth, columns = prediction) as a PNG, written
    atomically. Cells show percentages; classes without ground truth are hatched grey rows."""
    from matplotlib.figure import Figure

    norm = row_normalize(conf)
    n = norm.shape[0]
    if len(classes) != n:
        raise ValueError(f"{len(classes)} class names for a {n}x{n} matrix")
    size = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    ax.set_facecolor("#d0d0d0")  # NaN rows (no ground truth) show as grey
    im = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth row")
    ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            if np.isfinite(v) and v >= 0.005:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.5 else "black")
    fig.tight_layout()
    return _save_figure(fig, path, dpi)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The trainer's JSON-lines log, one dict per line. A broken LAST line is dropped (the trainer may
    be writing it right now); a broken line elsewhere is an InputError naming the line."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "metrics log not found")
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise InputError(path, f"line {n} is not valid JSON") from None
        if not isinstance(rec, dict) or "iter" not in rec:
            raise InputError(path, f"line {n} is not an object with an 'iter' key")
        records.append(rec)
    return records


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of one key, sorted by iteration; when an iteration was logged twice (a
    resumed run repeats the steps after its checkpoint) the later line wins. Non-finite values dropped."""
    latest: dict[int, float] = {}
    for rec in records:
        v = rec.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            latest[int(rec["iter"])] = float(v)
    its = np.array(sorted(latest), dtype=np.int64)
    return its, np.array([latest[i] for i in its], dtype=np.float64)


def smooth(values: Any, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points
    are not dragged towards zero."""
    v = _np(values).astype(np.float64)
    out = np.empty_like(v)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(v):
        acc = weight * acc + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def loss_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every ``loss/<term>`` series by term name, without the ones that are identically zero (a
    feature loss whose lambda is 0 would only flatten the plot and rule out the log scale)."""
    out = {}
    for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
        its, vals = metric_series(records, key)
        if len(its) and vals.any():
            out[key[len("loss/"):]] = (its, vals)
    return out


#: Line styles cycled with the colours, so loss terms that lie on top of each other (the fusion and
#: image terms often do) stay distinguishable: a dashed line over a solid one shows both.
LINE_STYLES = ("-", "--", "-.", ":")


def run_title(metrics_jsonl_path: str | Path) -> str:
    """"<run folder>: <variant or source-only>, <backbone>, <iterations> its" from the log's folder
    and the ``config.json`` beside it (just the folder name when there is none)."""
    folder = Path(metrics_jsonl_path).resolve().parent
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        run = cfg["run"]
        what = "source-only" if run.get("source_only") else run.get("variant", "?")
        return f"{folder.name}: {what}, {cfg['model']['backbone']}, {run['iters']} iterations, seed {run['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name


def loss_curve_png(metrics_jsonl_path: str | Path, path: str | Path, smoothing: float = 0.9, dpi: int = 100) -> Path:
    """Plot every ``loss/*`` series (raw faint + smoothed), ``pseudo/weight`` and ``eval/mIoU``.

    Top panel: losses, log-scaled when every value is positive, each term its own colour and line
    style. Middle panel: the pseudo-label weight (share of target pixels the teacher is confident
    about: how much the night side counts), when logged. Bottom panel: ``eval/mIoU`` (in percent
    when logged as a fraction) with the learning rate ``lr`` on a second axis when logged. Titled
    after the run folder. An empty log still gives a PNG saying so, so a caller early in training
    never fails.
    """
    from matplotlib.figure import Figure

    records = read_metrics_jsonl(metrics_jsonl_path)
    series = loss_series(records)
    pw_its, pw = metric_series(records, "pseudo/weight")
    fig = Figure(figsize=(10, 9 if len(pw_its) else 7))
    ratios = [3, 1.2, 1.5] if len(pw_its) else [2, 1]
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    ax_loss, ax_eval = axes[0], axes[-1]
    for k, (name, (its, vals)) in enumerate(series.items()):
        colour, style = f"C{k % 10}", LINE_STYLES[k % len(LINE_STYLES)]
        ax_loss.plot(its, vals, color=colour, alpha=0.2, linewidth=0.7)
        ax_loss.plot(its, smooth(vals, smoothing), color=colour, linestyle=style, linewidth=1.8, label=name)
    if series:
        if all((vals > 0).all() for _, vals in series.values()):
            ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8, ncol=2)
    else:
        ax_loss.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    fig.suptitle(run_title(metrics_jsonl_path), fontsize=11)

    if len(pw_its):
        ax_pw = axes[1]
        # drawn as logged: one scalar per batch that changes slowly, so smoothing would only add lag
        ax_pw.plot(pw_its, pw, color="C2", linewidth=1.8, label="pseudo/weight")
        ax_pw.set_ylim(-0.02, 1.02)
        ax_pw.set_ylabel("pseudo weight")
        ax_pw.legend(fontsize=8, loc="upper left")
        ax_pw.grid(True, alpha=0.3)

    its, miou = metric_series(records, "eval/mIoU")
    if len(its):
        scale = 100.0 if miou.max() <= 1.0 else 1.0
        ax_eval.plot(its, miou * scale, "o-", color="C3", label="eval/mIoU")
        ax_eval.set_ylabel("mIoU (%)")
        ax_eval.margins(y=0.2)  # room for the best-value label
        best = int(np.argmax(miou))
        ax_eval.annotate(f"{miou[best] * scale:.2f}", (its[best], miou[best] * scale), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_eval.transAxes)
    lr_its, lr = metric_series(records, "lr")
    if len(lr_its):
        ax_lr = ax_eval.twinx()
        ax_lr.plot(lr_its, lr, color="grey", linewidth=1.0, alpha=0.7, linestyle="--")
        ax_lr.set_ylabel("lr (dashed)", color="grey")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_eval.set_xlabel("iteration")
    ax_eval.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, dpi)
