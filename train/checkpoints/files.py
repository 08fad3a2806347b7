"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the student, the EMA teacher, the optimiser, the iteration it was taken after,
the RNG states and the resolved config. Batches and augmentations are drawn from (seed, iteration)
so restoring these is enough for ``--resume`` to reproduce the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError

FORMAT = "cmda-checkpoint-1"


def save_checkpoint(path: Path, *, iteration: int, student: torch.nn.Module, teacher: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    state = {
        "format": FORMAT,
        "iteration": iteration,
        "backbone": config["model"]["backbone"],
        "variant": config["run"]["variant"],
        "source_only": config["run"]["source_only"],
        "student": student.state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        "config": config,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as exc:
            raise write_failure(path, exc) from exc
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def disk_free(path: Path) -> int:
    """Bytes free on the disk of ``path`` (0 if that cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def write_failure(path: Path, exc: BaseException) -> OSError:
    """An OSError naming ``path`` for a failed torch.save: on a full disk torch's writer raises a
    RuntimeError ('unexpected pos ...') or an OSError without a file name, neither of which says which
    file or why."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    if disk_free(path.parent) < 64 * 2**20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"could not be written ({str(exc).splitlines()[0] if str(exc) else exc!r})",
                   str(path))


def temp_name(path: Path) -> Path:
    """Where a checkpoint is written before its rename: the writer's pid in the name, so a later run
    can tell a dead writer's leftover (kill -9 mid-write) from a file being written right now."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


_TEMP = re.compile(r"\.(?P<name>.+\.pt)\.(?P<tag>[^.]+)\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Delete checkpoint temp files whose writer is gone; returns what was deleted.

    A pid-named temp file (``.iter_N.pt.<pid>.tmp``) goes when no process has that pid; a
    ``mkstemp`` name from an older cmda (random tag, no pid) always goes: only one trainer writes
    a run folder, and it has not started writing yet.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.fullmatch(p.name)
        if m is None:
            continue
        tag = m.group("tag")
        if tag.isdigit() and _alive(int(tag)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


_ITER = re.compile(r"iter_(?P<it>\d+)\.pt")


def iteration_checkpoints(folder: Path) -> list[Path]:
    """``folder``'s ``iter_N.pt`` files, oldest first by N (names stop sorting by number past 999999)."""
    found = [(int(m.group("it")), p) for p in Path(folder).glob("iter_*.pt") if (m := _ITER.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` iteration checkpoints (0 = keep all); returns what went.

    Called only after a new checkpoint has been renamed into place, so the newest resumable state is
    always on disk. ``best.pt`` and temp files are not iteration checkpoints and are never touched.
    """
    if keep <= 0:
        return []
    old = iteration_checkpoints(folder)[:-keep]
    for p in old:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return old


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or a run folder's latest ``checkpoints/iter_*.pt``."""
    path = Path(path)
    if path.is_dir():
        found = iteration_checkpoints(path / "checkpoints") or iteration_checkpoints(path)
        if not found:
            raise InputError(path, "no checkpoints/iter_*.pt to resume from")
        return found[-1]
    if not path.exists():
        raise InputError(path, "checkpoint or run folder not found")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file (give its checkpoints/iter_*.pt)")
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(path, "not a cmda checkpoint (no 'format' marker)")
    return state


def check_compatible(path: Path, state: dict[str, Any], backbone: str, variant: str, source_only: bool) -> None:
    """Refuse to resume from a checkpoint of another backbone or variant (a silent mix is worse)."""
    if state["backbone"] != backbone:
        raise InputError(path, f"checkpoint is for backbone {state['backbone']}, this run uses {backbone}")
    if state["variant"] != variant or state["source_only"] != source_only:
        was = "source-only" if state["source_only"] else state["variant"]
        now = "source-only" if source_only else variant
        raise InputError(path, f"checkpoint is from variant {was}, this run is {now}")


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load that reports mismatched keys as an InputError naming the checkpoint."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shape)):
            if keys:
                parts.append(f"{len(keys)} {what} key(s): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise InputError(path, "checkpoint does not match the model: " + "; ".join(parts))
    module.load_state_dict(state)


def restore_rng(state: dict[str, Any]) -> None:
    rng = state.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("numpy") is not None:
        np.random.set_state(rng["numpy"])
    if rng.get("python") is not None:
        random.setstate(rng["python"])
