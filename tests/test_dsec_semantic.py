"""DSEC-Semantic: both layouts, ESS's windows against a plain NumPy reference, sampling, the store, the synthetic
tree, ESS's metrics, and one InputError naming the file for every malformed input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import ess_index as ei
from pipeline import ess_windows as ew
from pipeline.atomic import write_png
from pipeline.config import SemanticWindow, load_config
from pipeline.dsec import EventFile
from pipeline.dsec_semantic import (
    CITYSCAPES_TO_11,
    SemanticSequence,
    check_dsec_semantic,
    cityscapes_to_11,
    detect_layout,
    load_labels,
    read_label,
    sequence_paths,
)
from pipeline.errors import InputError
from pipeline.ess_metrics import confusion, iou_per_class, miou_annotated, miou_ess, pixel_accuracy
from pipeline.events_h5 import write_events_h5
from tests.dsec_fixtures import SYN_T_OFFSET, synthetic_events, synthetic_rectify_map, write_rectify_map

TRAIN, TEST = "zurich_city_00_a", "zurich_city_13_a"
WINDOW = {"mode": "events", "events": 20_000, "chunks": 4, "bins": 3}


@pytest.fixture(params=["generated", "real"])
def source(request):
    """None: events the test generates (always runs); else the real recording (skipped without ../shared)."""
    return request.getfixturevalue("real_dir") if request.param == "real" else None


# ---------------------------------------------------------------------------------------------- trees
def _labels(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        lab = rng.integers(0, 11, (440, 640)).astype(np.uint8)
        lab[rng.random((440, 640)) < 0.05] = 255
        out.append(lab)
    return out


def make_sequence(root: Path, split: str, name: str, layout: str, *, n_labels: int = 8, source: Path | None = None,
                  seed: int = 0, events_beside: bool = False) -> tuple[SemanticSequence, np.ndarray]:
    """One sequence in ``layout``: events (generated or the real recording), labels spread over the stream."""
    seq = SemanticSequence(root, split, name, layout)
    ev_dir = root / name / "events" / "left" if events_beside else seq.dir / "events" / "left"
    ev_dir.mkdir(parents=True)
    if source is None:
        x, y, p, t = synthetic_events(80_000, seed)
        write_events_h5(ev_dir / "events.h5", x, y, p, t, SYN_T_OFFSET)
        write_rectify_map(ev_dir / "rectify_map.h5", synthetic_rectify_map(seed))
    else:
        shutil.copy(source / "prophesee_gen3_vga" / "events.h5", ev_dir / "events.h5")
        shutil.copy(source / "prophesee_gen3_vga" / "rectify_map.h5", ev_dir / "rectify_map.h5")
    with EventFile(ev_dir / "events.h5") as ef:
        lo, hi = ef.t_offset + ef.t_first, ef.t_offset + ef.t_last
    ts = np.linspace(lo + 3_000, hi, n_labels).astype(np.int64)
    seq.timestamps.parent.mkdir(parents=True, exist_ok=True)
    seq.timestamps.write_text("".join(f"{v}\n" for v in ts))
    for k, lab in enumerate(_labels(np.random.default_rng(seed), n_labels)):
        write_png(seq.labels_dir / f"{k:06d}.png", lab)
    return seq, ts


def write_yaml(root: Path, window: dict | None = None, sampling: str = "all", train=(TRAIN,), test=(TEST,)) -> Path:
    w = {**WINDOW, **(window or {})}
    path = root / "datasets.yaml"
    path.write_text(f"dsec_semantic:\n  root: tree\n  out: processed\n  sampling: {sampling}\n"
                    f"  train: [{', '.join(train)}]\n  test: [{', '.join(test)}]\n"
                    f"  window: {{{', '.join(f'{k}: {v}' for k, v in w.items())}}}\n")
    return path


def small_tree(root: Path, layout: str = "official", source: Path | None = None, **yaml):
    """A train and a test sequence in ``layout`` and its datasets.yaml."""
    make_sequence(root / "tree", "train", TRAIN, layout, source=source)
    make_sequence(root / "tree", "test", TEST, layout, source=source, seed=1)
    return load_config(write_yaml(root, **yaml))


# ---------------------------------------------------------------------------------------------- reference
def ref_voxel(x, y, p, t, rmap, bins):
    """DSEC's VoxelGrid written out plainly (float32 time and weights, truncated corners), float64 sums."""
    grid = np.zeros((bins, 480, 640))
    if len(t) == 0:
        return grid
    xf, yf = rmap[y, x, 0], rmap[y, x, 1]
    t = t.astype(np.int64)
    span = t[-1] - t[0]
    tn = (np.float32(bins - 1) * ((t - t[0]).astype(np.float32) / np.float32(span)) if span > 0
          else np.zeros(len(t), np.float32))
    x0, y0, t0 = xf.astype(np.int64), yf.astype(np.int64), tn.astype(np.int64)  # truncation toward zero
    value = 2.0 * p.astype(np.float32) - 1.0
    for tl in (t0, t0 + 1):
        for yl in (y0, y0 + 1):
            for xl in (x0, x0 + 1):
                ok = (xl >= 0) & (xl < 640) & (yl >= 0) & (yl < 480) & (tl >= 0) & (tl < bins)
                w = value * (1 - np.abs(xl - xf)) * (1 - np.abs(yl - yf)) * (1 - np.abs(tl - tn))
                np.add.at(grid, (tl[ok], yl[ok], xl[ok]), w[ok])
    return grid


