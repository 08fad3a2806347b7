"""Training configuration: typed dataclasses, named variant presets, YAML and key=value overrides.

Defaults reproduce CMDA's published Cityscapes -> DSEC night run (MiT-B5, 40k iterations, batch
2+2, crop 512, AdamW 6e-5, warmup 1500 + poly). A run is: defaults -> variant preset -> optional
YAML file -> ``--set section.key=value`` pairs -> dedicated CLI flags, each layer overriding the
last. The resolved config is saved with every run and checkpoint, so a run can be reproduced and
a checkpoint can be refused when it does not match.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError


@dataclass
class ModelConfig:
    backbone: str = "mit_b5"
    # Official SegFormer ImageNet weights (original key layout): "auto" = pretrained/<backbone>.pth
    # if it exists (else random init, said once), "none" = random init, or a path that must exist.
    pretrained: str = "auto"
    # CycleGAN IC1 -> night-event generator: "auto" = pretrained/cityscapes_ICD_to_dsec_EN.pth if it
    # exists, "none" = IC1 used directly as the source events, or a path that must exist.
    cyclegan: str = "auto"
    # Start the student from these weights (cmda checkpoint or CMDA's released file; "" = no): the teacher is
    # a copy of it and the optimiser starts fresh. Overrides the ImageNet weights.
    init: str = ""
    num_classes: int = 19
    head_channels: int = 256  # DAFormer head width; smaller only for quick CPU runs
    drop_path: float = 0.1
    fusion_drop_path: float = 0.05
    checkpoint: bool = False  # recompute encoder blocks in backward (saves memory at MiT-B5)


@dataclass
class DataConfig:
    datasets: Path = Path("datasets.yaml")
    source_resize: tuple[int, int] = (1024, 512)  # (w, h) Cityscapes 2048x1024 -> 1024x512
    crop: int = 512  # source crop and target output size
    cat_max_ratio: float = 0.75  # DAFormer: re-crop if one class covers more than this share
    target_crop: int = 400  # DSEC crop before resizing to `crop`
    target_crop_x: tuple[int, int] = (0, 240)
    target_crop_y: tuple[int, int] = (0, 80)
    flip: float = 0.5
    test_rows: int = 440  # evaluation crops images, events and labels to the top rows
    # Evaluation resizes the test frames by this factor before the model (logits are scored at full
    # size). 1 for CMDA's setting (training crops of 400 resized to 512 ~ native scale); a run
    # trained on downscaled crops should test at that scale, e.g. 128/400 for crop 128.
    test_scale: float = 1.0
    workers: int = 2


@dataclass
class RcsConfig:
    enabled: bool = True
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0


@dataclass
class DacsConfig:
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    jitter_p: float = 0.8
    jitter: float = 0.2  # brightness/contrast/saturation/hue strength
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    teacher_events_p: float = 0.5  # teacher fuses the image with events (else with ISR)
    # ImageNet feature distance (DAFormer); 0 = off, as in CMDA's DSEC config.
    fd_lambda: float = 0.0
    fd_classes: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    fd_scale_min_ratio: float = 0.75


@dataclass
class LossConfig:
    """Segmentation loss weights (FACTS §7) and the L2 feature-loss lambdas (FACTS §9)."""

    fusion: float = 0.5
    image: float = 0.5
    isr: float = 0.25
    events: float = 0.25
    rgb_event_src: float = 0.0  # mse(src image feat, src event feat), both sides get gradient
    fusion_st: float = 0.0  # mse(mixed fusion feat, src fusion feat.detach())
    rgb_st: float = 0.0  # mse(mixed image feat, src image feat.detach())
    event_s_rgb_t: float = 0.0  # mse(mixed image feat, src event feat.detach())
    event_st: float = 0.0  # mse(mixed event feat, src event feat.detach())
    mask_events: float = 0.0  # share of the mixed pass's event input hidden by random blocks
    mask_block: int = 32  # block size (pixels) of the event mask


@dataclass
class RunConfig:
    variant: str = "baseline"
    source_only: bool = False
    iters: int = 40_000
    batch: int = 2  # per domain: 2 source + 2 target
    seed: int = 0
    out: Path | None = None  # default runs/<date>-<variant>
    device: str = "auto"  # auto: cuda if available
    amp: bool = True  # bf16 autocast on CUDA (CPU always fp32)
    channels_last: bool = True
    compile: bool = False
    log_every: int = 50
    eval_every: int = 4000
    ckpt_every: int = 4000
    eval_max: int = 0  # 0 = every test frame


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rcs: RcsConfig = field(default_factory=RcsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dacs: DacsConfig = field(default_factory=DacsConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# Named variants: loss lambdas from the L2 study (FACTS §9) on top of the baseline.
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
# MiT-B0 from scratch, a narrow head, small crops, short warmup and a higher lr.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-sample": {
        "model.backbone": "mit_b0",
        "model.head_channels": 64,
        "data.crop": 128,
        "data.source_resize": (256, 128),
        "data.test_scale": 0.32,
        "data.workers": 1,
        "rcs.min_pixels": 200,
        "optim.lr": 3e-4,
        "optim.warmup_iters": 30,
        "run.iters": 300,
        "run.eval_every": 100,
        "run.ckpt_every": 100,
        "run.log_every": 10,
    },
}


def apply_preset(cfg: TrainConfig, preset: str) -> TrainConfig:
    if preset not in PRESETS:
        raise InputError(None, f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    for key, value in PRESETS[preset].items():
        set_value(cfg, key, value)
    return cfg


def apply_variant(cfg: TrainConfig, variant: str) -> TrainConfig:
    if variant not in VARIANTS:
        raise InputError(None, f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    cfg.run.variant = variant
    for key, value in VARIANTS[variant].items():
        setattr(cfg.loss, key, value)
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
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg
