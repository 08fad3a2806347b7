"""CMDA's recipe as CMDA's code runs it (XiaRho/CMDA at 9d25129): colour jitter, ClassMix, Cityscapes downscale,
pseudo-weight rows, CUDA precision switches, and the baseline config's values."""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from train.config import TrainConfig
from train.data.loaders import resize_pil_bilinear, resize_pil_nearest
from train.engine.loop import backend_flags
from train.uda.losses import ignore_rows, pseudo_labels
from train.uda.mixing import (
    JitterParams,
    class_masks,
    cmda_jitter,
    color_jitter,
    draw_jitter,
)


# ---------------------------------------------------------------------- colour jitter, NumPy reference
def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """[3, H, W] RGB in [0, 1] -> HSV, hue in radians [0, 2 pi) (the textbook formulas, by hand)."""
    r, g, b = x
    v = x.max(0)
    delta = v - x.min(0)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0)
    d = np.where(delta > 0, delta, 1)
    h = np.where(r == v, (g - b) / d, np.where(g == v, 2 + (b - r) / d, 4 + (r - g) / d))
    h = np.where(delta > 0, (h / 6) % 1, 0)
    return np.stack([2 * np.pi * h, s, v])


def _hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[1:]):
        h, s, v = x[(slice(None), *idx)]
        out[(slice(None), *idx)] = colorsys.hsv_to_rgb(h / (2 * np.pi), s, v)
    return out


def _np_op(op: int, x: np.ndarray, f: float) -> np.ndarray:
    """kornia 0.5.8's ColorJitter as CMDA pins it: operation ``op`` with factor ``f`` on one [3, H, W] image."""
    if op == 0:
        return np.clip(x + (f - 1), 0, 1)
    if op == 1:
        return np.clip(x * f, 0, 1)
    h, s, v = _rgb_to_hsv(x)
    if op == 2:
        s = np.clip(s * f, 0, 1)
    else:
        h = np.mod(h + f * 2 * np.pi, 2 * np.pi)
    return np.clip(_hsv_to_rgb(np.stack([h, s, v])), 0, 1)


def _images(n: int = 2, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    x[:, :, 0, 0] = 0.0  # black
    x[:, :, 0, 1] = 1.0  # white
    x[:, :, 0, 2] = 0.5  # grey: no hue
    return x.float()


def _params(b: float, c: float, s: float, h: float, order: list[int], n: int = 2) -> JitterParams:
    full = lambda v: torch.full((n,), v)  # noqa: E731
    return JitterParams(full(b), full(c), full(s), full(h), torch.tensor([order] * n))


@pytest.mark.parametrize(("op", "factor"), [(0, 1.17), (0, 0.83), (1, 1.19), (1, 0.81), (2, 1.2), (2, 0.8),
                                            (3, 0.2), (3, -0.2), (3, 0.05)])
def test_each_jitter_operation_matches_the_formula(op, factor):
    x = _images()
    neutral = [1.0, 1.0, 1.0, 0.0]
    neutral[op] = factor
    params = JitterParams(*(torch.full((2,), v) for v in neutral), torch.tensor([[op, 0, 1, 2]] * 2)[:, :1])
    out = cmda_jitter(x, params).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], _np_op(op, x[i].numpy().astype(np.float64), factor), atol=1e-5)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]])
