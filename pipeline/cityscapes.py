"""``cmda cityscapes``: the Cityscapes source side (trainId labels, IC1 images, RCS statistics, split lists).

Reads the raw Cityscapes root (never writes there: it is another stage's DVC output) and writes into
the output folder::

    gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png   # from the polygons, cityscapesscripts' table
    leftImg8bit_IC1/{split}/<city>/<name>_leftImg8bit.png   # IC1: annotated frame vs the previous one
    train.txt, val.txt                                        # one '<city>/<name>' per line (DAFormer's form)
    samples_with_class.json, sample_class_stats_dict.json,
    sample_class_stats.json                                   # RCS statistics, train split (written last)
    resized/<w>x<h>/{leftImg8bit,gtFine,leftImg8bit_IC1}/{split}/<city>/...  # cityscapes.resize copies

``<name>`` is ``<city>_<seq>_<frame>``. Labels are drawn by cityscapesscripts itself
(``createLabelImage(..., "trainIds")``, PIL polygon fill), so they equal its ``json2labelImg`` output
by construction; we only check label names first so an unknown one becomes an InputError naming the
file instead of cityscapesscripts' ``sys.exit``. One task per sample runs on ``pipeline.parallel``;
each output is written atomically and skipped when present, so an interrupted run resumes. The split
lists and statistics are deleted at the start and written only after every sample succeeded, so the
presence of ``sample_class_stats.json`` means the folder is complete. Images stay in the raw root
(:func:`sample_paths` finds them).

The ``resized/<w>x<h>`` copies (datasets.yaml ``cityscapes.resize``, CMDA's 1024x512 by default) are
the image, label and IC1 shrunk once with CMDA's PIL resampling (:mod:`pipeline.resample`), so the
training loader reads 4x fewer pixels and resizes nothing: decoding and resizing the 2048x1024 PNGs
was most of a DACS batch's loader time. Image and IC1 are stored PNGs (no compression: decoding is
little more than a copy; ~2 MB a sample), labels deflated. A copy is rewritten whenever its
full-size label or IC1 is, so the two never disagree.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline import lock
from pipeline.atomic import write_png, write_text
from pipeline.errors import InputError
from pipeline.image_change import ic1, ic1_to_uint8
from pipeline.parallel import run_tasks
from pipeline.rcs_stats import count_classes, remove_stats, write_stats
from pipeline.resample import resize_pil_bilinear, resize_pil_nearest

SPLITS = ("train", "val")
_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")


@dataclass(frozen=True)
class Sample:
    """One annotated Cityscapes frame: split, city and ``<city>_<seq>_<frame>``."""

    split: str
    city: str
    name: str

    @property
    def entry(self) -> str:
        """The split-list line: ``<city>/<name>``."""
        return f"{self.city}/{self.name}"

    @property
    def prev_name(self) -> str:
        stem, frame = self.name.rsplit("_", 1)
        return f"{stem}_{int(frame) - 1:06d}"

    def label_rel(self) -> str:
        """Label path relative to the output folder (the RCS ``file`` entry)."""
        return f"gtFine/{self.split}/{self.city}/{self.name}_gtFine_labelTrainIds.png"


@dataclass(frozen=True)
class SamplePaths:
    polygons: Path
    image: Path
    prev_image: Path
    label: Path
    ic1: Path


def sample_paths(root: Path, out: Path, s: Sample) -> SamplePaths:
    """Where a sample's inputs (raw root) and outputs (output folder) live."""
    return SamplePaths(
        polygons=root / "gtFine" / s.split / s.city / f"{s.name}_gtFine_polygons.json",
        image=root / "leftImg8bit" / s.split / s.city / f"{s.name}_leftImg8bit.png",
        prev_image=root / "leftImg8bit_sequence" / s.split / s.city / f"{s.prev_name}_leftImg8bit.png",
        label=out / s.label_rel(),
        ic1=out / "leftImg8bit_IC1" / s.split / s.city / f"{s.name}_leftImg8bit.png",
    )


@dataclass(frozen=True)
class ResizedPaths:
    """A sample's image, label and IC1 at one ``cityscapes.resize`` size, in the output folder."""

    image: Path
    label: Path
    ic1: Path


def resized_dir(out: Path, size: tuple[int, int]) -> Path:
    """``out/resized/<w>x<h>``: where the copies at ``size`` = (w, h) live."""
    return Path(out) / "resized" / f"{size[0]}x{size[1]}"


