"""Training configuration: typed dataclasses, named variant presets, YAML and key=value overrides.

Defaults reproduce CMDA's published Cityscapes -> DSEC night run (MiT-B5, 40k iterations, batch
2+2, crop 512, AdamW 6e-5, warmup 1500 + poly). A run is: defaults -> variant preset -> optional
YAML file -> ``--set section.key=value`` pairs -> dedicated CLI flags, each layer overriding the
last. The resolved config is saved with every run and checkpoint, so a run can be reproduced and
a checkpoint can be refused when it does not match.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
    # Fusion of the two encoders' stages: "attention_avg" (CMDA's DSEC model: one block per encoder, then
    # the mean) or "attention" (CMDA's image + ISR model: one block on concat(image, ISR) of width 2C, then
    # an Mlp 2C -> C -> C); `--target darkzurich|acdc` selects "attention".
    fusion: str = "attention_avg"


@dataclass
class DataConfig:
    datasets: Path = Path("datasets.yaml")
    # Night target: "dsec" (images + events, the default) or an image-only target, "darkzurich" or
    # "acdc" (the second encoder gets the night image's ISR; train/night_data.py). `--target` also applies
    # CMDA's cs2dz settings (TARGET_SETTINGS); `--set data.target=...` changes only this field.
    target: str = "dsec"
    # Image-only targets: each image resized to (w, h) first (CMDA: 1920x1080 -> 960x540), then a random
    # `crop` x `crop` window and flip for training; val and test images are scored at this size.
    target_resize: tuple[int, int] = (960, 540)
    source_resize: tuple[int, int] = (1024, 512)  # (w, h) Cityscapes 2048x1024 -> 1024x512
    # "pil": as CMDA's loader (PIL bilinear, antialiased when shrinking; labels PIL nearest);
    # "cv2": cv2 INTER_LINEAR / INTER_NEAREST (no antialiasing; cmda's earlier loader, faster).
    source_resize_impl: str = "pil"
    crop: int = 512  # source crop and target output size
    # DAFormer's config re-crops while one class covers more than this share (0.75); CMDA's crops
    # once (1.0 = off).
    cat_max_ratio: float = 1.0
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
    # "share": DACS's rule, one weight = the share of pixels with confidence >= pseudo_threshold;
    # "adaptive": per-class thresholds min(running median confidence, adaptive_cap), pixels below
    # ignored (train/adaptive_threshold.py; `--set dacs.pseudo_threshold=adaptive` selects it too).
    pseudo_mode: str = "share"
    adaptive_cap: float = 0.9
    jitter_p: float = 0.8  # applied when U(0, 1) > 1 - p, one draw per batch (CMDA: > 0.2)
    jitter: float = 0.2  # brightness/contrast/saturation/hue strength
    # "cmda": kornia 0.5.8's ColorJitter as CMDA ran it (additive brightness, contrast a pure scale,
    # saturation/hue in HSV, random order), per sample; "kornia": today's kornia ColorJitter.
    jitter_impl: str = "cmda"
    classmix_per_sample: bool = True  # CMDA: each sample draws its own half of the batch's classes
    # Rows at the top / bottom of the pseudo weight map set to 0 (CMDA DSEC: 0 / 0; DAFormer and
    # CMDA's Dark Zurich config: 15 / 120).
    pseudo_weight_ignore_top: int = 0
    pseudo_weight_ignore_bottom: int = 0
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
class MicConfig:
    """Masked image consistency (FACTS §12, train/mic.py): a fifth pass on the masked target batch."""

    enabled: bool = False
    lambda_: float = 1.0  # `mic.lambda`: weight of the MIC loss
    block: int = 32  # mask block size in pixels (MIC: 64 at 1024 crops, 32 at DAFormer's 512)
    ratio: float = 0.7  # share of blocks hidden
    events: str = "same"  # same: the image's mask; independent: a fresh mask; none: events unmasked


# Cityscapes trainIds of DSRNSS's tail-class bank: rider, truck, bus, motorcycle, bicycle.
TAIL_CLASSES: tuple[int, ...] = (12, 14, 15, 17, 18)


@dataclass
class DsrConfig:
    """DSRNSS's three pieces (FACTS §13, train/dsr.py): grouped ClassMix, the tail-class bank, prototype
    alignment. Everything is off unless ``enabled``; each piece then has its own switch."""

    enabled: bool = False
    grouped_mix: bool = True          # ClassMix picks bring their companions (train.dsr.COMPANIONS)
    bank: bool = True                 # tail-class bank pasted onto the mixed sample
    bank_classes: tuple[int, ...] = TAIL_CLASSES
    bank_capacity: int = 3            # source batches kept (oldest out); DSRNSS keeps ~3
    paste_every: int = 5              # paste at iterations where it % paste_every == 0 (0 = never)
    proto_weight: float = 0.1         # DSRNSS's 0.1 on each direction; 0 switches the term off
    proto_start: int = 0              # first iteration with the prototype terms (DSRNSS: after 8 epochs)
    proto_scale: float = 10.0         # cosine similarity x 10 -> logits
    proto_mix_factor: float = 0.1     # (source, mixed) term relative to (source, target): DSRNSS's / 10
    proto_class_weight: float = 2.0   # CE class weight of the dynamic/small classes (1.0 = DSRNSS's uniform)
    proto_features: str = "fusion"    # which branch's deepest features are aligned: "fusion" or "image"
    num_classes: int = 19             # must equal model.num_classes


@dataclass
class DidaConfig:
    """DIDA's instance bank and calibrated instance soft CE (FACTS §13, train/dida.py). Off unless ``enabled``."""

    enabled: bool = False
    bank_size: int = 300         # K instances, class-balanced
    dim: int = 256               # decoder embedding channels: must equal model.head_channels
    num_classes: int = 19        # must equal model.num_classes
    momentum: float = 0.999      # EMA of a slot towards its class's boundary mean
    update_every: int = 50       # EMA update interval (empty slots are filled whenever possible)
    boundary_min_labels: int = 2 # distinct labels in a 3x3 window that make a pixel 'boundary'
    weight: float = 0.5          # DIDA's ins_lambda
    calibrate: str = "prob"      # "prob" (student softmax), "logit" (DIDA's raw logits) or "none"
    target_only: bool = True     # loss on the mixed image's target pixels only (False = DIDA: all)
    chunk: int = 0               # pixels per chunk for the similarity maps (0 = all at once)


