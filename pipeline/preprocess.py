"""``cmda preprocess``: one DSEC sequence -> its Zarr store of rectified voxel grids, and one store
per other representation listed under ``representation.kinds`` (``representations/<name>.zarr``).

Plan: compute each image's event index from the timestamps (``ms_to_idx`` + binary search), turn
indices into CMDA windows (events ``idx[i-1] .. idx[i]``), then cut the frames into batches whose
events span at most ``chunk_events`` (and whose output grids fit a memory budget). Each batch is an
independent task: read its event span once, check timestamps are ordered, run the Numba kernel for
all its frames, write one Zarr chunk per frame, drop a progress marker. Tasks run on dask threads
(HDF5 reads serialise on h5py's lock while other threads run the nogil kernel and compression) or
on a dask.distributed cluster. The checks on the raw inputs and the per-worker caches (rectifier,
events.h5 handles) are in :mod:`pipeline.raw_inputs`.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import lock
from pipeline import representations as reps
from pipeline import store as zstore
from pipeline.atomic import restore_text, write_text
from pipeline.config import DatasetsConfig
from pipeline.dsec import EventFile, SequencePaths, load_rectify_map, load_timestamps, window_bounds
from pipeline.errors import InputError, warn
from pipeline.parallel import default_workers, run_tasks
from pipeline.raw_inputs import (
    blake_digest,
    check_image_count,
    check_rectify_map,
    close_event_files,
    event_file,
    file_token,
    read_checked,
    sequence_rectifier,
    window_pieces,
)
from pipeline.voxel import accumulate_voxels, accumulate_window_in_pieces

MAX_FRAMES_PER_TASK = 64  # tasks stay small enough for a smooth progress bar and resume
WINDOW_RULE = "cmda: events idx[i-1]..idx[i] inclusive; idx = last event with t + t_offset <= image timestamp"


@dataclass(frozen=True)
class Batch:
    """Frames ``frames[0]..frames[-1]`` (consecutive valid ones) and the event span they need."""

    frames: tuple[int, ...]
    first_event: int
    stop_event: int  # exclusive


def store_path(cfg: DatasetsConfig, seq: str) -> Path:
    return cfg.dsec.out / seq / "events.zarr"


def representations_dir(cfg: DatasetsConfig, seq: str) -> Path:
    """The folder of the sequence's representation stores (always created, so dvc can track it)."""
    return cfg.dsec.out / seq / "representations"


def representation_store_path(cfg: DatasetsConfig, seq: str, settings: reps.Settings) -> Path:
    """Store of one representation setting, named by its settings (``histogram_b10_c10.zarr``);
    the ``voxel`` kind is the voxel store :func:`store_path`."""
    if settings.kind == "voxel":
        return store_path(cfg, seq)
    return representations_dir(cfg, seq) / f"{reps.store_suffix(settings)}.zarr"


def extra_kinds(cfg: DatasetsConfig) -> list[reps.Settings]:
    """The representations listed in ``representation.kinds`` other than CMDA's voxel grid."""
    return [k for k in map(reps.parse_kind, cfg.representation.kinds) if k.kind != "voxel"]


def event_index_path(cfg: DatasetsConfig, seq: str) -> Path:
    """CMDA's images_to_events_index.txt, written beside the store (independent of the bins)."""
    return cfg.dsec.out / seq / "images_to_events_index.txt"


def plan_batches(
    start: np.ndarray, stop: np.ndarray, todo: np.ndarray, max_events: int, max_frames: int
) -> list[Batch]:
    """Group frames to do into batches of consecutive frames with bounded event span and count.

    A single window longer than ``max_events`` becomes a batch of its own; the task then streams
    it in pieces (see :func:`_run_batch`), so memory stays bounded in every case.
    """
    batches: list[Batch] = []
    cur: list[int] = []
    lo = hi = 0
    for i in np.flatnonzero(todo):
        i = int(i)
        a, b = int(start[i]), int(stop[i]) + 1
        contiguous = bool(cur) and i == cur[-1] + 1
        if cur and (not contiguous or max(hi, b) - lo > max_events or len(cur) >= max_frames):
            batches.append(Batch(tuple(cur), lo, hi))
            cur = []
        if not cur:
            lo, hi = a, b
        cur.append(i)
        hi = max(hi, b)
    if cur:
        batches.append(Batch(tuple(cur), lo, hi))
    return batches


