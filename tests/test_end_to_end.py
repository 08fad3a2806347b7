"""End to end through the CLI on a freshly generated sample: data pipeline, training, evaluation.

Slow (a couple of minutes on 2 cores): run with ``pytest -m slow``.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app

pytestmark = pytest.mark.slow


def _ok(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_sample_to_prediction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets.yaml").write_text(
        "dsec:\n  root: sample/DSEC_Night\n  out: processed/dsec\n  test_split: rule\n  label_every: 6\n"
        "  sequences:\n    zurich_city_09_a: {labelled: [0, 13]}\n"
        "cityscapes:\n  root: sample/cityscapes\n  out: processed/cityscapes\n"
        "sample:\n  frames: 24\n  event_rate: 300000.0\n  cityscapes_train: 4\n  cityscapes_val: 1\n"
    )
    _ok(["sample", "--out", "sample"])
    _ok(["preprocess", "--all"])
    _ok(["warp", "--all"])
    out = _ok(["index"])
    assert "zurich_city_09_a: 4 train, 2 test" in out  # train 14..20 even with a window; test 2, 8
    _ok(["cityscapes"])
    _ok(["train", "--preset", "cpu-sample", "--iters", "3", "--crop", "64", "--set", "run.eval_every=3",
         "--set", "data.source_resize=128,64", "--set", "data.test_scale=0.16", "--out", "run"])
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000003.pt"
    assert ckpt.exists() and (tmp_path / "run" / "loss_curve.png").exists()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mIoU" in r for r in records)
    out = _ok(["evaluate", str(ckpt), "--out", "eval"])
    assert "mIoU" in out and (tmp_path / "eval" / "confusion_fusion.png").exists()
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(summary["outputs"]) == {"fusion", "image", "events"}
    assert "truck" not in summary["outputs"]["fusion"]["classes"]
    _ok(["evaluate", str(ckpt), "--domain", "day", "--out", "eval_day"])
    assert json.loads((tmp_path / "eval_day" / "metrics.json").read_text())["domain"] == "day"
    _ok(["predict", str(ckpt), "--limit", "1", "--out", "pred"])
    assert len(list((tmp_path / "pred").glob("*_panel.png"))) == 1


def test_baseline_beats_source_only_on_the_sample(tmp_path, monkeypatch):
    """README's result: `cmda train --preset cpu-sample` with and without adaptation (~15 min on 2 cores)."""
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets.yaml").write_text((repo / "datasets.yaml").read_text())
    _ok(["sample", "--out", "data/sample"])
    _ok(["preprocess", "--all"])
    _ok(["warp", "--all"])
    _ok(["index"])
    _ok(["cityscapes"])
    scores = {}
    for name, extra in (("source_only", ["--source-only"]), ("baseline", ["--variant", "baseline"])):
        _ok(["train", "--preset", "cpu-sample", *extra, "--out", name])
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        scores[name] = [r["eval/mIoU"] for r in records if "eval/mIoU" in r][-1]
        if name == "baseline":  # self-training must actually run: the night side carries weight
            late = [r["pseudo/weight"] for r in records if "pseudo/weight" in r and r["iter"] > 150]
            assert late and sum(late) / len(late) > 0.2, late
            assert (tmp_path / name / "checkpoints" / "best.pt").exists()
    assert scores["baseline"] > scores["source_only"], scores


