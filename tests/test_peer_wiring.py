"""The peer components wired into a DACS step as their contracts say (benchmarks/bench_components.py's
``peer_step``, on the real CMDA model at toy size): every loss term appears, is finite, and a run
resumed from saved model/optimiser/component states reproduces the uninterrupted one exactly."""

from __future__ import annotations

import copy

import torch

from benchmarks.bench_components import Components, peer_step, synthetic_batch
from train.config import LossConfig
from train.models import CMDAModel
from train.schedule import ema_update

HEAD = 32
CROP = 128  # five stride-2 discriminator blocks need >= 32 px of 1/4-resolution logits


def _setup():
    torch.manual_seed(0)
    model = CMDAModel("mit_b0", head_channels=HEAD).train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    comp = Components("all", HEAD, torch.device("cpu"))
    comp.dsr.bank_classes = tuple(range(19))  # synthetic labels: make the tail bank see pixels
    comp.bank.classes = comp.dsr.bank_classes
    gen = torch.Generator().manual_seed(1)
    batches = [synthetic_batch(1, CROP, torch.device("cpu"), gen) for _ in range(3)]
    return model, teacher, opt, comp, batches


def _iterate(model, teacher, opt, comp, batches, its):
    out = []
    for it in its:
        torch.manual_seed(1000 + it)  # the loop re-seeds every iteration
        ema_update(teacher, model, 0.9)
        terms, extra = peer_step(model, teacher, opt, batches[it], comp, it, LossConfig())
        out.append(({k: float(v.detach()) for k, v in terms.items()}, extra))
    return out


def _state(model, teacher, opt, comp):
    return copy.deepcopy({"model": model.state_dict(), "teacher": teacher.state_dict(), "opt": opt.state_dict(),
                          "dsr_bank": comp.bank.state_dict(), "dida_bank": comp.inst.state_dict(),
                          "adversary": comp.adversary.state_dict()})


def test_all_components_step_and_resume_exactly():
    model, teacher, opt, comp, batches = _setup()
    first = _iterate(model, teacher, opt, comp, batches, [0, 1])
    terms, extra = first[0]
    for name in ("dsr/proto", "dsr/proto_mix", "dida/instance", "adv/generator"):
        assert name in terms and torch.isfinite(torch.tensor(terms[name])), name
    assert set(extra) == {"adv/d_source", "adv/d_target"}
    assert comp.bank.n_entries == 2 and comp.inst.n_filled > 0
    saved = _state(model, teacher, opt, comp)
    straight = _iterate(model, teacher, opt, comp, batches, [2])

    model2, teacher2, opt2, comp2, _ = _setup()
    model2.load_state_dict(saved["model"])
    teacher2.load_state_dict(saved["teacher"])
    opt2.load_state_dict(saved["opt"])
    comp2.bank.load_state_dict(saved["dsr_bank"])
    comp2.inst.load_state_dict(saved["dida_bank"])
    comp2.adversary.load_state_dict(saved["adversary"])
    resumed = _iterate(model2, teacher2, opt2, comp2, batches, [2])
    assert resumed == straight
