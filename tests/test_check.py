"""`cmda check` on a generated sample tree: everything present passes; missing or broken files are named, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from tests.fixtures.cmda_layout import cmda_layout
from tests.test_cmda_checkpoint import mmcv_file, random_state
from tests.test_sample import _config
from train.models import ResnetGenerator, mit

SEQS = ("zurich_city_09_a", "zurich_city_09_b")


@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory) -> Path:
    """A tiny sample written by `cmda sample` (coarse render steps), and its datasets.yaml."""
    folder = tmp_path_factory.mktemp("check")
    cfg = _config(folder, frames=8)
    res = CliRunner().invoke(app, ["sample", "--config", str(cfg), "--out", str(folder / "sample"),
                                   "--step-us", "10000"])
    assert res.exit_code == 0, res.output
    return cfg


def _check(cfg: Path, *args: str):
    return CliRunner().invoke(app, ["check", "--config", str(cfg), *args])


def test_complete_sample_tree_passes(sample_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained/ here: the default weight files are optional
    res = _check(sample_cfg)
    assert res.exit_code == 0, res.output
    out = res.output
    for seq in SEQS:
        assert f"DSEC sequence {seq}" in out
    for what in ("events", "rectify map", "rectified images", "image timestamps", "calibration",
                 "test labels (CMDA's)", "gtFine", "leftImg8bit_sequence", "previous frames for IC1"):
        assert f"[ok] {what}" in out, what
    assert "[MISSING]" not in out and "[INVALID]" not in out
    assert "[not found (optional)] ImageNet MiT (mit_b5) pretrained/mit_b5.pth" in out
    assert "[not found (optional)] CycleGAN" in out and "everything required is present" in out


def test_missing_and_broken_files_are_named_and_exit_2(sample_cfg, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(sample_cfg.parent, folder)
    cfg = folder / "datasets.yaml"
    seq = folder / "sample" / "DSEC_Night" / SEQS[1]
    (seq / "events" / "left" / "rectify_map.h5").unlink()
    (seq / "images" / "timestamps.txt").write_text("1\n2\n")
    prev = sorted((folder / "sample" / "cityscapes" / "leftImg8bit_sequence").rglob("*_leftImg8bit.png"))
    prev[0].unlink()
    monkeypatch.chdir(tmp_path)
    res = _check(cfg)
    assert res.exit_code == 2
    assert f"[MISSING] rectify map {seq / 'events' / 'left' / 'rectify_map.h5'}" in res.output
    assert "[INVALID] image timestamps" in res.output and "2 timestamps for 8 images" in res.output
    assert f"[INVALID] previous frames for IC1 (leftImg8bit_sequence) {prev[0]}: 1 missing" in res.output
    assert "error:" in res.output and "3 required item(s) missing or unreadable" in res.output


def test_weight_files_go_through_the_loaders(sample_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "mit_b0.pth"
    torch.save({**mit("mit_b0").state_dict(), "head.weight": torch.zeros(1000, 256)}, good)
    gan = tmp_path / "gan.pth"
    torch.save(ResnetGenerator().state_dict(), gan)
    res = _check(sample_cfg, "--backbone", "mit_b0", "--pretrained", str(good), "--cyclegan", str(gan))
    assert res.exit_code == 0, res.output
    assert "[ok] ImageNet MiT (mit_b0)" in res.output and "[ok] CycleGAN" in res.output

    cmda = tmp_path / "cmda_b0.pth"  # CMDA's released layout: checkpoint and CycleGAN source at once
    torch.save(mmcv_file(random_state(cmda_layout("mit_b0"))), cmda)
    res = _check(sample_cfg, "--cyclegan", str(cmda), "--checkpoint", str(cmda))
    assert res.exit_code == 0, res.output
    assert "[ok] checkpoint" in res.output
    assert "CMDA's released layout, mit_b0, student; teacher; CycleGAN" in res.output

    res = _check(sample_cfg, "--backbone", "mit_b2", "--pretrained", str(good))  # a b0 file for a b2 run
    assert res.exit_code == 2
    assert "[INVALID] ImageNet MiT (mit_b2)" in res.output and "the file looks like mit_b0" in res.output
    res = _check(sample_cfg, "--pretrained", str(tmp_path / "nope.pth"))  # given explicitly: required
    assert res.exit_code == 2 and "[MISSING] ImageNet MiT (mit_b5)" in res.output
