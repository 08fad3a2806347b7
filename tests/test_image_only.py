"""Image-only night targets in the trainer (Dark Zurich / ACDC, CMDA's image + ISR model of its cs2dz config).

What the second encoder receives is checked against the NumPy ISR reference (pipeline/image_change.py)
applied the way CMDA's Dark Zurich loader applies it: on the whole resized night image, then cropped and
flipped; the AttentionFusion's structure; a short run, evaluation and the Dark Zurich test-server export;
CMDA's Dark Zurich checkpoint layout; and the errors.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import train.checkpoints.cmda_layout as cc
from cli import app
from pipeline.errors import InputError
from pipeline.image_change import ISR_DAY, isr_reference
from pipeline.night_targets import discover
from tests.fixtures.cmda_layout import cmda_layout
from tests.test_cmda_checkpoint import mmcv_file, random_state
from tests.test_train import tiny_config
from train.checkpoints.files import load_checkpoint, load_model_state, save_checkpoint
from train.checkpoints.inference import build_model
from train.config import TrainConfig, apply_preset, apply_target, to_dict, validate
from train.data.batches import PairedBatches
from train.data.image_only import ISR_TARGET, NightTargetEval
from train.data.isr import denormalize_to_uint8
from train.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from train.engine import loop as dacs
from train.models import AttentionFusion, CMDAModel
from train.models.mit import get_config
from train.uda.method import build_method
from train.uda.step import class_mix, teacher_pseudo_labels
from train.uda.targets import ImageOnlyTarget

W, H = 160, 96  # the synthetic tree's images, = data.target_resize below: no resize, so the reference is exact
CROP = 64


@pytest.fixture(scope="module")
def dz_yaml(training_tree, tmp_path_factory) -> Path:
    """datasets.yaml with the training tree's Cityscapes side and a small synthetic Dark Zurich tree."""
    folder = tmp_path_factory.mktemp("dz")
    gen = folder / "gen.yaml"
    gen.write_text(f"sample:\n  seed: 3\n  targets: {{train: 4, val: 2, test: 2, day: 0, width: {W}, height: {H}}}\n")
    for target in ("darkzurich", "acdc"):
        res = CliRunner().invoke(app, ["sample", "--config", str(gen), "--target", target, "--out",
                                       str(folder / target), "--workers", "0"])
        assert res.exit_code == 0, res.output
    cs = training_tree.parent
    cfg = folder / "datasets.yaml"
    cfg.write_text(f"dsec: {{root: {cs / 'DSEC'}, out: {cs / 'processed'}, sequences: "
                   f"{{zurich_city_09_a: {{labelled: [0, 39]}}}}}}\n"
                   f"cityscapes: {{root: {cs / 'cs_raw'}, out: {cs / 'cs_out'}}}\n"
                   f"darkzurich: {{root: {folder / 'darkzurich'}, out: {folder / 'out'}}}\n"
                   f"acdc: {{root: {folder / 'acdc'}, out: {folder / 'out_acdc'}}}\n")
    return cfg


def dz_config(datasets: Path, out: Path | None, iters: int = 2, **run) -> TrainConfig:
    cfg = tiny_config(datasets, out, iters=iters, **run)
    cfg.data.crop = CROP
    apply_target(cfg, "darkzurich")
    cfg.data.target_resize = (W, H)
    cfg.run.eval_max = 2
    return validate(cfg)


# ---------------------------------------------------------------------- settings
def test_target_applies_cmdas_cs2dz_settings():
    cfg = apply_target(TrainConfig(), "darkzurich")
    assert (cfg.data.target, cfg.model.fusion, cfg.data.target_resize) == ("darkzurich", "attention", (960, 540))
    assert (cfg.loss.image, cfg.loss.fusion, cfg.loss.events, cfg.loss.isr) == (0.7, 0.7, 0.7, 0.0)
    assert (cfg.dacs.pseudo_weight_ignore_top, cfg.dacs.pseudo_weight_ignore_bottom) == (15, 120)
    small = apply_preset(TrainConfig(), "cpu-sample")  # source 256x128: the target at the same 1/8 scale
    apply_target(small, "acdc")
    assert small.data.target_resize == (240, 135) and small.data.crop == 128
    assert (small.dacs.pseudo_weight_ignore_top, small.dacs.pseudo_weight_ignore_bottom) == (4, 30)
    dsec = apply_target(TrainConfig(), "dsec")
    assert to_dict(dsec) == to_dict(TrainConfig())  # the default path is untouched


