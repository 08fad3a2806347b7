"""Class-adaptive pseudo-label thresholds against a hand-computed case."""

from __future__ import annotations

import torch

from train.uda.pseudo_rules import BINS, AdaptiveThreshold


def _centre(p: float) -> float:
    """The centre of p's histogram bin, so the expected medians are exact."""
    return (int(p * BINS) + 0.5) / BINS


def test_thresholds_and_ignore_mask_match_a_hand_computed_case():
    conf = [[_centre(0.3), _centre(0.5), _centre(0.7)], [_centre(0.95), _centre(0.97), _centre(0.99)]]
    prob = torch.tensor([conf], dtype=torch.float32)  # [1, 2, 3]
    label = torch.tensor([[[0, 0, 0], [1, 1, 1]]])
    at = AdaptiveThreshold(num_classes=3, cap=0.9)
    out = at.apply(prob, label)
    thr = at.thresholds()
    # class 0: median of 0.3/0.5/0.7 is 0.5; class 1: median 0.97, capped at 0.9; class 2 unseen: the cap
    assert torch.allclose(thr, torch.tensor([_centre(0.5), 0.9, 0.9]), atol=1e-6)
    assert out.tolist() == [[[255, 0, 0], [1, 1, 1]]]


def test_even_counts_take_the_lower_median_and_history_decays():
    at = AdaptiveThreshold(num_classes=1, cap=0.9, momentum=0.5)
    lbl = torch.zeros(1, 1, 4, dtype=torch.long)
    at.update(torch.tensor([[[_centre(0.2), _centre(0.4), _centre(0.6), _centre(0.8)]]]), lbl)
    assert abs(float(at.thresholds()[0]) - _centre(0.4)) < 1e-6
    # a new batch all at 0.1: the old counts weigh 0.5 each (2 in all) against 4 new ones -> median 0.1
    at.update(torch.full((1, 1, 4), _centre(0.1)), lbl)
    assert abs(float(at.thresholds()[0]) - _centre(0.1)) < 1e-6


def test_state_round_trip():
    a = AdaptiveThreshold(num_classes=2)
    a.update(torch.rand(2, 8, 8), torch.randint(0, 2, (2, 8, 8)))
    b = AdaptiveThreshold(num_classes=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.thresholds(), b.thresholds())
