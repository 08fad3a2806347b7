"""CMDA's released checkpoint layout: recognised, converted strictly, usable by evaluate / predict / train / convert.

The key names and shapes come from ``tests/fixtures/cmda_mit_b5_keys.tsv``, written from CMDA's module
definitions (see ``tests/fixtures/cmda_layout.py``), never from cmda's own model. Values are random.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import train.checkpoints.cmda_layout as cc
from cli import app
from pipeline.errors import InputError
from tests.fixtures.cmda_layout import cmda_layout, read_tsv
from tests.trees import datasets_yaml, make_night
from train.checkpoints.cyclegan import load_cyclegan
from train.checkpoints.files import FORMAT, load_checkpoint, load_model_state
from train.checkpoints.inference import build_model, load_for_inference
from train.config import TrainConfig
from train.models import CMDAModel, ResnetGenerator

FIXTURE = Path(__file__).parent / "fixtures" / "cmda_mit_b5_keys.tsv"
SHARED_COPY = ("_events.", "_fusion.")


def random_state(layout, seed: int = 0, teacher_same: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors with the layout's names, shapes and dtypes; the head's events/fusion copies equal the
    image group (CMDA's shared decoder); BN variances positive so logits stay finite."""
    gen = torch.Generator().manual_seed(seed)
    # one pool of random numbers, each tensor a slice at its own offset (B5 needs ~100 M values: drawing them
    # all would take most of the test's time)
    pool = torch.randn(1 << 23, generator=gen) * 0.05
    offset = int(torch.randint(0, 1 << 20, (), generator=gen))
    out: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in layout.items():
        if teacher_same and key.startswith("ema_model."):
            out[key] = out["model." + key[len("ema_model."):]]
            continue
        if "decode_head.embed_layers_" in key or "decode_head.fuse_layer_" in key:
            for copy in SHARED_COPY:
                for kind in ("embed_layers", "fuse_layer"):
                    src = key.replace(f"{kind}{copy}", f"{kind}_image.")
                    if src != key and src in out:
                        out[key] = out[src].clone()
            if key in out:
                continue
        n = math.prod(shape)
        if dtype == "int64":
            out[key] = torch.tensor(7, dtype=torch.int64)
            continue
        offset = (offset * 7919 + 104729) % (pool.numel() - n)
        out[key] = pool[offset:offset + n].view(shape)
        if key.endswith("running_var"):
            out[key] = out[key].abs() + 0.5
    return out


def mmcv_file(state: dict[str, torch.Tensor]) -> dict:
    return {"meta": {"iter": 40000, "CLASSES": ("road", "sidewalk"), "mmcv_version": "1.3.7"}, "state_dict": state}


