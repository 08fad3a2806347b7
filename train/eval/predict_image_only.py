"""``cmda predict --target darkzurich|acdc``: an image + ISR checkpoint on an image-only target's val or test split.

Each image goes through the model at ``data.target_resize`` (960x540, as CMDA tests), with its ISR as the
second input; the logits are upsampled bilinearly to the image's own size (1920x1080 for the real data,
CMDA's ``rescale``) before the argmax. What is written depends on the split:

* Dark Zurich ``test`` (labels hidden behind the CodaLab server): ``darkzurich_test.zip`` in the
  server's layout, written by :class:`pipeline.night_targets.DarkZurichSubmission`:
  ``labelTrainIds/<name>.png`` (uint8 trainIds 0..18: the server computes mIoU from these, so trainIds,
  not labelIds), ``labelTrainIds_invalid/`` (the same here: the model never abstains) and ``confidence/``
  (uint16 max softmax x 65535: the server requires the folder for its uncertainty-aware UIoU metric; it
  does not change the mIoU);
* ACDC ``test``: ``<name>_labelIds.png`` per image (Cityscapes labelIds, ACDC's benchmark format);
* ``val`` (labelled): ``<name>_pred.png`` in the Cityscapes palette, and the mIoU over the images written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.atomic import write_png
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.night_targets import DarkZurichSubmission, png_size, write_label_ids
from train.checkpoints.inference import check_target, load_for_inference, predict_logits
from train.common import NUM_CLASSES
from train.common.device import resolve_device
from train.common.stopping import FrameStop
from train.config import TrainConfig, image_only
from train.data.image_only import NightTargetEval
from train.eval.metrics import confusion, summarize
from train.eval.visualize import colorize

SPLITS = ("val", "test")
OUTPUTS = ("fusion", "image", "events")


@dataclass
class NightPrediction:
    out: Path
    images: int
    split: str
    target: str
    output: str
    submission: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def full_size_prediction(logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """[1, C, h, w] logits -> (trainIds uint8, confidence float32 in [0, 1]) at ``size`` = (w, h)."""
    up = F.interpolate(logits.float(), size=(size[1], size[0]), mode="bilinear", align_corners=False)
    conf, pred = up.softmax(1).max(1)
    return pred[0].to(torch.uint8).cpu().numpy(), conf[0].cpu().numpy()


def predict_night(checkpoint: str | Path, *, target: str | None = None, out: str | Path | None = None,
                  config: str | Path | None = None, split: str = "test", limit: int = 0, output: str = "fusion",
                  teacher: bool = False, device: str = "auto") -> NightPrediction:
    """Load ``checkpoint`` and predict (see :func:`predict_loaded`)."""
    dev = resolve_device(device)
    model, cfg, _ = load_for_inference(Path(checkpoint), teacher=teacher, device=dev)
    check_target(Path(checkpoint), cfg, target)
    return predict_loaded(model, cfg, Path(checkpoint), dev, out=out, config=config, split=split, limit=limit,
                          output=output)


def _predict_image(model: torch.nn.Module, ds, i: int, where: tuple[Path, str, str], submission,
                   conf_total: torch.Tensor, dev: torch.device, cfg: TrainConfig) -> None:
    """Image ``i`` of ``ds``: its val PNG (and confusion), its test labelIds PNG, or its submission entry."""
    out, output, split = where
    item, sample = ds.items[i], ds[i]
    image, second = sample["image"][None].to(dev), sample["events"][None].to(dev)
    logits = predict_logits(model, image, second, (output,), amp=cfg.run.amp)[output]
    if split == "val":
        pred = logits.argmax(1)[0].cpu()
        conf_total += confusion(pred, sample["label"])
        write_png(out / f"{item.name}_pred.png", colorize(pred.numpy().astype(np.uint8)))
        return
    pred_np, conf = full_size_prediction(logits, png_size(item.image))
    if submission is not None:
        submission.add(item.name, pred_np, conf)
    else:
        write_label_ids(out / f"{item.name}_labelIds.png", pred_np)


def predict_loaded(model: torch.nn.Module, cfg: TrainConfig, checkpoint: Path, dev: torch.device, *,
                   out: str | Path | None = None, config: str | Path | None = None, split: str = "test",
                   limit: int = 0, output: str = "fusion") -> NightPrediction:
    """Predict ``split`` of the image-only target ``cfg.data.target`` into ``out`` (default: the run's
    ``predictions/<checkpoint name>_<target>_<split>/``). A test export must cover every test image, so
    ``limit`` only applies to val."""
    if split not in SPLITS:
        raise InputError(None, f"--split must be val or test for an image-only target, not {split!r}")
    if output not in OUTPUTS:
        raise InputError(None, f"--output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    if limit and split == "test":
        raise InputError(None, "--limit does not apply to a test-set export (the server needs every image)")
    if not image_only(cfg):
        raise InputError(checkpoint, f"this checkpoint was trained for {cfg.data.target} (images + events), not "
                         "an image-only target")
    ds = NightTargetEval(load_config(Path(config or cfg.data.datasets)), cfg.data, split, limit=limit)
    name = cfg.data.target
    default = checkpoint.parent.parent / "predictions" / f"{checkpoint.stem}_{name}_{split}"
    out = Path(out) if out is not None else default
    result = NightPrediction(out=out, images=0, split=split, target=name, output=output)
    submission = DarkZurichSubmission(out / "darkzurich_test.zip", ds.items) \
        if split == "test" and name == "darkzurich" else None
    conf_total = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    try:
        with FrameStop() as stop:
            for i in tqdm(range(len(ds)), desc=f"predict {name} {split}", unit="image"):
                _predict_image(model, ds, i, (out, output, split), submission, conf_total, dev, cfg)
                result.images += 1
                stop.check()
    except BaseException:
        if submission is not None:
            submission.abort()
        raise
    if submission is not None:
        result.submission = submission.close()
    if split == "val" and result.images:
        result.metrics = summarize(conf_total.numpy())
    return result


__all__ = ["NightPrediction", "full_size_prediction", "predict_loaded", "predict_night"]
