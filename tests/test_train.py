"""The training loop: loss-term gradient routing per variant, short runs, resume, divergence, stop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import InputError
from train.checkpoints.files import load_checkpoint
from train.config import VARIANTS, TrainConfig, apply_variant
from train.engine import loop as dacs
from train.models import CMDAModel
from train.uda import step as step_module
from train.uda.losses import source_feature_terms, target_feature_terms

# ---------------------------------------------------------------------- gradient routing


def _grad_parts(model: CMDAModel) -> set[str]:
    parts = set()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts.add(name.split(".")[0])
    return parts


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return CMDAModel("mit_b0", head_channels=16)


EXPECTED = {
    # term: (parts of the SOURCE-pass model with gradient, parts of the MIXED-pass model with gradient)
    "rgb_event_src": ({"backbone_image", "backbone_events"}, set()),
    "fusion_st": (set(), {"backbone_image", "backbone_events", "fusion_module"}),
    "rgb_st": (set(), {"backbone_image"}),
    "event_s_rgb_t": (set(), {"backbone_image"}),
    "event_st": (set(), {"backbone_events"}),
}


@pytest.mark.parametrize("term", list(EXPECTED))
def test_each_l2_term_sends_gradient_where_the_study_says(tiny_models, term):
    cfg = TrainConfig().loss
    setattr(cfg, term, 1.0)
    src_model, mix_model = copy.deepcopy(tiny_models), copy.deepcopy(tiny_models)
    x = torch.randn(2, 3, 64, 64)
    src = src_model(image=x, events=x.flip(-1), isr=x.flip(-2))
    mixed = mix_model(image=x.flip(-1), events=x, isr=x)
    terms = source_feature_terms(src.features, cfg)
    # the loop keeps detached deepest source features for the target-side terms
    keep = {k: src.features[k][-1].detach() for k in ("image", "events", "fusion")}
    terms.update(target_feature_terms(mixed.features, keep, cfg))
    assert list(terms) == [f"l2/{term}"]
    terms[f"l2/{term}"].backward()
    want_src, want_mix = EXPECTED[term]
    assert _grad_parts(src_model) == want_src
    assert _grad_parts(mix_model) == want_mix


def test_zero_lambdas_add_no_terms():
    cfg = TrainConfig().loss
    feats = {k: [torch.zeros(1, 2, 2, 2)] for k in ("image", "events", "fusion")}
    assert source_feature_terms(feats, cfg) == {}
    assert target_feature_terms(feats, {k: v[-1] for k, v in feats.items()}, cfg) == {}


def test_variant_presets_match_the_study():
    for name, lambdas in VARIANTS.items():
        cfg = apply_variant(TrainConfig(), name)
        for key in ("rgb_event_src", "fusion_st", "rgb_st", "event_s_rgb_t", "event_st"):
            assert getattr(cfg.loss, key) == lambdas.get(key, 0.0)
    assert apply_variant(TrainConfig(), "rgb_st+event_s_rgb_t").loss.event_s_rgb_t == 0.05
    assert apply_variant(TrainConfig(), "masked_event").loss.mask_events > 0
    with pytest.raises(InputError, match="unknown variant"):
        apply_variant(TrainConfig(), "nope")


# ---------------------------------------------------------------------- short runs on a tiny tree


def tiny_config(datasets: Path, out: Path | None, variant: str = "baseline", iters: int = 4, **run) -> TrainConfig:
    cfg = apply_variant(TrainConfig(), variant)
    cfg.model.backbone = "mit_b0"
    cfg.model.head_channels = 16
    cfg.model.pretrained = cfg.model.cyclegan = "none"
    cfg.data.datasets = datasets
    cfg.data.crop, cfg.data.source_resize, cfg.data.target_crop = 64, (128, 64), 256
    cfg.data.test_rows, cfg.data.workers = 64, 0
    cfg.rcs.min_pixels = 50
    cfg.run.iters, cfg.run.log_every, cfg.run.eval_every, cfg.run.ckpt_every = iters, 1, iters, 2
    cfg.run.eval_max = 1
    cfg.run.out = out
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _losses(path: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["iter"]] = {k: v for k, v in rec.items() if k.startswith("loss/")}
    return out


@pytest.mark.parametrize("variant", ["baseline", "rgb_event_src+fusion_st", "masked_event"])
def test_short_run_writes_everything(training_tree, tmp_path, variant):
    res = dacs.train(tiny_config(training_tree, tmp_path / "run", variant, iters=2))
    run = tmp_path / "run"
    assert (run / "config.json").exists() and (run / "loss_curve.png").exists()
    assert (run / "checkpoints" / "iter_000002.pt").exists() and any((run / "tensorboard").iterdir())
    losses = _losses(run / "metrics.jsonl")
    assert set(losses) == {1, 2}
    names = set(losses[2])
    assert {"loss/src/fusion", "loss/mix/fusion", "loss/mix/isr"} <= names
    lambdas = VARIANTS[variant]
    for key in ("rgb_event_src", "fusion_st", "rgb_st", "event_s_rgb_t"):
        assert (f"loss/l2/{key}" in names) == (key in lambdas)
    assert 0 <= res["eval"]["mIoU"] <= 1


def test_source_only_has_no_target_terms(training_tree, tmp_path):
    cfg = tiny_config(training_tree, tmp_path / "run", iters=1, source_only=True)
    dacs.train(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_000001.pt")
    assert state["teacher"] is None and state["source_only"]
    assert not any(k.startswith("loss/mix") for k in _losses(tmp_path / "run" / "metrics.jsonl")[1])


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same run state: iteration, student, teacher, optimiser."""
    assert a["iteration"] == b["iteration"]
    for key in ("student", "teacher"):
        assert (a[key] is None) == (b[key] is None)
        for name, t in (a[key] or {}).items():
            assert torch.equal(t, b[key][name]), (a["iteration"], key, name)
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k, t in oa[i].items():
            assert torch.equal(t, ob[i][k]), (a["iteration"], "optimizer", i, k)


