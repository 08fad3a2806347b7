"""Reading DSEC-Semantic (11 classes) in the two layouts found in the wild, beside DSEC's event files.

DSEC-Semantic labels every 20 Hz image of 8 train and 3 test sequences of DSEC (day). The labels are
640x440 PNGs in the rectified left *event* camera frame: rows 0-439 of the 640x480 event frame (ESS crops
the bottom 40 rows of its event tensor and uses the PNG as it is, DSEC/dataset/sequence.py in
uzh-rpg/ess), values 0-10 (:data:`CLASSES`) and 255 = ignore (ESS config/settings.py). Timestamps are
integer microseconds on DSEC's image clock, i.e. ``t_offset + t`` of ``events.h5``.

Two layouts:

* ``official`` — the zip from the DSEC-Semantic page as unpacked (HMNet's data/dsec/scripts/prepair.sh):
  ``<root>/<split>/<seq>/11classes/NNNNNN.png`` and ``<root>/<split>/<seq>/<seq>_semantic_timestamps.txt``.
* ``ess`` — the tree ESS's loader reads: ``<root>/<split>/<seq>/semantic/11classes/data/NNNNNN.png`` and
  ``<root>/<split>/<seq>/semantic/timestamps.txt`` (ESS's README draws ``semantic/left/11classes/data``;
  its code reads ``semantic/11classes/data``; both are accepted).

Events are DSEC's ``events/left/{events.h5,rectify_map.h5}``, inside the sequence folder
(``<root>/<split>/<seq>/events/left``) or, as DSEC's event zips unpack, ``<root>/<seq>/events/left``.

Label files are taken in name order and paired with the timestamp lines in order (as ESS does); a count
mismatch, a label of another size or a value outside 0-10/255 is an :class:`InputError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import DatasetsConfig
from pipeline.dsec import EventFile, load_rectify_map
from pipeline.errors import InputError

LAYOUTS = ("official", "ess")
NUM_CLASSES = 11
IGNORE = 255
LABEL_HEIGHT, LABEL_WIDTH = 440, 640  # rows 0..439 of the 640x480 rectified event frame
CLASSES = ("background", "building", "fence", "person", "pole", "road", "sidewalk", "vegetation", "car", "wall",
           "traffic sign")  # ESS config/settings.py; MADM names class 0 "sky"

# Cityscapes trainId (0..18) -> DSEC-Semantic class (ESS utils/labels.py on label ids; the trainId form is in
# MADM's cityscapes_rgb_to_dsec_event_semseg config): traffic light and sign -> traffic sign, terrain ->
# vegetation, sky -> background, rider -> person, every vehicle -> car.
CITYSCAPES_TO_11 = (5, 6, 1, 9, 2, 4, 10, 10, 7, 7, 0, 3, 3, 8, 8, 8, 8, 8, 8)


def cityscapes_lut() -> np.ndarray:
    """uint8 lookup table of 256 entries: Cityscapes trainId -> 11-class id, everything else -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[: len(CITYSCAPES_TO_11)] = CITYSCAPES_TO_11
    return lut


def cityscapes_to_11(train_ids: np.ndarray) -> np.ndarray:
    """Cityscapes trainIds (255 = ignore) -> DSEC-Semantic's 11 classes (255 = ignore)."""
    return cityscapes_lut()[np.asarray(train_ids, np.uint8)]


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SemanticSequence:
    """Where one sequence's labels, label timestamps and events are, in one of the two layouts."""

    root: Path
    split: str
    name: str
    layout: str

    @property
    def dir(self) -> Path:
        return self.root / self.split / self.name

    @property
    def labels_dir(self) -> Path:
        if self.layout == "official":
            return self.dir / "11classes"
        code = self.dir / "semantic" / "11classes" / "data"
        readme = self.dir / "semantic" / "left" / "11classes" / "data"
        return readme if readme.is_dir() and not code.is_dir() else code

    @property
    def timestamps(self) -> Path:
        if self.layout == "official":
            return self.dir / f"{self.name}_semantic_timestamps.txt"
        return self.dir / "semantic" / "timestamps.txt"

    @property
    def events_dir(self) -> Path:
        """``events/left`` inside the sequence folder, else beside it at the root (DSEC's event zips)."""
        inside, beside = self.dir / "events" / "left", self.root / self.name / "events" / "left"
        return beside if (beside / "events.h5").exists() and not (inside / "events.h5").exists() else inside

    @property
    def events(self) -> Path:
        return self.events_dir / "events.h5"

    @property
    def rectify_map(self) -> Path:
        return self.events_dir / "rectify_map.h5"


