"""Writing DSEC ``events.h5`` files: the exact schema the real dataset uses, streamed and atomic.

The reader is :class:`pipeline.dsec.EventFile`; this is its counterpart for the synthetic sample (and
for anyone converting another recording). Layout, as in DSEC and the real Prophesee file in ../shared:
``events/{x,y}`` uint16, ``events/p`` uint8 (0/1), ``events/t`` uint32 microseconds relative to
``t_offset`` (an int64 scalar), ``ms_to_idx`` uint64. Every dataset but ``t_offset`` is chunked by
40000 and compressed with Blosc/zstd level 1 with byte shuffle (HDF5 filter 32001).

:class:`EventsH5Writer` appends events in pieces so a sequence of hundreds of millions of events never
sits in memory; it buffers to whole chunks, so the bytes on disk do not depend on how the caller split
the stream, and it writes to a temporary file that is renamed into place only when closed cleanly.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from pipeline import atomic
from pipeline.dsec import EVENT_FIELDS, MS_TO_IDX_DTYPE, SENSOR_HEIGHT, SENSOR_WIDTH, T_OFFSET_DTYPE

CHUNK = 40_000
FLUSH_EVENTS = 25 * CHUNK
_FIELDS = {"x": EVENT_FIELDS["events/x"], "y": EVENT_FIELDS["events/y"],
           "p": EVENT_FIELDS["events/p"], "t": EVENT_FIELDS["events/t"]}


def blosc_filter() -> hdf5plugin.Blosc:
    """DSEC's compression: Blosc with zstd, level 1, byte shuffle."""
    return hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)


def ms_to_idx(t: np.ndarray) -> np.ndarray:
    """DSEC's millisecond index: ``ms[m]`` = first event with ``t >= 1000 m``, for m = 0 .. t_last//1000 + 1.

    So ``t[ms[m]] >= 1000 m > t[ms[m] - 1]``; the last entry equals the number of events, as in DSEC.
    """
    t = np.asarray(t)
    if t.size == 0:
        return np.zeros(1, MS_TO_IDX_DTYPE)
    bounds = np.arange(int(t[-1]) // 1000 + 2, dtype=np.int64) * 1000
    return np.searchsorted(t.astype(np.int64), bounds, side="left").astype(MS_TO_IDX_DTYPE)


def _check(name: str, a: np.ndarray, lo: int, hi: int) -> None:
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise ValueError(f"events {name} must lie in [{lo}, {hi}], got [{int(a.min())}, {int(a.max())}]")


class EventsH5Writer:
    """Append-only writer of one DSEC ``events.h5``. Use as a context manager::

        with EventsH5Writer(path, t_offset) as w:
            for x, y, p, t in pieces:      # t uint32-compatible, non-decreasing across pieces
                w.append(x, y, p, t)
    """

    def __init__(self, path: str | Path, t_offset: int, sensor_size: tuple[int, int] = (SENSOR_WIDTH, SENSOR_HEIGHT)):
        self.path = Path(path)
        self.t_offset = int(t_offset)
        self.width, self.height = sensor_size
        self.n_events = 0
        self._last_t = 0
        self._next_ms = 0
        self._ms: list[np.ndarray] = []
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in _FIELDS}
        self._buffered = 0
        self._stack: ExitStack | None = None
        self._h5: h5py.File | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> EventsH5Writer:
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic.atomic_path(self.path))
        self._h5 = h5py.File(tmp, "w", track_order=False)
        self._stack.callback(self._h5.close)
        for key, dtype in _FIELDS.items():
            self._h5.create_dataset(f"events/{key}", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK,),
                                    track_times=False, **blosc_filter())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._stack is not None
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._stack.__exit__(type(err), err, err.__traceback__)  # discards the temporary file
                raise
        # Closes the file, then renames it into place (or, after an error, removes it).
        self._stack.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ writing
    def append(self, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray) -> None:
        """Append events; ``t`` (us relative to t_offset) must be sorted and not before earlier events."""
        arrays = {"x": np.asarray(x), "y": np.asarray(y), "p": np.asarray(p), "t": np.asarray(t)}
        n = arrays["t"].shape[0] if arrays["t"].ndim == 1 else -1
        for key, a in arrays.items():
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"events {key} must be 1-D with the length of t ({n}), got shape {a.shape}")
            if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise ValueError(f"events {key} must be integers, got {a.dtype}")
        if n == 0:
            return
        _check("x", arrays["x"], 0, self.width - 1)
        _check("y", arrays["y"], 0, self.height - 1)
        _check("p", arrays["p"], 0, 1)
        _check("t", arrays["t"], 0, np.iinfo(np.uint32).max)
        t64 = arrays["t"].astype(np.int64)
        if np.any(np.diff(t64) < 0):
            raise ValueError("events t must be sorted (non-decreasing)")
        if t64[0] < self._last_t:
            raise ValueError(f"events t must continue the stream: {int(t64[0])} < previous {self._last_t}")
        # ms_to_idx entries for every millisecond boundary up to this piece's last event.
        last_ms = int(t64[-1]) // 1000
        if last_ms >= self._next_ms:
            bounds = np.arange(self._next_ms, last_ms + 1, dtype=np.int64) * 1000
            base = self.n_events + self._buffered
            self._ms.append((base + np.searchsorted(t64, bounds, side="left")).astype(MS_TO_IDX_DTYPE))
            self._next_ms = last_ms + 1
        self._last_t = int(t64[-1])
        for key, dtype in _FIELDS.items():
            self._buf[key].append(arrays[key].astype(dtype, copy=False))
        self._buffered += n
        if self._buffered >= FLUSH_EVENTS:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        assert self._h5 is not None
        n = (self._buffered // CHUNK) * CHUNK if whole_chunks else self._buffered
        if n == 0:
            return
        for key in _FIELDS:
            data = np.concatenate(self._buf[key])
            ds = self._h5[f"events/{key}"]
            ds.resize((self.n_events + n,))
            ds[self.n_events:] = data[:n]
            self._buf[key] = [data[n:]] if n < data.size else []
        self.n_events += n
        self._buffered -= n

    def _finish(self) -> None:
        assert self._h5 is not None
        self._flush(whole_chunks=False)
        # The final entry (one past the last millisecond) points past the last event, as in DSEC.
        ms = np.concatenate([*self._ms, np.array([self.n_events], MS_TO_IDX_DTYPE)])
        self._h5.create_dataset("ms_to_idx", data=ms, chunks=(max(1, ms.size),), track_times=False, **blosc_filter())
        self._h5.create_dataset("t_offset", data=np.array(self.t_offset, dtype=T_OFFSET_DTYPE), track_times=False)


def write_events_h5(path: str | Path, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray, t_offset: int,
                    sensor_size: tuple[int, int] = (SENSOR_WIDTH, SENSOR_HEIGHT)) -> None:
    """Write one whole event stream as a DSEC ``events.h5`` (atomically); ValueError on bad input."""
    with EventsH5Writer(path, t_offset, sensor_size) as writer:
        writer.append(x, y, p, t)
