"""The ``cmda`` application object and what every command shares: options and the one-line error report.

Each command module (:mod:`cli.data`, :mod:`cli.train`, :mod:`cli.evaluate`, :mod:`cli.deploy`,
:mod:`cli.tools`) is a thin layer: it parses options, calls one function of ``pipeline`` or ``train`` and
prints. Bad input raises ``pipeline.errors.InputError``; :func:`reports_input_errors` turns it into one
line on stderr and exit code 2, never a traceback. Anything unexpected is one line too (exit 1), with the
traceback kept in a file that the line names (``CMDA_TRACEBACK=1`` prints it instead).
"""

from __future__ import annotations

import functools
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer

from pipeline.errors import STOPPED_EXIT, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="cmda: nighttime semantic segmentation with images and events (DSEC night, Cityscapes day).\n\n"
    "Typical use: `cmda sample` (synthetic data), `dvc repro` (every dataset artefact), "
    "`cmda train --variant baseline`.",
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path, typer.Option("--config", readable=False,
                                         help="datasets.yaml to read (paths in it are relative to it).")]
SeqOpt = Annotated[list[str] | None, typer.Option("--seq", help="Sequence name, e.g. zurich_city_09a (repeatable).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every sequence listed in datasets.yaml.")]
SchedulerOpt = Annotated[
    str | None, typer.Option(help="dask.distributed scheduler address, e.g. tcp://host:8786 (default: local threads).")
]
WorkersOpt = Annotated[int, typer.Option(min=0, help="Local threads (0 = one per core).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda:<LOCAL_RANK> if CUDA is available, else cpu), cpu, cuda "
                                        "or cuda:N.")]
RunDatasetsOpt = Annotated[Path | None, typer.Option("--config", readable=False,
                                                     help="datasets.yaml (default: the one the "
                                                     "checkpoint's run trained with).")]



@app.callback()
def _root() -> None:
    """cmda: nighttime semantic segmentation with images and events."""


def reports_input_errors(fn: F) -> F:
    """Turn InputError into 'error: <file>: <problem>' and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a full disk, a read-only or vanished folder: the system's words, one line
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM (train.common.stopping): partial files already removed
            typer.echo("stopped by a signal before the end: what was finished is kept, nothing partial", err=True)
            raise typer.Exit(STOPPED_EXIT) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # how a command ends on purpose (typer.Exit is a RuntimeError) or click reports bad usage
        except Exception as exc:  # a bug or a resource limit: one line, the traceback in a file
            if os.environ.get("CMDA_TRACEBACK") == "1":
                raise
            typer.echo(f"error: {unexpected_error_line(exc)}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


OUT_OF_MEMORY_HINT = ("out of GPU memory: try a memory preset (--preset 24gb, 16gb or 11gb), --accum 2, "
                      "or a smaller --crop or --batch")


def unexpected_error_line(exc: BaseException) -> str:
    """One line for an exception cmda did not expect, naming a file that keeps its traceback.

    A research tool's user needs the traceback to report a bug, but not 60 lines of it on every screen (and
    not between the progress bars of a run): it goes to ``<tmp>/cmda-error-<pid>.txt``. Running out of GPU
    memory is not a bug: its line says what to change.
    """
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():
        message = f"{OUT_OF_MEMORY_HINT} ({message})"
    else:
        message = f"unexpected {type(exc).__name__}: {message}"
    try:
        fd, path = tempfile.mkstemp(prefix=f"cmda-error-{os.getpid()}-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:  # a full disk: the line alone
        return f"{message} (CMDA_TRACEBACK=1 prints the traceback)"
    return f"{message} (traceback in {path}; CMDA_TRACEBACK=1 prints it)"


def sequences(cfg: Any, seq: list[str] | None, all_: bool) -> list[str]:
    if all_ or not seq:
        if not all_ and not seq:
            raise InputError(cfg.source, "name a sequence with --seq NAME or pass --all")
        if not cfg.dsec.sequences:
            raise InputError(cfg.source, "--all: no sequences are listed under dsec.sequences")
        return list(cfg.dsec.sequences)
    return [cfg.sequence(s) for s in seq]
