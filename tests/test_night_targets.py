"""Image-only night targets: the synthetic Dark Zurich / ACDC trees, the readers against the official
layouts, label formats (labelIds -> trainIds via cityscapesscripts, 255 ignore), bad input, and the
Dark Zurich test-server export (file names, sizes, dtype, value range)."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from typer.testing import CliRunner

from cli import app
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.night_targets import (
    DarkZurichSubmission,
    TargetImage,
    check_labels_agree,
    detect_layout,
    discover,
    discover_target,
    export_darkzurich_test,
    read_label,
    write_label_ids,
)

REPO = Path(__file__).resolve().parents[1]
W, H = 192, 108
COUNTS = {"train": 3, "val": 2, "test": 2, "day": 1}
CONFIG = f"""dsec: {{root: sample/DSEC_Night, out: processed/dsec}}
sample:
  seed: 4
  targets: {{train: {COUNTS['train']}, val: {COUNTS['val']}, test: {COUNTS['test']}, day: {COUNTS['day']},
            width: {W}, height: {H}}}
"""
IMAGE_RE = r"GOPR\d{4}/GOPR\d{4}_frame_\d{6}_rgb_anon\.png"


def _make(folder: Path, target: str, out: Path, workers: int = 0) -> Path:
    cfg = folder / "datasets.yaml"
    cfg.write_text(CONFIG)
    result = CliRunner().invoke(app, ["sample", "--config", str(cfg), "--target", target, "--out", str(out),
                                      "--workers", str(workers)])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("targets")
    return {t: _make(folder, t, folder / t) for t in ("darkzurich", "acdc")}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _cs_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """The reference mapping, straight from cityscapesscripts' table (independent of the reader's LUT)."""
    out = np.full(label_ids.shape, 255, np.uint8)
    for lid in np.unique(label_ids):
        tid = id2label[int(lid)].trainId
        out[label_ids == lid] = tid if 0 <= tid < 19 else 255
    return out


# ---------------------------------------------------------------------------------------------- layouts
def test_darkzurich_tree_has_the_official_layout(trees):
    root = trees["darkzurich"]
    files = _files(root)
    assert "SYNTHETIC" in (root / "README.md").read_text() and "1920x1080" in (root / "README.md").read_text()
    images = [f for f in files if f.startswith("rgb_anon/")]
    labels = [f for f in files if f.startswith("gt/")]
    assert len(images) == sum(COUNTS.values()) and len(labels) == 2 * COUNTS["val"]
    for f in images:
        assert re.fullmatch(rf"rgb_anon/(train/(night|day)|val/night|test/night)/{IMAGE_RE}", f), f
    for f in labels:
        assert re.fullmatch(r"gt/val/night/GOPR0356/GOPR0356_frame_\d{6}_gt_label(TrainIds|Ids)\.png", f), f
    assert sum(f.startswith("rgb_anon/train/day/") for f in images) == COUNTS["day"]
    assert not list(root.parent.glob(".*partial*"))
    img = cv2.imread(str(root / images[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8


def test_acdc_tree_has_the_official_layout(trees):
    root = trees["acdc"]
    files = _files(root)
    images = [f for f in files if f.startswith("rgb_anon/")]
    labels = [f for f in files if f.startswith("gt/")]
    assert len(images) == COUNTS["train"] + COUNTS["val"] + COUNTS["test"]
    assert len(labels) == 2 * (COUNTS["train"] + COUNTS["val"])
    for f in images:
        assert re.fullmatch(rf"rgb_anon/night/(train|val|test)/{IMAGE_RE}", f), f
    for f in labels:
        assert re.fullmatch(r"gt/night/(train|val)/GOPR\d{4}/GOPR\d{4}_frame_\d{6}_gt_label(TrainIds|Ids)\.png", f)


def test_discover_lists_splits_with_labels(trees):
    dz = discover(trees["darkzurich"])
    assert dz.layout == "darkzurich" and dz.condition == "night"
    assert (len(dz.train), len(dz.val), len(dz.test)) == (COUNTS["train"], COUNTS["val"], COUNTS["test"])
    assert all(i.label is None for i in dz.train + dz.test)
    assert all(i.train_ids is not None and i.label_ids is not None for i in dz.val)
    assert {i.sequence for i in dz.val} == {"GOPR0356"}
    for i in dz.train + dz.val + dz.test:
        assert i.image.name == f"{i.name}_rgb_anon.png" and i.image.parent.name == i.sequence
    day = discover(trees["darkzurich"], condition="day", require_val=False)
    assert len(day.train) == COUNTS["day"] and not day.val and not day.test
    assert all(i.image.parts[-4:-2] == ("train", "day") for i in day.train)
    with pytest.raises(InputError, match="no val images"):
        discover(trees["darkzurich"], condition="day")
    acdc = discover(trees["acdc"])
    assert acdc.layout == "acdc"
    assert (len(acdc.train), len(acdc.val), len(acdc.test)) == (COUNTS["train"], COUNTS["val"], COUNTS["test"])
    assert all(i.label is not None for i in acdc.train + acdc.val) and all(i.label is None for i in acdc.test)
    assert detect_layout(trees["acdc"]) == "acdc" and detect_layout(trees["darkzurich"]) == "darkzurich"
    assert discover(trees["acdc"], layout="acdc").val == acdc.val


def test_labels_are_cityscapes_label_and_train_ids(trees):
    """trainIds files == labelIds files mapped by cityscapesscripts' table; 255 ignore; sizes match."""
    seen: set[int] = set()
    for target in ("darkzurich", "acdc"):
        s = discover(trees[target])
        for item in s.val + [i for i in s.train if i.label is not None]:
            check_labels_agree(item)
            label_ids = cv2.imread(str(item.label_ids), cv2.IMREAD_UNCHANGED)
            train_ids = cv2.imread(str(item.train_ids), cv2.IMREAD_UNCHANGED)
            assert label_ids.dtype == np.uint8 and label_ids.shape == (H, W)
            assert np.array_equal(train_ids, _cs_train_ids(label_ids))
            assert np.array_equal(read_label(item), train_ids)
            assert set(np.unique(train_ids).tolist()) <= set(range(19)) | {255}
            assert label_ids[-1, W // 2] == 1 and train_ids[-1, W // 2] == 255  # the ego car's hood: ignored
            seen |= set(np.unique(train_ids).tolist())
    assert {0, 1, 2, 8, 10, 255} <= seen  # road, sidewalk, building, vegetation, sky, ignore


def test_labelids_file_alone_is_read_through_the_table(trees, tmp_path):
    root = shutil.copytree(trees["darkzurich"], tmp_path / "dz")
    for p in (root / "gt").rglob("*_gt_labelTrainIds.png"):
        p.unlink()
    ref = {i.name: read_label(i) for i in discover(trees["darkzurich"]).val}
    for item in discover(root).val:
        assert item.train_ids is None and item.label == item.label_ids
        assert np.array_equal(read_label(item), ref[item.name])


def test_target_tree_is_deterministic_across_threads(trees, tmp_path):
    again = _make(tmp_path, "darkzurich", tmp_path / "dz1", workers=1)

    def digest(root: Path) -> dict[str, str]:
        return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in _files(root)}

    assert digest(again) == digest(trees["darkzurich"])


