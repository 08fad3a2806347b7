"""pipeline.events_h5: DSEC's events.h5 schema written in one go or streamed, read back by EventFile."""

from __future__ import annotations

import itertools

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

from pipeline.dsec import EventFile
from pipeline.events_h5 import CHUNK, EventsH5Writer, ms_to_idx, write_events_h5

T_OFFSET = 12_345_678_901


def _events(n: int, t_max: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, t_max, n)).astype(np.uint32)
    return (rng.integers(0, 640, n).astype(np.uint16), rng.integers(0, 480, n).astype(np.uint16),
            rng.integers(0, 2, n).astype(np.uint8), t)


def test_round_trip_with_event_file(tmp_path):
    x, y, p, t = _events(123_457, 250_000)
    path = tmp_path / "events.h5"
    write_events_h5(path, x, y, p, t, T_OFFSET)
    with EventFile(path) as ef:
        assert ef.n_events == x.size and ef.t_offset == T_OFFSET
        got = ef.read(1000, 2000)
        assert np.array_equal(got["x"], x[1000:2000]) and np.array_equal(got["t"], t[1000:2000])
        assert np.array_equal(got["p"], p[1000:2000]) and np.array_equal(got["y"], y[1000:2000])
        # index_of_time agrees with a brute-force search over absolute (int64) times.
        probe = T_OFFSET + np.array([0, 999, 1000, 54_321, int(t[-1]), int(t[-1]) + 1])
        brute = np.searchsorted(t.astype(np.int64) + T_OFFSET, probe, side="right") - 1
        brute[(probe < T_OFFSET + int(t[0])) | (probe > T_OFFSET + int(t[-1]))] = -1
        assert np.array_equal(ef.index_of_time(probe), brute)


def test_schema_compression_and_ms_to_idx(tmp_path):
    x, y, p, t = _events(90_001, 96_095)
    path = tmp_path / "events.h5"
    write_events_h5(path, x, y, p, t, T_OFFSET)
    with h5py.File(path, "r") as f:
        for name, dtype in [("events/x", np.uint16), ("events/y", np.uint16), ("events/p", np.uint8),
                            ("events/t", np.uint32), ("ms_to_idx", np.uint64)]:
            ds = f[name]
            assert ds.dtype == dtype
            opts = ds._filters["32001"]  # Blosc: (.., .., typesize, chunk bytes, clevel, shuffle, compressor)
            assert opts[4:] == (1, 1, 5)  # level 1, byte shuffle, zstd: as in DSEC's files
        assert f["events/t"].chunks == (CHUNK,)
        assert f["t_offset"].dtype == np.int64 and f["t_offset"].shape == ()
        assert f["t_offset"]._filters == {}
        ms = f["ms_to_idx"][:].astype(np.int64)
    assert ms.size == int(t[-1]) // 1000 + 2  # as in DSEC's files
    t64 = t.astype(np.int64)
    for m in range(ms.size):
        k = ms[m]
        assert k == x.size or t64[k] >= 1000 * m
        assert k == 0 or t64[k - 1] < 1000 * m
    assert np.array_equal(ms, ms_to_idx(t).astype(np.int64))


def test_streamed_equals_one_shot(tmp_path):
    """The writer buffers whole chunks, so how the caller splits the stream does not change the bytes."""
    x, y, p, t = _events(200_003, 500_000, seed=4)
    write_events_h5(tmp_path / "a.h5", x, y, p, t, T_OFFSET)
    cuts = [0, 1, 777, 40_000, 40_001, 120_000, 199_999, x.size]
    with EventsH5Writer(tmp_path / "b.h5", T_OFFSET) as w:
        for a, b in itertools.pairwise(cuts):
            w.append(x[a:b], y[a:b], p[a:b], t[a:b])
        w.append(x[:0], y[:0], p[:0], t[:0])
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_times_are_widened_before_the_offset_is_added(tmp_path):
    """t (uint32) + t_offset (int64, beyond uint32) must be computed in int64 by the reader: the
    image->event index of the last event's absolute time is the last event, and the time uint32
    arithmetic would produce (wrapped modulo 2**32) lies outside the stream."""
    x, y, p, t = _events(1000, 4_000_000)
    write_events_h5(tmp_path / "e.h5", x, y, p, t, T_OFFSET)
    last_abs = int(t[-1]) + T_OFFSET
    assert np.iinfo(np.uint32).max < T_OFFSET
    with EventFile(tmp_path / "e.h5") as ef:
        assert ef.t_offset + ef.t_last == last_abs
        got = ef.index_of_time([last_abs, last_abs - 1, int(t[0]) + T_OFFSET - 1, last_abs % 2**32])
    before_last = int(np.flatnonzero(t.astype(np.int64) <= int(t[-1]) - 1)[-1])
    assert got.tolist() == [999, before_last, -1, -1]


