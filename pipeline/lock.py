"""One writer per output: an advisory lock file beside an artefact, held while it is written.

Two ``cmda preprocess`` runs on the same sequence would otherwise interleave chunk writes and
progress markers (and the second would delete the first's store when it rebuilds). The lock is
``fcntl.flock`` on ``.<name>.lock`` next to the artefact: the kernel releases it when its holder
dies, even by kill -9, so a stale lock file never blocks the next run. Holding the lock also
means that any temporary file left inside the artefact belongs to a dead writer (see
:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (said in docs/data.md)
    fcntl = None  # type: ignore[assignment]


def lock_path(artefact: Path) -> Path:
    return artefact.with_name(f".{artefact.name}.lock")


@contextlib.contextmanager
def exclusive(artefact: str | Path, what: str,
              hint: str = "wait for it to finish, or stop it and rerun (the run resumes)") -> Iterator[None]:
    """Hold the lock of ``artefact`` (a file or folder) or raise InputError naming the holder's pid
    (``hint`` says what to do instead)."""
    artefact = Path(artefact)
    path = lock_path(Path(os.path.abspath(artefact)))  # "." or "run/.." name their folder too
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise InputError(artefact, f"another {what} (pid {holder}) is writing this; {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_stale_temp_files(folder: str | Path, recursive: bool = False) -> int:
    """Delete the ``.*.tmp`` files of :mod:`pipeline.atomic` in ``folder`` (and below, if ``recursive``).

    Only call this while holding the folder's artefact lock: then no live writer can own them, and
    they are what a killed run left behind. Returns how many were removed.
    """
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                removed += remove_stale_temp_files(entry.path, recursive=True)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
