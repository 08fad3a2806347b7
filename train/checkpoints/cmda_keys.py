"""CMDA's names for cmda's model: the renames of one model's keys (student ``model.*`` or teacher ``ema_model.*``)
onto :class:`CMDAModel`, the MiT size and fusion module read from the keys, and the strict comparison of the renamed
keys and the CycleGAN generator's with the shapes cmda's modules have. The file as a whole (reading, recognising,
converting) is :mod:`train.checkpoints.cmda_layout`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import InputError
from train.models import CMDAModel
from train.models.cyclegan import ResnetGenerator
from train.models.weights import guess_mit_variant, key_listing

STUDENT, TEACHER, CYCLEGAN = "model.", "ema_model.", "cyclegan_itrd2en."
SKIPPED_IN_MODEL = {
    "fusion_isr_module.": "CMDA's ISR attention fusion, built by its config but unused by the DSEC model",
}
SKIPPED_TOP = {"imnet_model.": "the frozen ImageNet encoder of the feature distance"}
RENAMES = (  # (CMDA name prefix, cmda name prefix), after the model prefix
    ("backbone_image.", "backbone_image."),
    ("backbone_events.", "backbone_events."),
    ("fusion_module.basic_block.", "fusion_module.blocks."),
    ("fusion_module.linear_block.", "fusion_module.mlps."),
    ("decode_head.embed_layers_image.", "decode_head.embed_layers."),
    ("decode_head.fuse_layer_image.", "decode_head.fuse_layer."),
    ("decode_head.conv_seg.", "decode_head.conv_seg."),
)
SHARED = re.compile(r"^decode_head\.(embed_layers|fuse_layer)_(events|fusion)\.(.+)$")
CMDA_MARKERS = (STUDENT + "backbone_image.", STUDENT + "decode_head.", TEACHER + "backbone_image.")
LIST_MAX = 8


def listing(keys: list[str]) -> str:
    """``[a, b, ... (N more)]``: the first ``LIST_MAX`` keys of an error message's list."""
    return key_listing(keys, LIST_MAX)


# ---------------------------------------------------------------------- renaming one model
def cmda_to_ours(rest: str) -> str | None:
    """cmda name of a CMDA key (model prefix removed), None when no rename rule applies."""
    for src, dst in RENAMES:
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def ours_to_cmda(name: str) -> str:
    """CMDA name (without model prefix) of a cmda key, for messages."""
    for src, dst in RENAMES:
        if name.startswith(dst):
            return src + name[len(dst):]
    return name


@dataclass
class MappedModel:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def map_model(sd: Mapping[str, torch.Tensor], prefix: str) -> MappedModel | None:
    """Rename the keys under ``prefix`` (``model.`` or ``ema_model.``) onto cmda's names; None if there are none."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sub:
        return None
    m = MappedModel()
    shared: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for rest, value in sub.items():
        skip = next((s for s in SKIPPED_IN_MODEL if rest.startswith(s)), None)
        if skip is not None:
            m.skipped[prefix + skip] = m.skipped.get(prefix + skip, 0) + 1
            continue
        dup = SHARED.match(rest)
        if dup:
            shared.setdefault((dup.group(1), dup.group(2)), {})[dup.group(3)] = value
            continue
        name = cmda_to_ours(rest)
        if name is None:
            m.unexpected.append(prefix + rest)
        else:
            m.state[name] = value
    # the events / fusion copies of the shared head: same keys and values as the image group
    for kind in ("embed_layers", "fuse_layer"):
        ours = f"decode_head.{kind}."
        image = {k[len(ours):]: v for k, v in m.state.items() if k.startswith(ours)}
        for branch in ("events", "fusion"):
            group = shared.get((kind, branch), {})
            where = f"{prefix}decode_head.{kind}_{branch}."
            m.missing += [where + k for k in image if k not in group]
            for k, v in group.items():
                if k not in image:
                    m.unexpected.append(where + k)
                elif v.shape != image[k].shape or not torch.equal(v, image[k]):
                    m.differing.append(where + k)
    return m


# ---------------------------------------------------------------------- checking against cmda's model
def detect_backbone(path: Path, state: Mapping[str, torch.Tensor], prefix: str) -> str:
    """MiT size of ``backbone_image`` and ``backbone_events`` (must agree); InputError naming what was found."""

    found = {}
    for enc in ("backbone_image", "backbone_events"):
        sub = {k[len(enc) + 1:]: v for k, v in state.items() if k.startswith(enc + ".")}
        if not sub:
            continue
        guess = guess_mit_variant(sub)
        if guess is None:
            depths = [len({k.split(".")[1] for k in sub if k.startswith(f"block{s}.")}) for s in range(1, 5)]
            widths = [int(sub[f"norm{s}.weight"].shape[0]) if f"norm{s}.weight" in sub else 0 for s in range(1, 5)]
            raise InputError(path, f"{prefix}{enc} is no MiT-B0..B5: depths {depths}, widths {widths}")
        found[enc] = guess
    if not found:
        raise InputError(path, f"CMDA checkpoint has no {prefix}backbone_image.* or {prefix}backbone_events.* keys")
    if len(set(found.values())) > 1:
        raise InputError(path, f"{prefix}backbone_image is {found.get('backbone_image')} but {prefix}backbone_events "
                         f"is {found.get('backbone_events')}")
    return next(iter(found.values()))


def detect_fusion(state: Mapping[str, torch.Tensor]) -> str:
    """``attention`` when the renamed student holds AttentionFusion's Mlps (CMDA's image + ISR model),
    else ``attention_avg`` (its DSEC image + events model)."""
    return "attention" if any(k.startswith("fusion_module.mlps.") for k in state) else "attention_avg"


@functools.lru_cache(maxsize=4)
def model_shapes(backbone: str, classes: int, channels: int, fusion: str = "attention_avg"
                 ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of cmda's CMDAModel of that size (built on the meta device: no memory, no init)."""

    with torch.device("meta"):
        model = CMDAModel(backbone, num_classes=classes, head_channels=channels, fusion=fusion)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_model(path: Path, m: MappedModel, prefix: str, backbone: str, classes: int, channels: int,
                 fusion: str = "attention_avg") -> None:
    """Strict comparison of the renamed keys with cmda's model of that size and fusion."""
    expected = model_shapes(backbone, classes, channels, fusion)
    missing = m.missing + [prefix + ours_to_cmda(k) for k in expected if k not in m.state]
    unexpected = m.unexpected + [prefix + ours_to_cmda(k) for k in m.state if k not in expected]
    shapes = [f"{prefix}{ours_to_cmda(k)}: file {tuple(v.shape)} vs model {expected[k]}"
              for k, v in m.state.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) that map nowhere {listing(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) {listing(missing)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) {listing(shapes)}")
        raise InputError(path, f"CMDA checkpoint ({backbone}) does not fit cmda's {backbone} model: "
                         + "; ".join(parts))


def check_cyclegan(path: Path, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:

    state = {k[len(CYCLEGAN):]: v for k, v in sd.items() if k.startswith(CYCLEGAN)}
    if not state:
        return None
    with torch.device("meta"):
        expected = ResnetGenerator().state_dict()
    missing = [CYCLEGAN + k for k in expected if k not in state]
    unexpected = [CYCLEGAN + k for k in state if k not in expected]
    shapes = [f"{CYCLEGAN}{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise InputError(path, "CMDA checkpoint's CycleGAN generator does not fit the ResNet-9 1->1 generator: "
                         f"missing {listing(missing)}, unexpected {listing(unexpected)}, shapes {listing(shapes)}")
    return state
