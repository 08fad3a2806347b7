"""`cmda compare`: argument parsing, the seed statistics, and (slow) a real two-by-two comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import InputError
from train.tools.compare import Entry, compare, markdown, parse_entry, parse_seeds, summarize


def test_entries_and_seeds_parse():
    assert parse_entry("baseline") == Entry("baseline", ("--variant", "baseline"))
    assert parse_entry("b + mic=--variant baseline --set mic.enabled=true").args == (
        "--variant", "baseline", "--set", "mic.enabled=true")
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,0", "a"):
        with pytest.raises(InputError):
            parse_seeds(bad)
    with pytest.raises(InputError):
        parse_entry("=--variant baseline")


def test_summary_is_the_sample_mean_and_std_over_seeds():
    rng = np.random.default_rng(0)
    records = []
    for label in ("a", "b"):
        for seed in range(3):
            iou = {"road": float(rng.random()), "car": float(rng.random()), "truck": None}
            records.append({"label": label, "seed": seed, "mIoU": float(rng.random()), "iou": iou})
    rows = summarize(records, ["a", "b"])
    for label in ("a", "b"):
        m = [r["mIoU"] for r in records if r["label"] == label]
        assert rows[label]["mIoU_mean"] == pytest.approx(np.mean(m))
        assert rows[label]["mIoU_std"] == pytest.approx(np.std(m, ddof=1))
        road = [r["iou"]["road"] for r in records if r["label"] == label]
        assert rows[label]["per_class"]["road"]["std"] == pytest.approx(np.std(road, ddof=1))
        assert "truck" not in rows[label]["per_class"]  # never annotated: not averaged
    assert "| a | 3 |" in markdown(rows)


@pytest.mark.slow
def test_compare_two_configurations_two_seeds(training_tree, tmp_path):
    common = ("--preset", "cpu-sample", "--iters", "2", "--crop", "64", "--config", str(training_tree),
              "--set", "run.eval_every=2", "--set", "run.ckpt_every=2", "--set", "data.workers=0",
              "--set", "data.source_resize=128,64", "--set", "data.test_scale=0.16")
    entries = [parse_entry("baseline"), parse_entry("src-only=--source-only")]
    res = compare(entries, [0, 1], tmp_path / "cmp", common, progress=lambda *_: None)
    for label, slug in (("baseline", "baseline"), ("src-only", "src-only")):
        m = [json.loads((tmp_path / "cmp" / slug / f"seed{s}" / "eval_final" / "metrics.json").read_text())
             ["outputs"]["fusion"]["mIoU"] for s in (0, 1)]
        assert res["rows"][label]["mIoU_mean"] == pytest.approx(np.mean(m))
        assert res["rows"][label]["mIoU_std"] == pytest.approx(np.std(m, ddof=1))
    assert (tmp_path / "cmp" / "compare.png").exists() and (tmp_path / "cmp" / "compare.md").exists()
    # resumable: a second call redoes nothing (the result files are not rewritten)
    stamp = (tmp_path / "cmp" / "baseline" / "seed0" / "result.json").stat().st_mtime_ns
    compare(entries, [0, 1], tmp_path / "cmp", common, progress=lambda *_: None)
    assert (tmp_path / "cmp" / "baseline" / "seed0" / "result.json").stat().st_mtime_ns == stamp


def test_a_stopped_training_is_not_recorded_as_finished(tmp_path, monkeypatch):
    """A `cmda train` that stops early (a signal: exit 130) must not be evaluated and marked done: the
    next `cmda compare` resumes it instead of tabulating a half-trained checkpoint."""
    from train.tools import compare as cmp

    calls: list[list[str]] = []

    def fake_run(args, log):
        calls.append(args)
        (tmp_path / "out" / "base" / "seed0" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / "base" / "seed0" / "checkpoints" / "iter_000001.pt").write_bytes(b"x")
        return 130

    monkeypatch.setattr(cmp.Children, "run", lambda self, args, log: fake_run(args, log))
    with pytest.raises(InputError, match="stopped before its last iteration"):
        cmp.run_one(Entry("base", ("--variant", "baseline")), 0, (), tmp_path / "out")
    assert [a[0] for a in calls] == ["train"]  # never evaluated
    assert not (tmp_path / "out" / "base" / "seed0" / "result.json").exists()


def test_one_seed_has_no_std_rather_than_zero():
    """A configuration run with one seed has an unknown spread: the table says "one seed", the JSON null."""
    rows = summarize([{"label": "a", "seed": 0, "mIoU": 0.5, "iou": {"road": 0.7}}], ["a"])
    assert rows["a"]["mIoU_std"] is None and rows["a"]["per_class"]["road"]["std"] is None
    table = markdown(rows)
    assert "50.00 (one seed)" in table and "70.0 (one seed)" in table and "+- 0.00" not in table
    assert json.loads(json.dumps(rows))["a"]["mIoU_std"] is None


def test_a_broken_result_file_is_one_line_naming_it(tmp_path):
    """result.json is written atomically, so a broken one is not compare's: say which file, do not trace back."""
    from train.tools import compare as cmp

    done = tmp_path / "out" / "base" / "seed0" / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text('{"label": ')
    with pytest.raises(InputError, match=r"result\.json.*not a run record"):
        cmp.run_one(Entry("base", ("--variant", "baseline")), 0, (), tmp_path / "out")
