"""DSEC-Semantic windows in any representation (``dsec_semantic.window.kind``): the default store unchanged,
each chunk equal to ``pipeline.representations.build`` on its events, the store's record of its kind, bad kinds
refused in one line, and a short supervised run on a histogram window that evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import ess_index as ei
from pipeline import ess_windows as ew
from pipeline import representations as reps
from pipeline.config import SemanticWindow, load_config
from pipeline.dsec import EventFile, load_rectify_map
from pipeline.dsec_semantic import sequence_paths
from pipeline.errors import InputError
from pipeline.voxel import rectifier
from tests.cli_checks import assert_one_line_error
from tests.test_dsec_semantic import TEST, TRAIN, make_sequence, small_tree, write_yaml
from train.data.dsec_semantic import SemanticTest, window_channels, window_input

HIST = "{kind: histogram, bins: 2, cutoff: 10}"

# window_settings of the default window (ESS's setting) before kinds existed: its stores must not be rebuilt.
DEFAULT_SETTINGS = {
    "mode": "events", "events": 2_000_000, "duration_us": None, "chunks": 20, "bins_per_chunk": 5, "bins": 100,
    "height": 440, "width": 640, "rows": "0-439 of the 640x480 rectified event frame", "sampling": "all",
    "window": "last `events` events with t + t_offset < label time, `chunks` runs of n // chunks from the oldest",
    "voxel": "DSEC VoxelGrid: trunc corners, tn = (bins-1)(t-t0)/(t1-t0) float32, no normalisation",
    "compressor": "blosc lz4 clevel 3 noshuffle"}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def kind_tree(root: Path, kind: str | None, **window) -> object:
    cfg = small_tree(root, window={**window, **({"kind": kind} if kind else {})})
    for name in (TRAIN, TEST):
        assert ew.preprocess_semantic_sequence(cfg, name, workers=1)["status"] == "built"
    return cfg


def chunk_events(cfg, seq: str):
    """Per stored label: the raw events of each chunk (from the store's chunk bounds) and the rectifier."""
    paths = sequence_paths(cfg, seq)
    rect = rectifier(load_rectify_map(paths.rectify_map), 480, 640)
    st = ei.open_store(cfg, seq)
    start, stop = st.index("chunk_start"), st.index("chunk_stop")
    with EventFile(paths.events) as ef:
        ev = ef.read(0, ef.n_events)
    return st, rect, ev, start, stop


# ---------------------------------------------------------------------------------------------- default
def test_default_settings_are_those_of_stores_built_before_kinds():
    assert ew.window_settings(SemanticWindow(), "lz4", 3, "all") == DEFAULT_SETTINGS
    assert list(ew.window_settings(SemanticWindow(), "lz4", 3, "all")) == list(DEFAULT_SETTINGS)  # key order too


@pytest.mark.parametrize("kind", [None, "voxel"])
def test_default_store_holds_label_window_bytes(tmp_path, kind):
    cfg = kind_tree(tmp_path, kind)
    w = cfg.dsec_semantic.window
    assert w.kind is None and window_channels(cfg) == w.chunks * w.bins
    st, rect, _, start, stop = chunk_events(cfg, TRAIN)
    assert "kind" not in st.settings and "representation" not in dict(st.group.attrs)
    paths = sequence_paths(cfg, TRAIN)
    with EventFile(paths.events) as ef:
        for k in (1, 5, 7):
            want = ew.label_window(ef, rect, start[k], stop[k], w.bins)
            got = st.voxels(k)
            assert got.dtype == np.float32 and got.tobytes() == want.tobytes() and want.any()
    assert window_input(cfg, st.voxels(7)) is not None and np.array_equal(window_input(cfg, st.voxels(7)), want)


# ---------------------------------------------------------------------------------------------- other kinds
@pytest.mark.parametrize("kind, dtype", [(HIST, np.uint8), ("{kind: time_surface, tau_us: 5000}", np.float32),
                                         ("{kind: mdes, bins: 3}", np.int8),
                                         ("{kind: voxel_dsec, bins: 2}", np.float32), ("ergo12", np.float32)])
def test_kind_window_is_build_per_chunk_stacked(tmp_path, kind, dtype):
    cfg = kind_tree(tmp_path, kind, mode="duration", duration_us=30_000)
    w = cfg.dsec_semantic.window
    c = reps.channels(w.kind)
    st, rect, ev, start, stop = chunk_events(cfg, TRAIN)
    assert st.settings["kind"] == reps.describe(w.kind) and st.settings["bins"] == w.chunks * c
    assert window_channels(cfg) == w.chunks * c
    for k in (0, 4, 7):
        got = st.voxels(k)
        assert got.shape == (w.chunks * c, 440, 640) and got.dtype == dtype
        want = [reps.build(w.kind, *(ev[f][a:b] for f in "xypt"), rect)[:, :440] if b > a
                else np.zeros((c, 440, 640), dtype) for a, b in zip(start[k], stop[k], strict=True)]
        np.testing.assert_array_equal(got, np.concatenate(want))
        assert got.any()
        assert ei.read_window(st, k, w.chunks).shape == (w.chunks, c, 440, 640)


def test_histogram_window_is_scaled_as_night_frames(tmp_path):
    cfg = kind_tree(tmp_path, HIST)
    ei.write_semantic_index(cfg)
    st = ei.open_store(cfg, TEST)
    item = SemanticTest(cfg, "test")[3]
    assert item["name"] == f"{TEST}_000003"
    raw = st.voxels(3)
    assert item["events"].dtype.is_floating_point and item["events"].shape == raw.shape
    np.testing.assert_allclose(item["events"].numpy(), raw / np.float32(10), rtol=1e-6)
    assert 0 < float(item["events"].max()) <= 1


def test_store_of_another_kind_is_refused_then_rebuilt(tmp_path):
    cfg = kind_tree(tmp_path, None, chunks=4, bins=4)  # 16 channels, as a 2-bin histogram's 4 x 4
    hist = load_config(write_yaml(tmp_path, window={"chunks": 4, "bins": 4, "kind": HIST}))
    assert window_channels(hist) == window_channels(cfg) == 16
    with pytest.raises(InputError, match="kind") as exc:
        ei.open_store(hist, TRAIN)
    assert "\n" not in str(exc.value)
    assert ew.preprocess_semantic_sequence(hist, TRAIN, workers=1)["status"] == "built"
    assert ei.open_store(hist, TRAIN).voxels(2).dtype == np.uint8
    with pytest.raises(InputError, match="kind"):
        ei.open_store(cfg, TRAIN)
    assert ew.preprocess_semantic_sequence(hist, TRAIN, workers=1)["status"] == "already complete"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind, needle", [
    ("sparkle", "unknown kind 'sparkle'"), ("{kind: histogram, bins: 0}", "histogram.bins must be"),
    ("{kind: histogram, colour: 3}", "unknown parameter(s) of histogram: colour"),
    ("{kind: voxel, bins: 3}", "dsec_semantic.window.bins"), ("[histogram]", "mapping with 'kind'"),
])
def test_bad_kind_is_one_line_naming_datasets_yaml(tmp_path, kind, needle):
    path = write_yaml(tmp_path, window={"kind": kind})
    with pytest.raises(InputError, match=r"dsec_semantic\.window\.kind") as exc:
        load_config(path)
    assert exc.value.path == path and needle in str(exc.value) and "\n" not in str(exc.value)
    res = cli("preprocess", "--dataset", "dsec-semantic", "--all", "--config", str(path))
    assert_one_line_error(res, "datasets.yaml", "dsec_semantic.window.kind", needle)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_supervised_run_on_a_histogram_window_evaluates(tmp_path):
    make_sequence(tmp_path / "tree", "train", TRAIN, "official")
    make_sequence(tmp_path / "tree", "test", TEST, "ess", seed=1)
    path = write_yaml(tmp_path, window={"kind": HIST})
    cfg = load_config(path)
    for args in (("preprocess", "--dataset", "dsec-semantic", "--all", "--workers", "1"),
                 ("index", "--dataset", "dsec-semantic")):
        res = cli(*args, "--config", str(path))
        assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = cli("train", "--target", "dsec-semantic", "--supervised", "--preset", "cpu-sample", "--iters", "3",
              "--config", str(path), "--out", str(run), "--device", "cpu", "--set", "run.eval_every=3",
              "--set", "run.ckpt_every=3", "--set", "run.eval_max=2", "--set", "data.workers=0",
              "--set", "model.pretrained=none")
    assert res.exit_code == 0, res.output
    ck = run / "checkpoints" / "iter_000003.pt"
    res = cli("evaluate", str(ck), "--config", str(path), "--device", "cpu", "--limit", "2")
    assert res.exit_code == 0 and "ESS mIoU" in res.output, res.output
    metrics = json.loads((run / "eval" / "iter_000003" / "metrics.json").read_text())
    assert np.asarray(metrics["outputs"]["events"]["confusion"]).sum() > 0
    assert window_channels(cfg) == 4 * 4  # 4 chunks x (2 polarities x 2 bins)
