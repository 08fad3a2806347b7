"""DSRNSS pieces (train/uda/components/dsr.py): grouped ClassMix, tail-class bank, prototype alignment."""

from __future__ import annotations

import math

import pytest
import torch

from train.uda.components.dsr import (
    TAIL_CLASSES,
    DsrConfig,
    TailBank,
    batch_prototype_loss,
    class_weights,
    grouped_class_masks,
    prototype_loss,
    prototype_terms,
    with_companions,
)
from train.uda.mixing import class_masks

POLE, LIGHT, SIGN, RIDER, MOTO, BIKE = 5, 6, 7, 12, 17, 18


def _t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs)


@pytest.mark.parametrize(("chosen", "present", "expected"), [
    ((POLE,), (0, POLE, LIGHT, SIGN), (POLE, LIGHT, SIGN)),
    ((LIGHT,), (0, POLE, LIGHT, SIGN), (POLE, LIGHT, SIGN)),   # light -> pole -> sign
    ((SIGN,), (SIGN, 0), (SIGN,)),                            # no pole in the sample: nothing to add
    ((POLE,), (POLE, SIGN), (POLE, SIGN)),                    # only companions present are added
    ((RIDER,), (RIDER, MOTO, BIKE, 13), (RIDER, MOTO, BIKE)),
    ((BIKE,), (RIDER, BIKE), (BIKE,)),                        # rider -> bikes, not the reverse
    ((0, 13), (0, 13, POLE, LIGHT), (0, 13)),
])
def test_with_companions(chosen, present, expected):
    assert with_companions(_t(*chosen), _t(*present)).tolist() == sorted(expected)