def expected_files(layout: str) -> str:
    """The files a sequence of ``layout`` must hold, as the error messages state them."""
    if layout == "official":
        return "official layout: <split>/<seq>/11classes/NNNNNN.png and <split>/<seq>/<seq>_semantic_timestamps.txt"
    return "ESS layout: <split>/<seq>/semantic/11classes/data/NNNNNN.png and <split>/<seq>/semantic/timestamps.txt"


def detect_layout(seq_dir: Path) -> str:
    """``official`` when the folder holds ``11classes/``, ``ess`` when it holds ``semantic/``."""
    found = [lay for lay, sub in (("official", "11classes"), ("ess", "semantic")) if (seq_dir / sub).is_dir()]
    if len(found) != 1:
        what = "neither" if not found else "both"
        raise InputError(seq_dir, f"the sequence folder is in {what} of the DSEC-Semantic layouts; expected the "
                                  f"{expected_files('official')}; or the {expected_files('ess')}")
    return found[0]


def sequence_paths(cfg: DatasetsConfig, name: str) -> SemanticSequence:
    """The paths of a sequence listed under ``dsec_semantic.train`` or ``test``, in the configured layout."""
    sem = cfg.dsec_semantic
    split = sem.sequences.get(name)
    if split is None:
        known = ", ".join(sem.sequences) or "(none)"
        raise InputError(cfg.source, f"sequence {name!r} is not listed under dsec_semantic.train/test (known: {known})")
    seq_dir = sem.root / split / name
    if not seq_dir.is_dir():
        raise InputError(seq_dir, f"DSEC-Semantic sequence folder not found ({split} sequence {name} of "
                                  f"dsec_semantic.root)")
    layout = detect_layout(seq_dir) if sem.layout == "auto" else sem.layout
    return SemanticSequence(sem.root, split, name, layout)


# ---------------------------------------------------------------------------------------------- files
def list_labels(seq: SemanticSequence) -> list[Path]:
    """The sequence's label PNGs in name order (ESS sorts the names; HMNet globs ``*.png``)."""
    folder = seq.labels_dir
    if not folder.is_dir():
        raise InputError(folder, f"label folder not found ({expected_files(seq.layout)})")
    files = sorted(Path(e.path) for e in os.scandir(folder) if e.name.endswith(".png") and e.is_file())
    if not files:
        raise InputError(folder, f"no label PNGs ({expected_files(seq.layout)})")
    return files


