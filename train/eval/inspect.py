"""``cmda inspect``: one PNG of the training pair an iteration feeds the network.

Users asked to *see* what the network gets. This takes iteration N's batch from
:class:`train.data.PairedBatches` (the same pure function of (seed, iteration) the trainer reads, so
the picture is exactly that iteration's data), computes the two Image Content (ISR) inputs the loop
computes on the device, and lays out per sample::

    header: iteration, seed, sample
    source image | source label overlay | IC1 (image change) | day ISR
    target image | target events        | night ISR
    ClassMix: pasted source classes | mixed image

Signed inputs (IC1, events, ISR, all in [-1, 1]) use :func:`train.eval.visualize.events_to_rgb`: red
positive, blue negative, white zero. Not shown: the CycleGAN "source events" (they need the
generator weights), the mixed label and events (they need the teacher's pseudo-labels and those source
events) and DSRNSS's tail-bank paste (it needs the bank the previous iterations filled). The ClassMix row
shows the mask on the source label and the mixed image before colour jitter; with ``dsr.enabled`` (and
``dsr.grouped_mix``) it is DSRNSS's grouped ClassMix, the picked classes' companions included. With
``mic.enabled`` (``--set mic.enabled=true``) a last row shows the MIC pass's masked target image, masked
events and the ISR of the masked image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import write_png
from pipeline.config import load_config
from pipeline.errors import InputError
from train.config import DataConfig, RcsConfig, TrainConfig
from train.data.batches import PairedBatches
from train.data.isr import ISR_DAY, ISR_NIGHT, image_content, random_directions
from train.data.loaders import network_batch
from train.eval.visualize import denormalize, events_to_rgb, overlay, panel, stack, title_strip
from train.uda.components.mic import masked_inputs
from train.uda.method import grouped_or_plain
from train.uda.mixing import mix, strong_augment

SOURCE_TITLES = ("source image", "source label", "IC1", "day ISR")
TARGET_TITLES = ("target image", "target events", "night ISR")
MIX_TITLES = ("ClassMix: pasted source classes", "mixed image (before jitter)")
GROUPED_MIX_TITLES = ("grouped ClassMix (DSRNSS): pasted classes", "mixed image (before jitter)")
MIC_TITLES = ("MIC: masked target image", "MIC: masked events", "MIC: ISR of the masked image")


def mic_batch(items: dict[str, torch.Tensor], cfg: TrainConfig, iteration: int, seed: int) -> dict[str, torch.Tensor]:
    """The MIC pass's inputs (``mic.*``: jitter + blur, block mask on image and events, ISR) for the
    target batch. The draws are seeded by (seed, iteration) but not in the loop's order, so this is
    *a* mask of that iteration's kind, not necessarily the exact one the run drew."""
    torch.manual_seed(seed * 1_000_003 + iteration)
    m = masked_inputs(items["target_image"], items["target_events"], cfg.mic,
                      random_directions(len(items["target_image"])), lambda im: strong_augment(cfg.dacs, im))
    return {"mic_image": m.image, "mic_events": m.events, "mic_isr": m.isr}


def mix_batch(items: dict[str, torch.Tensor], cfg: TrainConfig, iteration: int, seed: int) -> dict[str, torch.Tensor]:
    """The ClassMix mask (``dsr``'s grouped one when on) and mixed image of the batch, as the loop's
    ``_mix`` draws them (source labels only). Seeded by (seed, iteration), not in the loop's order:
    *a* mask of that iteration's kind."""
    torch.manual_seed(seed * 1_000_003 + iteration + 1)
    # the step's own choice between CMDA's and DSRNSS's grouped ClassMix
    mask = grouped_or_plain(cfg)(items["source_label"], cfg.dacs.classmix_per_sample)
    return {"mix_mask": mask, "mix_image": mix(mask, items["source_image"], items["target_image"]),
            "mix_grouped": cfg.dsr.enabled and cfg.dsr.grouped_mix}


