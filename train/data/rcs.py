"""Rare Class Sampling (DAFormer): pick source images by class so rare classes are seen often.

Per iteration: draw a class c with ``P(c) = softmax((1 - f_c) / T)`` (``f_c`` = c's share of all
labelled pixels in the train split, T = 0.01), then a file uniformly among those with more than
``min_pixels`` pixels of c, then crop; re-crop up to 10 times until the crop holds more than
``min_pixels * min_ratio`` pixels of c (:func:`choose_crop`).

Classes are those present in the statistics, ordered by ascending pixel count as DAFormer does.
Where DAFormer asserts that every class has an eligible file, we drop classes without one and sample
from the softmax over the rest (the same logits, renormalised) -- small or synthetic datasets hit
this; the dropped classes are listed in :attr:`RareClassSampler.dropped`.

Note DAFormer's quirk, kept by design of the callers: ``min_pixels`` filters on full-resolution
labels, while the re-crop check counts pixels of the crop the pipeline produces (Cityscapes is
resized to 1024x512 first, so 1500 crop pixels are ~6000 full-resolution ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.rcs_stats import (
    SAMPLE_CLASS_STATS,
    SAMPLES_WITH_CLASS,
    load_samples_with_class,
    load_stats,
    parse_sample_class_stats,
    resolve_label,
)


def rcs_class_probs(class_pixels: dict[int, int], temperature: float = 0.01) -> tuple[list[int], np.ndarray]:
    """{class: total pixels} -> (classes by ascending count, probabilities ``softmax((1 - f_c) / T)``)."""
    if not class_pixels:
        raise ValueError("no classes")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    order = sorted(class_pixels, key=lambda c: class_pixels[c])  # stable: ties keep first-seen order
    counts = np.array([class_pixels[c] for c in order], dtype=np.float64)
    logits = (1.0 - counts / counts.sum()) / temperature
    e = np.exp(logits - logits.max())
    return [int(c) for c in order], e / e.sum()


def _total_pixels(entries: Sequence[tuple[str, dict[int, int]]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for _, counts in entries:
        for c, n in counts.items():
            total[c] = total.get(c, 0) + n
    return total


class RareClassSampler:
    """Draws (class, label file) pairs for rare-class sampling.

    ``stats``: the folder holding DAFormer's JSON files (``cmda cityscapes`` output; validated against
    the labels on disk), or an already parsed ``sample_class_stats.json`` list (no disk checks; file
    entries returned as given). ``sample()`` returns ``(class, Path)``.
    """

    def __init__(
        self,
        stats: str | Path | list[dict[str, Any]],
        temperature: float = 0.01,
        min_pixels: int = 3000,
        seed: int | None = None,
        *,
        validate: bool = True,
    ):
        self.temperature = temperature
        self.min_pixels = min_pixels
        self.rng = np.random.default_rng(seed)
        if isinstance(stats, str | Path):
            self.stats_dir: Path | None = Path(stats)
            self.source = self.stats_dir / SAMPLE_CLASS_STATS
            entries = load_stats(self.stats_dir)
            if validate:
                self._validate(entries)
            files = {e: resolve_label(self.stats_dir, e) for e, _ in entries}
        else:
            self.stats_dir = None
            self.source = Path("<parsed stats>")
            entries = parse_sample_class_stats(stats, self.source)
            files = {e: Path(e) for e, _ in entries}
        if not entries:
            raise InputError(self.source, "no samples in the RCS statistics")

        self.class_pixels = _total_pixels(entries)
        classes, probs = rcs_class_probs(self.class_pixels, temperature)
        self.samples_with_class: dict[int, list[Path]] = {
            c: [files[f] for f, counts in entries if counts.get(c, 0) > min_pixels] for c in classes
        }
        keep = [i for i, c in enumerate(classes) if self.samples_with_class[c]]
        self.dropped = [c for c in classes if not self.samples_with_class[c]]
        if not keep:
            raise InputError(self.source, f"no class has a file with more than {min_pixels} pixels of it")
        self.classes = [classes[i] for i in keep]
        p = probs[keep]
        self.probs = p / p.sum()
        for c in self.dropped:
            del self.samples_with_class[c]

    # ------------------------------------------------------------------ validation
    def _validate(self, entries: list[tuple[str, dict[int, int]]]) -> None:
        """Stats must describe exactly the label files on disk, and agree with samples_with_class.json."""
        assert self.stats_dir is not None
        resolved = {resolve_label(self.stats_dir, e) for e, _ in entries}
        for e, _ in entries:
            if not resolve_label(self.stats_dir, e).exists():
                raise InputError(self.source, f"label file of entry {e!r} is missing")
        label_dirs = {p.parents[1] for p in resolved}  # <...>/gtFine/train for <city>/<file>
        on_disk = {p for d in label_dirs for p in d.rglob("*_labelTrainIds.png")}
        extra = sorted(on_disk - resolved)
        if extra:
            raise InputError(self.source, f"{len(extra)} label file(s) are not in the statistics, e.g. {extra[0]}")
        with_class = load_samples_with_class(self.stats_dir)
        derived: dict[int, set[tuple[str, int]]] = {}
        for e, counts in entries:
            for c, n in counts.items():
                derived.setdefault(c, set()).add((e, n))
        if {c: set(rows) for c, rows in with_class.items()} != derived:
            raise InputError(self.stats_dir / SAMPLES_WITH_CLASS, f"does not match {SAMPLE_CLASS_STATS}")

    # ------------------------------------------------------------------ sampling
    def sample_class(self) -> int:
        return int(self.classes[self.rng.choice(len(self.classes), p=self.probs)])

    def sample(self) -> tuple[int, Path]:
        """Draw a class by its RCS probability, then uniformly a file with more than ``min_pixels`` of it."""
        c = self.sample_class()
        files = self.samples_with_class[c]
        return c, files[int(self.rng.integers(len(files)))]


def choose_crop(
    label: np.ndarray,
    cls: int,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    min_pixels: int = 3000,
    min_ratio: float = 0.5,
    tries: int = 10,
) -> tuple[int, int]:
    """Top-left (y, x) of a random ``crop_size`` (h, w) crop of ``label`` [H, W] for RCS class ``cls``.

    Offsets are uniform in ``[0, H - h] x [0, W - w]`` (mmseg's RandomCrop). As in DAFormer, one crop is
    drawn and then re-drawn up to ``tries`` times while it holds no more than ``min_pixels * min_ratio``
    pixels of ``cls``; the last crop is returned either way. ``min_ratio = 0`` disables re-cropping.
    """
    label = np.asarray(label)
    h, w = crop_size
    margin_y, margin_x = max(label.shape[0] - h, 0), max(label.shape[1] - w, 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(margin_y + 1)), int(rng.integers(margin_x + 1))

    y, x = draw()
    if min_ratio <= 0:
        return y, x
    for _ in range(tries):
        if np.count_nonzero(label[y : y + h, x : x + w] == cls) > min_pixels * min_ratio:
            break
        y, x = draw()
    return y, x
