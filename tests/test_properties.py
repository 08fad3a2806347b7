"""Property-based checks (hypothesis) of the voxel kernels and the image->event index against the
slow NumPy references: random sensors, maps reaching off the grid, windows (empty, single event,
dense, sparse), pieces, and out-of-range values. Example counts are bounded so this stays fast."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.voxel import accumulate_voxels, accumulate_window_in_pieces, rectifier
from tests.test_voxel import reference_voxels

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenes(draw):
    """A small sensor, a rectify map onto a small grid (some pixels off it), and sorted events."""
    sh, sw = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    gh, gw = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rmap = np.stack([rng.uniform(-2.5, gw + 1.5, (sh, sw)), rng.uniform(-2.5, gh + 1.5, (sh, sw))], -1)
    rmap = rmap.astype(np.float32)
    if draw(st.booleans()):  # integer and exactly-on-edge positions, where truncation matters
        rmap = np.round(rmap).astype(np.float32)
    n = draw(st.integers(0, 200))
    x = rng.integers(0, sw, n).astype(np.uint16)
    y = rng.integers(0, sh, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    t = np.sort(rng.integers(0, draw(st.sampled_from([1, 50, 10_000])), n)).astype(np.uint32)
    bins = draw(st.integers(1, 4))
    cuts = np.sort(rng.integers(0, n + 1, draw(st.integers(0, 5))))
    edges = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    return rmap, (gh, gw), (x, y, p, t), bins, edges


@FAST
@given(scenes())
def test_kernel_windows_match_the_reference(scene):
    rmap, (gh, gw), (x, y, p, t), bins, edges = scene
    starts, stops = edges[:-1], edges[1:]
    t64 = t.astype(np.int64)
    t_first = np.array([t64[a] if b > a else 0 for a, b in zip(starts, stops, strict=True)], np.int64)
    t_last = np.array([t64[b - 1] if b > a else 0 for a, b in zip(starts, stops, strict=True)], np.int64)
    guard = np.zeros((len(starts) + 2, bins, gh, gw), np.float32)
    grids = np.ascontiguousarray(guard[1:-1])
    accumulate_voxels(x, y, p, t, rectifier(rmap, gh, gw), starts, stops, t_first, t_last, grids)
    for k, (a, b) in enumerate(zip(starts, stops, strict=True)):
        if a == b:
            assert not grids[k].any()  # an empty window is a zero grid
            continue
        ref = reference_voxels(x[a:b], y[a:b], p[a:b], t[a:b], rmap, bins, gh, gw)
        np.testing.assert_allclose(grids[k], ref, atol=2e-4)
    assert not guard[0].any() and not guard[-1].any()


@FAST
@given(scenes(), st.integers(1, 50))
def test_a_window_in_pieces_is_bit_identical_to_one_call(scene, piece):
    rmap, (gh, gw), (x, y, p, t), bins, _ = scene
    n = len(x)
    rect = rectifier(rmap, gh, gw)
    t0, t1 = (int(t[0]), int(t[-1])) if n else (0, 0)
    whole = np.zeros((1, bins, gh, gw), np.float32)
    accumulate_voxels(x, y, p, t, rect, np.array([0]), np.array([n]), np.array([t0]), np.array([t1]), whole)
    pieces = np.zeros_like(whole)
    parts = [(x[a:a + piece], y[a:a + piece], p[a:a + piece], t[a:a + piece]) for a in range(0, n, piece)]
    accumulate_window_in_pieces(parts, n, rect, t0, t1, pieces)
    assert pieces.tobytes() == whole.tobytes()


@FAST
@given(scenes(), st.sampled_from(["x", "y", "p"]), st.integers(0, 65535))
def test_out_of_range_values_are_refused_and_nothing_is_written(scene, field, value):
    rmap, (gh, gw), (x, y, p, t), bins, _ = scene
    n = len(x)
    sh, sw = rmap.shape[:2]
    limit = {"x": sw, "y": sh, "p": 2}[field]
    if n == 0 or value < limit:
        return  # nothing hostile to inject in this example
    arrays = {"x": x.copy(), "y": y.copy(), "p": p.copy()}
    dtype = arrays[field].dtype
    if value > np.iinfo(dtype).max:
        value = int(np.iinfo(dtype).max)
    arrays[field][n // 2] = value
    grids = np.zeros((1, bins, gh, gw), np.float32)
    with pytest.raises(ValueError, match=f"events/{field}"):
        accumulate_voxels(arrays["x"], arrays["y"], arrays["p"], t, rectifier(rmap, gh, gw), np.array([0]),
                          np.array([n]), np.array([int(t[0])]), np.array([int(t[-1])]), grids)
    assert not grids.any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3_000), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 1_000, 200_000]))
def test_event_index_matches_brute_force(tmp_path, n, seed, span_us):
    from pipeline.dsec import EventFile
    from pipeline.events_h5 import write_events_h5
    from tests.test_preprocess import brute_force_index

    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span_us, n)).astype(np.uint32)  # many equal timestamps when span is small
    offset = int(rng.integers(0, 2**40))
    path = tmp_path / f"e{seed}_{n}.h5"
    write_events_h5(path, np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.uint8), t, offset)
    picks = t[rng.integers(0, n, 5)].astype(np.int64)
    queries = offset + np.concatenate([picks, picks - 1, picks + 1, rng.integers(-5, span_us + 5, 10),
                                       [int(t[0]) - 1, int(t[0]), int(t[-1]), int(t[-1]) + 1]])
    with EventFile(path) as ef:
        got = ef.index_of_time(queries)
        threaded = ef.index_of_time(queries, workers=2)
    path.unlink()
    np.testing.assert_array_equal(got, brute_force_index(t, offset, queries))
    np.testing.assert_array_equal(threaded, got)
