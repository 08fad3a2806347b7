"""Light output-space discriminator (train/uda/components/adversarial.py): size, gradient routing, checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.uda.components.adversarial import AdvConfig, Adversary, LightDiscriminator, StandardDiscriminator, n_params


def test_parameter_counts_match_the_stated_ones():
    light, standard = n_params(LightDiscriminator(19)), n_params(StandardDiscriminator(19))
    assert abs(light - 189_000) / 189_000 < 0.10      # "189 k" (the real-time DA project's light discriminator)
    assert abs(standard - 2_780_000) / 2_780_000 < 0.10  # "2.78 M"
    assert light == 189_424 and standard / light > 14


def test_output_is_one_logit_map_at_input_size():
    x = torch.softmax(torch.randn(2, 19, 64, 96), 1)
    assert LightDiscriminator()(x).shape == (2, 1, 64, 96)
    assert StandardDiscriminator()(x).shape == (2, 1, 64, 96)


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    seg = nn.Conv2d(3, 19, 1)  # a stand-in segmentation network
    adv = Adversary(AdvConfig(enabled=True), 19)
    return seg, adv


def test_generator_term_reaches_the_segmentation_net_only_through_target_predictions():
    seg, adv = _nets()
    src, tgt = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    src_pred = seg(src)  # a source prediction exists but must not get this term's gradient
    tgt_in = tgt.clone().requires_grad_(True)
    terms = adv.generator_terms(seg(tgt_in))
    assert set(terms) == {"adv/generator"}
    terms["adv/generator"].backward()
    assert seg.weight.grad is not None and seg.weight.grad.abs().sum() > 0
    assert tgt_in.grad is not None and tgt_in.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.disc.parameters())
    assert all(p.requires_grad for p in adv.disc.parameters())  # flags restored
    # exactly the gradient of the term through the target prediction: the source prediction adds nothing
    g = seg.weight.grad.clone()
    seg.zero_grad()
    adv.generator_terms(seg(tgt))["adv/generator"].backward()
    assert torch.allclose(seg.weight.grad, g) and src_pred.requires_grad
    # weight 1e-3 on the BCE against the 'source' label
    d = adv.disc(torch.softmax(seg(tgt), 1))
    bce = nn.functional.binary_cross_entropy_with_logits(d, torch.zeros_like(d))
    assert terms["adv/generator"].item() == pytest.approx(1e-3 * bce.item(), rel=1e-5)


def test_discriminator_step_updates_only_the_discriminator():
    seg, adv = _nets()
    seg_before = copy.deepcopy(seg.state_dict())
    d_before = copy.deepcopy(adv.disc.state_dict())
    src_pred, tgt_pred = seg(torch.randn(1, 3, 32, 32)), seg(torch.randn(1, 3, 32, 32))
    logs = adv.discriminator_step(src_pred, tgt_pred)
    assert set(logs) == {"adv/d_source", "adv/d_target"} and all(v > 0 for v in logs.values())
    assert seg.weight.grad is None and seg.bias.grad is None
    assert all(torch.equal(v, seg.state_dict()[k]) for k, v in seg_before.items())
    assert any(not torch.equal(v, adv.disc.state_dict()[k]) for k, v in d_before.items())
    assert all(p.grad is None for p in adv.disc.parameters())  # zeroed after the step


def test_target_weight_masks_pixels():
    seg, adv = _nets()
    pred = seg(torch.randn(1, 3, 32, 32))
    zero = adv.generator_terms(pred, torch.zeros(1, 32, 32))["adv/generator"]
    assert zero.item() == 0.0
    half = torch.zeros(1, 32, 32)
    half[:, :, :16] = 1
    assert adv.generator_terms(pred, half)["adv/generator"].item() > 0
    assert Adversary(AdvConfig(), 19).generator_terms(pred) == {}


def test_poly_lr_and_resume_is_exact():
    _seg, adv = _nets()
    assert adv.set_lr(0, 100) == pytest.approx(1e-4)
    assert adv.set_lr(50, 100) == pytest.approx(1e-4 * 0.5 ** 0.9)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(1, 19, 32, 32, generator=gen), torch.randn(1, 19, 32, 32, generator=gen))
               for _ in range(4)]
    for s, t in batches[:2]:
        adv.discriminator_step(s, t)
    state = copy.deepcopy(adv.state_dict())
    for s, t in batches[2:]:
        adv.discriminator_step(s, t)
    _, resumed = _nets(seed=9)
    resumed.load_state_dict(state)
    for s, t in batches[2:]:
        resumed.discriminator_step(s, t)
    for k, v in adv.disc.state_dict().items():
        assert torch.equal(v, resumed.disc.state_dict()[k])


def test_upsample_feeds_full_resolution_maps():
    torch.manual_seed(0)
    adv = Adversary(AdvConfig(enabled=True, upsample=4), 19)
    logits = torch.randn(1, 19, 8, 8)
    d = adv.disc(torch.softmax(torch.nn.functional.interpolate(logits, scale_factor=4, mode="bilinear"), 1))
    bce = nn.functional.binary_cross_entropy_with_logits(d, torch.zeros_like(d))
    assert adv.generator_terms(logits)["adv/generator"].item() == pytest.approx(1e-3 * bce.item(), rel=1e-5)
