"""``cmda compare``: several training configurations over several seeds, evaluated and tabulated.

Seed variance decides many DAFormer/MIC reproduction threads, so a comparison here is multi-seed by
construction. Each (configuration, seed) is an ordinary ``cmda train`` run in its own folder
(``<out>/<label>/seed<k>``) followed by ``cmda evaluate`` of its last checkpoint; the run's own
``result.json`` (written last, atomically) marks it finished, so an interrupted comparison resumes:
finished runs are not redone, interrupted ones continue with ``--resume``. Runs go one after the
other or ``--parallel K`` at a time (each a separate process).

The summary (``compare.json``, ``compare.md``, ``compare.png``) gives per configuration the night
mIoU (fusion output) as mean +- sample standard deviation (n - 1) over seeds, and the same per class.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text
from pipeline.errors import STOPPED_EXIT, InputError
from pipeline.lock import exclusive
from train.checkpoints.files import find_checkpoint
from train.engine.run_folder import is_run_folder

REPO = Path(__file__).resolve().parents[2]  # the repository root, where the cli package lives


@dataclass(frozen=True)
class Entry:
    """One configuration: a label and the ``cmda train`` arguments that make it."""

    label: str
    args: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The label as one safe folder name: no separator, never ``.``/``..`` or a hidden name, so a run
        always lands inside ``--out``."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_.") or "run"


def parse_entry(spec: str) -> Entry:
    """``LABEL=ARGS`` (e.g. ``"baseline + mic=--variant baseline --mic"``) or a bare variant name."""
    if "=" in spec and not spec.startswith("-"):
        label, args = spec.split("=", 1)
        if not label.strip():
            raise InputError(None, f"--run {spec!r}: the label before '=' is empty")
        return Entry(label.strip(), tuple(shlex.split(args)))
    if not spec.strip():
        raise InputError(None, "--run needs a variant name or LABEL=ARGS")
    return Entry(spec.strip(), ("--variant", spec.strip()))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(None, f"--seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(None, f"--seeds must list distinct seeds, got {text!r}")
    if any(not 0 <= s < 2**31 for s in seeds):
        raise InputError(None, f"--seeds must be >= 0 and < 2**31, got {text!r}")
    return seeds


class CompareStopped(Exception):
    """A signal stopped the comparison; its runs were stopped and waited for (their checkpoints resume)."""


class Children:
    """The ``cmda`` processes a comparison starts, so that a stopped comparison stops them too.

    Each child runs in its own session: a Ctrl-C at the terminal reaches only the comparison, which
    passes exactly one SIGTERM per signal on to every running child (the trainer's own stop: the
    first finishes the iteration and checkpoints, a second aborts) and then waits for them, instead
    of leaving them running re-parented to pid 1 beside a re-run that would start a second writer.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads  # OMP threads per child; None: the environment's
        self.procs: set[subprocess.Popen] = set()
        self.guard = threading.Lock()
        self.stopping = False

    def run(self, args: list[str], log: Path) -> int:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with log.open("a") as f, self.guard:
            if self.stopping:
                return STOPPED_EXIT
            proc = subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.guard:
                self.procs.discard(proc)

    def stop(self, signum: int, _frame: Any = None) -> None:
        """Signal handler: stop every running child (SIGTERM) and start no new one."""
        with self.guard:
            self.stopping = True
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
                old[sig] = signal.signal(sig, self.stop)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def threads_per_run(parallel: int) -> int | None:
    """``cores // parallel`` (at least 1) OMP threads per run, so K runs share the cores instead of each
    starting one thread per core; None when the user set OMP_NUM_THREADS (theirs is kept)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


def run_one(entry: Entry, seed: int, common: tuple[str, ...], out: Path,
            children: Children | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate one (configuration, seed); returns its result record."""
    run_dir = out / entry.slug / f"seed{seed}"
    done = run_dir / "result.json"
    if done.exists():
        try:
            record = json.loads(done.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # written atomically: a broken one is not ours
            raise InputError(done, f"not a run record ({exc}); delete it to train and evaluate this run "
                             "again") from None
        if not isinstance(record, dict) or "mIoU" not in record:
            raise InputError(done, "not a run record (no 'mIoU'); delete it to train and evaluate this run again")
        return record
    children = children or Children()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "compare.log"
    train = ["train", *common, *entry.args, "--seed", str(seed), "--out", str(run_dir)]
    if list(run_dir.glob("checkpoints/iter_*.pt")):
        train += ["--resume", str(run_dir)]
    elif is_run_folder(run_dir):  # our own run, stopped before its first checkpoint: nothing to resume
        train += ["--overwrite"]
    rc = children.run(train, log)
    if rc == STOPPED_EXIT:  # a signal: its checkpoint is half-trained, the next compare resumes it
        raise InputError(log, f"training {entry.label!r} seed {seed} stopped before its last iteration; "
                         "run the same `cmda compare` again to continue it")
    if rc != 0:
        raise InputError(log, f"training {entry.label!r} seed {seed} failed (see this log)")
    ckpt = find_checkpoint(run_dir)  # the highest iteration (names stop sorting by number past 999999)
    if children.run(["evaluate", str(ckpt), "--out", str(run_dir / "eval_final")], log) != 0:
        raise InputError(log, f"evaluating {entry.label!r} seed {seed} failed (see this log)")
    metrics = json.loads((run_dir / "eval_final" / "metrics.json").read_text())
    fusion = metrics["outputs"]["fusion"]
    record = {"label": entry.label, "seed": seed, "checkpoint": str(ckpt), "iteration": metrics["iteration"],
              "mIoU": fusion["mIoU"], "iou": {c: fusion["iou"][c] for c in fusion["classes"]}}
    write_text(done, json.dumps(record, indent=2))
    return record


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1); the std of one seed is None (unknown: null in compare.json), never a
    reassuring 0."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def _pm(mean: float, std: float | None, digits: int) -> str:
    """``mean +- std`` in %, or ``mean (one seed)`` when the std is unknown."""
    if std is None:
        return f"{100 * mean:.{digits}f} (one seed)"
    return f"{100 * mean:.{digits}f} +- {100 * std:.{digits}f}"


