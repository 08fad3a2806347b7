"""Rare Class Sampling: class probabilities, draw statistics, min-pixels rule, re-crop rule, stats validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.cityscapes import convert_cityscapes
from pipeline.errors import InputError
from pipeline.rcs_stats import (
    SAMPLE_CLASS_STATS,
    SAMPLES_WITH_CLASS,
    build_stats,
    count_classes,
    load_stats,
    resolve_label,
    write_stats,
)
from tests.test_cityscapes import make_tree
from train.data.rcs import RareClassSampler, choose_crop, rcs_class_probs

# class -> pixels per file (files f0..f5); class 9 never exceeds 3000 pixels in one file.
TABLE = {
    0: [9000, 8000, 0, 7000, 0, 6000],
    1: [0, 4000, 5000, 0, 6000, 9000],
    2: [3500, 0, 0, 9500, 0, 8000],
    3: [0, 0, 12000, 0, 12500, 0],
    4: [3001, 3000, 20000, 0, 0, 2000],
    5: [10000, 0, 0, 0, 14600, 0],
    9: [2000, 2500, 3000, 1000, 0, 0],
}


def _stats_list(table=TABLE, prefix: str = "gtFine/train/city") -> list[dict]:
    entries = []
    for i in range(6):
        counts = {c: row[i] for c, row in table.items() if row[i] > 0}
        entries.append((f"{prefix}/city_{i:06d}_000019_gtFine_labelTrainIds.png", counts))
    return build_stats(entries)[0]


def _chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square goodness of fit; bins with expected < 5 pooled. p = Q(k/2, x/2) (torch's gammaincc)."""
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_class_probs_formula_by_hand():
    pixels = {3: 500, 7: 100, 1: 400}
    classes, probs = rcs_class_probs(pixels, temperature=0.1)
    assert classes == [7, 1, 3]  # ascending pixel count, like DAFormer
    logits = [(1 - 100 / 1000) / 0.1, (1 - 400 / 1000) / 0.1, (1 - 500 / 1000) / 0.1]
    z = sum(math.exp(v) for v in logits)
    np.testing.assert_allclose(probs, [math.exp(v) / z for v in logits], rtol=1e-12)
    with pytest.raises(ValueError):
        rcs_class_probs(pixels, temperature=0)


def test_draws_follow_class_probabilities_and_min_pixels():
    sampler = RareClassSampler(_stats_list(), temperature=0.01, min_pixels=3000, seed=1)
    totals = {c: sum(row) for c, row in TABLE.items()}
    assert sampler.class_pixels == totals
    assert sampler.dropped == [9]  # no file with > 3000 pixels of class 9
    classes, probs = rcs_class_probs(totals, 0.01)
    keep = [i for i, c in enumerate(classes) if c != 9]
    expected_p = probs[keep] / probs[keep].sum()
    assert sampler.classes == [classes[i] for i in keep]
    np.testing.assert_allclose(sampler.probs, expected_p, rtol=1e-12)

    n = 20000
    draws = [sampler.sample() for _ in range(n)]
    observed = np.array([sum(c == k for c, _ in draws) for k in sampler.classes], dtype=float)
    assert _chi2_pvalue(observed, expected_p * n) > 0.001
    # every drawn file holds more than min_pixels of the drawn class; exactly 3000 (class 4, f1) is excluded
    per_file = {e["file"]: e for e in _stats_list()}
    assert all(per_file[str(f)][str(c)] > 3000 for c, f in draws)
    files_4 = sorted({str(f) for c, f in draws if c == 4})
    assert [Path(f).name[:11] for f in files_4] == ["city_000000", "city_000002"]
    # files of one class are drawn uniformly
    files_0 = [str(f) for c, f in draws if c == 0]
    names = sorted(set(files_0))
    obs = np.array([files_0.count(f) for f in names], dtype=float)
    assert len(names) == 4 and _chi2_pvalue(obs, np.full(4, len(files_0) / 4)) > 0.001


def test_seed_reproducible_and_no_eligible_class():
    a = RareClassSampler(_stats_list(), seed=7)
    b = RareClassSampler(_stats_list(), seed=7)
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]
    with pytest.raises(InputError, match="no class has a file"):
        RareClassSampler(_stats_list(), min_pixels=10**6)


def _replay(label, cls, crop, seed, thr, tries=10):
    rng = np.random.default_rng(seed)
    my, mx = label.shape[0] - crop[0], label.shape[1] - crop[1]
    draws = []
    for _ in range(tries + 1):
        draws.append((int(rng.integers(my + 1)), int(rng.integers(mx + 1))))
        y, x = draws[-1]
        if np.count_nonzero(label[y : y + crop[0], x : x + crop[1]] == cls) > thr:
            break
    return draws


