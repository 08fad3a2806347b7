"""The per-sequence Zarr store of voxel grids: layout, resumable writing, validated reading.

Layout of ``<out>/<sequence>/events.zarr`` (Zarr v3 group)::

    voxels        float32 (frames, bins, H, W), one frame per chunk, Blosc/lz4; chunk files
                  flat in voxels/ as c.<frame>.0.0.0 (Zarr's "." key separator)
    timestamps    int64  (frames,)  image timestamps, absolute us
    event_index   int64  (frames,)  index of the last event at or before the image (-1: outside)
    window_start  int64  (frames,)  first event of the image's window (-1: no window)
    window_stop   int64  (frames,)  last event of the window, inclusive (-1: no window)
    event_count   int64  (frames,)  events in the window (0: no window)
    valid         bool   (frames,)  the frame has a window (and a voxel grid)
    attrs         settings, source identity, and ``complete`` once every frame is written

Resumability: chunk files are written atomically by Zarr's local store; after a task has written
its frames it drops a marker file in a progress folder beside the store. A rerun with the same
settings and source skips marked frames; the store is declared ``complete`` (and the progress
folder removed) only after the last frame, so the finished store is byte-identical whether or not
the run was interrupted. A store built with other settings is rebuilt from scratch.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from pipeline.atomic import write_bytes, write_text
from pipeline.errors import InputError

STORE_FORMAT = 2  # 2: flat chunk keys (1: nested c/<frame>/0/0/0)
INDEX_ARRAYS = ("timestamps", "event_index", "window_start", "window_stop", "event_count", "valid")


def progress_dir(store_path: Path) -> Path:
    return store_path.with_name(f".{store_path.name}.progress")


def _read_attrs(store_path: Path) -> dict[str, Any] | None:
    """The store's attributes, or None when it is not there or its metadata does not parse.

    Only those two cases mean "no reusable store" (and let :func:`open_for_writing` rebuild it):
    any other error (a permission problem, an I/O error on a network disk) propagates, so a
    transient failure never deletes a finished store.
    """
    try:
        attrs = dict(zarr.open_group(store_path, mode="r").attrs)
    except FileNotFoundError:  # includes zarr's GroupNotFoundError
        return None
    except (ValueError, TypeError, KeyError):  # unparsable zarr.json (JSONDecodeError is a ValueError)
        return None
    return attrs


def read_marks(store_path: Path, frames: int) -> tuple[np.ndarray, int]:
    """Frames recorded as written by progress markers, and the events their tasks accumulated.

    A marker whose content is not an event count (torn, or from an older version) does not count:
    its frames are redone.
    """
    done = np.zeros(frames, dtype=bool)
    events = 0
    marks = progress_dir(store_path)
    if not marks.exists():
        return done, 0
    for marker in marks.glob("*.done"):
        try:
            first, last = (int(v) for v in marker.stem.split("-"))
            n = int(marker.read_text())
        except ValueError:
            continue
        if 0 <= first <= last < frames and not done[first:last + 1].any():
            done[first:last + 1] = True
            events += n
    return done, events


def open_for_writing(
    store_path: Path,
    identity: dict[str, Any],
    *,
    frames: int,
    bins: int,
    height: int,
    width: int,
    cname: str,
    clevel: int,
    array: str = "voxels",
    dtype: str = "float32",
    extra_attrs: dict[str, Any] | None = None,
) -> tuple[zarr.Group, np.ndarray, bool]:
    """Open (resume) or create the store. Returns (group, done mask, already_complete).

    ``identity`` (settings + source fingerprint) decides whether existing content may be reused.
    ``array``/``dtype`` name the per-frame array (``bins`` is its channel count); ``extra_attrs``
    are group attributes written with a fresh store (the representation stores describe their
    kind there). The defaults are the voxel store's.
    """
    attrs = _read_attrs(store_path) if store_path.exists() else None
    marks = progress_dir(store_path)
    if attrs is not None and attrs.get("format") == STORE_FORMAT and attrs.get("identity") == identity:
        group = zarr.open_group(store_path, mode="r+")
        done = np.zeros(frames, dtype=bool)
        if attrs.get("complete"):
            done[:] = True
            return group, done, True
        done, _ = read_marks(store_path, frames)
        return group, done, False
    # Fresh build: nothing of an older store (other settings, other source, or corrupt) survives.
    if store_path.exists():
        shutil.rmtree(store_path)
    if marks.exists():
        shutil.rmtree(marks)
    group = zarr.open_group(store_path, mode="w",
                            attributes={"format": STORE_FORMAT, "identity": identity, **(extra_attrs or {})})
    group.create_array(
        array,
        shape=(frames, bins, height, width),
        chunks=(1, bins, height, width),
        dtype=dtype,
        fill_value=0.0,
        # Flat chunk files (c.<frame>.0.0.0) rather than Zarr's default nested c/<frame>/0/0/0:
        # creating three directories per frame cost ~1 ms of a ~7 ms frame on ext4 (measured).
        chunk_key_encoding={"name": "default", "separator": "."},
        # No byte shuffle: on voxel grids (floats with many zeros) it costs ~2x the time and, at
        # night event densities, compresses no better (measured in benchmarks/bench_voxel.py).
        compressors=BloscCodec(cname=cname, clevel=clevel, shuffle="noshuffle"),
    )
    return group, np.zeros(frames, dtype=bool), False


class FrameChunks:
    """Direct access to the per-frame chunk files of the ``voxels`` array (or of ``array``).

    Going through ``zarr.Array`` costs ~2-4 ms of bookkeeping per 1.2 MB frame, more than
    (de)compressing it; with one frame per chunk the chunk file is exactly the Blosc encoding of
    the frame (the same bytes Zarr writes, checked in the tests), so we encode/decode it ourselves.
    A missing chunk is an all-zero frame: Zarr reads it as the fill value 0 and skips writing such
    chunks itself too. Instances are small and picklable (codec and shape, no open handles).
    """

    def __init__(self, store_path: Path, array: str = "voxels"):
        self.root = Path(store_path) / array
        meta = zarr.open_array(self.root, mode="r").metadata.to_dict()
        blosc = [c["configuration"] for c in meta["codecs"] if c["name"] == "blosc"]
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta["chunk_key_encoding"]
        if (len(blosc) != 1 or len(meta["codecs"]) != 2 or chunks[0] != 1 or list(chunks[1:]) != list(shape[1:])
                or encoding["name"] != "default" or encoding["configuration"]["separator"] not in ("/", ".")):
            raise ValueError(f"{self.root}: unexpected array layout for direct chunk access: {meta}")
        cfg = blosc[0]
        self.shape = tuple(shape[1:])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.separator = encoding["configuration"]["separator"]
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        self.codec = Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=shuffle[cfg["shuffle"]],
                           blocksize=cfg["blocksize"])

    def chunk(self, frame: int) -> Path:
        """The chunk file of ``frame``: Zarr's default key ``c<sep><frame><sep>0<sep>0<sep>0``."""
        return self.root / self.separator.join(["c", str(frame)] + ["0"] * (len(self.shape)))

    def read(self, frame: int) -> np.ndarray:
        try:
            data = self.chunk(frame).read_bytes()
        except FileNotFoundError:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.frombuffer(self.codec.decode(data), dtype=self.dtype).reshape(self.shape)

    def write(self, frame: int, grid: np.ndarray) -> None:
        """Encode and write one frame's grid atomically (an all-zero grid writes nothing)."""
        grid = np.ascontiguousarray(grid, dtype=self.dtype)
        if grid.shape != self.shape:
            raise ValueError(f"frame grid has shape {grid.shape}, store expects {self.shape}")
        if not grid.any():
            return
        write_bytes(self.chunk(frame), self.codec.encode(grid))