def test_jitter_in_sequence_matches_the_formulas(order):
    x = _images(seed=1)
    factors = (1.12, 0.86, 1.15, -0.13)
    out = cmda_jitter(x, _params(*factors, order)).numpy()
    for i in range(2):
        ref = x[i].numpy().astype(np.float64)
        for op in order:
            ref = _np_op(op, ref, factors[op])
        np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_jitter_factors_and_order_are_per_sample():
    x = _images(n=2, seed=2)
    params = JitterParams(torch.tensor([1.2, 0.9]), torch.tensor([0.8, 1.1]), torch.tensor([1.0, 1.2]),
                          torch.tensor([0.1, -0.05]), torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2]]))
    out = cmda_jitter(x, params).numpy()
    for i in range(2):
        ref = x[i].numpy().astype(np.float64)
        for op in params.order[i].tolist():
            f = float((params.brightness, params.contrast, params.saturation, params.hue)[op][i])
            ref = _np_op(op, ref, f)
        np.testing.assert_allclose(out[i], ref, atol=1e-5)
    torch.manual_seed(0)
    drawn = draw_jitter(4000, 0.2)
    for f, lo, hi in ((drawn.brightness, 0.8, 1.2), (drawn.contrast, 0.8, 1.2), (drawn.saturation, 0.8, 1.2),
                      (drawn.hue, -0.2, 0.2)):
        assert lo <= f.min() and f.max() <= hi and abs(float(f.mean()) - (lo + hi) / 2) < 0.01
    assert drawn.brightness[0] != drawn.brightness[1]
    assert sorted(drawn.order[0].tolist()) == [0, 1, 2, 3]
    assert len({tuple(o) for o in drawn.order.tolist()}) == 24  # every permutation occurs


def test_jitter_applies_with_probability_p_once_per_batch():
    torch.manual_seed(0)
    images = torch.zeros(2, 3, 4, 4)  # normalised mid-grey-ish; any change means applied
    n, applied = 2000, 0
    for _ in range(n):
        out = color_jitter(images, 0.8, 0.2)
        changed = (out != images).flatten(1).any(1)
        assert changed[0] == changed[1] or changed.any()  # one decision for the batch
        applied += bool(changed.any())
    # binomial(2000, 0.8): sd ~ 0.009; 4.5 sd
    assert abs(applied / n - 0.8) < 0.04


def test_modern_kornia_jitter_stays_available_and_differs():
    torch.manual_seed(3)
    images = (_images(n=2, size=16) - 0.5) * 2
    a = color_jitter(images, 1.0, 0.2, impl="kornia")
    assert a.shape == images.shape and not torch.equal(a, images)
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="jitter_impl"):
        color_jitter(images, 1.0, 0.2, impl="other")


# ---------------------------------------------------------------------- ClassMix
def test_classmix_draws_per_sample_from_the_batch_classes():
    labels = torch.tensor([[[0, 0, 1], [1, 255, 2]], [[3, 3, 3], [0, 0, 4]]])  # n = 6 values (255 included)
    torch.manual_seed(0)
    seen_absent = False
    for _ in range(50):
        m = class_masks(labels)
        assert m.shape == (2, 1, 2, 3)
        for i in range(2):
            lab, mi = labels[i], m[i, 0].bool()
            chosen = set(lab[mi].tolist())
            # each sample's mask = its own pixels of its chosen classes: a class is all in or all out
            for c in lab.unique().tolist():
                assert mi[lab == c].all() or not mi[lab == c].any()
            assert len(chosen) <= 3  # ceil(6 / 2), some may be absent from this sample
            seen_absent |= len(chosen) < 3
    assert seen_absent


def test_classmix_draws_are_independent_between_samples():
    # Same label map in both samples: with one draw per batch the masks would always be equal.
    # Per sample: 4 classes, 2 drawn -> 6 subsets each; P(equal) = 1/6, and the joint
    # distribution of (subset 0, subset 1) is uniform over 36 pairs (chi-square test).
    label = torch.tensor([[0, 1], [2, 3]])
    labels = torch.stack([label, label])
    torch.manual_seed(1)
    n = 3600
    counts: dict[tuple, int] = {}
    for _ in range(n):
        m = class_masks(labels)[:, 0].flatten(1)
        key = (tuple(m[0].int().tolist()), tuple(m[1].int().tolist()))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 36
    expected = n / 36
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 66.6  # 35 degrees of freedom, p = 0.001
    equal = sum(c for (a, b), c in counts.items() if a == b)
    assert abs(equal / n - 1 / 6) < 0.03
    same = class_masks(labels, per_sample=False)
    assert torch.equal(same[0], same[1])


