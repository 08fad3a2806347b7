"""``cmda check``: is every file a real run needs where datasets.yaml says, and readable? One report, no work done.

Checks, per DSEC sequence listed in ``dsec.sequences``: ``events.h5`` (schema, as preprocessing validates it),
``rectify_map.h5``, the rectified images and ``timestamps.txt`` (one timestamp per image), ``cam_to_cam.yaml``
and the test labels; for Cityscapes: ``gtFine`` polygons, their ``leftImg8bit`` images and, for IC1, the previous
frame in ``leftImg8bit_sequence`` (or an IC1 image already written under ``cityscapes.out``); for DSEC-Semantic
(``dsec_semantic``, optional when its root is absent): each listed sequence's layout, events, rectify map,
labels and their timestamps. Weight files go
through the loaders training uses (shape checks included): the ImageNet ``mit_bX.pth``, the CycleGAN file and,
if given, a checkpoint (cmda's or CMDA's released layout). Missing weight files are reported but optional
(training then says what it does without them); a weight file that is present but does not load is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.calib import load_calibration
from pipeline.cityscapes import find_samples, sample_paths
from pipeline.config import load_config
from pipeline.dsec import EventFile, SequencePaths, load_rectify_map, load_timestamps
from pipeline.dsec_semantic import check_dsec_semantic
from pipeline.errors import InputError
from train.checkpoints.cmda_layout import import_cmda, is_cmda_mmcv, not_a_checkpoint_error, read_checkpoint_object
from train.checkpoints.cyclegan import load_cyclegan
from train.checkpoints.files import FORMAT
from train.config import DEFAULT_CYCLEGAN
from train.models import load_mit_pretrained, mit
from train.models.mit import get_config

OK, MISSING, INVALID, OPTIONAL = "ok", "MISSING", "INVALID", "not found (optional)"


@dataclass
class Item:
    what: str
    path: Path | None
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in (MISSING, INVALID)

    def line(self) -> str:
        where = f" {self.path}" if self.path is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"  [{self.status}] {self.what}{where}{detail}"


@dataclass
class Report:
    sections: dict[str, list[Item]] = field(default_factory=dict)

    def add(self, section: str, item: Item) -> None:
        self.sections.setdefault(section, []).append(item)

    @property
    def failures(self) -> list[Item]:
        return [i for items in self.sections.values() for i in items if i.failed]

    def text(self) -> str:
        lines = []
        for name, items in self.sections.items():
            lines.append(name)
            lines += [i.line() for i in items]
        return "\n".join(lines)


def _probe(what: str, path: Path, load: Callable[[Path], str], required: bool = True) -> Item:
    """Run ``load`` (returns a detail string) on an existing path; a missing path or an InputError is reported."""
    if not path.exists():
        return Item(what, path, MISSING if required else OPTIONAL)
    try:
        return Item(what, path, OK, load(path))
    except InputError as exc:
        return Item(what, path, INVALID, exc.problem)


def _events(path: Path) -> str:

    with EventFile(path) as ev:
        return f"{ev.n_events:,} events, {(ev.t_last - ev.t_first) / 1e6:.1f} s"


def _rectify(path: Path) -> str:

    shape = load_rectify_map(path).shape
    return f"{shape[1]}x{shape[0]}"


def _calibration(path: Path) -> str:

    load_calibration(path)
    return "parsed"


def check_sequence(report: Report, root: Path, name: str) -> None:

    p = SequencePaths(root, name)
    section = f"DSEC sequence {name} ({p.dir})"
    if not p.dir.is_dir():
        report.add(section, Item("sequence folder", p.dir, MISSING))
        return
    report.add(section, _probe("events", p.events, _events))
    report.add(section, _probe("rectify map", p.rectify_map, _rectify))
    images = sorted(p.images_dir.glob("*.png")) if p.images_dir.is_dir() else []
    report.add(section, Item("rectified images", p.images_dir, OK if images else MISSING,
                             f"{len(images)} PNG" if images else "no *.png"))

    def timestamps(path: Path) -> str:
        n = len(load_timestamps(path))
        if images and n != len(images):
            raise InputError(path, f"{n} timestamps for {len(images)} images")
        return f"{n} timestamps"

    report.add(section, _probe("image timestamps", p.timestamps, timestamps))
    report.add(section, _probe("calibration", p.calibration, _calibration))
    labels = sorted(p.labels_dir.glob(f"{name}_*_grey_gtFine_labelTrainIds.png")) if p.labels_dir.is_dir() else []
    detail = f"{len(labels)} label PNG" if labels else f"no {name}_NNNNNN_grey_gtFine_labelTrainIds.png"
    report.add(section, Item("test labels (CMDA's)", p.labels_dir, OK if labels else MISSING, detail))


def check_cityscapes(report: Report, root: Path, out: Path) -> None:

    section = f"Cityscapes ({root})"
    for sub in ("gtFine", "leftImg8bit", "leftImg8bit_sequence"):
        report.add(section, Item(sub, root / sub, OK if (root / sub).is_dir() else MISSING))
    if not (root / "gtFine").is_dir():
        return
    try:
        samples = find_samples(root)
    except InputError as exc:
        report.add(section, Item("annotated frames", exc.path, INVALID, exc.problem))
        return
    counts = {s: sum(x.split == s for x in samples) for s in ("train", "val")}
    no_image, no_prev = [], []
    for s in samples:
        paths = sample_paths(root, out, s)
        if not paths.image.exists():
            no_image.append(paths.image)
        if not paths.prev_image.exists() and not paths.ic1.exists():
            no_prev.append(paths.prev_image)
    report.add(section, Item("annotated frames (gtFine polygons)", None, OK,
                             f"{counts['train']} train, {counts['val']} val"))
    report.add(section, Item("their leftImg8bit images", no_image[0] if no_image else None,
                             INVALID if no_image else OK, f"{len(no_image)} missing, e.g. this one" if no_image
                             else "all present"))
    report.add(section, Item("previous frames for IC1 (leftImg8bit_sequence)", no_prev[0] if no_prev else None,
                             INVALID if no_prev else OK, f"{len(no_prev)} missing, e.g. this one" if no_prev
                             else "all present"))


def check_semantic(report: Report, cfg) -> None:
    """The dsec_semantic section (docs/dsec-semantic.md): optional as a whole (a DSEC night user need not have
    it), but once its root exists every listed sequence must be complete and readable."""
    sem = cfg.dsec_semantic
    if not sem.root.is_dir():
        report.add(f"DSEC-Semantic ({sem.root})", Item("dsec_semantic.root", sem.root, OPTIONAL))
        return
    for section, findings in check_dsec_semantic(cfg).items():
        for f in findings:
            report.add(section, Item(f.what, f.path, OK if f.ok else MISSING if f.missing else INVALID, f.detail))


def check_weights(report: Report, backbone: str, pretrained: Path, cyclegan: Path, checkpoint: Path | None,
                  explicit: set[str]) -> None:
    """Weight files through the training loaders; ``explicit`` names the ones the user passed (then required)."""

    section = "Weights"

    def mit_file(path: Path) -> str:
        load_mit_pretrained(mit(backbone), path)
        return f"{backbone} ImageNet encoder, all keys fit"

    def gan_file(path: Path) -> str:
        load_cyclegan(path)
        return "ResNet-9 1->1 generator, all keys fit"

    report.add(section, _probe(f"ImageNet MiT ({backbone})", pretrained, mit_file, "pretrained" in explicit))
    report.add(section, _probe("CycleGAN IC1 -> night events", cyclegan, gan_file, "cyclegan" in explicit))
    if checkpoint is not None:
        report.add(section, _probe("checkpoint", checkpoint, _checkpoint))


def _checkpoint(path: Path) -> str:

    obj = read_checkpoint_object(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        teacher = "with" if obj.get("teacher") is not None else "without"
        return f"cmda checkpoint, {obj.get('backbone')}, iteration {obj.get('iteration')}, {teacher} teacher"
    if not is_cmda_mmcv(obj):
        raise not_a_checkpoint_error(path, obj)
    imp = import_cmda(path, obj)
    parts = [f"CMDA's released layout, {imp.backbone}, student", "teacher" if imp.teacher else "no teacher",
             "CycleGAN" if imp.cyclegan else "no CycleGAN", *imp.notes]
    return "; ".join(parts)


def check_all(datasets: Path, backbone: str = "mit_b5", pretrained: Path | None = None,
              cyclegan: Path | None = None, checkpoint: Path | None = None) -> Report:
    """The whole report for ``datasets.yaml`` and the weight files (defaults: where training looks)."""

    cfg = load_config(datasets)
    try:
        backbone = get_config(backbone).name
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    report = Report()
    if not cfg.dsec.root.is_dir():
        report.add(f"DSEC ({cfg.dsec.root})", Item("dsec.root", cfg.dsec.root, MISSING))
    else:
        for name in cfg.dsec.sequences:
            check_sequence(report, cfg.dsec.root, name)
    if not cfg.cityscapes.root.is_dir():
        report.add(f"Cityscapes ({cfg.cityscapes.root})", Item("cityscapes.root", cfg.cityscapes.root, MISSING))
    else:
        check_cityscapes(report, cfg.cityscapes.root, cfg.cityscapes.out)
    check_semantic(report, cfg)
    explicit = {n for n, v in (("pretrained", pretrained), ("cyclegan", cyclegan)) if v is not None}
    check_weights(report, backbone, pretrained or Path("pretrained") / f"{backbone}.pth",
                  cyclegan or DEFAULT_CYCLEGAN, checkpoint, explicit)
    return report
