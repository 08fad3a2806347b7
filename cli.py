"""The ``cmda`` command: one entry point for the data pipeline and the trainer.

Each command is a thin wrapper: it parses options, loads ``datasets.yaml`` and calls one function
in ``pipeline`` or ``train``. Heavy imports (torch, numba, dask) happen inside the commands so that
``cmda --help`` answers instantly. Bad input raises ``pipeline.errors.InputError``; the wrapper
turns it into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.errors import InputError

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

ConfigOpt = Annotated[Path, typer.Option("--config", help="datasets.yaml to read (paths in it are relative to it).")]
SeqOpt = Annotated[list[str] | None, typer.Option("--seq", help="Sequence name, e.g. zurich_city_09a (repeatable).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every sequence listed in datasets.yaml.")]
SchedulerOpt = Annotated[
    str | None, typer.Option(help="dask.distributed scheduler address, e.g. tcp://host:8786 (default: local threads).")
]
WorkersOpt = Annotated[int, typer.Option(help="Local threads (0 = one per core).")]


def reports_input_errors(fn: F) -> F:
    """Turn InputError into 'error: <file>: <problem>' and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _sequences(cfg: Any, seq: list[str] | None, all_: bool) -> list[str]:
    if all_ or not seq:
        if not all_ and not seq:
            raise InputError(cfg.source, "name a sequence with --seq NAME or pass --all")
        return list(cfg.dsec.sequences)
    return [cfg.sequence(s) for s in seq]


@app.command()
@reports_input_errors
def preprocess(
    seq: SeqOpt = None,
    all_: AllOpt = False,
    config: ConfigOpt = Path("datasets.yaml"),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 0,
) -> None:
    """Voxelise a sequence's events into a Zarr store (index, counts, rectified voxel grids).

    Streams events.h5 in chunks through a Numba kernel, one voxel grid per image window
    (events idx[i-1]..idx[i]), so memory stays bounded whatever the sequence length. Interrupted
    runs resume where they stopped.
    """
    from pipeline.config import load_config
    from pipeline.preprocess import preprocess_sequence

    cfg = load_config(config)
    for name in _sequences(cfg, seq, all_):
        preprocess_sequence(cfg, name, scheduler=scheduler, workers=workers)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