@pytest.fixture(scope="module")
def b0_file(tmp_path_factory) -> Path:
    """A MiT-B0 file in CMDA's layout (ISR fusion, teacher and CycleGAN included), written with torch.save."""
    path = tmp_path_factory.mktemp("cmda") / "cmda_b0.pth"
    torch.save(mmcv_file(random_state(cmda_layout("mit_b0"), seed=1)), path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("night")
    make_night(root)
    return datasets_yaml(root)


def _logits(model: CMDAModel, seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, ev = torch.randn(1, 3, size, size, generator=g), torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        return model.eval()(image=img, events=ev, outputs=("fusion", "image", "events")).logits


# ---------------------------------------------------------------------- the B5 fixture
def test_fixture_is_cmda_b5_layout():
    layout = read_tsv(FIXTURE)
    assert layout == cmda_layout("mit_b5")  # the TSV is what the derivation writes
    assert len(layout) == 5100  # CMDA's module definitions: about 5,100 keys, 4,900 without the ISR fusion
    assert sum("fusion_isr_module" in k for k in layout) == 200
    assert layout["model.backbone_image.block3.39.mlp.fc2.weight"] == ((320, 1280), "float32")
    assert layout["model.decode_head.fuse_layer_fusion.bottleneck.conv.weight"] == ((256, 1024, 3, 3), "float32")
    assert layout["model.decode_head.conv_seg.weight"] == ((19, 256, 1, 1), "float32")
    assert layout["cyclegan_itrd2en.model.19.weight"] == ((256, 128, 3, 3), "float32")


def test_b5_fixture_converts_and_loads_strictly(tmp_path):
    state = random_state(read_tsv(FIXTURE), seed=0, teacher_same=True)
    imp = cc.import_cmda(tmp_path / "cmda.pth", mmcv_file(state))
    assert (imp.backbone, imp.num_classes, imp.head_channels, imp.iteration) == ("mit_b5", 19, 256, 40000)
    assert imp.teacher is not None and set(imp.teacher) == set(imp.student)
    cfg = TrainConfig()
    model = build_model(cfg, tmp_path, empty=True)
    load_model_state(model, imp.student, tmp_path)  # strict: raises on any missing / unexpected / mis-shaped key
    assert torch.equal(model.backbone_events.block3[39].attn.sr.weight,
                       state["model.backbone_events.block3.39.attn.sr.weight"])
    assert torch.equal(model.decode_head.fuse_layer.bottleneck.bn.running_mean,
                       state["model.decode_head.fuse_layer_image.bottleneck.bn.running_mean"])


@pytest.mark.slow
def test_b5_fixture_gives_the_same_logits_through_evaluate_and_the_converted_file(monkeypatch, tmp_path):
    state = random_state(read_tsv(FIXTURE), seed=0, teacher_same=True)
    imp = cc.import_cmda(tmp_path / "cmda.pth", mmcv_file(state))
    assert (imp.backbone, imp.num_classes, imp.head_channels, imp.iteration) == ("mit_b5", 19, 256, 40000)
    assert any("fusion_isr_module" in n and "skipped" in n for n in imp.notes)
    assert imp.cyclegan is not None and set(imp.cyclegan) == set(ResnetGenerator().state_dict())
    # the renames, by value
    s = imp.student
    assert torch.equal(s["fusion_module.blocks.5.attn.kv.weight"],
                       state["model.fusion_module.basic_block.5.attn.kv.weight"])
    assert torch.equal(s["decode_head.fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var"],
                       state["model.decode_head.fuse_layer_image.aspp_modules.2.depthwise_conv.bn.running_var"])
    assert torch.equal(s["decode_head.embed_layers.3.proj.weight"],
                       state["model.decode_head.embed_layers_image.3.proj.weight"])

    # cmda evaluate's model on the CMDA file vs on the converted file (reads served from memory: B5 is ~700 MB)
    converted = cc.as_cmda_checkpoint(imp)
    files = {tmp_path / "cmda.pth": mmcv_file(state), tmp_path / "converted.pt": converted}
    monkeypatch.setattr(cc, "read_checkpoint_object", lambda p: files[Path(p)])
    direct, cfg, _ = load_for_inference(tmp_path / "cmda.pth")
    via, cfg2, raw = load_for_inference(tmp_path / "converted.pt")
    assert cfg.model.backbone == cfg2.model.backbone == "mit_b5" and raw["format"] == FORMAT
    a, b = _logits(direct, size=32), _logits(via, size=32)
    assert set(a) == {"fusion", "image", "events"}
    for k in a:
        assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------- strictness
def _error(state) -> str:
    with pytest.raises(InputError) as exc:
        cc.import_cmda(Path("bad.pth"), mmcv_file(state))
    return exc.value.problem


def test_one_renamed_one_missing_one_misshaped_key_are_named():
    good = random_state(cmda_layout("mit_b0", ema=False, cyclegan=False))
    renamed = dict(good)
    renamed["model.backbone_image.block1.0.attn.qq.weight"] = renamed.pop("model.backbone_image.block1.0.attn.q.weight")
    msg = _error(renamed)
    assert "model.backbone_image.block1.0.attn.qq.weight" in msg and "map nowhere" in msg
    assert "missing key(s) [model.backbone_image.block1.0.attn.q.weight]" in msg

    missing = dict(good)
    del missing["model.fusion_module.basic_block.3.mlp.fc2.bias"]
    msg = _error(missing)
    assert "1 missing key(s) [model.fusion_module.basic_block.3.mlp.fc2.bias]" in msg and "map nowhere" not in msg

    shaped = dict(good)
    shaped["model.decode_head.fuse_layer_image.bottleneck.conv.weight"] = torch.zeros(256, 1024, 1, 1)
    shaped["model.decode_head.fuse_layer_events.bottleneck.conv.weight"] = torch.zeros(256, 1024, 1, 1)
    shaped["model.decode_head.fuse_layer_fusion.bottleneck.conv.weight"] = torch.zeros(256, 1024, 1, 1)
    msg = _error(shaped)
    assert "model.decode_head.fuse_layer_image.bottleneck.conv.weight: file (256, 1024, 1, 1) vs model " \
           "(256, 1024, 3, 3)" in msg

    stray = dict(good)
    stray["model.decode_head.conv_seg_events.weight"] = torch.zeros(19, 256, 1, 1)
    assert "model.decode_head.conv_seg_events.weight" in _error(stray)
    lost_copy = dict(good)
    del lost_copy["model.decode_head.embed_layers_fusion.2.proj.bias"]
    assert "missing key(s) [model.decode_head.embed_layers_fusion.2.proj.bias]" in _error(lost_copy)


def test_isr_fusion_is_optional_and_differing_head_copies_warn():
    state = random_state(cmda_layout("mit_b0", isr=False, ema=False, cyclegan=False))
    imp = cc.import_cmda(Path("x.pth"), mmcv_file(state))
    assert imp.teacher is None and imp.cyclegan is None and not any("skipped" in n for n in imp.notes)
    state["model.decode_head.fuse_layer_events.aspp_modules.0.bn.bias"] = torch.ones(256)
    imp = cc.import_cmda(Path("x.pth"), mmcv_file(state))
    warning = [n for n in imp.notes if n.startswith("warning")]
    assert len(warning) == 1 and "fuse_layer_events.aspp_modules.0.bn.bias" in warning[0]
    assert torch.equal(imp.student["decode_head.fuse_layer.aspp_modules.0.bn.bias"],
                       state["model.decode_head.fuse_layer_image.aspp_modules.0.bn.bias"])


def test_backbone_is_detected_and_a_mismatch_named():
    for name in ("mit_b0", "mit_b2"):
        state = random_state(cmda_layout(name, ema=False, cyclegan=False, isr=False))
        assert cc.import_cmda(Path("x.pth"), mmcv_file(state)).backbone == name
    with pytest.raises(InputError, match="CMDA checkpoint is for mit_b2, this run uses mit_b5"):
        cc.import_cmda(Path("x.pth"), mmcv_file(state), backbone="mit_b5")
    odd = {k: v for k, v in state.items() if not k.startswith("model.backbone_image.block3.5.")}
    with pytest.raises(InputError, match=r"model.backbone_image is no MiT-B0..B5: depths \[3, 4, 5, 3\]"):
        cc.import_cmda(Path("x.pth"), mmcv_file(odd))


def test_other_layouts_say_what_they_look_like(tmp_path):
    from train.models import mit

    cases = {
        "imagenet.pth": ({**mit("mit_b0").state_dict(), "head.weight": torch.zeros(1000, 256)},
                         "ImageNet MiT encoder file (mit_b0"),
        "gan.pth": (ResnetGenerator().state_dict(), "CycleGAN generator file"),
        "daformer.pth": ({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(1),
                                         "decode_head.conv_seg.weight": torch.zeros(1)}}, "single-encoder mmseg"),
        "list.pth": ([1, 2], "a list"),
    }
    for name, (obj, phrase) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError) as exc:
            load_for_inference(tmp_path / name)
        assert phrase in exc.value.problem and "model.backbone_image.*" in exc.value.problem, name


