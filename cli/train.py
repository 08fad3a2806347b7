"""``cmda train``: settings from the command line's layers, then one call into the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.app import (
    app,
    reports_input_errors,
)
from pipeline.errors import STOPPED_EXIT
from train.config import GPU_PRESETS, preset_names, to_dict
from train.engine.loop import train as run_training
from train.engine.resume import TrainRequest, configure


def _lambda(what: str) -> Any:
    return Annotated[float | None, typer.Option(help=f"Weight of the L2 (mse) feature loss {what} (default 0, "
                                                "or the --variant's).", show_default=False)]


@app.command()
@reports_input_errors
def train(
    variant: Annotated[str | None, typer.Option(help="Loss preset: baseline (default), rgb_event_src, fusion_st, "
                                                "rgb_event_src+fusion_st, rgb_st+event_s_rgb_t, rgb_st+event_st, "
                                                "masked_event.", show_default=False)] = None,
    source_only: Annotated[bool, typer.Option("--source-only", help="No adaptation: source pass only "
                                              "(the reference every variant should beat).")] = False,
    supervised: Annotated[bool, typer.Option("--supervised", help="With --target dsec-semantic: train on "
                                             "DSEC-Semantic's own train labels (ESS's supervised setting; = "
                                             "--set data.source=dsec-semantic --source-only).")] = False,
    preset: Annotated[str | None, typer.Option(help="Settings for another machine: cpu-sample (a few minutes "
                                               "on the bundled sample, MiT-B0), or the GPU memory presets 24gb, "
                                               "16gb, 11gb (MiT-B5 at batch 2+2 through --accum and activation "
                                               "checkpointing; estimates until measured, see docs/training.md); "
                                               "cmda-exact (every departure from CMDA's code that a setting "
                                               "can undo, turned to CMDA's). Combine with commas: "
                                               "cpu-sample,cmda-exact.")] = None,
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
    resume: Annotated[Path | None, typer.Option(readable=False,
                                                help="Run folder (its latest checkpoint) or checkpoint file to "
                                                "continue, with the run's own settings.")] = None,
    resume_override: Annotated[bool, typer.Option("--resume-override", help="With --resume: let settings given "
                                                  "here replace the run's (logged in metrics.jsonl, both kept "
                                                  "in config.json); without it a difference is an error.")] = False,
    settings: Annotated[Path | None, typer.Option("--settings", "--config-file", readable=False,
                                                  help="YAML file of TRAINING "
                                                  "settings ({section: {key: value}}, as --set); not the "
                                                  "datasets.yaml.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any setting, e.g. "
                                                   "--set dacs.pseudo_threshold=0.9 (repeatable).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    accum: Annotated[int | None, typer.Option(help="Gradient accumulation: run the batch as N equal micro-batches "
                                              "with one optimiser step (same recipe, less memory; N divides "
                                              "--batch).", show_default=False)] = None,
    mic: Annotated[bool, typer.Option("--mic", help="Masked image consistency over images and events "
                                      "(= --set mic.enabled=true; see docs/methods.md).")] = False,
    device: Annotated[str | None, typer.Option(help="auto (cuda:<LOCAL_RANK> if CUDA is available, else cpu), "
                                               "cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    datasets: Annotated[Path | None, typer.Option("--datasets", "--config", readable=False,
                                                  help="datasets.yaml: where the DATA "
                                                  "is (default ./datasets.yaml; on --resume the run's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out if there is one "
                                            "(its config, log, checkpoints and evaluations are deleted); "
                                            "without it an existing run folder is refused.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and exit.")] = False,
    target: Annotated[str | None, typer.Option(help="Night target: dsec (images + events, default), an "
                                               "image-only target darkzurich / acdc (CMDA's image + ISR model, "
                                               "its cs2dz settings; see docs/training.md), or dsec-semantic "
                                               "(an event-only model, 11 classes, adapted from Cityscapes or "
                                               "--supervised).",
                                               show_default=False)] = None,
) -> None:
    """Train CMDA with DACS self-training (Cityscapes day -> DSEC night, images + events).

    --target darkzurich|acdc trains CMDA's image + ISR model for an image-only night target instead;
    --target dsec-semantic trains the event encoder and head alone on DSEC-Semantic's windows (11 classes),
    adapted from Cityscapes with DACS, or supervised on its train labels with --supervised.

    Defaults reproduce CMDA's published run (MiT-B5, 40k iterations, batch 2+2, crop 512). Settings
    apply in order: defaults, --variant, --preset, --target, --settings, --set, then the dedicated flags.
    Without --out the run goes to runs/<YYYYmmdd-HHMMSS>-<variant>.
    --resume RUN starts from the run's saved settings instead of the defaults; any setting given here
    that differs from them (--device, data.workers, --out and run.keep_ckpts aside) is an error unless
    --resume-override.
    Multi-GPU: torchrun --nproc_per_node N $(which cmda) train ...
    """
    import json
    import os

    flags = {"model.backbone": backbone, "run.iters": iters, "run.batch": batch, "data.crop": crop,
             "optim.lr": lr, "loss.rgb_event_src": lambda_rgb_event_src, "loss.fusion_st": lambda_fusion_st,
             "loss.rgb_st": lambda_rgb_st, "loss.event_s_rgb_t": lambda_event_s_rgb_t,
             "loss.event_st": lambda_event_st, "loss.mask_events": mask_events, "model.pretrained": pretrained,
             "model.cyclegan": cyclegan, "model.init": init, "run.out": out, "run.device": device, "run.seed": seed,
             "data.datasets": datasets.absolute() if datasets is not None else None,
             "run.source_only": True if source_only or supervised else None,
             "data.source": "dsec-semantic" if supervised else None, "run.compile": True if compile_ else None,
             "run.accum": accum, "mic.enabled": True if mic else None}
    cfg, checkpoint = configure(TrainRequest(variant, preset, target, settings, set_ or [], flags, resume))
    if preset and set(preset_names(preset)) & set(GPU_PRESETS) and not cfg.run.device.startswith("cuda"):
        typer.echo(f"note: --preset {preset} only concerns GPU memory; on {cfg.run.device} it changes nothing "
                   "that matters (run.accum and checkpointing are applied all the same)", err=True)
    if dry_run:
        typer.echo(json.dumps(to_dict(cfg), indent=2))
        return
    result = run_training(cfg, resume=checkpoint, override=resume_override, overwrite=overwrite)
    if result.get("stopped") is not None:  # a signal stopped it: not a finished run, for whoever called us
        if int(os.environ.get("RANK", "0")) != 0:
            # Under torchrun only rank 0 says so: torchrun terminates every other process as soon as one
            # exits non-zero, and rank 0 may still be writing the checkpoint the others have left to it.
            raise typer.Exit(0)
        typer.echo(f"stopped at iteration {result['stopped']} of {cfg.run.iters}: not finished; continue with "
                   f"--resume {result['out']}")
        raise typer.Exit(STOPPED_EXIT)
    if result.get("eval"):
        typer.echo(final_score_line(cfg.data.target, result["eval"]["mIoU"]))
    typer.echo(f"run folder: {result['out']}")


def final_score_line(target: str, miou: float) -> str:
    """The last score line: the Quickstart's documented form, or for DSEC-Semantic (where ESS reports another
    mean over the classes) a line that says which mean it is."""
    if target == "dsec-semantic":
        return f"final test mIoU (events, cmda's mean over annotated classes): {100 * miou:.2f}"
    return f"final night mIoU (fusion): {100 * miou:.2f}"