def test_torchrun_ddp_on_cpu(training_tree, tmp_path):
    """Two processes with the gloo backend: rank 0 writes the run, both train, and after the first
    optimiser step both ranks hold bitwise the same weights (their batches differ, so this only holds
    if DistributedDataParallel averaged the gradients)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "CMDA_DDP_PROBE": str(tmp_path), "PYTHONPATH": str(repo)}
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", str(repo / "tests" / "ddp_probe.py"), "train", "--preset", "cpu-sample",
         "--iters", "2", "--crop", "64", "--set", "data.source_resize=128,64", "--set", "run.eval_every=2",
         "--set", "data.workers=0", "--set", "rcs.min_pixels=50", "--device", "cpu", "--datasets", str(training_tree),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_000002.pt").exists()
    assert len([r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in r]) == 2
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]


def test_torchrun_ddp_with_the_peer_components(training_tree, tmp_path):
    """DSRNSS, DIDA and the discriminator under two gloo processes: after the first iteration both ranks
    hold the same student and the same component state (train/common/collective.py), and a run resumed under
    torchrun from rank 0's checkpoint continues exactly (its last iteration logs what the full run's did)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    common = ["--preset", "cpu-sample", "--iters", "3", "--crop", "128", "--set", "data.source_resize=256,128",
              "--set", "run.eval_every=3", "--set", "run.ckpt_every=1", "--set", "data.workers=0",
              "--set", "rcs.min_pixels=50", "--set", "dsr.enabled=true", "--set", "dsr.bank_classes=0,2",
              "--set", "dsr.paste_every=1", "--set", "dida.enabled=true", "--set", "dida.dim=64",
              "--set", "dida.update_every=1", "--set", "adv.enabled=true", "--device", "cpu",
              "--datasets", str(training_tree)]

    def torchrun_train(probe: Path, *args: str) -> None:
        probe.mkdir()
        env = {**os.environ, "CMDA_DDP_PROBE": str(probe), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
        res = subprocess.run([torchrun, "--nproc_per_node", "2", str(repo / "tests" / "ddp_probe.py"), "train",
                              *common, *args], capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, res.stderr[-3000:]

    torchrun_train(tmp_path / "probe_full", "--out", str(tmp_path / "full"))
    probe = tmp_path / "probe_full"
    assert (probe / "rank0.txt").read_text() == (probe / "rank1.txt").read_text()
    assert (probe / "rank0_peers.txt").read_text() == (probe / "rank1_peers.txt").read_text()
    state = torch.load(tmp_path / "full" / "checkpoints" / "iter_000002.pt", map_location="cpu", weights_only=False)
    assert {"dsr_bank", "dida_bank", "adversary"} <= set(state), sorted(state)
    assert state["dsr_bank"]["entries"][0]["mask"].shape[0] == 2 * 2  # both ranks' batches of 2

    torchrun_train(tmp_path / "probe_resumed", "--out", str(tmp_path / "resumed"), "--resume",
                   str(tmp_path / "full" / "checkpoints" / "iter_000002.pt"))

    def last(run: str) -> dict:
        rows = [json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        row = [r for r in rows if r.get("iter") == 3 and "loss/total" in r][-1]
        return {k: v for k, v in row.items() if k != "time/iter_s"}

    assert last("resumed") == last("full")
    assert {"loss/dsr/proto", "loss/dida/instance", "loss/adv/generator", "adv/d_source"} <= set(last("full"))


def test_torchrun_sigterm_to_one_rank_stops_every_rank(training_tree, tmp_path):
    """A SIGTERM that reaches one rank only: every rank stops after the same iteration, rank 0
    checkpoints it, and the run ends instead of waiting forever on the stopped rank.

    A stopped run is not a finished one: rank 0 exits 130 (as `cmda train` does alone), which torchrun
    reports as a failure. The other ranks exit 0: torchrun terminates every process as soon as one exits
    non-zero, and rank 0 may still be writing the checkpoint (it was, and lost it, before this)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "CMDA_DDP_PROBE": str(tmp_path), "CMDA_DDP_SIGTERM_RANK": "1", "PYTHONPATH": str(repo)}
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", str(repo / "tests" / "ddp_probe.py"), "train", "--preset", "cpu-sample",
         "--iters", "6", "--crop", "64", "--set", "data.source_resize=128,64", "--set", "run.eval_every=6",
         "--set", "data.workers=0", "--set", "rcs.min_pixels=50", "--device", "cpu", "--datasets", str(training_tree),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert res.returncode != 0, res.stderr[-3000:]
    assert "stopped at iteration 2 of 6: not finished" in res.stdout, res.stdout[-2000:]
    assert "exitcode: 130) local_rank: 0" in res.stderr, res.stderr[-3000:]
    assert "local_rank: 1" not in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*.pt")) == ["iter_000002.pt"]
