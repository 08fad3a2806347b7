"""Reading Blosc-compressed 1-D HDF5 datasets chunk by chunk, outside HDF5's global lock.

h5py serialises every HDF5 call on one process-wide lock, and HDF5 runs its filters (here the
Blosc decompression) inside that call. Two threads reading ``events.h5`` therefore take turns,
although three quarters of a read is decompression that could run on another core. DSEC stores
each event field as a chunked 1-D dataset whose only filter is Blosc (HDF5 filter 32001). For
such a dataset :class:`BloscChunks` looks up the file offset of every chunk once
(``H5Dchunk_iter``), then reads the compressed bytes with ``os.pread`` and decodes them with
numcodecs' Blosc (the same c-blosc). Both release the GIL and take no HDF5 lock, so threads read
and decode at the same time.

Any dataset this does not cover falls back to h5py (:func:`BloscChunks.open` returns None):
other filters or filter chains, a chunk stored with its filter skipped, chunks never written
(HDF5 would return the fill value), non-native byte order, an offset that does not match
what HDF5 itself returns for the first chunk, or a platform without ``os.preadv``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numcodecs import blosc as numcodecs_blosc

from pipeline.errors import InputError

BLOSC_FILTER_ID = 32001
MAX_GAP = 64 * 1024  # chunks at most this far apart on disk are fetched with one pread

# numcodecs.blosc.decompress, not Blosc().decode: decoding needs no settings (every Blosc buffer
# carries its own header), and the codec method's argument normalisation cost ~2.5 us of a ~120 us
# chunk decode (py-spy and process-time timing, benchmarks/bench_voxel.py --read-profile).
_DECOMPRESS = numcodecs_blosc.decompress

if numcodecs_blosc.use_threads is None:
    # numcodecs' default (None) decodes on Blosc's global thread pool whenever it is called from the
    # main thread. For DSEC's 40k-event chunks that pool costs more than it gives: a 330k-event read
    # took 8.5-9.0 ms with it and 5.0 ms without on the 2-core VM (benchmarks/bench_infer.py), and
    # cmda reads in parallel with its own worker threads anyway (where numcodecs never uses the
    # pool). A value the user set (True/False) is left alone; Zarr stores' encoding in the main
    # thread is the only other user (0.27 vs 0.34 ms per frame grid: noise next to a read).
    numcodecs_blosc.use_threads = False
_SCRATCH = threading.local()  # per-thread buffer for compressed bytes


@dataclass(frozen=True)
class ChunkTable:
    """Where a dataset's chunks lie in the file: chunk ``c`` holds elements ``c*chunk .. c*chunk+chunk-1``."""

    chunk: int
    dtype: np.dtype
    offset: np.ndarray  # int64 byte offset of each chunk in the file
    size: np.ndarray  # int64 compressed size of each chunk


