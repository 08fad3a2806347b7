"""Training and test data for both domains, read from the pipeline's artefacts.

* Target (DSEC night): warped image PNG + the frame's voxel grid from the Zarr store, normalised
  with :func:`pipeline.voxel.events_norm` (3 channels for 1 bin). Train: random 400x400 crop at
  x in [0, 240], y in [0, 80], flip, resize to 512. Test: top 440 rows, no augmentation, + label.
* Source (Cityscapes day): image resized 2048x1024 -> 1024x512 as PIL's antialiased bilinear
  (label: PIL's nearest; read from ``cmda cityscapes``'s resized copies when they are at that
  size), random 512 crop (DAFormer's cat_max_ratio rule only when set), flip; trainId label; IC1
  image-change input. Rare Class Sampling picks the file and re-crops until the sampled class is present.

Randomness is a pure function of (seed, iteration, slot): :class:`PairedBatches` returns the whole
source + target batch of iteration ``it`` from ``np.random.default_rng([seed, it, ...])``. Any
number of loader workers, and a resumed run, therefore see exactly the same batches.

Training batches stay compact until they reach the device (uint8 images and IC1, one event
channel: ~4x fewer bytes through the loader and host-to-device copy); :func:`network_batch`
turns them into network inputs there (ImageNet normalisation, 3-channel events and IC1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cityscapes import ResizedPaths, Sample, read_split, resized_paths, sample_paths
from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from pipeline.resample import resize_pil_bilinear, resize_pil_nearest
from pipeline.splits import Row, read_index
from train import common
from train.common import IGNORE
from train.config import DataConfig, RcsConfig
from train.data.events_input import EventInput, FrameReader, voxel_input
from train.data.rcs import choose_crop

# train.common's normalisation (CMDA/DAFormer, on the 0..255 scale) as float32 arrays for the NumPy loaders
IMAGENET_MEAN = np.array(common.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(common.IMAGENET_STD, np.float32)


# ---------------------------------------------------------------------- small pure helpers
def read_rgb(path: str | Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(path, "image missing or unreadable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_grey(path: str | Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(path, "image missing or unreadable")
    if img.ndim == 3:
        img = img[..., 0]
    return img


def check_label(label: np.ndarray, path: str | Path, num_classes: int = 19) -> np.ndarray:
    """A trainId label must hold only 0..num_classes-1 and 255 (ignore); anything else would crash
    the loss or the confusion matrix far from the file, so it is an InputError naming the file."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        values = np.unique(label[bad])
        raise InputError(path, f"label holds value {int(values[0])} at {int(bad.sum())} pixel(s) "
                         f"(trainIds are 0-{num_classes - 1} and {IGNORE}; values: {values[:8].tolist()})")
    return label


