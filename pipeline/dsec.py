"""Reading one DSEC sequence: the raw ``events.h5``, ``rectify_map.h5``, image timestamps and paths.

Thin classes around files, in the spirit of DSEC's EventSlicer: they validate the schema once on
open (so a wrong dtype or a missing dataset is reported with the file name, not as a NumPy error
deep inside a kernel) and hand out plain NumPy arrays. Nothing here loads a whole sequence: event
reads are by index range, so callers stream.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter DSEC compresses with)
import numpy as np

from pipeline.errors import InputError
from pipeline.h5chunks import BloscChunks

SENSOR_HEIGHT = 480
SENSOR_WIDTH = 640

# DSEC's events.h5 schema: dataset -> dtype. All 1-D and of equal length except ms_to_idx/t_offset.
EVENT_FIELDS = {"events/x": np.uint16, "events/y": np.uint16, "events/p": np.uint8, "events/t": np.uint32}
MS_TO_IDX_DTYPE = np.uint64
T_OFFSET_DTYPE = np.int64


@dataclass(frozen=True)
class SequencePaths:
    """Where DSEC keeps the files of one sequence under a DSEC root."""

    root: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def events(self) -> Path:
        return self.dir / "events" / "left" / "events.h5"

    @property
    def rectify_map(self) -> Path:
        return self.dir / "events" / "left" / "rectify_map.h5"

    @property
    def images_dir(self) -> Path:
        return self.dir / "images" / "left" / "rectified"

    @property
    def timestamps(self) -> Path:
        return self.dir / "images" / "timestamps.txt"

    @property
    def calibration(self) -> Path:
        return self.dir / "calibration" / "cam_to_cam.yaml"

    @property
    def labels_dir(self) -> Path:
        return self.dir / "labels"

    def image(self, frame: int) -> Path:
        return self.images_dir / f"{frame:06d}.png"

    def label(self, frame: int) -> Path:
        return self.labels_dir / f"{self.name}_{frame:06d}_grey_gtFine_labelTrainIds.png"


class EventFile:
    """An open, validated DSEC ``events.h5``.

    ``t`` stays uint32 relative to ``t_offset`` on disk; every method that compares with absolute
    microseconds widens to int64 first (adding ``t_offset`` to uint32 would wrap).
    """

    def __init__(self, path: str | Path, *, check: bool = True):
        """Open ``path``; ``check=False`` skips the schema validation (for worker tasks re-opening a
        file the caller has already validated: it saves reading ms_to_idx and two chunks per open)."""
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "events file not found")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(self.path, f"not a readable HDF5 file ({exc})") from None
        self._fd: int | None = None
        self._direct: dict[str, BloscChunks | None] = {}
        if not check:
            self._t, self._x = self._h5["events/t"], self._h5["events/x"]
            self._y, self._p = self._h5["events/y"], self._h5["events/p"]
            self.n_events = self._t.shape[0]
            return
        try:
            self._validate()
        except Exception:
            self._h5.close()
            raise

    # ------------------------------------------------------------------ validation
    def _dataset(self, name: str) -> h5py.Dataset:
        obj = self._h5.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise InputError(self.path, f"missing dataset '{name}' (DSEC events.h5 needs events/x, events/y, "
                             "events/p, events/t, ms_to_idx, t_offset)")
        return obj

    def _validate(self) -> None:
        length = None
        for name, dtype in EVENT_FIELDS.items():
            ds = self._dataset(name)
            if ds.dtype != dtype:
                raise InputError(self.path, f"dataset '{name}' has dtype {ds.dtype}, expected {np.dtype(dtype)}")
            if ds.ndim != 1:
                raise InputError(self.path, f"dataset '{name}' has shape {ds.shape}, expected 1-D")
            if length is None:
                length = ds.shape[0]
            elif ds.shape[0] != length:
                raise InputError(self.path, f"dataset '{name}' has {ds.shape[0]} entries, events/x has {length}")
        ms = self._dataset("ms_to_idx")
        if ms.dtype != MS_TO_IDX_DTYPE or ms.ndim != 1:
            raise InputError(self.path, f"dataset 'ms_to_idx' is {ms.dtype}{ms.shape}, expected 1-D uint64")
        off = self._dataset("t_offset")
        if off.dtype != T_OFFSET_DTYPE or off.shape not in ((), (1,)):
            raise InputError(self.path, f"dataset 't_offset' is {off.dtype}{off.shape}, expected an int64 scalar")
        self.n_events = int(length or 0)
        self.t_offset = int(np.asarray(off[()]).reshape(()))
        self.ms_to_idx = ms[:].astype(np.int64)
        self._t = self._h5["events/t"]
        self._x = self._h5["events/x"]
        self._y = self._h5["events/y"]
        self._p = self._h5["events/p"]
        if self.n_events:
            self.t_first = int(self.read_t(0, 1)[0])
            self.t_last = int(self.read_t(self.n_events - 1, self.n_events)[0])
        else:
            self.t_first = self.t_last = 0
        if self.ms_to_idx.size and (np.any(np.diff(self.ms_to_idx) < 0) or self.ms_to_idx[-1] > self.n_events):
            raise InputError(self.path, "ms_to_idx is not a non-decreasing index into the events")

    # ------------------------------------------------------------------ context manager
    def close(self) -> None:
        self._h5.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Events ``start .. stop-1`` as arrays x, y (uint16), p (uint8), t (uint32, relative)."""
        start = max(0, int(start))
        stop = min(self.n_events, int(stop))
        if stop <= start:
            return {"x": np.empty(0, np.uint16), "y": np.empty(0, np.uint16),
                    "p": np.empty(0, np.uint8), "t": np.empty(0, np.uint32)}
        # Blosc fields decode into one block (widest first, so each stays aligned): glibc then
        # reuses the same heap memory read after read, where four separate arrays of 1-4 MB were
        # returned to the kernel and page-faulted back in every time (~40 % of a read).
        direct = {k: self._reader(k) for k in "xypt"}
        wide_first = sorted((k for k in "xypt" if direct[k] is not None),
                            key=lambda k: -direct[k].table.dtype.itemsize)
        sizes = [direct[k].span(start, stop) * direct[k].table.dtype.itemsize for k in wide_first]
        block = np.empty(sum(sizes), np.uint8)
        out, pos = {}, 0
        for k, size in zip(wide_first, sizes, strict=True):
            out[k] = direct[k].read(start, stop, out=block[pos:pos + size])
            pos += size
        return {k: out[k] if k in out else self._read_field(k, start, stop) for k in "xypt"}

    def read_t(self, start: int, stop: int) -> np.ndarray:
        start = max(0, int(start))
        stop = min(self.n_events, int(stop))
        return self._read_field("t", start, stop) if stop > start else np.empty(0, np.uint32)

    def _read_field(self, field: str, start: int, stop: int) -> np.ndarray:
        """One field's events ``start .. stop-1`` (a non-empty range inside the file).

        Blosc-compressed fields (DSEC's layout) are read and decoded outside HDF5's global lock
        (:mod:`pipeline.h5chunks`), so worker threads decompress in parallel; anything else goes
        through h5py.
        """
        direct = self._reader(field)
        if direct is not None:
            return direct.read(start, stop)
        try:
            return getattr(self, f"_{field}")[start:stop]
        except OSError as exc:  # HDF5's word for a chunk its filter cannot decode
            raise InputError(self.path, f"dataset 'events/{field}': cannot read events "
                             f"{start}..{stop - 1} ({exc})") from None

    def _reader(self, field: str) -> BloscChunks | None:
        """The direct chunk reader of a field, built on first use (listing chunks: ~1 ms per 600)."""
        if field not in self._direct:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            self._direct[field] = BloscChunks.open(self.path, getattr(self, f"_{field}"), self._fd)
        return self._direct[field]

    def index_of_time(self, t_abs: np.ndarray | list[int], workers: int = 1) -> np.ndarray:
        """For each absolute time (us): index of the LAST event with ``t + t_offset <= t_abs``.

        -1 where the time lies outside the event stream (before the first or after the last event).
        Uses ``ms_to_idx`` to narrow each search to one millisecond of events, then a binary search.
        Each search decodes one chunk of ``events/t`` (~0.1 ms); ``workers`` threads share them
        (the decoding releases the GIL), which matters because this runs before any parallel work.
        """
        t_abs = np.asarray(t_abs, dtype=np.int64)
        out = np.full(t_abs.shape, -1, dtype=np.int64)
        if self.n_events == 0:
            return out
        rel = t_abs - np.int64(self.t_offset)
        todo = np.flatnonzero((rel >= self.t_first) & (rel <= self.t_last))

        def search(ks: np.ndarray) -> None:
            for k in ks:
                out[k] = self._index_one(int(rel[k]))

        if workers > 1 and todo.size >= 4 * workers:
            self._reader("t")  # _reader is not thread-safe: build the shared reader first
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(search, [todo[w::workers] for w in range(workers)]))
        else:
            search(todo)
        return out

    def _index_one(self, r: int) -> int:
        """Index of the last event with ``t <= r`` (``r`` relative, inside the stream)."""
        n_ms = self.ms_to_idx.size
        m = r // 1000
        lo = int(self.ms_to_idx[m]) if m < n_ms else self.n_events
        hi = int(self.ms_to_idx[m + 1]) if m + 1 < n_ms else self.n_events
        lo = min(lo, self.n_events)
        # One read with the neighbouring event on each side, to check ms_to_idx against events/t.
        a, b = max(lo - 1, 0), min(hi + 1, self.n_events)
        ts = self.read_t(a, b).astype(np.int64)
        if (lo > 0 and ts[0] > r) or (hi < self.n_events and ts[-1] <= r):
            raise InputError(self.path, f"ms_to_idx[{m}] is inconsistent with events/t")
        inner = ts[lo - a:len(ts) - (b - hi)]
        return lo + int(np.searchsorted(inner, r, side="right")) - 1

    def fingerprint(self, workers: int = 4) -> dict[str, int | str]:
        """Identity of the file's content: everything that determines a preprocessed store.

        ``digest`` is a SHA-256 hash of every stored chunk of events/x, y, p and t exactly as HDF5
        keeps them on disk (the compressed bytes at the offsets HDF5 reports, read outside its lock),
        plus ms_to_idx and t_offset. Changing any event anywhere changes a chunk's bytes, so it
        changes the digest, without decompressing anything: the cost is reading the file once
        (the four fields are hashed on ``workers`` threads; hashlib releases the GIL). Datasets
        the direct reader does not cover are hashed from their decoded values instead.
        """
        fields = ("x", "y", "p", "t")
        for k in fields:
            self._reader(k)  # build the readers here: _reader is not thread-safe

        def field_digest(k: str) -> bytes:
            h = hashlib.sha256()  # SHA-256: hardware-accelerated on current x86/ARM, ~2x BLAKE2b there
            direct = self._direct[k]
            if direct is not None:
                h.update(b"stored chunks")
                n_chunks = direct.table.offset.size
                for c in range(0, n_chunks, 64):  # bounded runs: the scratch buffer stays a few MB
                    for raw in direct._fetch(c, min(c + 64, n_chunks)):
                        h.update(raw)
            else:
                h.update(b"values")
                for a in range(0, self.n_events, 1 << 20):
                    h.update(self._read_field(k, a, min(a + (1 << 20), self.n_events)).tobytes())
            return h.digest()

        with ThreadPoolExecutor(max(1, min(workers, len(fields)))) as pool:
            parts = list(pool.map(field_digest, fields))
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        digest.update(self.ms_to_idx.tobytes())
        digest.update(np.int64(self.t_offset).tobytes())
        return {
            "path": str(self.path),
            "size": self.path.stat().st_size,
            "n_events": self.n_events,
            "t_offset": self.t_offset,
            "content": "sha256 of the stored chunks of events/x,y,p,t + ms_to_idx + t_offset",
            "digest": digest.hexdigest(),
        }


