"""`cmda cityscapes`'s resized copies: the loader's samples are bit-identical with and without them.

The copies are written with the functions the loader's PIL path calls, and the loader reads them
only for ``source_resize_impl="pil"`` at their own size; every other setting resizes the full-size
files as before. At an exact 2x the copies also equal Pillow's own ``Image.resize``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.cityscapes import (
    convert_cityscapes,
    find_samples,
    resized_dir,
    resized_paths,
    sample_paths,
)
from pipeline.config import load_config
from pipeline.errors import InputError
from tests.cli_checks import assert_one_line_error
from tests.test_cityscapes import H, W, make_tree
from train.config import DataConfig, RcsConfig
from train.data.batches import PairedBatches
from train.data.loaders import CityscapesTrain, CityscapesVal, SourceFile

HALF = (W // 2, H // 2)


def _read(path: Path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return a[..., ::-1] if a.ndim == 3 else a


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cs_half")
    root, out = make_tree(base / "raw"), base / "out"
    convert_cityscapes(root, out, workers=1, resize=HALF)
    return root, out


def _yaml(base: Path, root: Path, out: Path, resize: tuple[int, int]) -> Path:
    cfg = base / f"datasets_{resize[0]}x{resize[1]}.yaml"
    cfg.write_text(f"cityscapes:\n  root: {root}\n  out: {out}\n  resize: [{resize[0]}, {resize[1]}]\n")
    return cfg


def test_copies_equal_pillow_at_2x_and_the_loaders_pil_path(half):
    root, out = half
    for s in find_samples(root):
        p, r = sample_paths(root, out, s), resized_paths(out, s, HALF)
        full = SourceFile(p.image, p.label, p.ic1)  # no copies: the loader resizes the full-size files
        for got, want in zip((_read(r.image), _read(r.label), _read(r.ic1)),
                             CityscapesTrain.load(full, HALF, "pil"), strict=True):
            assert got.shape[:2] == (HALF[1], HALF[0])
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(_read(r.image), np.asarray(Image.open(p.image).resize(HALF, Image.BILINEAR)))
        np.testing.assert_array_equal(_read(r.label), np.asarray(Image.open(p.label).resize(HALF, Image.NEAREST)))
        np.testing.assert_array_equal(_read(r.ic1), np.asarray(Image.open(p.ic1).resize(HALF, Image.BILINEAR)))


def test_loader_reads_the_copies_only_at_their_size_and_for_pil(half, monkeypatch):
    root, out = half
    src = CityscapesTrain(load_config(_yaml(out.parent, root, out, HALF)))
    assert all(f.resized is not None and f.resized_size == HALF for f in src.files)
    f = src.files[0]
    without = dataclasses.replace(f, resized=None)
    reads: list[str] = []
    real = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda path, *a: reads.append(str(path)) or real(path, *a))
    for size, impl in ((HALF, "pil"), (HALF, "cv2"), ((W // 4, H // 4), "pil"), ((W, H), "pil")):
        reads.clear()
        got = CityscapesTrain.load(f, size, impl)
        from_copies = all("/resized/" in r for r in reads)
        assert from_copies == (size == HALF and impl == "pil"), (size, impl, reads)
        for a, b in zip(got, CityscapesTrain.load(without, size, impl), strict=True):
            np.testing.assert_array_equal(a, b)


def _batches(cfg_path: Path, data: DataConfig, n: int) -> list[dict[str, torch.Tensor]]:
    pairs = PairedBatches(load_config(cfg_path), data, RcsConfig(min_pixels=20), batch=2, seed=3,
                          with_target=False)
    return [pairs[i] for i in range(n)]


def test_dacs_source_batches_are_bit_identical_with_and_without_copies(half):
    root, out = half
    base = out.parent
    data = DataConfig(source_resize=HALF, crop=48)
    with_copies = _batches(_yaml(base, root, out, HALF), data, 6)
    assert all(f.resized is not None for f in CityscapesTrain(load_config(_yaml(base, root, out, HALF))).files)
    without = _batches(_yaml(base, root, out, (0, 0)), data, 6)
    for a, b in zip(with_copies, without, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    cfg = load_config(_yaml(base, root, out, HALF))
    val_copies, val_full = CityscapesVal(cfg, data), CityscapesVal(load_config(_yaml(base, root, out, (0, 0))), data)
    assert val_copies.files[0].resized is not None and val_full.files[0].resized is None
    for k in ("image", "events", "label"):
        assert torch.equal(val_copies[0][k], val_full[0][k])


def test_resume_rewrites_a_copy_with_its_full_size_file(tmp_path):
    root, out = make_tree(tmp_path / "raw", seed=2), tmp_path / "out"
    convert_cityscapes(root, out, workers=1, resize=HALF)
    s = find_samples(root)[0]
    p, r = sample_paths(root, out, s), resized_paths(out, s, HALF)
    want = {k: getattr(r, k).read_bytes() for k in ("image", "label", "ic1")}
    old = r.image.stat().st_mtime_ns - 10**9
    os.utime(r.image, ns=(old, old))
    r.ic1.unlink()  # a missing copy is made from the full-size file
    r.label.write_bytes(b"stale")
    p.label.unlink()  # a regenerated label rewrites its copy
    convert_cityscapes(root, out, workers=1, resize=HALF)
    assert r.image.stat().st_mtime_ns == old  # present, nothing fresh: kept
    for k, v in want.items():
        assert getattr(r, k).read_bytes() == v, k
    assert not list(out.rglob("*.tmp"))


def test_no_copies_with_resize_zero_and_bad_resize_refused(tmp_path):
    root, out = make_tree(tmp_path / "raw", seed=3), tmp_path / "out"
    convert_cityscapes(root, out, workers=1, resize=(0, 0))
    assert not (out / "resized").exists()
    src = CityscapesTrain(load_config(_yaml(tmp_path, root, out, (1024, 512))))
    assert all(f.resized is None for f in src.files)  # a tree without copies: every sample resized
    bad = _yaml(tmp_path, root, out, (0, 512))
    with pytest.raises(InputError, match=r"cityscapes\.resize"):
        load_config(bad)
    res = CliRunner().invoke(app, ["cityscapes", "--config", str(bad)])
    assert_one_line_error(res, str(bad), "cityscapes.resize")


def test_cli_writes_copies_at_the_configured_size(tmp_path):
    root, out = make_tree(tmp_path / "raw", seed=4), tmp_path / "out"
    res = CliRunner().invoke(app, ["cityscapes", "--config", str(_yaml(tmp_path, root, out, (64, 32)))])
    assert res.exit_code == 0, res.output
    assert resized_dir(out, (64, 32)).is_dir() and not resized_dir(out, (1024, 512)).exists()
    for s in find_samples(root):
        assert _read(resized_paths(out, s, (64, 32)).image).shape == (32, 64, 3)


def test_a_wrong_size_copy_names_the_file(half, tmp_path):
    root, out = half
    tree = tmp_path / "out"
    shutil.copytree(out, tree)
    src = CityscapesTrain(load_config(_yaml(tmp_path, root, tree, HALF)))
    f = src.files[0]
    assert f.resized is not None
    cv2.imwrite(str(f.resized.ic1), np.zeros((HALF[1], HALF[0] + 1), np.uint8))
    with pytest.raises(InputError) as err:
        CityscapesTrain.load(f, HALF)
    assert err.value.path == f.resized.ic1 and "resized copy" in str(err.value)
    f.resized.label.write_bytes(b"not a png")
    with pytest.raises(InputError) as err:
        CityscapesTrain.load(f, HALF)
    assert err.value.path == f.resized.label