def ref_window(ev, t_offset, rmap, label_t, w: SemanticWindow) -> np.ndarray:
    """ESS's input of one label, from the raw arrays: selection by a mask, no index arithmetic shared."""
    t_abs = ev["t"].astype(np.int64) + t_offset
    if w.mode == "events":
        before = np.flatnonzero(t_abs < label_t)[-w.events:]
        size = len(before) // w.chunks
        chunks = [before[k * size:(k + 1) * size] for k in range(w.chunks)]
    else:
        step = w.duration_us / w.chunks
        start = label_t - w.duration_us
        chunks = [np.flatnonzero((t_abs >= start + k * step) & (t_abs < start + (k + 1) * step))
                  for k in range(w.chunks)]
    grids = [ref_voxel(ev["x"][c], ev["y"][c], ev["p"][c], ev["t"][c], rmap, w.bins) for c in chunks]
    return np.concatenate(grids)[:, :440]


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("variant", ["ess_code", "ess_readme"])
def test_both_layouts_read_the_same_labels(tmp_path, variant):
    off, _ = make_sequence(tmp_path / "a", "train", TRAIN, "official")
    ess, _ = make_sequence(tmp_path / "b", "train", TRAIN, "ess")
    if variant == "ess_readme":  # ESS's README draws semantic/left/11classes/data
        left = ess.dir / "semantic" / "left"
        left.mkdir()
        (ess.dir / "semantic" / "11classes").rename(left / "11classes")
    assert detect_layout(off.dir) == "official" and detect_layout(ess.dir) == "ess"
    a, b = load_labels(off), load_labels(ess)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert [f.name for f in a.files] == [f.name for f in b.files] == [f"{k:06d}.png" for k in range(8)]
    assert b.files[0].parent == ess.labels_dir
    for fa, fb in zip(a.files, b.files, strict=True):
        la, lb = read_label(fa), read_label(fb)
        assert la.shape == (440, 640) and la.dtype == np.uint8
        np.testing.assert_array_equal(la, lb)


def test_events_beside_the_sequence_at_the_root_are_found(tmp_path):
    seq, _ = make_sequence(tmp_path, "train", TRAIN, "official", events_beside=True)
    assert seq.events == tmp_path / TRAIN / "events" / "left" / "events.h5"
    assert seq.events.exists() and seq.rectify_map.exists()


def test_layout_detected_per_sequence_and_ambiguous_folders_refused(tmp_path):
    cfg = small_tree(tmp_path, "ess")
    assert sequence_paths(cfg, TRAIN).layout == "ess"
    (cfg.dsec_semantic.root / "train" / TRAIN / "11classes").mkdir()
    with pytest.raises(InputError, match="both of the DSEC-Semantic layouts") as exc:
        sequence_paths(cfg, TRAIN)
    assert exc.value.path == cfg.dsec_semantic.root / "train" / TRAIN
    with pytest.raises(InputError, match="neither"):
        detect_layout(tmp_path)


def test_cityscapes_mapping_to_11_classes():
    ids = np.array([*range(19), 255, 19, 254], np.uint8)
    got = cityscapes_to_11(ids)
    assert got.tolist() == [5, 6, 1, 9, 2, 4, 10, 10, 7, 7, 0, 3, 3, 8, 8, 8, 8, 8, 8, 255, 255, 255]
    assert len(CITYSCAPES_TO_11) == 19 and set(CITYSCAPES_TO_11) == set(range(11))


