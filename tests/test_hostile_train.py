"""Hostile-user regressions for the trainer and its commands (issue 10, trainer side).

Each test reproduces one way the trainer used to corrupt a run, lose progress or print a traceback
where one line was due; the item number of the issue is in the test's name or docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.errors import STOPPED_EXIT, InputError
from pipeline.splits import TABLE, read_index
from train.checkpoints.files import load_checkpoint
from train.config import TrainConfig
from train.engine import loop as dacs
from train.engine.signals import worker_init

REPO = Path(__file__).resolve().parents[1]

# The tiny settings of tests/test_train.py's tiny_config, as a --settings file for the CLI.
TINY = """\
model: {backbone: mit_b0, head_channels: 16, pretrained: none, cyclegan: none}
data: {crop: 64, source_resize: [128, 64], target_crop: 256, test_rows: 64, workers: 0}
rcs: {min_pixels: 50}
run: {iters: ITERS, log_every: 1, eval_every: ITERS, ckpt_every: 2, eval_max: 1}
"""


def tiny_settings(tmp_path: Path, iters: int = 2) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("ITERS", str(iters)))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *needles: str) -> None:
    """The CLI promise: exit code 2, exactly one line on stderr starting 'error:', no exception escaped."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_cli(tree: Path, tmp_path: Path, out: Path, iters: int = 2, *extra: str):
    res = cli("train", "--settings", tiny_settings(tmp_path, iters), "--datasets", tree, "--out", out, *extra)
    assert res.exit_code == 0, res.output
    return res


def copy_tree(src_yaml: Path, dst: Path) -> Path:
    """Copy a test tree and rewrite index.csv with paths RELATIVE to the copy's datasets.yaml folder."""
    shutil.copytree(src_yaml.parent, dst)
    index = dst / "processed" / TABLE
    text = index.read_text().replace(str(src_yaml.parent) + "/", "")
    index.write_text(text)
    return dst / "datasets.yaml"


# ---------------------------------------------------------------------- 4, 12: resume uses the run's config


def test_resume_needs_only_the_run_folder(training_tree, tmp_path, monkeypatch):
    """12: `cmda train --resume RUN` from anywhere continues with the run's own settings (mit_b0 here)."""
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 2, "--set", "run.ckpt_every=1", "--set", "run.iters=3",
              "--set", "run.eval_every=3")
    (run / "checkpoints" / "iter_000003.pt").unlink()  # as if stopped after iteration 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli("train", "--resume", run)
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "iter_000003.pt").exists()
    assert not (elsewhere / "runs").exists()


def test_resume_refuses_changed_settings_and_lists_them(training_tree, tmp_path):
    """4: --seed / --lr / --iters / loss weights differing from the run's are an error naming each."""
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 2)
    before = (run / "config.json").read_text()
    res = cli("train", "--resume", run, "--lr", "0.1", "--seed", "3", "--lambda-fusion-st", "0.5")
    assert_one_line_error(res, "optim.lr", "run.seed", "loss.fusion_st", "--resume-override")
    assert (run / "config.json").read_text() == before


def test_resume_override_logs_the_changes_and_keeps_both_configs(training_tree, tmp_path):
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 2)
    res = cli("train", "--resume", run, "--iters", "3", "--set", "run.eval_every=3", "--resume-override")
    assert res.exit_code == 0, res.output
    recs = records(run)
    change = [r for r in recs if "resume_override" in r]
    assert change and change[0]["iter"] == 2
    assert change[0]["resume_override"]["run.iters"] == [2, 3]
    saved = json.loads((run / "config.json").read_text())
    assert saved["run"]["iters"] == 3
    assert saved["history"][0]["iter"] == 2 and saved["history"][0]["config"]["run"]["iters"] == 2
    assert load_checkpoint(run / "checkpoints" / "iter_000003.pt")["iteration"] == 3


def test_resume_with_the_same_settings_is_not_a_difference(training_tree, tmp_path):
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 2)
    res = cli("train", "--resume", run, "--settings", tiny_settings(tmp_path, 2), "--device", "cpu")
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------- 5: signals never make a checkpoint inconsistent


