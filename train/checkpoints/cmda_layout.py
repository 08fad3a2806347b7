"""CMDA's released mmcv checkpoints, read as they are: recognised, renamed onto :class:`CMDAModel`, checked strictly.

CMDA publishes its Cityscapes -> DSEC model as an mmcv checkpoint ``{'meta', 'state_dict'[, 'optimizer']}``
whose state dict is the whole UDA module of XiaRho/CMDA@9d25129: the student under ``model.*``, the EMA teacher under
``ema_model.*`` (same names) and the frozen CycleGAN generator under ``cyclegan_itrd2en.*``. cmda's model was
named after CMDA's, so only three renames are needed per model:

==============================================  ====================================
CMDA key (after ``model.`` / ``ema_model.``)     cmda key
==============================================  ====================================
``backbone_image.*``, ``backbone_events.*``      same
``fusion_module.basic_block.{i}.*``              ``fusion_module.blocks.{i}.*``
``fusion_module.linear_block.{i}.*``             ``fusion_module.mlps.{i}.*``
``decode_head.embed_layers_image.{i}.*``         ``decode_head.embed_layers.{i}.*``
``decode_head.fuse_layer_image.*``               ``decode_head.fuse_layer.*``
``decode_head.conv_seg.*``                       same
==============================================  ====================================

Two released models share this layout. The Cityscapes -> DSEC model fuses with ``AttentionAvgFusion``
(``basic_block.0..7``, one block per encoder and stage). The Cityscapes -> Dark Zurich image + ISR model
(``cs2dz_image+raw-isr``) fuses with ``AttentionFusion``: ``basic_block.0..3`` are blocks of width 2C on
concat(image, ISR) and ``linear_block.0..3`` the Mlps 2C -> C -> C; the file is recognised by its
``linear_block`` keys and imported as a ``model.fusion=attention``, ``data.target=darkzurich`` model.

CMDA's head is built with ``share_decoder=True``: the events and fusion branches are the image branch's modules
under two more names, so the state dict lists ``embed_layers_{events,fusion}`` / ``fuse_layer_{events,fusion}``
with the same values. They are checked against the image group (cmda's single shared head uses the image
group; a difference is reported as a warning). Known unused groups are skipped with one line:
``fusion_isr_module.*`` (CMDA's config builds an ISR attention fusion that the DSEC run never calls) and
``imnet_model.*`` (the ImageNet copy only present when the feature distance was on).

Everything else is strict: a key that maps nowhere, a key the model needs that the file lacks, or a shape that
does not fit is an :class:`InputError` listing them under the file's own names. The MiT size is read from the
file (depths and widths of ``backbone_image``) and a mismatch with the size a command asked for names both.

The renames, the detection of size and fusion and the strict checks are in :mod:`train.checkpoints.cmda_keys`;
this module reads and recognises the file, imports it whole and writes it in cmda's format.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from train.checkpoints.cmda_keys import (
    CMDA_MARKERS,
    CYCLEGAN,
    SKIPPED_IN_MODEL,
    SKIPPED_TOP,
    STUDENT,
    TEACHER,
    check_cyclegan,
    check_model,
    detect_backbone,
    detect_fusion,
    listing,
    map_model,
)
from train.checkpoints.files import FORMAT
from train.config import TrainConfig, apply_target, to_dict
from train.models.weights import guess_mit_variant


# ---------------------------------------------------------------------- reading and recognising
def read_checkpoint_object(path: str | Path) -> Any:
    """``torch.load`` a checkpoint on the CPU, memory-mapped where the file allows.

    Tries the safe ``weights_only`` unpickler first (CMDA's mmcv files and plain weight files pass it); cmda's
    own checkpoints hold NumPy RNG state and need the full unpickler, as :func:`train.checkpoints.files.load_checkpoint`
    uses: only open checkpoints you trust.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file (give its checkpoints/iter_*.pt or best.pt)")
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    last: Exception | None = None
    for weights_only in (True, False):
        for mmap in (True, False):
            try:
                with warnings.catch_warnings():  # torch's notes on a plain pickle: the error below says it all
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
            except Exception as exc:  # unpickling, non-zip (mmap) or corrupt-file errors: try the next way
                last = exc
    raise InputError(path, f"not a readable PyTorch checkpoint ({type(last).__name__}: {last})")


def state_dict_of(obj: Any) -> Mapping[str, Any] | None:
    """The name -> tensor mapping inside an mmcv / plain checkpoint object (None if there is none)."""
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):
            return inner
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def is_cmda_mmcv(obj: Any) -> bool:
    """True for CMDA's released layout (a state dict with ``model.backbone_image.*`` or similar keys)."""
    sd = state_dict_of(obj)
    return sd is not None and any(k.startswith(CMDA_MARKERS) for k in sd)


def describe_layout(obj: Any) -> str:
    """A phrase naming what a checkpoint that is neither cmda's nor CMDA's layout looks like."""

    if isinstance(obj, Mapping) and "format" in obj:
        return f"a cmda checkpoint of another format ({obj.get('format')!r}, this version reads {FORMAT!r})"
    if isinstance(obj, Mapping) and "student" in obj:
        return "a cmda-style checkpoint without its 'format' marker"
    sd = state_dict_of(obj)
    if sd is None:
        kind = type(obj).__name__
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else ""
        return f"a {kind}{f' with keys {keys}' if keys else ''}, not a state dict"
    keys = list(sd)
    if any(k.startswith("patch_embed1.") for k in keys):
        guess = guess_mit_variant(sd)
        return f"an ImageNet MiT encoder file ({guess or 'unknown size'}; use it with --pretrained)"
    if any(k.startswith("model.1.") for k in keys) and any(k.startswith("model.10.conv_block") for k in keys):
        return "a CycleGAN generator file (use it with --cyclegan)"
    if any(k.startswith("backbone.") for k in keys) and any(k.startswith("decode_head.") for k in keys):
        return "a single-encoder mmseg EncoderDecoder (SegFormer/DAFormer, image only)"
    if any(k.startswith(("backbone_image.", "decode_head.")) for k in keys):
        return "a bare cmda/CMDA model state dict (no 'model.' prefix, no cmda checkpoint fields)"
    return f"an unknown state dict ({len(keys)} keys, e.g. {listing(keys[:3])})"


def not_a_checkpoint_error(path: Path, obj: Any) -> InputError:
    return InputError(path, "neither a cmda checkpoint nor CMDA's released layout: it looks like "
                      f"{describe_layout(obj)}; a cmda checkpoint has 'format': {FORMAT!r} with 'student' weights, "
                      "CMDA's has a state_dict "
                      "with model.backbone_image.*, model.backbone_events.*, model.fusion_module.*, "
                      "model.decode_head.*")


# ---------------------------------------------------------------------- the whole file
@dataclass
class CMDAImport:
    """A CMDA checkpoint converted to cmda's names (student, teacher or None, CycleGAN or None)."""

    path: Path
    backbone: str
    num_classes: int
    head_channels: int
    student: dict[str, torch.Tensor]
    fusion: str  # "attention_avg" (the DSEC image + events model) or "attention" (the Dark Zurich image + ISR model)
    teacher: dict[str, torch.Tensor] | None
    cyclegan: dict[str, torch.Tensor] | None
    iteration: int = 0
    notes: list[str] = field(default_factory=list)



def import_cmda(path: str | Path, obj: Any | None = None, *, backbone: str | None = None,
                teacher_required: bool = False) -> CMDAImport:
    """Convert CMDA's released checkpoint at ``path`` (already loaded as ``obj`` if given).

    ``backbone``: the MiT size the caller needs (a file of another size is an InputError naming it).
    ``teacher_required``: a file without ``ema_model.*`` is an InputError (``--teacher``).
    """
    path = Path(path)
    obj = read_checkpoint_object(path) if obj is None else obj
    if not is_cmda_mmcv(obj):
        raise not_a_checkpoint_error(path, obj)
    sd = state_dict_of(obj)
    assert sd is not None
    notes: list[str] = []
    known = (STUDENT, TEACHER, CYCLEGAN, *SKIPPED_TOP)
    stray = [k for k in sd if not k.startswith(known)]
    skipped_top = {p: sum(k.startswith(p) for k in sd) for p in SKIPPED_TOP}
    student = map_model(sd, STUDENT)
    if student is None:
        raise InputError(path, "CMDA checkpoint has no student (model.*) weights")
    if stray:
        student.unexpected = stray + student.unexpected
    teacher = map_model(sd, TEACHER)
    if teacher is None and teacher_required:
        raise InputError(path, "--teacher: this CMDA checkpoint has no ema_model.* (teacher) weights; use the "
                         "student (drop --teacher)")
    found = detect_backbone(path, student.state, STUDENT)
    if backbone is not None and found != backbone:
        raise InputError(path, f"CMDA checkpoint is for {found}, this run uses {backbone} (pass --backbone {found})")
    seg = student.state.get("decode_head.conv_seg.weight")
    classes, channels = (int(seg.shape[0]), int(seg.shape[1])) if seg is not None and seg.ndim == 4 else (19, 256)
    fusion = detect_fusion(student.state)
    for prefix, m in ((STUDENT, student), (TEACHER, teacher)):
        if m is not None:
            check_model(path, m, prefix, found, classes, channels, fusion)
            if m.differing:
                notes.append(f"warning: {len(m.differing)} tensor(s) of the events/fusion copies of the shared head "
                             f"differ from the image group, e.g. {m.differing[0]}; cmda's single head uses the "
                             f"{prefix}decode_head.*_image weights")
    skipped = {**student.skipped, **(teacher.skipped if teacher else {})}
    skipped.update({p: n for p, n in skipped_top.items() if n})
    if skipped:
        why = {**{STUDENT + s: w for s, w in SKIPPED_IN_MODEL.items()}, **{TEACHER + s: w for s, w in
               SKIPPED_IN_MODEL.items()}, **SKIPPED_TOP}
        notes.append("skipped unused groups: " + "; ".join(f"{p}* ({n} keys, {why[p]})" for p, n in skipped.items()))
    if teacher is None:
        notes.append("no ema_model.* in the file: there is no teacher")
    gan = check_cyclegan(path, sd)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    iteration = meta.get("iter") if isinstance(meta, Mapping) else None
    return CMDAImport(path=path, backbone=found, num_classes=classes, head_channels=channels,
                      student=student.state, fusion=fusion, teacher=teacher.state if teacher else None, cyclegan=gan,
                      iteration=int(iteration) if isinstance(iteration, int) else 0, notes=notes)