def chunk_table(ds: h5py.Dataset) -> ChunkTable | None:
    """The chunk table of ``ds``, or None when the direct path does not apply (see module doc)."""
    if ds.ndim != 1 or ds.chunks is None or not ds.dtype.isnative or not hasattr(ds.id, "chunk_iter"):
        return None  # (chunk_iter needs HDF5 >= 1.14)
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CHUNKED or dcpl.get_nfilters() != 1:
        return None
    if dcpl.get_filter(0)[0] != BLOSC_FILTER_ID:
        return None
    length, chunk = int(ds.shape[0]), int(ds.chunks[0])
    n_chunks = -(-length // chunk)
    offset = np.full(n_chunks, -1, dtype=np.int64)
    size = np.zeros(n_chunks, dtype=np.int64)
    skipped = []

    def visit(info) -> None:
        c = info.chunk_offset[0] // chunk
        if info.filter_mask:
            skipped.append(c)
        offset[c], size[c] = info.byte_offset, info.size

    if n_chunks:
        ds.id.chunk_iter(visit)
    if skipped or np.any(offset < 0):
        return None
    return ChunkTable(chunk, ds.dtype, offset, size)


class BloscChunks:
    """Read element ranges of one Blosc-compressed 1-D dataset straight from the file."""

    def __init__(self, path: Path, name: str, table: ChunkTable, fd: int):
        self.path, self.name, self.table, self._fd = path, name, table, fd
        # Per thread, the last chunk a read decoded (index, bytes): a stream reads window after
        # window, and the chunk holding the boundary between two windows would otherwise be
        # decoded twice (one of the ~9 chunks of a 50 ms DSEC window).
        self._last = threading.local()

    @classmethod
    def open(cls, path: str | Path, ds: h5py.Dataset, fd: int) -> BloscChunks | None:
        """Direct reader of ``ds`` (a dataset of the HDF5 file ``path``, also open as ``fd``), or None."""
        table = chunk_table(ds)
        if table is None or not hasattr(os, "preadv"):  # no preadv (Windows, some macOS builds): h5py
            return None
        reader = cls(Path(path), ds.name, table, fd)
        if table.offset.size:
            # Trust the offsets only if they give HDF5's own bytes for a chunk (a file with a
            # user block, for one, could shift them).
            _, expected = ds.id.read_direct_chunk((0,))
            if bytes(next(reader._fetch(0, 1))) != expected:
                return None
        return reader

    def _fetch(self, c0: int, c1: int) -> Iterator[memoryview]:
        """Compressed bytes of chunks ``c0 .. c1-1``, one pread per run of nearby chunks.

        The bytes land in this thread's scratch buffer (a fresh multi-MB bytes object per run
        costs page faults), so each view is valid only until the generator moves to the next run.
        """
        off, size = self.table.offset, self.table.size
        c = c0
        while c < c1:
            end = c + 1
            while end < c1 and 0 <= off[end] - (off[end - 1] + size[end - 1]) <= MAX_GAP:
                end += 1
            base = int(off[c])
            want = int(off[end - 1] + size[end - 1]) - base
            scratch = getattr(_SCRATCH, "buf", None)
            if scratch is None or scratch.size < want:
                scratch = _SCRATCH.buf = np.empty(want, np.uint8)
            data = memoryview(scratch)[:want]
            if os.preadv(self._fd, [data], base) != want:
                raise InputError(self.path, f"dataset '{self.name}': file ends inside chunk {c}..{end - 1} "
                                 "(truncated?)")
            for k in range(c, end):
                yield data[int(off[k]) - base:int(off[k] + size[k]) - base]
            c = end

    def span(self, start: int, stop: int) -> int:
        """Elements decoded to read ``start .. stop-1``: whole chunks."""
        chunk = self.table.chunk
        return ((stop - 1) // chunk + 1 - start // chunk) * chunk

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``start .. stop-1`` (already clipped to the dataset by the caller).

        ``out``: a uint8 buffer of ``span(start, stop) * itemsize`` bytes to decode into (the
        result is a view of it), so a caller can take all fields of a read from one allocation.
        """
        tab = self.table
        c0, c1 = start // tab.chunk, (stop - 1) // tab.chunk + 1
        chunk_bytes = tab.chunk * tab.dtype.itemsize
        flat = np.empty((c1 - c0) * chunk_bytes, np.uint8) if out is None else out
        if flat.dtype != np.uint8 or flat.size != (c1 - c0) * chunk_bytes:
            raise ValueError(f"out must be {(c1 - c0) * chunk_bytes} bytes (uint8)")
        last = self._last
        first_new = c0
        if getattr(last, "index", None) == c0:
            flat[:chunk_bytes] = last.data
            first_new = c0 + 1
        for j, raw in enumerate(self._fetch(first_new, c1), start=first_new - c0):
            try:
                if _decoded_size(raw) != chunk_bytes:
                    raise ValueError(f"holds {_decoded_size(raw)} bytes, a chunk has {chunk_bytes}")
                _DECOMPRESS(raw, flat[j * chunk_bytes:(j + 1) * chunk_bytes])
            except (ValueError, RuntimeError) as exc:
                raise InputError(self.path, f"dataset '{self.name}': chunk {c0 + j} is corrupt ({exc})") from None
        if getattr(last, "index", None) != c1 - 1:
            if getattr(last, "data", None) is None:
                last.data = np.empty(chunk_bytes, np.uint8)
            last.data[:] = flat[(c1 - 1 - c0) * chunk_bytes:]
            last.index = c1 - 1
        first = start - c0 * tab.chunk
        return flat.view(tab.dtype)[first:first + (stop - start)]


def _decoded_size(raw: memoryview) -> int:
    """Uncompressed size from a Blosc buffer's 16-byte header (bytes 4-7, little-endian)."""
    if len(raw) < 16:
        raise ValueError("shorter than a Blosc header")
    return int.from_bytes(raw[4:8], "little")

