"""One error type for bad input, so the CLI can report it in one line and exit with code 2.

Every check that rejects a user's file raises :class:`InputError` with the offending path and a
sentence that says what is wrong; the CLI prints ``error: <path>: <problem>`` and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Exit status of a command stopped by a signal before it finished (its state is resumable, its result is
#: not complete), as shells report an interrupted command. `cmda train` exits with it; `cmda compare`
#: relies on it to never tabulate a half-trained run.
STOPPED_EXIT = 130


class InputError(Exception):
    """A file or setting the user supplied is missing or malformed."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):  # picklable, so it survives the trip back from a dask.distributed worker
        return (InputError, (self.path, self.problem))


def warn(path: str | Path | None, message: str) -> None:
    """Print a one-line warning naming the file, without breaking progress bars."""
    from tqdm import tqdm

    where = f"{path}: " if path is not None else ""
    tqdm.write(f"warning: {where}{message}", file=sys.stderr)
