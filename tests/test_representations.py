"""Conformance of the representation kernels with the implementations that define each kind.

Libraries (tonic 1.7, evlib 0.13) are compared where they compute the same quantity; RVT's stacked
histogram and mixed-density stack, the study's ERGO-12 and DSEC's VoxelGrid against the NumPy ports
in tests/representation_refs.py. Library comparisons use the identity rectify map (the libraries
take raw pixels); separate tests check that a real rectification is applied.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline import representations as R
from pipeline.errors import InputError
from pipeline.voxel import rectifier
from tests import representation_refs as ref

H, W = 48, 64


def identity(height=H, width=W):
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return rectifier(np.stack([xx, yy], axis=-1), height, width)


def events(n=6000, seed=0, span=50_000, height=H, width=W, t_last=None):
    """Sorted events with repeated timestamps; the last one at ``t_last`` (default: the span)."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span, n)).astype(np.uint32)
    t[0], t[-1] = 0, span if t_last is None else t_last
    x = rng.integers(0, width, n).astype(np.uint16)
    y = rng.integers(0, height, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    return x, y, p, t


def structured(x, y, p, t):
    ev = np.zeros(len(x), dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def polars_events(x, y, p, t):
    pl = pytest.importorskip("polars", reason="evlib needs polars")
    return pl.DataFrame({"t": t.astype(np.int64), "x": x.astype(np.int64), "y": y.astype(np.int64),
                         "polarity": p.astype(np.int64)})


@pytest.fixture(scope="module")
def tonic():
    return pytest.importorskip("tonic", minversion="1.7", reason="tonic>=1.7 is not installed (pip install tonic)")


@pytest.fixture(scope="module")
def evlib():
    return pytest.importorskip("evlib", reason="evlib is not installed (pip install evlib)")


# --------------------------------------------------------------------------- histogram
@pytest.mark.parametrize("bins,cutoff", [(10, 10), (5, 255), (1, 3)])
def test_histogram_equals_rvt(bins, cutoff):
    x, y, p, t = events()
    got = R.histogram(x, y, p, t, identity(), bins, cutoff)
    assert got.dtype == np.uint8 and got.shape == (2 * bins, H, W)
    np.testing.assert_array_equal(got, ref.rvt_stacked_histogram(x, y, p, t, bins, H, W, cutoff))


def test_histogram_wrap_is_rvt_fastmode_and_default_is_rvt_exact_mode():
    # A hot pixel with 300 events in one bin: RVT's uint8 accumulation wraps to 44 before the clip.
    x, y, p, t = events(2000)
    x[:300], y[:300], p[:300], t[:300] = 5, 7, 1, 0
    t = np.sort(t)
    exact = R.histogram(x, y, p, t, identity(), 10, 255)
    wrapped = R.histogram(x, y, p, t, identity(), 10, 255, rvt_wrap=True)
    np.testing.assert_array_equal(wrapped, ref.rvt_stacked_histogram(x, y, p, t, 10, H, W, 255, fastmode=True))
    np.testing.assert_array_equal(exact, ref.rvt_stacked_histogram(x, y, p, t, 10, H, W, 255, fastmode=False))
    assert exact[10, 7, 5] == 255 and wrapped[10, 7, 5] == 300 % 256


def test_histogram_equals_tonic_frames_but_for_the_last_event(tonic):
    # tonic bins with width (t_last - t0) // B over half-open bins and drops events at t0 + B * width
    # (the last event); with a span divisible by B and no event on an inner edge, that is the only
    # difference: ours (2, B) -> (B, 2) == tonic + the last timestamp's events in bin B-1.
    bins = 10
    x, y, p, t = events(span=50_000)
    inner = (t % 5000 == 0) & (t > 0) & (t < 50_000)
    x, y, p, t = x[~inner], y[~inner], p[~inner], t[~inner]
    got = R.histogram(x, y, p, t, identity(), bins, 255).reshape(2, bins, H, W).transpose(1, 0, 2, 3)
    want = tonic.functional.to_frame_numpy(structured(x, y, p, t), (W, H, 2), n_time_bins=bins).astype(np.int64)
    last = t == t[-1]
    np.add.at(want, (bins - 1, p[last].astype(int), y[last].astype(int), x[last].astype(int)), 1)
    np.testing.assert_array_equal(got, np.minimum(want, 255))


def test_histogram_equals_evlib_rvt(evlib):
    from evlib.rvt.representation import build_sparse_histogram

    bins, cutoff = 10, 10
    x, y, p, t = events()
    df = build_sparse_histogram(polars_events(x, y, p, t).rename({"polarity": "p"}), np.array([int(t[-1])]),
                                int(t[-1] - t[0]), bins, cutoff, H, W, False, engine="in-memory")
    want = np.zeros((2 * bins, H, W), np.uint8)
    want[df["channel"].to_numpy(), df["y"].to_numpy(), df["x"].to_numpy()] = df["count"].to_numpy()
    np.testing.assert_array_equal(R.histogram(x, y, p, t, identity(), bins, cutoff), want)


# --------------------------------------------------------------------------- time surface
@pytest.mark.parametrize("dt", [5_000, 12_345])
def test_time_surface_slices_equal_tonic_and_evlib(tonic, evlib, dt):
    from evlib.representations import create_time_surface, densify_time_surface

    tau = 20_000.0
    x, y, p, t = events()
    want = tonic.functional.to_timesurface_numpy(structured(x, y, p, t), (W, H, 2), dt, tau)
    k = len(want)
    got = R.time_surface(x, y, p, t, identity(), tau, dt, k + 2).reshape(k + 2, 2, H, W)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:k], want, rtol=1e-6, atol=0)
    # Slices past tonic's last complete one are sampled the same way (the store needs a fixed count):
    # the last event is counted from the first slice sampled after it.
    after = int((int(t[-1]) - int(t[0])) // dt)
    assert got[after, p[-1], y[-1], x[-1]] == pytest.approx(np.exp(-((after + 1) * dt - int(t[-1])) / tau), rel=1e-6)
    df = create_time_surface(polars_events(x, y, p, t), H, W, dt, tau)
    dense = densify_time_surface(df, k, 2, H, W, dt, tau, float(t[0]))
    np.testing.assert_allclose(got[:k], dense, rtol=1e-6, atol=0)


def test_time_surface_at_window_end_equals_evlib(evlib):
    from evlib.representations import time_surface

    tau = 30_000.0
    x, y, p, t = events()
    got = R.time_surface(x, y, p, t, identity(), tau)
    df = time_surface(polars_events(x, y, p, t), H, W, tau)
    want = np.zeros((2, H, W))
    want[df["polarity"].to_numpy(), df["y"].to_numpy(), df["x"].to_numpy()] = df["surface_value"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got[p[-1], y[-1], x[-1]] == 1.0  # the last event is sampled at its own time


def test_time_surface_at_window_end_is_tonic_one_slice_later(tonic):
    # tonic's single slice of dt = span + 1 is sampled 1 us after the last event.
    tau = 30_000.0
    x, y, p, t = events()
    span = int(t[-1] - t[0])
    want = tonic.functional.to_timesurface_numpy(structured(x, y, p, t), (W, H, 2), span + 1, tau)[0]
    got = R.time_surface(x, y, p, t, identity(), tau)
    np.testing.assert_allclose(got, want * np.exp(1 / tau), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- MDES
@pytest.mark.parametrize("bins,cutoff", [(10, 32), (10, None), (4, 0), (1, 5)])
def test_mdes_equals_rvt(bins, cutoff):
    x, y, p, t = events()
    got = R.mdes(x, y, p, t, identity(), bins, cutoff)
    assert got.dtype == np.int8 and got.shape == (bins, H, W)
    np.testing.assert_array_equal(got, ref.rvt_mixed_density_stack(x, y, p, t, bins, H, W, cutoff))


def test_mdes_powers_of_two_go_to_the_newer_bin():
    # u = 2^-k exactly: bin = bins - k, so the event counts in channel bins-k and later only.
    bins, span = 10, 1 << 12
    t = np.array([0] + [span >> k for k in range(1, 11)] + [span], np.uint32)
    t = np.sort(t)
    n = len(t)
    x, y, p = np.arange(n, dtype=np.uint16), np.zeros(n, np.uint16), np.ones(n, np.uint8)
    got = R.mdes(x, y, p, t, identity(), bins, None)
    np.testing.assert_array_equal(got, ref.rvt_mixed_density_stack(x, y, p, t, bins, H, W))
    for i, ti in enumerate(t[1:-1], start=1):
        k = int(np.log2(span // int(ti)))
        first = max(bins - k, 0)
        assert got[:first, 0, i].sum() == 0 and np.all(got[first:, 0, i] == 1)


def test_mdes_overflow_saturates_or_wraps_like_rvt():
    x, y, p, t = events(1000)
    x[:200], y[:200], p[:200] = 3, 4, 1  # 200 positive events on one pixel, early in the window
    got = R.mdes(x, y, p, t, identity(), 10, None)
    wrapped = R.mdes(x, y, p, t, identity(), 10, None, rvt_wrap=True)
    np.testing.assert_array_equal(wrapped, ref.rvt_mixed_density_stack(x, y, p, t, 10, H, W))
    assert got[-1, 4, 3] == 127 and wrapped[-1, 4, 3] < 0
    keep = np.ones((H, W), bool)
    keep[4, 3] = False
    np.testing.assert_array_equal(got[:, keep], wrapped[:, keep])


# --------------------------------------------------------------------------- ERGO-12
@pytest.mark.parametrize("n", [6000, 7, 1001])
def test_ergo12_equals_the_study(n):
    x, y, p, t = events(n, seed=n)
    got = R.ergo12(x, y, p, t, identity())
    assert got.dtype == np.float32 and got.shape == (12, H, W)
    want = ref.ergo12(x, y, p, t, H, W).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(want) > 0


# --------------------------------------------------------------------------- voxel grids
@pytest.mark.parametrize("bins", [2, 5, 15])
def test_voxel_dsec_first_bins_equal_tonic_and_evlib(tonic, evlib, bins):
    # For integer coordinates, a C-bin DSEC grid's bins 0..C-2 are tonic's grid with C-1 bins
    # (tonic normalises time by B and drops the last bin's upper corner; no spatial weights).
    from evlib.representations import create_voxel_grid, densify_voxel_grid

    x, y, p, t = events()
    got = R.voxel_dsec(x, y, p, t, identity(), bins, normalize=False)
    want = tonic.functional.to_voxel_grid_numpy(structured(x, y, p, t), (W, H, 2), bins - 1)[:, 0]
    np.testing.assert_allclose(got[:-1], want, atol=1e-5)
    df = create_voxel_grid(polars_events(x, y, p, t), H, W, bins - 1)
    np.testing.assert_allclose(densify_voxel_grid(df, bins - 1, H, W).reshape(want.shape), want, atol=1e-9)
    # every in-bounds event deposits exactly +-1 (tonic loses mass from its last bin)
    assert got.sum() == pytest.approx(float((2 * p.astype(int) - 1).sum()), abs=1e-2)


@pytest.mark.parametrize("normalize", [False, True])
def test_voxel_dsec_equals_dsec_on_a_distorted_map(normalize):
    from tests.dsec_fixtures import synthetic_rectify_map

    rmap = synthetic_rectify_map(3)
    rect = rectifier(rmap)
    x, y, p, t = events(20_000, height=480, width=640)
    got = R.voxel_dsec(x, y, p, t, rect, 5, normalize)
    want = ref.dsec_voxel_grid(rmap[y, x, 0], rmap[y, x, 1], p, t, 5, 480, 640, normalize)
    np.testing.assert_allclose(got, want, atol=2e-4 if normalize else 1e-5)


def test_voxel_dsec_truncates_negative_coordinates_like_torch():
    # A rectified x in (-1, 0): torch's .int() truncates to 0, so the event gives cell 0 the weight
    # 1 + x and cell 1 the NEGATIVE weight -x... (floor would put 1 + x on cell 0 and nothing on 1).
    rmap = np.stack(np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32)), -1)
    rmap[:, 0, 0] = -0.25
    x, y = np.zeros(3, np.uint16), np.array([1, 2, 3], np.uint16)
    p, t = np.ones(3, np.uint8), np.arange(3, dtype=np.uint32)
    got = R.voxel_dsec(x, y, p, t, rectifier(rmap, H, W), 1, normalize=False)
    xf, yf = rmap[y, x, 0], rmap[y, x, 1]
    trunc = ref.dsec_voxel_grid(xf, yf, p, t, 1, H, W, False, corner=np.trunc)
    floor = ref.dsec_voxel_grid(xf, yf, p, t, 1, H, W, False, corner=np.floor)
    np.testing.assert_allclose(got, trunc, atol=1e-7)
    np.testing.assert_allclose(got[0, 1:4, 1], -0.25, atol=1e-7)
    np.testing.assert_allclose(floor[0, 1:4, 1], 0.0)
    np.testing.assert_allclose(got[0, 1:4, 0], floor[0, 1:4, 0], atol=1e-7)


# --------------------------------------------------------------------------- rectification
def _maps(real_dir=None):
    from tests.dsec_fixtures import synthetic_rectify_map

    maps = {"synthetic": synthetic_rectify_map(1)}
    if real_dir is not None:
        from pipeline.dsec import load_rectify_map

        maps["real"] = load_rectify_map(real_dir / "prophesee_gen3_vga" / "rectify_map.h5")
    return maps


@pytest.fixture(scope="module", params=["synthetic", "real"])
def rectify_map(request):
    real_dir = request.getfixturevalue("real_dir") if request.param == "real" else None
    return _maps(real_dir)[request.param]


COUNTING = [R.HistogramSettings(), R.TimeSurfaceSettings(20_000.0), R.TimeSurfaceSettings(20_000.0, 7_000, 6),
            R.MdesSettings(), R.Ergo12Settings()]


@pytest.mark.parametrize("settings", COUNTING, ids=R.store_suffix)
def test_counting_kinds_move_each_event_to_its_nearest_rectified_pixel(rectify_map, settings):
    # The rectified frame equals the frame of the same events moved to round(rectify_map[y, x]),
    # built on the identity map, with the events that land off the grid given no pixel.
    x, y, p, t = events(30_000, height=480, width=640)
    got = R.build(settings, x, y, p, t, rectifier(rectify_map))
    xr = np.floor(rectify_map[y, x, 0] + np.float32(0.5)).astype(np.int64)
    yr = np.floor(rectify_map[y, x, 1] + np.float32(0.5)).astype(np.int64)
    on = (xr >= 0) & (xr < 640) & (yr >= 0) & (yr < 480)
    assert 0 < on.sum() < len(x) or np.any((xr != x) | (yr != y))
    # off-grid events go to a spare row of a taller identity grid, then that row is cut away
    xs = np.where(on, xr, 0).astype(np.uint16)
    ys = np.where(on, yr, 480).astype(np.uint16)
    tall = R.build(settings, xs, ys, p, t, identity(481, 640))[:, :480]
    np.testing.assert_array_equal(got, tall)
    assert not np.array_equal(got, R.build(settings, x, y, p, t, identity(480, 640)))


# --------------------------------------------------------------------------- windows and pieces
ALL = [*COUNTING, R.VoxelDsecSettings(), R.VoxelDsecSettings(3, False)]


@pytest.mark.parametrize("settings", ALL, ids=R.store_suffix)
def test_pieces_equal_one_call(settings):
    x, y, p, t = events(5000, seed=4)
    one = R.build(settings, x, y, p, t, identity())
    cuts = [0, 1, 1700, 1701, 4000, 5000]
    pieces = [(x[a:b], y[a:b], p[a:b], t[a:b]) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(R.build_in_pieces(settings, pieces, 5000, identity(), int(t[0]), int(t[-1])), one)


@pytest.mark.parametrize("settings", ALL, ids=R.store_suffix)
def test_empty_window_and_equal_timestamps(settings):
    e = np.zeros(0, np.uint16)
    empty = R.build(settings, e, e, e.astype(np.uint8), e.astype(np.uint32), identity())
    assert empty.shape == (R.channels(settings), H, W) and empty.dtype == R.frame_dtype(settings)
    assert not empty.any()
    x, y, p, _t = events(50)
    same = R.build(settings, x, y, p, np.full(50, 7, np.uint32), identity())
    assert np.all(np.isfinite(same.astype(np.float64))) and same.any()


def test_events_off_the_sensor_are_refused():
    x, y, p, t = events(10)
    x[3] = W
    with pytest.raises(ValueError, match=r"events/x\[3\]"):
        R.histogram(x, y, p, t, identity())


# --------------------------------------------------------------------------- settings
def test_store_suffixes_are_distinct_and_canonical():
    settings = [R.HistogramSettings(10, 10), R.HistogramSettings(10, 10, True), R.HistogramSettings(1, 10),
                R.TimeSurfaceSettings(), R.TimeSurfaceSettings(2500.5), R.TimeSurfaceSettings(50_000.0, 10_000, 5),
                R.TimeSurfaceSettings(50_000.0, 10_000, 4), R.MdesSettings(), R.MdesSettings(10, None),
                R.MdesSettings(10, 32, True), R.Ergo12Settings(), R.VoxelDsecSettings(), R.VoxelDsecSettings(15, False)]
    names = [R.store_suffix(s) for s in settings]
    assert len(set(names)) == len(names)
    assert names[0] == "histogram_b10_c10" and names[4] == "time_surface_tau2500p5"
    assert all(n.replace("_", "").isalnum() for n in names)
    assert R.parse_kind({"kind": "time_surface", "tau_us": 50000}) == R.TimeSurfaceSettings()


@pytest.mark.parametrize("entry,match", [
    ({"kind": "histogram", "bins": 0}, "histogram.bins must be an integer between 1 and 1000"),
    ({"kind": "histogram", "cutoff": 300}, "histogram.cutoff"),
    ({"kind": "histogram", "bins": True}, "histogram.bins"),
    ({"kind": "mdes", "cutoff": 128}, "mdes.cutoff"),
    ({"kind": "time_surface", "tau_us": 0}, "time_surface.tau_us"),
    ({"kind": "time_surface", "slices": 3}, "time_surface.slices must be 1 when dt_us"),
    ({"kind": "voxel_dsec", "normalize": "yes"}, "voxel_dsec.normalize must be true or false"),
    ({"kind": "histogram", "bin": 3}, "unknown parameter.*bin"),
    ({"kind": "voxel", "bins": 3}, "voxel takes its settings from representation.bins"),
    ("nope", "unknown kind 'nope'"),
    (3, "kind name or a mapping"),
])
def test_bad_settings_name_the_setting(entry, match):
    with pytest.raises(InputError, match=match):
        R.parse_kind(entry)


# --------------------------------------------------------------------------- stores (cmda preprocess)
SEQ = "zurich_city_09_a"
KINDS_YAML = ("[voxel, {kind: histogram, bins: 3, cutoff: 4}, {kind: time_surface, tau_us: 8000, dt_us: 2000, "
              "slices: 3}, {kind: mdes, bins: 6}, ergo12, {kind: voxel_dsec, bins: 3}]")


def _digest_tree(path):
    import hashlib

    return {str(q.relative_to(path)): hashlib.sha256(q.read_bytes()).hexdigest()
            for q in sorted(path.rglob("*")) if q.is_file()}


def _config(tmp_path, kinds=KINDS_YAML, **rep):
    from tests.dsec_fixtures import sequence_config

    return sequence_config(None, tmp_path, kinds=kinds, **rep)


def test_preprocess_builds_every_listed_kind_beside_an_unchanged_voxel_store(tmp_path):
    import dataclasses

    import pipeline.preprocess as pre
    from pipeline.dsec import EventFile, load_rectify_map
    from pipeline.store import RepresentationStore

    cfg = _config(tmp_path)
    summary = pre.preprocess_sequence(cfg, SEQ, workers=2)
    kinds = pre.extra_kinds(cfg)
    assert [k.kind for k in kinds] == ["histogram", "time_surface", "mdes", "ergo12", "voxel_dsec"]
    assert sorted(summary["representations"]) == sorted(R.store_suffix(k) for k in kinds)
    # the voxel store is byte-identical to the one built without other kinds
    alone = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "alone"),
                                representation=dataclasses.replace(cfg.representation, kinds=("voxel",)))
    pre.preprocess_sequence(alone, SEQ, workers=1)
    assert _digest_tree(pre.store_path(cfg, SEQ)) == _digest_tree(pre.store_path(alone, SEQ))
    assert list(pre.representations_dir(alone, SEQ).iterdir()) == []  # created empty, for dvc
    root = cfg.dsec.root / SEQ / "events" / "left"
    with EventFile(root / "events.h5") as ef:
        ev = ef.read(0, ef.n_events)
    rect = rectifier(load_rectify_map(root / "rectify_map.h5"))
    for k in kinds:
        path = pre.representation_store_path(cfg, SEQ, k)
        assert path.name == f"{R.store_suffix(k)}.zarr" and path.parent == pre.representations_dir(cfg, SEQ)
        store = RepresentationStore.open(path, expect=R.describe(k))
        rep = store.representation
        assert rep["channels"] == R.channels(k) and rep["dtype"] == R.frame_dtype(k).name
        valid, a, b = store.index("valid"), store.index("window_start"), store.index("window_stop")
        for i in range(store.frames):
            got = store.frame(i)
            assert got.shape == (R.channels(k), 480, 640) and got.dtype == R.frame_dtype(k)
            if not valid[i]:
                assert not got.any()
                continue
            sl = slice(a[i], b[i] + 1)
            np.testing.assert_array_equal(got, R.build(k, ev["x"][sl], ev["y"][sl], ev["p"][sl], ev["t"][sl], rect))
    with pytest.raises(InputError, match="expected"):
        RepresentationStore.open(pre.representation_store_path(cfg, SEQ, kinds[0]), expect=R.describe(kinds[2]))


def test_kind_stores_resume_byte_identical_and_streamed_windows_match(tmp_path, monkeypatch):
    import dataclasses

    import pipeline.preprocess as pre

    cfg = _config(tmp_path, chunk_events=30_000)
    clean = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "clean"))
    pre.preprocess_sequence(clean, SEQ, workers=1)
    orig, seen = pre._run_kind_batch, []

    def flaky(batch, **kw):
        if len(seen) == 7:
            raise KeyboardInterrupt
        seen.append(batch.frames)
        return orig(batch, **kw)

    monkeypatch.setattr(pre, "_run_kind_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    monkeypatch.setattr(pre, "_run_kind_batch", orig)
    summary = pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert summary["status"] == "built" and summary["frames_written"] == 0  # the voxel store was complete
    again = pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert again["status"] == "already complete"
    assert _digest_tree(cfg.dsec.out) == _digest_tree(clean.dsec.out)
    # windows longer than a streaming chunk are fed in pieces: the same bytes
    small = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "small"),
                                representation=dataclasses.replace(cfg.representation, chunk_events=1_500))
    pre.preprocess_sequence(small, SEQ, workers=1)
    assert _digest_tree(small.dsec.out) == _digest_tree(clean.dsec.out)


