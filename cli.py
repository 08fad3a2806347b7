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

ConfigOpt = Annotated[Path, typer.Option("--config", help="datasets.yaml to read (paths in it are relative to it).")]
SeqOpt = Annotated[list[str] | None, typer.Option("--seq", help="Sequence name, e.g. zurich_city_09a (repeatable).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every sequence listed in datasets.yaml.")]
SchedulerOpt = Annotated[
    str | None, typer.Option(help="dask.distributed scheduler address, e.g. tcp://host:8786 (default: local threads).")
]
WorkersOpt = Annotated[int, typer.Option(min=0, help="Local threads (0 = one per core).")]


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

    return wrapper  # type: ignore[return-value]


def _sequences(cfg: Any, seq: list[str] | None, all_: bool) -> list[str]:
    if all_ or not seq:
        if not all_ and not seq:
            raise InputError(cfg.source, "name a sequence with --seq NAME or pass --all")
        if not cfg.dsec.sequences:
            raise InputError(cfg.source, "--all: no sequences are listed under dsec.sequences")
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
    from pipeline.preprocess import store_path as preprocess_store_path

    cfg = load_config(config)
    for name in _sequences(cfg, seq, all_):
        s = preprocess_sequence(cfg, name, scheduler=scheduler, workers=workers)
        state = ("already complete, nothing to do" if s["status"] == "already complete"
                 else f"{s['frames_written']} frames written")
        typer.echo(f"{name}: {state}; {s['frames_with_window']} of {s['frames']} images have an event window "
                   f"({s['events_in_windows']:,} events) -> {preprocess_store_path(cfg, name)}")


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


def _lambda(what: str) -> Any:
    return Annotated[float | None, typer.Option(help=f"Weight of the L2 (mse) feature loss {what} (default 0, "
                                                "or the --variant's).", show_default=False)]


DeviceOpt = Annotated[str, typer.Option(help="auto (cuda:<LOCAL_RANK> if CUDA is available, else cpu), cpu, cuda "
                                        "or cuda:N.")]
RunDatasetsOpt = Annotated[Path | None, typer.Option("--config", help="datasets.yaml (default: the one the "
                                                     "checkpoint's run trained with).")]