@pytest.mark.parametrize("term", ["rgb_event_src", "event_s_rgb_t", "event_st", "mask_events"])
def test_event_feature_terms_are_refused_for_image_only_targets(term):
    cfg = apply_target(TrainConfig(), "darkzurich")
    setattr(cfg.loss, term, 0.1)
    with pytest.raises(InputError, match=f"loss.{term}.*has no events"):
        validate(cfg)


def test_image_only_terms_are_allowed():
    cfg = apply_target(TrainConfig(), "darkzurich")
    cfg.loss.fusion_st, cfg.loss.rgb_st, cfg.mic.enabled = 0.05, 0.1, True
    assert validate(cfg) is cfg


# ---------------------------------------------------------------------- the model
def test_attention_fusion_structure_and_shapes():
    mit = get_config("mit_b0")
    fusion = AttentionFusion(mit.embed_dims, mit.sr_ratios)
    for i, (c, sr) in enumerate(zip(mit.embed_dims, mit.sr_ratios, strict=True)):
        block, mlp = fusion.blocks[i], fusion.mlps[i]
        assert block.norm1.normalized_shape == (2 * c,) and block.attn.q.weight.shape == (2 * c, 2 * c)
        assert block.attn.num_heads == 1 and block.drop_path.p == 0.05
        if sr > 1:
            assert block.attn.sr.kernel_size == (sr, sr)
        else:
            assert not hasattr(block.attn, "sr")
        assert block.mlp.fc1.weight.shape == (8 * c, 2 * c)  # the block's own Mix-FFN, ratio 4 at width 2C
        assert (mlp.fc1.weight.shape, mlp.dwconv.dwconv.weight.shape, mlp.fc2.weight.shape) == (
            (c, 2 * c), (c, 1, 3, 3), (c, c))
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip(mit.embed_dims, (4, 8, 16, 32), strict=True)]
    isr = [torch.randn_like(f) for f in feats]
    out = fusion.eval()(feats, isr)
    assert [tuple(o.shape) for o in out] == [tuple(f.shape) for f in feats]
    changed = fusion(feats, [x + 1 for x in isr])
    assert all(not torch.allclose(a, b) for a, b in zip(out, changed, strict=True))  # the ISR reaches every stage
    model = CMDAModel("mit_b0", fusion="attention", head_channels=16)
    assert isinstance(model.fusion_module, AttentionFusion)
    n_mlp = sum(p.numel() for m in fusion.mlps for p in m.parameters())
    assert n_mlp == sum(2 * c * c + c + 9 * c + c + c * c + c for c in mit.embed_dims)
    with pytest.raises(ValueError, match="unknown fusion"):
        CMDAModel("mit_b0", fusion="concat")


