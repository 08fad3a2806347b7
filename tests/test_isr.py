"""Batched torch ISR vs the per-image NumPy reference, input conventions, directions, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.image_change import isr_reference
from train.common import IMAGENET_MEAN, IMAGENET_STD
from train.data.isr import (
    DIRECTIONS,
    ISR_DAY,
    ISR_NIGHT,
    cmda_direction,
    denormalize_to_uint8,
    image_content,
    isr_from_normalized,
    random_directions,
)


def _batch() -> np.ndarray:
    """[4, H, W, 3] uint8: noise, a smooth scene, a dark night-like scene, a flat image with one block."""
    rng = np.random.default_rng(0)
    h, w = 45, 62
    yy, xx = np.mgrid[0:h, 0:w]
    scene = 128 + 90 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 8.0)[..., None] + rng.normal(0, 4, (h, w, 3))
    dark = 3 + 10 * (np.sin(xx / 3.0) > 0)[..., None] + rng.integers(0, 3, (h, w, 3))
    flat = np.full((h, w, 3), 90.0)
    flat[10:20, 30:40] = [200, 40, 10]
    out = np.stack([rng.integers(0, 256, (h, w, 3)), scene, dark, flat])
    return np.clip(out, 0, 255).astype(np.uint8)


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("params", [ISR_DAY, ISR_NIGHT], ids=["day", "night"])
@pytest.mark.parametrize("direction", [*DIRECTIONS, "all"])
def test_torch_matches_numpy_reference(params, direction):
    batch = _batch()
    out = image_content(_to_tensor(batch), params, direction)
    assert out.shape == (4, 3, *batch.shape[1:3]) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    ref = np.stack([isr_reference(img, params, direction) for img in batch])
    np.testing.assert_allclose(out[:, 0].numpy(), ref, atol=1e-5, rtol=0)
    assert out.min() >= -1 and out.max() <= 1 and (ref != 0).mean() > 0.01


def test_per_sample_directions_and_compat():
    batch = _batch()
    dirs = ["leftup", "rightdown", "leftdown", "rightup"]
    for compat in (False, True):
        out = image_content(_to_tensor(batch), ISR_NIGHT, dirs, cmda_compat=compat)
        ref = np.stack([isr_reference(im, ISR_NIGHT, d, cmda_compat=compat) for im, d in zip(batch, dirs, strict=True)])
        np.testing.assert_allclose(out[:, 0].numpy(), ref, atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.all(image_content(flat) == 0)
    assert torch.all(image_content(flat, cmda_compat=True) == -1)
    with pytest.raises(ValueError):
        image_content(flat, direction=["leftup"])


def test_float_input_is_truncated_like_uint8():
    batch = _to_tensor(_batch())
    as_float = batch.float() + 0.75  # truncation toward zero gives the same integers back
    as_float[0, :, 0, 0] = 300.0  # clamped to 255
    batch[0, :, 0, 0] = 255
    torch.testing.assert_close(image_content(as_float, ISR_DAY), image_content(batch, ISR_DAY), atol=0, rtol=0)


def test_normalised_input_roundtrip():
    batch = _to_tensor(_batch())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (batch.float() - mean) / std
    back = denormalize_to_uint8(x)
    assert back.dtype == torch.uint8 and (back.int() - batch.int()).abs().max() <= 1
    assert (back == batch).float().mean() > 0.5
    torch.testing.assert_close(isr_from_normalized(x, ISR_NIGHT, "leftup"), image_content(back, ISR_NIGHT, "leftup"))


def test_direction_rules():
    assert cmda_direction(0, 0) == "leftdown" and cmda_direction(0, 1) == "leftup"
    assert cmda_direction(1, 0) == "rightdown" and cmda_direction(3, 5) == "rightup"
    torch.manual_seed(0)
    assert set(random_directions(200)) == set(DIRECTIONS)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        image_content(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError):
        image_content(torch.zeros(1, 3, 3, 8), ISR_DAY)  # 3 rows cannot take a 3-pixel shift


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu():
    batch = _to_tensor(_batch())
    for params in (ISR_DAY, ISR_NIGHT):
        cpu = image_content(batch, params, "all")
        gpu = image_content(batch.cuda(), params, "all").cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)
