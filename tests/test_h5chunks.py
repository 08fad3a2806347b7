"""pipeline.h5chunks: Blosc chunks read and decoded outside HDF5 give exactly h5py's arrays."""

from __future__ import annotations

import itertools
import threading

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

from pipeline.dsec import EventFile
from pipeline.errors import InputError
from pipeline.events_h5 import CHUNK, blosc_filter, write_events_h5
from pipeline.h5chunks import chunk_table

T_OFFSET = 9_876_543_210


def _stream(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 640, n).astype(np.uint16), rng.integers(0, 480, n).astype(np.uint16),
            rng.integers(0, 2, n).astype(np.uint8), np.sort(rng.integers(0, 400_000, n)).astype(np.uint32))


def _ranges(n: int, seed: int = 1) -> list[tuple[int, int]]:
    """Chunk-aligned, chunk-straddling, single-element, tail and whole-file ranges, plus random ones."""
    rng = np.random.default_rng(seed)
    fixed = [(0, 1), (0, CHUNK), (CHUNK - 1, CHUNK + 1), (CHUNK, 2 * CHUNK), (3, 3 * CHUNK + 7),
             (n - 1, n), (n - CHUNK - 5, n), (0, n)]
    rand = [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(30)]
    return [(a, b) for a, b in fixed + rand if 0 <= a < b <= n]


def _assert_reads_match(path, n: int) -> None:
    with h5py.File(path, "r") as f, EventFile(path) as ef:
        for a, b in _ranges(n):
            got = ef.read(a, b)
            for k in "xypt":
                expect = f[f"events/{k}"][a:b]
                assert got[k].dtype == expect.dtype and np.array_equal(got[k], expect), (k, a, b)
        assert all(ef._direct[k] is not None for k in "xypt")  # the direct path was taken


def test_direct_reads_equal_h5py_on_a_written_stream(tmp_path):
    n = 3 * CHUNK + 12_345  # a partial last chunk
    path = tmp_path / "events.h5"
    write_events_h5(path, *_stream(n), T_OFFSET)
    _assert_reads_match(path, n)


def test_direct_reads_equal_h5py_on_real_recording(real_dir):
    path = real_dir / "prophesee_gen3_vga" / "events.h5"
    with h5py.File(path, "r") as f:
        n = f["events/t"].shape[0]
    _assert_reads_match(path, n)


