"""`cmda cityscapes`: trainId labels vs cityscapesscripts, RCS JSONs vs brute force, IC1, resume, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.cityscapes import Sample, convert_cityscapes, find_samples, read_split, sample_paths
from pipeline.errors import InputError
from pipeline.image_change import ic1_reference, ic1_to_uint8
from pipeline.rcs_stats import STATS_FILES, resolve_label
from tests.cli_checks import assert_one_line_error

W, H = 256, 128
# Real label names, incl. non-training ones (ego vehicle, out of roi, license plate id -1, 'cargroup').
LABELS = [
    "road", "sidewalk", "building", "vegetation", "sky", "car", "cargroup", "person", "persongroup", "bicycle",
    "traffic sign", "pole", "ego vehicle", "out of roi", "license plate", "terrain", "truck", "rider",
    "rectification border", "static", "train", "fence",
]  # fmt: skip
SAMPLES = [
    ("train", "aachen", "aachen_000000_000019"),
    ("train", "aachen", "aachen_000001_000019"),
    ("train", "bochum", "bochum_000000_000019"),
    ("val", "frankfurt", "frankfurt_000000_000019"),
]


def _polygons(rng: np.random.Generator) -> list[dict]:
    objs = [{"label": "sky", "polygon": [[0, 0], [W - 1, 0], [W - 1, H // 3], [0, H // 3]]}]
    objs.append({"label": "road", "polygon": [[0, H - 1], [W - 1, H - 1], [W - 1, H // 2], [0, H // 2 + 10]]})
    for _ in range(14):
        cx, cy = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
        n = int(rng.integers(3, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(5, 60, n)
        xs, ys = np.round(cx + rad * np.cos(ang), 2), np.round(cy + rad * np.sin(ang), 2)
        pts = [[float(x), float(y)] for x, y in zip(xs, ys, strict=True)]
        objs.append({"label": str(rng.choice(LABELS)), "polygon": pts})
    # a deleted object with an unknown name must be ignored, as cityscapesscripts does
    objs.append({"label": "no such label", "polygon": [[1, 1], [9, 1], [9, 9]], "deleted": 1})
    return objs


def _frames(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    base = 60 + 80 * np.sin(xx / 13.0)[..., None] + 60 * np.cos(yy / 7.0)[..., None] + rng.normal(0, 8, (H, W, 3))
    now = np.clip(base, 0, 255).astype(np.uint8)
    prev = np.clip(np.roll(base, 2, axis=1) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    return now, prev


def make_tree(root: Path, seed: int = 0, samples=SAMPLES) -> Path:
    """A tiny Cityscapes tree (256x128) with polygons, images and previous sequence frames."""
    rng = np.random.default_rng(seed)
    for split, city, name in samples:
        gt = root / "gtFine" / split / city / f"{name}_gtFine_polygons.json"
        gt.parent.mkdir(parents=True, exist_ok=True)
        gt.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": _polygons(rng)}))
        s = Sample(split, city, name)
        p = sample_paths(root, root / "unused", s)
        now, prev = _frames(rng)
        for path, img in ((p.image, now), (p.prev_image, prev)):
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), img[..., ::-1])
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cs")
    root, out = make_tree(base / "raw"), base / "out"
    convert_cityscapes(root, out, workers=2)
    return root, out


def _rect(label: str, x0: int, y0: int, x1: int, y1: int, **extra) -> dict:
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **extra}


def test_hand_drawn_polygons_give_the_expected_train_ids(tmp_path):
    """Axis-aligned rectangles with integer corners fill exactly [x0..x1] x [y0..y1] (edges
    included); later objects paint over earlier ones; the expected image is written by hand from
    Cityscapes' label table (trainIds: road 0, sky 10, person 11, car 13; ego vehicle is ignored:
    255; license plate has id -1 and is not drawn at all, so what lies under it stays;
    '<name>group' falls back to <name>; deleted objects are skipped)."""
    root = make_tree(tmp_path / "raw", samples=SAMPLES[:1])
    split, city, name = SAMPLES[0]
    objects = [
        _rect("sky", 0, 0, W - 1, 30),
        _rect("road", 0, 100, W - 1, H - 1),
        _rect("car", 20, 60, 59, 89),
        _rect("person", 50, 70, 69, 99),  # over the car's right edge
        _rect("cargroup", 100, 40, 119, 59),
        _rect("ego vehicle", 200, 110, W - 1, H - 1),  # over the road
        _rect("license plate", 30, 80, 35, 85),  # over the car: not drawn
        _rect("car", 150, 40, 170, 60, deleted=1),
    ]
    poly = root / "gtFine" / split / city / f"{name}_gtFine_polygons.json"
    poly.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}))
    expected = np.full((H, W), 255, np.uint8)
    expected[0:31, :] = 10
    expected[100:, :] = 0
    expected[60:90, 20:60] = 13
    expected[70:100, 50:70] = 11
    expected[40:60, 100:120] = 13
    expected[110:, 200:] = 255
    out = tmp_path / "out"
    convert_cityscapes(root, out, workers=1)
    label = cv2.imread(str(sample_paths(root, out, Sample(split, city, name)).label), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (H, W)
    np.testing.assert_array_equal(label, expected)

def _brute_counts(label: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in label.tolist():
        for v in row:
            if v < 19:
                counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


def test_rcs_stats_equal_brute_force_in_daformer_format(converted):
    root, out = converted
    stats = json.loads((out / "sample_class_stats.json").read_text())
    stats_dict = json.loads((out / "sample_class_stats_dict.json").read_text())
    with_class = json.loads((out / "samples_with_class.json").read_text())
    train = [s for s in find_samples(root) if s.split == "train"]
    assert isinstance(stats, list) and [e["file"] for e in stats] == [s.label_rel() for s in train]
    expect_with_class: dict[str, list] = {}
    for entry, s in zip(stats, train, strict=True):
        label = cv2.imread(str(resolve_label(out, entry["file"])), cv2.IMREAD_UNCHANGED)
        brute = _brute_counts(label)
        assert {k: v for k, v in entry.items() if k != "file"} == brute
        assert list(entry)[-1] == "file" and all(type(v) is int for k, v in entry.items() if k != "file")
        assert stats_dict[s.label_rel()] == brute
        for c in sorted(brute, key=int):
            expect_with_class.setdefault(c, []).append([s.label_rel(), brute[c]])
    assert with_class == expect_with_class
    assert all(isinstance(k, str) and k.isdigit() for k in with_class)
    # stats are the train split only
    assert not any("val/" in e["file"] for e in stats)
    text = (out / "sample_class_stats.json").read_text()
    assert text.startswith("[\n  {")  # indent=2 like DAFormer


def test_split_lists_and_ic1(converted):
    root, out = converted
    assert read_split(out, "train") == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                        "bochum/bochum_000000_000019"]  # fmt: skip
    assert read_split(out, "val") == ["frankfurt/frankfurt_000000_000019"]
    for s in find_samples(root):
        p = sample_paths(root, out, s)
        now = cv2.imread(str(p.image))[..., ::-1].copy()
        prev = cv2.imread(str(p.prev_image))[..., ::-1].copy()
        stored = cv2.imread(str(p.ic1), cv2.IMREAD_UNCHANGED)
        assert stored.dtype == np.uint8 and stored.shape == (H, W)
        np.testing.assert_array_equal(stored, ic1_to_uint8(ic1_reference(now, prev)))
        assert stored.min() == 0 and stored.max() == 255


def test_resume_skips_existing_and_redoes_missing(tmp_path):
    root, out = make_tree(tmp_path / "raw", seed=1), tmp_path / "out"
    convert_cityscapes(root, out, workers=1)
    stats_before = (out / "sample_class_stats.json").read_bytes()
    s = find_samples(root)[0]
    p = sample_paths(root, out, s)
    old = p.ic1.stat().st_mtime_ns - 10**9
    os.utime(p.ic1, ns=(old, old))
    label_bytes = p.label.read_bytes()
    p.label.unlink()
    convert_cityscapes(root, out, workers=1)
    assert p.ic1.stat().st_mtime_ns == old  # skipped
    assert p.label.read_bytes() == label_bytes  # regenerated identically
    assert (out / "sample_class_stats.json").read_bytes() == stats_before
    assert not list(out.rglob("*.tmp"))


def _assert_incomplete(out: Path) -> None:
    for name in (*STATS_FILES, "train.txt", "val.txt"):
        assert not (out / name).exists(), name
    assert not list(out.rglob("*.tmp"))


def test_unknown_label_names_file_and_label(tmp_path):
    root, out = make_tree(tmp_path / "raw"), tmp_path / "out"
    bad = root / "gtFine/train/bochum/bochum_000000_000019_gtFine_polygons.json"
    obj = json.loads(bad.read_text())
    obj["objects"].append({"label": "flying saucer", "polygon": [[0, 0], [5, 0], [5, 5]]})
    bad.write_text(json.dumps(obj))
    with pytest.raises(InputError) as err:
        convert_cityscapes(root, out, workers=1)
    assert err.value.path == bad and "flying saucer" in str(err.value)
    _assert_incomplete(out)
    assert not sample_paths(root, out, Sample("train", "bochum", "bochum_000000_000019")).label.exists()


def test_missing_previous_frame(tmp_path):
    root, out = make_tree(tmp_path / "raw"), tmp_path / "out"
    prev = sample_paths(root, out, Sample("train", "aachen", "aachen_000001_000019")).prev_image
    assert prev.name == "aachen_000001_000018_leftImg8bit.png"
    prev.unlink()
    with pytest.raises(InputError) as err:
        convert_cityscapes(root, out, workers=1)
    assert err.value.path == prev and "previous frame" in str(err.value)
    _assert_incomplete(out)


def test_unreadable_png(tmp_path):
    root, out = make_tree(tmp_path / "raw"), tmp_path / "out"
    img = sample_paths(root, out, Sample("val", "frankfurt", "frankfurt_000000_000019")).image
    img.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(InputError) as err:
        convert_cityscapes(root, out, workers=2)
    assert err.value.path == img and "readable" in str(err.value)
    _assert_incomplete(out)


def test_broken_json_and_output_inside_root(tmp_path):
    root = make_tree(tmp_path / "raw")
    bad = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_polygons.json"
    bad.write_text("{not json")
    with pytest.raises(InputError) as err:
        convert_cityscapes(root, tmp_path / "out", workers=1)
    assert err.value.path == bad
    with pytest.raises(InputError, match="inside the raw Cityscapes root"):
        convert_cityscapes(root, root / "processed", workers=1)


def _config(tmp_path: Path, root: Path, out: Path) -> Path:
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text(f"cityscapes:\n  root: {root}\n  out: {out}\n")
    return cfg


def test_cli_ok_and_exit_code_2(tmp_path):
    root, out = make_tree(tmp_path / "raw"), tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["cityscapes", "--config", str(_config(tmp_path, root, out)), "--workers", "1"])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "3 train + 1 val" in res.output and (out / "sample_class_stats.json").exists()

    bad = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json"
    obj = json.loads(bad.read_text())
    obj["objects"][0]["label"] = "skyy"
    bad.write_text(json.dumps(obj))
    (out / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png").unlink()
    res = runner.invoke(app, ["cityscapes", "--config", str(_config(tmp_path, root, out))])
    assert_one_line_error(res, str(bad), "skyy")
    _assert_incomplete(out)


def test_converts_cmda_sample_output(tmp_path):
    """The synthetic Cityscapes frames of `cmda sample` (full 2048x1024) convert cleanly and exactly."""
    sample = pytest.importorskip("pipeline.synthetic.sample")
    if not hasattr(sample, "write_cityscapes_frame"):
        pytest.skip("pipeline.synthetic.sample has no write_cityscapes_frame")
    from train.data.rcs import RareClassSampler

    spec = sample.SampleSpec(seed=0, frames=10, event_rate=1e5, cityscapes_train=2, cityscapes_val=1, dt_us=5000)
    root, out = tmp_path / "cityscapes", tmp_path / "out"
    for split, j in (("train", 0), ("train", 1), ("val", 0)):
        sample.write_cityscapes_frame(root, spec, split, j)
    summary = convert_cityscapes(root, out, workers=2)
    assert (summary.train, summary.val) == (2, 1)
    train_ids = set(range(19)) | {255}
    for s in find_samples(root):
        p = sample_paths(root, out, s)
        label = cv2.imread(str(p.label), cv2.IMREAD_UNCHANGED)
        assert label.shape == (1024, 2048) and set(np.unique(label).tolist()) <= train_ids
        now, prev = (cv2.imread(str(f))[..., ::-1].copy() for f in (p.image, p.prev_image))
        stored = cv2.imread(str(p.ic1), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored, ic1_to_uint8(ic1_reference(now, prev)))
    sampler = RareClassSampler(out, seed=0)  # real min_pixels=3000 at full resolution
    assert len(sampler.classes) >= 5 and all(f.exists() for _, f in (sampler.sample() for _ in range(10)))