def resized_paths(out: Path, s: Sample, size: tuple[int, int]) -> ResizedPaths:
    """Paths of a sample's copies at ``size``: the full-size tree's layout under :func:`resized_dir`."""
    d = resized_dir(out, size)
    return ResizedPaths(
        image=d / "leftImg8bit" / s.split / s.city / f"{s.name}_leftImg8bit.png",
        label=d / s.label_rel(),
        ic1=d / "leftImg8bit_IC1" / s.split / s.city / f"{s.name}_leftImg8bit.png",
    )


def find_samples(root: Path) -> list[Sample]:
    """Every ``gtFine/{train,val}/<city>/*_gtFine_polygons.json`` under ``root``, sorted."""
    gt = root / "gtFine"
    if not gt.is_dir():
        raise InputError(gt, "Cityscapes gtFine folder not found (is cityscapes.root right in datasets.yaml?)")
    samples = []
    for split in SPLITS:
        for path in sorted((gt / split).glob("*/*_gtFine_polygons.json")):
            name = path.name[: -len("_gtFine_polygons.json")]
            m = _NAME.match(name)
            if m is None or m["city"] != path.parent.name:
                raise InputError(path, "file name is not <city>_<seq>_<frame>_gtFine_polygons.json in its city folder")
            if int(m["frame"]) < 1:
                raise InputError(path, "frame 000000 has no previous frame for IC1")
            samples.append(Sample(split, path.parent.name, name))
    if not any(s.split == "train" for s in samples):
        raise InputError(gt / "train", "no *_gtFine_polygons.json found in the train split")
    return samples