@app.command()
@reports_input_errors
def train(
    variant: Annotated[str | None, typer.Option(help="Loss preset: baseline (default), rgb_event_src, fusion_st, "
                                                "rgb_event_src+fusion_st, rgb_st+event_s_rgb_t, rgb_st+event_st, "
                                                "masked_event.", show_default=False)] = None,
    source_only: Annotated[bool, typer.Option("--source-only", help="No adaptation: source pass only "
                                              "(the reference every variant should beat).")] = False,
    preset: Annotated[str | None, typer.Option(help="Settings for another machine: cpu-sample (a few minutes "
                                               "on the bundled sample, MiT-B0), or the GPU memory presets 24gb, "
                                               "16gb, 11gb (MiT-B5 at batch 2+2 through --accum and activation "
                                               "checkpointing; estimates until measured, see README).")] = None,
    backbone: Annotated[str | None, typer.Option(help="mit_b0 .. mit_b5 (default mit_b5).")] = None,
    iters: Annotated[int | None, typer.Option(help="Iterations (default 40000).")] = None,
    batch: Annotated[int | None, typer.Option(help="Samples per domain per iteration (default 2).")] = None,
    crop: Annotated[int | None, typer.Option(help="Training crop size (default 512).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate (default 6e-5; head x10).")] = None,
    lambda_rgb_event_src: _lambda("between the source image and source event features (both sides learn)") = None,
    lambda_fusion_st: _lambda("pulling the mixed fusion features to the source fusion features") = None,
    lambda_rgb_st: _lambda("pulling the mixed image features to the source image features") = None,
    lambda_event_s_rgb_t: _lambda("pulling the mixed image features to the source event features") = None,
    lambda_event_st: _lambda("pulling the mixed event features to the source event features") = None,
    mask_events: Annotated[float | None, typer.Option(help="Share of the mixed pass's event input masked "
                                                      "by random blocks.", show_default=False)] = None,
    pretrained: Annotated[str | None, typer.Option(help="ImageNet mit_bX.pth (default pretrained/<backbone>.pth "
                                                   "if present); 'none' = random init.")] = None,
    cyclegan: Annotated[str | None, typer.Option(help="cityscapes_ICD_to_dsec_EN.pth (default under pretrained/ "
                                                 "if present); 'none' = IC1 as source events.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<date>-<variant>; on --resume the "
                                             "run's own).")] = None,
    init: Annotated[str | None, typer.Option(help="Start the student from a cmda checkpoint or CMDA's released "
                                             "checkpoint (teacher = a copy, fresh optimiser).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Run folder (its latest checkpoint) or checkpoint file to "
                                                "continue, with the run's own settings.")] = None,
    resume_override: Annotated[bool, typer.Option("--resume-override", help="With --resume: let settings given "
                                                  "here replace the run's (logged in metrics.jsonl, both kept "
                                                  "in config.json); without it a difference is an error.")] = False,
    settings: Annotated[Path | None, typer.Option("--settings", "--config-file", help="YAML file of TRAINING "
                                                  "settings ({section: {key: value}}, as --set); not the "
                                                  "datasets.yaml.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any setting, e.g. "
                                                   "--set dacs.pseudo_threshold=0.9 (repeatable).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    accum: Annotated[int | None, typer.Option(help="Gradient accumulation: run the batch as N equal micro-batches "
                                              "with one optimiser step (same recipe, less memory; N divides "
                                              "--batch).", show_default=False)] = None,
    mic: Annotated[bool, typer.Option("--mic", help="Masked image consistency over images and events "
                                      "(= --set mic.enabled=true; see README).")] = False,
    device: Annotated[str | None, typer.Option(help="auto (cuda:<LOCAL_RANK> if CUDA is available, else cpu), "
                                               "cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    datasets: Annotated[Path | None, typer.Option("--datasets", "--config", help="datasets.yaml: where the DATA "
                                                  "is (default ./datasets.yaml; on --resume the run's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and exit.")] = False,
    target: Annotated[str | None, typer.Option(help="Night target: dsec (images + events, default), or an "
                                               "image-only target darkzurich / acdc (CMDA's image + ISR model, "
                                               "its cs2dz settings; see README).", show_default=False)] = None,
) -> None:
    """Train CMDA with DACS self-training (Cityscapes day -> DSEC night, images + events).

    --target darkzurich|acdc trains CMDA's image + ISR model for an image-only night target instead.

    Defaults reproduce CMDA's published run (MiT-B5, 40k iterations, batch 2+2, crop 512). Settings
    apply in order: defaults, --variant, --preset, --settings, --set, then the dedicated flags.
    --resume RUN starts from the run's saved settings instead of the defaults; any setting given here
    that differs from them (device, workers and --out aside) is an error unless --resume-override.
    Multi-GPU: torchrun --nproc_per_node N $(which cmda) train ...
    """
    import json
    import os

    from train.checkpoint import find_checkpoint, load_checkpoint
    from train.config import GPU_PRESETS, TrainConfig, apply_layers, set_value, to_dict, validate
    from train.dacs import default_out
    from train.dacs import train as run_training
    from train.inference import checkpoint_config, resolve_device

    flags = {"model.backbone": backbone, "run.iters": iters, "run.batch": batch, "data.crop": crop,
             "optim.lr": lr, "loss.rgb_event_src": lambda_rgb_event_src, "loss.fusion_st": lambda_fusion_st,
             "loss.rgb_st": lambda_rgb_st, "loss.event_s_rgb_t": lambda_event_s_rgb_t,
             "loss.event_st": lambda_event_st, "loss.mask_events": mask_events, "model.pretrained": pretrained,
             "model.cyclegan": cyclegan, "model.init": init, "run.out": out, "run.device": device, "run.seed": seed,
             "data.datasets": datasets.absolute() if datasets is not None else None,
             "run.source_only": True if source_only else None, "run.compile": True if compile_ else None,
             "run.accum": accum, "mic.enabled": True if mic else None}
    checkpoint = None
    if resume is not None:  # the run's own settings, then only what is given here
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(checkpoint)
        cfg = checkpoint_config(checkpoint, state)
        cfg.run.device = "auto"  # a machine setting: this machine's, unless given
        cfg.run.out = checkpoint.parent.parent.absolute()
    else:
        cfg = TrainConfig()
        cfg.data.datasets = Path("datasets.yaml").absolute()
        variant = variant or "baseline"
    apply_layers(cfg, variant=variant, preset=preset, settings=settings, sets=set_ or [], flags=flags, target=target)
    validate(cfg)
    set_value(cfg, "run.device", str(resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))))
    cfg.run.out = (cfg.run.out or default_out(cfg)).absolute()
    if preset in GPU_PRESETS and not cfg.run.device.startswith("cuda"):
        typer.echo(f"note: --preset {preset} only concerns GPU memory; on {cfg.run.device} it changes nothing "
                   "that matters (run.accum and checkpointing are applied all the same)", err=True)
    if dry_run:
        typer.echo(json.dumps(to_dict(cfg), indent=2))
        return
    result = run_training(cfg, resume=checkpoint, override=resume_override)
    if result.get("stopped") is not None:  # a signal stopped it: not a finished run, for whoever called us
        if int(os.environ.get("RANK", "0")) != 0:
            # Under torchrun only rank 0 says so: torchrun terminates every other process as soon as one
            # exits non-zero, and rank 0 may still be writing the checkpoint the others have left to it.
            raise typer.Exit(0)
        typer.echo(f"stopped at iteration {result['stopped']} of {cfg.run.iters}: not finished; continue with "
                   f"--resume {result['out']}")
        raise typer.Exit(STOPPED_EXIT)
    if result.get("eval"):
        typer.echo(f"final night mIoU (fusion): {100 * result['eval']['mIoU']:.2f}")
    typer.echo(f"run folder: {result['out']}")


