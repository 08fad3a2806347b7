"""Small DSEC trees for tests: the real Prophesee recording wrapped as a DSEC sequence."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.dsec import EventFile


def write_config(root: Path, dsec_root: Path, sequences: dict[str, tuple[int, int]], **rep) -> Path:
    lines = [
        "dsec:",
        f"  root: {dsec_root}",
        f"  out: {root / 'processed'}",
        "  sequences:",
        *[f"    {name}: {{labelled: [{a}, {b}]}}" for name, (a, b) in sequences.items()],
        "representation:",
        *[f"  {k}: {v}" for k, v in rep.items()],
    ]
    path = root / "datasets.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def real_sequence_tree(real_dir: Path, root: Path, name: str = "zurich_city_09_a", step_us: int = 5_000):
    """Copy the real recording into ``root/DSEC/<name>`` with image timestamps every ``step_us``.

    The first timestamp lies before the first event and the last after the last event, so both
    'outside the stream' cases are present.
    """
    seq = root / "DSEC" / name
    (seq / "events" / "left").mkdir(parents=True)
    (seq / "images").mkdir(parents=True)
    src = real_dir / "prophesee_gen3_vga"
    shutil.copy(src / "events.h5", seq / "events" / "left" / "events.h5")
    shutil.copy(src / "rectify_map.h5", seq / "events" / "left" / "rectify_map.h5")
    with EventFile(seq / "events" / "left" / "events.h5") as ef:
        t0 = ef.t_offset + ef.t_first
        t1 = ef.t_offset + ef.t_last
    ts = np.arange(t0 - 1_000, t1 + step_us, step_us, dtype=np.int64)
    (seq / "images" / "timestamps.txt").write_text("".join(f"{v}\n" for v in ts))
    return seq, ts


def real_config(real_dir: Path, root: Path, **rep):
    real_sequence_tree(real_dir, root)
    path = write_config(root, root / "DSEC", {"zurich_city_09_a": (0, 5)}, **rep)
    return load_config(path)


# ---------------------------------------------------------------------- generated sequences
# The same shape of tree built from data the tests write themselves, so a fresh clone without
# ../shared runs every preprocess/index check: ~100 ms of events at 2 M events/s on a 640x480
# sensor, a distorted rectify map with some pixels off the grid (like DSEC's), the first image
# before the stream and the last after it.
SYN_EVENTS = 200_000
SYN_T_OFFSET = 47_000_000_000
SENSOR_H, SENSOR_W = 480, 640


def synthetic_events(n: int = SYN_EVENTS, seed: int = 0, duration_us: int = 96_000):
    rng = np.random.default_rng(seed)
    # Clustered positions (an edge sweeping the sensor) so windows are dense in places, sparse elsewhere.
    t = np.sort(rng.integers(0, duration_us, n)).astype(np.uint32)
    cx = (t.astype(np.float64) / duration_us * 900) % 640
    x = np.clip(cx + rng.normal(0, 40, n), 0, 639).astype(np.uint16)
    x[rng.random(n) < 0.05] = 321  # a hot column, as real sensors have
    y = rng.integers(0, 480, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    return x, y, p, t


def synthetic_rectify_map(seed: int = 0, height: int = SENSOR_H, width: int = SENSOR_W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rmap = np.stack([xx * 1.03 - 12 + rng.random((height, width), np.float32),
                     yy * 1.02 - 4 + rng.random((height, width), np.float32)], axis=-1)
    return rmap.astype(np.float32)


def write_rectify_map(path: Path, rmap: np.ndarray) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["rectify_map"] = rmap


def synthetic_sequence_tree(root: Path, name: str = "zurich_city_09_a", step_us: int = 5_000,
                            n: int = SYN_EVENTS, seed: int = 0):
    """``root/DSEC/<name>`` from generated events, laid out like :func:`real_sequence_tree`."""
    from pipeline.events_h5 import write_events_h5

    seq = root / "DSEC" / name
    (seq / "images").mkdir(parents=True)
    x, y, p, t = synthetic_events(n, seed)
    write_events_h5(seq / "events" / "left" / "events.h5", x, y, p, t, SYN_T_OFFSET)
    write_rectify_map(seq / "events" / "left" / "rectify_map.h5", synthetic_rectify_map(seed))
    t0, t1 = SYN_T_OFFSET + int(t[0]), SYN_T_OFFSET + int(t[-1])
    ts = np.arange(t0 - 1_000, t1 + step_us, step_us, dtype=np.int64)
    (seq / "images" / "timestamps.txt").write_text("".join(f"{v}\n" for v in ts))
    return seq, ts


def sequence_tree(source: Path | None, root: Path, **kw):
    """:func:`real_sequence_tree` when ``source`` is the real data folder, else the generated one."""
    return real_sequence_tree(source, root, **kw) if source is not None else synthetic_sequence_tree(root, **kw)


def sequence_config(source: Path | None, root: Path, **rep):
    """datasets.yaml of one sequence (real or generated) with labelled range 0..5."""
    sequence_tree(source, root)
    path = write_config(root, root / "DSEC", {"zurich_city_09_a": (0, 5)}, **rep)
    return load_config(path)
