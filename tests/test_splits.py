"""cmda index: split rules from datasets.yaml applied to a preprocessed sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import preprocess as pre
from pipeline.config import load_config
from pipeline.dsec import SequencePaths
from pipeline.errors import InputError
from pipeline.splits import TEST_TXT, TRAIN_TXT, read_index, train_frames, warp_dir, write_index
from pipeline.splits import test_frames as split_test_frames
from pipeline.store import VoxelStore
from tests.dsec_fixtures import sequence_tree, write_config


@pytest.fixture(params=["generated", "real"])
def indexed(request, tmp_path):
    # ~20 frames every 5 ms over the 96 ms recording (generated, or the real one where ../shared
    # exists); frames 0..7 labelled, labels on 2 and 5.
    source = request.getfixturevalue("real_dir") if request.param == "real" else None
    _, ts = sequence_tree(source, tmp_path, step_us=5_000)
    cfg = load_config(write_config(tmp_path, tmp_path / "DSEC", {"zurich_city_09_a": (0, 7)}))
    paths = SequencePaths(cfg.dsec.root, "zurich_city_09_a")
    paths.labels_dir.mkdir(parents=True)
    for f in (2, 5):
        paths.label(f).write_bytes(b"png")
    pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    wdir = warp_dir(cfg, "zurich_city_09_a")
    wdir.mkdir(parents=True)
    for f in range(len(ts)):
        (wdir / f"{f:06d}.png").write_bytes(b"png")
    return cfg, ts


def test_index_files_follow_the_rules(indexed):
    cfg, ts = indexed
    counts = write_index(cfg)
    valid = np.ones(len(ts), bool)
    valid[[0, 1, len(ts) - 1]] = False  # no window: frame 0, the frame before the stream, after it
    expected_train = [f for f in range(8, len(ts)) if f % 2 == 0 and valid[f]]
    assert counts == {"zurich_city_09_a": {"train": len(expected_train), "test": 2}}
    train_lines = (cfg.dsec.out / TRAIN_TXT).read_text().splitlines()
    test_lines = (cfg.dsec.out / TEST_TXT).read_text().splitlines()
    root = cfg.dsec.root / "zurich_city_09_a" / "images" / "left" / "rectified"
    assert [ln.split()[0] for ln in train_lines] == [str(root / f"{f:06d}.png") for f in expected_train]
    assert [ln.split()[0] for ln in test_lines] == [str(root / "000002.png"), str(root / "000005.png")]
    index = VoxelStore.open(pre.store_path(cfg, "zurich_city_09_a")).index("event_index")
    assert [int(ln.split()[1]) for ln in train_lines] == [int(index[f]) for f in expected_train]
    rows = read_index(cfg.dsec.out / "index.csv")
    assert [r.frame for r in rows if r.split == "train"] == expected_train
    test_rows = read_index(cfg.dsec.out / "index.csv", "test")
    assert test_rows[1].label.endswith("zurich_city_09_a_000005_grey_gtFine_labelTrainIds.png")
    r = rows[0]
    assert r.event_count == r.event_stop - r.event_start + 1 and r.timestamp_us == ts[r.frame]


def test_rule_mode_requires_every_rule_label(indexed):
    cfg, _ = indexed
    every3 = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, test_split="rule", label_every=3))
    assert split_test_frames(every3, "zurich_city_09_a", 20) == [2, 5]
    every2 = dataclasses.replace(every3, dsec=dataclasses.replace(every3.dsec, label_every=2))
    with pytest.raises(InputError, match="label missing for test frame 4"):
        split_test_frames(every2, "zurich_city_09_a", 20)


def test_missing_warp_image_is_an_error(indexed):
    cfg, _ = indexed
    (warp_dir(cfg, "zurich_city_09_a") / "000008.png").unlink()
    with pytest.raises(InputError, match=r"000008\.png: warped image missing"):
        write_index(cfg)
    assert not (cfg.dsec.out / "index.csv").exists()


def test_train_rule_on_dsec_ranges():
    # With DSEC's labelled range for sequence b (0..149): training starts at 150, even frames only.
    cfg = load_config_from_dict({"zurich_city_09_b": (0, 149)})
    valid = np.ones(200, bool)
    valid[152] = False
    frames = train_frames(cfg, "zurich_city_09_b", valid)
    assert frames[0] == 150 and 152 not in frames and all(f % 2 == 0 for f in frames)
    assert len(frames) == 24


def load_config_from_dict(seqs):
    from pipeline.config import DatasetsConfig, DsecConfig, SequenceSpec

    return DatasetsConfig(dsec=DsecConfig(sequences={k: SequenceSpec(v) for k, v in seqs.items()}))