@pytest.mark.parametrize("where", ["step", "optimizer"])
def test_second_signal_never_writes_an_inconsistent_checkpoint(training_tree, tmp_path, monkeypatch, where):
    """5: two SIGTERMs inside iteration 3 (in the passes, or right after the optimiser step): every
    checkpoint left equals the uninterrupted run's checkpoint of the same iteration."""
    from tests.test_train import assert_same_state, tiny_config

    dacs.train(tiny_config(training_tree, tmp_path / "full", iters=4, ckpt_every=1))
    calls = {"n": 0}

    def twice() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    if where == "step":
        real = dacs.iteration

        def step(*a, **k):
            out = real(*a, **k)
            twice()
            return out

        monkeypatch.setattr(dacs, "iteration", step)
    else:
        real_opt = torch.optim.AdamW.step

        def opt_step(self, *a, **k):
            out = real_opt(self, *a, **k)
            twice()
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)
    res = dacs.train(tiny_config(training_tree, tmp_path / "cut", iters=4, ckpt_every=1))
    assert calls["n"] == 3 and res["stopped"] <= 3
    left = sorted((tmp_path / "cut" / "checkpoints").glob("iter_*.pt"))
    assert left
    for path in left:
        assert_same_state(load_checkpoint(path), load_checkpoint(tmp_path / "full" / "checkpoints" / path.name))


# ---------------------------------------------------------------------- 7: SIGTERM to the whole process group


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_like_a_single_signal(training_tree, tmp_path):
    """7: what `timeout`, Slurm and systemd do: every process of the group (loader workers too) gets SIGTERM."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from cli import app; app()", "train", "--config-file",
           str(tiny_settings(tmp_path, 200)), "--config", str(training_tree), "--out", str(run),
           "--set", "data.workers=2", "--set", "run.log_every=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and '"loss/total"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == STOPPED_EXIT, err[-3000:]  # stopped, resumable, not finished
    assert "Traceback" not in err and "stopped at iteration" in err + out
    assert list((run / "checkpoints").glob("iter_*.pt"))


def test_loader_workers_ignore_sigint_and_sigterm():
    """7 (unit): the worker init leaves both signals to the main process."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker_init(0)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------- 8: a torn last line in metrics.jsonl


def test_resume_truncates_a_torn_last_metrics_line(training_tree, tmp_path):
    from tests.test_train import tiny_config

    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=2))
    log = tmp_path / "run" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"iter": 3, "loss/tot')
    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=3, eval_every=2), resume=tmp_path / "run",
               override=True)
    lines = log.read_text().splitlines()
    assert all(json.loads(x) for x in lines)
    assert [json.loads(x)["iter"] for x in lines if "loss/total" in x] == [1, 2, 3]


def test_resume_refuses_a_metrics_log_broken_in_the_middle(training_tree, tmp_path):
    from tests.test_train import tiny_config

    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=2))
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text("{broken\n" + log.read_text())
    with pytest.raises(InputError, match="line 1"):
        dacs.train(tiny_config(training_tree, tmp_path / "run", iters=2), resume=tmp_path / "run")


# ---------------------------------------------------------------------- 9: loader worker errors, index paths


def test_input_error_in_a_loader_worker_is_one_line(training_tree, tmp_path, monkeypatch):
    """9: a missing file read inside a DataLoader worker process is the usual InputError, not RuntimeError."""
    from tests.test_train import tiny_config
    from train.data import loaders as data

    def missing(path):
        raise InputError(path, "image missing or unreadable")

    monkeypatch.setattr(data, "read_rgb", missing)  # forked workers inherit the patch
    cfg = tiny_config(training_tree, tmp_path / "run", iters=2)
    cfg.data.workers = 1
    with pytest.raises(InputError, match="image missing or unreadable"):
        dacs.train(cfg)


def test_index_paths_are_relative_to_the_datasets_yaml(training_tree, tmp_path, monkeypatch):
    """9: an index.csv with relative paths works with --datasets from another folder."""
    from pipeline.config import load_config
    from train.data.loaders import NightFrames

    cfg_path = copy_tree(training_tree, tmp_path / "tree")
    assert not read_index(tmp_path / "tree" / "processed" / TABLE)[0].store.startswith("/")
    monkeypatch.chdir(tmp_path)
    frames = NightFrames(load_config(cfg_path), "test")
    image, events, row = frames.load(0)
    assert image.shape[:2] == events.shape[1:] and Path(row.label).is_absolute()


