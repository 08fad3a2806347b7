"""DIDA's instance bank (train/uda/components/dida.py): balance, boundary filling, EMA rule, calibrated soft
target, loss."""

from __future__ import annotations

import math

import pytest
import torch

from train.uda.components.dida import (
    DidaConfig,
    InstanceBank,
    boundary_mask,
    calibrated_target,
    dida_terms,
    instance_loss,
    similarities,
)


def test_bank_is_class_balanced():
    bank = InstanceBank(DidaConfig())
    counts = torch.bincount(bank.labels, minlength=19)
    assert bank.feats.shape == (300, 256) and int(counts.sum()) == 300
    assert int(counts.max() - counts.min()) <= 1 and int(counts.min()) == 15
    assert bank.n_filled == 0


def test_boundary_mask_hand_case():
    lbl = torch.tensor([[[0, 0, 1, 1],
                         [0, 0, 1, 1],
                         [0, 0, 1, 255],
                         [0, 0, 0, 0]]])
    got = boundary_mask(lbl)[0].int().tolist()
    assert got == [[0, 1, 1, 0],
                   [0, 1, 1, 1],
                   [0, 1, 1, 0],    # 255 itself is never a boundary pixel
                   [0, 1, 1, 1]]


def _source(gen: torch.Generator, dim: int = 4):
    lbl = torch.zeros(1, 8, 8, dtype=torch.long)
    lbl[0, :, 4:] = 1
    lbl[0, 6:, :] = 2
    emb = torch.rand(1, dim, 8, 8, generator=gen)
    return emb, lbl


def test_bank_fills_from_boundary_pixels_then_ema_every_interval():
    cfg = DidaConfig(bank_size=6, dim=4, num_classes=3, momentum=0.9, update_every=50)
    bank = InstanceBank(cfg)
    gen = torch.Generator().manual_seed(0)
    emb, lbl = _source(gen)
    edge = boundary_mask(lbl, num_classes=3)[0]
    bank.update(emb, lbl, iteration=1)
    assert bank.n_filled == 6
    pix = emb[0].permute(1, 2, 0)
    for k in range(6):
        c = int(bank.labels[k])
        cand = pix[edge & (lbl[0] == c)]
        assert bool((cand == bank.feats[k]).all(1).any()), "a filled slot holds a boundary pixel of its class"
    assert len({tuple(bank.feats[k].tolist()) for k in range(6)}) == 6  # distinct instances
    before = bank.feats.clone()
    emb2, _ = _source(gen)
    bank.update(emb2, lbl, iteration=51)  # not a multiple of 50: no EMA, nothing empty to fill
    assert torch.equal(bank.feats, before)
    bank.update(emb2, lbl, iteration=100)
    pix2 = emb2[0].permute(1, 2, 0)
    for k in range(6):
        c = int(bank.labels[k])
        mean = pix2[edge & (lbl[0] == c)].mean(0)
        assert torch.allclose(bank.feats[k], 0.9 * before[k] + 0.1 * mean, atol=1e-6)


def test_bank_ema_leaves_absent_classes_alone_and_state_round_trips():
    cfg = DidaConfig(bank_size=6, dim=4, num_classes=3, momentum=0.5, update_every=1)
    bank = InstanceBank(cfg)
    gen = torch.Generator().manual_seed(1)
    emb, lbl = _source(gen)
    bank.update(emb, lbl, 0)
    only01 = lbl.clone()
    only01[only01 == 2] = 0
    before = bank.feats.clone()
    bank.update(emb, only01, 1)
    cls2 = bank.labels == 2
    assert torch.equal(bank.feats[cls2], before[cls2]) and not torch.equal(bank.feats[~cls2], before[~cls2])
    other = InstanceBank(cfg)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.feats, bank.feats) and torch.equal(other.filled, bank.filled)


def test_calibrated_target_and_loss_hand_case():
    # one pixel, two entries of classes 0 and 1; teacher similarities (3, 1)
    sim_t = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # softmax (0.25, 0.75)
    labels = torch.tensor([0, 1])
    got = calibrated_target(sim_t, logits, labels, "prob").flatten()
    assert got.tolist() == pytest.approx([0.5, 0.5])            # (0.75, 0.75) / 1.5
    raw = calibrated_target(sim_t, torch.tensor([2.0, 4.0]).view(1, 2, 1, 1), labels, "logit").flatten()
    assert raw.tolist() == pytest.approx([0.6, 0.4])            # (6, 4) / 10, DIDA's rule
    assert calibrated_target(sim_t, logits, labels, "none").flatten().tolist() == pytest.approx([0.75, 0.25])
    sim_s = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)           # student distribution (0.25, 0.75)
    loss = instance_loss(got.view(1, 2, 1, 1), sim_s)
    assert loss.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    with pytest.raises(ValueError):
        calibrated_target(sim_t, logits, labels, "softmax")