def _run_batch(
    batch: Batch,
    *,
    events_path: Path,
    events_token: str,
    store: Path,
    writer: zstore.FrameChunks,
    rectify_map: Path,
    rectify_digest: str,
    start: np.ndarray,
    stop: np.ndarray,
    bins: int,
    height: int,
    width: int,
    chunk_events: int,
) -> int:
    """Voxelise one batch and write its frames. Returns the number of events read.

    Frames are computed one at a time into one reused buffer and encoded straight away, while
    the buffer is still in cache (a fresh 1.2 MB grid per frame costs more than the kernel).
    """
    rect = sequence_rectifier(rectify_map, rectify_digest, height, width)
    frames = np.asarray(batch.frames)
    buf = np.zeros((1, bins, height, width), dtype=np.float32)
    w_start = start[frames]
    w_stop = stop[frames] + 1  # exclusive
    ef = event_file(events_path, events_token)
    span = batch.stop_event - batch.first_event
    fed = 0  # events given to the kernel, summed over frames: recorded with the frames' marker
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    if span <= chunk_events:
        ev = read_checked(ef, events_path, rect, batch.first_event, batch.stop_event)
        t = ev["t"]
        lo, hi = w_start - batch.first_event, w_stop - batch.first_event
        t_first, t_last = t[lo].astype(np.int64), t[hi - 1].astype(np.int64)
        for k, frame in enumerate(frames):
            buf.fill(0)
            accumulate_voxels(ev["x"], ev["y"], ev["p"], t, rect, lo[k:k + 1], hi[k:k + 1],
                              t_first[k:k + 1], t_last[k:k + 1], buf, checked=True)
            fed += int(hi[k] - lo[k])
            writer.write(int(frame), buf[0])
    else:
        # One window longer than a streaming chunk (plan_batches isolates those): stream it in
        # pieces, normalising time with the window's own first and last event times.
        t_first = int(ef.read_t(batch.first_event, batch.first_event + 1)[0])
        t_last = int(ef.read_t(batch.stop_event - 1, batch.stop_event)[0])
        pieces = window_pieces(ef, events_path, rect, batch.first_event, batch.stop_event, chunk_events)
        accumulate_window_in_pieces(pieces, span, rect, t_first, t_last, buf, checked=True)
        fed += span
        writer.write(int(frames[0]), buf[0])
    zstore.mark_done(store, int(frames[0]), int(frames[-1]), events=fed)
    return span


RECTIFY_NEAREST = "nearest rectified pixel: floor(rectify_map[y, x] + 0.5); events off the grid dropped"


