"""`cmda export` and `cmda stream` on a tiny raw DSEC sequence (tests/raw_tree.py) and random MiT-B0 weights.

One B0 checkpoint (narrow head, test_scale 0.2 so a 440x640 frame costs little) is exported once at the
test geometry and shared by the tests: the ONNX model is compared with PyTorch, streamed, and its
metadata checked. Exports of other settings (fp16, another backbone/bins/variant, dynamic shapes) take
~20 s of CPU each and are marked slow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.config import load_config
from pipeline.errors import STOPPED_EXIT, InputError
from pipeline.store import VoxelStore
from tests.raw_tree import SEQ, TEST_FRAMES, raw_tree
from train.checkpoints.files import save_checkpoint
from train.checkpoints.inference import predict_logits
from train.config import TrainConfig, apply_variant, to_dict
from train.data.loaders import NightTest
from train.deploy.export import DeploymentGraph, fold_event_channels
from train.deploy.onnx_runtime import open_onnx
from train.deploy.stream import window_grids
from train.models import CMDAModel

onnx = pytest.importorskip("onnx", reason="deploy extra not installed (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="deploy extra not installed (pip install -e '.[test]')")


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _fails(args: list[str], *needles: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _checkpoint(path: Path, backbone: str = "mit_b0", variant: str = "baseline", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = apply_variant(TrainConfig(), variant)
    cfg.model.backbone, cfg.model.head_channels, cfg.data.test_scale = backbone, 32, 0.2
    model = CMDAModel(backbone, head_channels=32)
    with torch.no_grad():  # BatchNorm statistics away from the identity, so folding/export see real numbers
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    save_checkpoint(path, iteration=7, student=model, teacher=None, optimizer=None, config=to_dict(cfg))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return raw_tree(tmp_path_factory.mktemp("deploy_tree"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("deploy_run") / "checkpoints" / "iter_7.pt")


@pytest.fixture(scope="module")
def exported(tree, ckpt) -> tuple[Path, str]:
    out = ckpt.parent / "b0.onnx"
    output = _ok(["export", ckpt, "--out", out, "--config", tree])
    return out, output


def _student(path: Path) -> tuple[CMDAModel, TrainConfig]:
    from train.deploy.export import load_model

    model, cfg, _ = load_model(path)
    return model, cfg


def test_export_reports_the_check_and_writes_a_self_contained_model(exported):
    path, output = exported
    assert "checked on test frame zurich_city_09_a_000002" in output and "1x1 at 440x640" in output
    assert [p.name for p in path.parent.iterdir() if p.name.startswith("b0.onnx")] == ["b0.onnx"]  # no .data
    model = open_onnx(path)
    assert (model.height, model.width, model.event_channels, model.output) == (440, 640, 1, "logits")
    assert model.metadata["backbone"] == "mit_b0" and model.metadata["bins"] == "1"
    assert model.metadata["test_scale"] == "0.2" and model.metadata["iteration"] == "7"


def test_export_into_a_folder_and_an_unwritable_out(tree, ckpt, tmp_path):
    """--out FOLDER writes <checkpoint>.onnx in it (it used to fail after the export, naming a temp file)."""
    folder = tmp_path / "exports"
    folder.mkdir()
    out = _ok(["export", ckpt, "--out", folder, "--config", tree])
    assert [p.name for p in folder.iterdir()] == [ckpt.with_suffix(".onnx").name], out
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = CliRunner().invoke(app, [str(a) for a in ["export", ckpt, "--out", blocker / "m.onnx", "--config", tree]])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [f"error: {blocker}: File exists"], res.output


def test_exported_b0_matches_pytorch_on_test_frames_and_random_frames(tree, ckpt, exported):
    """fp32: max |logit difference| <= 1e-3 and argmax agreement >= 99.9 % against the 3-channel PyTorch model."""
    model, cfg = _student(ckpt)
    sess = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    test = NightTest(load_config(tree), cfg.data)
    rng = np.random.default_rng(1)
    frames = [(test[i]["image"][None], test[i]["events"][None]) for i in range(len(test))]
    frames.append((torch.from_numpy(rng.standard_normal((1, 3, 440, 640)).astype(np.float32)),
                   torch.from_numpy(np.repeat(rng.uniform(-1, 1, (1, 1, 440, 640)).astype(np.float32), 3, 1))))
    for image, events in frames:
        expected = predict_logits(model, image, events, ("fusion",), scale=cfg.data.test_scale)["fusion"].numpy()
        got = sess.run(None, {"image": image.numpy(), "events": events[:, :1].numpy()})[0]
        assert got.shape == expected.shape == (1, 19, 440, 640)
        assert np.abs(got - expected).max() <= 1e-3
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_folded_one_channel_encoder_equals_three_channel_model(ckpt):
    model, cfg = _student(ckpt)
    torch.manual_seed(3)
    image, ev1 = torch.randn(1, 3, 96, 128), torch.rand(1, 1, 96, 128) * 2 - 1
    folded = fold_event_channels(model.backbone_events)
    assert folded.patch_embed1.proj.in_channels == 1 and model.backbone_events.patch_embed1.proj.in_channels == 3
    with torch.no_grad():
        for a, b in zip(folded(ev1), model.backbone_events(ev1.repeat(1, 3, 1, 1)), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        graph = DeploymentGraph(model, bins=1, scale=cfg.data.test_scale)
        expected = predict_logits(model, image, ev1.repeat(1, 3, 1, 1), ("fusion",), scale=cfg.data.test_scale)
        torch.testing.assert_close(graph(image, ev1), expected["fusion"], atol=1e-4, rtol=1e-4)


def test_stream_windows_equal_the_preprocessed_store(tree):
    cfg = load_config(tree)
    store = VoxelStore.open(cfg.dsec.out / SEQ / "events.zarr", bins=1)
    valid = store.index("valid")
    frames = [int(f) for f in np.flatnonzero(valid)]
    assert len(frames) >= 5
    seen = 0
    for raw in window_grids(cfg, SEQ, frames):
        assert raw.start == store.index("window_start")[raw.frame] and raw.stop == store.index("window_stop")[raw.frame]
        np.testing.assert_array_equal(raw.grid, store.voxels(raw.frame))
        warped = cv2.imread(str(cfg.dsec.out / SEQ / "warp_images" / f"{raw.frame:06d}.png"))[..., ::-1]
        np.testing.assert_array_equal(raw.rgb, warped)
        seen += 1
    assert seen == len(frames)


def _pngs(folder: Path, frames) -> dict[int, np.ndarray]:
    return {f: cv2.imread(str(folder / f"{SEQ}_{f:06d}_pred.png")) for f in frames}


def test_stream_checkpoint_predictions_equal_cmda_predict(tree, ckpt, tmp_path):
    _ok(["predict", ckpt, "--config", tree, "--out", tmp_path / "predict", "--device", "cpu"])
    out = _ok(["stream", "--seq", "zurich_city_09a", "--model", ckpt, "--config", tree, "--out", tmp_path / "stream",
               "--device", "cpu", "--video", "--first", "2", "--limit", "4"])
    for stage in ("read", "voxelise", "warp", "normalise", "model"):
        assert stage in out
    assert "frames/s end to end" in out
    streamed, predicted = _pngs(tmp_path / "stream", TEST_FRAMES), _pngs(tmp_path / "predict", TEST_FRAMES)
    for f in TEST_FRAMES:
        assert streamed[f] is not None and predicted[f] is not None
        np.testing.assert_array_equal(streamed[f], predicted[f])
    n = len(list((tmp_path / "stream").glob("*_pred.png")))
    cap = cv2.VideoCapture(str(tmp_path / "stream" / f"{SEQ}.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert n == 4 and count == n  # images 2..5


@pytest.mark.parametrize("at", [0, 3])
def test_ctrl_c_stops_the_stream_with_what_it_did_and_no_video(tree, ckpt, tmp_path, monkeypatch, at):
    """Stopping a replay is normal use: the frames done are reported and kept, an incomplete video is not
    written under the video's name, and the exit status says it was interrupted (130, as `cmda train`)."""
    import train.deploy.stream as stream_mod

    real, calls = stream_mod.write_png, []

    def interrupt_at(path, image, **kw):
        if len(calls) == at:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, image, **kw)

    monkeypatch.setattr(stream_mod, "write_png", interrupt_at)
    out = tmp_path / "stream"
    res = CliRunner().invoke(app, [str(a) for a in ["stream", "--seq", SEQ, "--model", ckpt, "--config", tree,
                                                    "--out", out, "--device", "cpu", "--video", "--limit", "6"]])
    assert res.exit_code == STOPPED_EXIT, (res.exit_code, res.output)
    assert f"interrupted after {at} of 6 frame(s)" in res.output
    assert "no video written" in res.output
    assert len(list(out.glob("*_pred.png"))) == at
    assert not list(out.glob("*.mp4")) and not list(out.glob(".*"))
    assert ("total" in res.output) == (at > 0)  # the stage table of the frames done


