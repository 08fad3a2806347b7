"""Hostile-user regressions, second round (issue 22).

Each test reproduces one break of the issue on the code before the fix; the item number is in the
test's name or docstring. Runs that must end by themselves run in a subprocess under a timeout, so a
hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from tests.test_hostile_train import assert_one_line_error, tiny_settings

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def run_patched(tmp_path: Path, patch: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``cmda ARGS`` in a subprocess whose modules were patched by the Python lines ``patch`` first."""
    script = tmp_path / "patched_cli.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{patch}\nfrom cli import app\napp()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=timeout)


def tiny_train_args(tree: Path, tmp_path: Path, out: Path, iters: int = 2) -> list[str]:
    return ["train", "--settings", str(tiny_settings(tmp_path, iters)), "--datasets", str(tree), "--out", str(out)]


# ---------------------------------------------------------------------- 1: no hang after an error


def test_an_error_in_the_step_ends_the_process_and_its_loader_workers(training_tree, tmp_path):
    """1: a RuntimeError inside the step with loader workers used to leave the process waiting for its
    workers (which ignore SIGTERM) at interpreter exit, forever."""
    patch = ("import train.engine.loop as L\n"
             "def boom(*a, **k):\n    raise RuntimeError('boom in the step')\n"
             "L.iteration = boom")
    res = run_patched(tmp_path, patch, *tiny_train_args(training_tree, tmp_path, tmp_path / "run"),
                      "--set", "data.workers=2", timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "boom in the step" in res.stderr


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_file_and_ends(training_tree, tmp_path):
    """1, 7: torch.save on a full disk raised a RuntimeError ('unexpected pos') or an OSError without a
    file name; the run must say which file, exit 1 and not hang on its loader workers."""
    patch = ("import errno, train.checkpoints.files as F\n"
             "def full(state, f, *a, **k):\n    raise RuntimeError('[enforce fail at inline_container.cc:672] . "
             "unexpected pos 576 vs 534')\n"
             "F.torch.save = full\n"
             "F.disk_free = lambda path: 0")
    res = run_patched(tmp_path, patch, *tiny_train_args(training_tree, tmp_path, tmp_path / "run"),
                      "--set", "data.workers=2", "--set", "run.ckpt_every=1", timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "iter_000001.pt" in last and "No space left" in last, last
    assert "Traceback" not in res.stderr
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_logging_names_metrics_jsonl(training_tree, tmp_path, monkeypatch):
    """7: an append to metrics.jsonl on a full disk raised OSError(28) without a file name."""
    import errno

    from train.engine.run_folder import RunFolder

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunFolder, "_append", full)
    res = cli(*tiny_train_args(training_tree, tmp_path, tmp_path / "run"))
    assert res.exit_code == 1, res.output
    assert "metrics.jsonl: No space left on device" in res.stderr, res.stderr