def _random_labels(gen: torch.Generator, b: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    """Label maps of random rectangles of random classes (pole group and rider group often present)."""
    lbl = torch.zeros(b, h, w, dtype=torch.long)
    pool = torch.tensor([0, 1, 2, 8, 10, 13, POLE, LIGHT, SIGN, RIDER, MOTO, BIKE, 255])
    for i in range(b):
        for _ in range(8):
            c = pool[torch.randint(len(pool), (1,), generator=gen)]
            y, x = torch.randint(h - 3, (2,), generator=gen).tolist()
            lbl[i, y:y + 4, x:x + 4] = c
    return lbl


def test_grouped_classmix_brings_companions_over_many_draws():
    gen = torch.Generator().manual_seed(0)
    checked = {"pole": 0, "rider": 0}
    plain_violations = 0
    for draw in range(300):
        labels = _random_labels(gen)
        torch.manual_seed(draw)
        masks = grouped_class_masks(labels)[:, 0].bool()
        torch.manual_seed(draw)
        plain = class_masks(labels)[:, 0].bool()
        assert bool((masks | ~plain).all()), "grouped masks must contain the plain ClassMix pick"
        for lbl, m, p in zip(labels, masks, plain, strict=True):
            picked = set(torch.unique(lbl[m]).tolist())
            present = set(torch.unique(lbl).tolist())
            if POLE in picked:
                checked["pole"] += 1
                assert {LIGHT, SIGN} & present <= picked
            if LIGHT in picked or SIGN in picked:
                assert (POLE in present) <= (POLE in picked)
            if RIDER in picked:
                checked["rider"] += 1
                assert {MOTO, BIKE} & present <= picked
            plain_picked = set(torch.unique(lbl[p]).tolist())
            if POLE in plain_picked and not ({LIGHT, SIGN} & present <= plain_picked):
                plain_violations += 1
        # every pixel of a picked class is masked (a mask is a union of whole classes)
        for lbl, m in zip(labels, masks, strict=True):
            for c in torch.unique(lbl[m]).tolist():
                assert bool(m[lbl == c].all())
    assert checked["pole"] > 30 and checked["rider"] > 30
    assert plain_violations > 0  # plain ClassMix does split the groups: the grouping is doing something


def _batch(marker: float, tail: bool = True, b: int = 2, h: int = 8, w: int = 8):
    lbl = torch.zeros(b, h, w, dtype=torch.long)
    if tail:
        lbl[:, 2:4, 2:5] = 14  # truck
        lbl[0, 5, 5] = RIDER
    lbl[:, 0, 0] = 13           # car: not a tail class
    img = torch.full((b, 3, h, w), marker)
    evt = torch.full((b, 3, h, w), -marker)
    return img, evt, lbl


def test_tail_bank_holds_only_tail_pixels_fifo_and_capacity():
    bank = TailBank(capacity=3)
    for k in range(1, 6):
        assert bank.push(*_batch(float(k)))
        assert bank.n_entries == min(k, 3)
    assert not bank.push(*_batch(99.0, tail=False))  # nothing to keep
    assert bank.n_entries == 3
    assert [float(e["image"].max()) for e in bank.entries] == [3.0, 4.0, 5.0]  # oldest out first
    for e in bank.entries:
        m = e["mask"]
        assert set(torch.unique(e["label"][m]).tolist()) <= set(TAIL_CLASSES)
        assert bool((e["label"][~m] == 255).all())
        assert bool((e["image"][~m.unsqueeze(1).expand_as(e["image"])] == 0).all())
        assert bool((e["events"][~m.unsqueeze(1).expand_as(e["events"])] == 0).all())


def test_tail_bank_paste_changes_only_pasted_pixels():
    bank = TailBank(capacity=2)
    img_a, evt_a, lbl_a = _batch(1.0)
    bank.push(img_a, evt_a, lbl_a)
    img_b, evt_b, lbl_b = _batch(2.0)
    lbl_b[:, 2, 2] = 0  # the newer entry lacks one pixel the older has
    bank.push(img_b, evt_b, lbl_b)
    gen = torch.Generator().manual_seed(1)
    image, events = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    label, weight = torch.randint(0, 11, (2, 8, 8), generator=gen), torch.full((2, 8, 8), 0.3)
    p_img, p_evt, p_lbl, p_w, pasted = bank.paste(image, events, label, weight)
    expect = bank.entries[0]["mask"] | bank.entries[1]["mask"]
    assert torch.equal(pasted, expect)
    keep = ~pasted
    k3 = keep.unsqueeze(1).expand_as(image)
    assert torch.equal(p_img[k3], image[k3]) and torch.equal(p_evt[k3], events[k3])
    assert torch.equal(p_lbl[keep], label[keep]) and torch.equal(p_w[keep], weight[keep])
    newest = bank.entries[1]["mask"]
    assert bool((p_img[newest.unsqueeze(1).expand_as(image)] == 2.0).all())   # newer wins
    assert bool((p_img[:, :, 2, 2] == 1.0).all())                              # older shows where newer has none
    assert torch.equal(p_lbl[pasted], torch.where(newest, lbl_b, lbl_a)[pasted])
    assert bool((p_w[pasted] == 1).all())
    assert torch.equal(image, image.clone())  # inputs untouched
    assert TailBank.should_paste(10, 5) and not TailBank.should_paste(11, 5) and not TailBank.should_paste(3, 0)


def test_tail_bank_without_events_pastes_image_and_label_only():
    """An image-only target (no event input): entries hold image and label; a batch's events, when it
    has them, stay as they were under pixels pasted from an entry without events."""
    bank = TailBank(capacity=2)
    img, _, lbl = _batch(1.0)
    assert bank.push(img, None, lbl) and "events" not in bank.entries[0]
    label, image = torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 3, 8, 8)
    p_img, p_evt, p_lbl, _, pasted = bank.paste(image, None, label)
    assert p_evt is None and bool(pasted.any())
    assert bool((p_img[pasted.unsqueeze(1).expand_as(image)] == 1.0).all()) and torch.equal(p_lbl[pasted], lbl[pasted])
    events = torch.full((2, 3, 8, 8), 0.5)
    assert torch.equal(bank.paste(image, events, label)[1], events)