# ---------------------------------------------------------------------- Cityscapes downscale
def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.float64)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("src", "dst"), [((2048, 1024), (1024, 512)), ((512, 256), (256, 128)),
                                          ((300, 170), (128, 64)), ((640, 480), (200, 150))])
def test_downscale_equals_pil(src, dst):
    img = _photo(src[1], src[0])
    ours = resize_pil_bilinear(img, dst).astype(int)
    pil = np.asarray(Image.fromarray(img).resize(dst, Image.BILINEAR)).astype(int)
    assert ours.shape == pil.shape and np.abs(ours - pil).max() <= 1
    grey = img[..., 1].copy()
    pil_g = np.asarray(Image.fromarray(grey).resize(dst, Image.BILINEAR)).astype(int)
    assert np.abs(resize_pil_bilinear(grey, dst).astype(int) - pil_g).max() <= 1
    label = np.random.default_rng(1).integers(0, 20, src[::-1]).astype(np.uint8)
    np.testing.assert_array_equal(resize_pil_nearest(label, dst),
                                  np.asarray(Image.fromarray(label).resize(dst, Image.NEAREST)))
    if dst == (1024, 512):  # exact 2x: PIL's taps are [1, 3, 3, 1] / 8 per axis
        np.testing.assert_array_equal(ours, pil)


