"""The peer components (dsr, dida, adv) in the training loop: settings, short runs on the sample tree whose
terms reach metrics.jsonl, exact resume with the components' state, exact gradient accumulation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from benchmarks.bench_train import fake_batch
from pipeline.errors import InputError
from tests.steps import step_grads
from tests.test_accum_mic import _tiny
from tests.test_train import _losses, assert_same_state, tiny_config
from train.checkpoints.files import load_checkpoint
from train.config import TrainConfig, apply_layers, validate
from train.engine import loop as dacs
from train.uda.components.adversarial import OutputDiscriminator
from train.uda.components.dida import Dida
from train.uda.components.dsr import Dsrnss
from train.uda.method import build_method

# Road and sky are in every crop of the test tree's source images (its tail classes may not be).
EVERYWHERE = "0,10"


def _records(path: Path) -> dict[int, dict]:
    return {r["iter"]: r for r in map(json.loads, path.read_text().splitlines()) if "loss/total" in r}


def _peer_config(training_tree: Path, out: Path | None, which: tuple[str, ...], iters: int = 4,
                 more: tuple[str, ...] = ()) -> TrainConfig:
    cfg = tiny_config(training_tree, out, iters=iters)
    sets = [f"{name}.enabled=true" for name in which] + list(more)
    if "dsr" in which:  # paste at iterations 0 and 2 (2 = right after the resume point)
        sets += [f"dsr.bank_classes={EVERYWHERE}", "dsr.paste_every=2"]
    if "dida" in which:  # the tiny head is 16 wide; EMA every iteration so resume must restore it
        sets += [f"dida.dim={cfg.model.head_channels}", "dida.update_every=1"]
    if "adv" in which:  # crop 64 -> 16 px of logits; x2 gives the discriminator's 32
        sets += ["adv.upsample=2"]
    return validate(apply_layers(cfg, sets=sets))


EXPECTED = {
    "dsr": ({"loss/dsr/proto", "loss/dsr/proto_mix"}, {"dsr/bank_entries", "dsr/pasted"}),
    "dida": ({"loss/dida/instance"}, {"dida/bank_filled"}),
    "adv": ({"loss/adv/generator"}, {"adv/d_source", "adv/d_target", "adv/lr"}),
}
STATE = {"dsr": "dsr_bank", "dida": "dida_bank", "adv": "adversary"}


def _assert_same_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _run_and_resume(training_tree: Path, tmp_path: Path, which: tuple[str, ...],
                    more: tuple[str, ...] = ()) -> dict[int, dict]:
    """Full 4-iteration run, and the same run resumed from its iteration-2 checkpoint: every logged value,
    the weights, the optimiser and each component's state end equal. Returns the full run's records."""
    dacs.train(_peer_config(training_tree, tmp_path / "full", which, more=more))
    dacs.train(_peer_config(training_tree, tmp_path / "resumed", which, more=more),
               resume=tmp_path / "full" / "checkpoints" / "iter_000002.pt")
    full, resumed = _records(tmp_path / "full" / "metrics.jsonl"), _records(tmp_path / "resumed" / "metrics.jsonl")
    assert set(resumed) == {3, 4}
    for it in (3, 4):
        assert {k: v for k, v in resumed[it].items() if k != "time/iter_s"} == \
               {k: v for k, v in full[it].items() if k != "time/iter_s"}, it
    a = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "iter_000004.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "iter_000004.pt")
    assert_same_state(a, b)
    for name in which:
        assert STATE[name] in a, name
        _assert_same_tree(a[STATE[name]], b[STATE[name]], STATE[name])
    return full


@pytest.mark.parametrize("which", ["dsr", "dida", "adv"])
def test_component_run_logs_its_terms_and_resumes_exactly(training_tree, tmp_path, which):
    full = _run_and_resume(training_tree, tmp_path, (which,))
    terms, extras = EXPECTED[which]
    for it in (1, 2, 3, 4):
        assert terms <= set(full[it]) and extras <= set(full[it]), (it, set(full[it]))
        assert all(torch.isfinite(torch.tensor(full[it][k])) for k in terms | extras)
    others = {k for name, (t, e) in EXPECTED.items() if name != which for k in t | e}
    assert not others & set(full[4])  # the other components stay out
    if which == "dsr":
        assert full[1]["dsr/pasted"] > 0 and full[2]["dsr/pasted"] == 0  # it 0 pastes, it 1 does not
        assert full[4]["dsr/bank_entries"] == 3  # capacity 3, every batch has road and sky
    if which == "dida":
        assert full[1]["loss/dida/instance"] == 0  # the bank is empty during the first iteration's loss
        assert full[2]["loss/dida/instance"] > 0 and full[4]["dida/bank_filled"] > 0
    if which == "adv":
        assert full[1]["adv/lr"] == pytest.approx(1e-4) and full[4]["adv/lr"] < full[1]["adv/lr"]


def test_adv_on_an_extra_target_pass_resumes_exactly(training_tree, tmp_path):
    full = _run_and_resume(training_tree, tmp_path, ("adv",), more=("adv.input=target",))
    assert EXPECTED["adv"][0] | EXPECTED["adv"][1] <= set(full[4]) and full[4]["loss/adv/generator"] > 0


def test_all_three_together_resume_exactly(training_tree, tmp_path):
    full = _run_and_resume(training_tree, tmp_path, ("dsr", "dida", "adv"))
    for terms, extras in EXPECTED.values():
        assert terms | extras <= set(full[4])


def test_baseline_is_untouched_when_the_components_are_off(training_tree, tmp_path):
    """Off (the default) they add no term, no metric, no checkpoint entry, and no random draw: the run's
    losses equal a run with the components' settings changed but still switched off."""
    dacs.train(tiny_config(training_tree, tmp_path / "a", iters=2))
    cfg = tiny_config(training_tree, tmp_path / "b", iters=2)
    apply_layers(cfg, sets=["dsr.paste_every=1", "dida.weight=3", "adv.weight=1"])
    dacs.train(cfg)
    a, b = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    assert _losses(tmp_path / "a" / "metrics.jsonl") == _losses(tmp_path / "b" / "metrics.jsonl")
    assert not any(k.split("/")[0] in ("dsr", "dida", "adv") or "/dsr/" in k or "/dida/" in k or "/adv/" in k
                   for k in a[2])
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "iter_000002.pt")
    assert not set(STATE.values()) & set(state) and set(a) == set(b)