def load_rectify_map(path: str | Path, height: int = SENSOR_HEIGHT, width: int = SENSOR_WIDTH) -> np.ndarray:
    """The DSEC rectify map: float32 (H, W, 2), distorted pixel (y, x) -> rectified (x, y)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "rectify map not found")
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("rectify_map")
            if not isinstance(ds, h5py.Dataset):
                raise InputError(path, f"missing dataset 'rectify_map' (found: {', '.join(f.keys()) or 'nothing'})")
            if ds.dtype != np.float32:
                raise InputError(path, f"dataset 'rectify_map' has dtype {ds.dtype}, expected float32")
            if ds.shape != (height, width, 2):
                raise InputError(path, f"dataset 'rectify_map' has shape {ds.shape}, expected {(height, width, 2)}")
            rmap = ds[:]
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})") from None
    if not np.all(np.isfinite(rmap)):
        raise InputError(path, "rectify_map contains NaN or inf")
    return rmap


def load_timestamps(path: str | Path) -> np.ndarray:
    """Image timestamps (int64 us, absolute, one per line); must be strictly increasing."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image timestamps file not found")
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise InputError(path, f"line {lineno}: {line!r} is not an integer timestamp") from None
    ts = np.asarray(values, dtype=np.int64)
    if ts.size == 0:
        raise InputError(path, "no timestamps")
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if bad.size:
        raise InputError(path, f"timestamps not strictly increasing at line {bad[0] + 2}")
    return ts


def window_bounds(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CMDA's event window of image i: events ``index[i-1] .. index[i]`` inclusive.

    Returns (start, stop_inclusive, valid). Frame 0 has no previous image and images with index -1
    have no window; both are invalid (start = stop = -1).
    """
    index = np.asarray(index, dtype=np.int64)
    start = np.full_like(index, -1)
    stop = np.full_like(index, -1)
    if index.size > 1:
        prev, cur = index[:-1], index[1:]
        ok = (prev >= 0) & (cur >= 0)
        start[1:] = np.where(ok, prev, -1)
        stop[1:] = np.where(ok, cur, -1)
    valid = start >= 0
    return start, stop, valid