def _write_plain(path, n: int, **options) -> tuple[np.ndarray, ...]:
    """An events.h5 with the DSEC datasets but another storage (gzip, contiguous, ...)."""
    x, y, p, t = _stream(n, seed=3)
    with h5py.File(path, "w") as f:
        for k, v in zip("xypt", (x, y, p, t), strict=True):
            f.create_dataset(f"events/{k}", data=v, **options)
        ms = np.searchsorted(t, np.arange(0, int(t[-1]) // 1000 + 2) * 1000).astype(np.uint64)
        f.create_dataset("ms_to_idx", data=ms)
        f.create_dataset("t_offset", data=np.int64(T_OFFSET))
    return x, y, p, t


@pytest.mark.parametrize("options", [{"chunks": (1000,), "compression": "gzip"}, {}],
                         ids=["gzip", "contiguous"])
def test_other_storage_falls_back_to_h5py(tmp_path, options):
    path = tmp_path / "events.h5"
    expect = _write_plain(path, 5_000, **options)
    with EventFile(path) as ef:
        got = ef.read(123, 4_567)
        assert ef._direct["x"] is None  # not Blosc: h5py reads it
    for k, v in zip("xypt", expect, strict=True):
        assert np.array_equal(got[k], v[123:4_567])


def test_a_chunk_stored_without_its_filter_falls_back(tmp_path):
    # HDF5 may store a chunk raw when compressing it did not help (filter mask bit set); h5py
    # handles that, the direct path does not try.
    path = tmp_path / "events.h5"
    n = 2 * CHUNK
    x, y, p, t = _stream(n, seed=4)
    write_events_h5(path, x, y, p, t, T_OFFSET)
    raw_x = np.arange(CHUNK, dtype=np.uint16)
    with h5py.File(path, "r+") as f:
        f["events/x"].id.write_direct_chunk((CHUNK,), raw_x.tobytes(), filter_mask=1)
    with h5py.File(path, "r") as f:
        assert chunk_table(f["events/x"]) is None and chunk_table(f["events/y"]) is not None
    with EventFile(path) as ef:
        got = ef.read(CHUNK - 10, CHUNK + 10)
    assert np.array_equal(got["x"], np.concatenate([x[CHUNK - 10:CHUNK], raw_x[:10]]))
    assert np.array_equal(got["y"], y[CHUNK - 10:CHUNK + 10])


def test_a_corrupt_chunk_names_the_file_and_dataset(tmp_path):
    path = tmp_path / "events.h5"
    t = _stream(3 * CHUNK, seed=5)[3]
    write_events_h5(path, *_stream(3 * CHUNK, seed=5), T_OFFSET)
    with h5py.File(path, "r") as f:
        table = chunk_table(f["events/t"])
    with open(path, "r+b") as fh:  # the Blosc header's uncompressed size of the second t chunk
        fh.seek(int(table.offset[1]) + 4)
        fh.write((123).to_bytes(4, "little"))
    with EventFile(path) as ef:
        assert np.array_equal(ef.read(0, 10)["t"], t[:10])  # the first chunk is intact
        with pytest.raises(InputError, match=r"events\.h5.*events/t.*chunk 1 is corrupt"):
            ef.read(CHUNK, CHUNK + 5)
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["events/t"][CHUNK:CHUNK + 5]  # HDF5 refuses that chunk too


def test_h5py_read_errors_name_the_file(tmp_path):
    path = tmp_path / "events.h5"
    _write_plain(path, 5_000, chunks=(1000,), compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["events/y"].id.get_chunk_info(2).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 16)  # break the deflate stream of y's third chunk
    with EventFile(path) as ef, pytest.raises(InputError, match=r"events\.h5.*events/y.*cannot read"):
        ef.read(2_000, 2_100)


def test_threads_share_one_file(tmp_path):
    n = 6 * CHUNK
    path = tmp_path / "events.h5"
    x, y, p, t = _stream(n, seed=6)
    write_events_h5(path, x, y, p, t, T_OFFSET)
    errors: list[str] = []
    with EventFile(path) as ef:
        ef.read(0, 1)

        def worker(seed: int) -> None:
            for a, b in _ranges(n, seed):
                got = ef.read(a, b)
                if not (np.array_equal(got["x"], x[a:b]) and np.array_equal(got["t"], t[a:b])):
                    errors.append(f"{a}:{b}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert errors == []


def test_blosc_filter_settings_are_what_the_direct_path_expects(tmp_path):
    # The writer's own files must take the direct path (one Blosc filter, every chunk present).
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("v", data=np.arange(10_000, dtype=np.uint32), chunks=(1_000,), **blosc_filter())
        table = chunk_table(ds)
    assert table is not None and table.offset.size == 10 and np.all(table.size > 0)


def test_a_file_truncated_under_a_reader_is_reported(tmp_path):
    path = tmp_path / "events.h5"
    write_events_h5(path, *_stream(3 * CHUNK, seed=7), T_OFFSET)
    with EventFile(path) as ef:
        ef.read(0, 1)
        with h5py.File(path, "r") as f:
            cut = int(chunk_table(f["events/x"]).offset[2]) + 10
        with open(path, "r+b") as fh:  # another process truncates the file while it is open
            fh.truncate(cut)
        with pytest.raises(InputError, match=r"events\.h5.*events/[xypt].*file ends inside chunk"):
            ef.read(2 * CHUNK, 2 * CHUNK + 5)



def test_fields_of_one_read_share_a_block_but_not_their_values(tmp_path):
    path = tmp_path / "events.h5"
    x, y, p, t = _stream(2 * CHUNK + 3, seed=9)
    write_events_h5(path, x, y, p, t, T_OFFSET)
    with EventFile(path) as ef:
        got = ef.read(7, 2 * CHUNK + 1)
        assert all(got[k].flags.aligned for k in "xypt")
        got["t"][:] = 0  # t sits first in the block: zeroing it must not touch x, y or p
        got["x"][:] = 0
        assert np.array_equal(got["y"], y[7:2 * CHUNK + 1]) and np.array_equal(got["p"], p[7:2 * CHUNK + 1])
        again = ef.read(7, 2 * CHUNK + 1)
        reader = ef._direct["x"]
        with pytest.raises(ValueError, match="out must be"):
            reader.read(0, 10, out=np.empty(10, np.uint8))
    assert np.array_equal(again["y"], y[7:2 * CHUNK + 1]) and np.array_equal(again["t"], t[7:2 * CHUNK + 1])


def test_without_preadv_h5py_reads(tmp_path, monkeypatch):
    import pipeline.h5chunks as h5chunks

    path = tmp_path / "events.h5"
    x, y, p, t = _stream(CHUNK + 9, seed=10)
    write_events_h5(path, x, y, p, t, T_OFFSET)
    monkeypatch.delattr(h5chunks.os, "preadv")
    with EventFile(path) as ef:
        got = ef.read(3, CHUNK + 9)
        assert ef._direct["t"] is None
    assert np.array_equal(got["t"], t[3:]) and np.array_equal(got["x"], x[3:])


class _CountingCodec:
    """Wraps the module's Blosc decompress function and counts decoded chunks."""

    def __init__(self, decompress):
        self.decompress, self.calls = decompress, 0

    def __call__(self, raw, out):
        self.calls += 1
        return self.decompress(raw, out)


def test_back_to_back_windows_decode_their_shared_chunk_once(tmp_path, monkeypatch):
    """A stream reads window after window; the chunk holding a boundary is decoded for the first
    window and reused (copied) for the next, and no earlier result changes afterwards."""
    import pipeline.h5chunks as h5chunks

    n = 4 * CHUNK + 777
    path = tmp_path / "events.h5"
    write_events_h5(path, *_stream(n), T_OFFSET)
    counting = _CountingCodec(h5chunks._DECOMPRESS)
    monkeypatch.setattr(h5chunks, "_DECOMPRESS", counting)
    bounds = [0, CHUNK // 2, CHUNK + 10, CHUNK + 20, 3 * CHUNK, 3 * CHUNK + 1, n]
    with h5py.File(path, "r") as f, EventFile(path) as ef:
        expect = {k: f[f"events/{k}"][:] for k in "xypt"}
        counting.calls = 0  # (opening checked chunk 0 and read the first/last t)
        kept = [ef.read(a, b) for a, b in itertools.pairwise(bounds)]
        for (a, b), got in zip(itertools.pairwise(bounds), kept, strict=True):
            for k in "xypt":
                assert np.array_equal(got[k], expect[k][a:b]), (k, a, b)
        chunks = [(a // CHUNK, (b - 1) // CHUNK) for a, b in itertools.pairwise(bounds)]
        decoded = len(set().union(*(range(c0, c1 + 1) for c0, c1 in chunks)))
        assert counting.calls == 4 * decoded  # each chunk of each field once, none twice
        # a jump back is decoded again and still right
        got = ef.read(5, CHUNK + 5)
        assert all(np.array_equal(got[k], expect[k][5:CHUNK + 5]) for k in "xypt")


@pytest.mark.parametrize(("user", "expect"), [("", "False"), ("b.use_threads = True;", "True")])
def test_blosc_thread_pool_is_off_unless_the_user_chose(user, expect):
    """Blosc's global pool made event reads ~1.7x slower (module comment); a user's own choice stays."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import numcodecs.blosc as b; {user} import pipeline.h5chunks; print(b.use_threads)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == expect
