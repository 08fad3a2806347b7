"""Training on another event representation than CMDA's voxel grid (train/data/events_input.py).

The tree is the trainer tests' processed tree (tests/trees.py) plus an RVT histogram store written as
``cmda preprocess`` writes one, and a datasets.yaml that lists it; the model is the tiny MiT-B0 of
tests/test_train.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import representations as reps
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.store import REPRESENTATION_ARRAY, FrameChunks, mark_complete, open_for_writing, write_index_arrays
from tests.trees import N_FRAMES, SEQ
from tests.trees import training_tree as build_tree
from train.checkpoints.files import load_checkpoint
from train.checkpoints.inference import REPRESENTATION_KEY, load_for_inference
from train.data.events_input import EventInput, from_record, network_events, resolve
from train.data.loaders import NightTest
from train.engine import loop as dacs
from train.eval.evaluate import evaluate_checkpoint

HIST = reps.HistogramSettings(bins=2, cutoff=4)  # 4 channels


def write_kind_store(processed: Path, s: reps.Settings, h: int, w: int, seed: int = 0) -> Path:
    """A complete store of setting ``s`` beside the tree's voxel store, random frames in the kind's dtype."""
    path = processed / SEQ / "representations" / f"{reps.store_suffix(s)}.zarr"
    dtype = reps.frame_dtype(s)
    attrs = {"representation": {**reps.describe(s), "suffix": reps.store_suffix(s), "channels": reps.channels(s),
                                "dtype": dtype.name}}
    group, _, _ = open_for_writing(path, {"settings": reps.describe(s)}, frames=N_FRAMES, bins=reps.channels(s),
                                   height=h, width=w, cname="lz4", clevel=1, array=REPRESENTATION_ARRAY,
                                   dtype=dtype.name, extra_attrs=attrs)
    writer = FrameChunks(path, REPRESENTATION_ARRAY)
    rng = np.random.default_rng(seed)
    for f in range(N_FRAMES):
        writer.write(f, rng.integers(0, 3, (reps.channels(s), h, w)).astype(dtype))
    zeros = np.zeros(N_FRAMES, np.int64)
    write_index_arrays(group, {"timestamps": zeros, "event_index": zeros, "window_start": zeros,
                               "window_stop": zeros, "event_count": zeros, "valid": np.ones(N_FRAMES, bool)})
    mark_complete(group, path, {})
    return path


def with_kinds(yaml: Path, kinds: str) -> Path:
    text = yaml.read_text()
    yaml.write_text(text + f"representation:\n  kinds: {kinds}\n")
    return yaml


@pytest.fixture(scope="module")
def hist_tree(tmp_path_factory) -> Path:
    """datasets.yaml of the training tree with a histogram_b2_c4 store listed in representation.kinds."""
    root = tmp_path_factory.mktemp("hist_tree")
    yaml = build_tree(root)
    write_kind_store(root / "processed", HIST, 480, 640)
    return with_kinds(yaml, "[voxel, {kind: histogram, bins: 2, cutoff: 4}]")


def tiny(datasets: Path, out: Path, kind: str = "histogram", iters: int = 2):
    from tests.test_train import tiny_config

    cfg = tiny_config(datasets, out, iters=iters)
    cfg.representation.kind = kind
    return cfg


def test_resolve_by_kind_or_store_name(hist_tree):
    dcfg = load_config(hist_tree)
    assert resolve("histogram", dcfg) == resolve("histogram_b2_c4", dcfg) == EventInput(HIST)
    assert resolve("voxel", dcfg).settings == reps.VoxelSettings(1)
    with pytest.raises(InputError, match=r"not among representation\.kinds"):
        resolve("mdes", dcfg)


def test_network_events_scales_each_kind():
    h = np.array([[[0, 2, 4]]], np.uint8)
    np.testing.assert_allclose(network_events(HIST, h, 0), [[[0, 0.5, 1]]])
    m = np.array([[[-32, 0, 16]]], np.int8)
    np.testing.assert_allclose(network_events(reps.MdesSettings(1, 32), m, 0), [[[-1, 0, 0.5]]])
    ts = np.array([[[0.25]]], np.float32)
    assert network_events(reps.TimeSurfaceSettings(), ts, 0).dtype == np.float32


def test_loader_reads_the_kinds_store(hist_tree):
    item = NightTest(load_config(hist_tree), tiny(hist_tree, None).data, events=EventInput(HIST))[0]
    assert item["events"].shape[0] == 4
    assert set(np.unique(item["events"].numpy() * 4).tolist()) <= {0.0, 1.0, 2.0}


def test_train_records_the_representation_and_evaluate_reads_it(hist_tree, tmp_path):
    res = dacs.train(tiny(hist_tree, tmp_path / "run"))
    state = load_checkpoint(Path(res["checkpoint"]))
    rec = state[REPRESENTATION_KEY]
    assert rec == {"kind": "histogram", "bins": 2, "cutoff": 4, "rvt_wrap": False, "suffix": "histogram_b2_c4",
                   "channels": 4, "network_channels": 4}
    assert state["student"]["backbone_events.patch_embed1.proj.weight"].shape[1] == 4
    assert state["student"]["backbone_image.patch_embed1.proj.weight"].shape[1] == 3
    model, _, _ = load_for_inference(Path(res["checkpoint"]))
    assert model.backbone_events.patch_embed1.proj.in_channels == 4
    summary = evaluate_checkpoint(Path(res["checkpoint"]), limit=1, device="cpu")
    assert 0.0 <= summary["outputs"]["fusion"]["mIoU"] <= 1.0
    day = evaluate_checkpoint(Path(res["checkpoint"]), limit=1, device="cpu", domain="day")
    assert "fusion" in day["outputs"]


def test_evaluate_refuses_a_store_of_another_setting(hist_tree, tmp_path):
    res = dacs.train(tiny(hist_tree, tmp_path / "run", iters=1))
    ckpt = Path(res["checkpoint"])
    # the same store name now holding another setting (a hand-copied store): refused, naming it
    other = tmp_path / "tree"
    shutil.copytree(hist_tree.parent, other)
    store = other / "processed" / SEQ / "representations" / "histogram_b2_c4.zarr"
    shutil.rmtree(store)
    write_kind_store(other / "processed", reps.HistogramSettings(bins=2, cutoff=5), 480, 640)
    (other / "processed" / SEQ / "representations" / "histogram_b2_c5.zarr").rename(store)
    _fix_index(hist_tree.parent, other)
    with pytest.raises(InputError, match="expected") as err:
        evaluate_checkpoint(ckpt, datasets=other / "datasets.yaml", limit=1, device="cpu")
    assert "histogram_b2_c4.zarr" in str(err.value.path)
    # and no store of the checkpoint's setting at all
    shutil.rmtree(store)
    with pytest.raises(InputError, match="no histogram_b2_c4 store"):
        evaluate_checkpoint(ckpt, datasets=other / "datasets.yaml", limit=1, device="cpu")


def _fix_index(src: Path, root: Path) -> None:
    """index.csv of a copied tree: its absolute paths moved from ``src`` to the copy ``root``."""
    index = root / "processed" / "index.csv"
    index.write_text(index.read_text().replace(str(src), str(root)))


def test_voxel_checkpoint_without_record_means_voxel(hist_tree, tmp_path):
    """Checkpoints from before the record (and CMDA's files) load as CMDA's 3-channel voxel model."""
    res = dacs.train(tiny(hist_tree, tmp_path / "run", kind="voxel", iters=1))
    ckpt = Path(res["checkpoint"])
    state = torch.load(ckpt, weights_only=False)
    assert state[REPRESENTATION_KEY]["kind"] == "voxel"
    del state[REPRESENTATION_KEY]
    torch.save(state, ckpt)
    model, _, _ = load_for_inference(ckpt)
    assert model.backbone_events.patch_embed1.proj.in_channels == 3
    assert from_record(None, load_config(hist_tree)).settings == reps.VoxelSettings(1)
    assert "fusion" in evaluate_checkpoint(ckpt, limit=1, device="cpu")["outputs"]


def test_image_only_target_refuses_another_kind():
    from train.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.data.target = "darkzurich"
    cfg.model.fusion = "attention"
    cfg.representation.kind = "histogram"
    with pytest.raises(InputError, match=r"representation\.kind"):
        validate(cfg)


def test_inflated_imagenet_filters_keep_the_grey_response():
    from train.models.weights import FIRST_CONV, inflate_first_conv

    w = torch.randn(8, 3, 7, 7)
    model = torch.nn.Module()
    model.patch_embed1 = torch.nn.Module()
    model.patch_embed1.proj = torch.nn.Conv2d(5, 8, 7)
    out = inflate_first_conv({FIRST_CONV: w}, model)[FIRST_CONV]
    assert out.shape == (8, 5, 7, 7)
    torch.testing.assert_close(out.sum(dim=1), w.sum(dim=1))


def test_channels_of_each_kind_and_the_grey_inputs_widened():
    from train.uda.targets import widen

    assert EventInput(reps.VoxelSettings(1)).network_channels == 3  # CMDA's copy
    assert EventInput(reps.MdesSettings(bins=1)).network_channels == 3
    assert EventInput(reps.Ergo12Settings()).network_channels == 12
    assert EventInput(reps.VoxelDsecSettings(bins=5)).network_channels == 5
    isr = torch.rand(2, 1, 4, 4).expand(-1, 3, -1, -1)
    assert widen(isr, 3) is isr
    wide = widen(isr, 20)
    assert wide.shape == (2, 20, 4, 4) and torch.equal(wide[:, 7], isr[:, 0])