def test_tail_bank_state_dict_round_trip():
    bank = TailBank(capacity=2)
    for k in range(3):
        bank.push(*_batch(float(k + 1)))
    other = TailBank(capacity=9, classes=(1,))
    other.load_state_dict(bank.state_dict())
    assert other.capacity == 2 and other.classes == bank.classes and other.n_entries == 2
    for a, b in zip(bank.entries, other.entries, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = _batch(7.0)
    assert all(torch.equal(u, v) for u, v in zip(bank.paste(*x)[:3], other.paste(*x)[:3], strict=True))


def _two_class_case():
    # a: pixel 0 class 0 feature (1,0), pixel 1 class 1 feature (0,1); b: (2,0) class 0, (1,1) class 1
    feat_a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [C=2, h=1, w=2]
    feat_b = torch.tensor([[[2.0, 1.0]], [[0.0, 1.0]]])
    lbl = torch.tensor([[0, 1]])
    return feat_a, lbl, feat_b, lbl.clone()


def test_prototype_loss_hand_computed_two_classes():
    feat_a, la, feat_b, lb = _two_class_case()
    # b's pixels vs a's prototypes (1,0), (0,1): logits (10, 0) and (10/sqrt2, 10/sqrt2)
    ce_b = (math.log1p(math.exp(-10)) + math.log(2)) / 2
    # a's pixels vs b's prototypes (2,0) -> (1,0) and (1,1) -> (1,1)/sqrt2
    s = 10 / math.sqrt(2)
    ce_a = (math.log1p(math.exp(s - 10)) + math.log1p(math.exp(-s))) / 2
    got = prototype_loss(feat_a, la, feat_b, lb, scale=10.0)
    assert got.item() == pytest.approx(ce_b + ce_a, rel=1e-5)
    # class weights: weighted mean over pixels with w0 = 1, w1 = 3
    w = torch.tensor([1.0, 3.0])
    ce_b_w = (math.log1p(math.exp(-10)) + 3 * math.log(2)) / 4
    ce_a_w = (math.log1p(math.exp(s - 10)) + 3 * math.log1p(math.exp(-s))) / 4
    assert prototype_loss(feat_a, la, feat_b, lb, 10.0, w).item() == pytest.approx(ce_b_w + ce_a_w, rel=1e-5)


def test_prototype_loss_ignores_classes_absent_in_one_domain():
    feat_a, la, feat_b, lb = _two_class_case()
    base = prototype_loss(feat_a, la, feat_b, lb).item()
    # a third class only in domain a (and an ignore pixel in b) changes nothing
    feat_a3 = torch.cat([feat_a, torch.tensor([[[5.0]], [[-3.0]]])], dim=2)
    la3 = torch.tensor([[0, 1, 2]])
    feat_b3 = torch.cat([feat_b, torch.tensor([[[-7.0]], [[4.0]]])], dim=2)
    lb3 = torch.tensor([[0, 1, 255]])
    assert prototype_loss(feat_a3, la3, feat_b3, lb3).item() == pytest.approx(base, rel=1e-6)
    # nothing shared: exactly zero, still differentiable
    fa = feat_a.clone().requires_grad_(True)
    zero = prototype_loss(fa, torch.tensor([[0, 0]]), feat_b, torch.tensor([[1, 1]]))
    assert zero.item() == 0.0
    zero.backward()
    assert fa.grad is not None and bool((fa.grad == 0).all())


def test_prototype_loss_downsamples_labels_and_sends_gradient_to_both_sides():
    gen = torch.Generator().manual_seed(3)
    fa = torch.randn(2, 8, 4, 4, generator=gen, requires_grad=True)
    fb = torch.randn(2, 8, 4, 4, generator=gen, requires_grad=True)
    la = torch.randint(0, 3, (2, 32, 32), generator=gen)
    lb = torch.randint(0, 3, (2, 32, 32), generator=gen)
    loss = batch_prototype_loss(fa, la, fb, lb)
    loss.backward()
    assert torch.isfinite(loss) and fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0
    one = prototype_loss(fa[0], la[0], fb[0], lb[0]) + prototype_loss(fa[1], la[1], fb[1], lb[1])
    assert loss.item() == pytest.approx(one.item() / 2, rel=1e-6)


def test_prototype_terms_names_weights_and_switches():
    gen = torch.Generator().manual_seed(4)
    f = [torch.randn(1, 4, 2, 2, generator=gen) for _ in range(3)]
    lbl = [torch.randint(0, 2, (1, 8, 8), generator=gen) for _ in range(3)]
    cfg = DsrConfig(enabled=True)
    terms = prototype_terms(cfg, (f[0], lbl[0]), (f[1], lbl[1]), (f[2], lbl[2]))
    w = class_weights(19, cfg.proto_class_weight)
    assert set(terms) == {"dsr/proto", "dsr/proto_mix"}
    assert terms["dsr/proto"].item() == pytest.approx(0.1 * batch_prototype_loss(f[0], lbl[0], f[1], lbl[1],
                                                                                 10.0, w).item())
    assert terms["dsr/proto_mix"].item() == pytest.approx(0.01 * batch_prototype_loss(f[0], lbl[0], f[2], lbl[2],
                                                                                      10.0, w).item())
    assert prototype_terms(DsrConfig(), (f[0], lbl[0]), (f[1], lbl[1])) == {}
    assert prototype_terms(DsrConfig(enabled=True, proto_weight=0.0), (f[0], lbl[0]), (f[1], lbl[1])) == {}
    assert float(w[RIDER]) == 2.0 and float(w[0]) == 1.0
