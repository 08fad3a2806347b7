"""Data commands: build the synthetic sample and every dataset artefact (``dvc repro`` calls these)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import (
    AllOpt,
    ConfigOpt,
    SchedulerOpt,
    SeqOpt,
    WorkersOpt,
    app,
    reports_input_errors,
    sequences,
)
from pipeline.cityscapes import convert_cityscapes
from pipeline.config import load_config
from pipeline.dsec import SequencePaths
from pipeline.errors import InputError
from pipeline.ess_index import write_semantic_index
from pipeline.ess_windows import preprocess_semantic_sequence
from pipeline.ess_windows import store_path as semantic_store_path
from pipeline.preprocess import preprocess_sequence
from pipeline.preprocess import store_path as preprocess_store_path
from pipeline.splits import merge_splits, write_index, write_sequence_split
from pipeline.synthetic.dsec_semantic import generate_semantic_sample
from pipeline.synthetic.night_targets import TARGETS, generate_target
from pipeline.synthetic.sample import generate_sample
from pipeline.warp import warp_sequence

DATASETS = ("dsec", "dsec-semantic")
DatasetOpt = Annotated[str, typer.Option("--dataset", help="dsec (DSEC night, the default) or dsec-semantic "
                                         "(DSEC-Semantic, section dsec_semantic of datasets.yaml).")]


def _dataset(name: str) -> str:
    if name not in DATASETS:
        raise InputError(None, f"unknown --dataset {name!r} (known: {', '.join(DATASETS)})")
    return name


def semantic_sequences(cfg, seq: list[str] | None, all_: bool) -> list[str]:
    """--seq names (checked against dsec_semantic.train/test) or, with --all, every listed sequence."""
    listed = cfg.dsec_semantic.sequences
    if all_ or not seq:
        if not all_:
            raise InputError(cfg.source, "name a DSEC-Semantic sequence with --seq NAME or pass --all")
        if not listed:
            raise InputError(cfg.source, "--all: no sequences are listed under dsec_semantic.train/test")
        return list(listed)
    unknown = [s for s in seq if s not in listed]
    if unknown:
        raise InputError(cfg.source, f"sequence {unknown[0]!r} is not listed under dsec_semantic.train/test "
                                     f"(known: {', '.join(listed) or '(none)'})")
    return list(seq)


def preprocess_semantic(cfg, seq: list[str] | None, all_: bool, scheduler: str | None, workers: int) -> None:
    for name in semantic_sequences(cfg, seq, all_):
        s = preprocess_semantic_sequence(cfg, name, scheduler=scheduler, workers=workers)
        state = ("already complete, nothing to do" if s["status"] == "already complete"
                 else f"{s['labels_written']} windows written")
        typer.echo(f"{name} ({s['split']}, {s['layout']} layout): {state}; {s['labels_stored']} of {s['labels']} "
                   f"labels stored ({s['events_in_windows']:,} events) -> {semantic_store_path(cfg, name)}")


@app.command()
@reports_input_errors
def preprocess(
    seq: SeqOpt = None,
    dataset: DatasetOpt = "dsec",
    all_: AllOpt = False,
    config: ConfigOpt = Path("datasets.yaml"),
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = 0,
) -> None:
    """Voxelise a sequence's events into a Zarr store (index, counts, rectified voxel grids).

    Streams events.h5 in chunks through a Numba kernel, one voxel grid per image window
    (events idx[i-1]..idx[i]), so memory stays bounded whatever the sequence length. Interrupted
    runs resume where they stopped.

    --dataset dsec-semantic: ESS's input per DSEC-Semantic label (dsec_semantic.window: the last N events
    before the label or a fixed duration, in chunks of B-bin voxel grids, 640x440) into
    dsec_semantic.out/<seq>/windows.zarr; --seq takes the names of dsec_semantic.train/test.
    """

    cfg = load_config(config)
    if _dataset(dataset) == "dsec-semantic":
        preprocess_semantic(cfg, seq, all_, scheduler, workers)
        return
    for name in sequences(cfg, seq, all_):
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
    train.txt/val.txt and DAFormer's three RCS JSON files (train split), and resized/<w>x<h>/ copies of
    image, label and IC1 at cityscapes.resize (CMDA's PIL resampling; the training loader reads them).
    The raw root is never written; finished files are skipped, so an interrupted run resumes.
    """

    cfg = load_config(config)
    summary = convert_cityscapes(
        cfg.cityscapes.root, cfg.cityscapes.out, scheduler=scheduler, workers=workers, cmda_compat=cmda_compat,
        resize=cfg.cityscapes.resize,
    )
    typer.echo(
        f"cityscapes: {summary.train} train + {summary.val} val samples in {summary.seconds:.1f} s "
        f"({summary.files_per_s:.1f} files/s) -> {cfg.cityscapes.out}"
    )


