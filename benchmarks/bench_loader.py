"""Loader throughput: DSEC night training samples from the Zarr store vs CMDA-style on-the-fly voxelisation.

Both loaders produce the same training sample (warped image + 3-channel normalised events, random
400x400 crop, flip, resized to 512) for the same frames of a synthetic DSEC-like night sequence
(~330 k events per 50 ms window). The on-the-fly baseline does per sample what CMDA's loader does:
open events.h5 and rectify_map.h5, slice the image's event window, rectify, voxelise with torch
put_(accumulate=True), normalise. Ratios are measured in one process with the same worker count.
Samples come in batches of ``--batch`` (2: the trainer's per-domain batch), as the trainer receives
them: with workers, each item crosses the process boundary through shared memory once per batch.
The last table measures whole DACS batches (2 Cityscapes source + 2 DSEC target samples with RCS),
which is what a GPU training step consumes: the source side read from ``cmda cityscapes``'s 1024x512
copies against the same tree read as before them (full-size PNGs resized per sample, datasets.yaml
``cityscapes.resize: [0, 0]``), taking turns in one process; the batches are bit-identical
(tests/test_cityscapes_resized.py). The load average is printed with it (the machine may be shared).

    python benchmarks/bench_loader.py [--workdir DIR] [--samples 48] [--workers 0 2] [--batch 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import load_config
from pipeline.dsec import SequencePaths
from pipeline.voxel import events_norm
from train.config import DataConfig, RcsConfig
from train.data.batches import PairedBatches
from train.data.loaders import NightFrames, augment_target, read_rgb

sys.path.insert(0, str(Path(__file__).parent))
from baselines import torch_put_voxels
from bench_voxel import make_sequence

SEQ = "zurich_city_09_a"


class StoreSamples(Dataset):
    """The cmda way: voxel grid from the Zarr store, events_norm, shared augmentation. Both loaders
    return the same compact sample the trainer's PairedBatches returns (uint8 image, 1-channel events)."""

    def __init__(self, cfg_path: Path, data: DataConfig):
        self.frames = NightFrames(load_config(cfg_path), "train")
        self.data = data

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        image, events, _ = self.frames.load(i)
        image, events = augment_target(image, events, np.random.default_rng(i), self.data)
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(events)


class OnTheFlySamples(StoreSamples):
    """CMDA's way: everything from the raw files, per sample."""

    def __init__(self, cfg_path: Path, data: DataConfig):
        super().__init__(cfg_path, data)
        self.paths = SequencePaths(load_config(cfg_path).dsec.root, SEQ)

    def __getitem__(self, i: int):
        row = self.frames.rows[i]
        image = read_rgb(row.warp_image)
        with h5py.File(self.paths.events, "r") as f:
            a, b = row.event_start, row.event_stop + 1
            x, y, p, t = (f[f"events/{k}"][a:b] for k in "xypt")
        with h5py.File(self.paths.rectify_map, "r") as f:
            rmap = torch.from_numpy(f["rectify_map"][:])
        grid = torch_put_voxels(x, y, p, t, rmap, bins=1).numpy()
        events = events_norm(grid, b - a)
        image, events = augment_target(image, events, np.random.default_rng(i), self.data)
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(events)


def rate(ds: Dataset, n: int, workers: int, batch: int) -> float:
    """Samples/s over ``n`` samples in batches of ``batch`` (0 = one sample per item)."""
    loader = DataLoader(ds, batch_size=batch or None, num_workers=workers, sampler=[i % len(ds) for i in range(n)])
    it = iter(loader)
    next(it)  # worker start-up and first-call costs out of the timing
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    return count * max(batch, 1) / (time.perf_counter() - t0)


