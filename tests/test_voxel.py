"""The voxel kernel and events_norm against slow, obviously-correct NumPy references of CMDA's formulas
(XiaRho/CMDA at 9d25129, mmseg/datasets/dsec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.dsec import EventFile, load_rectify_map
from pipeline.voxel import accumulate_voxels, events_norm, first_decrease, rectifier, voxel_grid

H, W = 480, 640


def reference_voxels(x, y, p, t, rmap, bins, height=H, width=W, *, t_first=None, t_last=None, magnitude=False):
    """CMDA's voxel grid literally, with np.add.at, float64 weights. ``t_first``/``t_last`` default to the
    first and last event times; ``magnitude=True`` also returns each cell's magnitude, the sum of
    the absolute values of the weights added to it."""
    xf = rmap[y.astype(np.int64), x.astype(np.int64), 0].astype(np.float64)
    yf = rmap[y.astype(np.int64), x.astype(np.int64), 1].astype(np.float64)
    t64 = t.astype(np.int64)
    t0 = int(t64[0]) if t_first is None else t_first
    t1 = int(t64[-1]) if t_last is None else t_last
    span = np.float32(t1 - t0)
    tau = (t64 - t0).astype(np.float32) / span if span > 0 else np.zeros(len(t), np.float32)
    tn = (np.float32(bins - 1) * tau).astype(np.float64)
    value = 2.0 * p.astype(np.float64) - 1.0
    x0, y0, t0 = np.trunc(xf), np.trunc(yf), np.trunc(tn)
    grid = np.zeros(bins * height * width, np.float64)
    mag = np.zeros_like(grid)
    for dx in (0, 1):
        for dy in (0, 1):
            for dt in (0, 1):
                xl, yl, tl = x0 + dx, y0 + dy, t0 + dt
                w = value * (1 - np.abs(xl - xf)) * (1 - np.abs(yl - yf)) * (1 - np.abs(tl - tn))
                ok = (xl >= 0) & (xl < width) & (yl >= 0) & (yl < height) & (tl >= 0) & (tl < bins)
                flat = ((tl[ok] * height + yl[ok]) * width + xl[ok]).astype(np.int64)
                np.add.at(grid, flat, w[ok])
                np.add.at(mag, flat, np.abs(w[ok]))
    shape = (bins, height, width)
    return (grid.reshape(shape), mag.reshape(shape)) if magnitude else grid.reshape(shape)


def assert_within_magnitude(got, ref, mag, rel=1e-5):
    """|got - ref| <= rel * magnitude in every cell: a cell no event reaches stays exactly 0, and a
    cell's float32 error is measured against the weights that built it, not against its (possibly
    cancelled) sum."""
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > rel * mag
    assert not bad.any(), (f"{bad.sum()} cells off, worst {np.max(err[bad]):.3g} where the magnitude is "
                           f"{mag[bad][np.argmax(err[bad])]:.3g}")


def reference_norm(grid, n, cmda_empty_part=False):
    """CMDA's events_norm, float64, including CMDA's min-max with 1e-8; a part with no cell of its sign stays 0
    (cmda's default) or, with ``cmda_empty_part``, is min-maxed too as CMDA's code does (-1 everywhere)."""
    g = grid.astype(np.float64)
    clip = n / 500000 * 1.5
    nz = g != 0
    if nz.sum():
        mean = g.sum() / nz.sum()
        std = np.sqrt((g**2).sum() / nz.sum() - mean**2)
        g = nz * (g - mean) / (std + 1e-8)
    pos = np.clip(g, 0, clip)
    neg = np.clip(g, -clip, 0)
    out = np.zeros_like(g)
    if cmda_empty_part or (pos > 0).any():
        out += (pos - pos.min()) / (pos.max() - pos.min() + 1e-8)
    if cmda_empty_part or (neg < 0).any():
        out += (neg - neg.min()) / (neg.max() - neg.min() + 1e-8) - 1
    return out


def assert_close_on_conditioned(got, ref, atol=1e-4, floor=1e-5):
    mask = np.abs(ref) >= floor
    assert mask.sum() > 0
    err = np.abs(got.astype(np.float64) - ref)[mask]
    assert err.max() <= atol, f"max error {err.max():.3g} on {mask.sum()} cells"
    # Cells below the floor must stay tiny too (no stray contributions).
    assert np.abs(got[~mask]).max(initial=0) < 1e-3


@pytest.fixture(scope="module", params=["generated", "real"])
def real_events(request, tmp_path_factory):
    """A recording's events and rectify map: one the tests write (always), and the real Prophesee
    recording where ../shared exists. Both go through events.h5 and EventFile, as preprocess reads."""
    if request.param == "real":
        real_dir = request.getfixturevalue("real_dir")
        folder = real_dir / "prophesee_gen3_vga"
        events, rmap_path = folder / "events.h5", folder / "rectify_map.h5"
    else:
        from tests.dsec_fixtures import synthetic_sequence_tree

        seq, _ = synthetic_sequence_tree(tmp_path_factory.mktemp("voxel"), n=500_000)
        events, rmap_path = seq / "events" / "left" / "events.h5", seq / "events" / "left" / "rectify_map.h5"
    with EventFile(events) as ef:
        ev = ef.read(0, ef.n_events)
    return ev, load_rectify_map(rmap_path)


@pytest.mark.parametrize("bins", [1, 5, 15])
@pytest.mark.parametrize("window", [(0, 1_000), (100_000, 150_001), (200_000, 460_000)])
def test_kernel_matches_reference_on_a_recording(real_events, bins, window):
    ev, rmap = real_events
    a, b = window
    x, y, p, t = (ev[k][a:b] for k in "xypt")
    got = voxel_grid(x, y, p, t, rmap, bins)
    ref = reference_voxels(x, y, p, t, rmap, bins)
    assert got.shape == (bins, H, W) and got.dtype == np.float32
    assert_close_on_conditioned(got, ref)
    # Polarity sum is preserved where no corner falls off the grid: a sanity check of the weights.
    assert abs(got.sum() - ref.sum()) < 1e-2 * max(1.0, abs(ref.sum()))


@pytest.mark.parametrize("bins", [1, 5, 15])
def test_events_norm_matches_reference_on_a_recording(real_events, bins):
    ev, rmap = real_events
    x, y, p, t = (ev[k][50_000:300_000] for k in "xypt")
    grid = voxel_grid(x, y, p, t, rmap, bins)
    ref_grid = reference_voxels(x, y, p, t, rmap, bins)
    n = len(t)
    got = events_norm(grid, n)
    ref = reference_norm(ref_grid, n)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert got.min() >= -1 - 1e-6 and got.max() <= 1 + 1e-6
    mask = np.abs(ref_grid) >= 1e-5
    assert np.abs(got[mask] - ref[mask]).max() <= 1e-4


def _synthetic(n, seed, bins_t=3_000):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, W, n).astype(np.uint16)
    y = rng.integers(0, H, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    t = np.sort(rng.integers(0, bins_t, n)).astype(np.uint32)
    return x, y, p, t


def _distorted_map(seed=0):
    """A map with sub-pixel offsets and some negative / out-of-range coordinates, like DSEC's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rmap = np.stack([xx * 1.03 - 12 + rng.random((H, W), np.float32),
                     yy * 1.02 - 4 + rng.random((H, W), np.float32)], axis=-1)
    return rmap.astype(np.float32)