def test_similarities_are_dot_products():
    emb = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    bank = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    assert similarities(emb, bank).flatten().tolist() == [1.0, 5.0]


def _filled_bank(cfg: DidaConfig, gen: torch.Generator) -> InstanceBank:
    bank = InstanceBank(cfg)
    bank.feats = torch.rand(cfg.bank_size, cfg.dim, generator=gen)
    bank.filled[: cfg.bank_size - 2] = True  # two empty slots must not take part
    return bank


def test_dida_terms_chunking_target_mask_and_gradient_routing():
    cfg = DidaConfig(enabled=True, bank_size=12, dim=5, num_classes=3)
    gen = torch.Generator().manual_seed(2)
    bank = _filled_bank(cfg, gen)
    t_emb = torch.rand(2, 5, 4, 6, generator=gen)
    s_emb = torch.rand(2, 5, 4, 6, generator=gen, requires_grad=True)
    logits = torch.randn(2, 3, 4, 6, generator=gen, requires_grad=True)
    tgt_pix = (torch.rand(2, 16, 24, generator=gen) > 0.5).float()
    full = dida_terms(cfg, bank, t_emb, s_emb, logits, tgt_pix)["dida/instance"]
    chunked = dida_terms(DidaConfig(**{**cfg.__dict__, "chunk": 5}), bank, t_emb, s_emb, logits,
                         tgt_pix)["dida/instance"]
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    # by hand over the filled entries, target pixels only (weight map at 1/4 by nearest)
    keep = bank.filled
    tgt = calibrated_target(similarities(t_emb, bank.feats[keep]), logits, bank.labels[keep])
    w = torch.nn.functional.interpolate(tgt_pix[:, None], size=(4, 6), mode="nearest")[:, 0]
    ref = 0.5 * instance_loss(tgt, similarities(s_emb, bank.feats[keep]), w)
    assert full.item() == pytest.approx(ref.item(), rel=1e-5)
    every = dida_terms(DidaConfig(**{**cfg.__dict__, "target_only": False}), bank, t_emb, s_emb, logits, tgt_pix)
    assert every["dida/instance"].item() == pytest.approx(0.5 * instance_loss(tgt, similarities(
        s_emb, bank.feats[keep])).item(), rel=1e-5)
    full.backward()
    assert s_emb.grad is not None and s_emb.grad.abs().sum() > 0
    assert logits.grad is None  # the calibration uses the student's logits without gradient


def test_dida_terms_off_and_empty_bank():
    cfg = DidaConfig(enabled=True, bank_size=4, dim=3, num_classes=2)
    emb = torch.rand(1, 3, 2, 2, requires_grad=True)
    logits = torch.rand(1, 2, 2, 2)
    assert dida_terms(DidaConfig(), InstanceBank(cfg), emb, emb, logits) == {}
    zero = dida_terms(cfg, InstanceBank(cfg), emb.detach(), emb, logits)["dida/instance"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_dida_memory_stays_at_decoder_resolution():
    """The largest similarity tensor is [B, K, H/4, W/4] (or a chunk of it), never [B, K, H, W]."""
    cfg = DidaConfig(enabled=True, bank_size=20, dim=8, num_classes=4, chunk=16)
    bank = InstanceBank(cfg)
    bank.feats, bank.filled[:] = torch.rand(20, 8), True
    emb = torch.rand(1, 8, 8, 8, requires_grad=True)
    biggest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dida_terms(cfg, bank, torch.rand(1, 8, 8, 8), emb, torch.rand(1, 4, 8, 8),
                   torch.ones(1, 32, 32))
    # saved for backward: at most a 16-pixel chunk of K similarities (320) or the embedding itself (512);
    # unchunked 1/4-resolution similarities would be 20 x 64 = 1280, full resolution 20 x 1024
    assert 0 < biggest <= max(20 * 16, 8 * 64)
    biggest = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dida_terms(DidaConfig(**{**cfg.__dict__, "chunk": 0}), bank, torch.rand(1, 8, 8, 8), emb,
                   torch.rand(1, 4, 8, 8), torch.ones(1, 32, 32))
    assert biggest == 20 * 64  # unchunked: the [B, K, H/4, W/4] map, still not full resolution


def test_head_returns_its_embedding_without_changing_the_logits():
    from train.models.head import DAFormerHead

    torch.manual_seed(0)
    head = DAFormerHead((8, 8, 8, 8), num_classes=3, embed_dim=16, channels=16).eval()
    feats = [torch.randn(1, 8, 16 // 2**i, 16 // 2**i) for i in range(4)]
    logits, emb = head(feats, dropout=False, return_embedding=True)
    assert torch.equal(logits, head(feats, dropout=False))
    assert torch.equal(emb, head.decode(feats)) and emb.shape == (1, 16, 16, 16)
    assert bool((emb >= 0).all())  # after a ReLU: DIDA's sum-normalised dot products stay non-negative