# ---------------------------------------------------------------------------------------------- windows
def test_count_chunks_rule():
    start, stop = ew.count_chunks(np.array([0, 7, 23, 1000]), n_events=20, chunks=4)
    assert start.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [3, 8, 13, 18], [980, 985, 990, 995]]
    assert stop.tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [8, 13, 18, 23], [985, 990, 995, 1000]]
    # 7 events, 4 chunks: one each, the newest 3 left out, as ESS slices them


def test_duration_boundaries_match_float_rule():
    b = ew.duration_boundaries(np.array([1_000_000]), 1_000, 3)
    exact = 1_000_000 - 1_000 + np.arange(4) * 1_000 / 3
    assert b[0].tolist() == np.ceil(exact).astype(int).tolist() == [999_000, 999_334, 999_667, 1_000_000]


def test_ess_sampling_rule():
    assert ew.ess_sample(20).tolist() == [6, 8, 10, 12, 14, 16, 18]
    assert ew.ess_sample(6).tolist() == [] and ew.ess_sample(8).tolist() == [6]
    assert ew.sampled_labels(5, "all").tolist() == [0, 1, 2, 3, 4]


def test_window_strictly_before_the_label(tmp_path):
    t = np.array([100, 200, 300, 300, 400, 500], np.uint32)
    write_events_h5(tmp_path / "e.h5", np.zeros(6, np.uint16), np.zeros(6, np.uint16), np.ones(6, np.uint8), t,
                    SYN_T_OFFSET)
    with EventFile(tmp_path / "e.h5") as ef:
        before = ew.count_before(ef, SYN_T_OFFSET + np.array([50, 100, 101, 300, 301, 500, 501, 900]))
        win = ew.plan_windows(ef, SYN_T_OFFSET + np.array([100, 300, 501, 502]),
                              SemanticWindow(events=2, chunks=2, bins=1))
    assert before.tolist() == [0, 0, 1, 2, 4, 5, 6, 6]
    assert win.valid.tolist() == [False, True, True, False]  # nothing before / inside / stream end + 1 / past it
    assert win.chunk_start[1].tolist() == [0, 1] and win.chunk_stop[1].tolist() == [1, 2]  # events at 300 left out


@pytest.mark.parametrize("mode", ["events", "duration"])
def test_store_matches_numpy_reference(tmp_path, source, mode):
    cfg = small_tree(tmp_path, source=source, window={"mode": mode, "duration_us": 30_000})
    w = cfg.dsec_semantic.window
    for name in (TRAIN, TEST):
        summary = ew.preprocess_semantic_sequence(cfg, name, workers=1)
        assert summary["status"] == "built" and summary["labels_written"] == summary["labels_with_window"] > 0
        paths = sequence_paths(cfg, name)
        labels = load_labels(paths)
        from pipeline.dsec import load_rectify_map

        rmap = load_rectify_map(paths.rectify_map)
        st = ei.open_store(cfg, name)
        with EventFile(paths.events) as ef:
            ev, off = ef.read(0, ef.n_events), ef.t_offset
        for k in (0, 3, len(labels.files) - 1):
            got = ei.read_window(st, k, w.chunks)
            assert got.shape == (w.chunks, w.bins, 440, 640)
            want = ref_window(ev, off, rmap, int(labels.timestamps[k]), w)
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-4)
            assert np.abs(want).sum() > 0
        if mode == "events":  # the full window: N events, all strictly before the label
            assert st.index("event_count")[-1] == w.events
            assert (ev["t"][st.index("event_index")[-1]].astype(np.int64) + off) < labels.timestamps[-1]


