"""cmda sample: the synthetic DSEC night + Cityscapes day tree, in the real formats, consistent with itself."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from typer.testing import CliRunner

from cli import app
from pipeline.calib import event_to_frame_homography, load_calibration, rectify_map_from_calibration
from pipeline.config import load_config
from pipeline.dsec import EventFile, SequencePaths, load_rectify_map, load_timestamps
from pipeline.events_h5 import CHUNK
from pipeline.synthetic.sample import SampleSpec, generate_sample, plan_sequence
from pipeline.warp import warp_image
from tests.cli_checks import assert_one_line_error

SEQS = ("zurich_city_09_a", "zurich_city_09_b")
FRAMES = 12
RATE = 150_000.0
LABELS = [2, 5, 8]  # label_first 2, label_every 3, labelled [0, 9]

CONFIG = """dsec:
  root: sample/DSEC_Night
  out: processed/dsec
  label_first: 2
  label_every: 3
  sequences:
{sequences}cityscapes: {{root: sample/cityscapes, out: processed/cityscapes}}
sample: {{seed: {seed}, frames: {frames}, event_rate: {rate}, cityscapes_train: {train}, cityscapes_val: {val}}}
"""


def _config(folder: Path, seed=3, frames=FRAMES, rate=RATE, train=2, val=1, seqs=SEQS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datasets.yaml"
    sequences = "".join(f"    {s}: {{labelled: [0, 9]}}\n" for s in seqs)
    path.write_text(CONFIG.format(seed=seed, frames=frames, rate=rate, train=train, val=val, sequences=sequences))
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A tiny sample made through the CLI (coarser 10 ms render steps to keep the suite fast)."""
    folder = tmp_path_factory.mktemp("sample")
    cfg = _config(folder)
    result = CliRunner().invoke(app, ["sample", "--config", str(cfg), "--out", str(folder / "sample"),
                                      "--step-us", "10000"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "SYNTHETIC" in result.output
    return folder / "sample"


def _paths(sample: Path, seq: str) -> SequencePaths:
    return SequencePaths(sample / "DSEC_Night", seq)


def test_every_file_is_readable_as_the_umask_allows(sample):
    """Atomic writes go through mkstemp (0600); the tree must carry the umask's mode like any other file."""
    from tests.test_atomic import assert_ordinary_modes

    assert_ordinary_modes([p for p in sample.rglob("*") if p.is_file()])


def test_layout(sample):
    assert "SYNTHETIC" in (sample / "README.md").read_text()
    assert not list(sample.parent.glob(".*partial*"))
    for seq in SEQS:
        p = _paths(sample, seq)
        for f in (p.events, p.rectify_map, p.calibration, p.timestamps):
            assert f.is_file(), f
        assert sorted(x.name for x in p.images_dir.iterdir()) == [f"{i:06d}.png" for i in range(FRAMES)]
        assert sorted(x.name for x in p.labels_dir.iterdir()) == [p.label(i).name for i in LABELS]
        img = cv2.imread(str(p.image(3)), cv2.IMREAD_UNCHANGED)
        assert img.shape == (1080, 1440, 3) and img.dtype == np.uint8
        assert not list(p.dir.rglob("*.tmp"))


def test_events_schema(sample):
    for seq in SEQS:
        with h5py.File(_paths(sample, seq).events, "r") as f:
            n = f["events/x"].shape[0]
            for name, dtype in [("events/x", np.uint16), ("events/y", np.uint16), ("events/p", np.uint8),
                                ("events/t", np.uint32), ("ms_to_idx", np.uint64)]:
                assert f[name].dtype == dtype, name
                assert "32001" in f[name]._filters, name  # Blosc, like DSEC
            for name in ("events/x", "events/y", "events/p", "events/t"):
                assert f[name].shape == (n,) and f[name].chunks == (CHUNK,)
            assert f["t_offset"].dtype == np.int64 and f["t_offset"].shape == ()
            assert set(np.unique(f["events/p"][:])) == {0, 1}
            assert int(f["events/x"][:].max()) < 640 and int(f["events/y"][:].max()) < 480
            t = f["events/t"][:].astype(np.int64)
            ms = f["ms_to_idx"][:].astype(np.int64)
        assert np.all(np.diff(t) >= 0)
        assert ms.size == t[-1] // 1000 + 2
        for m in range(0, ms.size, 7):
            assert ms[m] == n or t[ms[m]] >= 1000 * m
            assert ms[m] == 0 or t[ms[m] - 1] < 1000 * m


def test_time_offset_and_uint32_trap(sample):
    for seq in SEQS:
        p = _paths(sample, seq)
        ts = load_timestamps(p.timestamps)
        with h5py.File(p.events, "r") as f:
            t_last = f["events/t"][-1]
            offset = f["t_offset"][()]
        assert 1e10 <= offset < 1e11  # microseconds: far beyond uint32, so readers must widen
        right = int(t_last) + int(offset)  # Python ints: exact
        # The absolute time lies in the image clock: between the third- and second-last images.
        assert ts[FRAMES - 3] < right < ts[FRAMES - 2]
        with EventFile(p.events) as ef:  # and the reader computes the same absolute time
            assert ef.t_offset + ef.t_last == right
        assert ts.size == FRAMES and np.all(np.abs(np.diff(ts) - 50_000) < 100)


def test_image_index_and_stream_ends(sample):
    for seq in SEQS:
        p = _paths(sample, seq)
        with EventFile(p.events) as ef:
            idx = ef.index_of_time(load_timestamps(p.timestamps))
            duration = (ef.t_last - ef.t_first) * 1e-6
            rate = ef.n_events / duration
        assert idx[0] >= 0  # the first image a little after the first event
        assert np.all(idx[: FRAMES - 2] >= 0) and np.all(np.diff(idx[: FRAMES - 2]) > 0)
        assert list(idx[FRAMES - 2:]) == [-1, -1]  # the last two images lie after the stream
        assert 0.65 * RATE < rate < 1.35 * RATE


def test_rectify_map_from_calibration(sample):
    for seq in SEQS:
        p = _paths(sample, seq)
        rmap = load_rectify_map(p.rectify_map)
        assert np.array_equal(rmap, rectify_map_from_calibration(load_calibration(p.calibration)))


def test_labels(sample):
    allowed = set(range(19)) | {255}
    seen = set()
    for seq in SEQS:
        p = _paths(sample, seq)
        for i in LABELS:
            lab = cv2.imread(str(p.label(i)), cv2.IMREAD_UNCHANGED)
            assert lab.shape == (480, 640) and lab.dtype == np.uint8
            values = set(np.unique(lab).tolist())
            assert values <= allowed
            assert 14 not in values  # no truck at night, as in DSEC
            assert {0, 2, 10}.issubset(values)  # road, building, sky in every frame
            assert (lab[-5:] == 255).mean() > 0.5  # the ego vehicle's hood at the bottom is ignored
            seen |= values
    assert {0, 1, 2, 5, 7, 8, 10, 11, 13} <= seen


def _event_counts(p: SequencePaths, frame: int) -> np.ndarray:
    """Events of image `frame`'s window, rectified and counted per pixel of the 640x480 label frame."""
    rmap = load_rectify_map(p.rectify_map)
    with EventFile(p.events) as ef:
        idx = ef.index_of_time(load_timestamps(p.timestamps))
        ev = ef.read(idx[frame - 1], idx[frame] + 1)
    xy = rmap[ev["y"].astype(np.int64), ev["x"].astype(np.int64)]
    xi, yi = np.round(xy[:, 0]).astype(int), np.round(xy[:, 1]).astype(int)
    ok = (xi >= 0) & (xi < 640) & (yi >= 0) & (yi < 480)
    counts = np.zeros((480, 640))
    np.add.at(counts, (yi[ok], xi[ok]), 1)
    return counts


def _boundaries(lab: np.ndarray) -> np.ndarray:
    edge = np.zeros(lab.shape, np.uint8)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    return edge


def test_events_sit_on_label_edges(sample):
    """The events come from the moving scene: far denser near class boundaries than in flat regions."""
    ratios = []
    for seq in SEQS:
        p = _paths(sample, seq)
        for i in LABELS:
            lab = cv2.imread(str(p.label(i)), cv2.IMREAD_UNCHANGED)
            counts = _event_counts(p, i)
            near = cv2.dilate(_boundaries(lab), np.ones((7, 7), np.uint8)) > 0
            far = cv2.dilate(_boundaries(lab), np.ones((25, 25), np.uint8)) == 0
            ratios.append(counts[near].mean() / max(counts[far].mean(), 1e-9))
    assert np.median(ratios) > 3.0, ratios


def test_warped_images_line_up_with_labels(sample):
    """Image edges after warping coincide with label edges: the alignment score peaks at zero shift."""
    for seq in SEQS:
        p = _paths(sample, seq)
        H = event_to_frame_homography(load_calibration(p.calibration))
        scores = {}
        for i in LABELS:
            grey = cv2.cvtColor(warp_image(cv2.imread(str(p.image(i))), H), cv2.COLOR_BGR2GRAY).astype(np.float32)
            grey = cv2.GaussianBlur(grey, (0, 0), 1.0)
            grad = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
            edge = _boundaries(cv2.imread(str(p.label(i)), cv2.IMREAD_UNCHANGED))[10:-10, 10:-10] > 0
            for dx, dy in [(0, 0), (4, 0), (-4, 0), (0, 4), (0, -4)]:
                g = grad[10 + dy:470 + dy, 10 + dx:630 + dx]
                scores[(dx, dy)] = scores.get((dx, dy), 0.0) + float(g[edge].mean())
        best_shifted = max(v for k, v in scores.items() if k != (0, 0))
        assert scores[(0, 0)] > 1.15 * best_shifted, scores


def test_cityscapes_tree(sample):
    cs = sample / "cityscapes"
    jsons = sorted((cs / "gtFine").glob("*/*/*_gtFine_polygons.json"))
    assert [j.parts[-3] for j in jsons].count("train") == 2 and [j.parts[-3] for j in jsons].count("val") == 1
    labels_seen = set()
    for j in jsons:
        split, city = j.parts[-3], j.parts[-2]
        base = j.name[: -len("_000019_gtFine_polygons.json")]
        assert base.startswith(city + "_") and len(base.split("_")[-1]) == 6
        img_path = cs / "leftImg8bit" / split / city / f"{base}_000019_leftImg8bit.png"
        seq19 = cs / "leftImg8bit_sequence" / split / city / f"{base}_000019_leftImg8bit.png"
        seq18 = cs / "leftImg8bit_sequence" / split / city / f"{base}_000018_leftImg8bit.png"
        assert img_path.read_bytes() == seq19.read_bytes()
        img, prev = cv2.imread(str(img_path)), cv2.imread(str(seq18))
        assert img.shape == (1024, 2048, 3)
        moved = np.abs(img.astype(int) - prev.astype(int)).mean()
        assert 0.5 < moved < 40  # the previous frame: slightly moved camera
        raw = json.loads(j.read_text())
        assert raw["imgWidth"] == 2048 and raw["imgHeight"] == 1024 and raw["objects"][0]["label"] == "sky"
        ann = Annotation()
        ann.fromJsonFile(str(j))
        assert all(o.label in name2label for o in ann.objects)
        for o in raw["objects"]:
            pts = np.asarray(o["polygon"])
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            assert pts.min() >= 0 and pts[:, 0].max() <= 2047 and pts[:, 1].max() <= 1023
        train_ids = np.array(createLabelImage(ann, "trainIds"))
        assert train_ids.shape == (1024, 2048)
        assert {0, 2, 10} <= set(np.unique(train_ids).tolist())
        assert (train_ids[:, :2] == 255).all()  # 'out of roi' border, drawn last
        labels_seen |= {o.label for o in ann.objects}
    assert {"road", "sidewalk", "building", "pole", "vegetation", "sky", "car", "ego vehicle", "out of roi",
            "static"} <= labels_seen


def test_night_is_darker_than_day(sample):
    night = [cv2.imread(str(_paths(sample, s).image(i))).mean() for s in SEQS for i in (0, 6, FRAMES - 1)]
    day = [cv2.imread(str(p)).mean() for p in (sample / "cityscapes" / "leftImg8bit").rglob("*.png")]
    assert max(night) < 0.6 * min(day)
    # Orange street light: red above blue on average at night, not by day.
    n = cv2.imread(str(_paths(sample, SEQS[0]).image(5))).reshape(-1, 3).mean(0)
    assert n[2] > 1.2 * n[0]


def test_deterministic_for_a_seed(tmp_path):
    cfg = load_config(_config(tmp_path / "c", seed=9, frames=5, rate=50_000.0, train=1, val=0, seqs=SEQS[:1]))
    a = generate_sample(cfg, tmp_path / "a", workers=2, dt_us=25_000)
    generate_sample(cfg, tmp_path / "b", workers=1, dt_us=25_000)
    files_a = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    files_b = sorted(f.relative_to(tmp_path / "b") for f in (tmp_path / "b").rglob("*") if f.is_file())
    assert files_a == files_b and len(files_a) > 10
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["sequences"][0]["events"] > 0
    other = plan_sequence(cfg, SampleSpec(10, 5, 50_000.0, 1, 0), "zurich_city_09_a", 0)
    same = plan_sequence(cfg, SampleSpec(9, 5, 50_000.0, 1, 0), "zurich_city_09_a", 0)
    assert other.t_offset != same.t_offset and not np.array_equal(other.rectify_map, same.rectify_map)
    with EventFile(tmp_path / "a" / "DSEC_Night" / "zurich_city_09_a" / "events" / "left" / "events.h5") as ef:
        assert ef.t_offset == same.t_offset


def test_bad_options_exit_2(tmp_path):
    cfg = _config(tmp_path)
    result = CliRunner().invoke(app, ["sample", "--config", str(cfg), "--out", str(tmp_path / "s"), "--frames", "2"])
    assert_one_line_error(result, "at least 4 frames")
    assert not (tmp_path / "s").exists()


def _content_digest(path: Path) -> str:
    """sha256 of what a file holds (decoded PNG pixels, HDF5 datasets, other files' bytes), so the check
    below does not depend on the PNG / HDF5 encoders' versions."""
    import hashlib

    h = hashlib.sha256()
    if path.suffix == ".png":
        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    elif path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            for n in sorted(names):
                a = f[n][()]
                h.update(f"{n}{a.shape}{a.dtype}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# Content of the fixture's tree as written by the generator before it moved into pipeline/synthetic/
# (commit 9ef4b17, pipeline/sample.py): sha256 over the sorted "<path> <content digest>" lines.
SAMPLE_CONTENT_SHA256 = "2b89547e96a807fd5561bf5f2c09adffbd117bf689bcff8ff2e8d86fec06cf45"


def test_sample_content_unchanged_by_the_move_to_pipeline_synthetic(sample):
    import hashlib

    files = sorted(p for p in sample.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(sample)} {_content_digest(p)}\n" for p in files)
    assert len(files) == 51
    assert hashlib.sha256(lines.encode()).hexdigest() == SAMPLE_CONTENT_SHA256, lines
