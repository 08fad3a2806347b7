"""The layers a run's settings are built from: variants, presets, targets, a YAML file, ``--set`` pairs.

A run is: defaults -> variant -> preset -> target -> settings file -> ``--set`` pairs -> dedicated CLI flags,
each layer overriding the last; :func:`to_dict` / :func:`from_dict` are the JSON form saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError
from train.config.settings import TrainConfig

#: CMDA's CycleGAN IC1 -> night-event generator file, used when present (``model.cyclegan: auto``).
DEFAULT_CYCLEGAN = Path("pretrained/cityscapes_ICD_to_dsec_EN.pth")


# Named variants: loss lambdas from the L2 study (the CMDA L2-loss study; docs/methods.md) on top of the baseline.
VARIANTS: dict[str, dict[str, float]] = {
    "baseline": {},
    "rgb_event_src": {"rgb_event_src": 0.1},
    "fusion_st": {"fusion_st": 0.05},
    "rgb_event_src+fusion_st": {"rgb_event_src": 0.1, "fusion_st": 0.05},
    "rgb_st+event_s_rgb_t": {"rgb_st": 0.1, "event_s_rgb_t": 0.05},
    "rgb_st+event_st": {"rgb_st": 0.1, "event_st": 0.05},
    # Announced by the study but never published; our design: rgb_st+event_s_rgb_t plus random
    # block masking of the event input on the mixed pass (a quarter of the area in 32 px blocks).
    "masked_event": {"rgb_st": 0.1, "event_s_rgb_t": 0.05, "mask_events": 0.25},
}


# Named groups of settings for other machines than CMDA's (applied after the variant, before
# --config-file/--set/flags). "cpu-sample": a few-minute CPU run on the bundled synthetic sample:
# MiT-B0 from scratch, a narrow head, small crops, short warmup and a higher lr. Two DACS settings
# are sample-scale, not CMDA's: a from-scratch MiT-B0 trained for 300 iterations is almost never
# 96.8 % confident at night (with 0.968 the pseudo weight stays near 0 and the night side carries no
# weight), so the threshold is 0.7; and the EMA teacher, which averages every student so far until
# alpha reaches its cap, is capped at 0.99 (a ~100-iteration memory) instead of 0.999 (~1000, more
# than the whole run).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-sample": {
        "model.backbone": "mit_b0",
        "model.head_channels": 64,
        "data.crop": 128,
        "data.source_resize": (256, 128),
        "data.test_scale": 0.32,
        "data.workers": 1,
        "rcs.min_pixels": 200,
        "dacs.pseudo_threshold": 0.7,
        "dacs.ema_alpha": 0.99,
        "mic.block": 8,  # MIC's 32 px blocks at crop 512, scaled to crop 128
        "optim.lr": 3e-4,
        "optim.warmup_iters": 30,
        "run.iters": 300,
        "run.eval_every": 100,
        "run.ckpt_every": 100,
        "run.log_every": 10,
    },
    # Every departure from CMDA's code that a setting can undo (docs/fidelity.md, "Differences from CMDA"),
    # turned to CMDA's: combine with another preset, e.g. --preset cpu-sample,cmda-exact (the sample-scale
    # pseudo threshold and EMA of cpu-sample stay: they are that preset's point, not a code difference).
    "cmda-exact": {
        "data.cmda_empty_part": True,
        "data.event_count": "cmda",
        "data.isr_direction": "cmda",
        "run.amp": False,
        "run.tf32": False,
    },
    # Memory presets for MiT-B5 at CMDA's batch 2+2 and crop 512 on one GPU (the recipe unchanged:
    # gradient accumulation instead of a halved batch). ESTIMATES until benchmarks/gpu_suite.py has
    # measured them on a card of that size; bf16 autocast (run.amp) is assumed on.
    "24gb": {"run.accum": 2},
    "16gb": {"run.accum": 2, "model.checkpoint": True},
    "11gb": {"run.accum": 2, "model.checkpoint": True, "run.channels_last": True},
}

#: Presets that only concern GPU memory (a CPU run says so and goes on).
GPU_PRESETS = ("24gb", "16gb", "11gb")


#: Night targets: DSEC (images + events) and the image-only targets (Dark Zurich, Sakaridis et al. ICCV 2019;
#: ACDC, Sakaridis et al. ICCV 2021).
TARGETS = ("dsec", "darkzurich", "acdc", "dsec-semantic")
IMAGE_ONLY_TARGETS = ("darkzurich", "acdc")
#: Targets segmented from events alone (DSEC-Semantic, ESS's protocol; docs/dsec-semantic.md).
EVENT_ONLY_TARGETS = ("dsec-semantic",)
# DSEC-Semantic: the event encoder and head alone, 11 classes, one output (weight 1: plain CE, as ESS).
EVENT_ONLY_SETTINGS: dict[str, Any] = {"model.num_classes": 11, "loss.events": 1.0, "loss.fusion": 0.0,
                                       "loss.image": 0.0, "loss.isr": 0.0}
# CMDA's cs2dz_image+raw-isr settings for image-only targets (configs/fusion/cs2dz_image+raw-isr_b5.py):
# loss weights 0.7 on the image, fusion and second-encoder ("events" = ISR) outputs; its 0.25
# `img_self_res` weight belongs to a third, separate ISR input that this model never gets, so the isr
# output's weight is 0. Pseudo-weight rows 15 / 120 are at 540 rows (scaled to data.target_resize).
TARGET_SETTINGS: dict[str, Any] = {
    "model.fusion": "attention",
    "loss.fusion": 0.7,
    "loss.image": 0.7,
    "loss.events": 0.7,
    "loss.isr": 0.0,
    "data.test_scale": 1.0,  # val/test images are already at data.target_resize
}
PSEUDO_IGNORE_ROWS_AT_540 = (15, 120)


def image_only(cfg: TrainConfig) -> bool:
    """True when the run's night target has no events (the second encoder gets the night image's ISR)."""
    return cfg.data.target in IMAGE_ONLY_TARGETS


def event_only(cfg: TrainConfig) -> bool:
    """True when the run segments from events alone (no image branch): DSEC-Semantic."""
    return cfg.data.target in EVENT_ONLY_TARGETS


def apply_target(cfg: TrainConfig, target: str) -> TrainConfig:
    """``--target``: the night data set and, for an image-only one, CMDA's cs2dz settings.

    CMDA shrinks both domains by the same factor (Cityscapes 2048 -> 1024, Dark Zurich 1920 -> 960), so
    ``data.target_resize`` follows ``data.source_resize`` (960x540 by default, 240x135 under
    ``--preset cpu-sample``'s 256x128), and the pseudo-weight rows (15 / 120 at 540 rows) follow that
    height; this layer therefore comes after ``--preset``.
    """
    if target not in TARGETS:
        raise InputError(None, f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    cfg.data.target = target
    if target in EVENT_ONLY_TARGETS:
        for key, value in EVENT_ONLY_SETTINGS.items():
            set_value(cfg, key, value)
    if target in IMAGE_ONLY_TARGETS:
        for key, value in TARGET_SETTINGS.items():
            set_value(cfg, key, value)
        scale = cfg.data.source_resize[0] / 1024
        cfg.data.target_resize = (round(960 * scale), round(540 * scale))
        h = cfg.data.target_resize[1]
        cfg.dacs.pseudo_weight_ignore_top, cfg.dacs.pseudo_weight_ignore_bottom = (
            round(r * h / 540) for r in PSEUDO_IGNORE_ROWS_AT_540)
    return cfg


def preset_names(preset: str) -> list[str]:
    """``a,b`` -> ["a", "b"]: presets combine, applied left to right (a later one wins on a shared key)."""
    return [p.strip() for p in preset.split(",") if p.strip()]


def apply_preset(cfg: TrainConfig, preset: str) -> TrainConfig:
    names = preset_names(preset)
    if not names:
        raise InputError(None, f"empty preset {preset!r}; choose from: {', '.join(PRESETS)}")
    for name in names:
        if name not in PRESETS:
            raise InputError(None, f"unknown preset {name!r}; choose one or more (comma-separated) of: "
                             f"{', '.join(PRESETS)}")
        for key, value in PRESETS[name].items():
            set_value(cfg, key, value)
    return cfg


def apply_variant(cfg: TrainConfig, variant: str) -> TrainConfig:
    if variant not in VARIANTS:
        raise InputError(None, f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    cfg.run.variant = variant
    for key, value in VARIANTS[variant].items():
        setattr(cfg.loss, key, value)
    return cfg


def apply_layers(cfg: TrainConfig, *, variant: str | None = None, preset: str | None = None,
                 settings: Path | None = None, sets: list[str] | tuple[str, ...] = (),
                 flags: dict[str, Any] | None = None, target: str | None = None) -> TrainConfig:
    """Apply the command line's layers onto ``cfg`` in the documented order: --variant, --preset,
    --target, --settings file, --set pairs, then the dedicated flags (None = not given)."""
    if variant is not None:
        apply_variant(cfg, variant)
    if preset is not None:
        apply_preset(cfg, preset)
    if target is not None:
        apply_target(cfg, target)
    if settings is not None:
        load_yaml_overrides(cfg, settings)
    for item in sets:
        if "=" not in item:
            raise InputError(None, f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    for key, value in (flags or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    return cfg


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return _coerce(inner, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise InputError(None, f"{where} needs {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp is Path:
            return Path(value)
        if tp in (int, float, str):
            return tp(value)
    except (TypeError, ValueError):
        raise InputError(None, f"{where}: {value!r} is not a valid {tp.__name__}") from None
    return value


def set_value(cfg: TrainConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` from a YAML value or a command-line string, with type checking."""
    parts = dotted.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]):
        raise InputError(None, f"unknown setting {dotted!r} (use section.key, sections: "
                         f"{', '.join(f.name for f in dataclasses.fields(cfg))})")
    if dotted == "mic.lambda":  # `lambda` is a Python keyword: the field is lambda_
        parts[1] = "lambda_"
    if dotted == "dacs.pseudo_threshold" and str(value).strip().lower() == "adaptive":
        cfg.dacs.pseudo_mode = "adaptive"
        return
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise InputError(None, f"unknown setting {dotted!r}; {parts[0]} has: {', '.join(hints)}")
    setattr(section, parts[1], _coerce(hints[parts[1]], value, dotted))