def normalize_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, ImageNet mean/std (the normalisation the MiT weights expect)."""
    return ((rgb.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def three_channels(events: np.ndarray) -> np.ndarray:
    """1-bin events (1, H, W) -> (3, H, W), as CMDA feeds them; more bins pass through."""
    return np.repeat(events, 3, axis=0) if events.shape[0] == 1 else events


def resize(a: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an HW or HWC image to ``size`` = (w, h) with cv2 (bilinear: half-pixel centres, no
    antialiasing). Used where the picture is enlarged (the target crops), where that is PIL's result too."""
    return cv2.resize(a, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def resize_channels(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a CHW float array (events) to ``size`` = (w, h), channel by channel."""
    if a.shape[0] == 1:
        return cv2.resize(a[0], size, interpolation=cv2.INTER_LINEAR)[None]
    return np.stack([cv2.resize(c, size, interpolation=cv2.INTER_LINEAR) for c in a])


def hflip(a: np.ndarray, chw: bool = False) -> np.ndarray:
    """Horizontal flip of an HW / HWC image (or a CHW stack with ``chw=True``), as a new contiguous array.

    ``cv2.flip`` rather than ``np.ascontiguousarray(a[:, ::-1])``: NumPy's negative-stride copy of
    a 512x512x3 uint8 crop takes ~1.8 ms, OpenCV's ~0.05 ms (a third of a loader sample's time).
    """
    if chw:
        return np.stack([cv2.flip(np.ascontiguousarray(c), 1) for c in a])
    return cv2.flip(a, 1).reshape(a.shape)


def crop_max_ratio(label: np.ndarray, size: int, rng: np.random.Generator, cat_max_ratio: float,
                   tries: int = 10) -> tuple[int, int]:
    """Top-left (y, x) of a random crop; re-drawn while one class covers more than ``cat_max_ratio``.

    DAFormer's rule: accept a crop with more than one non-ignored class whose largest class share
    is below the ratio; after ``tries`` draws keep the last one.
    """
    h, w = label.shape
    my, mx = max(h - size, 0), max(w - size, 0)
    y, x = int(rng.integers(my + 1)), int(rng.integers(mx + 1))
    if cat_max_ratio >= 1:
        return y, x
    for _ in range(tries):
        crop = label[y:y + size, x:x + size]
        counts = np.bincount(crop[crop != IGNORE].ravel(), minlength=1)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y, x = int(rng.integers(my + 1)), int(rng.integers(mx + 1))
    return y, x


# ---------------------------------------------------------------------- target domain
def index_base(cfg: DatasetsConfig) -> Path:
    """The folder relative paths in index.csv are relative to: the datasets.yaml's folder (as every
    path inside datasets.yaml is), so ``--datasets`` works from any working directory."""
    return Path(cfg.source).parent if getattr(cfg, "source", None) else Path(".")


def resolve_row(row: Row, base: Path) -> Row:
    """``row`` with its relative file paths joined to ``base`` (absolute paths and "" kept)."""
    def join(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str(base / p)

    return replace(row, image=join(row.image), warp_image=join(row.warp_image), label=join(row.label),
                   store=join(row.store))


def clip_count(events_in_window: int, cmda: bool) -> int:
    """The N of events_norm's clip ``N / 500000 * 1.5``: the events of the inclusive window
    ``idx_{i-1} .. idx_i``, or with ``cmda`` CMDA's ``finish - start`` (one fewer; XiaRho/CMDA 9d25129,
    mmseg/datasets/dsec.py)."""
    return max(events_in_window - 1, 0) if cmda else events_in_window


class NightFrames:
    """The DSEC night frames of one split, with their event stores (of the run's representation) opened once."""

    def __init__(self, cfg: DatasetsConfig, split: str, data: DataConfig | None = None,
                 events: EventInput | None = None):
        self.cfg = cfg
        self.events = events or voxel_input(cfg)
        # events_norm as CMDA computes it (docs/fidelity.md): -1 for an empty part, finish - start events
        self.cmda_empty_part = bool(data and data.cmda_empty_part)
        self.cmda_count = bool(data and data.event_count == "cmda")
        self.rows: list[Row] = [resolve_row(r, index_base(cfg)) for r in read_index(cfg.dsec.out / "index.csv", split)]
        if not self.rows:
            raise InputError(cfg.dsec.out / "index.csv", f"no {split} frames (check datasets.yaml and `cmda index`)")
        # One read-only Zarr handle per store, opened lazily so each loader worker process opens its
        # own; they live as long as this object (no OS file handles are held between reads).
        self.stores: dict[str, FrameReader | None] = {r.store: None for r in self.rows}
        if self.events.kind != "voxel":  # a missing or mismatched store of another kind: refused before any work
            for path in self.stores:
                self.events.open(path)

    def store(self, path: str) -> FrameReader:
        """The run's representation store of the sequence whose voxel store is ``path``."""
        if self.stores[path] is None:
            self.stores[path] = self.events.open(path)
        return self.stores[path]  # type: ignore[return-value]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, Row]:
        """Warped RGB image (480, 640, 3) uint8 and the normalised event frame (channels, 480, 640) float32."""
        row = self.rows[i]
        image = read_rgb(row.warp_image)
        events = self.store(row.store).events(row.frame, clip_count(row.event_count, self.cmda_count),
                                              cmda_empty_part=self.cmda_empty_part)
        if image.shape[:2] != events.shape[1:]:
            raise InputError(row.warp_image, f"image is {image.shape[1]}x{image.shape[0]}, events are "
                             f"{events.shape[2]}x{events.shape[1]}")
        return image, events, row

    def __len__(self) -> int:
        return len(self.rows)


def augment_target(image: np.ndarray, events: np.ndarray, rng: np.random.Generator, cfg: DataConfig,
                   drawn: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CMDA's target augmentation: one crop/flip applied to image and events alike, then resize
    (``drawn``, if given, receives the crop offset ``x``, ``y``: CMDA's ISR direction rule uses them).

    Resizing the crop view first and flipping the small result is the same picture as CMDA's
    crop -> flip -> resize (bilinear resizing commutes with a horizontal flip) without copying the
    flipped full-size crop.
    """
    c = cfg.target_crop
    x = int(rng.integers(cfg.target_crop_x[0], cfg.target_crop_x[1] + 1))
    y = int(rng.integers(cfg.target_crop_y[0], cfg.target_crop_y[1] + 1))
    flip = rng.random() < cfg.flip
    if drawn is not None:
        drawn.update(x=x, y=y)
    size = (cfg.crop, cfg.crop)
    image = resize(image[y:y + c, x:x + c], size)
    events = resize_channels(events[:, y:y + c, x:x + c], size)
    if flip:
        image, events = hflip(image), hflip(events, chw=True)
    return image, events


class NightTest(Dataset):
    """Test frames: image and events cropped to the top rows (440), label with 255 = ignore."""

    def __init__(self, cfg: DatasetsConfig, data: DataConfig, limit: int = 0, events: EventInput | None = None):
        self.frames = NightFrames(cfg, "test", data, events)
        self.rows = self.frames.rows[:limit] if limit else self.frames.rows
        self.top = data.test_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        image, events, row = self.frames.load(i)
        label = check_label(read_grey(row.label), row.label)
        if label.shape != image.shape[:2]:
            raise InputError(row.label, f"label is {label.shape[1]}x{label.shape[0]}, image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        t = self.top
        return {
            "image": torch.from_numpy(normalize_image(image[:t])),
            "events": torch.from_numpy(np.ascontiguousarray(three_channels(events[:, :t]))),
            "label": torch.from_numpy(label[:t].astype(np.int64)),
            "name": f"{row.sequence}_{row.frame:06d}",
        }


# ---------------------------------------------------------------------- source domain
@dataclass(frozen=True)
class SourceFile:
    """A Cityscapes sample's full-size files and, when ``cmda cityscapes`` wrote them, its copies at
    ``resized_size`` (w, h): image, label and IC1 already shrunk with CMDA's PIL resampling."""

    image: Path
    label: Path
    ic1: Path
    resized: ResizedPaths | None = None
    resized_size: tuple[int, int] = (0, 0)


def source_file(root: Path, out: Path, s: Sample, resize: tuple[int, int]) -> SourceFile:
    """A sample's files; its ``resize`` copies are used only when all three exist (trees converted
    before they were written, or with ``cityscapes.resize: [0, 0]``, resize every sample)."""
    p = sample_paths(root, out, s)
    r = resized_paths(out, s, resize) if min(resize) > 0 else None
    if r is None or not (r.image.exists() and r.label.exists() and r.ic1.exists()):
        return SourceFile(p.image, p.label, p.ic1)
    return SourceFile(p.image, p.label, p.ic1, r, tuple(resize))


def _load_resized(f: SourceFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = f.resized
    assert r is not None
    image, label, ic1 = read_rgb(r.image), check_label(read_grey(r.label), r.label), read_grey(r.ic1)
    want = f.resized_size[::-1]
    for path, a in ((r.image, image), (r.label, label), (r.ic1, ic1)):
        if a.shape[:2] != want:
            raise InputError(path, f"resized copy is {a.shape[1]}x{a.shape[0]}, its folder says "
                             f"{want[1]}x{want[0]} (delete it and rerun `cmda cityscapes`)")
    return image, label, ic1


class CityscapesTrain:
    """Cityscapes train files from ``cmda cityscapes`` output (labels, IC1, resized copies) and the raw images."""

    def __init__(self, cfg: DatasetsConfig):
        root, out = cfg.cityscapes.root, cfg.cityscapes.out
        self.files: list[SourceFile] = []
        for entry in read_split(out, "train"):
            city, name = entry.split("/", 1)
            self.files.append(source_file(root, out, Sample("train", city, name), cfg.cityscapes.resize))
        if not self.files:
            raise InputError(out / "train.txt", "no training samples")
        self.by_label = {f.label.resolve(): f for f in self.files}
        self.stats_dir = out

    @staticmethod
    def load(f: SourceFile, resize_to: tuple[int, int], source_resize_impl: str = "pil"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image (h, w, 3) uint8, label (h, w) uint8, IC1 (h, w) uint8, resized to ``resize_to`` (w, h).

        ``source_resize_impl="pil"`` (CMDA's): image and IC1 as PIL's bilinear, label as PIL's nearest;
        read from the copies ``cmda cityscapes`` made with the same functions when they are at ``resize_to``.
        """
        if source_resize_impl not in ("pil", "cv2"):
            raise InputError(None, f"data.source_resize_impl must be 'pil' or 'cv2', not {source_resize_impl!r}")
        if source_resize_impl == "pil" and f.resized is not None and tuple(resize_to) == f.resized_size:
            return _load_resized(f)
        image, label, ic1 = read_rgb(f.image), check_label(read_grey(f.label), f.label), read_grey(f.ic1)
        if label.shape != image.shape[:2] or ic1.shape != image.shape[:2]:
            raise InputError(f.label, f"label/IC1 size {label.shape}/{ic1.shape} differs from the image "
                             f"{image.shape[:2]} ({f.image})")
        if source_resize_impl == "cv2":  # the earlier cmda loader (not antialiased); not CMDA's
            return resize(image, resize_to), resize(label, resize_to, nearest=True), resize(ic1, resize_to)
        return (resize_pil_bilinear(image, resize_to), resize_pil_nearest(label, resize_to),
                resize_pil_bilinear(ic1, resize_to))


class CityscapesVal(Dataset):
    """Cityscapes val frames (day) for comparison with the night score: image and label resized to
    ``source_resize`` (as training sees them), IC1 as the event input, no augmentation."""

    def __init__(self, cfg: DatasetsConfig, data: DataConfig, limit: int = 0, channels: int = 3):
        """``channels``: the event encoder's input channels (the grey IC1 repeated to as many)."""
        root, out = cfg.cityscapes.root, cfg.cityscapes.out
        entries = read_split(out, "val")
        self.files = [source_file(root, out, Sample("val", *e.split("/", 1)), cfg.cityscapes.resize)
                      for e in entries]
        if limit:
            self.files = self.files[:limit]
        if not self.files:
            raise InputError(out / "val.txt", "no validation samples")
        self.size = data.source_resize
        self.resize_impl = data.source_resize_impl
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        f = self.files[i]
        image, label, ic1 = CityscapesTrain.load(f, self.size, self.resize_impl)
        events = ic1_to_input(ic1)
        if self.channels != 3:
            events = np.repeat(events[:1], self.channels, axis=0)
        return {"image": torch.from_numpy(normalize_image(image)), "events": torch.from_numpy(events),
                "label": torch.from_numpy(label.astype(np.int64)), "name": f.image.stem}


def augment_source(image, label, ic1, rng: np.random.Generator, cfg: DataConfig, rcs_class: int | None,
                   rcs: RcsConfig, drawn: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crop (cat_max_ratio, then RCS re-crop for the sampled class) and flip, on all three.

    ``drawn`` (if given) receives the crop's ``x`` and ``flip`` (0/1): CMDA's ISR direction rule uses them."""
    size = cfg.crop
    y, x = crop_max_ratio(label, size, rng, cfg.cat_max_ratio)
    if rcs_class is not None and not np.count_nonzero(label[y:y + size, x:x + size] == rcs_class) > \
            rcs.min_pixels * rcs.min_crop_ratio:
        y, x = choose_crop(label, rcs_class, (size, size), rng, rcs.min_pixels, rcs.min_crop_ratio)
    image, label, ic1 = (a[y:y + size, x:x + size] for a in (image, label, ic1))
    flip = rng.random() < cfg.flip
    if drawn is not None:
        drawn.update(x=x, flip=int(flip))
    if flip:
        return hflip(image), hflip(label), hflip(ic1)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), np.ascontiguousarray(ic1)


def ic1_to_input(ic1: np.ndarray) -> np.ndarray:
    """Stored IC1 uint8 -> network input in [-1, 1], 3 channels (CMDA's ``(x/255 - 0.5)/0.5``)."""
    v = (ic1.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.repeat(v[None], 3, axis=0)


def network_batch(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                  memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, torch.Tensor]:
    """A :class:`PairedBatches` item on ``device`` as network inputs.

    Images uint8 (B, 3, H, W) -> ImageNet-normalised float; IC1 uint8 (B, 1, H, W) -> 3 channels in
    [-1, 1]; events (B, bins, H, W) -> 3 channels for 1 bin; labels stay int64.
    """
    out: dict[str, torch.Tensor] = {}
    mean = torch.as_tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for key, value in batch.items():
        x = value.to(device, non_blocking=True)
        if key.endswith("_image"):
            x = (x.float() - mean) / std
        elif key.endswith("_ic1"):
            x = (x.float() / 255.0 - 0.5) / 0.5
        if x.ndim == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out[key] = x.contiguous(memory_format=memory_format) if x.ndim == 4 else x
    return out
