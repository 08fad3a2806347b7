"""README's image-only figure: on the synthetic Dark Zurich sample, CMDA's image + ISR baseline beats
source-only on the val split (seed 0, `--preset cpu-sample`, 300 iterations each).

Slow (about 25 minutes on 2 busy cores): run with ``pytest -m slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def _evals(run: Path) -> list[float]:
    return [r["eval/mIoU"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "eval/mIoU" in r]


def test_image_isr_baseline_beats_source_only_on_the_synthetic_darkzurich_val(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "datasets.yaml", tmp_path / "datasets.yaml")  # the bundled sample's sizes and seed
    _ok(["sample"])
    _ok(["cityscapes"])
    _ok(["sample", "--target", "darkzurich"])
    common = ["train", "--target", "darkzurich", "--preset", "cpu-sample", "--seed", "0", "--device", "cpu",
              "--pretrained", "none"]
    _ok([*common, "--source-only", "--out", "source_only"])
    _ok([*common, "--out", "baseline"])
    source_only, baseline = _evals(tmp_path / "source_only"), _evals(tmp_path / "baseline")
    assert len(source_only) == len(baseline) == 3  # iterations 100, 200, 300
    assert baseline[-1] > source_only[-1]
    assert max(baseline) > max(source_only)