@pytest.mark.parametrize("bins", [1, 5, 15])
def test_kernel_matches_reference_on_synthetic(bins):
    x, y, p, t = _synthetic(200_000, seed=bins)
    rmap = _distorted_map()
    assert_close_on_conditioned(voxel_grid(x, y, p, t, rmap, bins), reference_voxels(x, y, p, t, rmap, bins))


def test_truncation_toward_zero_not_floor():
    # One event at rectified x = -0.5: trunc gives corners 0 and 1 (weights 0.5 and -0.5), floor
    # would give corners -1 (off-grid) and 0 (weight 0.5). CMDA truncates; so do we.
    rmap = np.zeros((H, W, 2), np.float32)
    rmap[0, 0] = (-0.5, 10.0)
    one = np.zeros(1, np.uint16)
    grid = voxel_grid(one, one, np.ones(1, np.uint8), np.zeros(1, np.uint32), rmap, 1)
    assert grid[0, 10, 0] == pytest.approx(0.5)
    assert grid[0, 10, 1] == pytest.approx(-0.5)
    assert np.count_nonzero(grid) == 2
    ref = reference_voxels(one, one, np.ones(1, np.uint8), np.zeros(1, np.uint32), rmap, 1)
    np.testing.assert_allclose(grid, ref, atol=1e-6)