@dataclass
class AdvConfig:
    """Output-space adversarial training with the light discriminator (FACTS §13, train/adversarial.py).
    Off unless ``enabled``."""

    enabled: bool = False
    light: bool = True         # depthwise-separable discriminator (False: AdaptSegNet's standard one)
    ndf: int = 64
    weight: float = 1e-3       # lambda_adv on the target predictions
    lr: float = 1e-4           # discriminator Adam
    betas: tuple[float, float] = (0.9, 0.99)
    power: float = 0.9         # poly decay of the discriminator lr (0 = constant)
    input: str = "mixed"       # "mixed": the mixed pass's target pixels; "target": an extra student target pass
    upsample: int = 1          # resize factor of the logits before D (4 = full resolution, as the project)


@dataclass
class RunConfig:
    variant: str = "baseline"
    source_only: bool = False
    iters: int = 40_000
    batch: int = 2  # per domain: 2 source + 2 target
    # Gradient accumulation: the batch runs as `accum` equal micro-batches with one optimiser step,
    # pseudo-labels, ClassMix and augmentation drawn on the full batch (exact but for BatchNorm).
    accum: int = 1
    seed: int = 0
    out: Path | None = None  # default runs/<date>-<variant>
    device: str = "auto"  # auto: cuda if available
    amp: bool = True  # bf16 autocast on CUDA (CPU always fp32); CMDA trains in fp32
    # TF32 matmuls/convolutions on CUDA (Ampere+). CMDA sets nothing (PyTorch's defaults then: TF32
    # off for matmuls). run.amp=false + run.tf32=false is true fp32. Set for the run, then restored.
    tf32: bool = True
    channels_last: bool = True
    compile: bool = False
    # cudnn.benchmark on CUDA: autotuned convolution algorithms (faster, not bitwise repeatable).
    # Process-wide torch state: the trainer sets it for the run and restores it afterwards.
    cudnn_benchmark: bool = True
    log_every: int = 50
    eval_every: int = 4000
    ckpt_every: int = 4000
    # Keep only the newest N iter_*.pt (0 = all; best.pt is never pruned). A MiT-B5 checkpoint with the
    # teacher and AdamW state is over a GB, and CMDA's 40k iterations at ckpt_every 4000 write ten.
    keep_ckpts: int = 0
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
    mic: MicConfig = field(default_factory=MicConfig)
    dsr: DsrConfig = field(default_factory=DsrConfig)
    dida: DidaConfig = field(default_factory=DidaConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)


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
    # Memory presets for MiT-B5 at CMDA's batch 2+2 and crop 512 on one GPU (the recipe unchanged:
    # gradient accumulation instead of a halved batch). ESTIMATES until benchmarks/gpu_suite.py has
    # measured them on a card of that size; bf16 autocast (run.amp) is assumed on.
    "24gb": {"run.accum": 2},
    "16gb": {"run.accum": 2, "model.checkpoint": True},
    "11gb": {"run.accum": 2, "model.checkpoint": True, "run.channels_last": True},
}