def test_choose_crop_recrops_until_enough_pixels():
    label = np.full((100, 200), 255, np.uint8)
    label[:, 150:] = 5  # 5000 pixels of class 5 in the right quarter
    hits_first = hits_final = 0
    for seed in range(300):
        y, x = choose_crop(label, 5, (50, 50), np.random.default_rng(seed), min_pixels=3000, min_ratio=0.5)
        draws = _replay(label, 5, (50, 50), seed, 1500)
        assert (y, x) == draws[-1] and len(draws) <= 11
        inside = np.count_nonzero(label[y : y + 50, x : x + 50] == 5)
        hits_final += inside > 1500
        y0, x0 = draws[0]
        hits_first += np.count_nonzero(label[y0 : y0 + 50, x0 : x0 + 50] == 5) > 1500
    # one crop hits with p = 20/151 (x in 131..150); eleven tries with 1 - (131/151)^11 ~ 0.79
    assert hits_first < 0.25 * 300 and hits_final > 0.65 * 300


def test_choose_crop_gives_up_after_ten_recrops_and_ratio_zero():
    label = np.zeros((64, 64), np.uint8)
    rng = np.random.default_rng(3)
    y, x = choose_crop(label, 7, (32, 32), rng)  # class absent: 1 crop + 10 re-crops, last one returned
    ref = np.random.default_rng(3)
    seq = [(int(ref.integers(33)), int(ref.integers(33))) for _ in range(11)]
    assert (y, x) == seq[-1] and rng.integers(1 << 30) == ref.integers(1 << 30)
    rng = np.random.default_rng(4)
    ref = np.random.default_rng(4)
    assert choose_crop(label, 7, (32, 32), rng, min_ratio=0) == (int(ref.integers(33)), int(ref.integers(33)))
    assert choose_crop(label, 0, (100, 100), np.random.default_rng(0)) == (0, 0)  # crop larger than label


def _write_tree(out: Path, prefix_entries: str | None = None) -> list[Path]:
    """Six label PNGs under out/gtFine/train/city and the stats for them."""
    rng = np.random.default_rng(0)
    paths, entries = [], []
    for i in range(6):
        label = rng.choice(np.array([0, 1, 2, 11, 255], np.uint8), size=(40, 90))
        p = out / f"gtFine/train/city/city_{i:06d}_000019_gtFine_labelTrainIds.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), label)
        paths.append(p)
        rel = p.relative_to(out).as_posix()
        entries.append((f"{prefix_entries}/{rel}" if prefix_entries else rel, count_classes(label)))
    write_stats(out, entries)
    return paths


def test_validates_against_labels_on_disk(tmp_path):
    out = tmp_path / "cs"
    paths = _write_tree(out)
    sampler = RareClassSampler(out, min_pixels=100, seed=0)
    c, f = sampler.sample()
    assert f.exists() and c in {0, 1, 2, 11}
    assert np.count_nonzero(cv2.imread(str(f), cv2.IMREAD_UNCHANGED) == c) > 100

    extra = paths[0].with_name("city_000099_000019_gtFine_labelTrainIds.png")
    extra.write_bytes(paths[0].read_bytes())
    with pytest.raises(InputError) as err:
        RareClassSampler(out, min_pixels=100)
    assert err.value.path == out / SAMPLE_CLASS_STATS and "not in the statistics" in str(err.value)
    extra.unlink()

    paths[2].unlink()
    with pytest.raises(InputError) as err:
        RareClassSampler(out, min_pixels=100)
    assert err.value.path == out / SAMPLE_CLASS_STATS and "city_000002" in str(err.value)


def test_inconsistent_or_broken_stats_files(tmp_path):
    out = tmp_path / "cs"
    _write_tree(out)
    swc = json.loads((out / SAMPLES_WITH_CLASS).read_text())
    swc["0"][0][1] += 1
    (out / SAMPLES_WITH_CLASS).write_text(json.dumps(swc))
    with pytest.raises(InputError) as err:
        RareClassSampler(out, min_pixels=100)
    assert err.value.path == out / SAMPLES_WITH_CLASS
    (out / SAMPLE_CLASS_STATS).write_text("[{")
    with pytest.raises(InputError) as err:
        RareClassSampler(out)
    assert err.value.path == out / SAMPLE_CLASS_STATS
    (out / SAMPLE_CLASS_STATS).write_text(json.dumps([{"0": 5}]))
    with pytest.raises(InputError, match="no 'file'"):
        load_stats(out)


def test_daformer_absolute_entries_are_rerooted(tmp_path):
    out = tmp_path / "cs"
    _write_tree(out, prefix_entries="/data/elsewhere/cityscapes")
    entry = load_stats(out)[0][0]
    assert entry.startswith("/data/elsewhere/cityscapes/gtFine/")
    assert resolve_label(out, entry) == out / "gtFine/train/city/city_000000_000019_gtFine_labelTrainIds.png"
    sampler = RareClassSampler(out, min_pixels=100, seed=0)
    assert all(f.exists() for c, f in (sampler.sample() for _ in range(20)))


def test_sampler_on_converted_tree(tmp_path):
    root, out = make_tree(tmp_path / "raw", seed=4), tmp_path / "out"
    convert_cityscapes(root, out, workers=1)
    sampler = RareClassSampler(out, min_pixels=200, seed=0)
    assert set(sampler.classes) <= set(range(19)) and len(sampler.classes) >= 3
    for _ in range(30):
        c, f = sampler.sample()
        assert np.count_nonzero(cv2.imread(str(f), cv2.IMREAD_UNCHANGED) == c) > 200
