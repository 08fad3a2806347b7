"""DSEC-Semantic end to end on a tiny tree: the CLI's dataset options, the event-only model, supervised,
adapted and source-only runs, ESS's evaluation beside cmda's, predictions, and every refusal in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline import ess_metrics
from pipeline.atomic import write_png
from pipeline.config import load_config
from pipeline.dsec_semantic import cityscapes_lut
from pipeline.errors import InputError
from tests.cli_checks import assert_one_line_error
from tests.test_dsec_semantic import TEST, TRAIN, make_sequence
from train.checkpoints.files import load_checkpoint
from train.checkpoints.inference import check_target
from train.config import TrainConfig, apply_layers, validate
from train.data.batches import PairedBatches, training_batches
from train.engine import loop as dacs
from train.models import EventOnlyModel
from train.models.event_only import widen_first_conv
from train.models.mit import MixVisionTransformer

WINDOW = "{mode: events, events: 20000, chunks: 4, bins: 3}"  # 12 channels
CHANNELS = 12


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def semantic_tree(training_tree, tmp_path_factory) -> Path:
    """datasets.yaml: the tiny Cityscapes tree of ``training_tree`` + one train and one test DSEC-Semantic
    sequence (8 labels each), windows and index built through the CLI."""
    root = tmp_path_factory.mktemp("semantic_train")
    make_sequence(root / "tree", "train", TRAIN, "official")
    make_sequence(root / "tree", "test", TEST, "ess", seed=1)
    cs = training_tree.parent
    path = root / "datasets.yaml"
    path.write_text(f"cityscapes:\n  root: {cs / 'cs_raw'}\n  out: {cs / 'cs_out'}\n"
                    f"dsec_semantic:\n  root: tree\n  out: processed\n  train: [{TRAIN}]\n  test: [{TEST}]\n"
                    f"  window: {WINDOW}\n")
    res = cli("preprocess", "--dataset", "dsec-semantic", "--all", "--config", str(path), "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "8 windows written" in res.output and "ess layout" in res.output
    res = cli("index", "--dataset", "dsec-semantic", "--config", str(path))
    assert res.exit_code == 0 and "train: 8 labels" in res.output and "test: 8 labels" in res.output, res.output
    return path


def tiny(datasets: Path, out: Path | None, *, supervised: bool = False, source_only: bool = False, iters: int = 2,
         sets: tuple[str, ...] = ()) -> TrainConfig:
    cfg = apply_layers(TrainConfig(), target="dsec-semantic", sets=[
        "model.backbone=mit_b0", "model.head_channels=16", "model.pretrained=none", "model.cyclegan=none",
        "data.crop=64", "data.source_resize=128,64", "data.target_crop=256", "data.workers=0",
        "rcs.min_pixels=50", f"run.iters={iters}", "run.log_every=1", f"run.eval_every={iters}",
        f"run.ckpt_every={iters}", "run.eval_max=2", f"run.source_only={source_only or supervised}",
        *(["data.source=dsec-semantic"] if supervised else []), *sets])
    cfg.data.datasets, cfg.run.out = datasets, out
    return validate(cfg)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- CLI
def test_preprocess_again_is_a_no_op(semantic_tree):
    res = cli("preprocess", "--dataset", "dsec-semantic", "--seq", TRAIN, "--config", str(semantic_tree))
    assert res.exit_code == 0 and "already complete" in res.output, res.output


@pytest.mark.parametrize("args, needle", [
    (("preprocess", "--dataset", "dsec-night", "--all"), "unknown --dataset"),
    (("preprocess", "--dataset", "dsec-semantic", "--seq", "zurich_city_09_a"), "not listed under dsec_semantic"),
    (("preprocess", "--dataset", "dsec-semantic"), "--seq NAME or pass --all"),
    (("index", "--dataset", "dsec-semantic", "--merge"), "--seq and --merge are for DSEC night"),
    (("sample", "--target", "dsec-semantic", "--layout", "zip"), "unknown DSEC-Semantic layout"),
])
def test_dataset_options_refuse_bad_input_in_one_line(semantic_tree, tmp_path, args, needle):
    extra = ("--out", str(tmp_path / "s")) if args[0] == "sample" else ()
    assert_one_line_error(cli(*args, *extra, "--config", str(semantic_tree)), needle)


def test_check_reports_dsec_semantic(semantic_tree, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(semantic_tree.parent / "tree", root / "tree")
    (root / "datasets.yaml").write_text(semantic_tree.read_text())
    res = cli("check", "--config", str(root / "datasets.yaml"))
    assert f"DSEC-Semantic train sequence {TRAIN}" in res.output and "[ok] labels and timestamps" in res.output
    bad = np.full((440, 640), 50, np.uint8)
    write_png(root / "tree" / "train" / TRAIN / "11classes" / "000000.png", bad)
    res = cli("check", "--config", str(root / "datasets.yaml"))
    assert res.exit_code == 2 and "[INVALID] labels and timestamps" in res.output and "found [50]" in res.output
    (root / "datasets.yaml").write_text(semantic_tree.read_text().replace("root: tree", "root: nowhere"))
    assert "[not found (optional)] dsec_semantic.root" in cli("check", "--config", str(root / "datasets.yaml")).output


# ---------------------------------------------------------------------------------------------- model
def test_event_only_model_has_one_output_and_refuses_images():
    torch.manual_seed(0)
    m = EventOnlyModel("mit_b0", num_classes=11, in_chans=CHANNELS, head_channels=16)
    out = m(events=torch.randn(1, CHANNELS, 64, 96))
    assert list(out.logits) == ["events"] and out.logits["events"].shape == (1, 11, 16, 24)
    with pytest.raises(ValueError, match="event-only"):
        m(image=torch.randn(1, 3, 64, 96), events=torch.randn(1, CHANNELS, 64, 96))
    with pytest.raises(ValueError, match="event-only"):
        m(events=torch.randn(1, CHANNELS, 64, 96), outputs=("fusion",))
    names = {g["name"]: g["lr_mult"] for g in m.param_groups(1e-4, 0.01)}
    assert names["head"] == 10.0 and names["backbone"] == 1.0


def test_imagenet_weights_widen_to_the_window(tmp_path):
    torch.manual_seed(0)
    rgb = MixVisionTransformer("mit_b0").state_dict()
    torch.save(rgb, tmp_path / "mit_b0.pth")
    m = EventOnlyModel("mit_b0", in_chans=CHANNELS, head_channels=16)
    m.load_pretrained(tmp_path / "mit_b0.pth")
    w = m.backbone_events.patch_embed1.proj.weight
    assert w.shape[1] == CHANNELS
    torch.testing.assert_close(w, rgb["patch_embed1.proj.weight"].mean(1, keepdim=True).repeat(1, CHANNELS, 1, 1) / 4)
    torch.testing.assert_close(m.backbone_events.block2[0].mlp.fc1.weight, rgb["block2.0.mlp.fc1.weight"])
    w_rgb = rgb["patch_embed1.proj.weight"]  # a constant input gives the response it gave on RGB
    torch.testing.assert_close(widen_first_conv(w_rgb, 5).sum(dim=1), w_rgb.sum(dim=1))


# ---------------------------------------------------------------------------------------------- data
def test_adapted_batches_map_cityscapes_to_11_classes(semantic_tree):
    cfg = tiny(semantic_tree, None)
    dcfg = load_config(semantic_tree)
    batch = training_batches(dcfg, cfg, 0)[3]
    plain = PairedBatches(dcfg, cfg.data, cfg.rcs, cfg.run.batch, 0, with_target=False)[3]
    assert set(batch) == {"source_label", "source_ic1", "target_events"}  # no source image is sent
    lut = torch.from_numpy(cityscapes_lut().astype(np.int64))
    assert torch.equal(batch["source_label"], lut[plain["source_label"]])
    assert set(batch["source_label"].unique().tolist()) <= set(range(11)) | {255}
    assert batch["target_events"].shape == (2, CHANNELS, 64, 64)


def test_supervised_batches_are_windows_and_labels(semantic_tree):
    cfg = tiny(semantic_tree, None, supervised=True)
    batch = training_batches(load_config(semantic_tree), cfg, 0)[0]
    assert set(batch) == {"source_events", "source_label"}
    assert batch["source_events"].shape == (2, CHANNELS, 64, 64) and batch["source_label"].shape == (2, 64, 64)
    assert set(batch["source_label"].unique().tolist()) <= set(range(11)) | {255}


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def supervised_run(semantic_tree, tmp_path_factory) -> Path:
    """A 2-iteration supervised run (ESS's setting), shared by the tests that only read its checkpoint."""
    run = tmp_path_factory.mktemp("supervised") / "sup"
    res = dacs.train(tiny(semantic_tree, run, supervised=True))
    assert 0 <= res["eval"]["mIoU"] <= 1 and res["eval"]["n_classes"] <= 11
    return run


def test_supervised_run_evaluates_under_both_conventions_and_predicts(supervised_run, tmp_path):
    run = supervised_run
    losses = {k for r in records(run) for k in r if k.startswith("loss/") and k != "loss/total"}
    assert losses == {"loss/src/events"}
    state = load_checkpoint(run / "checkpoints" / "iter_000002.pt")
    assert state["teacher"] is None
    assert {k.split(".")[0] for k in state["student"]} == {"backbone_events", "decode_head"}
    ck = str(run / "checkpoints" / "iter_000002.pt")
    out = cli("evaluate", ck, "--device", "cpu", "--limit", "2")
    assert out.exit_code == 0, out.output
    assert "ESS mIoU" in out.output and "cmda mIoU" in out.output and "pixel accuracy" in out.output
    metrics = json.loads((run / "eval" / "iter_000002" / "metrics.json").read_text())
    ev = metrics["outputs"]["events"]
    conf = np.asarray(ev["confusion"])
    assert conf.shape == (11, 11) and conf.sum() > 0
    assert ev["ess"]["miou_ess"] == pytest.approx(ess_metrics.miou_ess(conf))
    assert ev["ess"]["miou_annotated"] == pytest.approx(100 * ev["mIoU"])
    pred = cli("predict", ck, "--limit", "2", "--device", "cpu", "--out", str(tmp_path / "pred"))
    assert pred.exit_code == 0 and "ESS mIoU" in pred.output, pred.output
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == 2
    assert_one_line_error(cli("evaluate", ck, "--target", "dsec", "--device", "cpu"), "trained for dsec-semantic")
    assert_one_line_error(cli("evaluate", ck, "--domain", "day", "--device", "cpu"), "event-only")


def test_adapted_run_has_source_mixed_and_pseudo_terms(semantic_tree, tmp_path):
    run = tmp_path / "uda"
    dacs.train(tiny(semantic_tree, run, sets=("loss.mask_events=0.25", "loss.event_st=0.1")))
    recs = [r for r in records(run) if "loss/total" in r]
    assert {"loss/src/events", "loss/mix/events", "loss/l2/event_st"} <= set(recs[-1])
    assert "pseudo/weight" in recs[-1]
    state = load_checkpoint(run / "checkpoints" / "iter_000002.pt")
    assert {k.split(".")[0] for k in state["teacher"]} == {"backbone_events", "decode_head"}


def test_source_only_from_cityscapes(semantic_tree, tmp_path):
    run = tmp_path / "src"
    dacs.train(tiny(semantic_tree, run, source_only=True, iters=1))
    assert not any(k.startswith("loss/mix") for r in records(run) for k in r)


def test_window_channels_must_match_the_model(semantic_tree, supervised_run, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(semantic_tree.read_text().replace("root: tree", f"root: {semantic_tree.parent / 'tree'}")
                     .replace("out: processed", f"out: {semantic_tree.parent / 'processed'}")
                     .replace("bins: 3", "bins: 2"))
    res = cli("evaluate", str(supervised_run / "checkpoints" / "iter_000002.pt"), "--config", str(other),
              "--device", "cpu")
    assert_one_line_error(res, "12 event channels", "4 x 2 = 8")


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("setting, needle", [
    ("mic.enabled=true", "MIC"), ("dsr.enabled=true", "DSRNSS"), ("dida.enabled=true", "DIDA"),
    ("adv.enabled=true", "discriminator"), ("entropy.enabled=true", "entropy"), ("dacs.fd_lambda=0.1", "ImageNet"),
    ("loss.rgb_st=0.1", "image features"), ("model.init=x.pt", "--init"), ("model.num_classes=19", "11"),
])
def test_event_only_refuses_what_needs_an_image(setting, needle):
    with pytest.raises(InputError, match=needle):
        validate(apply_layers(TrainConfig(), target="dsec-semantic", sets=[setting]))


def test_supervised_needs_the_semantic_target():
    with pytest.raises(InputError, match=r"data\.target=dsec-semantic"):
        validate(apply_layers(TrainConfig(), sets=["data.source=dsec-semantic", "run.source_only=true"]))
    with pytest.raises(InputError, match=r"run\.source_only"):
        validate(apply_layers(TrainConfig(), target="dsec-semantic", sets=["data.source=dsec-semantic"]))


def test_cli_refusals_are_one_line():
    assert_one_line_error(cli("train", "--target", "dsec-semantic", "--mic", "--dry-run"), "mic.enabled", "MIC")
    assert_one_line_error(cli("train", "--supervised", "--dry-run"), "data.target=dsec-semantic")
    res = cli("train", "--target", "dsec-semantic", "--supervised", "--dry-run")
    assert res.exit_code == 0 and '"source": "dsec-semantic"' in res.output and '"num_classes": 11' in res.output


def test_other_models_cannot_be_scored_on_dsec_semantic():
    cfg = TrainConfig()
    with pytest.raises(InputError, match="event-only model"):
        check_target(Path("ck.pt"), cfg, "dsec-semantic")


def test_export_refuses_an_event_only_model(supervised_run, tmp_path):
    ck = str(supervised_run / "checkpoints" / "iter_000002.pt")
    assert_one_line_error(cli("export", ck, "--out", str(tmp_path / "x.onnx")), "event-only model")


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_event_only_run(semantic_tree, tmp_path):
    cfg = tiny(semantic_tree, tmp_path / "a", sets=("run.ckpt_every=1", "run.eval_every=100"))
    dacs.train(cfg)
    again = tiny(semantic_tree, tmp_path / "b", sets=("run.ckpt_every=1", "run.eval_every=100"))
    dacs.train(again, resume=tmp_path / "a" / "checkpoints" / "iter_000001.pt")
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "iter_000002.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "iter_000002.pt")
    for part in ("student", "teacher"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