def test_stream_onnx_agrees_with_checkpoint_and_realtime_counts_deadlines(tree, ckpt, exported, tmp_path):
    from train.deploy.stream import stream

    a = stream(SEQ, ckpt, config=tree, out=tmp_path / "pt", device="cpu", progress=False, limit=3)
    b = stream(SEQ, exported[0], config=tree, out=tmp_path / "onnx", realtime=True, progress=False, limit=3)
    assert a.frames == b.frames == 3 and b.missed is not None and 0 <= b.missed <= 3
    for f in range(1, 4):
        pa, pb = (cv2.imread(str(tmp_path / d / f"{SEQ}_{f:06d}_pred.png")) for d in ("pt", "onnx"))
        assert (pa == pb).all(axis=2).mean() >= 0.999


def _fake_onnx(path: Path, h: int, w: int, channels: int) -> Path:
    """A tiny valid model with cmda's input names (labels = zeros), to test the shape checks cheaply."""
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w])
    events = helper.make_tensor_value_info("events", TensorProto.FLOAT, [1, channels, h, w])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, h, w])
    node = helper.make_node("Mul", ["image", "image"], ["logits"])
    model = helper.make_model(helper.make_graph([node], "fake", [image, events], [logits]),
                              opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path))
    return path


def test_bad_inputs_are_one_line_errors(tree, ckpt, tmp_path, monkeypatch):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    _fails(["export", junk, "--config", tree], "junk.pt")
    _fails(["stream", "--seq", SEQ, "--model", junk, "--config", tree], "junk.pt")
    _fails(["stream", "--seq", SEQ, "--model", _fake_onnx(tmp_path / "small.onnx", 64, 128, 1), "--config", tree],
           "small.onnx", "128x64")
    _fails(["stream", "--seq", SEQ, "--model", _fake_onnx(tmp_path / "bins.onnx", 440, 640, 5), "--config", tree],
           "bins.onnx", "5 event channel")
    (tmp_path / "text.onnx").write_text("nope")
    _fails(["stream", "--seq", SEQ, "--model", tmp_path / "text.onnx", "--config", tree], "text.onnx")
    # an unsupported setting: the event encoder takes 3 channels, 5 bins cannot feed it
    _fails(["export", ckpt, "--config", tree, "--bins", "5"], "5 bins")
    # a sequence whose images all come before the first event
    root = tmp_path / "early"
    shutil.copytree(tree.parent / "DSEC", root / "DSEC")
    (root / "datasets.yaml").write_text(tree.read_text())
    ts = root / "DSEC" / SEQ / "images" / "timestamps.txt"
    ts.write_text("".join(f"{1_000 + 10 * i}\n" for i in range(8)))
    _fails(["stream", "--seq", SEQ, "--model", ckpt, "--config", root / "datasets.yaml"], "timestamps.txt",
           "no image after the event stream starts")
    # onnxruntime missing: the commands say which extra to install
    import importlib

    real = importlib.import_module

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_ort)
    _fails(["export", ckpt, "--config", tree], "onnxruntime is not installed", ".[deploy]")
    _fails(["stream", "--seq", SEQ, "--model", tmp_path / "small.onnx", "--config", tree], ".[deploy]")