#: Presets that only concern GPU memory (a CPU run says so and goes on).
GPU_PRESETS = ("24gb", "16gb", "11gb")


#: Night targets: DSEC (images + events) and the image-only targets (FACTS section 14).
TARGETS = ("dsec", "darkzurich", "acdc")
IMAGE_ONLY_TARGETS = ("darkzurich", "acdc")
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
    if target in IMAGE_ONLY_TARGETS:
        for key, value in TARGET_SETTINGS.items():
            set_value(cfg, key, value)
        scale = cfg.data.source_resize[0] / 1024
        cfg.data.target_resize = (round(960 * scale), round(540 * scale))
        h = cfg.data.target_resize[1]
        cfg.dacs.pseudo_weight_ignore_top, cfg.dacs.pseudo_weight_ignore_bottom = (
            round(r * h / 540) for r in PSEUDO_IGNORE_ROWS_AT_540)
    return cfg


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


FUSIONS = ("attention_avg", "attention")
# L2 terms and the event mask of the study (FACTS section 9) defined on event-camera input: refused for
# image-only targets, whose second encoder sees ISR (a different study, never measured).
EVENT_FEATURE_TERMS = ("rgb_event_src", "event_s_rgb_t", "event_st", "mask_events")
BACKBONES = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def parse_device(spec: str) -> tuple[str, int | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, index or None); anything else is an InputError.

    Pure syntax (no torch, no CUDA query), so options are checked where they are parsed; whether
    CUDA is present is :func:`train.inference.resolve_device`'s question.
    """
    m = _DEVICE.fullmatch(str(spec).strip())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise InputError(None, f"run.device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise InputError(None, f"{key} must be {rule}, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value's range once all layers (variant, preset, file, --set, flags) are applied.

    Types are already checked by :func:`set_value`; this catches what a type cannot say (an
    iteration count of 0, a NaN learning rate, an unknown backbone) as one InputError naming the
    setting, before any data or model is touched.
    """
    r, m, d, o, dc, ls = cfg.run, cfg.model, cfg.data, cfg.optim, cfg.dacs, cfg.loss
    _check(r.variant in VARIANTS, "run.variant", r.variant, f"one of {', '.join(VARIANTS)}")
    _check(m.backbone in BACKBONES, "model.backbone", m.backbone, f"one of {', '.join(BACKBONES)}")
    parse_device(r.device)
    for key in ("iters", "batch", "log_every", "eval_every", "ckpt_every"):
        _check(getattr(r, key) >= 1, f"run.{key}", getattr(r, key), ">= 1")
    _check(r.eval_max >= 0, "run.eval_max", r.eval_max, ">= 0 (0 = every test frame)")
    _check(r.keep_ckpts >= 0, "run.keep_ckpts", r.keep_ckpts, ">= 0 (0 = keep every checkpoint)")
    _check(m.num_classes >= 1, "model.num_classes", m.num_classes, ">= 1")
    _check(m.head_channels >= 1, "model.head_channels", m.head_channels, ">= 1")
    for key in ("drop_path", "fusion_drop_path"):
        _check(_finite(getattr(m, key)) and 0 <= getattr(m, key) < 1, f"model.{key}", getattr(m, key), "in [0, 1)")
    _check(d.crop >= 1, "data.crop", d.crop, ">= 1")
    _check(d.target_crop >= 1, "data.target_crop", d.target_crop, ">= 1")
    _check(min(d.source_resize) >= 1, "data.source_resize", d.source_resize, "two sizes >= 1")
    _check(d.workers >= 0, "data.workers", d.workers, ">= 0 (0 = load in the main process)")
    _check(d.test_rows >= 1, "data.test_rows", d.test_rows, ">= 1")
    _check(_finite(d.test_scale) and d.test_scale > 0, "data.test_scale", d.test_scale, "a number > 0")
    for key in ("flip", "cat_max_ratio"):
        _check(_finite(getattr(d, key)) and 0 <= getattr(d, key) <= 1, f"data.{key}", getattr(d, key), "in [0, 1]")
    for key in ("target_crop_x", "target_crop_y"):
        lo, hi = getattr(d, key)
        _check(0 <= lo <= hi, f"data.{key}", getattr(d, key), "[low, high] with 0 <= low <= high")
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "a number > 0")
    for key in ("weight_decay", "min_lr", "warmup_ratio"):
        _check(_finite(getattr(o, key)) and getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "a number >= 0")
    _check(_finite(o.head_lr_mult) and o.head_lr_mult > 0, "optim.head_lr_mult", o.head_lr_mult, "a number > 0")
    _check(all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1)")
    _check(o.warmup_iters >= 0, "optim.warmup_iters", o.warmup_iters, ">= 0")
    _check(_finite(o.power) and o.power >= 0, "optim.power", o.power, "a number >= 0")
    for key in ("ema_alpha", "pseudo_threshold", "jitter_p", "blur_p", "teacher_events_p", "fd_scale_min_ratio"):
        _check(_finite(getattr(dc, key)) and 0 <= getattr(dc, key) <= 1, f"dacs.{key}", getattr(dc, key), "in [0, 1]")
    _check(_finite(dc.fd_lambda) and dc.fd_lambda >= 0, "dacs.fd_lambda", dc.fd_lambda, "a number >= 0")
    for f in dataclasses.fields(ls):
        v = getattr(ls, f.name)
        _check(_finite(v) and v >= 0, f"loss.{f.name}", v, "a number >= 0")
    _check(ls.mask_events <= 1, "loss.mask_events", ls.mask_events, "in [0, 1]")
    _check(ls.mask_block >= 1, "loss.mask_block", ls.mask_block, ">= 1")
    _check(r.accum >= 1 and r.batch % r.accum == 0, "run.accum", r.accum,
           f"a divisor of run.batch ({r.batch}): the batch is split into that many equal micro-batches")
    _check(dc.pseudo_mode in ("share", "adaptive"), "dacs.pseudo_mode", dc.pseudo_mode, "share or adaptive")
    _check(_finite(dc.adaptive_cap) and 0 < dc.adaptive_cap <= 1, "dacs.adaptive_cap", dc.adaptive_cap, "in (0, 1]")
    mc = cfg.mic
    _check(_finite(mc.lambda_) and mc.lambda_ >= 0, "mic.lambda", mc.lambda_, "a number >= 0")
    _check(mc.block >= 1, "mic.block", mc.block, ">= 1")
    _check(_finite(mc.ratio) and 0 <= mc.ratio < 1, "mic.ratio", mc.ratio, "in [0, 1)")
    _check(mc.events in ("same", "independent", "none"), "mic.events", mc.events, "same, independent or none")
    _check(m.fusion in FUSIONS, "model.fusion", m.fusion, f"one of {', '.join(FUSIONS)}")
    _check(d.target in TARGETS, "data.target", d.target, f"one of {', '.join(TARGETS)}")
    _check(min(d.target_resize) >= d.crop, "data.target_resize", d.target_resize,
           f"two sizes >= data.crop ({d.crop}): training crops are cut from the resized image")
    if image_only(cfg):
        needs = [k for k in EVENT_FEATURE_TERMS if getattr(ls, k)]
        _check(not needs, "loss." + (needs[0] if needs else ""), [getattr(ls, k) for k in needs],
               f"0 with data.target={d.target}: {', '.join(needs)} compare event-camera features and "
               f"{d.target} has no events (image-only targets allow fusion_st and rgb_st)")
    rc = cfg.rcs
    _check(_finite(rc.temperature) and rc.temperature > 0, "rcs.temperature", rc.temperature, "a number > 0")
    _check(rc.min_pixels >= 0, "rcs.min_pixels", rc.min_pixels, ">= 0")
    _validate_peers(cfg)
    return cfg


