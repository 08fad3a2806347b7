"""DACS building blocks against hand-computed cases: schedule, EMA, pseudo weights, ClassMix, mIoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.config import LossConfig, OptimConfig
from train.eval.metrics import confusion, iou_per_class, summarize
from train.uda.losses import pseudo_labels, segmentation_terms, weighted_ce
from train.uda.mixing import block_mask, class_masks, mix
from train.uda.schedule import ema_alpha, ema_update, learning_rate


def test_warmup_then_poly_matches_hand_computation():
    cfg = OptimConfig(lr=6e-5, warmup_iters=1500, warmup_ratio=1e-6, power=1.0, min_lr=0.0)
    # it = 0: poly value 6e-5, warmup factor 1 - (1 - 0)(1 - 1e-6) = 1e-6
    assert learning_rate(0, 40_000, cfg) == pytest.approx(6e-5 * 1e-6)
    # it = 750: poly 6e-5 * (1 - 750/40000); warmup 1 - 0.5 * (1 - 1e-6)
    assert learning_rate(750, 40_000, cfg) == pytest.approx(6e-5 * (1 - 750 / 40_000) * (1 - 0.5 * (1 - 1e-6)))
    # after warmup: pure poly
    assert learning_rate(1500, 40_000, cfg) == pytest.approx(6e-5 * (1 - 1500 / 40_000))
    assert learning_rate(20_000, 40_000, cfg) == pytest.approx(3e-5)
    assert learning_rate(40_000, 40_000, cfg) == pytest.approx(0.0)
    # power 2 and a floor
    cfg2 = OptimConfig(lr=1.0, warmup_iters=0, power=2.0, min_lr=0.1)
    assert learning_rate(50, 100, cfg2) == pytest.approx(0.9 * 0.25 + 0.1)


def test_ema_alpha_and_update():
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(100_000, 0.999) == 0.999
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(2.0)
        student.weight.fill_(3.0)
        student.bias.fill_(-2.0)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(teacher.bias, torch.tensor([0.75 * 2 + 0.25 * -2]))
    assert torch.allclose(student.weight, torch.full((1, 2), 3.0))  # student untouched


def test_pseudo_weight_is_share_of_confident_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 10.0  # confident: p ~ 0.99991
    logits[0, 1, 0, 1] = 10.0  # confident
    logits[0, 2, 1, 0] = 1.0  # p = e/(e+2) ~ 0.576: not confident
    label, weight = pseudo_labels(logits, (2, 2), threshold=0.968)
    assert label[0].tolist() == [[0, 1], [2, 0]]
    assert torch.allclose(weight, torch.full((1, 2, 2), 0.5))  # 2 of 4 pixels, one scalar for all


def test_weighted_ce_averages_over_all_pixels():
    logits = torch.zeros(1, 2, 1, 2)
    label = torch.tensor([[[0, 255]]])
    # one valid pixel with CE = ln 2, one ignored pixel counted as 0: mean = ln2 / 2
    assert weighted_ce(logits, label).item() == pytest.approx(math.log(2) / 2)
    assert weighted_ce(logits, label, torch.tensor([[[0.5, 1.0]]])).item() == pytest.approx(math.log(2) / 4)


def test_segmentation_terms_weigh_each_output_as_cmda():
    """fusion 0.5, image 0.5, ISR 0.25, events 0.25 (CMDA's DSEC config), each CE at the label's size; a zero
    weight or an absent output adds no term; the per-pixel weight scales every term."""
    # one 1x1 logit map per output, upsampled to the 1x2 label: every pixel sees the same logits
    label = torch.tensor([[[0, 255]]])
    ln = {"fusion": 1.0, "image": 2.0, "isr": 3.0, "events": 4.0}
    logits = {k: torch.tensor([v, 0.0]).view(1, 2, 1, 1) for k, v in ln.items()}

    def ce(v: float) -> float:  # class 0 has logit v, class 1 logit 0; the ignored pixel counts as 0
        return (math.log(math.exp(v) + 1) - v) / 2

    terms = segmentation_terms(logits, label, LossConfig(), prefix="src/")
    assert set(terms) == {"src/fusion", "src/image", "src/isr", "src/events"}
    for k, w in {"fusion": 0.5, "image": 0.5, "isr": 0.25, "events": 0.25}.items():
        assert terms[f"src/{k}"].item() == pytest.approx(w * ce(ln[k]), rel=1e-5)
    half = segmentation_terms(logits, label, LossConfig(), weight=torch.tensor([[[0.5, 1.0]]]))
    assert half["fusion"].item() == pytest.approx(0.5 * 0.5 * ce(1.0), rel=1e-5)
    only = segmentation_terms({"fusion": logits["fusion"]}, label, LossConfig(image=0.0))
    assert set(only) == {"fusion"}
    assert segmentation_terms(logits, label, LossConfig(fusion=0.0, image=0.0, isr=0.0, events=0.0)) == {}


def test_class_masks_per_batch_setting_picks_half_of_the_batch_classes():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[3, 3, 3], [0, 0, 4]]])  # classes 0..4 over the batch
    for _ in range(20):
        m = class_masks(labels, per_sample=False)
        assert m.shape == (2, 1, 2, 3)
        picked = torch.unique(labels[m[:, 0].bool()])
        assert len(picked) == 3  # (5 + 5 % 2) / 2
        # a class is chosen for every sample or for none (picked over the batch)
        for c in range(5):
            sel = labels == c
            assert m[:, 0][sel].min() == m[:, 0][sel].max()


def test_mix_pastes_where_mask_is_one():
    mask = torch.tensor([[[[1.0, 0.0]]]])
    src, tgt = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    assert mix(mask, src, tgt)[0, :, 0].tolist() == [[1.0, 0.0]] * 3
    assert mix(mask, torch.tensor([[[7, 7]]]), torch.tensor([[[5, 5]]])).tolist() == [[[7, 5]]]


def test_block_mask_ratio_and_blocks():
    torch.manual_seed(1)
    m = block_mask((4, 3, 64, 96), 0.25, 16, torch.device("cpu"))
    assert m.shape == (4, 1, 64, 96)
    blocks = m[:, :, ::16, ::16]
    assert torch.equal(m, blocks.repeat_interleave(16, 2).repeat_interleave(16, 3))
    assert 0.1 < 1 - m.mean().item() < 0.4


def test_miou_over_annotated_classes_excludes_truck():
    # 3 annotated classes; truck (14) never in the ground truth but predicted on some pixels.
    label = torch.tensor([0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 14, 1, 1, 2, 0, 3])
    conf = confusion(pred, label).numpy()
    iou = iou_per_class(conf)
    assert iou[0] == pytest.approx(1 / 3)  # tp 1, gt 2, pred 2 -> 1 / 3
    assert iou[1] == pytest.approx(1.0)
    assert iou[2] == pytest.approx(1 / 2)
    assert iou[14] == 0.0  # predicted but never annotated
    s = summarize(conf)
    assert s["n_classes"] == 3 and "truck" not in s["classes"]
    assert s["mIoU"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    # mmseg-style 19-class mean counts truck as 0 (defined: union > 0) and skips undefined classes
    assert s["mIoU19"] == pytest.approx((1 / 3 + 1 + 1 / 2 + 0) / 4)
    assert np.isnan(iou[5])
