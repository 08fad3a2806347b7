"""Image-only night targets in their official layouts: Dark Zurich and ACDC night.

Readers: :func:`discover` lists a root's train / val / test images with their label files (or None),
recognising the layout from the folders; :func:`read_label` returns 19-class trainIds (255 = ignore)
from either label file, mapping labelIds through cityscapesscripts' table. A folder in neither layout,
a val image without a label, or a label file of the wrong kind, size or values is an
:class:`InputError` that says which files were expected.

Writer: :class:`DarkZurichSubmission` packs test-set predictions into the zip Dark Zurich's evaluation
server (CodaLab; the test labels are hidden) takes: three top-level folders ``labelTrainIds/`` (uint8
trainIds 0..18, the mIoU), ``labelTrainIds_invalid/`` (the same with 255 where the model abstains, for
UIoU) and ``confidence/`` (uint16, confidence x 65535, for the average UIoU), one
``<sequence>_frame_<NNNNNN>.png`` per test image in each (the server looks the files up by that
prefix), at the test image's full size (1920x1080 for the real data).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from pipeline import atomic
from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from pipeline.rcs_stats import NUM_CLASSES

LAYOUTS = ("darkzurich", "acdc")
SPLITS = ("train", "val", "test")
IGNORE = 255
IMAGE_SUFFIX = "_rgb_anon.png"
TRAIN_IDS_SUFFIX = "_gt_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gt_labelIds.png"
SUBMISSION_FOLDERS = ("labelTrainIds", "labelTrainIds_invalid", "confidence")


def _label_lut() -> np.ndarray:
    """labelId -> trainId (uint8, 256 entries): every label that is not one of the 19 classes -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for lab in CS_LABELS:
        if 0 <= lab.id < 256 and 0 <= lab.trainId < NUM_CLASSES:
            lut[lab.id] = lab.trainId
    return lut