def test_store_resumes_and_rebuilds_on_new_settings(tmp_path, monkeypatch):
    cfg = small_tree(tmp_path)
    calls = []
    real = ew._run_label

    def flaky(k, **kw):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(k, **kw)

    monkeypatch.setattr(ew, "_run_label", flaky)
    with pytest.raises(KeyboardInterrupt):
        ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    with pytest.raises(InputError, match="incomplete"):
        ei.open_store(cfg, TRAIN)
    monkeypatch.setattr(ew, "_run_label", real)
    resumed = ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    assert resumed["status"] == "built" and resumed["labels_written"] == resumed["labels_with_window"] - 2
    again = ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    assert again["status"] == "already complete"
    resumed_grid = ei.open_store(cfg, TRAIN).voxels(4).copy()

    other = load_config(write_yaml(tmp_path, window={"bins": 2}))
    with pytest.raises(InputError, match="bins=12") as exc:
        ei.open_store(other, TRAIN)
    assert "\n" not in str(exc.value)
    rebuilt = ew.preprocess_semantic_sequence(other, TRAIN, workers=1)
    assert rebuilt["labels_written"] == rebuilt["labels_with_window"]
    fresh = ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)  # back: rebuilt from scratch
    np.testing.assert_array_equal(ei.open_store(cfg, TRAIN).voxels(4), resumed_grid)
    assert fresh["status"] == "built"


@pytest.mark.parametrize("sampling", ["all", "ess"])
def test_index_lists_sampled_labels(tmp_path, sampling):
    cfg = small_tree(tmp_path, sampling=sampling)
    for name in (TRAIN, TEST):
        ew.preprocess_semantic_sequence(cfg, name, workers=1)
    assert ew.summary_path(cfg, TRAIN).is_file()  # what dvc.yaml's index stage depends on
    counts = ei.write_semantic_index(cfg)
    rows = ei.read_semantic_index(ei.index_path(cfg))
    want = list(range(8)) if sampling == "all" else [6]
    assert counts == {"train": {TRAIN: len(want)}, "test": {TEST: len(want)}}
    assert [r.label for r in rows if r.sequence == TRAIN] == want
    test_rows = ei.read_semantic_index(ei.index_path(cfg), "test")
    assert {r.split for r in test_rows} == {"test"}
    base = cfg.source.parent
    r = test_rows[-1]
    assert read_label(base / r.label_file).shape == (440, 640)
    st = ei.open_store(cfg, TEST)
    assert (base / r.store).resolve() == st.path.resolve()
    assert r.event_count == st.index("event_count")[r.label] == WINDOW["events"]
    stored = st.index("stored")
    assert np.flatnonzero(stored).tolist() == want  # the store holds only the labels the index lists
    if sampling == "ess":
        assert not st.voxels(5).any() and st.voxels(6).any()
        with pytest.raises(InputError, match="sampling"):
            ei.open_store(load_config(write_yaml(tmp_path)), TEST)


# ---------------------------------------------------------------------------------------------- synthetic tree
@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory):
    from pipeline.synthetic.dsec_semantic import generate_semantic_sample

    root = tmp_path_factory.mktemp("semantic_sample")
    path = write_yaml(root, train=(TRAIN, "zurich_city_01_a"), test=(TEST,))
    path.write_text(path.read_text() + "sample:\n  semantic: {labels: 6, event_rate: 150000.0, lead_in_us: 80000}\n")
    cfg = load_config(path)
    summary = generate_semantic_sample(cfg, cfg.dsec_semantic.root, workers=1)
    assert summary["layout"] == "official" and len(summary["sequences"]) == 3
    return cfg


def test_synthetic_tree_round_trips(sample_cfg):
    cfg = sample_cfg
    root = cfg.dsec_semantic.root
    assert (root / "train" / TRAIN / "11classes" / "000005.png").is_file()
    assert (root / "test" / TEST / f"{TEST}_semantic_timestamps.txt").is_file()
    report = check_dsec_semantic(cfg, read_all_labels=True)
    assert len(report) == 3 and all(f.ok for findings in report.values() for f in findings)
    for name in cfg.dsec_semantic.sequences:
        labels = load_labels(sequence_paths(cfg, name))
        classes = set()
        for f in labels.files:
            classes |= set(np.unique(read_label(f)).tolist())
        assert {0, 1, 5} <= classes <= set(range(11)) | {255}
        with EventFile(sequence_paths(cfg, name).events) as ef:
            rel = labels.timestamps - ef.t_offset
            assert ef.n_events > 10_000 and ef.t_first < rel[0] and rel[-1] <= ef.t_last + 1


def test_synthetic_labels_correlate_with_events(sample_cfg):
    """Flat sky and road fire few events; buildings, vegetation, cars, poles many: a model has something to learn."""
    cfg = sample_cfg
    ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    labels = load_labels(sequence_paths(cfg, TRAIN))
    st = ei.open_store(cfg, TRAIN)
    k = len(labels.files) - 1
    active = np.abs(ei.read_window(st, k, WINDOW["chunks"])).sum(axis=(0, 1)) > 0
    lab = read_label(labels.files[k])
    flat = np.isin(lab, [0, 5])
    textured = np.isin(lab, [1, 2, 4, 7, 8])
    assert active[textured].mean() > 2.5 * active[flat].mean()