@pytest.mark.slow
def test_fp16_export_agrees_with_fp32_pytorch(tree, ckpt, tmp_path):
    out = tmp_path / "b0_fp16.onnx"
    text = _ok(["export", ckpt, "--out", out, "--config", tree, "--fp16"])
    assert "fp16" in text
    model, cfg = _student(ckpt)
    test = NightTest(load_config(tree), cfg.data)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for i in range(len(test)):
        image, events = test[i]["image"][None], test[i]["events"][None]
        expected = predict_logits(model, image, events, ("fusion",), scale=cfg.data.test_scale)["fusion"]
        got = sess.run(None, {"image": image.numpy(), "events": events[:, :1].numpy()})[0]
        assert (got.argmax(1) == expected.argmax(1).numpy()).mean() >= 0.99


@pytest.mark.slow
def test_export_other_backbone_bins_and_variant_with_label_output(tmp_path):
    tree3 = raw_tree(tmp_path / "tree3", bins=3)
    ckpt = _checkpoint(tmp_path / "run" / "iter_7.pt", backbone="mit_b1", variant="masked_event", seed=1)
    out = tmp_path / "b1.onnx"
    _ok(["export", ckpt, "--out", out, "--config", tree3, "--argmax"])
    m = open_onnx(out)
    assert (m.event_channels, m.output, m.metadata["backbone"], m.metadata["variant"]) == (
        3, "labels", "mit_b1", "masked_event")
    model, cfg = _student(ckpt)
    item = NightTest(load_config(tree3), cfg.data)[0]
    expected = predict_logits(model, item["image"][None], item["events"][None], ("fusion",),
                              scale=cfg.data.test_scale)["fusion"].argmax(1).numpy()
    got = m.session.run(None, {"image": item["image"][None].numpy(), "events": item["events"][None].numpy()})[0]
    assert got.dtype == np.uint8 and (got == expected).mean() >= 0.999
    _ok(["stream", "--seq", SEQ, "--model", out, "--config", tree3, "--out", tmp_path / "s", "--limit", "2"])