def test_repository_config_has_the_cs2dz_settings():
    cfg = load_config(REPO / "datasets.yaml")
    for t in (cfg.darkzurich, cfg.acdc):
        assert t.resize == (960, 540) and t.crop == 512
        assert (t.pseudo_ignore_top, t.pseudo_ignore_bottom) == (15, 120)
    assert cfg.darkzurich.root == REPO / "data/sample_targets/darkzurich"
    assert cfg.acdc.root == REPO / "data/sample_targets/acdc"


# ---------------------------------------------------------------------------------------------- bad input
def test_folder_in_neither_layout_says_what_was_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError) as e:
        discover(tmp_path)
    msg = str(e.value)
    assert "neither" in msg and "rgb_anon/{train,val,test}/night/GOPR*/*_rgb_anon.png" in msg
    assert "rgb_anon/night/{train,val,test}/GOPR*/*_rgb_anon.png" in msg and "gt/val/night" in msg


def test_val_image_without_label_is_an_error(trees, tmp_path):
    root = shutil.copytree(trees["acdc"], tmp_path / "acdc")
    victim = sorted((root / "gt/night/val").rglob("*_gt_label*.png"))
    name = victim[0].name.split("_gt_")[0]
    for p in victim:
        if p.name.startswith(name):
            p.unlink()
    with pytest.raises(InputError) as e:
        discover(root)
    assert "val image without a label" in str(e.value) and f"{name}_gt_labelTrainIds.png" in str(e.value)
    assert e.value.path.name == f"{name}_rgb_anon.png"


