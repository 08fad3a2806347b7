"""Gradient accumulation (exact against the full batch), MIC's masked pass, adaptive thresholds in the loop."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from benchmarks.bench_train import fake_batch
from pipeline.errors import InputError
from tests.steps import step_grads
from tests.test_train import _losses, tiny_config
from train.checkpoints.files import load_checkpoint
from train.config import PRESETS, TrainConfig, apply_preset, apply_variant, set_value, validate
from train.engine import loop as dacs
from train.models import CMDAModel
from train.uda.components.mic import masked_inputs
from train.uda.targets import EventTarget


def _tiny(variant: str = "baseline") -> tuple[TrainConfig, CMDAModel, CMDAModel]:
    cfg = apply_variant(TrainConfig(), variant)
    cfg.run.channels_last = False
    torch.manual_seed(0)
    model = CMDAModel("mit_b0", head_channels=16, drop_path=0.0, fusion_drop_path=0.0).eval()  # BN fixed, no dropout
    teacher = copy.deepcopy(model).requires_grad_(False)
    return cfg, model, teacher


def _grads_after_step(cfg, model, teacher, batch, accum: int, **kw):
    cfg = copy.deepcopy(cfg)
    cfg.run.accum = accum
    return step_grads(cfg, model, teacher, batch, **kw)


@pytest.mark.parametrize("variant", ["baseline", "rgb_st+event_s_rgb_t"])
def test_accum_2_gives_the_full_batch_gradients(variant):
    cfg, model, teacher = _tiny(variant)
    batch = fake_batch(2, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    g1, t1, e1 = _grads_after_step(cfg, model, teacher, batch, 1)
    g2, t2, e2 = _grads_after_step(cfg, model, teacher, batch, 2)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert e1 == e2  # pseudo weight and the teacher's draw: the same full-batch teacher pass
    assert set(t1) == set(t2)
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], atol=1e-6, rtol=1e-5)


def test_accum_must_divide_the_batch_and_presets_choose_it():
    cfg = TrainConfig()
    cfg.run.accum = 3
    with pytest.raises(InputError, match=r"run\.accum"):
        validate(cfg)
    for name in ("24gb", "16gb", "11gb"):
        c = apply_preset(TrainConfig(), name)
        validate(c)
        assert c.run.accum == 2 and c.run.batch == 2 and c.model.backbone == "mit_b5" and c.data.crop == 512
    assert PRESETS["16gb"]["model.checkpoint"] is True


def test_resume_in_the_middle_of_an_accumulated_run_is_exact(training_tree, tmp_path):
    dacs.train(tiny_config(training_tree, tmp_path / "full", iters=4, accum=2))
    full = _losses(tmp_path / "full" / "metrics.jsonl")
    dacs.train(tiny_config(training_tree, tmp_path / "resumed", iters=4, accum=2),
               resume=tmp_path / "full" / "checkpoints" / "iter_000002.pt")
    resumed = _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert resumed[3] == full[3] and resumed[4] == full[4]


# ---------------------------------------------------------------------- MIC
def test_mic_mask_hides_the_ratio_and_events_follow_the_setting():
    cfg = TrainConfig().mic
    torch.manual_seed(0)
    img, evt = torch.randn(4, 3, 512, 512), torch.randn(4, 3, 512, 512)
    dirs = ["rightdown"] * 4
    same = masked_inputs(img, evt, cfg, dirs, lambda x: x)
    hidden = 1 - float(same.image_mask.mean())
    assert abs(hidden - 0.7) <= 0.05
    assert torch.equal(same.events_mask, same.image_mask)
    assert torch.equal(same.events, evt * same.image_mask) and torch.equal(same.image, img * same.image_mask)
    cfg.events = "none"
    none = masked_inputs(img, evt, cfg, dirs, lambda x: x)
    assert none.events_mask is None and torch.equal(none.events, evt)
    cfg.events = "independent"
    ind = masked_inputs(img, evt, cfg, dirs, lambda x: x)
    assert not torch.equal(ind.events_mask, ind.image_mask)


def test_mic_pass_trains_the_student_only_and_leaves_the_teacher_unmasked():
    cfg, model, teacher = _tiny()
    cfg.dacs.pseudo_threshold = 0.0  # every pixel confident: pseudo weight 1, so the MIC term counts
    batch = fake_batch(2, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    seen = []
    teacher.backbone_image.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    before = {k: v.clone() for k, v in teacher.state_dict().items() if v.dtype.is_floating_point}
    g_off, _, e_off = _grads_after_step(cfg, model, teacher, batch, 1)
    cfg.mic.enabled = True
    seen.clear()
    g_on, t_on, e_on = _grads_after_step(cfg, model, teacher, batch, 1)
    assert {"mic/fusion", "mic/image", "mic/isr", "mic/events"} <= set(t_on)
    assert e_on["pseudo/weight"] == e_off["pseudo/weight"] == 1.0  # the same teacher pass and weight
    assert any(not torch.equal(a, b) for a, b in zip(g_on, g_off, strict=True))  # MIC reaches the student
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)
    x = EventTarget(None, torch.device("cpu"), torch.contiguous_format).inputs(batch)
    assert len(seen) == 1 and torch.equal(seen[0], x["target_image"])  # the teacher saw the unmasked target


def test_mic_and_adaptive_settings_parse():
    cfg = TrainConfig()
    set_value(cfg, "mic.lambda", "0.5")
    set_value(cfg, "dacs.pseudo_threshold", "adaptive")
    assert cfg.mic.lambda_ == 0.5 and cfg.dacs.pseudo_mode == "adaptive" and cfg.dacs.pseudo_threshold == 0.968
    for key, bad in (("mic.ratio", "1.5"), ("mic.events", "some"), ("mic.block", "0")):
        c = TrainConfig()
        set_value(c, key, bad)
        with pytest.raises(InputError, match=re.escape(key)):
            validate(c)


def test_adaptive_thresholds_in_the_loop_resume_exactly(training_tree, tmp_path):
    def cfg(out):
        c = tiny_config(training_tree, out, iters=4)
        c.dacs.pseudo_mode = "adaptive"
        c.mic.enabled, c.mic.block = True, 8  # 32 px at crop 512 is 4 px at 64; 8 keeps a few blocks visible
        return c

    dacs.train(cfg(tmp_path / "full"))
    state = load_checkpoint(tmp_path / "full" / "checkpoints" / "iter_000002.pt")
    assert state["adaptive_threshold"]["hist"].sum() > 0
    dacs.train(cfg(tmp_path / "resumed"), resume=tmp_path / "full" / "checkpoints" / "iter_000002.pt")
    full, resumed = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert resumed[4] == full[4] and "loss/mic/fusion" in full[4]