# ---------------------------------------------------------------------------------------------- hostile input
def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    assert exc.value.path == path
    assert "\n" not in str(exc.value)


def test_hostile_label_count(tmp_path):
    cfg = small_tree(tmp_path)
    seq = sequence_paths(cfg, TRAIN)
    write_png(seq.labels_dir / "000008.png", np.zeros((440, 640), np.uint8))
    with pytest.raises(InputError, match="8 timestamps for 9 label PNGs") as exc:
        load_labels(seq)
    _one_line(exc, seq.timestamps)
    with pytest.raises(InputError):
        ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    findings = check_dsec_semantic(cfg)[f"DSEC-Semantic train sequence {TRAIN}"]
    bad = [f for f in findings if not f.ok]
    assert len(bad) == 1 and bad[0].path == seq.timestamps and not bad[0].missing
    seq.rectify_map.unlink()
    findings = check_dsec_semantic(cfg)[f"DSEC-Semantic train sequence {TRAIN}"]
    assert [(f.what, f.missing) for f in findings if not f.ok] == [("rectify map", True), ("labels and timestamps",
                                                                                          False)]
    shutil.rmtree(cfg.dsec_semantic.root)
    (only,) = check_dsec_semantic(cfg).values()
    assert [(f.what, f.ok, f.missing) for f in only] == [("dsec_semantic.root", False, True)]


@pytest.mark.parametrize("case, match", [
    ("size", "label is 640x480"),
    ("value", r"found \[11\]"),
    ("rgb", "single-channel 8-bit"),
    ("garbage", "not readable"),
])
def test_hostile_label_file(tmp_path, case, match):
    cfg = small_tree(tmp_path)
    seq = sequence_paths(cfg, TRAIN)
    path = seq.labels_dir / "000007.png"
    if case == "size":
        write_png(path, np.zeros((480, 640), np.uint8))
    elif case == "value":
        lab = np.zeros((440, 640), np.uint8)
        lab[5, 5] = 11
        write_png(path, lab)
    elif case == "rgb":
        write_png(path, np.zeros((440, 640, 3), np.uint8))
    else:
        path.write_bytes(b"not a png")
    with pytest.raises(InputError, match=match) as exc:
        read_label(path)
    _one_line(exc, path)
    findings = check_dsec_semantic(cfg)[f"DSEC-Semantic train sequence {TRAIN}"]
    assert [f.path for f in findings if not f.ok] == [path]  # the last label is always decoded by the check


@pytest.mark.parametrize("case, match", [
    ("missing", "label timestamps file not found"),
    ("text", "line 3: 'abc' is not an integer"),
    ("order", "not strictly increasing at line 5"),
    ("empty", "no timestamps"),
])
def test_hostile_timestamps(tmp_path, case, match):
    cfg = small_tree(tmp_path)
    seq = sequence_paths(cfg, TRAIN)
    lines = seq.timestamps.read_text().splitlines()
    if case == "missing":
        seq.timestamps.unlink()
    elif case == "text":
        lines[2] = "abc"
        seq.timestamps.write_text("\n".join(lines))
    elif case == "order":
        lines[4] = lines[3]
        seq.timestamps.write_text("\n".join(lines))
    else:
        seq.timestamps.write_text("\n")
    with pytest.raises(InputError, match=match) as exc:
        load_labels(seq)
    _one_line(exc, seq.timestamps)


def test_hostile_missing_files(tmp_path):
    cfg = small_tree(tmp_path)
    seq = sequence_paths(cfg, TEST)
    seq.rectify_map.unlink()
    with pytest.raises(InputError, match="rectify map not found") as exc:
        ew.preprocess_semantic_sequence(cfg, TEST, workers=1)
    _one_line(exc, seq.rectify_map)
    shutil.copy(sequence_paths(cfg, TRAIN).rectify_map, seq.rectify_map)
    seq.events.unlink()
    with pytest.raises(InputError, match="events file not found") as exc:
        ew.preprocess_semantic_sequence(cfg, TEST, workers=1)
    _one_line(exc, seq.events)
    shutil.rmtree(seq.labels_dir)
    with pytest.raises(InputError, match="label folder not found") as exc:
        load_labels(seq)
    _one_line(exc, seq.labels_dir)
    shutil.rmtree(seq.dir)
    shutil.rmtree(cfg.dsec_semantic.out)
    with pytest.raises(InputError, match="sequence folder not found") as exc:
        ew.preprocess_semantic_sequence(cfg, TEST, workers=1)
    _one_line(exc, seq.dir)
    assert not (cfg.dsec_semantic.out / TEST).exists()  # no lock file left for a sequence that is not there
    with pytest.raises(InputError, match="not listed under dsec_semantic"):
        sequence_paths(cfg, "zurich_city_09_a")