@pytest.mark.slow
def test_dynamic_export_runs_at_other_sizes(tree, tmp_path):
    ckpt = _checkpoint(tmp_path / "run" / "iter_7.pt")
    out = tmp_path / "dyn.onnx"
    _ok(["export", ckpt, "--out", out, "--config", tree, "--dynamic"])
    model, cfg = _student(ckpt)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for h, w in ((440, 640), (256, 320)):
        image, ev = torch.randn(1, 3, h, w), torch.rand(1, 1, h, w)
        expected = predict_logits(model, image, ev.repeat(1, 3, 1, 1), ("fusion",), scale=cfg.data.test_scale)
        got = sess.run(None, {"image": image.numpy(), "events": ev.numpy()})[0]
        assert got.shape == (1, 19, h, w) and np.abs(got - expected["fusion"].numpy()).max() <= 1e-3


def test_a_model_that_fails_the_check_is_not_written(tree, ckpt, tmp_path, monkeypatch):
    """The export is compared before it is renamed into place: a disagreeing model leaves nothing behind."""
    import train.deploy.export as export

    monkeypatch.setattr(export, "_export_onnx", lambda graph, example, path, *settings: _fake_onnx(
        Path(path), 440, 640, 1))
    monkeypatch.setattr(export, "compare", lambda got, expected, argmax: (0.5, 0.9))
    out = tmp_path / "bad.onnx"
    _fails(["export", ckpt, "--out", out, "--config", tree], "disagrees with PyTorch", "90.000 %", "not written")
    assert list(tmp_path.iterdir()) == []


def test_an_image_only_checkpoint_exports_with_an_isr_input_and_stream_refuses_it(tree, tmp_path):
    """An image + ISR model (Dark Zurich / ACDC) has no event input. Export gives it an ``isr`` input (the
    one-channel ISR, folded as 1-bin events are) and checks it against PyTorch; ``cmda stream``, which
    replays DSEC events, refuses both the checkpoint and the exported model. (Before, both commands took
    it silently: an "events" input the model never saw, DSEC events into its ISR encoder.)"""
    from train.config import apply_target
    from train.data.image_only import night_isr
    from train.data.loaders import normalize_image
    from train.deploy.onnx_runtime import ort_session

    cfg = apply_target(TrainConfig(), "darkzurich")
    cfg.model.backbone, cfg.model.head_channels = "mit_b0", 32
    torch.manual_seed(3)
    model = CMDAModel("mit_b0", head_channels=32, fusion=cfg.model.fusion)
    path = tmp_path / "dz" / "iter_1.pt"
    save_checkpoint(path, iteration=1, student=model, teacher=None, optimizer=None, config=to_dict(cfg))
    out = tmp_path / "dz.onnx"
    line = _ok(["export", path, "--out", out, "--height", "128", "--width", "224"])
    assert "image 1x3 and isr 1x1 at 128x224" in line and "image and its ISR" in line
    sess = ort_session(out)
    assert [i.name for i in sess.get_inputs()] == ["image", "isr"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["cmda.second_input"] == "isr" and meta["cmda.target"] == "darkzurich"
    # a frame of its own: what cmda predict --target darkzurich feeds the model (image, ISR x 3)
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (128, 224, 3)).astype(np.uint8)
    image, isr = normalize_image(img)[None], night_isr(img)[None]
    got = sess.run(None, {"image": image, "isr": isr})[0]
    model.eval()
    with torch.no_grad():
        ref = predict_logits(model, torch.from_numpy(image), torch.from_numpy(np.repeat(isr, 3, axis=1)),
                             ("fusion",), amp=False, scale=cfg.data.test_scale)["fusion"].numpy()
    assert np.abs(got - ref).max() <= 1e-3
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.999
    _fails(["export", path, "--bins", "3"], "iter_1.pt", "--bins 3 does not apply")
    _fails(["stream", "--seq", SEQ, "--model", path, "--config", tree, "--out", tmp_path / "s"], "iter_1.pt",
           "image + ISR model", "cmda export")
    _fails(["stream", "--seq", SEQ, "--model", out, "--config", tree, "--out", tmp_path / "s"], "dz.onnx",
           "image + ISR model")
    assert not (tmp_path / "s").exists()
    with pytest.raises(InputError, match="image \\+ ISR"):
        open_onnx(out)