def test_another_setting_gets_another_store(tmp_path):
    import dataclasses

    import pipeline.preprocess as pre

    cfg = _config(tmp_path, kinds="[voxel, histogram]")
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    first = pre.representation_store_path(cfg, SEQ, R.HistogramSettings())
    before = _digest_tree(first)
    other = dataclasses.replace(cfg, representation=dataclasses.replace(
        cfg.representation, kinds=(R.VoxelSettings(), R.HistogramSettings(10, 3))))
    pre.preprocess_sequence(other, SEQ, workers=1)
    assert _digest_tree(first) == before
    assert pre.representation_store_path(other, SEQ, R.HistogramSettings(10, 3)).name == "histogram_b10_c3.zarr"


@pytest.mark.parametrize("kinds,match", [
    ("[histogram]", "must list voxel"),
    ("[voxel, histogram, {kind: histogram, bins: 10, cutoff: 10}]", "twice: histogram_b10_c10"),
    ("[voxel, {kind: histogram, bins: 0}]", r"representation.kinds\[1\]: histogram.bins must be"),
    ("voxel", "representation.kinds must be a list"),
])
def test_bad_kinds_in_datasets_yaml_are_one_line_errors(tmp_path, kinds, match):
    from pipeline.config import load_config
    from tests.dsec_fixtures import write_config

    path = write_config(tmp_path, tmp_path / "DSEC", {SEQ: (0, 5)}, kinds=kinds)
    with pytest.raises(InputError, match=match) as err:
        load_config(path)
    assert err.value.path == path