def test_resume_reproduces_the_uninterrupted_run_bitwise(training_tree, tmp_path):
    """On CPU a resumed run is the uninterrupted one bit for bit: same losses, same final weights,
    teacher and optimiser state (batches and augmentations are drawn from (seed, iteration))."""
    dacs.train(tiny_config(training_tree, tmp_path / "full", iters=4))
    full = _losses(tmp_path / "full" / "metrics.jsonl")
    dacs.train(tiny_config(training_tree, tmp_path / "resumed", iters=4),
               resume=tmp_path / "full" / "checkpoints" / "iter_000002.pt")
    resumed = _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert set(resumed) == {3, 4}
    for it in (3, 4):
        assert resumed[it] == full[it], it
    assert_same_state(load_checkpoint(tmp_path / "resumed" / "checkpoints" / "iter_000004.pt"),
                      load_checkpoint(tmp_path / "full" / "checkpoints" / "iter_000004.pt"))


def test_divergence_stops_with_the_term_and_keeps_the_last_checkpoint(training_tree, tmp_path, monkeypatch):
    real_pass = step_module.mixed_pass

    def poisoned(*a, **k):  # the third iteration's mixed pass returns a NaN term (after its backward)
        terms = real_pass(*a, **k)
        if poisoned.calls == 2:
            terms["mix/events"] = terms["mix/events"] * float("nan")
        poisoned.calls += 1
        return terms

    poisoned.calls = 0
    monkeypatch.setattr(step_module, "mixed_pass", poisoned)
    with pytest.raises(InputError, match=r"iteration 3: loss term 'mix/events' is nan.*iter_000002\.pt"):
        dacs.train(tiny_config(training_tree, tmp_path / "run", iters=4))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["iter_000002.pt"]


def sigterm_after_each_step(monkeypatch) -> object:
    """Make every training step end with a SIGTERM (what `kill` or a cluster scheduler sends); returns
    the real step, to put back."""
    import signal

    real_step = dacs.iteration

    def step_then_sigterm(cfg, batch, *a, **k):
        out = real_step(cfg, batch, *a, **k)
        signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(dacs, "iteration", step_then_sigterm)
    return real_step


def test_stop_request_saves_a_resumable_checkpoint(training_tree, tmp_path, monkeypatch):
    real_step = sigterm_after_each_step(monkeypatch)
    res = dacs.train(tiny_config(training_tree, tmp_path / "run", iters=4))
    assert res["stopped"] == 1
    assert (tmp_path / "run" / "checkpoints" / "iter_000001.pt").exists()
    monkeypatch.setattr(dacs, "iteration", real_step)
    first = tmp_path / "run" / "checkpoints" / "iter_000001.pt"
    res = dacs.train(tiny_config(training_tree, None, iters=4), resume=first)
    assert "stopped" not in res and (tmp_path / "run" / "checkpoints" / "iter_000004.pt").exists()


def test_resume_refuses_another_backbone_or_variant(training_tree, tmp_path):
    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=2))
    other = tiny_config(training_tree, None, "fusion_st", iters=2)
    with pytest.raises(InputError, match=r'settings differ.*run.variant: "baseline" -> "fusion_st"'):
        dacs.train(other, resume=tmp_path / "run")
    with pytest.raises(InputError, match="from variant baseline, this run is fusion_st"):
        dacs.train(other, resume=tmp_path / "run", override=True)  # weights of another variant: never
    other = tiny_config(training_tree, None, iters=2)
    other.model.backbone = "mit_b1"
    with pytest.raises(InputError, match="backbone mit_b0, this run uses mit_b1"):
        dacs.train(other, resume=tmp_path / "run", override=True)


def test_same_seed_same_run(training_tree, tmp_path):
    """Five iterations (warmup, EMA, pseudo-labels and ClassMix all under way) twice with one seed:
    every logged loss and the final weights are identical; another seed changes them."""
    dacs.train(tiny_config(training_tree, tmp_path / "a", iters=5, ckpt_every=5))
    dacs.train(tiny_config(training_tree, tmp_path / "b", iters=5, ckpt_every=5))
    a = _losses(tmp_path / "a" / "metrics.jsonl")
    assert set(a) == {1, 2, 3, 4, 5} and a == _losses(tmp_path / "b" / "metrics.jsonl")
    assert_same_state(load_checkpoint(tmp_path / "a" / "checkpoints" / "iter_000005.pt"),
                      load_checkpoint(tmp_path / "b" / "checkpoints" / "iter_000005.pt"))
    dacs.train(tiny_config(training_tree, tmp_path / "c", iters=1, seed=1))
    assert _losses(tmp_path / "c" / "metrics.jsonl")[1] != a[1]


def test_the_final_line_is_the_quickstarts_documented_form():
    """README and docs/quickstart.md show `final night mIoU (fusion): 13.09`; DSEC-Semantic says which mean."""
    import re

    from cli.train import final_score_line

    assert final_score_line("dsec", 0.130949) == "final night mIoU (fusion): 13.09"
    assert final_score_line("darkzurich", 0.5) == "final night mIoU (fusion): 50.00"
    assert final_score_line("dsec-semantic", 0.2045).endswith("cmda's mean over annotated classes): 20.45")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.search(r"^final night mIoU \(fusion\): \d+\.\d\d$", readme, re.M)