def test_missing_train_split_and_wrong_layout_are_errors(trees, tmp_path):
    root = shutil.copytree(trees["darkzurich"], tmp_path / "dz")
    with pytest.raises(InputError, match="no train images: expected rgb_anon/night/train"):
        discover(root, layout="acdc")
    shutil.rmtree(root / "rgb_anon/train/night")
    with pytest.raises(InputError, match="no train images: expected rgb_anon/train/night/GOPR"):
        discover(root)


def test_bad_label_files_are_errors(trees, tmp_path):
    root = shutil.copytree(trees["darkzurich"], tmp_path / "dz")
    item = discover(root).val[0]
    bad = cv2.imread(str(item.train_ids), cv2.IMREAD_UNCHANGED)
    bad[0, 0] = 19
    cv2.imwrite(str(item.train_ids), bad)
    with pytest.raises(InputError, match=r"trainIds must be 0\.\.18 or 255"):
        read_label(item)
    bad[0, 0] = 7 if bad[1, 1] != 7 else 8
    cv2.imwrite(str(item.train_ids), bad)
    with pytest.raises(InputError, match="disagrees"):
        check_labels_agree(item)
    cv2.imwrite(str(item.train_ids), bad[:, :-2])
    with pytest.raises(InputError, match="label is"):
        read_label(item)
    lid = cv2.imread(str(item.label_ids), cv2.IMREAD_UNCHANGED)
    lid[0, 0] = 200
    cv2.imwrite(str(item.label_ids), lid)
    item.train_ids.unlink()
    with pytest.raises(InputError, match="unknown label ids"):
        read_label(discover(root).val[0])


def test_sample_refuses_to_replace_real_data_and_unknown_targets(tmp_path):
    real = tmp_path / "dark_zurich"
    (real / "rgb_anon").mkdir(parents=True)
    (tmp_path / "datasets.yaml").write_text(CONFIG)
    r = CliRunner().invoke(app, ["sample", "--config", str(tmp_path / "datasets.yaml"), "--target", "darkzurich",
                                 "--out", str(real)])
    assert r.exit_code == 2 and "refusing to replace it" in r.output and (real / "rgb_anon").is_dir()
    r = CliRunner().invoke(app, ["sample", "--config", str(tmp_path / "datasets.yaml"), "--target", "cityscapes"])
    assert r.exit_code == 2 and "unknown --target 'cityscapes'" in r.output


