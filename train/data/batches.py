"""The batches a run trains and is scored on: both domains paired per iteration, and the night test set.

Randomness is a pure function of (seed, iteration, slot): :class:`PairedBatches` returns the whole
source + target batch of iteration ``it`` from ``np.random.default_rng([seed, it, ...])``. Any number
of loader workers, and a resumed run, therefore see exactly the same batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from train.config import DataConfig, RcsConfig, TrainConfig, event_only, image_only
from train.data.dsec_semantic import SemanticBatches, SemanticTest
from train.data.events_input import EventInput
from train.data.image_only import NightTargetEval, NightTargetTrain
from train.data.isr import DIRECTIONS, cmda_direction
from train.data.loaders import CityscapesTrain, NightFrames, NightTest, SourceFile, augment_source, augment_target
from train.data.rcs import RareClassSampler


def night_eval_set(dcfg: DatasetsConfig, cfg: TrainConfig, limit: int = 0, events: EventInput | None = None
                   ) -> Dataset:
    """The labelled night frames a run is scored on: DSEC's test frames (with ``events``, the run's
    representation; None: CMDA's voxel grid), an image-only target's val split, or DSEC-Semantic's test windows."""
    if event_only(cfg):
        return SemanticTest(dcfg, "test", limit=limit)
    if image_only(cfg):
        return NightTargetEval(dcfg, cfg.data, "val", limit=limit)
    return NightTest(dcfg, cfg.data, limit=limit, events=events)


class PairedBatches(Dataset):
    """Item ``it`` = the whole batch of iteration ``it``: source (RCS) and target (uniform) samples.

    Compact tensors (see :func:`network_batch`): ``source_image``/``target_image`` uint8
    (B, 3, H, W), ``source_label`` int64 (B, H, W), ``source_ic1`` uint8 (B, 1, H, W),
    ``target_events`` float32 (B, channels, H, W) of the run's representation (``events``); for an
    image-only target (``data.target`` darkzurich or acdc) ``target_events`` is the night image's ISR,
    (B, 1, H, W) (:mod:`train.data.image_only`).

    Use with ``DataLoader(batch_size=None, sampler=range(start, iters))``; randomness depends only
    on (seed, it), so workers and resumed runs reproduce the same batches.
    """

    def __init__(self, cfg: DatasetsConfig, data: DataConfig, rcs: RcsConfig, batch: int, seed: int,
                 with_target: bool = True, events: EventInput | None = None):
        self.data, self.rcs, self.batch, self.seed = data, rcs, batch, seed
        self.source = CityscapesTrain(cfg)
        self.target: NightFrames | NightTargetTrain | None = None
        self.augment = augment_target
        if with_target and data.target == "dsec":
            self.target = NightFrames(cfg, "train", data, events)
        elif with_target:  # an image-only target: its ISR takes the events' place in the batch
            self.target = NightTargetTrain(cfg, data)
            self.augment = self.target.augment
        self.sampler = (RareClassSampler(self.source.stats_dir, rcs.temperature, rcs.min_pixels, seed=seed)
                        if rcs.enabled else None)

    def __len__(self) -> int:  # iterations are unbounded; the sampler bounds them
        return 2**31 - 1

    def _source_file(self, rng: np.random.Generator) -> tuple[SourceFile, int | None]:
        if self.sampler is None:
            return self.source.files[int(rng.integers(len(self.source.files)))], None
        c = int(self.sampler.classes[rng.choice(len(self.sampler.classes), p=self.sampler.probs)])
        files = self.sampler.samples_with_class[c]
        label = Path(files[int(rng.integers(len(files)))]).resolve()
        if label not in self.source.by_label:
            raise InputError(self.sampler.source, f"RCS entry {label} is not in train.txt")
        return self.source.by_label[label], c

    def __getitem__(self, it: int) -> dict[str, torch.Tensor]:
        src_img, src_lbl, src_ic1, tgt_img, tgt_evt = [], [], [], [], []
        cmda_dirs = self.data.isr_direction == "cmda" and self.augment is augment_target
        src_dir, tgt_dir = [], []
        for b in range(self.batch):
            rng = np.random.default_rng([self.seed, int(it), b, 0])
            f, c = self._source_file(rng)
            image, label, ic1 = self.source.load(f, self.data.source_resize, self.data.source_resize_impl)
            drawn: dict[str, int] = {}
            image, label, ic1 = augment_source(image, label, ic1, rng, self.data, c, self.rcs, drawn)
            src_dir.append(DIRECTIONS.index(cmda_direction(drawn["x"], drawn["flip"])))
            src_img.append(image.transpose(2, 0, 1))
            src_lbl.append(label.astype(np.int64))
            src_ic1.append(ic1[None])
            if self.target is not None:
                rng_t = np.random.default_rng([self.seed, int(it), b, 1])
                image, events, _ = self.target.load(int(rng_t.integers(len(self.target))))
                if cmda_dirs:
                    image, events = augment_target(image, events, rng_t, self.data, drawn)
                    tgt_dir.append(DIRECTIONS.index(cmda_direction(drawn["x"], drawn["y"])))
                else:
                    image, events = self.augment(image, events, rng_t, self.data)
                tgt_img.append(image.transpose(2, 0, 1))
                tgt_evt.append(events)
        out = {
            "source_image": torch.from_numpy(np.stack(src_img)),
            "source_label": torch.from_numpy(np.stack(src_lbl)),
            "source_ic1": torch.from_numpy(np.stack(src_ic1)),
        }
        if self.target is not None:
            out["target_image"] = torch.from_numpy(np.stack(tgt_img))
            out["target_events"] = torch.from_numpy(np.stack(tgt_evt))
        if cmda_dirs:  # CMDA's ISR shift directions, as indices into DIRECTIONS (train.uda.targets reads them)
            out["source_isr_dir"] = torch.tensor(src_dir, dtype=torch.int64)
            if tgt_dir:
                out["target_isr_dir"] = torch.tensor(tgt_dir, dtype=torch.int64)
        return out


def training_batches(dcfg: DatasetsConfig, cfg: TrainConfig, seed: int, events: EventInput | None = None
                     ) -> Dataset:
    """The run's batch source, chosen once: :class:`PairedBatches` (``events``: the run's representation), or
    for DSEC-Semantic :class:`train.data.dsec_semantic.SemanticBatches` (supervised, or Cityscapes adapted to
    its windows)."""
    with_target = not cfg.run.source_only
    if not event_only(cfg):
        return PairedBatches(dcfg, cfg.data, cfg.rcs, cfg.run.batch, seed, with_target=with_target, events=events)
    source = None if cfg.data.source == "dsec-semantic" else PairedBatches(dcfg, cfg.data, cfg.rcs, cfg.run.batch,
                                                                           seed, with_target=False)
    return SemanticBatches(dcfg, cfg.data, cfg.run.batch, seed, source, with_target=with_target)
