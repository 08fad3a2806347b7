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
