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
from tests.test_voxel import reference_norm

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
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unexpected RuntimeError: boom in the step (traceback in "), last
    assert "Traceback" not in res.stderr
    kept = Path(last.split("(traceback in ")[1].split(";")[0])
    assert "Traceback" in kept.read_text() and "boom in the step" in kept.read_text()
    kept.unlink()


def test_an_unexpected_error_is_one_line_and_its_traceback_a_file(tmp_path, monkeypatch, capsys):
    """1: any error ends with one line: an unexpected one names the file keeping its traceback (exit 1);
    CMDA_TRACEBACK=1 lets it through; running out of GPU memory says what to change."""
    import typer

    from cli.app import reports_input_errors

    def fails(exc: Exception):
        @reports_input_errors
        def command():
            raise exc
        return command

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(typer.Exit) as stop:
        fails(KeyError("weights"))()
    assert stop.value.exit_code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: unexpected KeyError: 'weights' (traceback in ") and "\n" not in line
    (kept,) = tmp_path.glob("cmda-error-*.txt")
    assert "KeyError: 'weights'" in kept.read_text() and "Traceback" in kept.read_text()

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name
        pass

    with pytest.raises(typer.Exit):
        fails(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))()
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: out of GPU memory: try a memory preset (--preset 24gb") and "2.00 GiB" in line

    for deliberate in (typer.Exit(2), typer.Exit(0)):  # typer.Exit is a RuntimeError: a command's own exit
        with pytest.raises(typer.Exit) as stop:
            fails(deliberate)()
        assert stop.value.exit_code == deliberate.exit_code and not capsys.readouterr().err

    monkeypatch.setenv("CMDA_TRACEBACK", "1")
    with pytest.raises(KeyError):
        fails(KeyError("weights"))()


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


# ---------------------------------------------------------------------- 2: one writer per run folder


def fake_run_folder(path: Path, last: int = 4) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "metrics.jsonl").write_text('{"iter": 1, "loss/total": 1.0}\n')
    (path / "checkpoints" / f"iter_{last:06d}.pt").write_bytes(b"old run")
    return path


def test_an_existing_run_folder_is_refused_without_resume(training_tree, tmp_path):
    """2: `train --out R` over a run used to empty its log and rewrite config.json, keeping its later
    checkpoints for a later --resume to pick up under the new settings."""
    run = fake_run_folder(tmp_path / "run")
    res = cli(*tiny_train_args(training_tree, tmp_path, run))
    assert_one_line_error(res, str(run), "existing run folder", "--resume", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == '{"iter": 1, "loss/total": 1.0}\n'
    assert (run / "config.json").read_text() == "{}"


def test_overwrite_replaces_the_old_run_and_keeps_other_files(training_tree, tmp_path):
    """2: --overwrite asks for the replacement: the old run's files go, anything else in the folder stays."""
    run = fake_run_folder(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    res = cli(*tiny_train_args(training_tree, tmp_path, run, iters=1), "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (run / "checkpoints" / "iter_000004.pt").exists()
    assert [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "loss/total" in x] == [1]
    assert (run / "notes.txt").read_text() == "mine"


def test_a_run_folder_held_by_another_process_is_refused(training_tree, tmp_path):
    """2: two writers on one run folder (two `--resume R` at once both ran and doubled metrics.jsonl)."""
    from pipeline.lock import exclusive

    run = tmp_path / "run"
    with exclusive(run, "test holder"):  # another open file description: flock conflicts in-process too
        res = cli(*tiny_train_args(training_tree, tmp_path, run))
        assert_one_line_error(res, str(run), f"pid {os.getpid()}")
        assert not (run / "config.json").exists()


def test_evaluation_into_a_locked_run_folder_is_refused(tmp_path):
    """2: `cmda evaluate` writing into a run folder takes the same lock as training."""
    from pipeline.lock import exclusive

    run = fake_run_folder(tmp_path / "run")
    with exclusive(run, "test holder"):
        res = cli("evaluate", run / "checkpoints" / "iter_000004.pt", "--device", "cpu")
        assert_one_line_error(res, str(run), "another cmda process", "--out")
    assert not (run / "eval").exists()


# ---------------------------------------------------------------------- 4: compare labels are folder names


@pytest.mark.parametrize("label", ["..", ".", "../x", "a/../../b", ".hidden", "/abs"])
def test_compare_labels_never_leave_out(label, tmp_path):
    """4: `--run '..=--variant baseline'` wrote to the parent of --out, '.' into --out itself."""
    from train.tools.compare import parse_entry

    slug = parse_entry(f"{label}=--variant baseline").slug
    run_dir = (tmp_path / "out" / slug).resolve()
    assert run_dir.parent == (tmp_path / "out").resolve() and not slug.startswith(".") and "/" not in slug


# ---------------------------------------------------------------------- 5: values validation accepted


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "run.seed"),
    (["--mic", "--set", "mic.block=1000000"], "mic.block"),
    (["--set", "loss.mask_block=1000000"], "loss.mask_block"),
])
def test_out_of_range_training_values_are_one_line(args, needle, tmp_path, monkeypatch):
    """5: a negative seed was numpy's traceback (exit 1); mic.block had no upper bound (a 4 TB allocation)."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("train", "--dry-run", "--device", "cpu", *args), needle)


def test_negative_compare_seeds_are_one_line(tmp_path):
    """5: `cmda compare --seeds=-1` only said "training failed" after starting a run."""
    res = cli("compare", "--run", "baseline", "--seeds=-1", "--out", tmp_path / "cmp")
    assert_one_line_error(res, "--seeds")
    assert not (tmp_path / "cmp").exists()


def test_negative_stream_threads_are_one_line(tmp_path):
    """5: `stream --threads -2` was accepted."""
    res = cli("stream", "--seq", "x", "--model", tmp_path / "m.onnx", "--threads", "-2")
    assert_one_line_error(res, "--threads")


# ---------------------------------------------------------------------- 3: a stopped compare stops its runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigterm_to_compare_stops_its_trainer_and_waits_for_it(training_tree, tmp_path):
    """3: SIGTERM to `cmda compare` (the compare process only) left its trainer running under pid 1; a
    re-run then started a second trainer on the same folder."""
    import signal
    import time

    out = tmp_path / "cmp"
    run_dir = out / "base" / "seed0"
    common = f"--settings {tiny_settings(tmp_path, 200)} --datasets {training_tree} --set run.ckpt_every=1000"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "compare", "--run", "base=--variant baseline",
                             "--seeds", "0", "--common", common, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    log = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and '"loss/total"' in log.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    trainer = int((run_dir.parent / ".seed0.lock").read_text())  # the run-folder lock names its holder
    assert trainer != proc.pid and _alive(trainer)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert not _alive(trainer), "the trainer outlived its compare"
    assert list((run_dir / "checkpoints").glob("iter_*.pt")), "the trainer stopped without its checkpoint"
    assert "stopped at iteration" in (run_dir / "compare.log").read_text()
    assert not (run_dir / "result.json").exists()


# ---------------------------------------------------------------------- 9: messages


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_plain_pickle_is_one_line_without_torch_warnings(command, tmp_path):
    """9: a plain pickle printed torch's weights_only UserWarning (two lines) before the error line."""
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert_one_line_error(cli(command, path), str(path))


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_folder_given_as_checkpoint_is_called_a_folder(command, tmp_path):
    """9: a directory passed as a checkpoint was "checkpoint not found"."""
    folder = tmp_path / "adir"
    folder.mkdir()
    assert_one_line_error(cli(command, folder), str(folder), "is a folder")


def test_resizing_a_read_only_image_does_not_warn():
    """9: np.asarray of a PIL image is read-only; torch.from_numpy warned 'array is not writable'."""
    import warnings

    import numpy as np

    from train.data.loaders import resize_pil_bilinear

    a = np.zeros((8, 8, 3), np.uint8)
    a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resize_pil_bilinear(a, (4, 4)).shape == (4, 4, 3)


def test_compare_gives_each_parallel_run_its_share_of_the_cores(monkeypatch):
    """11: K parallel runs each used every core's threads (2K threads on 2 cores)."""
    from train.tools import compare as cmp

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cmp.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cmp.threads_per_run(2) == 4 and cmp.threads_per_run(3) == 2 and cmp.threads_per_run(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cmp.threads_per_run(2) is None  # the user's setting is kept


def test_compare_passes_the_thread_share_to_its_runs(tmp_path, monkeypatch):
    """11: the child `cmda train` gets OMP_NUM_THREADS = cores // K."""
    from train.tools import compare as cmp

    seen = {}

    class FakePopen:
        def __init__(self, args, env, **kw):
            seen.update(env)

        def wait(self):
            return 0

    monkeypatch.setattr(cmp.subprocess, "Popen", FakePopen)
    assert cmp.Children(threads=3).run(["train"], tmp_path / "log") == 0
    assert seen["OMP_NUM_THREADS"] == "3" and seen["MKL_NUM_THREADS"] == "3"


# ---------------------------------------------------------------------- 7: partial files on a full disk


def submission_on_a_full_disk(tmp_path: Path, name: str):
    """A Dark Zurich submission whose first zip close (its central directory) fails with a full disk."""
    import errno

    from pipeline.night_targets import DarkZurichSubmission, TargetImage

    item = TargetImage(tmp_path / f"{name}_rgb_anon.png", name, "GOPR0356")
    sub = DarkZurichSubmission(tmp_path / "darkzurich_test.zip", [item])
    real, calls = sub.zip.close, []

    def full():
        calls.append(1)
        real()
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    sub.zip.close = full
    return sub


def test_a_full_disk_leaves_no_partial_submission_zip(tmp_path):
    """7: `predict --split test --target darkzurich` on a full disk left `.darkzurich_test.zip.partial`:
    closing the zip (its central directory) failed before the partial file was removed."""
    submission_on_a_full_disk(tmp_path, "GOPR0356_frame_000001").abort()
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_closing_the_zip_names_it_and_removes_the_partial(tmp_path):
    sub = submission_on_a_full_disk(tmp_path, "x")
    with pytest.raises(OSError, match="No space left") as exc:
        sub.close()
    assert exc.value.filename == str(tmp_path / "darkzurich_test.zip")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- 8: SIGTERM / SIGINT for stream, predict, export

SIGNAL_AT_FIRST_WRITE = """\
import os, signal
import {module} as M
_real, _sent = M.{name}, []
def _write(*a, **k):
    if not _sent:
        _sent.append(1)
        os.kill(os.getpid(), signal.{sig})
    return _real(*a, **k)
M.{name} = _write
"""


def _deploy_fixtures():
    from tests import test_deploy

    return test_deploy


@pytest.fixture(scope="module")
def deploy_tree(tmp_path_factory) -> Path:
    from tests.raw_tree import raw_tree

    return raw_tree(tmp_path_factory.mktemp("deploy_tree"))


@pytest.fixture(scope="module")
def deploy_ckpt(tmp_path_factory) -> Path:
    return _deploy_fixtures()._checkpoint(tmp_path_factory.mktemp("deploy_run") / "checkpoints" / "iter_7.pt")


@pytest.mark.parametrize("sig, ignore_sigint", [("SIGTERM", False), ("SIGINT", True)])
def test_a_signal_stops_the_stream_after_the_frame(deploy_tree, deploy_ckpt, tmp_path, sig, ignore_sigint):
    """8: SIGTERM killed `stream` (exit 143, a hidden .partial video left); started in the background of
    a non-interactive shell (SIGINT ignored) it ignored Ctrl-C and ran to the end."""
    from tests.raw_tree import SEQ

    patch = SIGNAL_AT_FIRST_WRITE.format(module="train.deploy.stream", name="write_png", sig=sig)
    if ignore_sigint:
        patch = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + patch
    out = tmp_path / "stream"
    res = run_patched(tmp_path, patch, "stream", "--seq", SEQ, "--model", deploy_ckpt, "--config", deploy_tree,
                      "--out", out, "--device", "cpu", "--video", "--limit", "4")
    assert res.returncode == 130, (res.returncode, res.stderr[-2000:])
    assert "interrupted after 1 of 4 frame(s)" in res.stderr
    assert len(list(out.glob("*_pred.png"))) == 1 and not list(out.glob(".*")) and not list(out.glob("*.mp4"))


def test_sigterm_stops_predict_after_the_frame(deploy_tree, deploy_ckpt, tmp_path):
    """8: SIGTERM killed `predict` (exit 143)."""
    patch = SIGNAL_AT_FIRST_WRITE.format(module="train.eval.predict", name="write_png", sig="SIGTERM")
    out = tmp_path / "pred"
    res = run_patched(tmp_path, patch, "predict", deploy_ckpt, "--config", deploy_tree, "--out", out,
                      "--device", "cpu", "--limit", "3")
    assert res.returncode == 130, (res.returncode, res.stderr[-2000:])
    assert sorted(p.name.split("_")[-1] for p in out.iterdir()) == ["panel.png", "pred.png"]  # one whole frame
    assert res.stderr.strip().splitlines()[-1].startswith("stopped by a signal")


def test_sigterm_stops_export_and_leaves_no_partial_file(deploy_tree, deploy_ckpt, tmp_path):
    """8: SIGTERM during `export` left its hidden temporary .onnx."""
    patch = SIGNAL_AT_FIRST_WRITE.format(module="train.deploy.export", name="ort_session", sig="SIGTERM")
    out = tmp_path / "model" / "m.onnx"
    out.parent.mkdir()
    res = run_patched(tmp_path, patch, "export", deploy_ckpt, "--config", deploy_tree, "--out", out)
    assert res.returncode == 130, (res.returncode, res.stderr[-2000:])
    assert not list(out.parent.iterdir())


def test_a_full_disk_during_export_names_the_onnx_file(deploy_tree, deploy_ckpt, tmp_path, monkeypatch):
    """7: export on a full disk named the checkpoint ('the ONNX exporter failed') instead of the file."""
    import train.deploy.export as E

    def full(*a, **k):
        raise RuntimeError("unexpected pos 576 vs 534")

    monkeypatch.setattr(E, "_export_onnx", full)
    monkeypatch.setattr(E, "disk_free", lambda path: 0, raising=False)
    monkeypatch.setattr("train.checkpoints.files.disk_free", lambda path: 0)
    out = tmp_path / "m.onnx"
    res = cli("export", deploy_ckpt, "--config", deploy_tree, "--out", out)
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == f"error: {out}: No space left on device"
    assert not list(tmp_path.glob(".*"))


def test_a_full_disk_in_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    """7: preprocess's store writes (pipeline.atomic) said only 'No space left on device'."""
    import errno

    from pipeline import atomic

    class Full:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", Full)
    target = tmp_path / "store" / "000001.bin"
    with pytest.raises(OSError) as exc:
        atomic.write_bytes(target, b"x")
    assert exc.value.filename == str(target) and exc.value.errno == errno.ENOSPC
    assert not list(target.parent.iterdir())  # no temporary left


# ---------------------------------------------------------------------- 6: dvc repro racing a running preprocess


def test_dvc_never_removes_the_index_of_a_running_preprocess():
    """6: DVC removes a stage's non-persist outputs before running it, even when the command is then
    refused by the lock a running `cmda preprocess` holds: the index that run had written vanished."""
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["preprocess"]["do"]
    for out in stage["outs"]:
        assert isinstance(out, dict) and next(iter(out.values())).get("persist") is True, out


def test_preprocess_restores_its_index_removed_while_it_ran(tmp_path, monkeypatch):
    """6: the writer checks its index at the end and writes it again if it was removed meanwhile."""
    from pipeline import preprocess as pre
    from pipeline.config import load_config
    from tests.raw_tree import SEQ, raw_tree

    cfg = load_config(raw_tree(tmp_path / "tree"))
    index = pre.event_index_path(cfg, SEQ)
    expected = index.read_text()
    real = pre._build_store

    def dvc_removes_outputs(*a, **k):
        index.unlink()  # what `dvc repro preprocess@SEQ` does while this run holds the lock
        return real(*a, **k)

    monkeypatch.setattr(pre, "_build_store", dvc_removes_outputs)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert index.read_text() == expected


@pytest.mark.slow
def test_a_real_dvc_repro_racing_a_running_preprocess_leaves_its_index(tmp_path):
    """6, with DVC itself: `dvc repro preprocess@SEQ` started while `cmda preprocess --seq SEQ` holds the
    store's lock fails on the lock, the running preprocess ends with its index in place, and a later
    `dvc repro` of the stage succeeds with `dvc status` clean."""
    import time

    import yaml

    from tests.raw_tree import SEQ, datasets_yaml, write_raw_sequence

    proj = tmp_path / "proj"
    write_raw_sequence(proj)
    datasets_yaml(proj)
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"vars": pipeline["vars"],
                                                   "stages": {"preprocess": pipeline["stages"]["preprocess"]}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=env, text=True,
                              capture_output=True, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    assert dvc("config", "core.analytics", "false").returncode == 0
    script = tmp_path / "slow_preprocess.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\n"
                      "import pipeline.preprocess as P\nreal = P._build_store\n"
                      "def slow(*a, **k):\n"  # hold the lock until the test has raced DVC against it
                      f"    while not __import__('os').path.exists({str(tmp_path / 'release')!r}):\n"
                      "        time.sleep(0.1)\n    return real(*a, **k)\n"
                      "P._build_store = slow\nfrom cli import app\napp()\n")
    writer = subprocess.Popen([sys.executable, str(script), "preprocess", "--seq", SEQ], cwd=proj, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index = proj / "processed" / SEQ / "images_to_events_index.txt"
    deadline = time.monotonic() + 120
    while not index.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert index.exists() and writer.poll() is None, "the writer should be inside its store build by now"
    try:
        racing = dvc("repro", "--single-item", f"preprocess@{SEQ}")
    finally:
        (tmp_path / "release").touch()
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert racing.returncode != 0, racing.stdout + racing.stderr
    assert index.exists() and index.read_text().strip()
    again = dvc("repro", "--single-item", f"preprocess@{SEQ}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert index.exists()
    status = dvc("status")
    assert "up to date" in status.stdout, status.stdout + status.stderr


# ---------------------------------------------------------------------- 12: every departure from CMDA switchable

# CMDA's rule, as its code writes it (XiaRho/CMDA 9d25129): a table indexed by two parities.
CMDA_DIRECTION_TABLE = [["leftdown", "leftup"], ["rightdown", "rightup"]]


def cmda_events_norm(grid, finish_minus_start):
    """CMDA's events_norm literally (float64): both parts min-maxed even when empty (-1 everywhere)."""
    return reference_norm(grid, finish_minus_start, cmda_empty_part=True)


def test_cmda_exact_combines_with_another_preset_and_dry_run_shows_it(tmp_path, monkeypatch):
    """12: one setting turns every switchable departure to CMDA's; it combines with cpu-sample."""
    monkeypatch.chdir(tmp_path)
    res = cli("train", "--preset", "cpu-sample,cmda-exact", "--dry-run", "--device", "cpu")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["data"]["cmda_empty_part"] is True and cfg["data"]["event_count"] == "cmda"
    assert cfg["data"]["isr_direction"] == "cmda" and cfg["run"]["amp"] is False and cfg["run"]["tf32"] is False
    assert cfg["model"]["backbone"] == "mit_b0" and cfg["run"]["iters"] == 300  # cpu-sample kept
    plain = json.loads(cli("train", "--dry-run", "--device", "cpu").stdout)["data"]
    assert (plain["cmda_empty_part"], plain["event_count"], plain["isr_direction"]) == (False, "inclusive", "random")
    assert_one_line_error(cli("train", "--preset", "cpu-sample,nope", "--dry-run"), "nope")


def test_cmda_exact_loader_normalises_events_as_cmda(training_tree, monkeypatch):
    """12: with the switches, the loader's events equal CMDA's events_norm with N = finish - start, a
    one-signed window included (CMDA's -1 over its empty negative part)."""
    import numpy as np

    from pipeline.config import load_config
    from train.config import TrainConfig, apply_preset
    from train.data.events_input import FrameReader
    from train.data.loaders import NightFrames

    data = apply_preset(TrainConfig(), "cmda-exact").data
    frames = NightFrames(load_config(training_tree), "train", data)
    row = frames.rows[0]
    rng = np.random.default_rng(3)
    for grid in (np.where(rng.random((1, 48, 64)) < 0.3, rng.random((1, 48, 64)), 0).astype(np.float32),
                 rng.normal(0, 1, (1, 48, 64)).astype(np.float32)):
        monkeypatch.setattr(frames, "store", lambda path, g=grid: FrameReader(frames.events.settings, lambda f: g))
        monkeypatch.setattr("train.data.loaders.read_rgb", lambda path: np.zeros((48, 64, 3), np.uint8))
        _, events, _ = frames.load(0)
        ref = cmda_events_norm(grid, row.event_stop - row.event_start)
        np.testing.assert_allclose(events, ref, atol=2e-5)
    default = NightFrames(load_config(training_tree), "train")
    ones = np.ones((1, 48, 64), np.float32)
    monkeypatch.setattr(default, "store", lambda path: FrameReader(default.events.settings, lambda f: ones))
    assert (default.load(0)[1] >= 0).all()  # cmda's default: the empty negative part stays 0


def test_cmda_isr_directions_follow_cmdas_parity_rules(training_tree):
    """12: data.isr_direction=cmda: the target's direction comes from its crop offset, the source's from
    (crop x, flip), by CMDA's table."""
    import numpy as np

    from pipeline.config import load_config
    from train.config import TrainConfig, apply_preset
    from train.data.batches import PairedBatches
    from train.data.isr import DIRECTIONS
    from train.data.loaders import NightFrames

    cfg = apply_preset(TrainConfig(), "cmda-exact")
    cfg.data.crop, cfg.data.source_resize, cfg.rcs.min_pixels = 64, (128, 64), 50
    ds = load_config(training_tree)
    batches = PairedBatches(ds, cfg.data, cfg.rcs, batch=4, seed=5)
    n = len(NightFrames(ds, "train"))
    for it in (0, 7):
        out = batches[it]
        for b in range(4):
            rng = np.random.default_rng([5, it, b, 1])
            rng.integers(n)
            x = int(rng.integers(cfg.data.target_crop_x[0], cfg.data.target_crop_x[1] + 1))
            y = int(rng.integers(cfg.data.target_crop_y[0], cfg.data.target_crop_y[1] + 1))
            assert DIRECTIONS[int(out["target_isr_dir"][b])] == CMDA_DIRECTION_TABLE[x % 2][y % 2]
        assert out["source_isr_dir"].shape == (4,)
    assert "source_isr_dir" not in PairedBatches(ds, TrainConfig().data, cfg.rcs, batch=1, seed=5)[0]


def test_cmda_mixed_isr_direction_comes_from_the_jitter_draw(monkeypatch):
    """12: CMDA's mixed image: one direction for the batch from the colour-jitter draw cj,
    table[int(cj * 10) % 2][int(cj * 100) % 2]; jitter applied when cj > 0.2 (here u < 0.8, cj = 1 - u)."""
    import torch

    from train.uda import targets

    seen = []
    monkeypatch.setattr(targets, "isr_from_normalized", lambda image, params, direction, **k: (
        seen.append((direction, k.get("cmda_compat"))) or torch.zeros(image.shape)))
    target = targets.EventTarget(None, torch.device("cpu"), torch.contiguous_format, True, True)
    for u in (0.55, 0.13, 0.9):
        cj = 1 - u
        target.finish_mix({"image": torch.zeros(2, 3, 8, 8), "events": torch.zeros(2, 3, 8, 8), "jitter_draw": u})
        assert seen[-1] == (CMDA_DIRECTION_TABLE[int(cj * 10) % 2][int(cj * 100) % 2], True)


def test_the_run_folder_lock_works_from_inside_the_folder(tmp_path, monkeypatch):
    """2: `cd RUN && cmda evaluate checkpoints/iter_N.pt` locks RUN (a relative '.' has no name to lock by)."""
    from pipeline.lock import exclusive

    run = fake_run_folder(tmp_path / "run")
    monkeypatch.chdir(run)
    with exclusive(run, "test holder"):
        res = cli("evaluate", Path("checkpoints") / "iter_000004.pt", "--device", "cpu")
        assert_one_line_error(res, "another cmda process")
    with exclusive(".", "test holder"), pytest.raises(Exception, match="another"), exclusive(run, "second"):
        pass


@pytest.mark.parametrize("command", [["evaluate", "{f}"], ["export", "{f}"], ["predict", "{f}"],
                                     ["convert", "{f}", "o.pt"],
                                     ["train", "--resume", "{f}"]])
def test_an_unreadable_checkpoint_is_one_line(command, tmp_path, monkeypatch):
    """9: click's own readability check printed its three-line 'Error: Invalid value ... is not readable'
    before cmda saw the file (os.access is patched: the tests may run as root, who reads everything)."""
    import click

    path = tmp_path / "unreadable.pt"
    path.write_bytes(b"xx" * 10)
    real = os.access
    monkeypatch.setattr(click.types.os, "access", lambda p, mode, *a, **k: False if str(p) == str(path)
                        else real(p, mode, *a, **k))
    monkeypatch.chdir(tmp_path)
    res = cli(*[c.format(f=path) for c in command])
    assert_one_line_error(res, str(path))
