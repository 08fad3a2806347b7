"""IC1 and the NumPy ISR reference: grey conversion, shifts, hand-computed maps, fast IC1 vs reference."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.image_change import (
    IC1_CLIP,
    ISR_DAY,
    ISR_NIGHT,
    ic1,
    ic1_reference,
    ic1_to_uint8,
    ic_reference,
    isr_log_table,
    isr_reference,
    rgb_to_grey,
    shift_grey,
    split_direction,
    split_minmax,
)


def test_grey_is_pil_convert_l():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [128] * 3, [7, 9, 250]]
    np.testing.assert_array_equal(rgb_to_grey(rgb), np.asarray(Image.fromarray(rgb).convert("L")))


def test_shifts_follow_cmda_concatenation():
    g = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(shift_grey(g, "right", 1), [[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10]])
    np.testing.assert_array_equal(shift_grey(g, "left", 1), [[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11]])
    np.testing.assert_array_equal(shift_grey(g, "down", 1), [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(shift_grey(g, "up", 1), [[4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]])
    # s > 1 keeps the first/last s columns themselves (not a replicate of one edge column)
    np.testing.assert_array_equal(shift_grey(g, "right", 2)[0], [0, 1, 0, 1])
    assert split_direction("leftdown") == ["left", "down"] and len(split_direction("all")) == 4
    with pytest.raises(ValueError):
        split_direction("north")


def test_ic_reference_hand_computed():
    front = np.zeros((2, 4), np.float32)
    now = np.array([[0.05, 0.5, 2.0, -0.05], [-0.3, -2.0, 0.0, 0.2]], np.float32)
    out = ic_reference(front, now, threshold=0.1, clip=0.8)
    # positives 0.5, 0.8 (clipped), 0.2 -> /0.8 ; negatives -0.3, -0.8 -> (x + 0.8) / 0.8 - 1
    expect = [[0, 0.625, 1, 0], [-0.375, -1, 0, 0.25]]
    np.testing.assert_allclose(out, expect, atol=1e-6)


def test_isr_reference_step_edge_by_hand():
    """Left half black, right half white, day params (shift 3), 'rightdown'.

    The right shift moves black over the first 3 white columns: d = ln(1) - ln(10) < -clip there, so
    the horizontal map is -1 on those columns and 0 elsewhere; the down shift changes nothing (columns
    are constant), so its negative part is empty: 0 by default, -1 everywhere with cmda_compat.
    """
    g = np.zeros((6, 12, 3), np.uint8)
    g[:, 6:] = 255
    out = isr_reference(g, ISR_DAY, "rightdown")
    expect = np.zeros((6, 12), np.float32)
    expect[:, 6:9] = -0.5
    np.testing.assert_allclose(out, expect, atol=1e-6)
    compat = isr_reference(g, ISR_DAY, "rightdown", cmda_compat=True)
    np.testing.assert_allclose(compat, expect - 0.5, atol=1e-6)
    # leftward shift moves white over the last black columns: brightening -> +0.5
    out_left = isr_reference(g, ISR_DAY, "leftup")
    assert np.allclose(out_left[:, 3:6], 0.5, atol=1e-6) and np.allclose(np.delete(out_left, [3, 4, 5], 1), 0)


def test_isr_params_scaled_by_log_range():
    assert ISR_NIGHT.log_span == pytest.approx(np.log(101))
    assert float(ISR_NIGHT.threshold_log) == pytest.approx(0.005 * np.log(101), rel=1e-6)
    assert float(ISR_DAY.clip_log) == pytest.approx(0.2 * np.log(10), rel=1e-6)
    table = isr_log_table(ISR_DAY)
    assert table.dtype == np.float32 and table[0] == pytest.approx(0) and table[255] == pytest.approx(np.log(10))


def _pairs():
    rng = np.random.default_rng(3)
    now = rng.integers(0, 256, (48, 70, 3), dtype=np.uint8)
    prev = np.clip(now.astype(int) + rng.integers(-60, 60, now.shape), 0, 255).astype(np.uint8)
    yield now, prev  # random
    yy, xx = np.mgrid[0:40, 0:90]
    scene = (120 + 100 * np.sin(xx / 6.0) * np.cos(yy / 9.0)).astype(np.uint8)
    now = np.repeat(scene[..., None], 3, 2)
    prev = np.repeat(np.roll(scene, 3, axis=1)[..., None], 3, 2)
    yield now, prev  # structured: a moving pattern
    prev2 = (now.astype(np.float32) * 1.3).clip(0, 255).astype(np.uint8)
    yield now, prev2  # global darkening only: positive part empty


def test_fast_ic1_equals_reference_exactly():
    for now, prev in _pairs():
        for compat in (False, True):
            ref = ic1_reference(now, prev, cmda_compat=compat)
            fast = ic1(now, prev, cmda_compat=compat)
            np.testing.assert_array_equal(fast, ref)
            np.testing.assert_array_equal(ic1_to_uint8(fast), ic1_to_uint8(ref))
            assert ref.min() >= -1 and ref.max() <= 1


def test_ic1_empty_part_rule():
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.all(ic1(rgb, rgb) == 0) and np.all(ic1_to_uint8(ic1(rgb, rgb)) == 128)
    assert np.all(ic1(rgb, rgb, cmda_compat=True) == -1)
    brighter = np.clip(rgb.astype(int) * 2 + 20, 0, 255).astype(np.uint8)
    only_pos = ic1(brighter, rgb)  # every changed pixel got brighter: negative part empty
    assert only_pos.min() >= 0 and only_pos.max() == 1


def test_split_minmax_matches_reference_on_random_differences():
    rng = np.random.default_rng(5)
    d = rng.normal(0, 0.5, (33, 41)).astype(np.float32)
    ref = ic_reference(np.zeros_like(d), d, 0.1, IC1_CLIP)
    np.testing.assert_array_equal(split_minmax(d, 0.1, IC1_CLIP), ref)


def test_uint8_storage_rounding_and_loader():
    d = np.array([-1, 0, 1, 1 / 255, 3 / 255 - 1e-7], np.float32)
    # (d+1)/2*255: 0, 127.5 -> 128 (half to even), 255, 128.0, ~128.999
    np.testing.assert_array_equal(ic1_to_uint8(d), [0, 128, 255, 128, 129])
    # the trainer's decode of a stored IC1 (train.data.loaders.network_batch): 0 -> -1, 255 -> 1, 3 channels
    import torch

    from train.data.loaders import network_batch

    ic1 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    decoded = network_batch({"source_ic1": ic1})["source_ic1"]
    assert decoded.shape == (1, 3, 1, 3)
    np.testing.assert_allclose(decoded[0, 0, 0].numpy(), [-1, 128 / 127.5 - 1, 1], atol=1e-6)