# ---------------------------------------------------------------------- cmda's checkpoint format
def as_cmda_checkpoint(imp: CMDAImport) -> dict[str, Any]:
    """The import in cmda's checkpoint format (train/checkpoints/files.py): no optimiser and no RNG state, so it can
    be evaluated, predicted with and trained from (``--init``), but not resumed."""

    cfg = TrainConfig()
    if imp.fusion == "attention":  # CMDA's one image + ISR config is Cityscapes -> Dark Zurich
        apply_target(cfg, "darkzurich")
    cfg.model.backbone = imp.backbone
    cfg.model.num_classes = imp.num_classes
    cfg.model.head_channels = imp.head_channels
    return {
        "format": FORMAT,
        "iteration": imp.iteration,
        "backbone": imp.backbone,
        "variant": cfg.run.variant,
        "source_only": False,
        "student": {k: v.contiguous() for k, v in imp.student.items()},
        "teacher": {k: v.contiguous() for k, v in imp.teacher.items()} if imp.teacher is not None else None,
        "optimizer": None,
        "rng": None,
        "config": to_dict(cfg),
        "cyclegan": imp.cyclegan,
        "imported_from": {"path": str(imp.path), "layout": "CMDA mmcv checkpoint", "notes": imp.notes},
    }


def load_any_checkpoint(path: str | Path, *, teacher: bool = False, say=None) -> dict[str, Any]:
    """A cmda checkpoint as :func:`train.checkpoints.files.load_checkpoint` returns it, from either layout.

    CMDA's released files are converted in memory (``say`` prints the notes, default: stderr). Anything
    else is an InputError that says what the file looks like and what is missing.
    """
    path = Path(path)
    obj = read_checkpoint_object(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj)
    if not is_cmda_mmcv(obj):
        raise not_a_checkpoint_error(path, obj)
    imp = import_cmda(path, obj, teacher_required=teacher)
    for note in imp.notes:
        (say or _stderr)(f"{path}: {note}")
    return as_cmda_checkpoint(imp)


def _stderr(msg: str) -> None:
    """One line on stderr that does not break progress bars."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def convert(path: str | Path, out: str | Path, say=None) -> CMDAImport:
    """``cmda convert``: write CMDA's checkpoint at ``path`` in cmda's format at ``out`` (atomically)."""
    path, out = Path(path), Path(out)
    obj = read_checkpoint_object(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise InputError(path, "already a cmda checkpoint; nothing to convert")
    imp = import_cmda(path, obj)
    for note in imp.notes:
        (say or print)(note)
    with atomic_path(out) as tmp:
        torch.save(as_cmda_checkpoint(imp), tmp)
    return imp


def _fusion_mismatch(path: Path, found: str, fusion: str) -> InputError:
    kind = {"attention_avg": "an image + events model (AttentionAvgFusion)",
            "attention": "an image + ISR model (AttentionFusion)"}
    return InputError(path, f"checkpoint is {kind.get(found, found)}, this run trains {kind.get(fusion, fusion)} "
                      "(model.fusion; --target darkzurich|acdc selects the image + ISR model)")


def init_weights(path: str | Path, backbone: str, num_classes: int, head_channels: int,
                 say=None, fusion: str = "attention_avg") -> dict[str, torch.Tensor]:
    """Student weights to start training from (``cmda train --init``), from a cmda or a CMDA checkpoint,
    refused with a one-line reason when their size or fusion module does not fit the run's model."""
    path = Path(path)
    obj = read_checkpoint_object(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("backbone") != backbone:
            raise InputError(path, f"checkpoint is for {obj.get('backbone')}, this run uses {backbone}")
        found = ((obj.get("config") or {}).get("model") or {}).get("fusion", "attention_avg")
        if found != fusion:
            raise _fusion_mismatch(path, found, fusion)
        weights = obj.get("student")
        if not isinstance(weights, Mapping):
            raise InputError(path, "checkpoint holds no student weights")
        return dict(weights)
    if not is_cmda_mmcv(obj):
        raise not_a_checkpoint_error(path, obj)
    imp = import_cmda(path, obj, backbone=backbone)
    if imp.fusion != fusion:
        raise _fusion_mismatch(path, imp.fusion, fusion)
    if (imp.num_classes, imp.head_channels) != (num_classes, head_channels):
        raise InputError(path, f"CMDA checkpoint has {imp.num_classes} classes and a head width of "
                         f"{imp.head_channels}; this run uses {num_classes} and {head_channels} "
                         "(model.num_classes, model.head_channels)")
    for note in imp.notes:
        (say or print)(note)
    return imp.student
