"""`cmda predict` and `cmda inspect` on a tiny DSEC night + Cityscapes tree built with the pipeline's writers.

The night side is written directly (voxel store, warped PNGs, labels, index.csv) so the test does not
depend on the sample generator or the warp step; the Cityscapes side is the 256x128 tree of
tests/test_cityscapes.py converted by `convert_cityscapes`. A random MiT-B0 CMDAModel is saved with
`save_checkpoint`, and the written PNGs are compared with what the model predicts on the same frames.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.config import load_config
from pipeline.errors import InputError
from tests.trees import SEQ, TEST_FRAMES, TEST_ROWS, TRAIN_FRAMES, H, W, datasets_yaml, make_night
from train.checkpoints.files import save_checkpoint
from train.checkpoints.inference import load_for_inference, predict_logits
from train.config import DataConfig, RcsConfig, TrainConfig, to_dict
from train.data.batches import PairedBatches
from train.data.loaders import NightTest, network_batch
from train.eval.inspect import SOURCE_TITLES, TARGET_TITLES, batch_isr, mix_batch
from train.eval.predict import predict
from train.eval.visualize import TITLE_HEIGHT, colorize, denormalize, events_to_rgb, overlay
from train.models import CMDAModel


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Small night frames (predict tests)."""
    root = tmp_path_factory.mktemp("predict")
    make_night(root)
    return datasets_yaml(root)


def _train_config(backbone: str = "mit_b0", test_rows: int = TEST_ROWS) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.backbone = backbone
    cfg.data.test_rows = test_rows
    return cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, CMDAModel, CMDAModel]:
    torch.manual_seed(0)
    student = CMDAModel("mit_b0")
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "iter_5.pt"
    save_checkpoint(path, iteration=5, student=student, teacher=teacher, optimizer=None,
                    config=to_dict(_train_config()))
    return path, student.eval(), teacher.eval()


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return img[..., ::-1]


def test_predict_test_split_writes_palette_predictions_and_panels(tree, ckpt):
    path, student, _ = ckpt
    summary = predict(path, config=tree, split="test", device="cpu")
    out = path.parent.parent / "predictions" / "iter_5"  # default: the run's, one folder per checkpoint
    assert summary.out == out and summary.frames == len(TEST_FRAMES) and summary.iteration == 5
    assert summary.conf is not None and summary.conf.sum() > 0 and 0.0 <= summary.metrics["mIoU"] <= 1.0
    test = NightTest(load_config(tree), _train_config().data)
    for i, f in enumerate(TEST_FRAMES):
        item = test[i]
        logits = predict_logits(student, item["image"][None], item["events"][None], ("fusion",))
        expected = logits["fusion"].argmax(1)[0]
        pred = _read(out / f"{SEQ}_{f:06d}_pred.png")
        assert pred.shape == (TEST_ROWS, W, 3)
        np.testing.assert_array_equal(pred, colorize(expected.numpy()))
        pan = _read(out / f"{SEQ}_{f:06d}_panel.png")
        assert pan.shape == (TEST_ROWS + TITLE_HEIGHT, 4 * W, 3)
        tiles = [pan[TITLE_HEIGHT:, k * W:(k + 1) * W] for k in range(4)]
        np.testing.assert_array_equal(tiles[0], denormalize(item["image"]))
        np.testing.assert_array_equal(tiles[1], events_to_rgb(item["events"]))
        np.testing.assert_array_equal(tiles[2], pred)
        np.testing.assert_array_equal(tiles[3], colorize(item["label"]))


def test_predict_train_split_image_output_teacher_has_no_label_column(tree, ckpt, tmp_path):
    path, student, teacher = ckpt
    summary = predict(path, out=tmp_path / "p", config=tree, split="train", limit=1, output="image", teacher=True,
                      device="cpu")
    assert summary.frames == 1 and summary.conf is None and summary.weights == "teacher"
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == [f"{SEQ}_{TRAIN_FRAMES[0]:06d}_panel.png", f"{SEQ}_{TRAIN_FRAMES[0]:06d}_pred.png"]
    pan = _read(tmp_path / "p" / files[0])
    assert pan.shape == (H + TITLE_HEIGHT, 3 * W, 3)  # whole frame, image | events | prediction
    model, _, _ = load_for_inference(path, teacher=True)
    for (k, v), t in zip(model.state_dict().items(), teacher.state_dict().values(), strict=True):
        assert torch.equal(v, t), k
    loaded, own = model.state_dict(), student.state_dict()
    assert any(not torch.equal(loaded[k], own[k]) for k in own)  # really the teacher, not the student


