"""A tiny raw DSEC night sequence (events.h5, rectify map, calibration, 1440x1080 images, labels), processed
with the pipeline's own steps (preprocess, warp, index): what ``cmda stream`` replays and ``cmda predict``
reads, built in a couple of seconds without the sample generator's renderer."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.atomic import write_png
from pipeline.calib import rectify_map_from_calibration, synthetic_calibration, write_calibration
from pipeline.config import load_config
from pipeline.dsec import SequencePaths
from pipeline.events_h5 import write_events_h5
from pipeline.preprocess import preprocess_sequence
from pipeline.splits import write_index
from pipeline.warp import warp_sequence

SEQ = "zurich_city_09_a"
N_IMAGES = 8
PERIOD_US = 50_000
T_OFFSET = 10_000_000_000
FIRST_IMAGE_US = 5_000  # relative to t_offset; the events start at 0
TEST_FRAMES = (2, 5)  # label_first 2, label_every 3, labelled [0, 6]


def write_raw_sequence(root: Path, seed: int = 0, events_per_window: int = 3_000) -> SequencePaths:
    rng = np.random.default_rng(seed)
    paths = SequencePaths(root / "DSEC", SEQ)
    calib = synthetic_calibration(np.random.default_rng(1))
    write_calibration(paths.calibration, calib)
    paths.rectify_map.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(paths.rectify_map, "w") as f:
        f.create_dataset("rectify_map", data=rectify_map_from_calibration(calib))
    ts = FIRST_IMAGE_US + PERIOD_US * np.arange(N_IMAGES, dtype=np.int64)
    paths.timestamps.parent.mkdir(parents=True, exist_ok=True)
    paths.timestamps.write_text("".join(f"{T_OFFSET + t}\n" for t in ts))
    # events until just after the last image, denser at random hot spots so windows differ
    n = events_per_window * N_IMAGES
    t = np.sort(rng.integers(0, int(ts[-1]) + 2_000, n)).astype(np.uint32)
    x = rng.integers(0, 640, n).astype(np.uint16)
    y = rng.integers(0, 480, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    write_events_h5(paths.events, x, y, p, t, T_OFFSET)
    w, h = calib.rect[1].resolution
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(N_IMAGES):
        base = 60 + 40 * np.sin(xx / (90.0 + 7 * i)) + 30 * np.cos(yy / 70.0)
        img = np.clip(base[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        write_png(paths.image(i), img)
        if i in TEST_FRAMES:
            lab = np.full((480, 640), 2, np.uint8)
            lab[:150] = 10
            lab[330:] = 0
            write_png(paths.label(i), lab)
    return paths


def datasets_yaml(root: Path, bins: int = 1) -> Path:
    cfg = root / "datasets.yaml"
    cfg.write_text(f"dsec:\n  root: DSEC\n  out: processed\n  test_split: rule\n  label_first: 2\n  label_every: 3\n"
                   f"  sequences:\n    {SEQ}: {{labelled: [0, 6]}}\nrepresentation:\n  bins: {bins}\n"
                   "cityscapes:\n  root: cs_raw\n  out: cs_out\n")
    return cfg


def raw_tree(root: Path, bins: int = 1) -> Path:
    """Raw sequence + its processed store, warped images and index; returns datasets.yaml."""
    write_raw_sequence(root)
    path = datasets_yaml(root, bins)
    cfg = load_config(path)
    preprocess_sequence(cfg, SEQ, workers=1)
    warp_sequence(SequencePaths(cfg.dsec.root, SEQ), cfg.dsec.out / SEQ, workers=1)
    write_index(cfg)
    return path
