"""Evaluation commands: score a checkpoint, write predictions, look at one iteration's inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import (
    ConfigOpt,
    DeviceOpt,
    RunDatasetsOpt,
    app,
    reports_input_errors,
)
from train.config import TrainConfig, apply_layers, validate
from train.eval.evaluate import evaluate_checkpoint
from train.eval.inspect import inspect_iteration
from train.eval.inspect_kinds import inspect_kinds
from train.eval.predict import predict as run_predict
from train.eval.predict_image_only import NightPrediction


@app.command()
@reports_input_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(readable=False,
                                               help="A checkpoint written by cmda train, or CMDA's released "
                                               "checkpoint (read as it is).")],
    out: Annotated[Path | None, typer.Option(help="Folder for metrics.json, iou.md, confusion PNGs.")] = None,
    teacher: Annotated[bool, typer.Option("--teacher", help="Evaluate the EMA teacher (CMDA: ema_model.*), not "
                                          "the student.")] = False,
    limit: Annotated[int, typer.Option(help="Only the first N test frames (0 = all).")] = 0,
    device: DeviceOpt = "auto",
    datasets: RunDatasetsOpt = None,
    domain: Annotated[str, typer.Option(help="night: DSEC night test frames; day: Cityscapes val (IC1 as "
                                        "events), to see the day-night gap.")] = "night",
    target: Annotated[str | None, typer.Option(help="Night benchmark: dsec, or darkzurich / acdc (their val "
                                               "split) for an image + ISR model (default: the checkpoint's).",
                                               show_default=False)] = None,
) -> None:
    """mIoU of a checkpoint on the DSEC night test frames, for the fusion, image and event outputs.

    The headline mIoU averages the classes annotated in the test set (18 on DSEC night: truck is never
    annotated and is excluded, not counted as 0); the mmseg-style 19-class mean is shown beside it.

    An event-only DSEC-Semantic checkpoint is scored on the test windows at 640x440 under both conventions,
    each labelled: ESS's mIoU (plain mean over the 11 classes, an absent class counting 0), cmda's mIoU
    (mean over the annotated classes) and pixel accuracy.
    """

    summary = evaluate_checkpoint(checkpoint, datasets=datasets, out=out, teacher=teacher, device=device,
                                  limit=limit, domain=domain, target=target)
    typer.echo(summary["table"])
    typer.echo(f"-> {summary['out']}")


@app.command()
@reports_input_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(readable=False,
                                               help="A checkpoint written by `cmda train` (.pt), or CMDA's "
                                               "released checkpoint.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs (default: the run's predictions/iter_N/, one per "
                                  "checkpoint, like evaluate's eval/iter_N/).")
    ] = None,
    config: RunDatasetsOpt = None,
    split: Annotated[
        str, typer.Option(help="DSEC: test (labelled, top 440 rows) or train (unlabelled, whole frame); "
                           "an image-only target: val (colour PNGs, mIoU) or test.")
    ] = "test",
    limit: Annotated[int, typer.Option(help="Only the first N frames (0 = all).")] = 0,
    output: Annotated[str, typer.Option(help="Which head output to show: fusion, image or events.")] = "fusion",
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Use the EMA teacher's weights (CMDA: ema_model.*) instead of the "
                           "student's.")
    ] = False,
    device: DeviceOpt = "auto",
    target: Annotated[str | None, typer.Option(help="darkzurich / acdc: an image + ISR model on that target's "
                                               "val (colour PNGs, mIoU) or test split (Dark Zurich: the test "
                                               "server's zip; ACDC: labelIds PNGs). Default: the checkpoint's.",
                                               show_default=False)] = None,
) -> None:
    """Run a checkpoint on the DSEC night frames and write colour predictions and side-by-side panels.

    For an image-only target (--target darkzurich|acdc, or a checkpoint trained for one) it predicts that
    target's val or test split instead; `--target darkzurich --split test` writes the test server's zip.

    The model is rebuilt from the config stored in the checkpoint. Per frame: <seq>_<frame>_pred.png
    (Cityscapes palette) and <seq>_<frame>_panel.png (image | events | prediction | label). On the test
    split the mIoU over the frames written is printed too.
    """

    s = run_predict(checkpoint, out=out, config=config, split=split, limit=limit, output=output, teacher=teacher,
                    device=device, target=target)
    if isinstance(s, dict):  # an event-only DSEC-Semantic model
        m = s["metrics"]
        typer.echo(f"{s['frames']} dsec-semantic {s['split']} label(s), events output -> {s['out']}"
                   + (f" (ESS mIoU {m['miou_ess']:.2f}, cmda mIoU {m['miou_annotated']:.2f} over "
                      f"{m['annotated_classes']} annotated classes, accuracy {m['accuracy']:.2f})" if m else ""))
        return
    if isinstance(s, NightPrediction):
        msg = f"{s.images} {s.target} {s.split} image(s), {s.output} output -> {s.submission or s.out}"
        if s.metrics:
            msg += f" (mIoU {100 * s.metrics['mIoU']:.2f} over {s.metrics['n_classes']} annotated classes)"
        typer.echo(msg)
        return
    msg = f"{s.frames} {s.split} frame(s), {s.weights} {s.output} output -> {s.out}"
    if s.metrics:
        msg += f" (mIoU {100 * s.metrics['mIoU']:.2f} over {s.metrics['n_classes']} annotated classes)"
    typer.echo(msg)


@app.command("inspect")
@reports_input_errors
def inspect_cmd(
    config: ConfigOpt = Path("datasets.yaml"),
    iter_: Annotated[int, typer.Option("--iter", help="Training iteration whose batch to show.")] = 0,
    seed: Annotated[int, typer.Option(help="Training seed (run.seed; batches depend only on seed and iteration).")] = 0,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: runs/inspect/iter_<N>_seed_<S>.png).")
                   ] = None,
    batch: Annotated[int, typer.Option(help="Samples per domain to show.")] = 1,
    preset: Annotated[str | None, typer.Option(help="Training preset whose data settings to use, e.g. "
                                               "cpu-sample (as `cmda train --preset`).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Data/RCS setting as in `cmda train`, e.g. "
                                                   "--set data.crop=256 (repeatable).")] = None,
    kinds: Annotated[bool, typer.Option("--kinds", help="Instead: one frame (--seq, --frame; default the first "
                                        "test frame) in every representation of representation.kinds.")] = False,
    seq: Annotated[str | None, typer.Option(help="With --kinds: the sequence.")] = None,
    frame: Annotated[int | None, typer.Option(help="With --kinds: the frame number.")] = None,
) -> None:
    """Render one PNG of the training pair iteration N feeds the network (or, with --kinds, of one frame in
    every stored event representation).

    Rows: source image | label overlay | IC1 | day ISR; target image | target events | night ISR;
    ClassMix: pasted source classes | mixed image (grouped with --set dsr.enabled=true)
    (red = positive, blue = negative). Uses the training data settings (defaults, or --preset and
    --set as `cmda train` takes them) and Rare Class Sampling.
    """

    if kinds:
        typer.echo(f"wrote {inspect_kinds(config, seq, frame, out)}")
        return
    cfg = validate(apply_layers(TrainConfig(), preset=preset, sets=set_ or []))
    out = out or Path("runs") / "inspect" / f"iter_{iter_:06d}_seed_{seed}.png"
    path = inspect_iteration(config, iteration=iter_, seed=seed, out=out, batch=batch, data=cfg.data, rcs=cfg.rcs,
                             train_cfg=cfg)
    typer.echo(f"wrote {path}")
