"""CycleGAN generator: key layout of cityscapes_ICD_to_dsec_EN.pth, strict frozen loading, IC1 -> events mapping."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import InputError
from train.checkpoints.cyclegan import load_cyclegan
from train.models.cyclegan import ResnetGenerator, ic1_to_events


def test_key_layout_matches_the_released_generator():
    state = ResnetGenerator().state_dict()
    assert len(state) == 48  # 24 convs with bias; instance norm (affine=False) holds no tensors
    assert state["model.1.weight"].shape == (64, 1, 7, 7)
    assert state["model.4.weight"].shape == (128, 64, 3, 3)
    assert state["model.7.weight"].shape == (256, 128, 3, 3)
    for i in range(10, 19):
        for j in (1, 5):
            assert state[f"model.{i}.conv_block.{j}.weight"].shape == (256, 256, 3, 3)
            assert state[f"model.{i}.conv_block.{j}.bias"].shape == (256,)
    assert state["model.19.weight"].shape == (256, 128, 3, 3)  # ConvTranspose weight is (in, out, k, k)
    assert state["model.22.weight"].shape == (128, 64, 3, 3)
    assert state["model.26.weight"].shape == (1, 64, 7, 7)
    assert state["model.26.bias"].shape == (1,)


def test_round_trip_loads_frozen_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    src = ResnetGenerator()
    path = tmp_path / "cityscapes_ICD_to_dsec_EN.pth"
    torch.save(src.state_dict(), path)
    gen = load_cyclegan(path)
    assert not gen.training
    assert all(not p.requires_grad for p in gen.parameters())
    for k, v in src.state_dict().items():
        assert torch.equal(gen.state_dict()[k], v), k
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gen(x), src.eval()(x))


def test_mismatching_file_lists_keys(tmp_path):
    state = ResnetGenerator().state_dict()
    del state["model.26.bias"]
    state["model.27.weight"] = torch.zeros(1)
    path = tmp_path / "gen.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"missing keys \[model\.26\.bias\].*unexpected keys \[model\.27\.weight\]"):
        load_cyclegan(path)


def test_three_channel_generator_file_is_rejected(tmp_path):
    path = tmp_path / "rgb.pth"
    torch.save(ResnetGenerator(input_nc=3, output_nc=3).state_dict(), path)
    with pytest.raises(InputError, match=r"shape mismatches \[model\.1\.weight: file \(64, 3, 7, 7\)"):
        load_cyclegan(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_cyclegan(tmp_path / "absent.pth")


def test_ic1_to_events_shape_range_and_grey_mean():
    torch.manual_seed(0)
    gen = ResnetGenerator().eval().requires_grad_(False)
    grey = torch.rand(2, 1, 32, 48) * 2 - 1
    ic1 = grey.repeat(1, 3, 1, 1)
    ev = ic1_to_events(gen, ic1)
    assert ev.shape == (2, 3, 32, 48)
    assert ev.min() >= -1 and ev.max() <= 1
    torch.testing.assert_close(ev[:, 0], ev[:, 2])
    torch.testing.assert_close(ev[:, :1], gen(grey))  # the generator sees the channel mean, unscaled
    assert not ev.requires_grad
    uneven = torch.stack([grey[:, 0], -grey[:, 0], torch.zeros_like(grey[:, 0])], dim=1)
    torch.testing.assert_close(ic1_to_events(gen, uneven)[:, :1], gen(torch.zeros_like(grey)))