# ---------------------------------------------------------------------- files and the CLI
def test_teacher_cyclegan_and_convert_from_a_b0_file(b0_file, tmp_path):
    student, _, _ = load_for_inference(b0_file)
    teacher, _, _ = load_for_inference(b0_file, teacher=True)
    state = torch.load(b0_file)["state_dict"]
    assert torch.equal(student.state_dict()["backbone_events.norm4.weight"],
                       state["model.backbone_events.norm4.weight"])
    assert torch.equal(teacher.state_dict()["backbone_events.norm4.weight"],
                       state["ema_model.backbone_events.norm4.weight"])
    gan = load_cyclegan(b0_file)  # --cyclegan accepts the CMDA file
    assert torch.equal(gan.state_dict()["model.26.weight"], state["cyclegan_itrd2en.model.26.weight"])

    out = tmp_path / "converted.pt"
    result = CliRunner().invoke(app, ["convert", str(b0_file), str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped unused groups: model.fusion_isr_module.*" in result.output and "mit_b0" in result.output
    conv = load_checkpoint(out)
    assert conv["backbone"] == "mit_b0" and conv["optimizer"] is None
    for a, b in ((student, False), (teacher, True)):
        via, _, _ = load_for_inference(out, teacher=b)
        la, lb = _logits(a), _logits(via)
        assert all(torch.equal(la[k], lb[k]) for k in la)
    assert torch.equal(load_cyclegan(out).state_dict()["model.1.bias"], state["cyclegan_itrd2en.model.1.bias"])


def test_cli_evaluate_and_predict_take_the_cmda_file(b0_file, tree, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(b0_file), "--config", str(tree), "--limit", "1", "--device", "cpu",
                              "--out", str(tmp_path / "eval"), "--teacher"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval" / "metrics.json").exists() and "mIoU" in res.output
    res = runner.invoke(app, ["predict", str(b0_file), "--config", str(tree), "--limit", "1", "--device", "cpu",
                              "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == 1 and "student" in res.output


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    no_teacher = tmp_path / "student_only.pth"
    torch.save(mmcv_file(random_state(cmda_layout("mit_b0", ema=False, cyclegan=False))), no_teacher)
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(no_teacher), "--teacher", "--device", "cpu"])
    assert res.exit_code == 2 and "no ema_model.* (teacher) weights" in res.output
    assert len(res.output.strip().splitlines()) == 1
    torch.save({"foo": 1}, tmp_path / "foo.pth")
    res = runner.invoke(app, ["convert", str(tmp_path / "foo.pth"), str(tmp_path / "out.pt")])
    assert res.exit_code == 2 and "neither a cmda checkpoint nor CMDA's released layout" in res.output
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(InputError, match=r"no cyclegan_itrd2en\.\* weights"):
        load_cyclegan(no_teacher)


def test_train_init_starts_from_the_cmda_student(b0_file, training_tree, tmp_path):
    from tests.test_train import tiny_config
    from train.engine import loop as dacs

    cfg = tiny_config(training_tree, tmp_path / "run", iters=1)
    cfg.model.head_channels, cfg.model.init = 256, str(b0_file)
    dacs.train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "iter_000001.pt")
    file = torch.load(b0_file)["state_dict"]
    teacher = ckpt["teacher"]  # the EMA teacher is not updated at iteration 0: still the initial student
    for ours, theirs in (("backbone_image.block2.1.attn.kv.weight", "backbone_image.block2.1.attn.kv.weight"),
                         ("fusion_module.blocks.7.norm2.bias", "fusion_module.basic_block.7.norm2.bias"),
                         ("decode_head.conv_seg.weight", "decode_head.conv_seg.weight")):
        assert torch.equal(teacher[ours], file["model." + theirs]), ours
        assert not torch.equal(ckpt["student"][ours], file["model." + theirs]), ours  # one AdamW step away
    assert all(s["step"] == 1 for s in ckpt["optimizer"]["state"].values())  # fresh optimiser

    with pytest.raises(InputError, match="CMDA checkpoint is for mit_b0, this run uses mit_b1"):
        cc.init_weights(b0_file, "mit_b1", 19, 256)
    with pytest.raises(InputError, match="head width of 256; this run uses 19 and 16"):
        cc.init_weights(b0_file, "mit_b0", 19, 16)
    with pytest.raises(InputError, match="no optimiser state"):
        dacs.train(tiny_config(training_tree, None, iters=2), resume=tmp_path / "converted.pt"
                   if (tmp_path / "converted.pt").exists() else _converted(b0_file, tmp_path))


def _converted(src: Path, folder: Path) -> Path:
    out = folder / "converted.pt"
    cc.convert(src, out, say=lambda _msg: None)
    return out


def test_cmda_export_takes_cmdas_released_layout(b0_file, tmp_path):
    """``cmda export`` reads CMDA's mmcv file through the same loader as evaluate (student weights, ISR fusion
    skipped) and writes a graph that agrees with PyTorch on that model."""
    pytest.importorskip("onnxruntime", reason="deploy extra not installed (pip install -e '.[test]')")
    out = tmp_path / "cmda.onnx"
    res = CliRunner().invoke(app, ["export", str(b0_file), "--out", str(out), "--height", "64", "--width", "64"])
    assert res.exit_code == 0, res.output
    onnx = pytest.importorskip("onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["cmda.backbone"] == "mit_b0" and meta["cmda.checkpoint"] == "cmda_b0.pth"
    assert meta["cmda.height"] == "64" and meta["cmda.second_input"] == "events"
    assert "argmax agreement 100.000 %" in res.output