def build(work: Path, frames: int, rate_ev: float) -> Path:
    from pipeline.cityscapes import convert_cityscapes
    from pipeline.preprocess import preprocess_sequence
    from pipeline.splits import write_index
    from pipeline.warp import warp_sequence

    cfg_path = work / "datasets.yaml"
    if not (work / "processed" / "index.csv").exists():
        if not cfg_path.exists():
            make_sequence(work, frames, rate_ev)
        cfg = load_config(cfg_path)
        preprocess_sequence(cfg, SEQ)
        warp_sequence(SequencePaths(cfg.dsec.root, SEQ), cfg.dsec.out / SEQ)
        write_index(cfg)
    cfg = load_config(cfg_path)
    convert_cityscapes(cfg.cityscapes.root, cfg.cityscapes.out)  # resumes: writes only what is missing
    return cfg_path


def without_copies(cfg_path: Path) -> Path:
    """The same tree as a loader saw it before the resized copies: ``cityscapes.resize: [0, 0]``."""
    text = cfg_path.read_text().replace("cityscapes:\n", "cityscapes:\n  resize: [0, 0]\n", 1)
    other = cfg_path.with_name("datasets_full_size.yaml")
    other.write_text(text)
    return other


def dacs_rate(cfg_path: Path, data: DataConfig, workers: int, n: int) -> float:
    """Whole DACS batches per second (2 source with RCS + 2 target) in the steady state: the clock
    starts once the batches the workers prefetched while starting up (2 each) have been taken."""
    skip = max(1, 2 * workers)
    pairs = PairedBatches(load_config(cfg_path), data, RcsConfig(), batch=2, seed=0)
    loader = DataLoader(pairs, batch_size=None, num_workers=workers, sampler=range(n + skip))
    it = iter(loader)
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="reuse / keep generated data here")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--rate", type=float, default=6.6e6, help="events/s of the generated night sequence")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=2, help="samples per loader item (0: unbatched)")
    ap.add_argument("--rounds", type=int, default=2, help="turns of the two DACS-batch loaders")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmda-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = build(work, args.frames, args.rate)
    data = DataConfig()
    store, fly = StoreSamples(cfg_path, data), OnTheFlySamples(cfg_path, data)
    mean_events = np.mean([r.event_count for r in store.frames.rows])
    print(f"\n{len(store)} DSEC-like night training frames, {mean_events / 1e3:.0f} k events per window, "
          f"samples of 3x512x512 image + events in batches of {max(args.batch, 1)}\n")
    print(f"{'loader':<44}{'workers':>8}{'samples/s':>11}{'ratio':>8}")
    for w in args.workers:
        r_fly = rate(fly, max(8, args.samples // 4), w, args.batch)
        r_store = rate(store, args.samples, w, args.batch)
        print(f"{'on-the-fly (h5 + rectify + torch put_)':<44}{w:>8}{r_fly:>11.2f}{1.0:>8.1f}")
        print(f"{'cmda Zarr store':<44}{w:>8}{r_store:>11.2f}{r_store / r_fly:>8.1f}")
    w = max(args.workers)
    full = without_copies(cfg_path)
    rates: dict[str, list[float]] = {"full": [], "copies": []}
    for _ in range(args.rounds):  # taking turns against the machine's drift
        rates["full"].append(dacs_rate(full, data, w, args.samples // 2))
        rates["copies"].append(dacs_rate(cfg_path, data, w, args.samples // 2))
    base = float(np.median(rates["full"]))
    print(f"\nfull DACS batches (2 source with RCS + 2 target, 1024x512 source, {w} workers, "
          f"{args.samples // 2} batches x {args.rounds} rounds, median; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs)")
    print(f"{'source read from':<52}{'batches/s':>11}{'s/batch':>9}{'ratio':>8}")
    labels = {"full": "2048x1024 PNGs, PIL resize per sample", "copies": "cmda cityscapes' 1024x512 copies"}
    for key, label in labels.items():
        r = float(np.median(rates[key]))
        print(f"{label:<52}{r:>11.2f}{1 / r:>9.3f}{r / base:>8.2f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
