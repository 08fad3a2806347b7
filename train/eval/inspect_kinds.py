"""``cmda inspect --kinds``: one DSEC night frame in every event representation ``cmda preprocess`` stored.

For the chosen frame (default: the first test frame of index.csv) the picture shows the warped image, then
one block per entry of datasets.yaml's ``representation.kinds``: each channel of that kind's frame as the
network receives it (:func:`train.data.events_input.network_events`), each tile scaled by its own largest
magnitude (given in its title), red positive, blue negative, white zero
(:func:`train.eval.visualize.events_to_rgb`), under the store name and the network input's range.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline import representations as reps
from pipeline.atomic import write_png
from pipeline.config import load_config
from pipeline.errors import InputError
from train.data.events_input import EventInput, network_events
from train.data.loaders import NightFrames, read_rgb
from train.eval.visualize import events_to_rgb, panel, stack, title_strip

PER_ROW = 6


def channel_names(s: reps.Settings) -> list[str]:
    """What each channel of a kind's frame holds, in the store's channel order."""
    n = reps.channels(s)
    if isinstance(s, reps.HistogramSettings):
        return [f"p{c // s.bins} bin {c % s.bins}" for c in range(n)]
    if isinstance(s, reps.TimeSurfaceSettings):
        return [f"slice {c // 2} p{c % 2}" for c in range(n)]
    if isinstance(s, reps.MdesSettings):
        return [f"u < 2^{c + 1 - s.bins}" for c in range(n)]
    if isinstance(s, reps.Ergo12Settings):
        return [f"ERGO {c}" for c in range(n)]
    return [f"bin {c}" for c in range(n)]


def _tile(a: np.ndarray, width: int) -> np.ndarray:
    """One channel scaled by its largest magnitude (a count of 1 in 10 would be near-white), downscaled."""
    h, w = a.shape[-2:]
    peak = float(np.abs(a).max())
    rgb = events_to_rgb(a / peak if peak > 0 else a)
    return cv2.resize(rgb, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def kind_block(s: reps.Settings, frame: np.ndarray, n_events: int, width: int) -> np.ndarray:
    """One kind's channels as tiles, ``PER_ROW`` a row, under a strip naming the store and the value range."""
    x = network_events(s, frame, n_events)
    names = channel_names(s)
    tiles = [(f"{names[c]} (max |v| {np.abs(x[c]).max():.2g})", _tile(x[c], width)) for c in range(x.shape[0])]
    rows = [panel(tiles[i:i + PER_ROW]) for i in range(0, len(tiles), PER_ROW)]
    head = f"{reps.store_suffix(s)}: {x.shape[0]} channel(s), network input in [{x.min():.2f}, {x.max():.2f}]"
    return stack([title_strip(head, max(r.shape[1] for r in rows)), *rows], gap=0)


def inspect_kinds(config: str | Path = "datasets.yaml", seq: str | None = None, frame: int | None = None,
                  out: str | Path | None = None, width: int = 240) -> Path:
    """Render one frame in every listed representation to ``out`` (default
    ``runs/inspect/kinds_<seq>_<frame>.png``); returns the path. The frame is a test or train frame of
    index.csv (``seq``/``frame``; default the first test frame)."""
    cfg = load_config(config)
    rows = [(split, r) for split in ("test", "train") for r in _rows(cfg, split)]
    chosen = [(sp, r) for sp, r in rows if (seq is None or cfg.sequence(seq) == r.sequence)
              and (frame is None or r.frame == frame)]
    if not chosen:
        raise InputError(cfg.dsec.out / "index.csv", f"no indexed frame {frame} of sequence {seq}")
    split, row = chosen[0]
    blocks = [title_strip(f"{row.sequence} frame {row.frame} ({split}), {row.event_count} events", 6 * width)]
    image = read_rgb(row.warp_image)
    blocks.append(panel([("warped image", cv2.resize(image, (width, round(image.shape[0] * width / image.shape[1]))))]))
    for s in (reps.parse_kind(k) for k in cfg.representation.kinds):
        data = EventInput(s).open(row.store).read(row.frame)
        blocks.append(kind_block(s, np.asarray(data), row.event_count, width))
    path = Path(out) if out is not None else Path("runs") / "inspect" / f"kinds_{row.sequence}_{row.frame:06d}.png"
    write_png(path, stack(blocks, gap=6))
    return path


def _rows(cfg, split: str) -> list:
    try:
        return NightFrames(cfg, split).rows
    except InputError:
        return []
