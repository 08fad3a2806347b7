"""ESS's event input per DSEC-Semantic label, precomputed once into a Zarr store, and the index files.

ESS (uzh-rpg/ess, DSEC/dataset/sequence.py with DSEC/utils/eventslicer.py) builds, for every label at time T
(DSEC image clock):

* ``mode: events`` (ESS's setting, ``fixed_duration: False``): the last N = 2,000,000 events with
  ``t + t_offset < T`` (strictly before; fewer at the start of a sequence: all of them), cut into S = 20
  consecutive chunks of ``n // S`` events (``n`` the events found; ESS's slicing drops the newest ``n % S``).
* ``mode: duration`` (``fixed_duration: True``): S consecutive spans of ``duration / S`` ending at T,
  each holding the events with ``start <= t + t_offset < end``.

Each chunk becomes a B = 5-bin voxel grid in DSEC's formula (DSEC scripts/dataset/representations.py
``VoxelGrid``, the same kernel as :mod:`pipeline.voxel`: rectified float coordinates, base corner by
truncation, time normalised by the chunk's own first and last event, no normalisation afterwards); the S
grids are stacked to ``S*B`` channels and the bottom 40 rows dropped (640x440, the labels' frame). ESS does
this for every sample it draws (2 M events sliced per sample); here it is done once per label.

The voxel kernel is :func:`pipeline.voxel.accumulate_voxels` with B bins, which is DSEC's formula (it is
CMDA's kernel too).

Other representations (``dsec_semantic.window.kind``: any entry ``representation.kinds`` accepts, e.g.
``{kind: histogram, bins: 10, cutoff: 10}``): each chunk becomes that kind's frame of the chunk's events
(:func:`pipeline.representations.build_in_pieces`, the chunk's own first and last event setting its time
normalisation, as for the voxel grid), rows 0-439 kept, stacked oldest chunk first to
``chunks * channels(kind)`` channels in the kind's dtype (histogram uint8, MDES int8, the others float32; the
loader scales them as :func:`train.data.events_input.network_events` does). The store's settings then carry
``kind`` (the kind and its parameters) and ``dtype``; a store without ``kind`` holds the voxel grid.

Store layout ``<dsec_semantic.out>/<seq>/windows.zarr`` (:mod:`pipeline.store`'s format: resumable, rebuilt
when settings or sources change): ``voxels`` float32 (labels, S*B, 440, 640) (another kind: its channels and
dtype), one label per chunk (an all-zero
label, e.g. one without events, has no chunk file and reads as zeros); the per-label arrays of
:data:`pipeline.store.INDEX_ARRAYS` (``timestamps`` = label times; ``event_index`` = last event strictly before
the label; ``window_start``/``window_stop`` = first and last event used, inclusive; ``event_count``; ``valid``);
``chunk_start``/``chunk_stop`` int64 (labels, S), each chunk's events ``[start, stop)``; and ``stored`` bool
(labels,), the labels computed: those ``dsec_semantic.sampling`` selects (all by default) that have a window.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import lock
from pipeline import representations as reps
from pipeline import store as zstore
from pipeline.atomic import write_json
from pipeline.config import DatasetsConfig, SemanticWindow
from pipeline.dsec import SENSOR_HEIGHT, SENSOR_WIDTH, EventFile, load_rectify_map
from pipeline.dsec_semantic import LABEL_HEIGHT, LABEL_WIDTH, SemanticSequence, load_labels, sequence_paths
from pipeline.errors import InputError, warn
from pipeline.parallel import default_workers, run_tasks
from pipeline.voxel import Rectifier, accumulate_voxels, first_decrease, invalid_events, rectifier

ESS_SKIP_FIRST = 6  # ESS: (remove_time_window 250 // 100 + 1) * 2 labels dropped at each sequence start
ESS_EVERY = 2  # then every second label (ESS's __getitem__ reads label index * 2)
INDEX = "index.csv"
CHUNK_ARRAYS = ("chunk_start", "chunk_stop", "stored")


# ---------------------------------------------------------------------------------------------- pure rules
def count_chunks(before: np.ndarray, n_events: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """ESS's fixed-count window: chunk bounds ``[start, stop)`` (labels, chunks) from ``before``, the number of
    events strictly before each label. The window is the last ``n_events`` of them (or all, if fewer), cut
    into ``chunks`` runs of ``n // chunks`` events from its oldest event; the newest ``n % chunks`` are left
    out, as ESS's slicing leaves them out."""
    before = np.asarray(before, np.int64)
    first = np.maximum(before - int(n_events), 0)
    size = (before - first) // int(chunks)
    k = np.arange(int(chunks), dtype=np.int64)
    start = first[:, None] + k[None, :] * size[:, None]
    return start, start + size[:, None]