@app.command()
@reports_input_errors
def index(
    seq: SeqOpt = None,
    dataset: DatasetOpt = "dsec",
    merge: Annotated[bool, typer.Option("--merge", help="Only merge existing per-sequence splits.")] = False,
    config: ConfigOpt = Path("datasets.yaml"),
) -> None:
    """Write the DSEC night train/test index files (CMDA's two .txt files and our index.csv).

    Split rules come from datasets.yaml: test = labelled frames, train = even frames after the
    labelled range with a valid event window. Needs `cmda preprocess` and `cmda warp` first.
    With --seq, only that sequence's split (splits/<seq>.csv) is written; with --merge, only the
    merged files; with neither, both for every sequence.

    --dataset dsec-semantic writes dsec_semantic.out/index.csv instead: one row per label that
    dsec_semantic.sampling selects (all, or ESS's: first 6 dropped, then every 2nd), from the window
    stores of `cmda preprocess --dataset dsec-semantic`.
    """

    cfg = load_config(config)
    if _dataset(dataset) == "dsec-semantic":
        if seq or merge:
            raise InputError(None, "--seq and --merge are for DSEC night; `cmda index --dataset dsec-semantic` "
                                   "writes the whole index at once")
        counts = write_semantic_index(cfg)
        for split, per_seq in counts.items():
            typer.echo(f"{split}: {sum(per_seq.values())} labels in {len(per_seq)} sequence(s)")
        typer.echo(f"-> {cfg.dsec_semantic.out / 'index.csv'}")
        return
    if seq:
        for name in sequences(cfg, seq, False):
            c = write_sequence_split(cfg, name)
            typer.echo(f"{name}: {c['train']} train, {c['test']} test")
        return
    counts = merge_splits(cfg) if merge else write_index(cfg)
    for name, c in counts.items():
        typer.echo(f"{name}: {c['train']} train, {c['test']} test")
    total_train = sum(c["train"] for c in counts.values())
    total_test = sum(c["test"] for c in counts.values())
    typer.echo(f"total: {total_train} train, {total_test} test -> {cfg.dsec.out}")


@app.command()
@reports_input_errors
def sample(
    out: Annotated[Path | None, typer.Option(help="Folder to (re)create with the synthetic tree (default: "
                                             "data/sample, or data/sample_targets/<target>).")] = None,
    config: ConfigOpt = Path("datasets.yaml"),
    target: Annotated[str, typer.Option(help="dsec (DSEC night + Cityscapes day), dsec-semantic (DSEC-Semantic, "
                                        "default out data/sample_semantic), or an image-only night target in "
                                        "its official layout: darkzurich, acdc.")] = "dsec",
    seed: Annotated[int | None, typer.Option(help="Random seed (default: sample.seed); same seed, same bytes.")] = None,
    frames: Annotated[int | None, typer.Option(help="Images per DSEC sequence at 20 Hz (default: sample.frames).")
                      ] = None,
    event_rate: Annotated[float | None, typer.Option(help="Events per second per sequence (default: "
                                                     "sample.event_rate; real DSEC night is about 6.6e6).")] = None,
    step_us: Annotated[int, typer.Option(help="Render step of the event simulation in microseconds.")] = 5000,
    layout: Annotated[str, typer.Option(help="--target dsec-semantic: official (the zip's layout) or ess (ESS's "
                                        "tree).")] = "official",
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

    --target dsec-semantic writes a DSEC-Semantic tree (events.h5, rectify_map.h5, 11-class 640x440 labels
    and their timestamps) for every sequence of dsec_semantic.train/test; --frames = labels per sequence
    (default sample.semantic.labels).
    """

    cfg = load_config(config)
    if target == "dsec-semantic":
        s = generate_semantic_sample(cfg, out or Path("data/sample_semantic"), seed=seed, labels=frames,
                                     event_rate=event_rate, layout=layout, scheduler=scheduler, workers=workers,
                                     dt_us=step_us)
        for seq in s["sequences"]:
            typer.echo(f"{seq['sequence']}: {s['labels_per_sequence']} labels, {seq['events']:,} events")
        typer.echo(f"dsec-semantic ({s['layout']} layout) written to {s['out']} in {s['seconds']:.1f} s "
                   "(SYNTHETIC data, see its README.md)")
        return
    if target != "dsec":

        if target not in TARGETS:
            raise InputError(None, f"unknown --target {target!r} (known: dsec, dsec-semantic, {', '.join(TARGETS)})")
        s = generate_target(cfg, target, out or Path("data/sample_targets") / target, seed=seed,
                            scheduler=scheduler, workers=workers)
        counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
        typer.echo(f"{target}: {counts} images ({s['size'][0]}x{s['size'][1]}, {s['labelled']} labelled) written "
                   f"to {s['out']} in {s['seconds']:.1f} s (SYNTHETIC data, see its README.md)")
        return

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

    cfg = load_config(config)
    for name in sequences(cfg, seq, all_):
        s = warp_sequence(SequencePaths(cfg.dsec.root, name), cfg.dsec.out / name, scheduler=scheduler,
                          workers=workers, png=cfg.dsec.warp_png)
        typer.echo(f"{name}: {s['written']} warped, {s['skipped']} already there ({s['images']} images) "
                   f"in {s['seconds']:.1f} s -> {s['out']}")