def load_yaml_overrides(cfg: TrainConfig, path: Path) -> TrainConfig:
    if not path.exists():
        raise InputError(path, "training config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "must be a mapping of sections (run, model, data, ...)")
    try:
        if "run" in data and "variant" in (data["run"] or {}):
            apply_variant(cfg, data["run"]["variant"])
        for section, values in data.items():
            if not isinstance(values, dict):
                raise InputError(path, f"section {section!r} must be a mapping")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
    except InputError as exc:
        raise InputError(path, exc.problem) from None
    return cfg


# Settings that say where and how fast a run goes (and how much disk it keeps), not what it computes: a
# resume may change them freely (another machine, another folder), every other setting must match the run's own.
MACHINE_KEYS = frozenset({"run.device", "run.out", "data.workers", "run.keep_ckpts"})


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """{section: {key: value}} -> {"section.key": value} (the names --set uses)."""
    return {f"{s}.{k}": v for s, values in data.items() if isinstance(values, dict) for k, v in values.items()}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """``{"section.key": [saved value, new value]}`` for every setting (but MACHINE_KEYS) that differs.

    Both sides are :func:`to_dict` output (or a checkpoint's stored config), so values compare as
    plain JSON values; a setting the saved config lacks (an older cmda) compares against its default.
    """
    default = flatten(to_dict(TrainConfig()))
    old, new = flatten(saved), flatten(now)
    out = {}
    for key in new:
        if key in MACHINE_KEYS:
            continue
        was = old.get(key, default.get(key))
        if was != new[key]:
            out[key] = [was, new[key]]
    return out


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    for section, values in data.items():
        if section == "history":  # config.json's record of earlier settings (resume --resume-override)
            continue
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg
