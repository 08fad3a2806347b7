"""Training loaders: shapes, dtypes, ranges, alignment of crops/flips, determinism, bad stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.voxel import events_norm
from train.config import DataConfig, RcsConfig
from train.data.batches import PairedBatches
from train.data.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesVal,
    NightTest,
    augment_source,
    augment_target,
    crop_max_ratio,
    hflip,
    ic1_to_input,
    network_batch,
    normalize_image,
    read_grey,
    read_rgb,
    three_channels,
)


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return yy, xx


@pytest.mark.parametrize("seed", range(6))
def test_target_crop_and_flip_move_image_and_events_together(seed):
    cfg = DataConfig(crop=400)  # crop == target_crop: no resize, so positions are exact
    yy, xx = _coords(480, 640)
    image = np.stack([xx % 256, yy % 256, (xx // 256) * 100], -1).astype(np.uint8)
    events = np.stack([xx, yy, xx + yy]).astype(np.float32)
    rng = np.random.default_rng(seed)
    x0 = int(np.random.default_rng(seed).integers(0, 241))  # the first draw is the x offset
    out_img, out_evt = augment_target(image, events, rng, cfg)
    assert out_img.shape == (400, 400, 3) and out_evt.shape == (3, 400, 400)
    # the image encodes x (mod 256 + 256 * channel 2 / 100), the events x exactly: they must agree
    x_img = out_img[..., 0].astype(int) + 256 * (out_img[..., 2].astype(int) // 100)
    np.testing.assert_array_equal(x_img, out_evt[0].astype(int))
    np.testing.assert_array_equal(out_img[..., 1].astype(int), out_evt[1].astype(int) % 256)
    left, right = int(out_evt[0, 0, 0]), int(out_evt[0, 0, -1])
    assert {left, right} == {x0, x0 + 399}  # flipped or not, the crop spans x0 .. x0+399
    assert 0 <= int(out_evt[1, 0, 0]) <= 80 and 0 <= x0 <= 240


def test_target_resize_keeps_alignment():
    cfg = DataConfig()  # 400 crop -> 512
    _, xx = _coords(480, 640)
    image = np.repeat((xx % 256).astype(np.uint8)[..., None], 3, -1)
    events = np.stack([(xx % 256).astype(np.float32)] * 3)
    out_img, out_evt = augment_target(image, events, np.random.default_rng(3), cfg)
    assert out_img.shape == (512, 512, 3) and out_evt.shape == (3, 512, 512)
    # same bilinear resize on both: agree up to uint8 rounding (away from the 255 -> 0 wrap)
    ok = (out_evt[0] > 2) & (out_evt[0] < 253)
    assert np.abs(out_img[..., 0].astype(np.float32) - out_evt[0])[ok].max() <= 1.0


@pytest.mark.parametrize("seed", range(4))
def test_source_crop_and_flip_move_image_label_and_ic1_together(seed):
    cfg = DataConfig(crop=128, cat_max_ratio=1.0)
    yy, xx = _coords(256, 512)
    label = ((xx // 32) % 19).astype(np.uint8)
    image = np.stack([xx % 256, (xx // 32) % 19, yy], -1).astype(np.uint8)
    ic1 = (xx % 256).astype(np.uint8)
    img, lbl, ic = augment_source(image, label, ic1, np.random.default_rng(seed), cfg, None, RcsConfig())
    assert img.shape == (128, 128, 3) and lbl.shape == (128, 128) and ic.shape == (128, 128)
    np.testing.assert_array_equal(img[..., 1], lbl)
    np.testing.assert_array_equal(img[..., 0], ic)


def test_cat_max_ratio_avoids_single_class_crops():
    label = np.zeros((64, 256), np.uint8)
    label[:, 200:] = 1  # only crops reaching x >= 200 hold a second class
    for seed in range(5):
        y, x = crop_max_ratio(label, 64, np.random.default_rng(seed), 0.75)
        crop = label[y:y + 64, x:x + 64]
        counts = np.bincount(crop.ravel(), minlength=2)
        assert (counts > 0).sum() == 2 and counts.max() / counts.sum() < 0.75


def test_one_bin_events_become_three_normalised_channels():
    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 1, 1], grid[0, 2, 2] = 3.0, -1.0
    ev = three_channels(events_norm(grid, 400_000))
    assert ev.shape == (3, 4, 4) and np.array_equal(ev[0], ev[2])
    assert ev.min() >= -1 and ev.max() <= 1 and ev[0, 1, 1] > 0 > ev[0, 2, 2]


def test_paired_batches_shapes_ranges_and_determinism(training_tree):
    cfg = load_config(training_tree)
    data = DataConfig(crop=128, source_resize=(256, 128))
    batches = PairedBatches(cfg, data, RcsConfig(min_pixels=50), batch=2, seed=0)
    raw = batches[3]
    # compact on the way through the loader ...
    assert raw["source_image"].shape == (2, 3, 128, 128) and raw["source_image"].dtype == torch.uint8
    assert raw["source_ic1"].shape == (2, 1, 128, 128) and raw["source_ic1"].dtype == torch.uint8
    assert raw["target_image"].dtype == torch.uint8 and raw["target_events"].shape == (2, 1, 128, 128)
    # ... network inputs on the device
    item = network_batch(raw)
    assert item["source_image"].shape == (2, 3, 128, 128) and item["source_image"].dtype == torch.float32
    assert item["source_label"].shape == (2, 128, 128) and item["source_label"].dtype == torch.int64
    assert item["source_ic1"].shape == (2, 3, 128, 128)
    assert item["target_image"].shape == (2, 3, 128, 128) and item["target_events"].shape == (2, 3, 128, 128)
    labels = set(item["source_label"].unique().tolist())
    assert labels <= set(range(19)) | {255}
    for key in ("source_ic1", "target_events"):
        assert item[key].min() >= -1 and item[key].max() <= 1
    lo = float(((0 - IMAGENET_MEAN) / IMAGENET_STD).min())
    hi = float(((255 - IMAGENET_MEAN) / IMAGENET_STD).max())
    assert lo - 1e-4 <= item["target_image"].min() and item["target_image"].max() <= hi + 1e-4
    np.testing.assert_allclose(item["source_image"][1].numpy(),
                               normalize_image(raw["source_image"][1].numpy().transpose(1, 2, 0)), atol=1e-5)
    np.testing.assert_allclose(item["source_ic1"][0, 2].numpy(), ic1_to_input(raw["source_ic1"][0, 0].numpy())[0],
                               atol=1e-6)
    again = PairedBatches(cfg, data, RcsConfig(min_pixels=50), batch=2, seed=0)[3]
    for k in raw:
        assert (raw[k] == again[k]).all(), k
    other = batches[4]
    assert not (other["source_image"] == raw["source_image"]).all()


def test_night_test_set_crops_to_440_rows(training_tree):
    test = NightTest(load_config(training_tree), DataConfig())
    item = test[0]
    assert item["image"].shape == (3, 440, 640) and item["events"].shape == (3, 440, 640)
    assert item["label"].shape == (440, 640) and str(item["label"].dtype) == "torch.int64"
    assert item["name"].startswith("zurich_city_09_a_")
    warped = read_rgb(test.rows[0].warp_image)
    np.testing.assert_array_equal(item["image"].numpy(), normalize_image(warped[:440]))
    label = read_grey(test.rows[0].label)
    np.testing.assert_array_equal(item["label"].numpy(), label[:440])


def test_store_with_other_bins_is_refused(training_tree):
    cfg = load_config(training_tree)
    import dataclasses

    five = dataclasses.replace(cfg, representation=dataclasses.replace(cfg.representation, bins=5))
    test = NightTest(five, DataConfig())
    with pytest.raises(InputError, match=r"events\.zarr: store was built with bins=1, the config asks for 5"):
        test[0]


def test_cityscapes_val_for_the_day_score(training_tree):
    val = CityscapesVal(load_config(training_tree), DataConfig(source_resize=(128, 64)))
    item = val[0]
    assert item["image"].shape == (3, 64, 128) and item["events"].shape == (3, 64, 128)
    assert item["label"].shape == (64, 128) and set(item["label"].unique().tolist()) <= set(range(19)) | {255}
    assert item["events"].min() >= -1 and item["events"].max() <= 1


@pytest.mark.parametrize("shape,chw", [((5, 7), False), ((5, 7, 3), False), ((5, 7, 1), False), ((1, 5, 7), True),
                                       ((15, 5, 7), True)])
def test_hflip_equals_numpy_reversal(shape, chw):
    a = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    want = a[:, :, ::-1] if chw else a[:, ::-1]
    got = hflip(a, chw=chw)
    assert got.shape == a.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(hflip(a.astype(np.float32), chw=chw), want.astype(np.float32))