def duration_boundaries(t_label: np.ndarray, duration_us: int, chunks: int) -> np.ndarray:
    """ESS's fixed-duration window: the ``chunks + 1`` span boundaries (labels, chunks+1), absolute us.

    ESS's boundaries are ``T - D + i * D / S`` in floating point and a span holds events with
    ``start <= t < end``; for integer event times that is ``t >= ceil(boundary)``, computed here exactly."""
    t_label = np.asarray(t_label, np.int64)
    i = np.arange(int(chunks) + 1, dtype=np.int64)
    offset = -((-i * int(duration_us)) // int(chunks))  # ceil(i * D / S)
    return t_label[:, None] - int(duration_us) + offset[None, :]


def ess_sample(n_labels: int, skip_first: int = ESS_SKIP_FIRST, every: int = ESS_EVERY) -> np.ndarray:
    """Label indices ESS uses from a sequence of ``n_labels``: the first 6 dropped, then every second."""
    return np.arange(skip_first, n_labels, every, dtype=np.int64)


def sampled_labels(n_labels: int, sampling: str) -> np.ndarray:
    """Label indices of a sequence under ``dsec_semantic.sampling`` (``all`` or ``ess``)."""
    if sampling == "ess":
        return ess_sample(n_labels)
    if sampling == "all":
        return np.arange(n_labels, dtype=np.int64)
    raise ValueError(f"unknown sampling {sampling!r} (known: all, ess)")


def count_before(ef: EventFile, t_abs: np.ndarray) -> np.ndarray:
    """For each absolute time (us): how many events have ``t + t_offset < t_abs`` (strictly before).

    Times are integers, so that is one past the last event with ``t + t_offset <= t_abs - 1``
    (:meth:`EventFile.index_of_time`); before the stream 0, after it every event."""
    t_abs = np.asarray(t_abs, np.int64)
    if ef.n_events == 0:
        return np.zeros(t_abs.shape, np.int64)
    idx = ef.index_of_time((t_abs - 1).ravel()).reshape(t_abs.shape)
    rel = t_abs - np.int64(ef.t_offset)
    outside = np.where(rel - 1 < ef.t_first, 0, ef.n_events)
    return np.where(idx >= 0, idx + 1, outside).astype(np.int64)


@dataclass(frozen=True)
class Windows:
    """Every label's chunk bounds and what the store's per-label arrays record."""

    chunk_start: np.ndarray  # (labels, chunks) int64
    chunk_stop: np.ndarray  # (labels, chunks) int64, exclusive
    valid: np.ndarray  # (labels,) the stream covers the label time and events precede it
    before: np.ndarray  # (labels,) events strictly before the label

    def arrays(self, timestamps: np.ndarray) -> dict[str, np.ndarray]:
        """The store's :data:`pipeline.store.INDEX_ARRAYS` and chunk arrays (invalid labels: -1 / 0)."""
        count = np.where(self.valid, (self.chunk_stop - self.chunk_start).sum(axis=1), 0)
        used = self.valid & (count > 0)
        return {"timestamps": timestamps, "event_index": np.where(self.valid, self.before - 1, -1),
                "window_start": np.where(used, self.chunk_start[:, 0], -1),
                "window_stop": np.where(used, self.chunk_stop.max(axis=1) - 1, -1),
                "event_count": count, "valid": self.valid,
                "chunk_start": np.where(self.valid[:, None], self.chunk_start, 0),
                "chunk_stop": np.where(self.valid[:, None], self.chunk_stop, 0)}


def plan_windows(ef: EventFile, t_label: np.ndarray, window: SemanticWindow) -> Windows:
    """Chunk bounds of every label under ``window``. A label is valid when events precede it and the stream
    reaches it (``t_first < T - t_offset <= t_last + 1``); ESS cannot slice the others either."""
    t_label = np.asarray(t_label, np.int64)
    before = count_before(ef, t_label)
    rel = t_label - np.int64(ef.t_offset)
    valid = (before > 0) & (rel <= ef.t_last + 1) if ef.n_events else np.zeros(t_label.shape, bool)
    if window.mode == "events":
        start, stop = count_chunks(before, window.events, window.chunks)
    else:
        bounds = count_before(ef, duration_boundaries(t_label, window.duration_us, window.chunks))
        start, stop = bounds[:, :-1], bounds[:, 1:]
    return Windows(start, stop, valid, before)


# ---------------------------------------------------------------------------------------------- voxels
def _check_events(path: Path, ev: dict[str, np.ndarray], offset: int) -> None:
    """Timestamps ordered, x/y on the sensor, p in {0, 1}: the kernel has no bounds checks."""
    i = int(first_decrease(ev["t"]))
    if i >= 0:
        raise InputError(path, f"events/t is not monotonic: event {offset + i} ({int(ev['t'][i])} us) comes "
                               f"before event {offset + i - 1} ({int(ev['t'][i - 1])} us)")
    bad = invalid_events(ev["x"], ev["y"], ev["p"], SENSOR_WIDTH, SENSOR_HEIGHT)
    if bad is not None:
        raise InputError(path, bad.describe(offset))


def _chunk_events(ef: EventFile, a: int, b: int, path: Path | None) -> dict[str, np.ndarray]:
    """Events ``a..b-1`` of a chunk, read and checked (a file shorter than its index says is an InputError)."""
    ev = ef.read(a, b)
    if len(ev["t"]) != b - a:
        raise InputError(path or ef.path, f"events {a}..{b - 1} lie past the end of the file")
    _check_events(path or ef.path, ev, a)
    return ev


def label_window(ef: EventFile, rect: Rectifier, start: np.ndarray, stop: np.ndarray, bins: int,
                 path: Path | None = None) -> np.ndarray:
    """One label's input: float32 (chunks*bins, 440, 640), chunk k = DSEC voxel grid of events
    ``start[k]..stop[k]-1`` with its own time normalisation, rows 0-439 of the 480-row grid."""
    chunks = len(start)
    out = np.zeros((chunks * bins, LABEL_HEIGHT, LABEL_WIDTH), np.float32)
    buf = np.zeros((1, bins, rect.height, rect.width), np.float32)
    for k in range(chunks):
        a, b = int(start[k]), int(stop[k])
        if b <= a:
            continue
        ev = _chunk_events(ef, a, b, path)
        t = ev["t"]
        buf.fill(0)
        accumulate_voxels(ev["x"], ev["y"], ev["p"], t, rect, np.zeros(1, np.int64), np.array([b - a], np.int64),
                          t[:1].astype(np.int64), t[-1:].astype(np.int64), buf, checked=True)
        out[k * bins:(k + 1) * bins] = buf[0, :, :LABEL_HEIGHT, :LABEL_WIDTH]
    return out


def kind_window(ef: EventFile, rect: Rectifier, start: np.ndarray, stop: np.ndarray, kind: reps.Settings,
                path: Path | None = None) -> np.ndarray:
    """One label's input in another representation: (chunks * channels(kind), 440, 640) in the kind's dtype,
    chunk k = the kind's frame of events ``start[k]..stop[k]-1`` (rows 0-439); a chunk without events is 0."""
    c = reps.channels(kind)
    out = np.zeros((len(start) * c, LABEL_HEIGHT, LABEL_WIDTH), reps.frame_dtype(kind))
    for k in range(len(start)):
        a, b = int(start[k]), int(stop[k])
        if b <= a:
            continue
        ev = _chunk_events(ef, a, b, path)
        t = ev["t"]
        frame = reps.build_in_pieces(kind, [(ev["x"], ev["y"], ev["p"], t)], b - a, rect, int(t[0]), int(t[-1]),
                                     checked=True)
        out[k * c:(k + 1) * c] = frame[:, :LABEL_HEIGHT, :LABEL_WIDTH]
    return out


def chunk_channels(window: SemanticWindow) -> int:
    """Channels of one chunk: ``bins`` of the voxel grid, or the channels of ``window.kind``."""
    return window.bins if window.kind is None else reps.channels(window.kind)


def store_path(cfg: DatasetsConfig, seq: str) -> Path:
    return cfg.dsec_semantic.out / seq / "windows.zarr"


def summary_path(cfg: DatasetsConfig, seq: str) -> Path:
    """The store's summary and settings, rewritten by every run: what the index stage of dvc.yaml depends on
    (the index lives beside the stores, so it cannot depend on their folder)."""
    return cfg.dsec_semantic.out / "summaries" / f"{seq}.json"


def window_settings(window: SemanticWindow, compressor: str, clevel: int, sampling: str) -> dict[str, Any]:
    """What the store's content depends on besides its sources (its identity, with the fingerprints).

    ``sampling`` is part of it: the store holds only the labels the index will list (ESS's sampling
    halves the store, ~33 MB per label at ESS's setting), so changing it rebuilds the store. The voxel grid's
    settings carry no ``kind`` (those of every store built before kinds existed); another kind's carry
    ``kind`` and ``dtype`` instead of ``voxel``."""
    rule = ("last `events` events with t + t_offset < label time, `chunks` runs of n // chunks from the oldest"
            if window.mode == "events" else
            "`chunks` spans of duration_us / chunks ending at the label time, start <= t + t_offset < end")
    per_chunk = chunk_channels(window)
    out = {"mode": window.mode, "events": window.events if window.mode == "events" else None,
           "duration_us": window.duration_us if window.mode == "duration" else None,
           "chunks": window.chunks, "bins_per_chunk": per_chunk, "bins": window.chunks * per_chunk,
           "height": LABEL_HEIGHT, "width": LABEL_WIDTH, "rows": "0-439 of the 640x480 rectified event frame",
           "sampling": sampling, "window": rule,
           "voxel": "DSEC VoxelGrid: trunc corners, tn = (bins-1)(t-t0)/(t1-t0) float32, no normalisation",
           "compressor": f"blosc {compressor} clevel {clevel} noshuffle"}
    if window.kind is not None:
        del out["voxel"]
        out.update(kind=reps.describe(window.kind), dtype=reps.frame_dtype(window.kind).name)
    return out


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _run_label(k: int, *, events: Path, rectify: Path, rect_digest: str, out: Path, writer: zstore.FrameChunks,
               start: np.ndarray, stop: np.ndarray, bins: int, kind: reps.Settings | None = None) -> int:
    """Compute and write label ``k``'s window; returns its event count (recorded in the progress marker)."""
    rect = _rectifier(rectify, rect_digest)
    with EventFile(events, check=False) as ef:
        grid = (label_window(ef, rect, start[k], stop[k], bins, events) if kind is None
                else kind_window(ef, rect, start[k], stop[k], kind, events))
    writer.write(k, grid)
    n = int((stop[k] - start[k]).sum())
    zstore.mark_done(out, k, k, events=n)
    return n


@functools.lru_cache(maxsize=1)
def _rectifier(path: Path, digest: str) -> Rectifier:
    rmap = load_rectify_map(path)
    if _digest(rmap.tobytes()) != digest:
        raise InputError(path, "rectify map changed while the sequence was being preprocessed")
    return rectifier(rmap, SENSOR_HEIGHT, SENSOR_WIDTH)


def preprocess_semantic_sequence(cfg: DatasetsConfig, seq: str, *, scheduler: str | None = None,
                                 workers: int = 0) -> dict[str, Any]:
    """Build (or resume) the window store of DSEC-Semantic sequence ``seq``; returns its summary with
    ``status`` ("built" / "already complete") and ``labels_written``. Holds the store's lock throughout."""
    paths = sequence_paths(cfg, seq)  # a sequence not listed or not there: no lock file left behind
    out = store_path(cfg, seq)
    with lock.exclusive(out, "`cmda preprocess --dataset dsec-semantic`"):
        return _preprocess_locked(cfg, paths, out, scheduler=scheduler, workers=workers)


def _preprocess_locked(cfg: DatasetsConfig, paths: SemanticSequence, out: Path, *, scheduler: str | None,
                       workers: int) -> dict[str, Any]:
    sem = cfg.dsec_semantic
    seq = paths.name
    labels = load_labels(paths)
    rmap = load_rectify_map(paths.rectify_map)
    with EventFile(paths.events) as ef:
        win = plan_windows(ef, labels.timestamps, sem.window)
        fingerprint = ef.fingerprint(workers=workers or default_workers())
    if not win.valid.any():
        raise InputError(paths.timestamps, f"no label has an event window: all {len(labels.files)} label times lie "
                                           f"outside the event stream of {paths.events} (wrong sequence, or "
                                           "timestamps on another clock?)")
    skipped = np.flatnonzero(~win.valid)
    if skipped.size:
        warn(paths.timestamps, f"{skipped.size} label(s) lie outside the event stream (stored as zeros): "
                               + ", ".join(labels.files[i].name for i in skipped[:6]) + (" ..." if skipped.size > 6
                                                                                         else ""))
    settings = window_settings(sem.window, sem.compressor, sem.clevel, sem.sampling)
    identity = {"settings": settings, "source": {"events": fingerprint, "rectify_map": _digest(rmap.tobytes()),
                                                 "timestamps": _digest(labels.timestamps.tobytes())}}
    n = len(labels.files)
    group, done, complete = zstore.open_for_writing(
        out, identity, frames=n, bins=settings["bins"], height=LABEL_HEIGHT, width=LABEL_WIDTH,
        cname=sem.compressor, clevel=sem.clevel, dtype=settings.get("dtype", "float32"))
    arrays = win.arrays(labels.timestamps)
    stored = np.zeros(n, bool)
    stored[sampled_labels(n, sem.sampling)] = True
    stored &= win.valid
    arrays["stored"] = stored
    summary = {"sequence": seq, "split": paths.split, "layout": paths.layout, "labels": n,
               "labels_with_window": int(win.valid.sum()), "labels_stored": int(stored.sum()),
               "events_in_windows": int(arrays["event_count"][stored].sum())}
    if complete:
        write_json(summary_path(cfg, seq), {**summary, "settings": settings})
        return {**summary, "status": "already complete", "labels_written": 0}
    for folder in (out, out / "voxels", zstore.progress_dir(out)):
        lock.remove_stale_temp_files(folder)
    zstore.write_index_arrays(group, arrays)
    for name in CHUNK_ARRAYS:
        values = arrays[name]
        group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape, fill_value=0,
                           overwrite=True)[...] = values
    todo = np.flatnonzero(stored & ~done)
    task = functools.partial(_run_label, events=paths.events, rectify=paths.rectify_map,
                             rect_digest=identity["source"]["rectify_map"], out=out, writer=zstore.FrameChunks(out),
                             start=arrays["chunk_start"], stop=arrays["chunk_stop"], bins=sem.window.bins,
                             kind=sem.window.kind)
    run_tasks([functools.partial(task, int(k)) for k in todo], desc=f"windows {seq}", unit="label",
              scheduler=scheduler, workers=workers)
    zstore.check_written(out, stored, summary["events_in_windows"])
    zstore.mark_complete(group, out, summary)
    write_json(summary_path(cfg, seq), {**summary, "settings": settings})
    return {**summary, "status": "built", "labels_written": int(todo.size)}
