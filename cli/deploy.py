"""Deployment commands: ONNX export, CMDA checkpoint conversion, streaming a recording."""

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
from train.checkpoints.cmda_layout import convert as run_convert
from train.deploy.export import export_checkpoint
from train.deploy.stream import stream as run_stream


@app.command()
@reports_input_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(
        readable=False, help="A checkpoint written by `cmda train` (.pt), or CMDA's released "
                             "mmcv checkpoint (.pth, its student weights).")],
    out: Annotated[Path | None, typer.Option(help="The .onnx file to write, or a folder to write "
                                             "<checkpoint name>.onnx in (default: beside the checkpoint).")] = None,
    config: ConfigOpt = Path("datasets.yaml"),
    height: Annotated[int, typer.Option(help="Input rows (0 = the test geometry: data.test_rows, 440).")] = 0,
    width: Annotated[int, typer.Option(help="Input columns (0 = the event frame width, 640).")] = 0,
    bins: Annotated[int, typer.Option(help="Event bins fed to the model (0 = datasets.yaml's; 1 folds the three "
                                      "repeated channels into one).")] = 0,
    argmax: Annotated[bool, typer.Option("--argmax", help="Output a uint8 label map instead of logits.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision weights and compute.")] = False,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Variable height and width.")] = False,
) -> None:
    """Export the student's fusion output (both encoders, fusion, one head pass) as an ONNX model.

    Inputs: the normalised image 1x3xHxW and event grid 1xCxHxW (C = 1 for 1 bin); an image + ISR model
    (--target darkzurich/acdc) takes the image and its ISR 1x1xHxW instead, at 540x960 by default. Output:
    logits 1x19xHxW or, with --argmax, labels 1xHxW. The model is checked against PyTorch on one frame with
    onnxruntime before it is written. Needs the deploy extra: pip install -e '.[deploy]'.
    """

    r = export_checkpoint(checkpoint, out, config=config, height=height, width=width, bins=bins, argmax=argmax,
                          fp16=fp16, dynamic=dynamic)
    shape = "dynamic HxW" if r.dynamic else f"{r.height}x{r.width}"
    diff = "" if r.max_diff is None else f"max |logit diff| {r.max_diff:.1e}, "
    typer.echo(f"{r.backbone} {r.precision} {r.output}, image 1x3 and {r.second_input} 1x{r.event_channels} at "
               f"{shape}; "
               f"checked on {r.frame}: {diff}argmax agreement {100 * r.agreement:.3f} % "
               f"-> {r.out} ({r.size_mb:.1f} MB)")


@app.command()
@reports_input_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(readable=False, help="CMDA's released mmcv checkpoint (.pth).")],
    out: Annotated[Path, typer.Argument(help="Where to write it in cmda's checkpoint format (.pt).")],
) -> None:
    """Convert CMDA's released checkpoint into cmda's checkpoint format (student, teacher, CycleGAN).

    Keys are renamed onto cmda's model strictly: a key that maps nowhere, a missing key or a shape
    mismatch is an error listing them. CMDA's unused ISR fusion is skipped (said in one line). The result
    loads in `cmda evaluate` / `cmda predict`, `cmda train --init` and `--cyclegan`; it has no optimiser
    state, so it cannot be resumed.
    """

    imp = run_convert(checkpoint, out, say=typer.echo)
    parts = ["student", "teacher" if imp.teacher is not None else "no teacher",
             "CycleGAN" if imp.cyclegan is not None else "no CycleGAN"]
    typer.echo(f"{checkpoint} ({imp.backbone}, {imp.num_classes} classes): {', '.join(parts)} -> {out}")


@app.command()
@reports_input_errors
def stream(
    seq: Annotated[str, typer.Option("--seq", help="DSEC sequence to replay from its raw files.")],
    model: Annotated[Path, typer.Option("--model", readable=False,
                                        help="A checkpoint (.pt) or a `cmda export` model (.onnx).")],
    config: ConfigOpt = Path("datasets.yaml"),
    out: Annotated[Path | None, typer.Option(help="Folder for predictions (default: stream_<seq>/ beside "
                                             "the model).")] = None,
    video: Annotated[bool, typer.Option("--video", help="Also write <seq>.mp4 of image | events | prediction.")
                     ] = False,
    realtime: Annotated[bool, typer.Option("--realtime", help="Pace to the camera timestamps and count "
                                           "missed deadlines.")] = False,
    first: Annotated[int, typer.Option(help="Start at this image.")] = 0,
    limit: Annotated[int, typer.Option(help="At most N images (0 = all).")] = 0,
    device: Annotated[str, typer.Option(help="For checkpoints: auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(help="onnxruntime threads (0 = its default).")] = 0,
) -> None:
    """Replay a DSEC sequence as a live system would: per image, read the events since the previous image
    from events.h5, voxelise, warp the image, run the model; print per-stage latency and frames/s."""

    s = run_stream(seq, model, config=config, out=out, video=video, realtime=realtime, first=first, limit=limit,
                   device=device, threads=threads)
    typer.echo(s.stage_table())
    msg = (f"{s.sequence}: {s.frames} frame(s) with {s.model}: {s.fps:.1f} frames/s end to end "
           f"(camera: one image every {s.interval_ms:.1f} ms) -> {s.out}")
    if s.missed is not None:
        msg += f"; realtime: {s.missed} missed deadline(s), worst by {s.max_lag_ms:.1f} ms"
    typer.echo(msg)
    if s.video is not None:
        typer.echo(f"video -> {s.video}")
    if s.interrupted:
        typer.echo(f"interrupted after {s.frames} of {s.planned} frame(s): their predictions are in {s.out}"
                   + ("; no video written (it would be incomplete)" if video else ""), err=True)
        raise typer.Exit(STOPPED_EXIT)
