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


LambdaOpt = Annotated[float | None, typer.Option(show_default=False)]


@app.command()
@reports_input_errors
def train(
    variant: Annotated[str, typer.Option(help="Loss preset: baseline, rgb_event_src, fusion_st, "
                                         "rgb_event_src+fusion_st, rgb_st+event_s_rgb_t, rgb_st+event_st, "
                                         "masked_event.")] = "baseline",
    source_only: Annotated[bool, typer.Option("--source-only", help="No adaptation: source pass only "
                                              "(the reference every variant should beat).")] = False,
    preset: Annotated[str | None, typer.Option(help="Settings for another machine, e.g. cpu-sample (a few "
                                               "minutes on the bundled sample, MiT-B0).")] = None,
    backbone: Annotated[str | None, typer.Option(help="mit_b0 .. mit_b5 (default mit_b5).")] = None,
    iters: Annotated[int | None, typer.Option(help="Iterations (default 40000).")] = None,
    batch: Annotated[int | None, typer.Option(help="Samples per domain per iteration (default 2).")] = None,
    crop: Annotated[int | None, typer.Option(help="Training crop size (default 512).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate (default 6e-5; head x10).")] = None,
    lambda_rgb_event_src: LambdaOpt = None,
    lambda_fusion_st: LambdaOpt = None,
    lambda_rgb_st: LambdaOpt = None,
    lambda_event_s_rgb_t: LambdaOpt = None,
    lambda_event_st: LambdaOpt = None,
    mask_events: Annotated[float | None, typer.Option(help="Share of the mixed pass's event input masked "
                                                      "by random blocks.", show_default=False)] = None,
    pretrained: Annotated[str | None, typer.Option(help="ImageNet mit_bX.pth (default pretrained/<backbone>.pth "
                                                   "if present); 'none' = random init.")] = None,
    cyclegan: Annotated[str | None, typer.Option(help="cityscapes_ICD_to_dsec_EN.pth (default under pretrained/ "
                                                 "if present); 'none' = IC1 as source events.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<date>-<variant>).")] = None,
    init: Annotated[str | None, typer.Option(help="Start the student from a cmda checkpoint or CMDA's released "
                                             "checkpoint (teacher = a copy, fresh optimiser).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint file or run folder to continue.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config-file", help="YAML overrides "
                                                     "({section: {key: value}}).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any setting, e.g. "
                                                   "--set dacs.pseudo_threshold=0.9 (repeatable).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    device: Annotated[str | None, typer.Option(help="auto (cuda if available), cpu, cuda:0 ...")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    datasets: ConfigOpt = Path("datasets.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and exit.")] = False,
) -> None:
    """Train CMDA with DACS self-training (Cityscapes day -> DSEC night, images + events).

    Defaults reproduce CMDA's published run (MiT-B5, 40k iterations, batch 2+2, crop 512). Settings
    apply in order: defaults, --variant, --preset, --config-file, --set, then the dedicated flags.
    Multi-GPU: torchrun --nproc_per_node N $(which cmda) train ...
    """
    import json

    from train.config import TrainConfig, apply_preset, apply_variant, load_yaml_overrides, set_value, to_dict
    from train.dacs import train as run_training

    cfg = apply_variant(TrainConfig(), variant)
    if preset is not None:
        apply_preset(cfg, preset)
    cfg.run.source_only = source_only
    cfg.data.datasets = datasets
    if config_file is not None:
        load_yaml_overrides(cfg, config_file)
    for item in set_ or []:
        if "=" not in item:
            raise InputError(None, f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    flags = {"model.backbone": backbone, "run.iters": iters, "run.batch": batch, "data.crop": crop,
             "optim.lr": lr, "loss.rgb_event_src": lambda_rgb_event_src, "loss.fusion_st": lambda_fusion_st,
             "loss.rgb_st": lambda_rgb_st, "loss.event_s_rgb_t": lambda_event_s_rgb_t,
             "loss.event_st": lambda_event_st, "loss.mask_events": mask_events, "model.pretrained": pretrained,
             "model.cyclegan": cyclegan, "model.init": init, "run.out": out, "run.device": device, "run.seed": seed}
    for key, value in flags.items():
        if value is not None:
            set_value(cfg, key, value)
    if compile_:
        cfg.run.compile = True
    if dry_run:
        typer.echo(json.dumps(to_dict(cfg), indent=2))
        return
    result = run_training(cfg, resume=resume)
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
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda:0 ...")] = "auto",
    datasets: Annotated[Path | None, typer.Option("--config", help="datasets.yaml (default: the run's).")] = None,
    domain: Annotated[str, typer.Option(help="night: DSEC night test frames; day: Cityscapes val (IC1 as "
                                        "events), to see the day-night gap.")] = "night",
) -> None:
    """mIoU of a checkpoint on the DSEC night test frames, for the fusion, image and event outputs.

    The headline mIoU averages the classes annotated in the test set (18 on DSEC night: truck is never
    annotated and is excluded, not counted as 0); the mmseg-style 19-class mean is shown beside it.
    """
    from train.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(checkpoint, datasets=datasets, out=out, teacher=teacher, device=device,
                                  limit=limit, domain=domain)
    typer.echo(summary["table"])
    typer.echo(f"-> {summary['out']}")


@app.command()
@reports_input_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cmda train` (.pt), or CMDA's "
                                               "released checkpoint.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs (default: predictions/ beside the checkpoint).")
    ] = None,
    config: ConfigOpt = Path("datasets.yaml"),
    split: Annotated[
        str, typer.Option(help="test (labelled, top 440 rows) or train (unlabelled, whole frame).")
    ] = "test",
    limit: Annotated[int, typer.Option(help="Only the first N frames (0 = all).")] = 0,
    output: Annotated[str, typer.Option(help="Which head output to show: fusion, image or events.")] = "fusion",
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Use the EMA teacher's weights (CMDA: ema_model.*) instead of the "
                           "student's.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Run a checkpoint on the DSEC night frames and write colour predictions and side-by-side panels.

    The model is rebuilt from the config stored in the checkpoint. Per frame: <seq>_<frame>_pred.png
    (Cityscapes palette) and <seq>_<frame>_panel.png (image | events | prediction | label). On the test
    split the mIoU over the frames written is printed too.
    """
    from train.predict import predict as run_predict

    s = run_predict(checkpoint, out=out, config=config, split=split, limit=limit, output=output, teacher=teacher,
                    device=device)
    msg = f"{s.frames} {s.split} frame(s), {s.weights} {s.output} output -> {s.out}"
    if s.metrics:
        msg += f" (mIoU {100 * s.metrics['mIoU']:.2f} over {s.metrics['n_classes']} annotated classes)"
    typer.echo(msg)


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


@app.command("inspect")
@reports_input_errors
def inspect_cmd(
    config: ConfigOpt = Path("datasets.yaml"),
    iter_: Annotated[int, typer.Option("--iter", help="Training iteration whose batch to show.")] = 0,
    seed: Annotated[int, typer.Option(help="Training seed (run.seed; batches depend only on seed and iteration).")] = 0,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: inspect_<iter>.png).")] = None,
    batch: Annotated[int, typer.Option(help="Samples per domain to show.")] = 1,
) -> None:
    """Render one PNG of the training pair iteration N feeds the network.

    Rows: source image | label overlay | IC1 | day ISR, and target image | target events | night ISR
    (red = positive, blue = negative). Uses the default data settings and Rare Class Sampling.
    """
    from train.inspect_sample import inspect_iteration

    path = inspect_iteration(config, iteration=iter_, seed=seed, out=out, batch=batch)
    typer.echo(f"wrote {path}")


@app.command()
@reports_input_errors
def sample(
    out: Annotated[Path, typer.Option(help="Folder to (re)create with the synthetic tree.")] = Path("data/sample"),
    config: ConfigOpt = Path("datasets.yaml"),
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
    """
    from pipeline.config import load_config
    from pipeline.sample import generate_sample

    cfg = load_config(config)
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