@pytest.mark.parametrize("bad, message", [
    ({"t": np.array([5, 3], np.uint32)}, "sorted"),
    ({"x": np.array([640, 1], np.uint16)}, "x must lie"),
    ({"p": np.array([0, 2], np.uint8)}, "p must lie"),
    ({"t": np.array([-1, 3])}, "t must lie"),
    ({"y": np.array([1.0, 2.0])}, "integers"),
    ({"x": np.array([1, 2, 3], np.uint16)}, "length"),
])
def test_bad_input_is_rejected_and_nothing_is_left(tmp_path, bad, message):
    ev = {"x": np.array([1, 2], np.uint16), "y": np.array([1, 2], np.uint16), "p": np.array([0, 1], np.uint8),
          "t": np.array([3, 5], np.uint32)}
    ev.update(bad)
    with pytest.raises(ValueError, match=message):
        write_events_h5(tmp_path / "e.h5", ev["x"], ev["y"], ev["p"], ev["t"], T_OFFSET)
    assert not list(tmp_path.iterdir())


def test_stream_must_not_go_back_in_time(tmp_path):
    with pytest.raises(ValueError, match="continue"), EventsH5Writer(tmp_path / "e.h5", 0) as w:
        w.append(np.array([1]), np.array([1]), np.array([1]), np.array([100]))
        w.append(np.array([1]), np.array([1]), np.array([1]), np.array([99]))
    assert not (tmp_path / "e.h5").exists()


def test_empty_stream(tmp_path):
    write_events_h5(tmp_path / "e.h5", *(np.empty(0, d) for d in (np.uint16, np.uint16, np.uint8, np.uint32)), 7)
    with EventFile(tmp_path / "e.h5") as ef:
        assert ef.n_events == 0 and ef.t_offset == 7
        assert list(ef.index_of_time([7, 100])) == [-1, -1]


def test_index_of_time_rejects_an_inconsistent_ms_to_idx(tmp_path):
    from pipeline.errors import InputError

    x, y, p, t = _events(50_000, 40_000, seed=3)
    path = tmp_path / "events.h5"
    write_events_h5(path, x, y, p, t, T_OFFSET)
    with h5py.File(path, "r+") as f:
        ms = f["ms_to_idx"][:]
        ms[20] += 500  # points past events of millisecond 20: ms_to_idx[20] no longer starts it
        f["ms_to_idx"][:] = ms
    with EventFile(path) as ef, pytest.raises(InputError, match=r"ms_to_idx\[20\] is inconsistent"):
        ef.index_of_time(np.array([T_OFFSET + 20_000]))  # the event before the bucket is later than this
    # The other bound: the next millisecond's start moved back into millisecond 20.
    write_events_h5(path, x, y, p, t, T_OFFSET)
    with h5py.File(path, "r+") as f:
        ms = f["ms_to_idx"][:]
        ms[21] -= 500
        f["ms_to_idx"][:] = ms
    with EventFile(path) as ef, pytest.raises(InputError, match=r"ms_to_idx\[20\] is inconsistent"):
        ef.index_of_time(np.array([T_OFFSET + 20_999]))  # the event after the bucket is earlier than this
