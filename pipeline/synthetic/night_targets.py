"""``cmda sample --target darkzurich|acdc``: SYNTHETIC Dark Zurich- and ACDC-format night trees.

Image-only night targets need no events: each tree is a few procedural streets
(:func:`pipeline.synthetic.scene.street_scene`) seen by a windscreen camera, rendered with the night look
(and, for Dark Zurich's day training folder, the day look), in the official folder layouts and file names
(as the Dark Zurich and ACDC downloads ship them):

* Dark Zurich: ``rgb_anon/{train,val,test}/{night,day}/GOPRxxxx/<name>_rgb_anon.png``; labels only for
  val night, ``gt/val/night/GOPR0356/<name>_gt_labelTrainIds.png`` and ``_gt_labelIds.png``.
* ACDC night: ``rgb_anon/night/{train,val,test}/GOPRxxxx/<name>_rgb_anon.png``; labels for train and val,
  ``gt/night/{train,val}/GOPRxxxx/<name>_gt_labelTrainIds.png`` and ``_gt_labelIds.png``.

Labels come from the same rasterisation as the image (the scene's polygons): labelIds through
cityscapesscripts' label table, trainIds from those labelIds by the reader's own mapping
(:func:`pipeline.night_targets.label_ids_to_train_ids`), so both files agree by construction.
Every image has its own random stream derived from the seed (byte-identical output for a seed, whatever
the number of threads); the tree is built in a temporary folder and swapped in at the end.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import name2label

from pipeline import atomic
from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from pipeline.night_targets import label_ids_to_train_ids
from pipeline.parallel import run_tasks
from pipeline.synthetic.render import DAY, NIGHT, CompiledScene, Look, View, develop, render_radiance
from pipeline.synthetic.scene import Rig, street_scene

TARGETS = ("darkzurich", "acdc")
REAL_SIZE = (1920, 1080)  # both data sets' images
FOCAL = 0.6  # focal length / image width: about 80 degrees across, a windscreen camera
FRAME_STEP = 15  # frame numbers between consecutive images of a sequence (1.5 s at 10 frames/s)
FRAME_RATE = 10.0
# The car's hood fills the bottom of the frame (Dark Zurich's pseudo-label weight ignores 120 of 1080 rows).
TARGET_RIG = Rig(hood_top=0.36, hood_drop=0.1)


@dataclass(frozen=True)
class Folder:
    """One image folder of a tree: its split, condition, sequence id, look and whether it has labels."""

    split: str
    condition: str
    sequence: str
    look: Look
    labelled: bool

    def image_dir(self, target: str) -> Path:
        if target == "darkzurich":
            return Path("rgb_anon") / self.split / self.condition / self.sequence
        return Path("rgb_anon") / self.condition / self.split / self.sequence

    def label_dir(self, target: str) -> Path:
        if target == "darkzurich":
            return Path("gt") / self.split / self.condition / self.sequence
        return Path("gt") / self.condition / self.split / self.sequence


def plan_folders(target: str, counts: dict[str, int]) -> list[tuple[Folder, int]]:
    """(folder, image count) of a tree. Sequence ids are placeholders in the real naming scheme, except
    Dark Zurich's labelled val sequence, which is always GOPR0356."""
    if target == "darkzurich":
        half = counts["train"] - counts["train"] // 2
        plan = [(Folder("train", "night", "GOPR0348", NIGHT, False), half),
                (Folder("train", "night", "GOPR0351", NIGHT, False), counts["train"] - half),
                (Folder("train", "day", "GOPR0347", DAY, False), counts["day"]),
                (Folder("val", "night", "GOPR0356", NIGHT, True), counts["val"]),
                (Folder("test", "night", "GOPR0364", NIGHT, False), counts["test"])]
    elif target == "acdc":
        half = counts["train"] - counts["train"] // 2
        plan = [(Folder("train", "night", "GOPR0351", NIGHT, True), half),
                (Folder("train", "night", "GOPR0355", NIGHT, True), counts["train"] - half),
                (Folder("val", "night", "GOPR0594", NIGHT, True), counts["val"]),
                (Folder("test", "night", "GOPR0600", NIGHT, False), counts["test"])]
    else:
        raise InputError(None, f"unknown sample target {target!r} (known: dsec, {', '.join(TARGETS)})")
    return [(f, n) for f, n in plan if n > 0]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def frame_name(sequence: str, k: int) -> str:
    """``GOPR0356_frame_000016``: the k-th image of a sequence, in the data sets' naming scheme."""
    return f"{sequence}_frame_{1 + k * FRAME_STEP:06d}"


def camera(size: tuple[int, int]) -> View:
    w, h = size
    f = FOCAL * w
    return View(np.array([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]]), (w, h))


# labelIds of the sky (image pixels no polygon covers) and of every label name the scenes use.
_SKY_ID = name2label["sky"].id


