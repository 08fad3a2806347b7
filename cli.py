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


@app.command()
@reports_input_errors
def cityscapes(
    config: ConfigOpt = Path("datasets.yaml"),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 0,
    cmda_compat: Annotated[
        bool,
        typer.Option(
            "--cmda-compat",
            help="IC1 exactly as CMDA: a frame pair with no darkening gets -1 everywhere (default: 0 there).",
        ),
    ] = False,
) -> None:
    """Convert Cityscapes (cityscapes.root) into cityscapes.out: trainId labels, IC1 images, RCS statistics.

    Writes gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png from the polygons,
    leftImg8bit_IC1/{split}/... from each annotated frame and its previous frame (leftImg8bit_sequence),
    train.txt/val.txt and DAFormer's three RCS JSON files (train split). The raw root is never written;
    finished files are skipped, so an interrupted run resumes.
    """
    from pipeline.cityscapes import convert_cityscapes
    from pipeline.config import load_config

    cfg = load_config(config)
    summary = convert_cityscapes(
        cfg.cityscapes.root, cfg.cityscapes.out, scheduler=scheduler, workers=workers, cmda_compat=cmda_compat
    )
    typer.echo(
        f"cityscapes: {summary.train} train + {summary.val} val samples in {summary.seconds:.1f} s "
        f"({summary.files_per_s:.1f} files/s) -> {cfg.cityscapes.out}"
    )


@app.command()
@reports_input_errors
def index(
    seq: SeqOpt = None,
    merge: Annotated[bool, typer.Option("--merge", help="Only merge existing per-sequence splits.")] = False,
    config: ConfigOpt = Path("datasets.yaml"),
) -> None:
    """Write the DSEC night train/test index files (CMDA's two .txt files and our index.csv).

    Split rules come from datasets.yaml: test = labelled frames, train = even frames after the
    labelled range with a valid event window. Needs `cmda preprocess` and `cmda warp` first.
    With --seq, only that sequence's split (splits/<seq>.csv) is written; with --merge, only the
    merged files; with neither, both for every sequence.
    """
    from pipeline.config import load_config
    from pipeline.splits import merge_splits, write_index, write_sequence_split

    cfg = load_config(config)
    if seq:
        for name in _sequences(cfg, seq, False):
            c = write_sequence_split(cfg, name)
            typer.echo(f"{name}: {c['train']} train, {c['test']} test")
        return
    counts = merge_splits(cfg) if merge else write_index(cfg)
    for name, c in counts.items():
        typer.echo(f"{name}: {c['train']} train, {c['test']} test")
    total_train = sum(c["train"] for c in counts.values())
    total_test = sum(c["test"] for c in counts.values())
    typer.echo(f"total: {total_train} train, {total_test} test -> {cfg.dsec.out}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