def test_all_equal_timestamps_no_nan():
    x, y, p, _ = _synthetic(5_000, seed=3)
    t = np.full(5_000, 123_456, np.uint32)
    rmap = _distorted_map()
    for bins in (1, 5):
        grid = voxel_grid(x, y, p, t, rmap, bins)
        assert np.isfinite(grid).all()
        assert np.abs(grid[1:]).max(initial=0) == 0  # tau = 0: everything in the first bin
        assert_close_on_conditioned(grid, reference_voxels(x, y, p, t, rmap, bins))
        assert np.isfinite(events_norm(grid, 5_000)).all()


def test_empty_window_is_zero_grid():
    empty = np.zeros(0, np.uint16)
    grid = voxel_grid(empty, empty, np.zeros(0, np.uint8), np.zeros(0, np.uint32), _distorted_map(), 5)
    assert grid.shape == (5, H, W) and not grid.any()
    normed = events_norm(grid, 0)
    assert np.isfinite(normed).all() and not normed.any()
    # CMDA's own formula turns an empty window into -1 everywhere; the flag keeps that behaviour.
    assert np.all(events_norm(grid, 0, cmda_empty_part=True) == -1)


def test_windows_fed_in_pieces_equal_one_piece():
    x, y, p, t = _synthetic(100_000, seed=7, bins_t=50_000)
    rmap = _distorted_map()
    maps = rectifier(rmap)
    t64 = t.astype(np.int64)
    whole = np.zeros((1, 5, H, W), np.float32)
    accumulate_voxels(x, y, p, t, maps, np.array([0]), np.array([100_000]), t64[:1], t64[-1:], whole)
    pieces = np.zeros_like(whole)
    for a in range(0, 100_000, 30_000):
        b = min(a + 30_000, 100_000)
        accumulate_voxels(x[a:b], y[a:b], p[a:b], t[a:b], maps, np.array([0]), np.array([b - a]),
                          t64[:1], t64[-1:], pieces)
    np.testing.assert_allclose(pieces, whole, atol=1e-4)


def test_many_windows_in_one_call_match_separate_calls():
    x, y, p, t = _synthetic(60_000, seed=11, bins_t=60_000)
    rmap = _distorted_map()
    edges = np.array([0, 10_000, 10_000, 35_000, 60_000])  # includes an empty window
    starts, stops = edges[:-1], edges[1:]
    t64 = t.astype(np.int64)
    for bins in (1, 5):
        grids = np.zeros((4, bins, H, W), np.float32)
        tf = t64[np.minimum(starts, len(t) - 1)]
        tl = t64[np.maximum(stops - 1, 0)]
        accumulate_voxels(x, y, p, t, rectifier(rmap), starts, stops, tf, tl, grids)
        for k in range(4):
            a, b = starts[k], stops[k]
            if a == b:
                assert not grids[k].any()
                continue
            np.testing.assert_allclose(grids[k], voxel_grid(x[a:b], y[a:b], p[a:b], t[a:b], rmap, bins), atol=1e-4)


def test_accumulate_rejects_bad_arguments():
    x, y, p, t = _synthetic(10, seed=0)
    maps = rectifier(_distorted_map())
    with pytest.raises(ValueError):
        accumulate_voxels(x, y, p, t, maps, np.array([0]), np.array([11]), np.zeros(1), np.zeros(1),
                          np.zeros((1, 1, H, W), np.float32))
    with pytest.raises(ValueError):
        accumulate_voxels(x, y, p, t, maps, np.array([0]), np.array([10]), np.zeros(1), np.zeros(1),
                          np.zeros((1, 1, H, W), np.float64))


