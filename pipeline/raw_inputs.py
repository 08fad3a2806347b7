"""The raw inputs of a DSEC sequence as preprocessing reads them: every event read is checked
(ordered timestamps, on the sensor, polarity in {0, 1}) before a kernel sees it, the rectify map and
the image count are checked once, and the rectifier and the events.h5 handles are cached per worker
(tasks carry paths and fingerprints, not arrays)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dsec import EventFile, SequencePaths, load_rectify_map
from pipeline.errors import InputError, warn
from pipeline.voxel import Rectifier, first_decrease, invalid_events, rectifier


def _check_ordered(path: Path, t: np.ndarray, offset: int) -> None:
    i = int(first_decrease(t))
    if i >= 0:
        k = offset + i
        raise InputError(path, f"events/t is not monotonic: event {k} ({int(t[i])} us) comes before "
                         f"event {k - 1} ({int(t[i - 1])} us)")


def _check_events(path: Path, ev: dict[str, np.ndarray], offset: int, rect: Rectifier) -> None:
    """The streaming pass over every event read: timestamps ordered, x/y on the rectify map's
    sensor, p in {0, 1}. The kernels have no bounds checks, so nothing reaches them unchecked."""
    _check_ordered(path, ev["t"], offset)
    sensor_h, sensor_w = rect.map_x.shape
    bad = invalid_events(ev["x"], ev["y"], ev["p"], sensor_w, sensor_h)
    if bad is not None:
        raise InputError(path, bad.describe(offset))


_RECTIFIERS: dict[tuple[str, str, int, int], Rectifier] = {}
_RECTIFIERS_LOCK = threading.Lock()


def sequence_rectifier(path: Path, digest: str, height: int, width: int) -> Rectifier:
    """The sequence's rectifier, loaded once per worker process (tasks carry a path, not 12 MB)."""
    key = (str(path), digest, height, width)
    with _RECTIFIERS_LOCK:
        if key not in _RECTIFIERS:
            rmap = load_rectify_map(path, height, width)
            if blake_digest(rmap.tobytes()) != digest:
                raise InputError(path, "rectify map changed while the sequence was being preprocessed")
            rect = rectifier(rmap, height, width)
            _ = rect.splat  # build the 1-bin splat table once, under the lock
            _RECTIFIERS.clear()  # one sequence at a time: keep memory flat
            _RECTIFIERS[key] = rect
        return _RECTIFIERS[key]


_HANDLES = threading.local()
_OPENED: list[EventFile] = []  # every handle the threads of this process hold, to close after a run
_OPENED_LOCK = threading.Lock()
_GENERATION = [0]  # bumped when the handles are closed: a thread's cached handle is then stale


def event_file(path: Path, token: str) -> EventFile:
    """This thread's open handle on the sequence's events.h5 (re-opened when ``token`` changes).

    Opening costs ~1.5 ms, a tenth of a task; ``token`` (size, mtime, content fingerprint) makes a
    handle opened by an earlier run on a since-modified file unusable. The handles are closed at
    the end of every successful run (:func:`close_event_files`), so no file stays open once
    :func:`pipeline.preprocess.preprocess_sequence` returns (an open HDF5 handle stops the same process from opening
    the file for writing).
    """
    key = (str(path), token, _GENERATION[0])
    cur = getattr(_HANDLES, "file", None)
    if cur is not None and cur[0] == key:
        return cur[1]
    ef = EventFile(path, check=False)
    with _OPENED_LOCK:
        _OPENED.append(ef)
    _HANDLES.file = (key, ef)
    return ef


def close_event_files() -> None:
    """Close every handle opened by :func:`event_file` in this process (no task may be running)."""
    with _OPENED_LOCK:
        _GENERATION[0] += 1
        while _OPENED:
            _OPENED.pop().close()


def read_checked(ef: EventFile, events_path: Path, rect: Rectifier, first: int, stop: int) -> dict[str, np.ndarray]:
    """Events ``first..stop-1``, checked (ordered, on the sensor, p in {0, 1}) before any kernel sees them."""
    ev = ef.read(first, stop)
    if len(ev["t"]) != stop - first:
        raise InputError(events_path, f"events {first}..{stop - 1} lie past the end "
                         "of the file (was it changed while being preprocessed?)")
    _check_events(events_path, ev, first, rect)
    return ev


def window_pieces(ef: EventFile, events_path: Path, rect: Rectifier, first: int, stop: int, chunk_events: int):
    """Events ``first..stop-1`` as checked consecutive ``(x, y, p, t)`` pieces of ``chunk_events``
    (one window longer than a streaming chunk, in bounded memory)."""
    prev_t = None
    for pos in range(first, stop, chunk_events):
        end = min(pos + chunk_events, stop)
        ev = ef.read(pos, end)
        if len(ev["t"]) != end - pos:
            raise InputError(events_path, f"events {pos}..{end - 1} lie past the end of the file "
                             "(was it changed while being preprocessed?)")
        if prev_t is not None and ev["t"][0] < prev_t:
            _check_ordered(events_path, np.array([prev_t, ev["t"][0]]), pos - 1)
        _check_events(events_path, ev, pos, rect)
        prev_t = ev["t"][-1]
        yield ev["x"], ev["y"], ev["p"], ev["t"]



def file_token(path: Path, fingerprint: dict[str, Any]) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{fingerprint['digest']}"


def blake_digest(data: bytes) -> str:
    """A 128-bit BLAKE2b hex digest: the identity of a rectify map or a timestamps array in a store."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_rectify_map(path: Path, rmap: np.ndarray, height: int, width: int) -> None:
    """A map that sends every pixel off the grid would give all-zero grids: an error. One that keeps
    less than half of them is suspicious (a map for another resolution?): a warning with the count."""
    xf, yf = rmap[..., 0], rmap[..., 1]
    on_grid = int(np.count_nonzero((xf > -1) & (xf < width) & (yf > -1) & (yf < height)))
    if on_grid == 0:
        raise InputError(path, f"rectify_map sends every one of its {xf.size} pixels off the {width}x{height} "
                         "voxel grid (wrong map, or wrong representation.width/height?)")
    if on_grid * 2 < xf.size:
        warn(path, f"rectify_map sends {xf.size - on_grid} of {xf.size} pixels off the {width}x{height} voxel grid")


def check_image_count(paths: SequencePaths, n_timestamps: int) -> None:
    """DSEC has one timestamp per image: more images than timestamps would silently drop images."""
    if not paths.images_dir.is_dir():
        return  # events-only trees (the images are only needed by `cmda warp`)
    n_images = sum(1 for e in os.scandir(paths.images_dir)
                   if e.name.endswith(".png") and len(e.name) == 10 and e.name[:6].isdigit())
    if n_images > n_timestamps:
        raise InputError(paths.timestamps, f"{n_timestamps} timestamps for {n_images} images in "
                         f"{paths.images_dir}: {n_images - n_timestamps} image(s) would have no timestamp")
    if 0 < n_images < n_timestamps:
        warn(paths.timestamps, f"{n_timestamps} timestamps but only {n_images} images in {paths.images_dir}")
