"""A run's folder: config.json, metrics.jsonl, TensorBoard, checkpoints and the loss curve (rank 0 writes)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text
from pipeline.errors import InputError
from pipeline.lock import exclusive
from train.checkpoints.files import clean_stale_temps, iteration_checkpoints, prune_checkpoints, save_checkpoint
from train.config import TrainConfig, to_dict
from train.engine.context import Context
from train.eval.visualize import loss_curve_png, read_metrics_jsonl
from train.uda.method import Method
from train.uda.step import Networks


def default_out(cfg: TrainConfig) -> Path:
    name = "source_only" if cfg.run.source_only else cfg.run.variant.replace("+", "_")
    return Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{name}"


#: What a run writes into its folder: what ``--overwrite`` removes (nothing else in the folder is touched).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "tensorboard", "loss_curve.png", "eval", "predictions")


def is_run_folder(path: Path) -> bool:
    """A folder a training run has written into (its config, log or checkpoints)."""
    return any((path / name).exists() for name in RUN_FILES[:3])


@contextlib.contextmanager
def run_lock(out: Path, main: bool = True) -> Iterator[None]:
    """The run folder's one-writer lock (``flock`` beside it, as ``cmda preprocess`` locks its store;
    the kernel releases it when the holder dies, even by kill -9). Held by training, resume, and an
    evaluation writing into the folder; rank 0 only under torchrun (the other ranks do not write)."""
    if not main:
        yield
        return
    with exclusive(out, "cmda process", "wait for it to finish or stop it (a stopped run resumes with "
                   f"--resume {out}), or write elsewhere with --out"):
        yield


def claim(out: Path, resumed_from: Path | None, overwrite: bool, say) -> None:
    """Refuse to start a new run over an existing run's folder unless ``overwrite`` (then its run files go).

    Writing a new run into an old one would empty its log and rewrite config.json while its later
    checkpoints and best.pt stayed, and a later ``--resume`` would continue the old run's weights
    under the new settings. Call with the folder's lock held.
    """
    if resumed_from is not None and Path(resumed_from).absolute().parent.parent == Path(out).absolute():
        return  # continuing this very run
    if not is_run_folder(out):
        return
    if not overwrite:
        ckpts = iteration_checkpoints(out / "checkpoints")
        last = f"last checkpoint {ckpts[-1].name}" if ckpts else "no checkpoint yet"
        raise InputError(out, f"is an existing run folder ({last}); continue it with --resume {out}, write "
                         "elsewhere with --out, or replace it with --overwrite")
    for name in RUN_FILES:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    say(f"--overwrite: removed the previous run's files from {out}")


def best_eval(log_path: Path) -> tuple[float, int] | None:
    """(night mIoU, iteration) of the best evaluation logged so far (a resumed run's log has already
    been cut back to its checkpoint), or None."""
    if not log_path.exists():
        return None
    evals = [(r["eval/mIoU"], r["iter"]) for r in map(json.loads, filter(None, log_path.read_text().splitlines()))
             if "eval/mIoU" in r]
    return max(evals, key=lambda e: e[0]) if evals else None


def truncate_log(path: Path, start: int) -> None:
    """Keep metrics.jsonl's records up to iteration ``start`` (the checkpoint resumed from).

    A torn LAST line (a kill or a full disk while appending) is dropped; a broken line elsewhere is
    an InputError naming it, since it is not what the trainer writes.
    """
    if not path.exists():
        return
    records = read_metrics_jsonl(path)
    for rec in records:
        if not isinstance(rec["iter"], int):
            raise InputError(path, f"a record has a non-integer 'iter': {rec['iter']!r}")
    keep = [json.dumps(rec) for rec in records if rec["iter"] <= start]
    write_text(path, "".join(k + "\n" for k in keep))


class RunFolder:
    """The run's files (rank 0 writes): config.json, metrics.jsonl, TensorBoard, checkpoints."""

    def __init__(self, out: Path, ctx: Context) -> None:
        self.out, self.main = out, ctx.main
        self.ckpt_dir = out / "checkpoints"
        self.log_path = out / "metrics.jsonl"
        self.writer = None
        self.extra: dict[str, Any] = {}  # recorded in every checkpoint (the run's event representation)

    def open(self, cfg: TrainConfig, start: int, saved: dict[str, Any] | None, changes: dict[str, list[Any]],
             say) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for p in clean_stale_temps(self.ckpt_dir):
            say(f"removed {p.name}: left by a checkpoint write that never finished")
        config = to_dict(cfg)
        old = self.out / "config.json"
        history = []
        if old.exists():
            with contextlib.suppress(ValueError, AttributeError):
                history = list(json.loads(old.read_text()).get("history", []))
        if changes and saved is not None:  # --resume-override: config.json keeps what the run had before
            history.append({"iter": start, "config": {k: v for k, v in saved.items() if k != "history"},
                            "changes": changes})
        if history:
            config["history"] = history
        write_text(old, json.dumps(config, indent=2))
        truncate_log(self.log_path, start)
        if changes:
            self.log({"iter": start, "resume_override": changes})
        with contextlib.suppress(ImportError):  # optional heavy dependency (tensorboard): imported only for a run
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start or None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        try:
            self._append(record)
        except OSError as exc:  # a write error carries no file name: say which file
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.log_path)) from exc
        if self.writer is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, int | float):
                    self.writer.add_scalar(k, v, record["iter"])

    def _append(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, it: int, nets: Networks, method: Method, cfg: TrainConfig) -> Path | None:
        if not self.main:
            return None
        states = ((p.state_key, p.state_dict()) for p in method.stateful())
        path = save_checkpoint(self.ckpt_dir / f"iter_{it:06d}.pt", iteration=it, student=nets.student,
                               teacher=nets.teacher, optimizer=nets.optimizer, config=to_dict(cfg),
                               extra={**{key: state for key, state in states if state is not None},
                                      **self.extra})
        prune_checkpoints(self.ckpt_dir, cfg.run.keep_ckpts)
        return path

    def save_best(self, it: int, nets: Networks, cfg: TrainConfig, miou: float) -> None:
        """checkpoints/best.pt: the weights of the best night evaluation so far (no optimiser: not for resuming)."""
        if self.main:
            save_checkpoint(self.ckpt_dir / "best.pt", iteration=it, student=nets.student, teacher=nets.teacher,
                            optimizer=None, config=to_dict(cfg),
                            extra={"best": {"eval/mIoU": miou, "iter": it}, **self.extra})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.main and self.log_path.exists():
            loss_curve_png(self.log_path, self.out / "loss_curve.png")