def test_first_decrease_matches_numpy():
    rng = np.random.default_rng(5)
    t = np.sort(rng.integers(0, 1 << 31, 10_000)).astype(np.uint32)
    assert first_decrease(t) == -1
    assert first_decrease(t[:0]) == -1 and first_decrease(t[:1]) == -1
    # 4096 and 8192 sit on the kernel's block edges (blocks start at 1, 4097, 8193)
    for pos in (1, 17, 4096, 4097, 5_000, 8192, 8193, 9_999):
        bad = t.copy()
        bad[pos] = bad[pos - 1] - 1  # one step back
        bad[pos + 1:] = np.maximum(bad[pos + 1:], bad[pos - 1])
        expect = int(np.flatnonzero(bad[1:] < bad[:-1])[0]) + 1
        assert first_decrease(bad) == expect == pos
    two = t.copy()
    two[[4200, 4300]] = 0  # two decreases in one block: the first is reported
    assert first_decrease(two) == 4200
    equal = np.full(100, 7, np.uint32)  # equal timestamps are ordered
    assert first_decrease(equal) == -1


# ---- the multi-bin kernel against the reference, cell by cell within 1e-5 of the cell's magnitude


def _grid_of(x, y, p, t, rect, bins, t_first, t_last, grid=None):
    grid = np.zeros((1, bins, rect.height, rect.width), np.float32) if grid is None else grid
    accumulate_voxels(x, y, p, t, rect, np.array([0]), np.array([len(x)]), np.array([t_first]), np.array([t_last]),
                      grid)
    return grid[0]


@pytest.mark.parametrize("bins", [2, 5, 15])
def test_multibin_within_magnitude_on_synthetic(bins):
    x, y, p, t = _synthetic(150_000, seed=20 + bins, bins_t=40_000)
    rmap = _distorted_map(bins)
    ref, mag = reference_voxels(x, y, p, t, rmap, bins, magnitude=True)
    assert_within_magnitude(voxel_grid(x, y, p, t, rmap, bins), ref, mag)


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_within_magnitude_on_a_recording(real_events, bins):
    ev, rmap = real_events
    for a, b in ((0, 1), (0, 2_000), (100_000, 460_000)):
        x, y, p, t = (ev[k][a:b] for k in "xypt")
        ref, mag = reference_voxels(x, y, p, t, rmap, bins, magnitude=True)
        assert_within_magnitude(voxel_grid(x, y, p, t, rmap, bins), ref, mag)


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_empty_window_leaves_the_grid_as_it_was(bins):
    rect = rectifier(_distorted_map())
    grid = np.random.default_rng(0).random((1, bins, H, W), dtype=np.float32)
    before = grid.copy()
    empty = np.zeros(0, np.uint16)
    _grid_of(empty, empty, np.zeros(0, np.uint8), np.zeros(0, np.uint32), rect, bins, 0, 0, grid)
    assert grid.tobytes() == before.tobytes()


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_single_event(bins):
    rmap = _distorted_map()
    one = np.array([300], np.uint16), np.array([200], np.uint16), np.array([1], np.uint8), np.array([77], np.uint32)
    grid = voxel_grid(*one, rmap, bins)
    assert np.count_nonzero(grid) == 4 and np.count_nonzero(grid[0]) == 4  # t_first == t_last: tn = 0
    assert grid.sum() == pytest.approx(1.0, abs=1e-6)
    ref, mag = reference_voxels(*one, rmap, bins, magnitude=True)
    assert_within_magnitude(grid, ref, mag)


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_all_events_in_one_slab(bins):
    # t_last far beyond the events (a window fed in pieces): every tn lies in [0, 1), so only
    # planes 0 and 1 receive anything.
    x, y, p, t = _synthetic(50_000, seed=5, bins_t=1_000)
    rmap = _distorted_map()
    t_last = 1_000 * (bins - 1) + 1
    grid = _grid_of(x, y, p, t, rectifier(rmap), bins, 0, t_last)
    assert not grid[2:].any() and grid[0].any() and grid[1].any()
    ref, mag = reference_voxels(x, y, p, t, rmap, bins, t_first=0, t_last=t_last, magnitude=True)
    assert_within_magnitude(grid, ref, mag)