def write_index_arrays(group: zarr.Group, arrays: dict[str, np.ndarray]) -> None:
    """Write the small per-frame arrays (deterministic, so rewriting them on resume is harmless)."""
    for name in INDEX_ARRAYS:
        values = np.asarray(arrays[name])
        arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                 fill_value=0, overwrite=True)
        arr[...] = values


def mark_done(store_path: Path, first: int, last: int, events: int = 0) -> None:
    """Record that frames ``first..last`` are written, from ``events`` events (atomic marker file)."""
    write_text(progress_dir(store_path) / f"{first:06d}-{last:06d}.done", f"{int(events)}\n")


def check_written(store_path: Path, valid: np.ndarray, events: int) -> None:
    """Refuse to call a store complete unless its markers cover every frame with a window and
    account for exactly ``events`` accumulated events (the sum of the windows' counts)."""
    done, counted = read_marks(store_path, len(valid))
    missing = np.flatnonzero(valid & ~done)
    if missing.size or counted != events:
        raise InputError(store_path, f"not marking the store complete: {missing.size} frame(s) with a window "
                         f"were not written and {counted} of {events} window events were accumulated "
                         "(rerun `cmda preprocess` to finish it)")


def mark_complete(group: zarr.Group, store_path: Path, summary: dict[str, Any]) -> None:
    """Declare the store finished (callers run :func:`check_written` first)."""
    group.attrs.update({"summary": summary, "complete": True})
    marks = progress_dir(store_path)
    if marks.exists():
        shutil.rmtree(marks)


