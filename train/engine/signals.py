"""Signals during training: the first Ctrl-C / SIGTERM stops after the iteration with a checkpoint, a
second aborts and checkpoints only a consistent state; loader workers leave both to the main process."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


class StopFlag:
    """Signals and the run's consistency, in one place.

    The first Ctrl-C / SIGTERM asks the loop to stop after the current iteration (checkpoint, exit).
    A second one aborts at once (KeyboardInterrupt). The loop marks where its state is one
    consistent whole (student, optimiser, EMA teacher and iteration count all "after iteration N"):
    :meth:`changing` before the EMA update, :meth:`consistent` after the optimiser step. An abort
    may checkpoint only a consistent state, so a signal landing inside the optimiser step can never
    save an optimiser one step ahead of its iteration number.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.at: int | None = None  # iteration the state is consistent after; None while changing
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def changing(self) -> None:
        self.at = None

    def consistent(self, iteration: int) -> None:
        self.at = iteration

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"received {signal.Signals(signum).name}: stopping after this iteration (again to abort)")

    def ignore(self) -> None:
        """No more signals (while the last checkpoint is written after an abort)."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM while loader workers start: a forked worker inherits the mask, so a
    signal sent to the whole process group (timeout, Slurm, systemd) cannot kill it before
    :func:`worker_init` ignores the signals; the main process gets the pending signal on unblock."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which checkpoints and then shuts
    them down; a worker killed by a process-group signal would end the run with a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