def test_hostile_labels_outside_the_stream(tmp_path):
    cfg = small_tree(tmp_path)
    seq = sequence_paths(cfg, TRAIN)
    ts = np.loadtxt(seq.timestamps, dtype=np.int64) - 10**9  # another clock
    seq.timestamps.write_text("".join(f"{v}\n" for v in ts))
    with pytest.raises(InputError, match="no label has an event window") as exc:
        ew.preprocess_semantic_sequence(cfg, TRAIN, workers=1)
    _one_line(exc, seq.timestamps)


@pytest.mark.parametrize("text, match", [
    ("dsec_semantic:\n  window: {mode: fixed}\n", "window.mode must be one of events, duration"),
    ("dsec_semantic:\n  layout: zip\n", "layout must be one of auto, official, ess"),
    ("dsec_semantic:\n  sampling: half\n", "sampling must be one of all, ess"),
    ("dsec_semantic:\n  window: {chunks: 0}\n", "window.chunks must be between 1 and 1000"),
    ("dsec_semantic:\n  train: [a, b]\n  test: [b]\n", "b listed under both train and test"),
    ("dsec_semantic:\n  train: zurich_city_00_a\n", "must be a list"),
    ("dsec_semantic:\n  window: {bins: 5, slices: 3}\n", "unknown key"),
])
def test_hostile_config(tmp_path, text, match):
    path = tmp_path / "datasets.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as exc:
        load_config(path)
    _one_line(exc, path)


def test_index_refuses_a_malformed_table(tmp_path):
    path = tmp_path / "index.csv"
    path.write_text("split,sequence\ntrain,x\n")
    with pytest.raises(InputError, match="unexpected columns") as exc:
        ei.read_semantic_index(path)
    _one_line(exc, path)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_follow_ess_rules():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 4]])
    conf = confusion(pred, gt, num_classes=5)
    assert conf.sum() == 6 and conf[0, 0] == 1 and conf[0, 1] == 1 and conf[2, 0] == 1  # rows = ground truth
    iou = iou_per_class(conf)
    # class 0: TP 1, FP 1 (gt 2), FN 1 -> 1/3; class 1: 2/3; class 2: 1/2; 3 and 4 absent everywhere -> 0
    np.testing.assert_allclose(iou, [100 / 3, 200 / 3, 50, 0, 0])
    assert miou_ess(conf) == pytest.approx((100 / 3 + 200 / 3 + 50) / 5)
    assert miou_annotated(conf) == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert pixel_accuracy(conf) == pytest.approx(100 * 4 / 6)
    # a class predicted but absent from the ground truth scores 0 in both readings, counted only by ESS
    conf2 = confusion(np.array([3, 0]), np.array([0, 0]), num_classes=5)
    assert iou_per_class(conf2)[3] == 0 and miou_annotated(conf2) == pytest.approx(50)
    assert miou_ess(conf2) == pytest.approx(10)


def test_metrics_accumulate_over_a_test_set():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 11, (44, 64)) for _ in range(3)]
    preds = [np.where(rng.random(g.shape) < 0.7, g, rng.integers(0, 11, g.shape)) for g in gts]
    total = sum(confusion(p, g) for p, g in zip(preds, gts, strict=True))
    np.testing.assert_array_equal(total, confusion(np.concatenate(preds), np.concatenate(gts)))
    whole_gt, whole_pred = np.concatenate(gts).ravel(), np.concatenate(preds).ravel()
    for c in range(11):
        tp = np.sum((whole_gt == c) & (whole_pred == c))
        union = np.sum((whole_gt == c) | (whole_pred == c))
        assert iou_per_class(total)[c] == pytest.approx(100 * tp / union)
    with pytest.raises(ValueError, match="class ids"):
        confusion(np.array([11]), np.array([0]))