def test_loader_downscale_equals_pil_on_the_generated_tree(training_tree):
    from pipeline.config import load_config
    from train.data.loaders import CityscapesTrain

    source = CityscapesTrain(load_config(training_tree))
    f = source.files[0]
    full = Image.open(f.image).convert("RGB")
    size = (full.width // 2, full.height // 2)
    image, label, ic1 = CityscapesTrain.load(f, size)
    pil = np.asarray(full.resize(size, Image.BILINEAR)).astype(int)
    assert np.abs(image.astype(int) - pil).max() <= 1
    np.testing.assert_array_equal(label, np.asarray(Image.open(f.label).resize(size, Image.NEAREST)))
    pil_ic1 = np.asarray(Image.open(f.ic1).resize(size, Image.BILINEAR)).astype(int)
    assert np.abs(ic1.astype(int) - pil_ic1).max() <= 1
    old_image, _, _ = CityscapesTrain.load(f, size, "cv2")
    assert old_image.shape == image.shape


# ---------------------------------------------------------------------- pseudo weight rows
def test_pseudo_weight_ignore_top_and_bottom_rows():
    logits = torch.zeros(2, 3, 6, 4)
    logits[:, 0] = 10.0  # every pixel confident: share 1
    _, w = pseudo_labels(logits, (6, 4), 0.968, ignore_top=1, ignore_bottom=2)
    expect = torch.ones(2, 6, 4)
    expect[:, :1] = 0
    expect[:, -2:] = 0
    assert torch.equal(w, expect)
    _, w0 = pseudo_labels(logits, (6, 4), 0.968)  # CMDA's DSEC config: 0 / 0
    assert torch.equal(w0, torch.ones(2, 6, 4))
    assert torch.equal(ignore_rows(torch.ones(1, 3, 2), 0, 9), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError):
        ignore_rows(torch.ones(1, 3, 2), -1, 0)


# ---------------------------------------------------------------------- CUDA precision switches
def test_cuda_backends_follow_the_settings_and_are_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    cfg = TrainConfig()
    cfg.run.tf32, cfg.run.cudnn_benchmark = False, False
    cuda = torch.device("cuda")  # only its type is read: the switches are plain flags
    with backend_flags(cfg, cuda):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
    cfg.run.tf32 = True
    with backend_flags(cfg, cuda):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before
    with backend_flags(cfg, torch.device("cpu")):  # a CPU run leaves them alone
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == before


# ---------------------------------------------------------------------- the baseline config is CMDA's
#: CMDA's value of every setting of its DSEC config and DACS loop (XiaRho/CMDA at 9d25129).
CMDA_VALUES = {
    "model.backbone": "mit_b5",
    "model.num_classes": 19,
    "model.drop_path": 0.1,
    "model.fusion_drop_path": 0.05,
    "data.source_resize": [1024, 512],
    "data.source_resize_impl": "pil",
    "data.crop": 512,
    "data.cat_max_ratio": 1.0,
    "data.target_crop": 400,
    "data.target_crop_x": [0, 240],
    "data.target_crop_y": [0, 80],
    "data.flip": 0.5,
    "data.test_rows": 440,
    "rcs.enabled": True,
    "rcs.temperature": 0.01,
    "rcs.min_pixels": 3000,
    "rcs.min_crop_ratio": 0.5,
    "optim.lr": 6e-5,
    "optim.betas": [0.9, 0.999],
    "optim.weight_decay": 0.01,
    "optim.head_lr_mult": 10.0,
    "optim.warmup_iters": 1500,
    "optim.warmup_ratio": 1e-6,
    "optim.power": 1.0,
    "dacs.ema_alpha": 0.999,
    "dacs.pseudo_threshold": 0.968,
    "dacs.jitter_p": 0.8,
    "dacs.jitter": 0.2,
    "dacs.jitter_impl": "cmda",
    "dacs.classmix_per_sample": True,
    "dacs.pseudo_weight_ignore_top": 0,
    "dacs.pseudo_weight_ignore_bottom": 0,
    "dacs.blur_p": 0.5,
    "dacs.blur_sigma": [0.15, 1.15],
    "dacs.teacher_events_p": 0.5,
    "dacs.fd_lambda": 0.0,
    "loss.fusion": 0.5,
    "loss.image": 0.5,
    "loss.isr": 0.25,
    "loss.events": 0.25,
    "run.iters": 40_000,
    "run.batch": 2,
    "run.eval_every": 4000,
}


def test_baseline_dry_run_prints_cmdas_values():
    from cli import app

    res = CliRunner().invoke(app, ["train", "--variant", "baseline", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output[res.output.index("{"):])
    wrong = {k: (cfg[k.split(".")[0]][k.split(".")[1]], v) for k, v in CMDA_VALUES.items()
             if not (cfg[k.split(".")[0]][k.split(".")[1]] == v
                     or (isinstance(v, float) and math.isclose(cfg[k.split(".")[0]][k.split(".")[1]], v)))}
    assert not wrong, f"(printed, CMDA's): {wrong}"
    # CMDA trains in fp32: the one switch that departs by default is bf16/TF32 on CUDA (documented)
    assert cfg["run"]["amp"] is True and cfg["run"]["tf32"] is True


# ---------------------------------------------------------------------- best checkpoint beside the last
def test_best_checkpoint_by_night_miou_is_kept_and_noted(training_tree, tmp_path, monkeypatch):
    from tests.test_train import tiny_config
    from train.checkpoints.files import load_checkpoint
    from train.engine import loop as dacs

    scores = iter([0.30, 0.50, 0.40])  # evaluations at iterations 1, 2, 3: the best is iteration 2

    def fake_evaluate(*args, **kwargs):
        s = next(scores)
        return {"fusion": {"mIoU": s, "mIoU19": s, "n_classes": 3}}

    monkeypatch.setattr(dacs, "evaluate", fake_evaluate)
    cfg = tiny_config(training_tree, tmp_path / "run", iters=3)
    cfg.run.eval_every = 1
    dacs.train(cfg)
    run = tmp_path / "run"
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["iteration"] == 2 and best["best"] == {"eval/mIoU": 0.50, "iter": 2}
    assert (run / "checkpoints" / "iter_000003.pt").exists()  # the last stays beside it
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval/mIoU" in ln]
    assert [(e["eval/best_mIoU"], e["eval/best_iter"]) for e in evals] == [(0.30, 1), (0.50, 2), (0.50, 2)]
    assert not [p for p in (run / "checkpoints").iterdir() if p.suffix != ".pt"]  # no temp file left
    assert dacs.best_eval(run / "metrics.jsonl") == (0.50, 2)