# ---------------------------------------------------------------------------------------------- test export
def test_darkzurich_export_matches_the_server_format(trees, tmp_path):
    test = discover(trees["darkzurich"]).test
    rng = np.random.default_rng(0)
    preds = {i.name: rng.integers(0, 19, (H // 2, W // 2)).astype(np.int64) for i in test}
    confs = {i.name: np.full((H // 2, W // 2), 0.25 + 0.5 * k / len(test), np.float32) for k, i in enumerate(test)}
    invalid = rng.random((H // 2, W // 2)) < 0.1
    out = tmp_path / "submit" / "dz_test.zip"
    with DarkZurichSubmission(out, test) as sub:
        for i in test:
            sub.add(i.name, preds[i.name], confs[i.name], invalid if i is test[0] else None)
    with zipfile.ZipFile(out) as z:
        names = sorted(z.namelist())
        assert names == sorted(f"{d}/{i.name}.png" for d in ("labelTrainIds", "labelTrainIds_invalid", "confidence")
                               for i in test)
        for i in test:
            seq, frame = re.fullmatch(r"(GOPR\d{4})_frame_(\d{6})", i.name).groups()
            # the server finds each prediction by the prefix {sequence}_frame_{frame:0>6}
            for d in ("labelTrainIds", "labelTrainIds_invalid", "confidence"):
                assert [n for n in names if n.startswith(f"{d}/{seq}_frame_{int(frame):0>6}")] == [f"{d}/{i.name}.png"]

            def png(n: str) -> np.ndarray:
                return cv2.imdecode(np.frombuffer(z.read(n), np.uint8), cv2.IMREAD_UNCHANGED)

            lab, inv, conf = (png(f"{d}/{i.name}.png") for d in ("labelTrainIds", "labelTrainIds_invalid",
                                                                  "confidence"))
            w, h = cv2.imread(str(i.image)).shape[1::-1]
            assert lab.shape == inv.shape == conf.shape == (h, w)  # the test image's own size
            assert lab.dtype == inv.dtype == np.uint8 and conf.dtype == np.uint16
            assert lab.max() <= 18
            assert np.array_equal(lab, np.kron(preds[i.name], np.ones((2, 2), np.int64)).astype(np.uint8))
            assert (conf == round(float(confs[i.name][0, 0]) * 65535)).all()  # confidence x 65535
            if i is test[0]:
                mask = np.kron(invalid, np.ones((2, 2), bool))
                assert (inv[mask] == 255).all() and np.array_equal(inv[~mask], lab[~mask])
            else:
                assert np.array_equal(inv, lab)


def test_export_defaults_and_incomplete_or_bad_predictions(trees, tmp_path):
    test = discover(trees["darkzurich"]).test
    full = {i.name: np.full((H, W), 13, np.uint8) for i in test}
    out = export_darkzurich_test(tmp_path / "ok.zip", test, full)
    with zipfile.ZipFile(out) as z:
        conf = cv2.imdecode(np.frombuffer(z.read(f"confidence/{test[0].name}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert conf.dtype == np.uint16 and (conf == 65535).all()
    missing = dict(list(full.items())[1:])
    with pytest.raises(InputError, match="have no prediction"):
        export_darkzurich_test(tmp_path / "bad.zip", test, missing)
    assert not list(tmp_path.glob("*bad.zip*"))
    with pytest.raises(InputError, match=r"trainIds 0\.\.18"):
        export_darkzurich_test(tmp_path / "bad.zip", test, {k: v + 10 for k, v in full.items()})
    assert not list(tmp_path.glob("*bad.zip*"))


def test_write_label_ids_round_trips(tmp_path):
    t = np.array([[0, 1, 18], [255, 10, 13]], np.uint8)
    write_label_ids(tmp_path / "x_labelIds.png", t)
    lid = cv2.imread(str(tmp_path / "x_labelIds.png"), cv2.IMREAD_UNCHANGED)
    assert lid.tolist() == [[7, 8, 33], [0, 23, 26]]
    assert np.array_equal(_cs_train_ids(lid), t)


def test_export_is_at_the_real_test_image_size(tmp_path):
    """A 960x540 prediction of a real-size (1920x1080) test image is written at 1920x1080."""
    img = tmp_path / "rgb_anon/test/night/GOPR0364/GOPR0364_frame_000001_rgb_anon.png"
    img.parent.mkdir(parents=True)
    cv2.imwrite(str(img), np.zeros((1080, 1920, 3), np.uint8))
    item = TargetImage(img, "GOPR0364_frame_000001", "GOPR0364")
    pred = np.zeros((540, 960), np.uint8)
    pred[:, 480:] = 18
    with DarkZurichSubmission(tmp_path / "s.zip", [item]) as sub:
        sub.add(item.name, pred)
        with pytest.raises(InputError, match="second prediction"):
            sub.add(item.name, pred)
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        lab = cv2.imdecode(np.frombuffer(z.read("labelTrainIds/GOPR0364_frame_000001.png"), np.uint8),
                           cv2.IMREAD_UNCHANGED)
    assert lab.shape == (1080, 1920) and lab.dtype == np.uint8
    assert (lab[:, :960] == 0).all() and (lab[:, 960:] == 18).all()


@pytest.mark.parametrize("section", ["darkzurich: {crop: 0}", "acdc: {resize: [960]}", "darkzurich: {size: 3}",
                                     "sample: {targets: {val: 0}}"])
def test_bad_target_settings_are_errors(tmp_path, section):
    (tmp_path / "datasets.yaml").write_text(section + "\n")
    with pytest.raises(InputError):
        load_config(tmp_path / "datasets.yaml")


def test_discover_target_reads_the_datasets_yaml_section(trees, tmp_path):
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text(f"darkzurich: {{root: {trees['darkzurich']}}}\nacdc: {{root: {trees['darkzurich']}}}\n")
    c = load_config(cfg)
    assert discover_target(c, "darkzurich").val == discover(trees["darkzurich"]).val
    with pytest.raises(InputError, match="no train images: expected rgb_anon/night/train"):
        discover_target(c, "acdc")  # a Dark Zurich tree where ACDC is expected
    with pytest.raises(InputError, match="unknown night target"):
        discover_target(c, "nighttime_driving")