def test_predict_rejects_bad_checkpoints(tree, ckpt, tmp_path):
    path, student, _ = ckpt
    with pytest.raises(InputError, match="checkpoint not found"):
        predict(tmp_path / "missing.pt", config=tree)
    bad = tmp_path / "b1.pt"  # config says MiT-B1, weights are MiT-B0: refused, keys named
    save_checkpoint(bad, iteration=1, student=student, teacher=None, optimizer=None,
                    config=to_dict(_train_config("mit_b1")))
    with pytest.raises(InputError, match="does not match the model"):
        predict(bad, config=tree, device="cpu")
    with pytest.raises(InputError, match="no teacher weights"):
        predict(bad, config=tree, teacher=True, device="cpu")
    cfg = to_dict(_train_config())
    cfg["model"]["no_such_key"] = 1
    odd = tmp_path / "odd.pt"
    save_checkpoint(odd, iteration=1, student=student, teacher=None, optimizer=None, config=cfg)
    with pytest.raises(InputError, match="stored training config"):
        predict(odd, config=tree, device="cpu")
    with pytest.raises(InputError, match="--output"):
        predict(path, config=tree, output="isr")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    runner = CliRunner()
    for args in (["predict", str(junk), "--config", str(tree)], ["predict", str(path), "--split", "val",
                                                                   "--config", str(tree)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit), res.exception  # not an escaped exception
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr


def test_predict_cli(tree, ckpt, tmp_path):
    path, _, _ = ckpt
    res = CliRunner().invoke(app, ["predict", str(path), "--config", str(tree), "--out", str(tmp_path / "cli"),
                                   "--limit", "1", "--output", "events", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "1 test frame(s), student events output" in res.output and "mIoU" in res.output
    assert (tmp_path / "cli" / f"{SEQ}_{TEST_FRAMES[0]:06d}_pred.png").exists()


def test_inspect_renders_the_iterations_training_pair(training_tree, tmp_path, monkeypatch):
    tree = training_tree
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["inspect", "--config", str(tree), "--iter", "3", "--seed", "7"])
    assert res.exit_code == 0, res.output
    png = tmp_path / "runs" / "inspect" / "iter_000003_seed_7.png"  # default name, under runs/
    assert str(png.name) in res.output
    pic = _read(png)
    crop = DataConfig().crop
    # header strip, source row (4 tiles), target row (3 tiles, padded white on the right), ClassMix row (2)
    row = TITLE_HEIGHT + crop
    assert pic.shape == (TITLE_HEIGHT + 3 * row, len(SOURCE_TITLES) * crop, 3)
    raw = PairedBatches(load_config(tree), DataConfig(), RcsConfig(), batch=1, seed=7)[3]
    batch = network_batch(raw)
    batch.update(batch_isr(raw))
    src = denormalize(batch["source_image"][0])
    top = 2 * TITLE_HEIGHT
    expected_src = [src, overlay(src, batch["source_label"][0].numpy()), events_to_rgb(batch["source_ic1"][0]),
                    events_to_rgb(batch["source_isr"][0])]
    for k, tile in enumerate(expected_src):
        np.testing.assert_array_equal(pic[top:top + crop, k * crop:(k + 1) * crop], tile)
    top += crop + TITLE_HEIGHT
    expected_tgt = [denormalize(batch["target_image"][0]), events_to_rgb(batch["target_events"][0]),
                    events_to_rgb(batch["target_isr"][0])]
    for k, tile in enumerate(expected_tgt):
        np.testing.assert_array_equal(pic[top:top + crop, k * crop:(k + 1) * crop], tile)
    assert (pic[top - TITLE_HEIGHT:top + crop, len(TARGET_TITLES) * crop:] == 255).all()
    # the ClassMix row: the pasted source classes over the source image, and source pasted on target
    top += crop + TITLE_HEIGHT
    m = mix_batch(batch, TrainConfig(), 3, 7)
    mask = m["mix_mask"][0, 0].bool()
    assert 0 < float(mask.float().mean()) < 1
    pasted = np.where(mask.numpy(), batch["source_label"][0].numpy(), 255)
    np.testing.assert_array_equal(pic[top:top + crop, :crop], overlay(src, pasted, alpha=0.7))
    mixed = pic[top:top + crop, crop:2 * crop]
    np.testing.assert_array_equal(mixed, denormalize(m["mix_image"][0]))
    tgt = denormalize(batch["target_image"][0])
    np.testing.assert_array_equal(mixed[mask.numpy()], src[mask.numpy()])
    np.testing.assert_array_equal(mixed[~mask.numpy()], tgt[~mask.numpy()])
    # the ISR tiles are real content, not blank: both signs present
    for isr in (batch["source_isr"], batch["target_isr"]):
        assert (isr > 0.1).any() and (isr < -0.1).any()
    res = CliRunner().invoke(app, ["inspect", "--config", str(tree), "--iter", "-1"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert res.stderr.strip().splitlines() == ["error: --iter must be >= 0, got -1"]


@pytest.mark.slow
def test_predict_real_dsec_frame_size(training_tree, tmp_path):
    """One 440x640 test frame (sizes not divisible by 32) through the real-size path, ~10-60 s on CPU."""
    torch.manual_seed(1)
    model = CMDAModel("mit_b0").eval()
    path = tmp_path / "iter_1.pt"
    save_checkpoint(path, iteration=1, student=model, teacher=None, optimizer=None,
                    config=to_dict(_train_config(test_rows=DataConfig().test_rows)))
    summary = predict(path, config=training_tree, limit=1, device="cpu")
    assert summary.frames == 1
    pred = _read(summary.out / f"{SEQ}_{TEST_FRAMES[0]:06d}_pred.png")
    assert pred.shape == (440, 640, 3)
    panel_png = summary.out / f"{SEQ}_{TEST_FRAMES[0]:06d}_panel.png"
    assert _read(panel_png).shape == (440 + TITLE_HEIGHT, 4 * 640, 3)


def test_inspect_shows_the_mic_pass_when_mic_is_on(training_tree, tmp_path, monkeypatch):
    from train.config import TrainConfig
    from train.eval.inspect import MIC_TITLES, mic_batch

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["inspect", "--config", str(training_tree), "--iter", "2", "--set",
                                   "mic.enabled=true", "--set", "mic.block=16", "--out", "mic.png"])
    assert res.exit_code == 0 and res.exception is None, res.output
    pic = _read(tmp_path / "mic.png")
    crop = DataConfig().crop
    row = TITLE_HEIGHT + crop
    assert pic.shape == (TITLE_HEIGHT + 4 * row, len(SOURCE_TITLES) * crop, 3)  # a last (MIC) row
    raw = PairedBatches(load_config(training_tree), DataConfig(), RcsConfig(), batch=1, seed=0)[2]
    cfg = TrainConfig()
    cfg.mic.enabled, cfg.mic.block = True, 16
    mic = mic_batch(network_batch(raw), cfg, 2, 0)
    top = 2 * TITLE_HEIGHT + 3 * row
    tiles = [denormalize(mic["mic_image"][0]), events_to_rgb(mic["mic_events"][0]), events_to_rgb(mic["mic_isr"][0])]
    for k, tile in enumerate(tiles[:len(MIC_TITLES)]):
        np.testing.assert_array_equal(pic[top:top + crop, k * crop:(k + 1) * crop], tile)
    hidden = float((mic["mic_events"][0] == 0).float().mean())
    assert 0.3 < hidden < 1.0  # blocks of the events are hidden with the image's


def test_inspect_shows_dsrnss_grouped_classmix_with_its_companions(training_tree, tmp_path, monkeypatch):
    """With dsr on, the ClassMix row is the grouped one: the same draws as plain ClassMix, grown by the
    companions (pole -> traffic light/sign, rider -> bicycle/motorcycle) present in the sample."""
    from train.config import TrainConfig
    from train.uda.components.dsr import COMPANIONS

    dsr = TrainConfig()
    dsr.dsr.enabled = True
    # a source label with every class of a group (the sample's labels hold no pole)
    label = torch.tensor([0, 5, 6, 7, 12, 17, 18, 2, 8, 10]).repeat_interleave(4).reshape(1, 4, 10)
    items = {"source_label": label, "source_image": torch.rand(1, 3, 4, 10), "target_image": torch.rand(1, 3, 4, 10)}
    grew = 0
    for it in range(30):
        grouped = mix_batch(items, dsr, it, 0)["mix_mask"][0, 0].bool()
        plain = mix_batch(items, TrainConfig(), it, 0)["mix_mask"][0, 0].bool()
        assert bool((grouped | ~plain).all())  # the same draws, grown
        picked = set(torch.unique(label[0][plain]).tolist())
        expect, todo = set(picked), list(picked)
        while todo:  # companions of companions too (a light brings its pole, the pole its signs)
            for c in COMPANIONS.get(todo.pop(), ()):
                if c not in expect:
                    expect.add(c)
                    todo.append(c)
        assert set(torch.unique(label[0][grouped]).tolist()) == expect, (it, picked)
        grew += expect != picked
    assert grew > 0
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["inspect", "--config", str(training_tree), "--iter", "4", "--set",
                                   "dsr.enabled=true", "--out", "dsr.png"])
    assert res.exit_code == 0 and res.exception is None, res.output
    batch = network_batch(PairedBatches(load_config(training_tree), DataConfig(), RcsConfig(), batch=1, seed=0)[4])
    mask = mix_batch(batch, dsr, 4, 0)["mix_mask"][0, 0].numpy() > 0
    crop = DataConfig().crop
    top = 2 * TITLE_HEIGHT + 2 * (TITLE_HEIGHT + crop)
    src = denormalize(batch["source_image"][0])
    np.testing.assert_array_equal(_read(tmp_path / "dsr.png")[top:top + crop, :crop],
                                  overlay(src, np.where(mask, batch["source_label"][0].numpy(), 255), alpha=0.7))