def _validate_peers(cfg: TrainConfig) -> None:
    """The peer components' settings (``dsr.*``, ``dida.*``, ``adv.*``), checked only when switched on."""
    on = [name for name in ("dsr", "dida", "adv") if getattr(cfg, name).enabled]
    if on and cfg.run.source_only:
        raise InputError(None, f"{', '.join(f'{n}.enabled' for n in on)} needs the DACS teacher and the mixed pass, "
                         "which a source-only run (run.source_only) does not have")
    m, s, di, a = cfg.model, cfg.dsr, cfg.dida, cfg.adv
    if s.enabled:
        _check(s.num_classes == m.num_classes, "dsr.num_classes", s.num_classes,
               f"model.num_classes ({m.num_classes})")
        _check(all(0 <= c < m.num_classes for c in s.bank_classes), "dsr.bank_classes", s.bank_classes,
               f"class ids in [0, {m.num_classes})")
        _check(s.bank_capacity >= 1, "dsr.bank_capacity", s.bank_capacity, ">= 1")
        _check(s.paste_every >= 0, "dsr.paste_every", s.paste_every, ">= 0 (0 = never paste)")
        _check(s.proto_start >= 0, "dsr.proto_start", s.proto_start, ">= 0")
        for key in ("proto_weight", "proto_mix_factor"):
            _check(_finite(getattr(s, key)) and getattr(s, key) >= 0, f"dsr.{key}", getattr(s, key), "a number >= 0")
        for key in ("proto_scale", "proto_class_weight"):
            _check(_finite(getattr(s, key)) and getattr(s, key) > 0, f"dsr.{key}", getattr(s, key), "a number > 0")
        _check(s.proto_features in ("fusion", "image"), "dsr.proto_features", s.proto_features, "fusion or image")
    if di.enabled:
        _check(di.dim == m.head_channels, "dida.dim", di.dim,
               f"model.head_channels ({m.head_channels}): the bank holds the head's embeddings "
               f"(add --set dida.dim={m.head_channels})")
        _check(di.num_classes == m.num_classes, "dida.num_classes", di.num_classes,
               f"model.num_classes ({m.num_classes})")
        _check(di.bank_size >= di.num_classes, "dida.bank_size", di.bank_size,
               f">= dida.num_classes ({di.num_classes}): at least one slot per class")
        _check(_finite(di.momentum) and 0 <= di.momentum <= 1, "dida.momentum", di.momentum, "in [0, 1]")
        _check(di.update_every >= 0, "dida.update_every", di.update_every, ">= 0 (0 = no EMA update)")
        _check(di.boundary_min_labels >= 1, "dida.boundary_min_labels", di.boundary_min_labels, ">= 1")
        _check(_finite(di.weight) and di.weight >= 0, "dida.weight", di.weight, "a number >= 0")
        _check(di.calibrate in ("prob", "logit", "none"), "dida.calibrate", di.calibrate, "prob, logit or none")
        _check(di.chunk >= 0, "dida.chunk", di.chunk, ">= 0 (0 = all pixels at once)")
    if a.enabled:
        _check(a.input in ("mixed", "target"), "adv.input", a.input,
               "mixed (the mixed pass's target pixels) or target (an extra student pass on the target image)")
        _check(a.ndf >= 1, "adv.ndf", a.ndf, ">= 1")
        _check(_finite(a.weight) and a.weight >= 0, "adv.weight", a.weight, "a number >= 0")
        _check(_finite(a.lr) and a.lr > 0, "adv.lr", a.lr, "a number > 0")
        _check(all(_finite(b) and 0 <= b < 1 for b in a.betas), "adv.betas", a.betas, "two numbers in [0, 1)")
        _check(_finite(a.power) and a.power >= 0, "adv.power", a.power, "a number >= 0")
        _check(a.upsample >= 1, "adv.upsample", a.upsample, ">= 1")
        # five stride-2 blocks: D needs 32 px of (1/4-resolution) logits
        _check(cfg.data.crop * a.upsample // 4 >= 32, "adv.upsample", a.upsample,
               f"large enough for 32 px of logits before the discriminator: data.crop ({cfg.data.crop}) x "
               "adv.upsample / 4 >= 32 (crop >= 128 at upsample 1)")


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