@pytest.mark.parametrize("adv_input", ["mixed", "target"])
def test_accum_2_with_every_component_gives_the_full_batch_step(adv_input):
    """Gradients, terms and the discriminator after its step equal the accum=1 step's (BN fixed, no dropout)."""
    cfg, model, teacher = _tiny()
    apply_layers(cfg, sets=["dsr.enabled=true", "dida.enabled=true", "adv.enabled=true", "dida.dim=16",
                            f"dsr.bank_classes={EVERYWHERE}", "adv.upsample=2", f"adv.input={adv_input}"])
    batch = fake_batch(2, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    method = build_method(cfg, torch.device("cpu"), None, None)
    dsr, dida = (next(c for c in method.components if isinstance(c, k)) for k in (Dsrnss, Dida))
    gen = torch.Generator().manual_seed(1)  # banks with entries, so every term is non-zero
    labels = torch.randint(0, 19, (2, 64, 64), generator=gen)
    dida.bank.update(torch.rand(2, 16, 16, 16, generator=gen), labels, 0)
    corner = torch.full((2, 64, 64), 255)
    corner[:, :16, :16] = 0  # a bank entry covering one corner: the rest stays target
    dsr.bank.push(torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen), corner)
    results = []
    for accum in (1, 2):
        c, m = copy.deepcopy(cfg), copy.deepcopy(method)
        c.run.accum = accum
        grads, terms, extra = step_grads(c, model, teacher, batch, it=0, method=m)
        p = {type(k): k for k in m.components}
        results.append((grads, terms, extra, p))
    (g1, t1, e1, p1), (g2, t2, e2, p2) = results
    assert {"dsr/proto", "dsr/proto_mix", "dida/instance", "adv/generator"} <= set(t1)
    assert float(t1["dida/instance"].detach()) > 0
    assert set(t1) == set(t2) and e1.keys() == e2.keys() and e1["dsr/pasted"] > 0
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], atol=1e-6, rtol=1e-5)
    for k in e1:
        assert e1[k] == pytest.approx(e2[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    adv1, adv2 = p1[OutputDiscriminator].adversary, p2[OutputDiscriminator].adversary
    for a, b in zip(adv1.disc.parameters(), adv2.disc.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1[Dida].bank.feats, p2[Dida].bank.feats)


@pytest.mark.parametrize(("sets", "match"), [
    (["run.source_only=true", "dida.enabled=true"], r"dida\.enabled needs the DACS teacher"),
    (["dida.enabled=true", "model.head_channels=64"], r"dida\.dim must be model\.head_channels \(64\)"),
    (["adv.enabled=true", "data.crop=64"], r"adv\.upsample must be large enough .*crop >= 128"),
    (["adv.enabled=true", "adv.input=plain"], r"adv\.input must be mixed .* or target"),
    (["dsr.enabled=true", "dsr.proto_features=events"], r"dsr\.proto_features must be fusion or image"),
    (["dsr.enabled=true", "dsr.bank_classes=3,19"], r"dsr\.bank_classes must be class ids in \[0, 19\)"),
])
def test_peer_settings_are_checked_with_readable_errors(sets, match):
    cfg = apply_layers(TrainConfig(), sets=sets)
    with pytest.raises(InputError, match=match):
        validate(cfg)


def test_peer_settings_switch_on_with_set_and_keep_the_issue_defaults():
    cfg = validate(apply_layers(TrainConfig(), sets=["dsr.enabled=true", "dida.enabled=true", "adv.enabled=true"]))
    assert cfg.dsr.enabled and cfg.dida.enabled and cfg.adv.enabled
    assert cfg.dsr.grouped_mix and cfg.dsr.bank and cfg.dsr.bank_classes == (12, 14, 15, 17, 18)
    assert cfg.dsr.paste_every == 5 and cfg.dsr.proto_weight == 0.1 and cfg.dsr.proto_features == "fusion"
    assert (cfg.dida.bank_size, cfg.dida.dim, cfg.dida.momentum, cfg.dida.update_every, cfg.dida.weight) == \
           (300, 256, 0.999, 50, 0.5)
    assert cfg.adv.weight == 1e-3 and cfg.adv.light
    off = TrainConfig()
    assert not (off.dsr.enabled or off.dida.enabled or off.adv.enabled)
