"""The entropy-minimisation component (the worked example of docs/adding-a-component.md): its formula against
a NumPy reference, its pixel weighting, and its wiring into the real step without touching anything else."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from benchmarks.bench_train import fake_batch
from pipeline.errors import InputError
from tests.steps import step_grads
from train.config import TrainConfig, apply_layers, validate
from train.models import CMDAModel
from train.uda.components import entropy
from train.uda.components.entropy import EntropyMinimisation, entropy_term, normalised_entropy
from train.uda.method import COMPONENTS, build_method

CROP = 64


def test_normalised_entropy_matches_numpy_and_spans_zero_to_one():
    logits = torch.randn(2, 19, 5, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = np.exp(logits.double().numpy())
    p /= p.sum(1, keepdims=True)
    want = -(p * np.log(p)).sum(1) / math.log(19)
    np.testing.assert_allclose(normalised_entropy(logits).numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(normalised_entropy(torch.zeros(1, 19, 2, 2)), torch.ones(1, 2, 2))  # uniform: 1
    confident = torch.full((1, 19, 2, 2), -50.0)
    confident[:, 3] = 50.0
    assert normalised_entropy(confident).max() < 1e-6  # one class certain: 0


def test_entropy_term_averages_only_target_pixels():
    logits = torch.zeros(1, 19, 4, 4)
    logits[:, 0, :, :2] = 100.0          # left half certain (entropy 0), right half uniform (entropy 1)
    left = torch.zeros(1, 8, 8)
    left[:, :, :4] = 1                    # target pixels at twice the logits' size
    assert entropy_term(logits, left).item() < 1e-6
    assert entropy_term(logits, 1 - left).item() == pytest.approx(1.0)
    assert entropy_term(logits, torch.zeros(1, 8, 8)).item() == 0.0  # no target pixel: no term, no NaN


def test_off_by_default_and_registered_once():
    assert COMPONENTS.count(entropy.build) == 1
    cfg = TrainConfig()
    assert entropy.build(cfg, None) is None
    apply_layers(cfg, sets=["entropy.enabled=true", "entropy.weight=0.5"])
    validate(cfg)
    built = entropy.build(cfg, None)
    assert isinstance(built, EntropyMinimisation) and built.cfg.weight == 0.5


@pytest.mark.parametrize("bad", ["entropy.weight=-1", "entropy.weight=nan"])
def test_bad_weight_is_refused(bad):
    cfg = TrainConfig()
    apply_layers(cfg, sets=[bad])
    with pytest.raises(InputError, match=r"entropy\.weight"):
        validate(cfg)


def _step(sets: list[str]):
    cfg = TrainConfig()
    cfg.run.channels_last, cfg.data.crop = False, CROP
    apply_layers(cfg, sets=sets)
    validate(cfg)
    torch.manual_seed(0)
    model = CMDAModel("mit_b0", head_channels=16).train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    batch = fake_batch(1, CROP, torch.device("cpu"), torch.Generator().manual_seed(1))
    method = build_method(cfg, torch.device("cpu"), None, None)
    return step_grads(cfg, model, teacher, batch, method=method)


def test_in_the_real_step_it_adds_one_term_and_changes_nothing_else():
    grads_off, terms_off, _ = _step([])
    grads_on, terms_on, _ = _step(["entropy.enabled=true", "entropy.weight=0.5"])
    assert set(terms_on) == set(terms_off) | {"ent/target"}
    assert 0 < terms_on["ent/target"].item() <= 0.5  # weight x a normalised entropy in (0, 1]
    for name, value in terms_off.items():  # same random draws: every other term is bit-identical
        assert torch.equal(terms_on[name], value), name
    assert any(not torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))