def summarize(records: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per configuration: mIoU mean/std over seeds and per class (classes annotated in every run)."""
    rows = {}
    for label in labels:
        recs = [r for r in records if r["label"] == label]
        classes = [c for c in recs[0]["iou"] if all(r["iou"].get(c) is not None for r in recs)]
        mean, std = _mean_std([r["mIoU"] for r in recs])
        rows[label] = {"seeds": [r["seed"] for r in recs], "mIoU": [r["mIoU"] for r in recs],
                       "mIoU_mean": mean, "mIoU_std": std,
                       "per_class": {c: dict(zip(("mean", "std"), _mean_std([r["iou"][c] for r in recs]),
                                                 strict=True)) for c in classes}}
    return rows


def markdown(rows: dict[str, Any]) -> str:
    lines = ["| configuration | seeds | night mIoU (fusion), mean +- std | per seed |", "|---|---|---|---|"]
    for label, r in rows.items():
        per = ", ".join(f"{100 * v:.2f}" for v in r["mIoU"])
        lines.append(f"| {label} | {len(r['seeds'])} | {_pm(r['mIoU_mean'], r['mIoU_std'], 2)} | {per} |")
    classes = list(dict.fromkeys(c for r in rows.values() for c in r["per_class"]))
    lines += ["", "| class | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for c in classes:
        cells = [_pm(r["per_class"][c]["mean"], r["per_class"][c]["std"], 1) if c in r["per_class"] else "n/a"
                 for r in rows.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bars_png(rows: dict[str, Any], path: Path, title: str) -> None:
    """One bar per configuration (mean) with its seeds as dots and +-1 std as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 4))
    for i, (_label, r) in enumerate(rows.items()):
        err = None if r["mIoU_std"] is None else 100 * r["mIoU_std"]
        ax.bar(i, 100 * r["mIoU_mean"], yerr=err, color="#7a9cc6", capsize=6)
        ax.scatter([i] * len(r["mIoU"]), [100 * v for v in r["mIoU"]], color="black", s=14, zorder=3)
    ax.set_xticks(range(len(rows)), list(rows), rotation=20, ha="right")
    ax.set_ylabel("night mIoU (%), fusion output")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _run_all(entries: list[Entry], seeds: list[int], common: tuple[str, ...], out: Path, parallel: int,
             children: Children, progress) -> list[dict[str, Any]]:
    """Every (configuration, seed), ``parallel`` at a time; CompareStopped after a signal (once every
    child has stopped: leaving the pool waits for them)."""
    jobs = [(e, s) for e in entries for s in seeds]
    records = []
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(run_one, e, s, common, out, children) for e, s in jobs]
        try:
            for (e, s), fut in zip(jobs, futures, strict=True):
                rec = fut.result()
                progress(f"{e.label} seed {s}: night mIoU {100 * rec['mIoU']:.2f}")
                records.append(rec)
        except InputError:
            if not children.stopping:
                raise
        if children.stopping:
            for fut in futures:
                fut.cancel()
    if children.stopping:  # the pool has waited for every running child's stop checkpoint
        raise CompareStopped(f"stopped by a signal; every run was stopped at a checkpoint: run the same "
                             f"`cmda compare` again to continue ({out})")
    return records


def compare(entries: list[Entry], seeds: list[int], out: Path, common: tuple[str, ...] = (),
            parallel: int = 1, progress=print) -> dict[str, Any]:
    if not entries:
        raise InputError(None, "name at least one configuration with --run")
    if len({e.slug for e in entries}) != len(entries):
        raise InputError(None, "two configurations have the same label; give each its own LABEL=")
    if parallel < 1:
        raise InputError(None, f"--parallel must be >= 1, got {parallel}")
    out.mkdir(parents=True, exist_ok=True)
    children = Children(threads_per_run(parallel))
    if children.threads is not None:
        progress(f"{parallel} run(s) at a time, {children.threads} thread(s) each (OMP_NUM_THREADS; set it "
                 "to choose)")
    with exclusive(out, "cmda compare", "wait for it to finish, or stop it and run the same command again "
                   "(finished runs are kept, stopped ones resume)"), children.handling_signals():
        records = _run_all(entries, seeds, tuple(common), out, parallel, children, progress)
    rows = summarize(records, [e.label for e in entries])
    write_text(out / "compare.json", json.dumps({"seeds": seeds, "common": list(common), "configurations": {
        e.label: list(e.args) for e in entries}, "results": rows, "runs": records}, indent=2))
    table = markdown(rows)
    write_text(out / "compare.md", table)
    bars_png(rows, out / "compare.png", f"{len(entries)} configurations x {len(seeds)} seeds")
    return {"rows": rows, "table": table, "out": out}