def write_image(cs: CompiledScene, folder: Folder, target: str, root: Path, view: View, k: int,
                rng: np.random.Generator) -> dict:
    """Render one image (and its labels where the folder has them) into ``root``."""
    name = frame_name(folder.sequence, k)
    t = (1 + k * FRAME_STEP) / FRAME_RATE
    rgb, proj, ids = render_radiance(cs, t, view, folder.look)
    atomic.write_png(root / folder.image_dir(target) / f"{name}_rgb_anon.png", develop(rgb, folder.look, rng),
                     photo=True)
    if not folder.labelled:
        return {"name": name, "labels": []}
    lut = np.array([_SKY_ID] + [name2label[cs.labels[i]].id for i in proj.index], np.uint8)
    label_ids = lut[ids]
    out = root / folder.label_dir(target)
    atomic.write_png(out / f"{name}_gt_labelIds.png", label_ids)
    atomic.write_png(out / f"{name}_gt_labelTrainIds.png", label_ids_to_train_ids(label_ids))
    return {"name": name, "labels": sorted(set(np.unique(label_ids).tolist()))}


README = """# Synthetic {title} night sample (generated by `cmda sample --target {target}`)

**This data is SYNTHETIC.** Nothing here was recorded by a camera. It was generated by
`cmda sample --target {target} --seed {seed}` from procedural streets (labelled 3-D polygons) rendered
at night, so the image-only night-target readers and trainer run end to end without downloading
{title}. The folder layout and file names are the official ones:

{layout}

Images are {width}x{height} RGB PNGs (the real data set's are 1920x1080; cmda's trainer resizes both to
960x540). Labels are 8-bit PNGs drawn from the scene's polygons: `_gt_labelIds.png` holds Cityscapes
labelIds (cityscapesscripts' label table), `_gt_labelTrainIds.png` the 19 trainIds with 255 = ignore
(the ego car's hood is labelId 1, ignored). Sequence ids are placeholders in the real naming scheme.
No `_gt_labelColor.png`, `_gt_invIds.png` or reference (`*_ref`) images are written.

Folders: {folders}.
"""

LAYOUTS = {
    "darkzurich": ("Dark Zurich", "- `rgb_anon/{train,val,test}/{night,day}/GOPRxxxx/<name>_rgb_anon.png` (train "
                                  "night and day unlabelled, test unlabelled: the real test labels are hidden)\n"
                                  "- `gt/val/night/GOPR0356/<name>_gt_labelTrainIds.png` and `_gt_labelIds.png`"),
    "acdc": ("ACDC", "- `rgb_anon/night/{train,val,test}/GOPRxxxx/<name>_rgb_anon.png`\n"
                     "- `gt/night/{train,val}/GOPRxxxx/<name>_gt_labelTrainIds.png` and `_gt_labelIds.png`"),
}


def _is_replaceable(out: Path) -> bool:
    """Only an absent folder or an earlier synthetic tree may be replaced (never real data)."""
    readme = out / "README.md"
    return not out.exists() or (readme.is_file() and "SYNTHETIC" in readme.read_text(errors="replace"))


def generate_target(cfg: DatasetsConfig, target: str, out: str | Path, *, seed: int | None = None,
                    scheduler: str | None = None, workers: int = 0) -> dict:
    """Write the synthetic ``target`` tree (``darkzurich`` or ``acdc``) to ``out``; returns a summary."""
    out = Path(out)
    t = cfg.sample.targets
    seed = cfg.sample.seed if seed is None else int(seed)
    folders = plan_folders(target, {"train": t.train, "val": t.val, "test": t.test, "day": t.day})
    if not _is_replaceable(out):
        raise InputError(out, "exists and is not a synthetic sample tree (its README.md does not say SYNTHETIC); "
                              "refusing to replace it")
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    view = camera((t.width, t.height))
    target_key = 3000 + TARGETS.index(target)
    tasks = []
    for j, (folder, n) in enumerate(folders):
        rng = _rng(seed, target_key, j)
        speed = float(rng.uniform(6.0, 11.0))
        t_last = (1 + (n - 1) * FRAME_STEP) / FRAME_RATE
        scene = street_scene(rng, speed * t_last + 10.0, night=folder.look.night, rig=TARGET_RIG, speed=speed)
        cs = CompiledScene(scene)
        for k in range(n):
            tasks.append(lambda cs=cs, folder=folder, j=j, k=k: write_image(
                cs, folder, target, tmp, view, k, _rng(seed, target_key, j, k)))
    results = run_tasks(tasks, desc=f"sample {target}", scheduler=scheduler, workers=workers, unit="image")
    title, layout = LAYOUTS[target]
    summary = ", ".join(f"{f.image_dir(target)} ({n}{', labelled' if f.labelled else ''})" for f, n in folders)
    atomic.write_text(tmp / "README.md", README.format(title=title, target=target, seed=seed, layout=layout,
                                                       width=t.width, height=t.height, folders=summary))
    atomic.replace_dir(tmp, out)
    counts: dict[str, int] = {}
    for f, n in folders:
        key = f"{f.split}/{f.condition}"
        counts[key] = counts.get(key, 0) + n
    return {"out": str(out), "target": target, "seconds": time.perf_counter() - start, "counts": counts,
            "labelled": sum(1 for r in results if r["labels"]), "size": (t.width, t.height)}
