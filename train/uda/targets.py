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
from train.data.isr import ISR_DAY, ISR_NIGHT, image_content, isr_from_normalized, random_directions
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
        """ClassMix of the inputs: the image mixed then colour-jittered and blurred, the events only mixed."""
        return {"image": strong_augment(dacs, mix(mask, x["source_image"], x["target_image"])),
                "events": mix(mask, x["source_events"], x["target_events"])}


@dataclass
class EventTarget(ImageAndSecond):
    """DSEC night: images + events, with the ISR of every image as the third input."""

    gan: torch.nn.Module | None  # CycleGAN IC1 -> events; None: IC1 is the source "events"
    device: torch.device
    memory_format: torch.memory_format

    @torch.no_grad()
    def inputs(self, batch: Tensors) -> Tensors:
        """Normalised images, ISR of both domains (from the exact uint8 images, as CMDA computes it from
        the PIL image) and the source "events"."""
        raw = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        b, mem = raw["source_image"].shape[0], self.memory_format
        out = network_batch(raw, self.device, mem)
        out["source_isr"] = image_content(raw["source_image"], ISR_DAY, random_directions(b)).contiguous(
            memory_format=mem)
        if "target_image" in raw:
            out["target_isr"] = image_content(raw["target_image"], ISR_NIGHT, random_directions(b)).contiguous(
                memory_format=mem)
        out["source_events"] = ic1_to_events(self.gan, out["source_ic1"]) if self.gan is not None \
            else out["source_ic1"]
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
        mixed["events"] = mixed["events"].contiguous(memory_format=mem)
        mixed["isr"] = isr_from_normalized(image, ISR_NIGHT, random_directions(image.shape[0])).contiguous(
            memory_format=mem)
        return mixed

    def masked(self, batch: MaskedBatch) -> MaskedBatch:
        return batch


@dataclass
class ImageOnlyTarget(ImageAndSecond):
    """An image-only night target (Dark Zurich, ACDC): the second encoder sees each image's ISR."""

    device: torch.device
    memory_format: torch.memory_format

    @torch.no_grad()
    def inputs(self, batch: Tensors) -> Tensors:
        """The source's "events" are the day image's ISR (day parameters, rightdown, on the final crop); the
        target's are the night ISR the loader cut from the whole resized image."""
        raw = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = network_batch(raw, self.device, self.memory_format)
        out.pop("source_ic1", None)
        out["source_events"] = image_content(raw["source_image"], ISR_DAY, ISR_DIRECTION).contiguous(
            memory_format=self.memory_format)
        return out

    def teacher_inputs(self, x: Tensors, events_drawn: bool) -> tuple[dict, bool]:
        """The night ISR (this target's "events") is the teacher's only second input."""
        return {"image": x["target_image"], "events": x["target_events"], "isr": None, "fuse_with": "events",
                "outputs": ("fusion",)}, True

    @torch.no_grad()
    def finish_mix(self, mixed: Tensors) -> Tensors:
        """CMDA cs2dz: the mixed image's ISR is the second input (its ``mixed_image_to_mixed_isr``)."""
        mixed["image"] = mixed["image"].contiguous(memory_format=self.memory_format)
        mixed["events"] = mixed_isr(mixed["image"]).contiguous(memory_format=self.memory_format)
        return mixed

    def masked(self, batch: MaskedBatch) -> MaskedBatch:
        """MIC: the ISR of the masked image is the second input (``mic.events`` does not apply)."""
        return MaskedBatch(batch.image, mixed_isr(batch.image).contiguous(memory_format=self.memory_format),
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
