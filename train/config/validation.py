"""Range checks of a run's settings once every layer is applied (one InputError naming the setting)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pipeline.errors import InputError
from train.common.device import parse_device
from train.config.layers import TARGETS, VARIANTS, event_only, image_only
from train.config.settings import TrainConfig

FUSIONS = ("attention_avg", "attention")
# L2 terms and the event mask of the study (the CMDA L2-loss study) defined on event-camera input: refused for
# image-only targets, whose second encoder sees ISR (a different study, never measured).
EVENT_FEATURE_TERMS = ("rgb_event_src", "event_s_rgb_t", "event_st", "mask_events")
BACKBONES = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")


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
    for check in (_validate_run, _validate_model, _validate_data, _validate_optim, _validate_dacs, _validate_loss,
                  _validate_mic, _validate_event_only, _validate_target, _validate_peers, _validate_entropy):
        check(cfg)
    return cfg


def _validate_run(cfg: TrainConfig) -> None:
    r = cfg.run
    _check(r.variant in VARIANTS, "run.variant", r.variant, f"one of {', '.join(VARIANTS)}")
    parse_device(r.device)
    for key in ("iters", "batch", "log_every", "eval_every", "ckpt_every"):
        _check(getattr(r, key) >= 1, f"run.{key}", getattr(r, key), ">= 1")
    _check(0 <= r.seed < 2**31, "run.seed", r.seed, ">= 0 and < 2**31 (NumPy and PyTorch seeds are unsigned)")
    _check(r.eval_max >= 0, "run.eval_max", r.eval_max, ">= 0 (0 = every test frame)")
    _check(r.keep_ckpts >= 0, "run.keep_ckpts", r.keep_ckpts, ">= 0 (0 = keep every checkpoint)")
    _check(r.accum >= 1 and r.batch % r.accum == 0, "run.accum", r.accum,
           f"a divisor of run.batch ({r.batch}): the batch is split into that many equal micro-batches")


def _validate_model(cfg: TrainConfig) -> None:
    m = cfg.model
    _check(m.backbone in BACKBONES, "model.backbone", m.backbone, f"one of {', '.join(BACKBONES)}")
    _check(m.num_classes >= 1, "model.num_classes", m.num_classes, ">= 1")
    _check(m.head_channels >= 1, "model.head_channels", m.head_channels, ">= 1")
    for key in ("drop_path", "fusion_drop_path"):
        _check(_finite(getattr(m, key)) and 0 <= getattr(m, key) < 1, f"model.{key}", getattr(m, key), "in [0, 1)")
    _check(m.fusion in FUSIONS, "model.fusion", m.fusion, f"one of {', '.join(FUSIONS)}")


def _validate_data(cfg: TrainConfig) -> None:
    d, rc = cfg.data, cfg.rcs
    _check(d.crop >= 1, "data.crop", d.crop, ">= 1")
    _check(d.event_count in ("inclusive", "cmda"), "data.event_count", d.event_count, "inclusive or cmda")
    _check(d.isr_direction in ("random", "cmda"), "data.isr_direction", d.isr_direction, "random or cmda")
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
    _check(_finite(rc.temperature) and rc.temperature > 0, "rcs.temperature", rc.temperature, "a number > 0")
    _check(rc.min_pixels >= 0, "rcs.min_pixels", rc.min_pixels, ">= 0")


def _validate_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "a number > 0")
    for key in ("weight_decay", "min_lr", "warmup_ratio"):
        _check(_finite(getattr(o, key)) and getattr(o, key) >= 0, f"optim.{key}", getattr(o, key), "a number >= 0")
    _check(_finite(o.head_lr_mult) and o.head_lr_mult > 0, "optim.head_lr_mult", o.head_lr_mult, "a number > 0")
    _check(all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two numbers in [0, 1)")
    _check(o.warmup_iters >= 0, "optim.warmup_iters", o.warmup_iters, ">= 0")
    _check(_finite(o.power) and o.power >= 0, "optim.power", o.power, "a number >= 0")


def _validate_dacs(cfg: TrainConfig) -> None:
    dc = cfg.dacs
    for key in ("ema_alpha", "pseudo_threshold", "jitter_p", "blur_p", "teacher_events_p", "fd_scale_min_ratio"):
        _check(_finite(getattr(dc, key)) and 0 <= getattr(dc, key) <= 1, f"dacs.{key}", getattr(dc, key), "in [0, 1]")
    _check(_finite(dc.fd_lambda) and dc.fd_lambda >= 0, "dacs.fd_lambda", dc.fd_lambda, "a number >= 0")
    _check(dc.pseudo_mode in ("share", "adaptive"), "dacs.pseudo_mode", dc.pseudo_mode, "share or adaptive")
    _check(_finite(dc.adaptive_cap) and 0 < dc.adaptive_cap <= 1, "dacs.adaptive_cap", dc.adaptive_cap, "in (0, 1]")


def _validate_loss(cfg: TrainConfig) -> None:
    ls = cfg.loss
    for f in dataclasses.fields(ls):
        v = getattr(ls, f.name)
        _check(_finite(v) and v >= 0, f"loss.{f.name}", v, "a number >= 0")
    _check(ls.mask_events <= 1, "loss.mask_events", ls.mask_events, "in [0, 1]")
    _check(1 <= ls.mask_block <= cfg.data.crop, "loss.mask_block", ls.mask_block,
           f"in [1, data.crop = {cfg.data.crop}] (pixels of one masked block)")


def _validate_mic(cfg: TrainConfig) -> None:
    mc = cfg.mic
    _check(_finite(mc.lambda_) and mc.lambda_ >= 0, "mic.lambda", mc.lambda_, "a number >= 0")
    _check(1 <= mc.block <= cfg.data.crop, "mic.block", mc.block,
           f"in [1, data.crop = {cfg.data.crop}] (pixels of one masked block)")
    _check(_finite(mc.ratio) and 0 <= mc.ratio < 1, "mic.ratio", mc.ratio, "in [0, 1)")
    _check(mc.events in ("same", "independent", "none"), "mic.events", mc.events, "same, independent or none")


def _validate_target(cfg: TrainConfig) -> None:
    """The night target, and the settings an image-only target (no events) cannot take."""
    d, ls = cfg.data, cfg.loss
    _check(d.target in TARGETS, "data.target", d.target, f"one of {', '.join(TARGETS)}")
    _check(min(d.target_resize) >= d.crop, "data.target_resize", d.target_resize,
           f"two sizes >= data.crop ({d.crop}): training crops are cut from the resized image")
    if image_only(cfg):
        needs = [k for k in EVENT_FEATURE_TERMS if getattr(ls, k)]
        _check(not needs, "loss." + (needs[0] if needs else ""), [getattr(ls, k) for k in needs],
               f"0 with data.target={d.target}: {', '.join(needs)} compare event-camera features and "
               f"{d.target} has no events (image-only targets allow fusion_st and rgb_st)")
        k = cfg.representation.kind
        _check(k == "voxel", "representation.kind", k, f"voxel with data.target={d.target}: an image-only target "
               "has no events (its second input is the night image's ISR)")
    _check(isinstance(cfg.representation.kind, str) and cfg.representation.kind.strip() != "",
           "representation.kind", cfg.representation.kind, "a kind (voxel, histogram, ...) or a store name")


def _validate_entropy(cfg: TrainConfig) -> None:
    e = cfg.entropy
    _check(_finite(e.weight) and e.weight >= 0, "entropy.weight", e.weight, "a number >= 0")
    if e.enabled and cfg.run.source_only:
        raise InputError(None, "entropy.enabled needs the mixed pass, which a source-only run (run.source_only) "
                         "does not have")


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




# What an event-only run (data.target dsec-semantic) cannot take, and why: each needs the image branch or the
# fused output, which the event-only model does not have.
EVENT_ONLY_REFUSED: tuple[tuple[str, str], ...] = (
    ("mic.enabled", "MIC's masked pass and its consistency target are built on the target image"),
    ("dsr.enabled", "DSRNSS's bank pastes source images, its grouped ClassMix and prototypes use 19 Cityscapes "
                    "classes and the fused or image features"),
    ("dida.enabled", "DIDA's instance bank holds the fused output's embeddings"),
    ("adv.enabled", "the discriminator judges the fused output"),
    ("entropy.enabled", "the entropy term is taken on the fused output"),
    ("dacs.fd_lambda", "the ImageNet feature distance is taken on the image encoder"),
    ("loss.rgb_event_src", "it compares image and event features"),
    ("loss.fusion_st", "it compares fused features"),
    ("loss.rgb_st", "it compares image features"),
    ("loss.event_s_rgb_t", "it compares image and event features"),
    ("model.init", "--init loads an image + events model (CMDA's or cmda's); start from --pretrained instead"),
)


def _validate_event_only(cfg: TrainConfig) -> None:
    """An event-only target: 11 classes, a known label source, and the components it cannot take refused."""
    d = cfg.data
    _check(d.source in ("cityscapes", "dsec-semantic"), "data.source", d.source, "cityscapes or dsec-semantic")
    if d.source == "dsec-semantic" and not (event_only(cfg) and cfg.run.source_only):
        raise InputError(None, "data.source=dsec-semantic (--supervised) trains on DSEC-Semantic's own labels: it "
                         "needs data.target=dsec-semantic and run.source_only (there is nothing left to adapt to)")
    if not event_only(cfg):
        return
    _check(cfg.model.num_classes == 11, "model.num_classes", cfg.model.num_classes,
           "11 with data.target=dsec-semantic (DSEC-Semantic's classes)")
    for key, why in EVENT_ONLY_REFUSED:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            raise InputError(None, f"{key} cannot be used with data.target={d.target} (an event-only model, no "
                             f"image branch and no fusion): {why}")