@dataclass
class VoxelStore:
    """Read side of a finished store, as the training loaders use it."""

    path: Path
    group: zarr.Group

    @classmethod
    def open(cls, path: str | Path, *, bins: int | None = None) -> VoxelStore:
        """Open a complete store; with ``bins`` given, insist it was built with that many bins."""
        path = Path(path)
        if not path.exists():
            raise InputError(path, "voxel store not found (run `cmda preprocess` or `dvc repro`)")
        try:
            group = zarr.open_group(path, mode="r")
        except Exception as exc:
            raise InputError(path, f"not a readable Zarr store ({exc})") from None
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise InputError(path, "voxel store is incomplete (an interrupted `cmda preprocess`: rerun it to resume)")
        settings = attrs.get("identity", {}).get("settings", {})
        if bins is not None and settings.get("bins") != bins:
            raise InputError(path, f"store was built with bins={settings.get('bins')}, the config asks for {bins}: "
                             "rerun `cmda preprocess` (or `dvc repro`)")
        return cls(path, group)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["identity"]["settings"])

    def index(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    @functools.cached_property
    def frames(self) -> int:
        return int(self.group["voxels"].shape[0])

    @functools.cached_property
    def _chunks(self) -> FrameChunks:
        return FrameChunks(self.path)

    def voxels(self, frame: int) -> np.ndarray:
        """Voxel grid (bins, H, W) float32 of one frame (read-only view)."""
        if not 0 <= frame < self.frames:
            raise IndexError(f"{self.path}: frame {frame} out of range")
        return self._chunks.read(frame)


REPRESENTATION_ARRAY = "frames"


@dataclass
class RepresentationStore:
    """Read side of a store of another event representation than CMDA's voxel grid.

    Same layout as the voxel store (index arrays, one frame per chunk, resumable build) with the
    per-frame array ``frames`` of shape (frames, channels, H, W) in the kind's dtype, and the
    attribute ``representation`` = {kind, its parameters, suffix, channels, dtype}.
    """

    path: Path
    group: zarr.Group

    @classmethod
    def open(cls, path: str | Path, *, expect: dict[str, Any] | None = None) -> RepresentationStore:
        """Open a complete store; with ``expect`` (a kind and its parameters, as
        ``pipeline.representations.describe`` gives them) insist it holds exactly that setting."""
        path = Path(path)
        if not path.exists():
            raise InputError(path, "representation store not found (run `cmda preprocess` or `dvc repro`)")
        try:
            group = zarr.open_group(path, mode="r")
        except Exception as exc:
            raise InputError(path, f"not a readable Zarr store ({exc})") from None
        attrs = dict(group.attrs)
        rep = attrs.get("representation")
        if not isinstance(rep, dict) or REPRESENTATION_ARRAY not in group:
            raise InputError(path, "not a representation store (no 'representation' attribute)")
        if not attrs.get("complete"):
            raise InputError(path, "representation store is incomplete (an interrupted `cmda preprocess`: "
                             "rerun it to resume)")
        if expect is not None and any(rep.get(k) != v for k, v in expect.items()):
            got = {k: rep.get(k) for k in expect}
            raise InputError(path, f"store holds {got}, expected {expect}: rerun `cmda preprocess`")
        return cls(path, group)

    @property
    def representation(self) -> dict[str, Any]:
        return dict(self.group.attrs["representation"])

    def index(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    @functools.cached_property
    def frames(self) -> int:
        return int(self.group[REPRESENTATION_ARRAY].shape[0])

    @functools.cached_property
    def _chunks(self) -> FrameChunks:
        return FrameChunks(self.path, REPRESENTATION_ARRAY)

    def frame(self, frame: int) -> np.ndarray:
        """One frame (channels, H, W) in the kind's dtype (read-only view; all zeros without a window)."""
        if not 0 <= frame < self.frames:
            raise IndexError(f"{self.path}: frame {frame} out of range")
        return self._chunks.read(frame)