def parse_timestamp(text: str) -> int | None:
    """One line of a timestamps file: an integer (or an integral float, as HMNet parses them), else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def load_label_timestamps(path: str | Path) -> np.ndarray:
    """Label timestamps (int64 us on DSEC's image clock, one per line), strictly increasing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label timestamps file not found")
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        value = parse_timestamp(line)
        if value is None:
            raise InputError(path, f"line {lineno}: {line[:40]!r} is not an integer timestamp in microseconds")
        values.append(value)
    ts = np.asarray(values, dtype=np.int64)
    if ts.size == 0:
        raise InputError(path, "no timestamps")
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if bad.size:
        raise InputError(path, f"timestamps not strictly increasing at line {bad[0] + 2}")
    return ts


def read_label(path: str | Path) -> np.ndarray:
    """One DSEC-Semantic label: uint8 (440, 640), values 0..10 or 255 (what the loader calls per sample)."""
    path = Path(path)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(path, "label missing or not readable as an image")
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise InputError(path, f"a label must be a single-channel 8-bit PNG, got shape {arr.shape} {arr.dtype}")
    if arr.shape != (LABEL_HEIGHT, LABEL_WIDTH):
        raise InputError(path, f"label is {arr.shape[1]}x{arr.shape[0]}, DSEC-Semantic labels are "
                               f"{LABEL_WIDTH}x{LABEL_HEIGHT} (rows 0-439 of the 640x480 event frame)")
    bad = np.setdiff1d(np.unique(arr), np.r_[np.arange(NUM_CLASSES), IGNORE])
    if bad.size:
        raise InputError(path, f"label values must be 0..10 or 255, found {bad[:8].tolist()}")
    return arr


@dataclass(frozen=True)
class LabelList:
    """A sequence's labels paired with their timestamps (label k = k-th file in name order)."""

    seq: SemanticSequence
    files: tuple[Path, ...]
    timestamps: np.ndarray  # int64 us, DSEC image clock


def load_labels(seq: SemanticSequence) -> LabelList:
    """Label files and timestamps of a sequence; their counts must agree (ESS asserts the same)."""
    files = list_labels(seq)
    ts = load_label_timestamps(seq.timestamps)
    if len(files) != ts.size:
        raise InputError(seq.timestamps, f"{ts.size} timestamps for {len(files)} label PNGs in {seq.labels_dir}: "
                                         "the counts must agree (label k is the k-th file in name order)")
    return LabelList(seq, tuple(files), ts)


# ---------------------------------------------------------------------------------------------- check
@dataclass(frozen=True)
class Finding:
    """One line of a check report: what was checked, where, ``ok`` or not, and a detail; ``missing``
    when the problem is a file or folder that is not there (``cmda check``'s MISSING, else INVALID)."""

    what: str
    path: Path | None
    ok: bool
    detail: str = ""
    missing: bool = False


def _failed(what: str, exc: InputError, path: Path | None = None) -> Finding:
    where = exc.path or path
    return Finding(what, where, False, exc.problem, missing=where is not None and not where.exists())


def _probe(what: str, path: Path, fn) -> Finding:
    try:
        return Finding(what, path, True, fn())
    except InputError as exc:
        return _failed(what, exc, path)


def check_sequence(cfg: DatasetsConfig, name: str, read_all_labels: bool = False) -> list[Finding]:
    """Every file of one DSEC-Semantic sequence, read as preprocessing and training read them.

    Labels: the first and last are always decoded (size and values); ``read_all_labels`` decodes all.
    """

    try:
        seq = sequence_paths(cfg, name)
    except InputError as exc:
        return [_failed("sequence folder", exc)]
    out = [Finding("layout", seq.dir, True, seq.layout)]

    def events() -> str:
        with EventFile(seq.events) as ev:
            return f"{ev.n_events:,} events, {(ev.t_last - ev.t_first) / 1e6:.1f} s"

    out.append(_probe("events", seq.events, events))
    out.append(_probe("rectify map", seq.rectify_map, lambda: "x".join(map(str, load_rectify_map(seq.rectify_map)
                                                                            .shape[1::-1]))))

    def labels() -> str:
        lab = load_labels(seq)
        for f in lab.files if read_all_labels else sorted({lab.files[0], lab.files[-1]}):
            read_label(f)
        return f"{len(lab.files)} labels with timestamps"

    out.append(_probe("labels and timestamps", seq.labels_dir, labels))
    return out


def check_dsec_semantic(cfg: DatasetsConfig, read_all_labels: bool = False) -> dict[str, list[Finding]]:
    """The whole DSEC-Semantic tree of datasets.yaml: section title -> findings (``cmda check`` prints them)."""
    sem = cfg.dsec_semantic
    if not sem.root.is_dir():
        return {f"DSEC-Semantic ({sem.root})": [Finding("dsec_semantic.root", sem.root, False, "folder not found",
                                                        missing=True)]}
    return {f"DSEC-Semantic {split} sequence {name}": check_sequence(cfg, name, read_all_labels)
            for name, split in sem.sequences.items()}