def read_split(out: Path, split: str) -> list[str]:
    """Entries (``<city>/<name>``) of ``train.txt`` / ``val.txt`` in the output folder."""
    path = Path(out) / f"{split}.txt"
    if not path.exists():
        raise InputError(path, "split list not found (run `cmda cityscapes`)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- per-sample work
def _read_rgb(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(path, "image not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(path, "not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_annotation(path: Path):
    """Parse a polygon JSON with cityscapesscripts; unknown label names or a bad file -> InputError."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label

    if not path.exists():
        raise InputError(path, "polygon file not found")
    ann = Annotation()
    try:
        ann.fromJsonFile(str(path))
        size = (int(ann.imgWidth), int(ann.imgHeight))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(path, f"not a Cityscapes polygon JSON ({type(exc).__name__}: {exc})") from None
    if min(size) <= 0:
        raise InputError(path, f"bad image size {size}")
    for k, obj in enumerate(ann.objects):
        if obj.deleted:
            continue
        if len(obj.polygon) < 2:  # PIL cannot fill it: cityscapesscripts would crash in the drawing
            raise InputError(path, f"object {k} ({obj.label!r}) has a polygon of {len(obj.polygon)} point(s), "
                             "at least 2 are needed")
        label = obj.label
        if label not in name2label and label.endswith("group"):  # cityscapesscripts' own fallback
            label = label[: -len("group")]
        if label not in name2label:
            raise InputError(path, f"unknown label name {obj.label!r}")
    return ann


def draw_train_ids(ann) -> np.ndarray:
    """uint8 trainId image [H, W] of a parsed annotation (cityscapesscripts' drawing, 255 = ignore)."""
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    img = createLabelImage(ann, "trainIds")
    return np.array(img, dtype=np.uint8)


def _read_label(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2:
        raise InputError(path, "existing label is not a readable grey PNG (delete it to regenerate)")
    return label


def _read_ic1(path: Path) -> np.ndarray:
    ic1_img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if ic1_img is None or ic1_img.ndim != 2:
        raise InputError(path, "existing IC1 is not a readable grey PNG (delete it to regenerate)")
    return ic1_img


def write_resized(p: SamplePaths, r: ResizedPaths, size: tuple[int, int], *, image: np.ndarray | None = None,
                  label: np.ndarray | None = None, ic1_img: np.ndarray | None = None) -> None:
    """Write the copies of one sample at ``size`` = (w, h), as the loader's PIL path computes them.

    An array passed in was just written at full size: its copy is (re)written from it. A copy that
    is missing is made from the full-size file; one that is present and has no fresh array is kept.
    """
    if image is not None or not r.image.exists():
        image = _read_rgb(p.image) if image is None else image
        write_png(r.image, resize_pil_bilinear(image, size), stored=True)
    if label is not None or not r.label.exists():
        label = _read_label(p.label) if label is None else label
        write_png(r.label, resize_pil_nearest(label, size))
    if ic1_img is not None or not r.ic1.exists():
        ic1_img = _read_ic1(p.ic1) if ic1_img is None else ic1_img
        write_png(r.ic1, resize_pil_bilinear(ic1_img, size), stored=True)


def convert_sample(root: Path, out: Path, s: Sample, cmda_compat: bool = False,
                   resize: tuple[int, int] = (0, 0)) -> dict[int, int] | None:
    """Write one sample's label and IC1 (each skipped when present) and its copies at ``resize`` (w, h;
    (0, 0): none); return its class counts (train only)."""
    p = sample_paths(root, out, s)
    ann = None
    if not p.label.exists():
        ann = load_annotation(p.polygons)  # validate before writing anything for this sample
    now = ic1_img = None
    if not p.ic1.exists():
        now, prev = _read_rgb(p.image), _read_rgb(p.prev_image)
        if now.shape != prev.shape:
            raise InputError(p.prev_image, f"size {prev.shape[1]}x{prev.shape[0]} differs from {p.image}")
        if ann is not None and (ann.imgWidth, ann.imgHeight) != (now.shape[1], now.shape[0]):
            raise InputError(p.polygons, f"image size {ann.imgWidth}x{ann.imgHeight} differs from {p.image}")
        ic1_img = ic1_to_uint8(ic1(now, prev, cmda_compat))
        write_png(p.ic1, ic1_img)
    label = None
    if ann is not None:
        label = draw_train_ids(ann)
        write_png(p.label, label)
    if min(resize) > 0:
        write_resized(p, resized_paths(out, s, resize), resize, image=now, label=label, ic1_img=ic1_img)
    if s.split != "train":
        return None
    return count_classes(_read_label(p.label) if label is None else label)


# ----------------------------------------------------------------------------- whole tree
@dataclass(frozen=True)
class ConvertSummary:
    train: int
    val: int
    seconds: float

    @property
    def files_per_s(self) -> float:
        return (self.train + self.val) / self.seconds if self.seconds > 0 else float("inf")


def _check_inputs(root: Path, out: Path, samples: list[Sample]) -> None:
    """Cheap existence checks for every input before any work, so a missing frame fails fast."""
    for s in samples:
        p = sample_paths(root, out, s)
        if not p.image.exists():
            raise InputError(p.image, "image of an annotated frame not found")
        if not p.ic1.exists() and not p.prev_image.exists():
            raise InputError(p.prev_image, "previous frame (for IC1) not found in leftImg8bit_sequence")


def convert_cityscapes(
    root: Path,
    out: Path,
    *,
    scheduler: str | None = None,
    workers: int = 0,
    cmda_compat: bool = False,
    resize: tuple[int, int] = (1024, 512),
) -> ConvertSummary:
    """Convert the Cityscapes tree at ``root`` into ``out`` (see module docstring); resumable."""

    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise InputError(out, f"output folder must not lie inside the raw Cityscapes root {root}")
    t0 = time.perf_counter()
    samples = find_samples(root)
    _check_inputs(root, out, samples)
    out.mkdir(parents=True, exist_ok=True)
    with lock.exclusive(out, "`cmda cityscapes`"):  # one writer; its .tmp files are a killed run's
        lock.remove_stale_temp_files(out, recursive=True)
        remove_stats(out)
        for split in SPLITS:
            (out / f"{split}.txt").unlink(missing_ok=True)

        tasks = [functools.partial(convert_sample, root, out, s, cmda_compat, tuple(resize)) for s in samples]
        counts = run_tasks(tasks, desc="cityscapes", scheduler=scheduler, workers=workers, unit="file")

        for split in SPLITS:
            write_text(out / f"{split}.txt", "".join(f"{s.entry}\n" for s in samples if s.split == split))
        entries = [(s.label_rel(), c) for s, c in zip(samples, counts, strict=True) if s.split == "train"]
        write_stats(out, entries)
    n_train = sum(s.split == "train" for s in samples)
    return ConvertSummary(train=n_train, val=len(samples) - n_train, seconds=time.perf_counter() - t0)