LABEL_LUT = _label_lut()
VALID_LABEL_IDS = frozenset(lab.id for lab in CS_LABELS if 0 <= lab.id < 256)
# trainId -> labelId of the 19 classes (for writing labelIds from predictions).
TRAIN_TO_LABEL_ID = np.array([next(lab.id for lab in CS_LABELS if lab.trainId == t) for t in range(NUM_CLASSES)],
                             np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> trainIds 0..18, 255 for every label outside the 19 classes."""
    return LABEL_LUT[np.asarray(label_ids, np.uint8)]


# ---------------------------------------------------------------------------------------------- discovery
def _image_dir(layout: str, root: Path, split: str, condition: str) -> Path:
    if layout == "darkzurich":
        return root / "rgb_anon" / split / condition
    return root / "rgb_anon" / condition / split


def _label_dir(layout: str, root: Path, split: str, condition: str) -> Path:
    if layout == "darkzurich":
        return root / "gt" / split / condition
    return root / "gt" / condition / split


def expected_files(layout: str, condition: str = "night") -> str:
    """The files a tree of ``layout`` must hold, as the error messages state them."""
    if layout == "darkzurich":
        return (f"Dark Zurich: rgb_anon/{{train,val,test}}/{condition}/GOPR*/*{IMAGE_SUFFIX} and "
                f"gt/val/{condition}/GOPR*/*{TRAIN_IDS_SUFFIX} (or *{LABEL_IDS_SUFFIX})")
    return (f"ACDC: rgb_anon/{condition}/{{train,val,test}}/GOPR*/*{IMAGE_SUFFIX} and "
            f"gt/{condition}/{{train,val}}/GOPR*/*{TRAIN_IDS_SUFFIX} (or *{LABEL_IDS_SUFFIX})")


def detect_layout(root: str | Path, condition: str = "night") -> str:
    """``darkzurich`` (``rgb_anon/<split>/<condition>``) or ``acdc`` (``rgb_anon/<condition>/<split>``)."""
    root = Path(root)
    found = [lay for lay in LAYOUTS if any(_image_dir(lay, root, s, condition).is_dir() for s in SPLITS)]
    if len(found) != 1:
        what = "neither" if not found else "both"
        raise InputError(root, f"the folder is in {what} of the night-target layouts; expected "
                               f"{expected_files('darkzurich', condition)}; or {expected_files('acdc', condition)}")
    return found[0]


@dataclass(frozen=True)
class TargetImage:
    """One image of a target split and its label files (None where the split has none)."""

    image: Path
    name: str  # <sequence>_frame_<NNNNNN>: the image's name without _rgb_anon.png
    sequence: str
    train_ids: Path | None = None
    label_ids: Path | None = None

    @property
    def label(self) -> Path | None:
        """The label file to read: the trainIds file where present, else the labelIds file."""
        return self.train_ids or self.label_ids


@dataclass(frozen=True)
class TargetSplits:
    """A night target's images: ``train`` (unlabelled for adaptation), ``val`` (every image labelled),
    ``test`` (labels hidden for Dark Zurich; may be empty)."""

    layout: str
    root: Path
    condition: str
    train: list[TargetImage]
    val: list[TargetImage]
    test: list[TargetImage]

    def split(self, name: str) -> list[TargetImage]:
        if name not in SPLITS:
            raise InputError(self.root, f"unknown split {name!r} (known: {', '.join(SPLITS)})")
        return getattr(self, name)


def _list_split(layout: str, root: Path, split: str, condition: str) -> list[TargetImage]:
    img_dir, lab_dir = _image_dir(layout, root, split, condition), _label_dir(layout, root, split, condition)
    items = []
    for path in sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        name = path.name[: -len(IMAGE_SUFFIX)]
        labels = lab_dir / path.parent.name
        tid, lid = labels / f"{name}{TRAIN_IDS_SUFFIX}", labels / f"{name}{LABEL_IDS_SUFFIX}"
        items.append(TargetImage(path, name, path.parent.name, tid if tid.is_file() else None,
                                 lid if lid.is_file() else None))
    return items


def discover(root: str | Path, layout: str | None = None, condition: str = "night",
             require_val: bool = True) -> TargetSplits:
    """Every train / val / test image of a Dark Zurich or ACDC tree, with its label files.

    ``layout`` None recognises it from the folders. Train must not be empty, val neither unless
    ``require_val`` is False (Dark Zurich's day and twilight images have no val split), and every val
    image must have a label (the val split is what cmda evaluates on); test may be absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "night-target folder not found")
    if layout is None:
        layout = detect_layout(root, condition)
    elif layout not in LAYOUTS:
        raise InputError(root, f"unknown night-target layout {layout!r} (known: {', '.join(LAYOUTS)})")
    splits = {s: _list_split(layout, root, s, condition) for s in SPLITS}
    for split in ("train", "val") if require_val else ("train",):
        if not splits[split]:
            where = _image_dir(layout, root, split, condition).relative_to(root)
            raise InputError(root, f"no {split} images: expected {where}/GOPR*/*{IMAGE_SUFFIX} "
                                   f"({expected_files(layout, condition)})")
    for item in splits["val"]:
        if item.label is None:
            lab = _label_dir(layout, root, "val", condition) / item.sequence / item.name
            raise InputError(item.image, f"val image without a label: expected {lab}{TRAIN_IDS_SUFFIX} "
                                         f"or {lab}{LABEL_IDS_SUFFIX}")
    return TargetSplits(layout, root, condition, splits["train"], splits["val"], splits["test"])


def discover_target(cfg: DatasetsConfig, name: str, condition: str = "night") -> TargetSplits:
    """The splits of datasets.yaml's ``darkzurich`` or ``acdc`` section (its root, in that layout)."""
    if name not in LAYOUTS:
        raise InputError(cfg.source, f"unknown night target {name!r} (known: {', '.join(LAYOUTS)})")
    return discover(getattr(cfg, name).root, layout=name, condition=condition)


# ---------------------------------------------------------------------------------------------- labels
def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a PNG from its header, without decoding it."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise InputError(path, "not a PNG file")
    return struct.unpack(">II", head[16:24])


def _read_grey(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(path, "cannot be read as an image")
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise InputError(path, f"a label must be a single-channel 8-bit PNG, got shape {arr.shape} {arr.dtype}")
    return arr


def read_train_ids(path: str | Path) -> np.ndarray:
    """A ``_gt_labelTrainIds.png``: uint8 (H, W), values 0..18 or 255."""
    arr = _read_grey(Path(path))
    bad = np.setdiff1d(np.unique(arr), np.r_[np.arange(NUM_CLASSES), IGNORE])
    if bad.size:
        raise InputError(path, f"trainIds must be 0..18 or 255, found {bad[:8].tolist()}")
    return arr


def read_label_ids(path: str | Path) -> np.ndarray:
    """A ``_gt_labelIds.png`` mapped to trainIds (uint8 (H, W), 255 = ignore)."""
    arr = _read_grey(Path(path))
    bad = sorted(set(np.unique(arr).tolist()) - VALID_LABEL_IDS)
    if bad:
        raise InputError(path, f"not a Cityscapes labelIds image: unknown label ids {bad[:8]}")
    return label_ids_to_train_ids(arr)


def read_label(item: TargetImage, check_size: bool = True) -> np.ndarray:
    """trainIds of ``item`` (uint8 (H, W), 255 = ignore), from its trainIds file or else its labelIds file."""
    if item.train_ids is not None:
        label = read_train_ids(item.train_ids)
    elif item.label_ids is not None:
        label = read_label_ids(item.label_ids)
    else:
        raise InputError(item.image, "this image has no label file")
    if check_size:
        w, h = png_size(item.image)
        if label.shape != (h, w):
            raise InputError(item.label, f"label is {label.shape[1]}x{label.shape[0]}, its image {w}x{h}")
    return label


def check_labels_agree(item: TargetImage) -> None:
    """Where an image has both label files, they must give the same trainIds."""
    if item.train_ids is None or item.label_ids is None:
        return
    a, b = read_train_ids(item.train_ids), read_label_ids(item.label_ids)
    if a.shape != b.shape or not np.array_equal(a, b):
        n = int((a != b).sum()) if a.shape == b.shape else a.size
        raise InputError(item.train_ids, f"disagrees with {item.label_ids.name} mapped to trainIds ({n} pixels)")


# ---------------------------------------------------------------------------------------------- test export
def _encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


class DarkZurichSubmission:
    """The zip Dark Zurich's test server takes, written one prediction at a time.

    ``add(name, prediction, confidence=None, invalid=None)`` per test image: ``prediction`` trainIds
    (any (h, w), resized with nearest neighbour to the image's size), ``confidence`` in [0, 1] (resized
    bilinearly; default 1 everywhere: only the server's average-UIoU figure uses it), ``invalid`` a
    boolean mask of pixels the model abstains on (255 in ``labelTrainIds_invalid``; default none, so the
    UIoU equals the IoU). ``close()`` checks every test image has a prediction and renames the zip into
    place; an error or a missing image leaves no zip behind.
    """

    def __init__(self, out: str | Path, test: Sequence[TargetImage]):
        self.out = Path(out)
        self.test = {item.name: item for item in test}
        if not self.test:
            raise InputError(None, "no test images to export")
        self.done: set[str] = set()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED)

    def add(self, name: str, prediction: np.ndarray, confidence: np.ndarray | None = None,
            invalid: np.ndarray | None = None) -> None:
        item = self.test.get(name)
        if item is None:
            raise InputError(None, f"{name!r} is not a test image of this split")
        if name in self.done:
            raise InputError(item.image, "a second prediction for this test image")
        pred = np.asarray(prediction)
        if pred.ndim != 2 or not np.issubdtype(pred.dtype, np.integer):
            raise InputError(item.image, f"prediction must be an (H, W) integer array, got {pred.shape} {pred.dtype}")
        if pred.size and (pred.min() < 0 or pred.max() >= NUM_CLASSES):
            raise InputError(item.image, f"prediction values must be trainIds 0..18, got {pred.min()}..{pred.max()}")
        w, h = png_size(item.image)
        label = cv2.resize(pred.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        conf = np.ones((h, w), np.float32) if confidence is None else np.asarray(confidence, np.float32)
        if conf.shape != pred.shape and confidence is not None:
            raise InputError(item.image, f"confidence shape {conf.shape} differs from the prediction's {pred.shape}")
        conf = cv2.resize(conf, (w, h), interpolation=cv2.INTER_LINEAR)
        conf16 = np.round(np.clip(conf, 0.0, 1.0) * 65535.0).astype(np.uint16)
        label_invalid = label.copy()
        if invalid is not None:
            mask = np.asarray(invalid, bool)
            if mask.shape != pred.shape:
                raise InputError(item.image, f"invalid mask shape {mask.shape} differs from the prediction's "
                                             f"{pred.shape}")
            label_invalid[cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0] = IGNORE
        with self._naming_the_zip():
            for folder, image in zip(SUBMISSION_FOLDERS, (label, label_invalid, conf16), strict=True):
                self.zip.writestr(f"{folder}/{name}.png", _encode_png(image))
        self.done.add(name)

    @contextlib.contextmanager
    def _naming_the_zip(self) -> Iterator[None]:
        """A write error (full disk) names the zip being written, not nothing or the hidden partial file."""
        try:
            yield
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.out)) from exc

    def close(self) -> Path:
        try:
            with self._naming_the_zip():
                self.zip.close()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        missing = sorted(set(self.test) - self.done)
        if missing:
            self.tmp.unlink()
            raise InputError(self.out, f"{len(missing)} test image(s) have no prediction, e.g. {missing[0]}; "
                                       "the server rejects an incomplete submission")
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Remove the partial zip, even when closing it fails (a full disk cannot take its directory)."""
        try:
            with contextlib.suppress(OSError):
                self.zip.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> DarkZurichSubmission:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def export_darkzurich_test(out: str | Path, test: Sequence[TargetImage], predictions: dict[str, np.ndarray],
                           confidences: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``out`` (a zip) from per-image trainId predictions keyed by :attr:`TargetImage.name`."""
    with DarkZurichSubmission(out, test) as sub:
        for item in test:
            if item.name in predictions:
                sub.add(item.name, predictions[item.name], None if confidences is None else confidences.get(item.name))
    return Path(out)


def write_label_ids(path: str | Path, train_ids: np.ndarray) -> None:
    """A trainId map as a Cityscapes labelIds PNG (255 -> 0, 'unlabeled'), e.g. for ACDC's benchmark."""
    t = np.asarray(train_ids, np.uint8)
    lut = np.zeros(256, np.uint8)
    lut[:NUM_CLASSES] = TRAIN_TO_LABEL_ID
    atomic.write_png(path, lut[t])
