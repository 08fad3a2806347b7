"""EventFile reads: the raw-chunk Blosc path returns exactly what HDF5 returns, other layouts fall back."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from pipeline.dsec import EventFile, blosc_chunked
from pipeline.events_h5 import write_events_h5

RANGES = [(0, None), (39_999, 40_001), (12_345, 167_890), (-5, None), (7, 7)]


def _check_reads(path):
    with EventFile(path) as ef, h5py.File(path) as f:
        n = ef.n_events
        for a, b in RANGES:
            a = a % n if a < 0 else a
            b = n if b is None else b
            ev = ef.read(a, b)
            for k in "xypt":
                np.testing.assert_array_equal(ev[k], f[f"events/{k}"][a:b])
                assert ev[k].dtype == f[f"events/{k}"].dtype


def test_blosc_fast_path_on_the_real_recording(real_dir):
    path = real_dir / "prophesee_gen3_vga" / "events.h5"
    with h5py.File(path) as f:
        assert all(blosc_chunked(f[f"events/{k}"]) for k in "xypt")
    _check_reads(path)


@pytest.mark.parametrize("layout", ["blosc", "gzip", "contiguous"])
def test_reads_match_hdf5_for_every_layout(tmp_path, layout):
    rng = np.random.default_rng(0)
    n = 200_000
    x = rng.integers(0, 640, n).astype(np.uint16)
    y = rng.integers(0, 480, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    t = np.sort(rng.integers(0, 100_000, n)).astype(np.uint32)
    path = tmp_path / "events.h5"
    if layout == "blosc":
        write_events_h5(path, x, y, p, t, 10_000_000_000)
    else:
        kw = {"compression": "gzip", "chunks": (30_000,)} if layout == "gzip" else {}
        ms = np.searchsorted(t, np.arange(0, int(t[-1]) // 1000 + 2) * 1000).astype(np.uint64)
        with h5py.File(path, "w") as f:
            for k, v in zip("xypt", (x, y, p, t), strict=True):
                f.create_dataset(f"events/{k}", data=v, **kw)
            f["ms_to_idx"] = ms
            f["t_offset"] = np.int64(10_000_000_000)
    with h5py.File(path) as f:
        assert blosc_chunked(f["events/t"]) == (layout == "blosc")
    _check_reads(path)
    assert hdf5plugin  # the Blosc filter is registered for HDF5's own reads too
