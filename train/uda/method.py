"""The method of a run, built once: the target kind, the pseudo-label rule, the ClassMix and the components.

Everything here is decided when the run is built, so :func:`train.uda.step.iteration` never tests a
setting: it calls ``method.target``, ``method.pseudo_rule``, ``method.class_masks`` and each of
``method.components`` in turn. Adding a component is one module with a ``build(cfg, run)`` function and
one line in :data:`COMPONENTS` (docs/adding-a-component.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from train.config import TrainConfig, event_only, image_only
from train.uda.components import adversarial, dida, dsr, entropy, feature_distance, masked_events, mic
from train.uda.components.base import Component
from train.uda.components.dsr import grouped_class_masks
from train.uda.mixing import class_masks
from train.uda.pseudo_rules import AdaptiveRule, ShareRule, pseudo_rule
from train.uda.targets import EventOnlyTarget, EventTarget, ImageOnlyTarget, TargetKind

#: Every optional component's builder, in the order the step calls their hooks (the order matters where two
#: hooks draw random numbers or add terms to one sum: the bank paste before the event mask, the
#: discriminator's target pass before MIC's).
COMPONENTS = (feature_distance.build, dsr.build, masked_events.build, dida.build, adversarial.build, mic.build,
              entropy.build)


@dataclass
class BuildInputs:
    """What a component's ``build(cfg, run)`` may use besides the settings."""

    device: torch.device
    amp: bool
    target: TargetKind
    imnet: torch.nn.Module | None  # frozen ImageNet encoder (dacs.fd_lambda > 0)


@dataclass
class Method:
    target: TargetKind
    pseudo_rule: ShareRule | AdaptiveRule | None  # None: a source-only run (no teacher)
    class_masks: Callable[[torch.Tensor, bool], torch.Tensor]
    components: list[Component]
    amp: bool
    memory_format: torch.memory_format

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Decoder embeddings the student's and the teacher's passes return (for the components)."""
        return tuple(dict.fromkeys(e for c in self.components for e in c.embeddings))

    def stateful(self) -> list[Component | AdaptiveRule]:
        """The parts with state across iterations, each saved under its ``state_key``."""
        return [p for p in (self.pseudo_rule, *self.components) if p is not None and p.state_key]


def grouped_or_plain(cfg: TrainConfig) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """ClassMix's masks: DSRNSS's grouped ones when ``dsr.grouped_mix`` (the same random draws as CMDA's)."""
    if cfg.dsr.enabled and cfg.dsr.grouped_mix:
        return lambda labels, per_sample: grouped_class_masks(labels, per_sample=per_sample)
    return class_masks


def target_kind(cfg: TrainConfig, device: torch.device, gan: torch.nn.Module | None, mem: torch.memory_format,
                event_channels: int) -> TargetKind:
    """The run's target kind: image + events (DSEC night), image + ISR (an image-only target), or events alone
    (DSEC-Semantic, ``event_channels`` = the window's channels)."""
    if event_only(cfg):
        return EventOnlyTarget(gan, device, mem, event_channels)
    if image_only(cfg):
        return ImageOnlyTarget(device, mem, cfg.data.cmda_empty_part)
    return EventTarget(gan, device, mem, cfg.data.cmda_empty_part, cfg.data.isr_direction == "cmda", event_channels)


def build_method(cfg: TrainConfig, device: torch.device, gan: torch.nn.Module | None,
                 imnet: torch.nn.Module | None, event_channels: int = 3) -> Method:
    """The run's method. Components are built in :data:`COMPONENTS` order (their initial weights draw
    from torch's generator, so the order is part of a run's reproducibility). ``event_channels``: the event
    encoder's input channels (the run's representation), to which the grey second inputs are repeated."""
    amp = device.type == "cuda" and cfg.run.amp
    mem = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    target = target_kind(cfg, device, gan, mem, event_channels)
    rule = None if cfg.run.source_only else pseudo_rule(cfg.dacs, cfg.model.num_classes, device)
    run = BuildInputs(device, amp, target, imnet)
    components = [c for c in (build(cfg, run) for build in COMPONENTS) if c is not None]
    return Method(target, rule, grouped_or_plain(cfg), components, amp, mem)
