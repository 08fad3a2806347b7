"""Tools: check a data tree and weight files, compare configurations over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import (
    ConfigOpt,
    app,
    reports_input_errors,
)
from pipeline.errors import STOPPED_EXIT
from train.tools.check import check_all
from train.tools.compare import CompareStopped, parse_entry, parse_seeds
from train.tools.compare import compare as run_compare


@app.command()
@reports_input_errors
def check(
    config: ConfigOpt = Path("datasets.yaml"),
    backbone: Annotated[str, typer.Option(help="MiT size whose ImageNet file to check.")] = "mit_b5",
    pretrained: Annotated[Path | None, typer.Option(readable=False,
                                                    help="ImageNet mit_bX.pth (default pretrained/<backbone>.pth; "
                                                    "required when given).")] = None,
    cyclegan: Annotated[Path | None, typer.Option(readable=False, help="CycleGAN file or CMDA checkpoint (default "
                                                  "pretrained/cityscapes_ICD_to_dsec_EN.pth; required when "
                                                  "given).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(readable=False, help="Also check a checkpoint (cmda's or CMDA's "
                                                    "released one).")] = None,
) -> None:
    """Check the raw data trees of datasets.yaml and the weight files before a run; exit 2 if anything is missing.

    DSEC: events.h5 and rectify_map.h5 (schema), rectified images, timestamps.txt (one per image),
    cam_to_cam.yaml, CMDA's test labels, for every listed sequence. Cityscapes: gtFine polygons, their
    leftImg8bit images, the previous frames in leftImg8bit_sequence (for IC1). DSEC-Semantic (optional when
    dsec_semantic.root is absent): every listed sequence's layout, events, rectify map, labels and timestamps
    (counts agree, first and last label decoded). Weights: loaded and
    shape-checked as training loads them; missing default weight files are reported as optional.
    """

    report = check_all(config, backbone=backbone, pretrained=pretrained, cyclegan=cyclegan, checkpoint=checkpoint)
    typer.echo(report.text())
    failures = report.failures
    if failures:
        typer.echo(f"error: {config}: {len(failures)} required item(s) missing or unreadable: "
                   + "; ".join(f"{i.what}" + (f" ({i.path})" if i.path else "") for i in failures[:5])
                   + (" ..." if len(failures) > 5 else ""), err=True)
        raise typer.Exit(2)
    typer.echo("everything required is present")


@app.command()
@reports_input_errors
def compare(
    run: Annotated[list[str], typer.Option("--run", help="A configuration: a variant name (e.g. baseline) or "
                                           "LABEL=TRAIN ARGS (e.g. 'baseline + mic=--variant baseline --mic'); "
                                           "repeat for each.")],
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated; every configuration runs with each.")] = "0,1,2",
    common: Annotated[str, typer.Option(help="`cmda train` arguments for every run, e.g. '--preset cpu-sample'.")
                      ] = "",
    out: Annotated[Path, typer.Option(help="Folder of the runs and the summary (resumable).")] = Path("runs/compare"),
    parallel: Annotated[int, typer.Option(help="Runs at a time (each its own process, with cores // K threads "
                                          "unless OMP_NUM_THREADS is set).")] = 1,
) -> None:
    """Train and evaluate several configurations over several seeds; tabulate night mIoU mean +- std.

    Each (configuration, seed) is a `cmda train` run in OUT/<label>/seed<k> followed by `cmda evaluate`
    of its last checkpoint. Finished runs are not redone and interrupted ones resume, so the command can
    be re-run after a stop. Writes compare.md, compare.json and compare.png (bars with the seeds' spread).
    """
    import shlex

    try:
        res = run_compare([parse_entry(r) for r in run], parse_seeds(seeds), out, tuple(shlex.split(common)),
                          parallel=parallel, progress=typer.echo)
    except CompareStopped as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(STOPPED_EXIT) from None
    typer.echo(res["table"])
    typer.echo(f"-> {out}/compare.md, compare.json, compare.png")