def preprocess_sequence(
    cfg: DatasetsConfig,
    seq: str,
    *,
    scheduler: str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Build (or resume) the voxel store of sequence ``seq``, then the store of every other kind
    listed in ``representation.kinds``. Returns the voxel store's summary, with ``status``
    "already complete" (nothing was written by this run) or "built", ``frames_written`` (voxel
    frames computed by this run) and ``representations``: per store name, its path, status and
    frames written.

    Holds the voxel store's lock for the whole run: a second run on the same sequence fails at once
    with one line, and temporary files of a killed earlier run are removed before writing.
    """
    out = store_path(cfg, seq)
    with lock.exclusive(out, "`cmda preprocess`"):
        return _preprocess_locked(cfg, seq, out, scheduler=scheduler, workers=workers)


@dataclass(frozen=True)
class _Source:
    """What every store of a sequence is built from: its event file, windows and identity."""

    paths: SequencePaths
    timestamps: np.ndarray
    index: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    valid: np.ndarray
    count: np.ndarray
    fingerprint: dict[str, Any]
    identity: dict[str, Any]  # the events, rectify map and timestamps the stores were built from

    def index_arrays(self) -> dict[str, np.ndarray]:
        return {"timestamps": self.timestamps, "event_index": self.index, "window_start": self.start,
                "window_stop": self.stop, "event_count": self.count, "valid": self.valid}


def _read_source(cfg: DatasetsConfig, seq: str, workers: int) -> tuple[_Source, dict[str, Any]]:
    """Check the sequence's inputs and compute its windows. Returns the source and the summary."""
    paths = SequencePaths(cfg.dsec.root, seq)
    rep = cfg.representation
    timestamps = load_timestamps(paths.timestamps)
    check_image_count(paths, len(timestamps))
    rmap = load_rectify_map(paths.rectify_map, rep.height, rep.width)
    check_rectify_map(paths.rectify_map, rmap, rep.height, rep.width)
    with EventFile(paths.events) as ef:
        index = ef.index_of_time(timestamps, workers=workers or default_workers())
        fingerprint = ef.fingerprint(workers=workers or default_workers())
        n_events = ef.n_events
    fingerprint["path"] = str(paths.events)

    outside = np.flatnonzero(index < 0)
    start, stop, valid = window_bounds(index)
    if not valid.any():
        raise InputError(paths.timestamps, f"no image has an event window: {outside.size} of {len(timestamps)} "
                         f"image timestamps lie outside the event stream of {paths.events} (wrong sequence, or "
                         "timestamps on another clock?)")
    if outside.size:
        listed = ", ".join(f"{i:06d}" for i in outside[:8]) + (" ..." if outside.size > 8 else "")
        warn(paths.timestamps, f"{outside.size} image(s) lie outside the event stream (index -1), skipped: {listed}")
    count = np.where(valid, stop - start + 1, 0)
    identity = {"events": fingerprint, "rectify_map": blake_digest(rmap.tobytes()),
                "timestamps": blake_digest(timestamps.tobytes())}
    summary = {
        "sequence": seq,
        "frames": len(timestamps),
        "frames_with_window": int(valid.sum()),
        "frames_outside_stream": int(outside.size),
        "events_in_file": n_events,
        "events_in_windows": int(count.sum()),
    }
    return _Source(paths, timestamps, index, start, stop, valid, count, fingerprint, identity), summary


def _preprocess_locked(cfg: DatasetsConfig, seq: str, out: Path, *, scheduler: str | None,
                       workers: int) -> dict[str, Any]:
    rep = cfg.representation
    src, summary = _read_source(cfg, seq, workers)
    settings = {"bins": rep.bins, "height": rep.height, "width": rep.width, "window": WINDOW_RULE,
                "compressor": f"blosc {rep.compressor} clevel {rep.clevel} noshuffle", "corner": "trunc toward zero",
                "time": "tau = (t - t_first) / (t_last - t_first) in float32, tn = (bins-1) tau"}
    write_text(index := event_index_path(cfg, seq), text := "".join(f"{int(v)}\n" for v in src.index))
    written = _build_store(cfg, src, out, {"settings": settings, "source": src.identity}, summary,
                           functools.partial(_run_batch, bins=rep.bins), dict(bins=rep.bins),
                           f"preprocess {seq}", scheduler, workers)
    built = {}
    representations_dir(cfg, seq).mkdir(parents=True, exist_ok=True)
    for kind in extra_kinds(cfg):
        path = representation_store_path(cfg, seq, kind)
        n = _build_kind(cfg, src, path, kind, summary, scheduler, workers)
        built[reps.store_suffix(kind)] = {"path": str(path), "status": "built" if n is not None else
                                          "already complete", "frames_written": n or 0}
    restore_text(index, text, "removed while this run held the lock (`dvc repro` of this stage?): written again")
    nothing = written is None and all(b["status"] == "already complete" for b in built.values())
    return {**summary, "status": "already complete" if nothing else "built", "frames_written": written or 0,
            "representations": built}


def _build_kind(cfg: DatasetsConfig, src: _Source, path: Path, kind: reps.Settings, summary: dict[str, Any],
                scheduler: str | None, workers: int) -> int | None:
    """Build one representation store like the voxel store (resumable, fingerprinted)."""
    rep = cfg.representation
    params = reps.describe(kind)
    settings = {**params, "height": rep.height, "width": rep.width, "window": WINDOW_RULE,
                "compressor": f"blosc {rep.compressor} clevel {rep.clevel} noshuffle",
                "rectification": ("bilinear splat of rectify_map[y, x], corner by trunc toward zero"
                                  if kind.kind == "voxel_dsec" else RECTIFY_NEAREST)}
    dtype = reps.frame_dtype(kind)
    attrs = {"representation": {**params, "suffix": reps.store_suffix(kind), "channels": reps.channels(kind),
                                "dtype": dtype.name}}
    return _build_store(cfg, src, path, {"settings": settings, "source": src.identity}, summary,
                        functools.partial(_run_kind_batch, settings=kind),
                        dict(bins=reps.channels(kind), array=zstore.REPRESENTATION_ARRAY, dtype=dtype.name,
                             extra_attrs=attrs),
                        f"{reps.store_suffix(kind)} {summary['sequence']}", scheduler, workers)


def _build_store(cfg: DatasetsConfig, src: _Source, out: Path, identity: dict[str, Any], summary: dict[str, Any],
                 run: Any, layout: dict[str, Any], desc: str, scheduler: str | None, workers: int) -> int | None:
    """Create or resume the store at ``out`` and run ``run`` (a batch task) for every frame still
    to do. Returns the frames written, or None when the store was already complete."""
    rep = cfg.representation
    array = layout.get("array", "voxels")
    group, done, complete = zstore.open_for_writing(
        out, identity, frames=len(src.timestamps), height=rep.height, width=rep.width,
        cname=rep.compressor, clevel=rep.clevel, **layout,
    )
    if complete:
        return None
    for folder in (out, out / array, zstore.progress_dir(out)):
        lock.remove_stale_temp_files(folder)  # we hold the lock: these are a killed run's leftovers
    # The small index arrays are deterministic (a resumed run rewrites them); Zarr takes ~20 ms to
    # create them, so that happens on a side thread while the frame tasks run.
    side = ThreadPoolExecutor(1)
    index_written = side.submit(zstore.write_index_arrays, group, src.index_arrays())
    side.shutdown(wait=False)  # its thread ends after this one job

    batches = plan_batches(src.start, src.stop, src.valid & ~done, rep.chunk_events, MAX_FRAMES_PER_TASK)
    task = functools.partial(
        run, events_path=src.paths.events, events_token=file_token(src.paths.events, src.fingerprint),
        store=out, writer=zstore.FrameChunks(out, array),
        rectify_map=src.paths.rectify_map, rectify_digest=src.identity["rectify_map"],
        start=src.start, stop=src.stop, height=rep.height, width=rep.width, chunk_events=rep.chunk_events,
    )
    try:
        run_tasks([functools.partial(task, b) for b in batches], desc=desc, unit="frame",
                  weights=[len(b.frames) for b in batches], scheduler=scheduler, workers=workers)
    finally:
        index_written.result()  # waits, and re-raises the side thread's error if it had one
    # Every task has finished (after an error some may still run on the pool's threads, so the
    # handles are then left to the next run, which closes them the same way).
    close_event_files()
    zstore.check_written(out, src.valid, int(src.count.sum()))
    zstore.mark_complete(group, out, summary)
    return int(sum(len(b.frames) for b in batches))


def _run_kind_batch(
    batch: Batch,
    *,
    settings: reps.Settings,
    events_path: Path,
    events_token: str,
    store: Path,
    writer: zstore.FrameChunks,
    rectify_map: Path,
    rectify_digest: str,
    start: np.ndarray,
    stop: np.ndarray,
    height: int,
    width: int,
    chunk_events: int,
) -> int:
    """Build one batch's frames of a representation store (the twin of :func:`_run_batch`)."""
    rect = sequence_rectifier(rectify_map, rectify_digest, height, width)
    ef = event_file(events_path, events_token)
    span = batch.stop_event - batch.first_event
    fed = 0
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    if span <= chunk_events:
        ev = read_checked(ef, events_path, rect, batch.first_event, batch.stop_event)
        for frame in batch.frames:
            lo, hi = int(start[frame]) - batch.first_event, int(stop[frame]) + 1 - batch.first_event
            piece = tuple(ev[k][lo:hi] for k in ("x", "y", "p", "t"))
            frame_array = reps.build_in_pieces(settings, [piece], hi - lo, rect, int(piece[3][0]),
                                               int(piece[3][-1]), checked=True)
            writer.write(int(frame), frame_array)
            fed += hi - lo
    else:  # one window longer than a streaming chunk (plan_batches isolates those)
        t_first = int(ef.read_t(batch.first_event, batch.first_event + 1)[0])
        t_last = int(ef.read_t(batch.stop_event - 1, batch.stop_event)[0])
        pieces = window_pieces(ef, events_path, rect, batch.first_event, batch.stop_event, chunk_events)
        writer.write(int(batch.frames[0]), reps.build_in_pieces(settings, pieces, span, rect, t_first, t_last,
                                                                checked=True))
        fed += span
    zstore.mark_done(store, int(batch.frames[0]), int(batch.frames[-1]), events=fed)
    return span
