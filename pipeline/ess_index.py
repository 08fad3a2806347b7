"""DSEC-Semantic's sample index and store access: which labels a sequence's window store holds, the
``index.csv`` of every split, and one label's window read back from the store.

Built by :func:`pipeline.ess_windows.preprocess_semantic_sequence`'s stores; read by the event-only loader
(``train/data/dsec_semantic.py``) and by ``cmda index --dataset dsec-semantic``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import store as zstore
from pipeline.atomic import write_text
from pipeline.config import DatasetsConfig
from pipeline.dsec_semantic import load_labels, sequence_paths
from pipeline.errors import InputError
from pipeline.ess_windows import INDEX, chunk_channels, sampled_labels, store_path, window_settings


@dataclass(frozen=True)
class SemanticRow:
    """One sample of the index: a label, its file and its window in the sequence's store."""

    split: str
    sequence: str
    label: int  # position of the label in the sequence (k-th file in name order) = frame of the store
    label_file: str
    timestamp_us: int
    event_start: int  # first event of the window (-1: none)
    event_stop: int  # last event of the window, inclusive (-1: none)
    event_count: int
    store: str


def _rel(cfg: DatasetsConfig, path: Path) -> str:
    base = Path(cfg.source).parent
    return os.path.relpath(Path(path).absolute(), base.absolute())


def open_store(cfg: DatasetsConfig, seq: str) -> zstore.VoxelStore:
    """A finished window store built with the configured window (else one line: rerun preprocessing)."""
    sem = cfg.dsec_semantic
    path = store_path(cfg, seq)
    st = zstore.VoxelStore.open(path, bins=sem.window.chunks * chunk_channels(sem.window))
    want = window_settings(sem.window, sem.compressor, sem.clevel, sem.sampling)
    if st.settings != want:
        changed = sorted(k for k in {**st.settings, **want} if st.settings.get(k) != want.get(k))
        raise InputError(path, f"store was built with other window settings ({', '.join(changed)}): rerun "
                               "`cmda preprocess --dataset dsec-semantic` (or `dvc repro`)")
    return st


def sequence_rows(cfg: DatasetsConfig, seq: str) -> list[SemanticRow]:
    """The sampled labels of one sequence (``dsec_semantic.sampling``), from its finished store."""
    paths = sequence_paths(cfg, seq)
    labels = load_labels(paths)
    st = open_store(cfg, seq)
    if st.frames != len(labels.files) or not np.array_equal(st.index("timestamps"), labels.timestamps):
        raise InputError(st.path, f"store holds {st.frames} labels, {paths.labels_dir} {len(labels.files)} with "
                                  "other timestamps: rerun `cmda preprocess --dataset dsec-semantic`")
    start, stop, count = st.index("window_start"), st.index("window_stop"), st.index("event_count")
    return [SemanticRow(paths.split, seq, int(k), _rel(cfg, labels.files[k]), int(labels.timestamps[k]),
                        int(start[k]), int(stop[k]), int(count[k]), _rel(cfg, st.path))
            for k in sampled_labels(len(labels.files), cfg.dsec_semantic.sampling)]


def index_path(cfg: DatasetsConfig) -> Path:
    return cfg.dsec_semantic.out / INDEX


def write_semantic_index(cfg: DatasetsConfig) -> dict[str, dict[str, int]]:
    """Write ``<dsec_semantic.out>/index.csv`` (every sequence's sampled labels); rows per split and sequence."""
    rows = [r for seq in cfg.dsec_semantic.sequences for r in sequence_rows(cfg, seq)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SemanticRow.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_text(index_path(cfg), buf.getvalue())
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r.split, {}).setdefault(r.sequence, 0)
        counts[r.split][r.sequence] += 1
    return counts


def read_semantic_index(path: str | Path, split: str | None = None) -> list[SemanticRow]:
    """Rows of an ``index.csv`` written by :func:`write_semantic_index` (optionally one split), typed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "DSEC-Semantic index not found (run `cmda index --dataset dsec-semantic`)")
    fields = list(SemanticRow.__dataclass_fields__)
    ints = {k for k, v in SemanticRow.__annotations__.items() if v == "int"}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != fields:
            raise InputError(path, f"unexpected columns {reader.fieldnames}, expected {fields}")
        try:
            rows = [SemanticRow(**{k: int(v) if k in ints else v for k, v in rec.items()}) for rec in reader]
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"line {reader.line_num}: malformed row ({exc})") from None
    return [r for r in rows if split is None or r.split == split]


def read_window(store: zstore.VoxelStore, label: int, chunks: int) -> np.ndarray:
    """A label's stored input (chunks, channels per chunk, 440, 640), oldest chunk first (float32 for the voxel
    grid, else the kind's dtype)."""
    grid = store.voxels(label)
    return grid.reshape(chunks, grid.shape[0] // chunks, *grid.shape[1:])
