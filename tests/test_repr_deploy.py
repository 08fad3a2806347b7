"""`cmda predict`/`evaluate`/`export`/`stream` with a checkpoint trained on another representation than the
voxel grid: they read (or, streaming, build) the checkpoint's kind and refuse anything else in one line.

The raw sequence of tests/raw_tree.py is preprocessed with several kinds; the checkpoint is a random MiT-B0
whose event encoder takes the histogram's 4 channels and whose record says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import representations as reps
from pipeline.config import load_config
from pipeline.dsec import SequencePaths
from pipeline.preprocess import preprocess_sequence
from pipeline.splits import write_index
from pipeline.store import RepresentationStore
from pipeline.warp import warp_sequence
from tests.raw_tree import SEQ, TEST_FRAMES, datasets_yaml, write_raw_sequence
from tests.test_deploy import _fails, _ok, _pngs
from train.checkpoints.files import save_checkpoint
from train.checkpoints.inference import REPRESENTATION_KEY
from train.config import TrainConfig, to_dict
from train.data.events_input import EventInput, from_record
from train.deploy.stream import SequenceReplay
from train.models import CMDAModel

KINDS = ("[voxel, {kind: histogram, bins: 2, cutoff: 4}, {kind: time_surface, tau_us: 20000}, "
         "{kind: mdes, bins: 3, cutoff: 8}, ergo12, {kind: voxel_dsec, bins: 3}]")
HIST = reps.HistogramSettings(bins=2, cutoff=4)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repr_deploy")
    write_raw_sequence(root)
    path = datasets_yaml(root)
    path.write_text(path.read_text().replace("representation:\n", f"representation:\n  kinds: {KINDS}\n"))
    cfg = load_config(path)
    preprocess_sequence(cfg, SEQ, workers=1)
    warp_sequence(SequencePaths(cfg.dsec.root, SEQ), cfg.dsec.out / SEQ, workers=1)
    write_index(cfg)
    return path


def _checkpoint(path: Path, events: EventInput) -> Path:
    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.model.backbone, cfg.model.head_channels, cfg.data.test_scale = "mit_b0", 32, 0.2
    cfg.representation.kind = events.suffix
    model = CMDAModel("mit_b0", head_channels=32, event_chans=events.network_channels)
    save_checkpoint(path, iteration=3, student=model, teacher=None, optimizer=None, config=to_dict(cfg),
                    extra={REPRESENTATION_KEY: events.record()})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("repr_run") / "checkpoints" / "iter_3.pt", EventInput(HIST))


def test_stream_builds_each_kind_as_the_store_holds_it(tree):
    """The replay's live frames (the checkpoint's kind, the same kernels) equal the preprocessed stores."""
    cfg = load_config(tree)
    replay = SequenceReplay(cfg, SEQ)
    try:
        frames = replay.frames()
        for s in (k for k in map(reps.parse_kind, cfg.representation.kinds) if k.kind != "voxel"):
            replay.use(EventInput(s))
            store = RepresentationStore.open(cfg.dsec.out / SEQ / "representations" / f"{reps.store_suffix(s)}.zarr")
            for raw in replay.replay(frames):
                np.testing.assert_array_equal(raw.grid, store.frame(raw.frame), err_msg=reps.store_suffix(s))
    finally:
        replay.close()


def test_predict_and_stream_agree_on_a_histogram_checkpoint(tree, ckpt, tmp_path):
    _ok(["predict", ckpt, "--config", tree, "--out", tmp_path / "predict", "--device", "cpu"])
    out = _ok(["stream", "--seq", SEQ, "--model", ckpt, "--config", tree, "--out", tmp_path / "stream",
               "--device", "cpu", "--first", "2", "--limit", "4"])
    assert "frames/s end to end" in out
    streamed, predicted = _pngs(tmp_path / "stream", TEST_FRAMES), _pngs(tmp_path / "predict", TEST_FRAMES)
    for f in TEST_FRAMES:
        assert streamed[f] is not None and predicted[f] is not None
        np.testing.assert_array_equal(streamed[f], predicted[f])


def test_export_carries_the_representation_and_streams(tree, ckpt, tmp_path):
    pytest.importorskip("onnxruntime", reason="deploy extra not installed")
    from train.deploy.onnx_runtime import open_onnx

    onnx = tmp_path / "hist.onnx"
    _ok(["export", ckpt, "--out", onnx, "--config", tree])
    model = open_onnx(onnx)
    assert model.event_channels == 4 and model.representation["suffix"] == "histogram_b2_c4"
    _ok(["stream", "--seq", SEQ, "--model", onnx, "--config", tree, "--out", tmp_path / "s", "--limit", "2"])
    assert len(list((tmp_path / "s").glob("*_pred.png"))) == 2
    _fails(["export", ckpt, "--out", tmp_path / "x.onnx", "--config", tree, "--bins", "1"],
           "histogram_b2_c4", "--bins 1")


def test_inference_refuses_a_tree_without_the_checkpoints_kind(tree, ckpt, tmp_path):
    """A datasets.yaml whose tree has no store of the checkpoint's setting: one line, exit 2, naming the store."""
    other = tmp_path / "tree"
    shutil.copytree(tree.parent, other, ignore=shutil.ignore_patterns("histogram_b2_c4.zarr"))
    for cmd in (["evaluate", ckpt, "--config", other / "datasets.yaml", "--limit", "1", "--device", "cpu"],
                ["predict", ckpt, "--config", other / "datasets.yaml", "--out", tmp_path / "p", "--device", "cpu"]):
        _fails(cmd, "histogram_b2_c4.zarr", "no histogram_b2_c4 store")


def test_a_record_that_no_kind_accepts_is_one_line(tree, tmp_path):
    bad = {"kind": "histogram", "bins": 0, "cutoff": 4, "suffix": "x", "channels": 0}
    with pytest.raises(Exception, match=r"histogram\.bins"):
        from_record(bad, load_config(tree), tmp_path / "c.pt")


def test_inspect_kinds_shows_every_listed_kind(tree, tmp_path):
    from train.eval.inspect_kinds import channel_names

    out = _ok(["inspect", "--kinds", "--config", tree, "--out", tmp_path / "k.png", "--frame", "5"])
    assert "k.png" in out
    img = cv2.imread(str(tmp_path / "k.png"))
    assert img is not None and img.shape[0] > 6 * 100  # image + six kinds' blocks
    assert channel_names(HIST) == ["p0 bin 0", "p0 bin 1", "p1 bin 0", "p1 bin 1"]
    _fails(["inspect", "--kinds", "--config", tree, "--frame", "999"], "no indexed frame 999")
