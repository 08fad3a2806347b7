"""SIGINT and SIGTERM for the commands that work frame by frame (stream, predict) or in one piece (export).

The trainer's rule (:class:`train.engine.signals.StopFlag`), for the other long commands: the first
Ctrl-C or SIGTERM finishes the frame in hand and stops at the next :meth:`FrameStop.check` (the frames
done are kept, partial files are removed by the usual error paths, the command exits 130); a second
one stops at once. The handlers are installed whatever the shell did with SIGINT: a background job of
a non-interactive shell starts with SIGINT ignored, and Python then leaves it ignored.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any

from tqdm import tqdm


class FrameStop:
    """Install SIGINT/SIGTERM handlers for a frame loop; ``immediate`` stops at the first signal (a job
    without frames, e.g. an export, whose partial file is removed as the KeyboardInterrupt unwinds)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> FrameStop:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested or self.immediate:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"received {signal.Signals(signum).name}: stopping after this frame (again to stop now)",
                   file=sys.stderr)

    def check(self) -> None:
        """Between frames: stop here (KeyboardInterrupt) if a signal asked to."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