def test_label_values_outside_the_classes_are_an_input_error(training_tree, tmp_path):
    """10: a test label with value 30 (not 0-18 or 255) used to crash evaluation on a reshape."""
    import cv2

    from pipeline.config import load_config
    from train.data.loaders import NightTest

    cfg_path = copy_tree(training_tree, tmp_path / "tree")
    row = read_index(tmp_path / "tree" / "processed" / TABLE, "test")[0]
    label_path = tmp_path / "tree" / row.label
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[5, 7] = 30
    cv2.imwrite(str(label_path), label)
    with pytest.raises(InputError, match="value 30"):
        NightTest(load_config(cfg_path), TrainConfig().data)[0]


def test_source_label_values_outside_the_classes_are_an_input_error(tmp_path):
    import numpy as np

    from pipeline.atomic import write_png
    from train.data.loaders import CityscapesTrain, SourceFile

    for name, arr in (("img.png", np.zeros((8, 8, 3), np.uint8)), ("ic1.png", np.zeros((8, 8), np.uint8))):
        write_png(tmp_path / name, arr)
    label = np.zeros((8, 8), np.uint8)
    label[0, 0] = 19
    write_png(tmp_path / "lbl.png", label)
    with pytest.raises(InputError, match="value 19"):
        CityscapesTrain.load(SourceFile(tmp_path / "img.png", tmp_path / "lbl.png", tmp_path / "ic1.png"), (8, 8))


# ---------------------------------------------------------------------- 10, 11: bad option values, devices


BAD_OPTIONS = [
    (["--set", "run.ckpt_every=0"], "run.ckpt_every"),
    (["--set", "run.keep_ckpts=-1"], "run.keep_ckpts"),
    (["--set", "run.log_every=0"], "run.log_every"),
    (["--set", "run.eval_every=0"], "run.eval_every"),
    (["--backbone", "resnet50"], "model.backbone"),
    (["--backbone", "mit_b9"], "model.backbone"),
    (["--lr", "-1"], "optim.lr"),
    (["--set", "optim.lr=nan"], "optim.lr"),
    (["--batch", "0"], "run.batch"),
    (["--crop", "0"], "data.crop"),
    (["--iters", "0"], "run.iters"),
    (["--set", "data.workers=-1"], "data.workers"),
    (["--set", "model.num_classes=0"], "model.num_classes"),
    (["--set", "run.variant=bogus"], "variant"),
    (["--device", "tpu"], "device"),
    (["--set", "dacs.pseudo_threshold=2"], "dacs.pseudo_threshold"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line(args, needle):
    res = cli("train", "--dry-run", *args)
    assert_one_line_error(res, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line(device):
    for command in (["train", "--dry-run"], ["evaluate", "missing.pt"], ["predict", "missing.pt"]):
        res = cli(*command, "--device", device)
        assert_one_line_error(res, "CUDA")


def test_device_names_resolve_alike_everywhere():
    from train.common.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda", local_rank=1, cuda_available=True) == torch.device("cuda:1")
    assert resolve_device("cuda:3", local_rank=1, cuda_available=True) == torch.device("cuda:3")
    assert resolve_device("auto", local_rank=2, cuda_available=True) == torch.device("cuda:2")
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", "cpu:0x"):
        with pytest.raises(InputError):
            resolve_device(bad, cuda_available=True)


def test_validate_accepts_the_defaults_and_every_preset():
    from train.config import PRESETS, VARIANTS, apply_preset, apply_variant, validate

    validate(TrainConfig())
    for v in VARIANTS:
        for p in PRESETS:
            validate(apply_preset(apply_variant(TrainConfig(), v), p))


# ---------------------------------------------------------------------- 13: rough edges


def test_dry_run_shows_the_resolved_out_and_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("train", "--dry-run", "--device", "cpu", "--datasets", REPO / "datasets.yaml")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["run"]["device"] == "cpu"
    assert cfg["run"]["out"] and cfg["run"]["out"].startswith(str(tmp_path / "runs"))
    res = cli("train", "--dry-run", "--datasets", REPO / "datasets.yaml")
    assert json.loads(res.stdout)["run"]["device"] in ("cpu", "cuda:0")


def test_train_help_explains_every_option():
    res = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0
    for name in ("--lambda-rgb-event-src", "--lambda-fusion-st", "--lambda-rgb-st", "--lambda-event-s-rgb-t",
                 "--lambda-event-st"):
        line = next(ln for ln in res.output.splitlines() if name in ln)
        assert "mse" in line.lower() or "weight" in line.lower(), line
    assert "--settings" in res.output and "--datasets" in res.output and "--resume-override" in res.output


def test_old_option_names_still_work(tmp_path):
    res = cli("train", "--dry-run", "--config-file", tiny_settings(tmp_path), "--config", REPO / "datasets.yaml",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"]["backbone"] == "mit_b0"


def test_inspect_has_a_preset_and_writes_under_runs(training_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("inspect", "--config", training_tree, "--preset", "cpu-sample", "--set", "rcs.min_pixels=50",
              "--set", "data.source_resize=128,64", "--set", "data.crop=64")
    assert res.exit_code == 0, res.output
    written = list((tmp_path / "runs" / "inspect").glob("*.png"))
    assert len(written) == 1 and not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------- 14: temp files of dead writers


def test_stale_checkpoint_temp_files_are_cleaned(training_tree, tmp_path):
    from tests.test_train import tiny_config

    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=2))
    ckpts = tmp_path / "run" / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ckpts / f".iter_000004.pt.{dead.pid}.tmp"
    legacy = ckpts / ".iter_000004.pt.k2j3h4_x.tmp"  # mkstemp name of an older cmda
    live = ckpts / f".iter_000004.pt.{os.getpid()}.tmp"
    for p in (stale, legacy, live):
        p.write_bytes(b"x" * 100)
    dacs.train(tiny_config(training_tree, tmp_path / "run", iters=3, eval_every=2), resume=tmp_path / "run",
               override=True)
    assert not stale.exists() and not legacy.exists() and live.exists()
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp") and p != live]


def test_keep_ckpts_keeps_only_the_newest_checkpoints_and_resume_still_works(training_tree, tmp_path):
    """A full disk stopped CI once; a 40k-iteration MiT-B5 run writes ten ~GB checkpoints. run.keep_ckpts=N
    deletes older iter_*.pt only after the newer one is safely renamed into place; best.pt is never pruned."""
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 4, "--set", "run.ckpt_every=1", "--set", "run.keep_ckpts=2",
              "--set", "run.eval_every=1")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "iter_000003.pt", "iter_000004.pt"], names
    # keep_ckpts says nothing about what a run computes: a resume may change it without --resume-override
    res = cli("train", "--resume", run, "--iters", "5", "--set", "run.eval_every=1", "--set", "run.keep_ckpts=1",
              "--resume-override")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "iter_000005.pt"]
    assert "run.keep_ckpts" not in next(r for r in records(run) if "resume_override" in r)["resume_override"]
    assert load_checkpoint(run / "checkpoints" / "iter_000005.pt")["iteration"] == 5


