"""The peer components in the real step (:func:`train.uda.step.iteration`, the real CMDA model at toy size):
every loss term appears and is finite, and a run resumed from saved model/optimiser/component states
reproduces the uninterrupted one exactly."""

from __future__ import annotations

import copy

import torch

from benchmarks.bench_train import fake_batch
from train.config import TrainConfig, apply_layers, validate
from train.models import CMDAModel
from train.uda.method import build_method
from train.uda.step import Networks, iteration

HEAD = 32
CROP = 128  # five stride-2 discriminator blocks need >= 32 px of 1/4-resolution logits


def _setup():
    cfg = TrainConfig()
    cfg.run.channels_last, cfg.data.crop, cfg.run.iters = False, CROP, 10
    apply_layers(cfg, sets=["dsr.enabled=true", "dida.enabled=true", "adv.enabled=true", f"dida.dim={HEAD}",
                            f"model.head_channels={HEAD}", "dsr.bank_classes=" + ",".join(map(str, range(19))),
                            "dsr.paste_every=1"])
    validate(cfg)
    torch.manual_seed(0)
    model = CMDAModel("mit_b0", head_channels=HEAD).train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    method = build_method(cfg, torch.device("cpu"), None, None)
    gen = torch.Generator().manual_seed(1)
    batches = [fake_batch(1, CROP, torch.device("cpu"), gen) for _ in range(3)]
    return cfg, Networks(model, model, teacher, opt), method, batches


def _iterate(cfg, nets, method, batches, its):
    out = []
    for it in its:
        terms, metrics = iteration(cfg, method, nets, batches[it], it, seed=1000)
        out.append(({k: float(v.detach()) for k, v in terms.items()}, metrics))
    return out


def _state(nets, method):
    return copy.deepcopy({"model": nets.student.state_dict(), "teacher": nets.teacher.state_dict(),
                          "opt": nets.optimizer.state_dict(),
                          **{p.state_key: p.state_dict() for p in method.stateful()}})


def test_all_components_step_and_resume_exactly():
    cfg, nets, method, batches = _setup()
    first = _iterate(cfg, nets, method, batches, [0, 1])
    terms, metrics = first[1]
    for name in ("dsr/proto", "dsr/proto_mix", "dida/instance", "adv/generator"):
        assert name in terms and torch.isfinite(torch.tensor(terms[name])), name
    assert {"adv/d_source", "adv/d_target", "dsr/pasted", "dida/bank_filled"} <= set(metrics)
    assert metrics["dsr/bank_entries"] == 2 and metrics["dida/bank_filled"] > 0
    saved = _state(nets, method)
    straight = _iterate(cfg, nets, method, batches, [2])

    cfg2, nets2, method2, _ = _setup()
    nets2.student.load_state_dict(saved["model"])
    nets2.teacher.load_state_dict(saved["teacher"])
    nets2.optimizer.load_state_dict(saved["opt"])
    for part in method2.stateful():
        part.load_state_dict(saved[part.state_key])
    resumed = _iterate(cfg2, nets2, method2, batches, [2])
    assert resumed == straight
