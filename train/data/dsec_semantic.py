"""DSEC-Semantic as training and evaluation data for an event-only model (docs/dsec-semantic.md).

Each sample is a label of ``dsec_semantic.out/index.csv`` and its precomputed window (ESS's input: ``chunks x
bins`` voxel channels, 640x440, from ``cmda preprocess --dataset dsec-semantic``; with ``dsec_semantic.window.kind``
``chunks x channels`` of that kind, scaled as :func:`train.data.events_input.network_events` scales the kind's
frames), so a sample is one decompression instead of ESS's 2 M-event slicing. Training crops a
``data.target_crop`` square (at most the 440 rows) at a uniform position, flips it and resizes it to ``data.crop``
(labels: nearest), the target augmentation cmda uses on DSEC night; evaluation takes the whole 640x440 window
and its label unchanged (ESS compares at 640x440).

:class:`SemanticBatches` is the run's batch source for ``data.target=dsec-semantic``:

* supervised (``data.source=dsec-semantic``, ESS's supervised setting): ``source_events`` + ``source_label``
  from the train sequences' labelled windows;
* adapted (``data.source=cityscapes``): Cityscapes exactly as :class:`train.data.batches.PairedBatches` draws it
  (RCS, crop, flip, IC1), its trainIds mapped to the 11 classes (:data:`pipeline.dsec_semantic.CITYSCAPES_TO_11`),
  plus ``target_events``, the unlabelled train windows; the source image itself is not sent (an event-only
  model never sees it; its "events" are the IC1 or the CycleGAN's translation, made on the device).

Randomness is a pure function of (seed, iteration, slot), as in PairedBatches.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import DatasetsConfig
from pipeline.dsec_semantic import LABEL_HEIGHT, LABEL_WIDTH, cityscapes_lut, read_label
from pipeline.errors import InputError
from pipeline.ess_index import SemanticRow, index_path, open_store, read_semantic_index
from pipeline.ess_windows import chunk_channels
from pipeline.store import VoxelStore
from train.config import DataConfig
from train.data.events_input import network_events
from train.data.loaders import hflip, index_base, resize_channels


def window_channels(cfg: DatasetsConfig) -> int:
    """Channels of one window (``chunks x bins`` of ``dsec_semantic.window``, or ``chunks x`` the channels of its
    ``kind``): the event encoder's input."""
    w = cfg.dsec_semantic.window
    return w.chunks * chunk_channels(w)


def window_input(cfg: DatasetsConfig, window: np.ndarray) -> np.ndarray:
    """A stored window as network input: the voxel grid as stored (ESS feeds it unnormalised); another kind
    float32, scaled as its night frames are (histogram counts / cutoff, MDES sums / cutoff, the rest as stored)."""
    kind = cfg.dsec_semantic.window.kind
    return window if kind is None else network_events(kind, window, 0)


class SemanticWindows:
    """The labelled windows of one split of ``index.csv``, their stores opened lazily (once per worker)."""

    def __init__(self, cfg: DatasetsConfig, split: str):
        self.cfg = cfg
        self.rows: list[SemanticRow] = read_semantic_index(index_path(cfg), split)
        if not self.rows:
            raise InputError(index_path(cfg), f"no {split} labels (check dsec_semantic in datasets.yaml and "
                                              "`cmda index --dataset dsec-semantic`)")
        self.base = index_base(cfg)
        self.stores: dict[str, VoxelStore | None] = {r.sequence: None for r in self.rows}

    def store(self, seq: str) -> VoxelStore:
        if self.stores[seq] is None:
            self.stores[seq] = open_store(self.cfg, seq)  # checks the window settings it was built with
        return self.stores[seq]  # type: ignore[return-value]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, SemanticRow]:
        """Window float32 (chunks*channels, 440, 640), as :func:`window_input` gives it, and label uint8 (440, 640)
        of row ``i``."""
        row = self.rows[i]
        window = window_input(self.cfg, self.store(row.sequence).voxels(row.label))
        label = read_label(self.base / row.label_file)
        if window.shape[1:] != label.shape:
            raise InputError(self.store(row.sequence).path, f"window is {window.shape[2]}x{window.shape[1]}, "
                                                            f"its label {LABEL_WIDTH}x{LABEL_HEIGHT}")
        return window, label, row

    def __len__(self) -> int:
        return len(self.rows)


def augment_window(events: np.ndarray, label: np.ndarray, rng: np.random.Generator, data: DataConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One random square crop (``data.target_crop``, at most the 440 rows), flip, resize to ``data.crop``."""
    h, w = label.shape
    c = min(data.target_crop, h, w)
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    flip = rng.random() < data.flip
    size = (data.crop, data.crop)
    events = resize_channels(np.ascontiguousarray(events[:, y:y + c, x:x + c]), size)
    label = cv2.resize(np.ascontiguousarray(label[y:y + c, x:x + c]), size, interpolation=cv2.INTER_NEAREST)
    if flip:
        return hflip(events, chw=True), hflip(label)
    return events, label


class SemanticBatches(Dataset):
    """Item ``it`` = the whole batch of iteration ``it`` of an event-only run (see the module docstring)."""

    def __init__(self, cfg: DatasetsConfig, data: DataConfig, batch: int, seed: int, source: Dataset | None,
                 with_target: bool = True):
        """``source``: the Cityscapes batches (a :class:`train.data.batches.PairedBatches` without target) of an
        adapted run, None for a supervised one (``data.source=dsec-semantic``)."""
        self.data, self.batch, self.seed = data, batch, seed
        self.supervised = data.source == "dsec-semantic"
        self.source = None if self.supervised else source
        if not self.supervised and source is None:
            raise InputError(None, "an adapted DSEC-Semantic run needs the Cityscapes batches as its source")
        self.windows = SemanticWindows(cfg, "train") if self.supervised or with_target else None
        self.with_target = with_target and not self.supervised
        self.lut = torch.from_numpy(cityscapes_lut().astype(np.int64))

    def __len__(self) -> int:
        return 2**31 - 1

    def _windows(self, it: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        events, labels = [], []
        for b in range(self.batch):
            rng = np.random.default_rng([self.seed, int(it), b, slot])
            window, label, _ = self.windows.load(int(rng.integers(len(self.windows))))  # type: ignore[union-attr]
            window, label = augment_window(window, label, rng, self.data)
            events.append(window)
            labels.append(label.astype(np.int64))
        return np.stack(events), np.stack(labels)

    def __getitem__(self, it: int) -> dict[str, torch.Tensor]:
        if self.supervised:
            events, labels = self._windows(it, 0)
            return {"source_events": torch.from_numpy(events), "source_label": torch.from_numpy(labels)}
        src = self.source[it]  # type: ignore[index]
        out = {"source_label": self.lut[src["source_label"].clamp(0, 255)], "source_ic1": src["source_ic1"]}
        if self.with_target:
            out["target_events"] = torch.from_numpy(self._windows(it, 1)[0])
        return out


class SemanticTest(Dataset):
    """The labelled windows of a split, whole (640x440), for evaluation: ``events``, ``label``, ``name``."""

    def __init__(self, cfg: DatasetsConfig, split: str = "test", limit: int = 0):
        self.windows = SemanticWindows(cfg, split)
        self.n = min(limit, len(self.windows)) if limit else len(self.windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        window, label, row = self.windows.load(i)
        return {"events": torch.from_numpy(np.array(window, np.float32)),
                "label": torch.from_numpy(label.astype(np.int64)), "name": f"{row.sequence}_{row.label:06d}"}