def test_keep_ckpts_zero_keeps_every_checkpoint(training_tree, tmp_path):
    run = tmp_path / "run"
    train_cli(training_tree, tmp_path, run, 3, "--set", "run.ckpt_every=1")
    assert [f"iter_00000{i}.pt" for i in (1, 2, 3)] == sorted(p.name for p in (run / "checkpoints").glob("iter_*"))


def test_prune_orders_checkpoints_by_iteration_not_by_name(tmp_path):
    """Past iteration 999999 the zero-padded names stop sorting by number."""
    from train.checkpoints.files import find_checkpoint, prune_checkpoints

    for it in (999_998, 999_999, 1_000_000):
        (tmp_path / f"iter_{it:06d}.pt").write_bytes(b"x")
    (tmp_path / "best.pt").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["iter_999998.pt"]
    assert find_checkpoint(tmp_path).name == "iter_1000000.pt"
    assert prune_checkpoints(tmp_path, keep=0) == []


# ---------------------------------------------------------------------- 7b: a stopped run is not a finished one

def test_a_stopped_run_exits_non_zero_and_does_not_call_its_score_final(training_tree, tmp_path, monkeypatch):
    """A run stopped by a signal before its last iteration must not look finished to whatever called it
    (`cmda compare`, dvc, a job script): exit 130, as shells report an interrupted command, and no
    "final" mIoU (the score shown is the last evaluation's, iterations before the stop)."""
    from tests.test_train import sigterm_after_each_step

    sigterm_after_each_step(monkeypatch)
    out = tmp_path / "run"
    res = cli("train", "--settings", tiny_settings(tmp_path, 3), "--datasets", training_tree, "--out", out)
    assert res.exit_code == STOPPED_EXIT, (res.exit_code, res.output)
    assert "final night mIoU" not in res.output
    assert "stopped at iteration 1 of 3" in res.output and "--resume" in res.output
    assert (out / "checkpoints" / "iter_000001.pt").exists()