def batch_isr(batch: dict[str, torch.Tensor], direction: str = "rightdown") -> dict[str, torch.Tensor]:
    """Day ISR of the source images and night ISR of the target images (``[B, 3, H, W]`` in [-1, 1]),
    from a raw :class:`PairedBatches` item (uint8 images), as the training loop computes them."""
    out = {"source_isr": image_content(batch["source_image"], ISR_DAY, direction)}
    if "target_image" in batch:
        out["target_isr"] = image_content(batch["target_image"], ISR_NIGHT, direction)
    return out


def render_batch(batch: dict[str, Any], header: str = "") -> np.ndarray:
    """The inspect picture of a batch that already holds ``source_isr`` / ``target_isr`` (see
    :func:`batch_isr`): for each sample a header strip, the source row and the target row."""
    rows: list[np.ndarray] = []
    n = len(batch["source_image"])
    for b in range(n):
        src = denormalize(batch["source_image"][b])
        label = np.asarray(batch["source_label"][b])
        source_row = panel(list(zip(SOURCE_TITLES, (
            src, overlay(src, label), events_to_rgb(batch["source_ic1"][b]), events_to_rgb(batch["source_isr"][b]),
        ), strict=True)))
        sample_rows = [source_row]
        if "target_image" in batch:
            sample_rows.append(panel(list(zip(TARGET_TITLES, (
                denormalize(batch["target_image"][b]), events_to_rgb(batch["target_events"][b]),
                events_to_rgb(batch["target_isr"][b]),
            ), strict=True))))
        if "mix_image" in batch:
            src = denormalize(batch["source_image"][b])
            pasted = np.where(np.asarray(batch["mix_mask"][b, 0]) > 0, label, 255)
            titles = GROUPED_MIX_TITLES if batch.get("mix_grouped") else MIX_TITLES
            sample_rows.append(panel(list(zip(titles, (
                overlay(src, pasted, alpha=0.7), denormalize(batch["mix_image"][b]),
            ), strict=True))))
        if "mic_image" in batch:
            sample_rows.append(panel(list(zip(MIC_TITLES, (
                denormalize(batch["mic_image"][b]), events_to_rgb(batch["mic_events"][b]),
                events_to_rgb(batch["mic_isr"][b]),
            ), strict=True))))
        width = max(r.shape[1] for r in sample_rows)
        text = f"{header}, sample {b + 1}/{n}" if header else f"sample {b + 1}/{n}"
        rows.append(stack([title_strip(text, width), *sample_rows], gap=0))
    return stack(rows, gap=8)


def inspect_iteration(config: str | Path = "datasets.yaml", iteration: int = 0, seed: int = 0,
                      out: str | Path | None = None, batch: int = 1, direction: str = "rightdown",
                      data: DataConfig | None = None, rcs: RcsConfig | None = None,
                      train_cfg: TrainConfig | None = None) -> Path:
    """Render iteration ``iteration``'s batch (``data``/``rcs`` settings, default ones if None; ``batch``
    samples per domain) to ``out`` (default ``runs/inspect/iter_<N>_seed_<S>.png``); returns the path."""
    if iteration < 0:
        raise InputError(None, f"--iter must be >= 0, got {iteration}")
    if batch < 1:
        raise InputError(None, f"--batch must be >= 1, got {batch}")
    cfg = load_config(config)
    batches = PairedBatches(cfg, data or DataConfig(), rcs or RcsConfig(), batch=batch, seed=seed)
    raw = batches[iteration]
    items = network_batch(raw)
    items.update(batch_isr(raw, direction))
    if "target_image" in items:
        items.update(mix_batch(items, train_cfg or TrainConfig(), iteration, seed))
    if train_cfg is not None and train_cfg.mic.enabled and "target_image" in items:
        items.update(mic_batch(items, train_cfg, iteration, seed))
    picture = render_batch(items, header=f"iteration {iteration}, seed {seed}")
    path = Path(out) if out is not None else Path("runs") / "inspect" / f"iter_{iteration:06d}_seed_{seed}.png"
    write_png(path, picture)
    return path
