"""benchmarks/gpu_suite.py: the CPU smoke run writes every field, and without CUDA the full suite refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_and_without_smoke_is_one_line_exit_2(tmp_path):
    res = _run(["--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "no CUDA device" in res.stderr


def test_smoke_run_writes_every_field(training_tree, tmp_path):
    res = _run(["--smoke", "--out", str(tmp_path / "out"), "--datasets", str(training_tree)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert set(report) >= {"smoke", "requirements", "env", "train_step", "sample_run", "oom", "ddp", "components",
                           "inference", "seconds"}
    comp = report["components"]["configs"]
    assert list(comp) == ["baseline", "dsr", "dida", "adv", "all"]
    assert comp["baseline"]["ratio"] == 1.0 and all(r["s_per_iter"] > 0 for r in comp.values())
    inf = report["inference"]
    assert inf["event_side_ms"] > 0 and inf["models"]["mit_b0"]["torch_cpu"] > 0, inf
    assert {"gpu", "driver", "torch", "cuda", "cudnn"} <= set(report["env"])
    names = [r["name"] for r in report["train_step"]]
    assert names == ["fp32 eager", "default (bf16, channels_last, fused AdamW)", "default + compile",
                     "default + checkpointing", "default + accum 2"]
    for r in report["train_step"]:
        assert "skipped" in r or {"s_per_iter", "peak_gb", "reserved_gb", "projected_40k_h"} <= set(r), r
    assert report["sample_run"]["train"]["exit"] == 0 and report["sample_run"]["evaluate"]["exit"] == 0
    assert 0 <= report["sample_run"]["evaluate"]["night_mIoU_fusion"] <= 1
    assert report["ddp"]["exit"] == 0 and report["ddp"]["backend"] == "gloo"
    assert (tmp_path / "out" / "gpu_suite.md").read_text().startswith("# cmda GPU suite")