# ---------------------------------------------------------------------- what the second encoder receives
def _reference_target(items, seed: int, it: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """CMDA's cs2dz target sample, by hand: the ISR of the whole (resized) image, then crop and flip."""
    rng = np.random.default_rng([seed, it, b, 1])
    item = items[int(rng.integers(len(items)))]
    image = cv2.cvtColor(cv2.imread(str(item.image)), cv2.COLOR_BGR2RGB)
    isr = isr_reference(image, ISR_TARGET, "rightdown")
    x, y = int(rng.integers(0, W - CROP + 1)), int(rng.integers(0, H - CROP + 1))
    image, isr = image[y:y + CROP, x:x + CROP], isr[y:y + CROP, x:x + CROP]
    if rng.random() < 0.5:
        image, isr = image[:, ::-1], isr[:, ::-1]
    return image, isr


def test_second_encoder_gets_the_night_isr_as_cmda_defines_it(dz_yaml):
    from pipeline.config import load_config

    cfg = dz_config(dz_yaml, None)
    dcfg = load_config(dz_yaml)
    batches = PairedBatches(dcfg, cfg.data, cfg.rcs, 2, seed=5)
    items = discover(dcfg.darkzurich.root, "darkzurich").train
    batch = batches[3]
    inputs = ImageOnlyTarget(torch.device("cpu"), torch.contiguous_format).inputs(batch)
    assert set(inputs) == {"source_image", "source_label", "source_events", "target_image", "target_events"}
    for b in range(2):
        image, isr = _reference_target(items, 5, 3, b)
        assert np.array_equal(batch["target_image"][b].permute(1, 2, 0).numpy(), image)
        got = inputs["target_events"][b].numpy()
        assert got.shape == (3, CROP, CROP)
        np.testing.assert_allclose(got, np.broadcast_to(isr, got.shape), atol=1e-5)
        # not the ISR of the crop: CMDA's min-max runs over the whole frame, and the flip comes after
        of_crop = isr_reference(image.copy(), ISR_TARGET, "rightdown")
        assert not np.allclose(of_crop, isr, atol=1e-3)
        # the source's second input: the day ISR of the final crop, CMDA's day parameters, rightdown
        src = batch["source_image"][b].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(inputs["source_events"][b, 0].numpy(), isr_reference(src, ISR_DAY, "rightdown"),
                                   atol=1e-5)


class Spy(torch.nn.Module):
    """Records what a pass feeds the model; returns constant logits."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, **kw):
        from train.models.fusion import ModelOutput

        self.calls.append(kw)
        b, _, h, w = kw["image"].shape
        logits = {o: torch.zeros(b, 19, h // 4, w // 4) for o in kw.get("outputs") or ("image", "events", "fusion")}
        return ModelOutput(logits, {}, "events")


def test_teacher_and_mixed_pass_see_the_night_and_the_mixed_isr(dz_yaml):
    from pipeline.config import load_config

    cfg = dz_config(dz_yaml, None)
    batch = PairedBatches(load_config(dz_yaml), cfg.data, cfg.rcs, 2, seed=1)[0]
    x = ImageOnlyTarget(torch.device("cpu"), torch.contiguous_format).inputs(batch)
    teacher = Spy()
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"), None, None)
    pseudo, weight, _ = teacher_pseudo_labels(cfg, method, teacher, x)
    call = teacher.calls[0]
    assert call["events"] is x["target_events"] and call["isr"] is None and call["fuse_with"] == "events"
    assert weight[:, :1].sum() == 0 and weight[:, -8:].sum() == 0  # the ignored rows (15/120 at 540 -> 2/18 at 96)
    mixed = class_mix(cfg, method, x, pseudo, weight)
    assert "isr" not in mixed
    for b in range(2):  # the mixed image's ISR, night parameters of this setting, rightdown
        rgb = denormalize_to_uint8(mixed["image"][b:b + 1])[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(mixed["events"][b, 0].numpy(), isr_reference(rgb, ISR_TARGET, "rightdown"),
                                   atol=1e-5)


# ---------------------------------------------------------------------- a short run, evaluate, predict
@pytest.fixture(scope="module")
def dz_run(dz_yaml, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dzrun") / "run"
    res = dacs.train(dz_config(dz_yaml, out, iters=2))
    assert 0 <= res["eval"]["mIoU"] <= 1
    return out


def test_short_run_trains_the_image_isr_model_and_evaluates(dz_run):
    records = [json.loads(line) for line in (dz_run / "metrics.jsonl").read_text().splitlines()]
    names = {k for r in records for k in r}
    assert {"loss/src/events", "loss/mix/events", "loss/src/fusion", "eval/mIoU"} <= names
    assert not any("isr" in k for k in names)  # no separate ISR branch
    state = load_checkpoint(dz_run / "checkpoints" / "iter_000002.pt")
    assert state["config"]["data"]["target"] == "darkzurich" and state["config"]["model"]["fusion"] == "attention"
    assert any(k.startswith("fusion_module.mlps.") for k in state["student"])


def test_mic_and_image_only_l2_terms_run_without_events(dz_yaml, tmp_path):
    cfg = dz_config(dz_yaml, tmp_path / "run", iters=1)
    cfg.mic.enabled, cfg.mic.block = True, 8
    cfg.loss.fusion_st, cfg.loss.rgb_st, cfg.run.accum = 0.05, 0.1, 2
    dacs.train(validate(cfg))
    names = {k for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"loss/mic/events", "loss/mic/fusion", "loss/l2/fusion_st", "loss/l2/rgb_st"} <= names
    assert not any("isr" in k for k in names)


def test_cli_evaluate_scores_the_val_split(dz_run, tmp_path):
    res = CliRunner().invoke(app, ["evaluate", str(dz_run / "checkpoints" / "iter_000002.pt"), "--out",
                                   str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["target"] == "darkzurich" and set(metrics["outputs"]) == {"fusion", "image", "events"}
    n_pixels = sum(map(sum, metrics["outputs"]["fusion"]["confusion"]))
    labels = [np.asarray(NightTargetEval.__getitem__(ds, i)["label"]) for ds in [_val(dz_run)] for i in range(2)]
    assert n_pixels == sum(int((lab != 255).sum()) for lab in labels)  # every labelled val pixel scored


def _val(run: Path) -> NightTargetEval:
    from pipeline.config import load_config
    from train.config import from_dict

    cfg = from_dict(json.loads((run / "config.json").read_text()))
    return NightTargetEval(load_config(cfg.data.datasets), cfg.data, "val")


def test_cli_predict_writes_the_darkzurich_server_zip(dz_run, dz_yaml, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(dz_run / "checkpoints" / "iter_000002.pt"), "--split", "test",
                                   "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    test = discover(Path(dz_yaml.parent / "darkzurich"), "darkzurich").test
    with zipfile.ZipFile(tmp_path / "darkzurich_test.zip") as z:
        names = sorted(z.namelist())
        assert names == sorted(f"{d}/{t.name}.png" for t in test
                               for d in ("labelTrainIds", "labelTrainIds_invalid", "confidence"))
        for t in test:
            pred = cv2.imdecode(np.frombuffer(z.read(f"labelTrainIds/{t.name}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
            conf = cv2.imdecode(np.frombuffer(z.read(f"confidence/{t.name}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
            assert pred.shape == conf.shape == (H, W) and pred.dtype == np.uint8 and conf.dtype == np.uint16
            assert pred.max() <= 18 and conf.min() >= 65535 // 19  # a softmax maximum is >= 1/19
    res = CliRunner().invoke(app, ["predict", str(dz_run / "checkpoints" / "iter_000002.pt"), "--split", "val",
                                   "--out", str(tmp_path / "val"), "--device", "cpu"])
    assert res.exit_code == 0 and "mIoU" in res.output, res.output
    assert len(list((tmp_path / "val").glob("*_pred.png"))) == 2


def test_acdc_val_test_and_the_day_domain(dz_run, dz_yaml, tmp_path):
    from pipeline.night_targets import TRAIN_TO_LABEL_ID

    ckpt = str(dz_run / "checkpoints" / "iter_000002.pt")
    res = CliRunner().invoke(app, ["evaluate", ckpt, "--target", "acdc", "--config", str(dz_yaml), "--out",
                                   str(tmp_path / "acdc_eval"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "acdc_eval" / "metrics.json").read_text())["target"] == "acdc"
    res = CliRunner().invoke(app, ["predict", ckpt, "--target", "acdc", "--split", "test", "--config", str(dz_yaml),
                                   "--out", str(tmp_path / "acdc"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    test = discover(dz_yaml.parent / "acdc", "acdc").test
    written = sorted((tmp_path / "acdc").glob("*_labelIds.png"))
    assert [p.name for p in written] == sorted(f"{t.name}_labelIds.png" for t in test)
    for p in written:
        ids = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert ids.shape == (H, W) and ids.dtype == np.uint8 and set(np.unique(ids)) <= set(TRAIN_TO_LABEL_ID.tolist())
    res = CliRunner().invoke(app, ["evaluate", ckpt, "--domain", "day", "--out", str(tmp_path / "day"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_day_isr_replaces_ic1_for_an_image_isr_model(dz_yaml):
    from pipeline.config import load_config
    from train.data.image_only import DayIsr
    from train.data.loaders import CityscapesVal

    cfg = dz_config(dz_yaml, None)
    base = CityscapesVal(load_config(dz_yaml), cfg.data, limit=1)
    item = DayIsr(base)[0]
    rgb = denormalize_to_uint8(item["image"][None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(item["events"][0].numpy(), isr_reference(rgb, ISR_DAY, "rightdown"), atol=1e-5)
    assert not torch.equal(item["events"], base[0]["events"])


# ---------------------------------------------------------------------- errors
def _dsec_checkpoint(path: Path) -> Path:
    cfg = TrainConfig()
    cfg.model.backbone, cfg.model.head_channels = "mit_b0", 16
    model = build_model(cfg, path)
    return save_checkpoint(path, iteration=1, student=model, teacher=None, optimizer=None, config=to_dict(cfg))


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_dsec_event_model_on_darkzurich_is_a_one_line_error(command, dz_yaml, tmp_path):
    ckpt = _dsec_checkpoint(tmp_path / "dsec.pt")
    res = CliRunner().invoke(app, [command, str(ckpt), "--target", "darkzurich", "--config", str(dz_yaml),
                                   "--device", "cpu"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "dsec.pt" in line and "needs events" in line and "Traceback" not in res.output


def test_val_image_without_label_and_a_tree_in_neither_layout(dz_run, dz_yaml, tmp_path):
    import shutil

    tree = tmp_path / "dz"
    shutil.copytree(dz_yaml.parent / "darkzurich", tree)
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text(dz_yaml.read_text().replace(str(dz_yaml.parent / "darkzurich"), str(tree)))
    first = sorted((tree / "gt").rglob("*_gt_labelTrainIds.png"))[0]
    for p in first.parent.glob(first.name.replace("_gt_labelTrainIds.png", "_gt_label*.png")):
        p.unlink()  # both label files of one val image
    ckpt = str(dz_run / "checkpoints" / "iter_000002.pt")
    res = CliRunner().invoke(app, ["evaluate", ckpt, "--config", str(cfg), "--device", "cpu"])
    assert res.exit_code == 2 and "val image without a label" in res.output
    shutil.rmtree(tree / "rgb_anon")
    (tree / "images").mkdir()
    res = CliRunner().invoke(app, ["evaluate", ckpt, "--config", str(cfg), "--device", "cpu"])
    assert res.exit_code == 2 and "no train images" in res.output and "rgb_anon" in res.output


# ---------------------------------------------------------------------- CMDA's Dark Zurich checkpoint
def test_cmdas_darkzurich_layout_imports_strictly(tmp_path):
    layout = cmda_layout("mit_b0", fusion="attention")
    assert not any("fusion_isr_module" in k for k in layout)
    assert layout["model.fusion_module.basic_block.3.attn.q.weight"] == ((512, 512), "float32")
    assert layout["model.fusion_module.linear_block.0.fc1.weight"] == ((32, 64), "float32")
    state = random_state(layout, seed=2)
    path = tmp_path / "cmda_dz.pth"
    torch.save(mmcv_file(state), path)
    imp = cc.import_cmda(path)
    assert (imp.backbone, imp.fusion) == ("mit_b0", "attention")
    model = CMDAModel("mit_b0", fusion="attention")
    load_model_state(model, imp.student, path)  # strict
    assert torch.equal(model.fusion_module.mlps[2].dwconv.dwconv.weight,
                       state["model.fusion_module.linear_block.2.dwconv.dwconv.weight"])
    converted = cc.as_cmda_checkpoint(imp)
    assert converted["config"]["data"]["target"] == "darkzurich"
    assert converted["config"]["model"]["fusion"] == "attention"
    with pytest.raises(InputError, match=r"image \+ ISR model.*this run trains an image \+ events model"):
        cc.init_weights(path, "mit_b0", 19, 256)
    assert set(cc.init_weights(path, "mit_b0", 19, 256, fusion="attention")) == set(model.state_dict())
    n = sum(math.prod(s) for k, (s, _) in layout.items() if k.startswith("model.fusion_module."))
    assert n == sum(p.numel() for p in model.fusion_module.parameters())


def test_normalisation_constants_are_cmdas():
    assert np.allclose(IMAGENET_MEAN, [123.675, 116.28, 103.53]) and np.allclose(IMAGENET_STD, [58.395, 57.12, 57.375])


def test_peer_components_run_on_an_image_only_target(dz_yaml, tmp_path):
    """DSRNSS (grouped mix, tail bank without events, prototypes), DIDA and the discriminator with
    adv.input=target (its extra pass gets the night ISR as the second input): a short Dark Zurich run
    completes with finite losses and logs every component's terms and metrics."""
    from train.config import apply_layers

    cfg = dz_config(dz_yaml, tmp_path / "run", iters=3)
    sets = ["dsr.enabled=true", "dida.enabled=true", "adv.enabled=true", "dsr.bank_classes=0,10",
            "dsr.paste_every=1", "dsr.proto_start=0", f"dida.dim={cfg.model.head_channels}", "dida.update_every=1",
            "adv.upsample=2", "adv.input=target"]
    cfg = validate(apply_layers(cfg, sets=sets))
    dacs.train(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(r.keys() for r in recs if "loss/total" in r))
    for key in ("loss/dsr/proto", "loss/dsr/proto_mix", "loss/dida/instance", "loss/adv/generator",
                "dsr/bank_entries", "adv/d_target"):
        assert key in logged, key
    assert all(np.isfinite(r["loss/total"]) for r in recs if "loss/total" in r)
