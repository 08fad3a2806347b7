"""``cmda index``: the DSEC night train/test split, as CMDA's index files and as our own table.

The split rules come from ``datasets.yaml`` (labelled ranges, test-frame rule, even frames, minimum
frame); this module only applies them to what ``cmda preprocess`` found (the per-image event index
in ``images_to_events_index.txt``, from which the windows follow). It deliberately does not read
the voxel store, so changing the number of bins does not invalidate the split.

Per sequence, ``splits/<seq>.csv`` holds that sequence's rows (a DVC stage per sequence); merging
them writes three files in ``dsec.out``:

* ``night_dataset_warp.txt`` / ``night_test_dataset_warp.txt`` — CMDA-compatible, one line per
  sample: ``<dsec root>/<seq>/images/left/rectified/NNNNNN.png <images_to_events index>``. CMDA's
  loader derives the warped image path from it by replacing ``images/left/rectified`` with
  ``warp_images``.
* ``index.csv`` — our richer table (split, sequence, frame, timestamp, event window, paths) that
  the cmda training loaders read.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import write_text
from pipeline.config import DatasetsConfig
from pipeline.dsec import SequencePaths, load_timestamps, window_bounds
from pipeline.errors import InputError, warn
from pipeline.preprocess import event_index_path, store_path
from pipeline.store import VoxelStore

TRAIN_TXT = "night_dataset_warp.txt"
TEST_TXT = "night_test_dataset_warp.txt"
TABLE = "index.csv"


@dataclass(frozen=True)
class Row:
    split: str
    sequence: str
    frame: int
    timestamp_us: int
    event_index: int
    event_start: int
    event_stop: int
    event_count: int
    image: str
    warp_image: str
    label: str
    store: str


def warp_dir(cfg: DatasetsConfig, seq: str) -> Path:
    return cfg.dsec.out / seq / "warp_images"


def test_frames(cfg: DatasetsConfig, seq: str, n_frames: int) -> list[int]:
    """Test frames of ``seq`` by the configured rule (see ``dsec.test_split`` in datasets.yaml)."""
    lo, hi = cfg.dsec.sequences[seq].labelled
    if hi < 0:
        return []
    hi = min(hi, n_frames - 1)
    paths = SequencePaths(cfg.dsec.root, seq)
    if cfg.dsec.test_split == "rule":
        first = max(lo, cfg.dsec.label_first)
        first += (cfg.dsec.label_first - first) % cfg.dsec.label_every
        frames = list(range(first, hi + 1, cfg.dsec.label_every))
        missing = [f for f in frames if not paths.label(f).exists()]
        if missing:
            raise InputError(paths.label(missing[0]), f"label missing for test frame {missing[0]} "
                             f"({len(missing)} of {len(frames)} test labels missing)")
        return frames
    return [f for f in range(lo, hi + 1) if paths.label(f).exists()]


def train_frames(cfg: DatasetsConfig, seq: str, valid: np.ndarray) -> list[int]:
    """Frames after the labelled range, >= train_min_frame, even if configured, with a window."""
    _, hi = cfg.dsec.sequences[seq].labelled
    first = max(hi + 1, cfg.dsec.train_min_frame)
    return [f for f in range(first, len(valid))
            if valid[f] and (not cfg.dsec.train_even_only or f % 2 == 0)]


def read_event_index(path: Path, frames: int) -> np.ndarray:
    """The per-image event index written by ``cmda preprocess`` (CMDA's images_to_events_index.txt)."""
    if not path.exists():
        raise InputError(path, "event index not found (run `cmda preprocess` first)")
    try:
        index = np.array(path.read_text().split(), dtype=np.int64)
    except ValueError:
        raise InputError(path, "not a list of integer event indices") from None
    if index.shape != (frames,):
        raise InputError(path, f"holds {index.size} entries, the sequence has {frames} images")
    return index


def split_path(cfg: DatasetsConfig, seq: str) -> Path:
    return cfg.dsec.out / "splits" / f"{seq}.csv"


def build_rows(cfg: DatasetsConfig, seq: str) -> list[Row]:
    """Train and test rows of one sequence (needs its event index and warped images)."""
    paths = SequencePaths(cfg.dsec.root, seq)
    spath = store_path(cfg, seq)
    VoxelStore.open(spath, bins=cfg.representation.bins)  # refuses a missing or unfinished store
    ts = load_timestamps(paths.timestamps)
    index = read_event_index(event_index_path(cfg, seq), len(ts))
    start, stop, valid = window_bounds(index)
    count = np.where(valid, stop - start + 1, 0)
    wdir = warp_dir(cfg, seq)
    rows: list[Row] = []
    tests = test_frames(cfg, seq, len(ts))
    no_window = [f for f in tests if not valid[f]]
    if no_window:
        warn(paths.timestamps, f"{len(no_window)} test frame(s) of {seq} have no event window (kept, events "
             f"empty): {', '.join(f'{f:06d}' for f in no_window[:8])}")
    for split, frames in (("train", train_frames(cfg, seq, valid)), ("test", tests)):
        for f in frames:
            warped = wdir / f"{f:06d}.png"
            if not warped.exists():
                raise InputError(warped, f"warped image missing for {split} frame {f} (run `cmda warp --seq {seq}`)")
            rows.append(Row(
                split=split, sequence=seq, frame=f, timestamp_us=int(ts[f]), event_index=int(index[f]),
                event_start=int(start[f]), event_stop=int(stop[f]), event_count=int(count[f]),
                image=_rel(cfg, paths.image(f)), warp_image=_rel(cfg, warped),
                label=_rel(cfg, paths.label(f)) if split == "test" else "", store=_rel(cfg, spath),
            ))
    return rows


def _rel(cfg: DatasetsConfig, path: Path) -> str:
    """A path as index.csv stores it: relative to the datasets.yaml's folder (as the paths inside
    datasets.yaml are), so the trainer finds the files whatever folder it runs in."""
    base = Path(cfg.source).parent if getattr(cfg, "source", None) else Path(".")
    return os.path.relpath(Path(path).absolute(), base.absolute())


def _csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(Row.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    return buf.getvalue()


def write_sequence_split(cfg: DatasetsConfig, seq: str) -> dict[str, int]:
    """Write ``splits/<seq>.csv``; returns the number of train and test rows."""
    rows = build_rows(cfg, seq)
    write_text(split_path(cfg, seq), _csv(rows))
    return {"train": sum(r.split == "train" for r in rows), "test": sum(r.split == "test" for r in rows)}


def merge_splits(cfg: DatasetsConfig) -> dict[str, dict[str, int]]:
    """Merge the per-sequence splits into CMDA's two index files and index.csv; counts per sequence."""
    rows = [r for seq in cfg.dsec.sequences for r in read_index(split_path(cfg, seq))]
    out = cfg.dsec.out
    for name, split in ((TRAIN_TXT, "train"), (TEST_TXT, "test")):
        # CMDA's own files name the raw images under dsec.root, as CMDA's loader expects them
        write_text(out / name, "".join(f"{SequencePaths(cfg.dsec.root, r.sequence).image(r.frame)} {r.event_index}\n"
                                       for r in rows if r.split == split))
    write_text(out / TABLE, _csv(rows))
    counts: dict[str, dict[str, int]] = {seq: {"train": 0, "test": 0} for seq in cfg.dsec.sequences}
    for r in rows:
        counts[r.sequence][r.split] += 1
    return counts


def write_index(cfg: DatasetsConfig) -> dict[str, dict[str, int]]:
    """Every sequence's split, then the merged files (what ``cmda index`` does by default)."""
    for seq in cfg.dsec.sequences:
        write_sequence_split(cfg, seq)
    return merge_splits(cfg)


def read_index(path: str | Path, split: str | None = None) -> list[Row]:
    """Rows of an ``index.csv`` (optionally one split), typed."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "index table not found (run `cmda index` or `dvc repro`)")
    ints = {k for k, v in Row.__annotations__.items() if v == "int"}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(Row.__dataclass_fields__):
            raise InputError(path, f"unexpected columns {reader.fieldnames}")
        rows = [Row(**{k: int(v) if k in ints else v for k, v in rec.items()}) for rec in reader]
    return [r for r in rows if split is None or r.split == split]
