"""Small processed trees for the loader, trainer and predict tests, written with the pipeline's own writers.

The night side is written directly (voxel store, warped PNGs, labels, index.csv) so these tests do
not depend on the sample generator or the warp step; the Cityscapes side is the 256x128 tree of
tests/test_cityscapes.py converted by ``convert_cityscapes``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import write_png, write_text
from pipeline.cityscapes import convert_cityscapes
from pipeline.splits import TABLE, Row, _csv
from pipeline.store import FrameChunks, mark_complete, open_for_writing, write_index_arrays
from tests.test_cityscapes import make_tree

SEQ = "zurich_city_09_a"
TEST_FRAMES = (2, 20)
TRAIN_FRAMES = (42, 44)
N_FRAMES = 46
# Predict runs a real (random) MiT-B0 + DAFormer head, ~10 s per 440x640 frame on 2 CPU cores, so the
# fast tests use small frames and a matching test crop; one slow test runs the real DSEC size.
H, W = 96, 128
TEST_ROWS = 64


def _night_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 30 * np.sin(xx / 23.0 + rng.uniform(0, 6))[..., None] + 20 * np.cos(yy / 17.0)[..., None]
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    lab = np.full((h, w), 2, np.uint8)  # building
    lab[: h * 5 // 16] = 10  # sky
    lab[h * 11 // 16:] = 0  # road
    lab[h // 2: h * 11 // 16, w // 6: w * 2 // 5] = 13  # car
    lab[h * 2 // 5: h * 11 // 16, w * 5 // 8: w * 5 // 8 + 4] = 5  # pole
    lab[rng.random((h, w)) < 0.02] = 255
    return lab


def make_night(root: Path, h: int = H, w: int = W) -> None:
    """A one-sequence processed DSEC tree of h x w frames: Zarr voxel store, warped images, labels, index.csv."""
    rng = np.random.default_rng(0)
    out, dsec = root / "processed", root / "DSEC"
    store = out / SEQ / "events.zarr"
    group, _, _ = open_for_writing(store, {"settings": {"bins": 1}}, frames=N_FRAMES, bins=1, height=h, width=w,
                                   cname="lz4", clevel=1)
    writer = FrameChunks(store)
    rows = []
    for split, frames in (("test", TEST_FRAMES), ("train", TRAIN_FRAMES)):
        for f in frames:
            grid = np.zeros((1, h, w), np.float32)
            idx = rng.integers(0, h * w, 20_000)
            np.add.at(grid[0].reshape(-1), idx, rng.choice([-1.0, 1.0], 20_000).astype(np.float32))
            writer.write(f, grid)
            warped = out / SEQ / "warp_images" / f"{f:06d}.png"
            write_png(warped, _night_image(rng, h, w))
            label = ""
            if split == "test":
                label = str(dsec / SEQ / "labels" / f"{SEQ}_{f:06d}_grey_gtFine_labelTrainIds.png")
                write_png(label, _label(rng, h, w))
            rows.append(Row(split=split, sequence=SEQ, frame=f, timestamp_us=1_000_000 + 50_000 * f,
                            event_index=20_000 * (f + 1), event_start=20_000 * f, event_stop=20_000 * (f + 1) - 1,
                            event_count=20_000, image=str(dsec / SEQ / "images" / "left" / f"{f:06d}.png"),
                            warp_image=str(warped), label=label, store=str(store)))
    zeros = np.zeros(N_FRAMES, np.int64)
    write_index_arrays(group, {"timestamps": zeros, "event_index": zeros, "window_start": zeros,
                               "window_stop": zeros, "event_count": zeros, "valid": np.ones(N_FRAMES, bool)})
    mark_complete(group, store, {})
    write_text(out / TABLE, _csv(rows))


def datasets_yaml(root: Path) -> Path:
    cfg = root / "datasets.yaml"
    cfg.write_text(f"dsec:\n  root: DSEC\n  out: processed\n  sequences:\n    {SEQ}: {{labelled: [0, 39]}}\n"
                   "cityscapes:\n  root: cs_raw\n  out: cs_out\n")
    return cfg




def training_tree(root: Path) -> Path:
    """DSEC-size night frames (training crops need 480x640) plus a converted Cityscapes tree."""
    make_night(root, 480, 640)
    make_tree(root / "cs_raw")
    convert_cityscapes(root / "cs_raw", root / "cs_out", workers=1)
    return datasets_yaml(root)
