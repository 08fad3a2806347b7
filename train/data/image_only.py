"""Image-only night targets (Dark Zurich, ACDC night) as training and evaluation data (CMDA's cs2dz config).

CMDA's Cityscapes -> Dark Zurich model (``cs2dz_image+raw-isr``) has no events: its second encoder gets
the night image's ISR. How CMDA's loader builds that input (mmseg/datasets/dark_zurich_ic.py) is what
this module reproduces, because the order matters:

1. the image is resized to 960x540 (PIL bilinear: :func:`train.data.loaders.resize_pil_bilinear`);
2. the ISR is computed on the WHOLE resized image (val_range [1, 100], threshold 0.01, clip 0.1,
   3-pixel shift, direction ``rightdown``: :data:`ISR_TARGET`), so its per-image min-max runs over the
   whole frame, not over the crop;
3. a random 512x512 window and a horizontal flip (p = 0.5) are applied to image and ISR alike; the
   flipped ISR is therefore the mirror image of a rightdown ISR, not the ISR of the flipped image.

Val and test images are used whole at the resized size, their ISR computed the same way; val labels
are resized with PIL's nearest neighbour (as CMDA resizes them) and read through
:mod:`pipeline.night_targets` (trainIds or labelIds, 255 ignore).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from pipeline.image_change import IsrParams
from pipeline.night_targets import TargetImage, discover_target, read_label
from train.config import DataConfig
from train.data.isr import ISR_DAY, image_content, isr_from_normalized
from train.data.loaders import hflip, normalize_image, read_rgb, resize_pil_bilinear, resize_pil_nearest

#: CMDA's cs2dz ``isr_parms`` (the night image's ISR and the mixed image's ISR alike).
ISR_TARGET = IsrParams(val_range=(1.0, 100.0), threshold=0.01, clip=0.1, shift=3)
#: CMDA's ``shift_type`` for this setting: one fixed direction pair, no random choice.
ISR_DIRECTION = "rightdown"


def night_isr(image: np.ndarray, cmda_compat: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> its ISR as CMDA's image-only setting defines it, float32 (1, H, W) in [-1, 1]
    (``cmda_compat``: CMDA's -1 for a part with no difference of its sign, ``data.cmda_empty_part``)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    return image_content(t, ISR_TARGET, ISR_DIRECTION, cmda_compat=cmda_compat)[0, :1].numpy()


def mixed_isr(image: torch.Tensor, cmda_compat: bool = False) -> torch.Tensor:
    """ISR of a network-normalised batch (the ClassMix-mixed or the MIC-masked image), CMDA's
    ``mixed_image_to_mixed_isr`` with this setting's parameters and direction."""

    return isr_from_normalized(image, ISR_TARGET, ISR_DIRECTION, cmda_compat=cmda_compat)


def load_resized(item: TargetImage, size: tuple[int, int]) -> np.ndarray:
    """The target image resized to ``size`` = (w, h) as CMDA does (PIL bilinear)."""
    image = read_rgb(item.image)
    return image if image.shape[1::-1] == tuple(size) else resize_pil_bilinear(image, size)


def crop_flip(image: np.ndarray, isr: np.ndarray, rng: np.random.Generator, crop: int, flip: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """CMDA's target augmentation here: one uniform ``crop`` window and one flip for image and ISR."""
    h, w = image.shape[:2]
    x = int(rng.integers(0, w - crop + 1))
    y = int(rng.integers(0, h - crop + 1))
    image, isr = image[y:y + crop, x:x + crop], isr[:, y:y + crop, x:x + crop]
    if rng.random() < flip:
        return hflip(image), hflip(isr, chw=True)
    return np.ascontiguousarray(image), np.ascontiguousarray(isr)


class NightTargetTrain:
    """The unlabelled night training images of an image-only target; ``load`` -> (image, ISR, item).

    Plays the role :class:`train.data.NightFrames` plays for DSEC in :class:`train.data.PairedBatches`,
    with the ISR standing in for the events.
    """

    def __init__(self, cfg: DatasetsConfig, data: DataConfig):
        self.items = discover_target(cfg, data.target).train
        self.size = data.target_resize
        self.cmda_compat = data.cmda_empty_part

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, TargetImage]:
        image = load_resized(self.items[i], self.size)
        return image, night_isr(image, self.cmda_compat), self.items[i]

    def augment(self, image: np.ndarray, isr: np.ndarray, rng: np.random.Generator, data: DataConfig
                ) -> tuple[np.ndarray, np.ndarray]:
        return crop_flip(image, isr, rng, data.crop, data.flip)

    def __len__(self) -> int:
        return len(self.items)


class NightTargetEval(Dataset):
    """Val (labelled) or test (labels hidden) images of an image-only target, whole, at ``target_resize``.

    Items are the evaluation loop's: ``image`` (normalised), ``events`` (the ISR, 3 channels: the second
    encoder's input), ``label`` (trainIds at the resized size; absent for test) and ``name``.
    """

    def __init__(self, cfg: DatasetsConfig, data: DataConfig, split: str = "val", limit: int = 0):
        if split not in ("val", "test"):
            raise InputError(None, f"split must be val or test, not {split!r}")
        items = discover_target(cfg, data.target).split(split)
        if not items:
            raise InputError(getattr(cfg, data.target).root, f"no {split} images in this {data.target} tree")
        self.items = items[:limit] if limit else items
        self.split = split
        self.size = data.target_resize
        self.cmda_compat = data.cmda_empty_part

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        item = self.items[i]
        image = load_resized(item, self.size)
        out: dict[str, torch.Tensor | str] = {
            "image": torch.from_numpy(normalize_image(image)),
            "events": torch.from_numpy(np.repeat(night_isr(image, self.cmda_compat), 3, axis=0)),
            "name": item.name,
        }
        if self.split == "val":
            label = read_label(item)
            out["label"] = torch.from_numpy(resize_pil_nearest(label, self.size).astype(np.int64))
        return out


class DayIsr(Dataset):
    """Cityscapes val items (:class:`train.data.CityscapesVal`) with the day ISR as the second input instead
    of IC1: what an image + ISR model's source pass was trained on (CMDA's day parameters, ``rightdown``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:

        item = dict(self.base[i])
        item["events"] = isr_from_normalized(item["image"][None], ISR_DAY, ISR_DIRECTION)[0]
        return item
