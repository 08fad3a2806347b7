"""pipeline.synthetic.esim: ESIM-style events from log-intensity frames (threshold crossings, interpolated times)."""

from __future__ import annotations

import itertools

import numpy as np

from pipeline.synthetic.esim import count_events, merge_noise, step_events, threshold_maps


def _maps(shape, c):
    return np.full(shape, c, np.float32), np.full(shape, c, np.float32)


def test_linear_ramp_gives_interpolated_crossings():
    L0 = np.zeros((2, 3), np.float32)
    L1 = L0.copy()
    L1[1, 2] = 0.35  # three ON crossings at 0.1, 0.2, 0.3 of a 1000 us step
    L1[0, 0] = -0.25  # two OFF crossings
    ref = L0.copy()
    cpos, cneg = _maps(L0.shape, 0.1)
    ev = step_events(L0, L1, ref, cpos, cneg, 5000, 6000)
    on = ev["p"] == 1
    assert list(ev["t"][on]) == [5285, 5571, 5857]
    assert set(ev["x"][on]) == {2} and set(ev["y"][on]) == {1}
    assert list(ev["t"][~on]) == [5400, 5800] and set(ev["x"][~on]) == {0}
    assert np.all(np.diff(ev["t"]) >= 0)
    # The reference moved to the last crossed level; the residual waits for the next step.
    assert abs(ref[1, 2] - 0.3) < 1e-6
    assert abs(ref[0, 0] + 0.2) < 1e-6


def test_reference_carries_over_between_steps():
    L = [np.full((1, 1), v, np.float32) for v in (0.0, 0.06, 0.12, 0.18)]
    ref = L[0].copy()
    cpos, cneg = _maps((1, 1), 0.1)
    times = []
    for k in range(3):
        times += list(step_events(L[k], L[k + 1], ref, cpos, cneg, k * 100, (k + 1) * 100)["t"])
    assert times == [166]  # one crossing at 0.1, inside the second step


def test_count_matches_emission():
    rng = np.random.default_rng(0)
    frames = [rng.normal(0, 0.3, (20, 30)).astype(np.float32).cumsum(0) for _ in range(5)]
    thresholds = np.array([0.05, 0.2, 0.5])
    counts = count_events(frames, thresholds)
    for c, n in zip(thresholds, counts, strict=True):
        ref = frames[0].copy()
        cpos, cneg = _maps(ref.shape, c)
        total = sum(step_events(a, b, ref, cpos, cneg, 0, 10)["t"].size for a, b in itertools.pairwise(frames))
        assert total == n
    assert counts[0] > counts[1] > counts[2]


def test_noise_and_thresholds():
    rng = np.random.default_rng(1)
    ev = {"x": np.array([1], np.uint16), "y": np.array([2], np.uint16), "p": np.array([1], np.uint8),
          "t": np.array([500], np.int64)}
    out = merge_noise(ev, rng, rate=2e6, t0=0, t1=1000, shape=(48, 64), hot=np.array([5, 6]))
    assert 1000 < out["t"].size < 3000  # ~2000 noise events in 1 ms
    assert np.all(np.diff(out["t"]) >= 0) and out["t"].min() >= 0 and out["t"].max() < 1000
    assert out["x"].max() < 64 and out["y"].max() < 48 and set(np.unique(out["p"])) == {0, 1}
    cpos, cneg = threshold_maps(rng, 0.2, (100, 100))
    assert abs(cpos.mean() - 0.2) < 0.01 and 0.005 < cpos.std() < 0.04 and cpos.min() > 0
    assert not np.array_equal(cpos, cneg)  # ON and OFF thresholds differ per pixel
