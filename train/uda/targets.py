"""The night target's kind, chosen once per run: what the second encoder sees at each point of the step.

CMDA trains two models. On DSEC night (:class:`EventTarget`) the second encoder sees events and the
ISR of each image is a third input; the source "events" are the CycleGAN's translation of IC1 (or IC1
itself without the generator). On an image-only target such as Dark Zurich (:class:`ImageOnlyTarget`,
CMDA's ``cs2dz_image+raw-isr`` model) the second encoder sees the ISR of each image and there is no
separate ISR input. On DSEC-Semantic (:class:`EventOnlyTarget`) there is no image at all: an event-only
model (:class:`train.models.EventOnlyModel`) sees the event window, and the source "events" are the IC1 (or
the CycleGAN's translation) repeated over the window's channels. The step asks the run's target object (which
inputs each pass takes, what the mix holds, which output the teacher labels with) and never tests which
one it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.config import DacsConfig
from train.data.image_only import ISR_DIRECTION, mixed_isr
from train.data.isr import (
    DIRECTIONS,
    ISR_DAY,
    ISR_NIGHT,
    cmda_direction,
    image_content,
    isr_from_normalized,
    random_directions,
)
from train.data.loaders import network_batch
from train.models import ic1_to_events
from train.uda.components.base import Tensors
from train.uda.components.mic import MaskedBatch
from train.uda.mixing import mix, strong_augment


class ImageAndSecond:
    """What the two image + second-input targets share: the passes take the image, the events (or the image's
    ISR in their place) and the ISR; the mix holds the strongly augmented mixed image; the fused output labels."""

    output = "fusion"
    memory_format: torch.memory_format

    def source_inputs(self, x: Tensors) -> dict:
        return {"image": x["source_image"], "events": x["source_events"], "isr": x.get("source_isr")}

    def mixed_inputs(self, m: Tensors) -> dict:
        return {"image": m["image"], "events": m["events"], "isr": m.get("isr")}

    def mix_inputs(self, dacs: DacsConfig, mask: torch.Tensor, x: Tensors) -> Tensors:
        """ClassMix of the inputs: the image mixed then colour-jittered and blurred, the events only mixed
        (``jitter_draw``: the jitter's draw, from which CMDA's rule picks the mixed ISR's direction)."""
        drawn: dict[str, float] = {}
        image = strong_augment(dacs, mix(mask, x["source_image"], x["target_image"]), drawn)
        return {"image": image, "events": mix(mask, x["source_events"], x["target_events"]),
                "jitter_draw": drawn["jitter"]}


def widen(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A grey second input (ISR, IC1, the CycleGAN's events: one picture repeated to 3 channels) repeated to
    ``channels``, the event encoder's input (the run's representation); 3 channels pass as they are."""
    return x if x.shape[1] == channels else x[:, :1].expand(-1, channels, -1, -1)


@dataclass
class EventTarget(ImageAndSecond):
    """DSEC night: images + events, with the ISR of every image as the third input.

    With an event representation of C != 3 network channels, the event encoder takes C channels: the grey
    inputs it also encodes (both domains' ISR, the source's IC1 or CycleGAN "events") are repeated to C, as
    CMDA repeats them to 3 (docs/representations.md says what that does and does not bridge).
    """

    gan: torch.nn.Module | None  # CycleGAN IC1 -> events; None: IC1 is the source "events"
    device: torch.device
    memory_format: torch.memory_format
    cmda_empty_part: bool = False  # data.cmda_empty_part: CMDA's -1 for an ISR part with no cell of its sign
    cmda_directions: bool = False  # data.isr_direction == "cmda": CMDA's parity rules for the shift directions
    channels: int = 3  # the event encoder's input channels

    @torch.no_grad()
    def inputs(self, batch: Tensors) -> Tensors:
        """Normalised images, ISR of both domains (from the exact uint8 images, as CMDA computes it from
        the PIL image) and the source "events"."""
        raw = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        dirs = {k: [DIRECTIONS[i] for i in raw.pop(k).tolist()] for k in ("source_isr_dir", "target_isr_dir")
                if k in raw}  # CMDA's parity rules, drawn by the loader (data.isr_direction=cmda)
        b, mem, compat = raw["source_image"].shape[0], self.memory_format, self.cmda_empty_part
        out = network_batch(raw, self.device, mem)
        c = self.channels
        out["source_isr"] = widen(image_content(raw["source_image"], ISR_DAY, dirs.get("source_isr_dir") or
                                                random_directions(b), cmda_compat=compat), c
                                  ).contiguous(memory_format=mem)
        if "target_image" in raw:
            out["target_isr"] = widen(image_content(raw["target_image"], ISR_NIGHT, dirs.get("target_isr_dir") or
                                                    random_directions(b), cmda_compat=compat), c
                                      ).contiguous(memory_format=mem)
        events = ic1_to_events(self.gan, out["source_ic1"]) if self.gan is not None else out["source_ic1"]
        out["source_events"] = widen(events, c)
        return out

    def teacher_inputs(self, x: Tensors, events_drawn: bool) -> tuple[dict, bool]:
        """The teacher fuses the night image with the events or, at random, with the night ISR."""
        base = {"image": x["target_image"], "outputs": ("fusion",)}
        if events_drawn:
            return {**base, "events": x["target_events"], "isr": None, "fuse_with": "events"}, True
        return {**base, "events": None, "isr": x["target_isr"], "fuse_with": "isr"}, False

    @torch.no_grad()
    def finish_mix(self, mixed: Tensors) -> Tensors:
        """The mixed sample's inputs: its events as mixed, and the ISR recomputed from the mixed image."""
        mem = self.memory_format
        image = mixed["image"] = mixed["image"].contiguous(memory_format=mem)
        jitter_draw = mixed.pop("jitter_draw", None)
        mixed["events"] = mixed["events"].contiguous(memory_format=mem)
        if self.cmda_directions and jitter_draw is not None:  # CMDA: one direction for the batch, from cj
            cj = 1.0 - float(jitter_draw)  # CMDA jitters when cj > 0.2; cmda when its draw u < 0.8: cj = 1 - u
            directions: str | list[str] = cmda_direction(int(cj * 10), int(cj * 100))
        else:
            directions = random_directions(image.shape[0])
        isr = isr_from_normalized(image, ISR_NIGHT, directions, cmda_compat=self.cmda_empty_part)
        mixed["isr"] = widen(isr, self.channels).contiguous(memory_format=mem)
        return mixed

    def masked(self, batch: MaskedBatch) -> MaskedBatch:
        return batch


@dataclass
class ImageOnlyTarget(ImageAndSecond):
    """An image-only night target (Dark Zurich, ACDC): the second encoder sees each image's ISR."""

    device: torch.device
    memory_format: torch.memory_format
    cmda_empty_part: bool = False  # data.cmda_empty_part: CMDA's -1 for an ISR part with no cell of its sign

    @torch.no_grad()
    def inputs(self, batch: Tensors) -> Tensors:
        """The source's "events" are the day image's ISR (day parameters, rightdown, on the final crop); the
        target's are the night ISR the loader cut from the whole resized image."""
        raw = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = network_batch(raw, self.device, self.memory_format)
        out.pop("source_ic1", None)
        out["source_events"] = image_content(raw["source_image"], ISR_DAY, ISR_DIRECTION,
                                             cmda_compat=self.cmda_empty_part).contiguous(
            memory_format=self.memory_format)
        return out

    def teacher_inputs(self, x: Tensors, events_drawn: bool) -> tuple[dict, bool]:
        """The night ISR (this target's "events") is the teacher's only second input."""
        return {"image": x["target_image"], "events": x["target_events"], "isr": None, "fuse_with": "events",
                "outputs": ("fusion",)}, True

    @torch.no_grad()
    def finish_mix(self, mixed: Tensors) -> Tensors:
        """CMDA cs2dz: the mixed image's ISR is the second input (its ``mixed_image_to_mixed_isr``)."""
        mixed.pop("jitter_draw", None)
        mixed["image"] = mixed["image"].contiguous(memory_format=self.memory_format)
        mixed["events"] = mixed_isr(mixed["image"], self.cmda_empty_part).contiguous(
            memory_format=self.memory_format)
        return mixed

    def masked(self, batch: MaskedBatch) -> MaskedBatch:
        """MIC: the ISR of the masked image is the second input (``mic.events`` does not apply)."""
        return MaskedBatch(batch.image, mixed_isr(batch.image, self.cmda_empty_part).contiguous(
            memory_format=self.memory_format),
                           None, batch.image_mask, None)


@dataclass
class EventOnlyTarget:
    """DSEC-Semantic: an event-only model on event windows of ``channels`` channels (no image, no ISR)."""

    gan: torch.nn.Module | None  # CycleGAN IC1 -> events for an adapted run; None: IC1 itself
    device: torch.device
    memory_format: torch.memory_format
    channels: int
    output = "events"

    @torch.no_grad()
    def inputs(self, batch: Tensors) -> Tensors:
        """Supervised: the labelled windows as they come. Adapted: the source "events" (IC1, or its CycleGAN
        translation) repeated over the window's channels, as CMDA repeats one bin over three."""
        x = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if "source_ic1" in x:
            ic1 = (x.pop("source_ic1").float() / 255.0 - 0.5) / 0.5
            ic1 = ic1.expand(-1, 3, -1, -1) if ic1.shape[1] == 1 else ic1
            events = ic1_to_events(self.gan, ic1) if self.gan is not None else ic1
            x["source_events"] = events[:, :1].expand(-1, self.channels, -1, -1)
        for key in ("source_events", "target_events"):
            if key in x:
                x[key] = x[key].float().contiguous(memory_format=self.memory_format)
        return x

    def source_inputs(self, x: Tensors) -> dict:
        return {"events": x["source_events"]}

    def mixed_inputs(self, m: Tensors) -> dict:
        return {"events": m["events"]}

    def teacher_inputs(self, x: Tensors, events_drawn: bool) -> tuple[dict, bool]:
        """The target window is the teacher's only input."""
        return {"events": x["target_events"], "outputs": (self.output,)}, True

    def mix_inputs(self, dacs: DacsConfig, mask: torch.Tensor, x: Tensors) -> Tensors:
        """ClassMix of the windows (no image, so no colour jitter or blur: events are only mixed, as in CMDA)."""
        return {"events": mix(mask, x["source_events"], x["target_events"])}

    @torch.no_grad()
    def finish_mix(self, mixed: Tensors) -> Tensors:
        mixed["events"] = mixed["events"].contiguous(memory_format=self.memory_format)
        return mixed

    def masked(self, batch: MaskedBatch) -> MaskedBatch:
        return batch  # MIC is refused for this target (train.config.validation)


TargetKind = EventTarget | ImageOnlyTarget | EventOnlyTarget