@app.command()
@reports_input_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by cmda train, or CMDA's released "
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
    """
    from train.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(checkpoint, datasets=datasets, out=out, teacher=teacher, device=device,
                                  limit=limit, domain=domain, target=target)
    typer.echo(summary["table"])
    typer.echo(f"-> {summary['out']}")


@app.command()
@reports_input_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cmda train` (.pt), or CMDA's "
                                               "released checkpoint.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs (default: the run's predictions/iter_N/, one per "
                                  "checkpoint, like evaluate's eval/iter_N/).")
    ] = None,
    config: RunDatasetsOpt = None,
    split: Annotated[
        str, typer.Option(help="test (labelled, top 440 rows) or train (unlabelled, whole frame).")
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
    from train.predict import predict as run_predict
    from train.predict_night import NightPrediction

    s = run_predict(checkpoint, out=out, config=config, split=split, limit=limit, output=output, teacher=teacher,
                    device=device, target=target)
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


@app.command()
@reports_input_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cmda train` (.pt).")],
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
    from train.export import export_checkpoint

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
    checkpoint: Annotated[Path, typer.Argument(help="CMDA's released mmcv checkpoint (.pth).")],
    out: Annotated[Path, typer.Argument(help="Where to write it in cmda's checkpoint format (.pt).")],
) -> None:
    """Convert CMDA's released checkpoint into cmda's checkpoint format (student, teacher, CycleGAN).

    Keys are renamed onto cmda's model strictly: a key that maps nowhere, a missing key or a shape
    mismatch is an error listing them. CMDA's unused ISR fusion is skipped (said in one line). The result
    loads in `cmda evaluate` / `cmda predict`, `cmda train --init` and `--cyclegan`; it has no optimiser
    state, so it cannot be resumed.
    """
    from train.cmda_checkpoint import convert as run_convert

    imp = run_convert(checkpoint, out, say=typer.echo)
    parts = ["student", "teacher" if imp.teacher is not None else "no teacher",
             "CycleGAN" if imp.cyclegan is not None else "no CycleGAN"]
    typer.echo(f"{checkpoint} ({imp.backbone}, {imp.num_classes} classes): {', '.join(parts)} -> {out}")


@app.command()
@reports_input_errors
def stream(
    seq: Annotated[str, typer.Option("--seq", help="DSEC sequence to replay from its raw files.")],
    model: Annotated[Path, typer.Option("--model", help="A checkpoint (.pt) or a `cmda export` model (.onnx).")],
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
    from train.stream import stream as run_stream

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


@app.command()
@reports_input_errors
def check(
    config: ConfigOpt = Path("datasets.yaml"),
    backbone: Annotated[str, typer.Option(help="MiT size whose ImageNet file to check.")] = "mit_b5",
    pretrained: Annotated[Path | None, typer.Option(help="ImageNet mit_bX.pth (default pretrained/<backbone>.pth; "
                                                    "required when given).")] = None,
    cyclegan: Annotated[Path | None, typer.Option(help="CycleGAN file or CMDA checkpoint (default "
                                                  "pretrained/cityscapes_ICD_to_dsec_EN.pth; required when "
                                                  "given).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Also check a checkpoint (cmda's or CMDA's "
                                                    "released one).")] = None,
) -> None:
    """Check the raw data trees of datasets.yaml and the weight files before a run; exit 2 if anything is missing.

    DSEC: events.h5 and rectify_map.h5 (schema), rectified images, timestamps.txt (one per image),
    cam_to_cam.yaml, CMDA's test labels, for every listed sequence. Cityscapes: gtFine polygons, their
    leftImg8bit images, the previous frames in leftImg8bit_sequence (for IC1). Weights: loaded and
    shape-checked as training loads them; missing default weight files are reported as optional.
    """
    from train.check import check_all

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
    parallel: Annotated[int, typer.Option(help="Runs at a time (each its own process).")] = 1,
) -> None:
    """Train and evaluate several configurations over several seeds; tabulate night mIoU mean +- std.

    Each (configuration, seed) is a `cmda train` run in OUT/<label>/seed<k> followed by `cmda evaluate`
    of its last checkpoint. Finished runs are not redone and interrupted ones resume, so the command can
    be re-run after a stop. Writes compare.md, compare.json and compare.png (bars with the seeds' spread).
    """
    import shlex

    from train.compare import compare as run_compare
    from train.compare import parse_entry, parse_seeds

    res = run_compare([parse_entry(r) for r in run], parse_seeds(seeds), out, tuple(shlex.split(common)),
                      parallel=parallel, progress=typer.echo)
    typer.echo(res["table"])
    typer.echo(f"-> {out}/compare.md, compare.json, compare.png")


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
) -> None:
    """Render one PNG of the training pair iteration N feeds the network.

    Rows: source image | label overlay | IC1 | day ISR; target image | target events | night ISR;
    ClassMix: pasted source classes | mixed image (grouped with --set dsr.enabled=true)
    (red = positive, blue = negative). Uses the training data settings (defaults, or --preset and
    --set as `cmda train` takes them) and Rare Class Sampling.
    """
    from train.config import TrainConfig, apply_layers, validate
    from train.inspect_sample import inspect_iteration

    cfg = validate(apply_layers(TrainConfig(), preset=preset, sets=set_ or []))
    out = out or Path("runs") / "inspect" / f"iter_{iter_:06d}_seed_{seed}.png"
    path = inspect_iteration(config, iteration=iter_, seed=seed, out=out, batch=batch, data=cfg.data, rcs=cfg.rcs,
                             train_cfg=cfg)
    typer.echo(f"wrote {path}")


@app.command()
@reports_input_errors
def sample(
    out: Annotated[Path | None, typer.Option(help="Folder to (re)create with the synthetic tree (default: "
                                             "data/sample, or data/sample_targets/<target>).")] = None,
    config: ConfigOpt = Path("datasets.yaml"),
    target: Annotated[str, typer.Option(help="dsec (DSEC night + Cityscapes day), or an image-only night "
                                        "target in its official layout: darkzurich, acdc.")] = "dsec",
    seed: Annotated[int | None, typer.Option(help="Random seed (default: sample.seed); same seed, same bytes.")] = None,
    frames: Annotated[int | None, typer.Option(help="Images per DSEC sequence at 20 Hz (default: sample.frames).")
                      ] = None,
    event_rate: Annotated[float | None, typer.Option(help="Events per second per sequence (default: "
                                                     "sample.event_rate; real DSEC night is about 6.6e6).")] = None,
    step_us: Annotated[int, typer.Option(help="Render step of the event simulation in microseconds.")] = 5000,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 0,
) -> None:
    """Write a small SYNTHETIC DSEC night + Cityscapes day tree in the real formats (default data/sample).

    One procedural street of labelled 3-D polygons per DSEC sequence (datasets.yaml dsec.sequences) gives
    everything: events.h5 simulated from its night rendering at the raw event pixels (DSEC's exact
    schema), rectify_map.h5 and cam_to_cam.yaml of a synthetic calibration, 1440x1080 night images at
    20 Hz with timestamps, trainId test labels in the event frame, and daylight Cityscapes frames with
    polygon JSON. Deterministic for a seed; built in a temporary folder and swapped in at the end.

    --target darkzurich / acdc instead writes a Dark Zurich- or ACDC-format night tree (rgb_anon/ images,
    gt/ labelTrainIds and labelIds PNGs for the labelled splits) from the same kind of scenes, sized by
    sample.targets in datasets.yaml (default out data/sample_targets/<target>).
    """
    from pipeline.config import load_config

    cfg = load_config(config)
    if target != "dsec":
        from pipeline.synthetic.night_targets import TARGETS, generate_target

        if target not in TARGETS:
            raise InputError(None, f"unknown --target {target!r} (known: dsec, {', '.join(TARGETS)})")
        s = generate_target(cfg, target, out or Path("data/sample_targets") / target, seed=seed,
                            scheduler=scheduler, workers=workers)
        counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
        typer.echo(f"{target}: {counts} images ({s['size'][0]}x{s['size'][1]}, {s['labelled']} labelled) written "
                   f"to {s['out']} in {s['seconds']:.1f} s (SYNTHETIC data, see its README.md)")
        return
    from pipeline.synthetic.sample import generate_sample

    out = out or Path("data/sample")
    summary = generate_sample(cfg, out, seed=seed, frames=frames, event_rate=event_rate, scheduler=scheduler,
                              workers=workers, dt_us=step_us)
    for seq in summary["sequences"]:
        typer.echo(f"{seq['sequence']}: {seq['frames']} images, {seq['events']:,} events "
                   f"({seq['rate'] / 1e6:.2f} M/s), test labels {seq['labels']}")
    typer.echo(f"cityscapes: {len(summary['cityscapes'])} frames; sample written to {summary['out']} "
               f"in {summary['seconds']:.1f} s (SYNTHETIC data, see its README.md)")


@app.command()
@reports_input_errors
def warp(
    seq: SeqOpt = None,
    all_: AllOpt = False,
    config: ConfigOpt = Path("datasets.yaml"),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 0,
) -> None:
    """Warp a sequence's 1440x1080 rectified images into the 640x480 rectified event frame (warp_images).

    Uses the infinite-depth homography H = K_rect1 R_rect1 R_10 R_rect0^T K_rect0^-1 from the sequence's
    cam_to_cam.yaml (the step CMDA never released) and writes dsec.out/<seq>/warp_images/NNNNNN.png.
    Already warped images are skipped, so an interrupted run resumes. dsec.warp_png in datasets.yaml
    picks "fast" (uncompressed PNG, quick for the training loader to decode) or "small".
    """
    from pipeline.config import load_config
    from pipeline.dsec import SequencePaths
    from pipeline.warp import warp_sequence

    cfg = load_config(config)
    for name in _sequences(cfg, seq, all_):
        s = warp_sequence(SequencePaths(cfg.dsec.root, name), cfg.dsec.out / name, scheduler=scheduler,
                          workers=workers, png=cfg.dsec.warp_png)
        typer.echo(f"{name}: {s['written']} warped, {s['skipped']} already there ({s['images']} images) "
                   f"in {s['seconds']:.1f} s -> {s['out']}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