@pytest.mark.parametrize("bins", [5, 9])
def test_multibin_events_exactly_on_bin_boundaries(bins):
    # span = 1000 (bins - 1) and t a multiple of 1000: tn = t / 1000 exactly (bins - 1 a power of
    # two), so each event lands with weight 1 in plane t / 1000 and 0 in the next.
    rng = np.random.default_rng(3)
    n = 20_000
    k = np.sort(rng.integers(0, bins, n))
    k[0], k[-1] = 0, bins - 1
    x = rng.integers(0, W, n).astype(np.uint16)
    y = rng.integers(0, H, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    t = (k * 1_000).astype(np.uint32)
    rmap = _distorted_map()
    grid = voxel_grid(x, y, p, t, rmap, bins)
    ref, mag = reference_voxels(x, y, p, t, rmap, bins, magnitude=True)
    assert_within_magnitude(grid, ref, mag)
    for plane in range(bins):  # each plane holds exactly its own events' polarity sum
        sel = k == plane
        only = voxel_grid(x[sel], y[sel], p[sel], np.zeros(sel.sum(), np.uint32), rmap, 1)[0]
        np.testing.assert_allclose(grid[plane], only, atol=1e-4)


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_times_outside_the_window_span(bins):
    # t_first/t_last that do not bracket the events (hostile callers): tn below 0 and above
    # bins - 1 still follow the formula, planes outside the grid are dropped.
    x, y, p, t = _synthetic(20_000, seed=9, bins_t=10_000)
    rmap = _distorted_map()
    grid = _grid_of(x, y, p, t, rectifier(rmap), bins, 4_000, 6_000)
    ref, mag = reference_voxels(x, y, p, t, rmap, bins, t_first=4_000, t_last=6_000, magnitude=True)
    assert_within_magnitude(grid, ref, mag)


@pytest.fixture
def small_blocks(monkeypatch):
    """The kernel with blocks of 1000 events, so a test window spans several."""
    import pipeline.voxel as voxel

    monkeypatch.setattr(voxel, "BLOCK_EVENTS", 1_000)
    return 1_000


@pytest.mark.parametrize("bins", [5, 15])
def test_multibin_windows_over_several_blocks(small_blocks, bins):
    x, y, p, t = _synthetic(12_345, seed=13, bins_t=20_000)
    rmap = _distorted_map()
    rect = rectifier(rmap)  # created after the patch: its scratch holds one small block
    assert rect.band_scratch()[1].size == small_blocks
    edges = np.array([0, 10, 2_500, 2_500, 9_001, 12_345])  # an empty window, windows over 1-7 blocks
    starts, stops = edges[:-1], edges[1:]
    t64 = t.astype(np.int64)
    grids = np.zeros((len(starts), bins, H, W), np.float32)
    accumulate_voxels(x, y, p, t, rect, starts, stops, t64[np.minimum(starts, len(t) - 1)],
                      t64[np.maximum(stops - 1, 0)], grids)
    for k, (a, b) in enumerate(zip(starts, stops, strict=True)):
        if a == b:
            assert not grids[k].any()
            continue
        ref, mag = reference_voxels(x[a:b], y[a:b], p[a:b], t[a:b], rmap, bins, magnitude=True)
        assert_within_magnitude(grids[k], ref, mag)


@pytest.mark.parametrize("piece", [1, 7, 999, 1_000, 1_001, 3_500])
def test_multibin_pieces_bit_identical_across_blocks(small_blocks, piece):
    from pipeline.voxel import accumulate_window_in_pieces

    x, y, p, t = _synthetic(5_432, seed=17, bins_t=9_000)
    rect = rectifier(_distorted_map())
    n, t0, t1 = len(x), int(t[0]), int(t[-1])
    whole = np.zeros((1, 5, H, W), np.float32)
    accumulate_voxels(x, y, p, t, rect, np.array([0]), np.array([n]), np.array([t0]), np.array([t1]), whole)
    parts = [(x[a:a + piece], y[a:a + piece], p[a:a + piece], t[a:a + piece].astype(np.int64))
             for a in range(0, n, piece)]
    pieces = np.zeros_like(whole)
    accumulate_window_in_pieces(parts, n, rect, t0, t1, pieces)
    assert pieces.tobytes() == whole.tobytes()


@pytest.mark.parametrize("bins", [5, 15])
@pytest.mark.parametrize(("field", "value"), [("x", W), ("y", H), ("p", 2), ("x", -1), ("p", -1)])
def test_multibin_refuses_hostile_arrays(bins, field, value):
    x, y, p, t = _synthetic(5_000, seed=23)
    arrays = {"x": x.astype(np.int32), "y": y.astype(np.int32), "p": p.astype(np.int16)}
    arrays[field][4_321] = value
    grid = np.zeros((1, bins, H, W), np.float32)
    with pytest.raises(ValueError, match=rf"events/{field}\[4321\] = {value} is outside the sensor"):
        _grid_of(arrays["x"], arrays["y"], arrays["p"], t, rectifier(_distorted_map()), bins, int(t[0]), int(t[-1]),
                 grid)
    assert not grid.any()


def _one_bin_replica(x, y, p, rmap):
    """The 1-bin kernel's exact float32 operations in NumPy: per-pixel polarity sums splatted, in
    raster order for a dense window and first-touch order otherwise, through the table of
    weights computed as 1 - |corner - coordinate| (np.add.at adds in index order, as the kernel)."""
    sensor_w = rmap.shape[1]
    xf, yf = rmap[..., 0].reshape(-1), rmap[..., 1].reshape(-1)
    xi, yi = xf.astype(np.int64), yf.astype(np.int64)
    bx, by = np.clip(xi, 0, W - 2), np.clip(yi, 0, H - 2)
    weight = np.zeros((xf.size, 4), np.float32)
    one = np.float32(1.0)
    for dy in (0, 1):
        for dx in (0, 1):
            yl, xl = yi + dy, xi + dx
            w = (one - np.abs(yl.astype(np.float32) - yf)) * (one - np.abs(xl.astype(np.float32) - xf))
            ok = (xl >= 0) & (xl < W) & (yl >= 0) & (yl < H)
            rows = np.flatnonzero(ok)
            weight[rows, 2 * (yl - by)[ok] + (xl - bx)[ok]] = w[ok]
    base = by * W + bx
    pix = y.astype(np.int64) * sensor_w + x.astype(np.int64)
    hist = np.zeros(xf.size, np.int64)
    np.add.at(hist, pix, 2 * p.astype(np.int64) - 1)
    if len(x) * 8 > xf.size:
        order = np.flatnonzero(hist)
    else:
        first = np.unique(pix, return_index=True)[1]
        order = pix[np.sort(first)]
    fv = hist[order].astype(np.float32)
    idx = (base[order][:, None] + np.array([0, 1, W, W + 1])).reshape(-1)
    grid = np.zeros(H * W, np.float32)
    np.add.at(grid, idx, (fv[:, None] * weight[order]).reshape(-1))
    return grid.reshape(1, H, W)


@pytest.mark.parametrize("n", [3_000, 200_000])  # a sparse and a dense window
def test_one_bin_grid_bytes_are_the_kernels_own(n):
    # The 1-bin kernel is not the multi-bin one and its stores' bytes must not move: pin them.
    x, y, p, t = _synthetic(n, seed=31)
    rmap = _distorted_map()
    assert voxel_grid(x, y, p, t, rmap, 1).tobytes() == _one_bin_replica(x, y, p, rmap).tobytes()


def test_grids_without_bins_are_left_alone():
    x, y, p, _ = _synthetic(1_000, seed=2)
    grids = np.zeros((1, 0, H, W), np.float32)
    out = accumulate_voxels(x, y, p, np.full(1_000, 5, np.uint32), rectifier(_distorted_map()), np.array([0]),
                            np.array([1_000]), np.array([5]), np.array([5]), grids)
    assert out is grids and out.shape == (1, 0, H, W)
