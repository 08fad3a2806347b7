"""Rare Class Sampling statistics: per-label class pixel counts in DAFormer's three JSON files.

DAFormer's RCS reads three files next to the Cityscapes labels (train split only):

* ``sample_class_stats.json``: ``[{"<class>": pixels, ..., "file": <label path>}, ...]``
* ``sample_class_stats_dict.json``: ``{<label path>: {"<class>": pixels}}``
* ``samples_with_class.json``: ``{"<class>": [[<label path>, pixels], ...]}``

Class keys are JSON strings ("0".."18"), counts plain ints, only classes with at least one pixel;
``indent=2``. We write ``file`` *relative to the output folder* (``gtFine/train/<city>/<name>_gtFine_
labelTrainIds.png``) instead of DAFormer's ``<cityscapes root>/gtFine/...``, so the folder can move
(DVC caches it); DAFormer itself matches only the basename and reads these files unchanged, and
:func:`resolve_label` also accepts DAFormer-written absolute paths. ``sample_class_stats.json`` is
written last: its presence means the set is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json
from pipeline.errors import InputError

NUM_CLASSES = 19
SAMPLE_CLASS_STATS = "sample_class_stats.json"
SAMPLE_CLASS_STATS_DICT = "sample_class_stats_dict.json"
SAMPLES_WITH_CLASS = "samples_with_class.json"
#: In write order; the last one marks completion.
STATS_FILES = (SAMPLES_WITH_CLASS, SAMPLE_CLASS_STATS_DICT, SAMPLE_CLASS_STATS)


def count_classes(label: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[int, int]:
    """Pixels per trainId (only classes present; 255 and other ids ignored), one ``np.bincount`` pass."""
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256)[:num_classes]
    return {int(c): int(n) for c, n in enumerate(counts) if n > 0}


def build_stats(entries: Iterable[tuple[str, dict[int, int]]]) -> tuple[list, dict, dict]:
    """(label path, counts) pairs -> the three JSON objects, in DAFormer's construction order.

    Entries keep their given order; within an entry, classes ascend; ``samples_with_class`` lists
    classes in order of first appearance and files in entry order (as DAFormer builds it).
    """
    stats_list: list[dict[str, Any]] = []
    stats_dict: dict[str, dict[str, int]] = {}
    with_class: dict[str, list[list[Any]]] = {}
    for path, counts in entries:
        per_class = {str(int(c)): int(n) for c, n in sorted(counts.items()) if n > 0}
        stats_list.append({**per_class, "file": path})
        stats_dict[path] = per_class
        for c, n in per_class.items():
            with_class.setdefault(c, []).append([path, n])
    return stats_list, stats_dict, with_class


def write_stats(out_dir: str | Path, entries: Iterable[tuple[str, dict[int, int]]]) -> None:
    """Write the three files atomically, ``sample_class_stats.json`` last."""
    out_dir = Path(out_dir)
    stats_list, stats_dict, with_class = build_stats(entries)
    write_json(out_dir / SAMPLES_WITH_CLASS, with_class, indent=2)
    write_json(out_dir / SAMPLE_CLASS_STATS_DICT, stats_dict, indent=2)
    write_json(out_dir / SAMPLE_CLASS_STATS, stats_list, indent=2)


def remove_stats(out_dir: str | Path) -> None:
    """Delete the files (completion marker first) before a run changes the labels under them."""
    for name in reversed(STATS_FILES):
        (Path(out_dir) / name).unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise InputError(path, "RCS statistics file not found (run `cmda cityscapes`)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not readable JSON: {exc}") from None


def parse_sample_class_stats(obj: Any, source: str | Path) -> list[tuple[str, dict[int, int]]]:
    """Validate a ``sample_class_stats.json`` object -> [(file, {class: pixels})]; errors name ``source``."""
    if not isinstance(obj, list):
        raise InputError(source, "expected a JSON list of per-file class counts")
    out = []
    for i, entry in enumerate(obj):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise InputError(source, f"entry {i} has no 'file' string")
        counts: dict[int, int] = {}
        for k, v in entry.items():
            if k == "file":
                continue
            if not (isinstance(k, str) and k.isdigit()) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(source, f"entry {i} ({entry['file']}): bad class count {k!r}: {v!r}")
            counts[int(k)] = v
        out.append((entry["file"], counts))
    return out


def load_stats(stats_dir: str | Path) -> list[tuple[str, dict[int, int]]]:
    """Read ``sample_class_stats.json`` from ``stats_dir`` -> [(file entry, {class: pixels})]."""
    path = Path(stats_dir) / SAMPLE_CLASS_STATS
    return parse_sample_class_stats(_read_json(path), path)


def load_samples_with_class(stats_dir: str | Path) -> dict[int, list[tuple[str, int]]]:
    """Read ``samples_with_class.json`` -> {class: [(file entry, pixels)]} with int class keys."""
    path = Path(stats_dir) / SAMPLES_WITH_CLASS
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object {class: [[file, pixels], ...]}")
    out: dict[int, list[tuple[str, int]]] = {}
    for k, rows in obj.items():
        if not k.isdigit() or not isinstance(rows, list):
            raise InputError(path, f"bad class entry {k!r}")
        parsed = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], int)):
                raise InputError(path, f"class {k}: bad row {row!r} (expected [file, pixels])")
            parsed.append((row[0], row[1]))
        out[int(k)] = parsed
    return out


def resolve_label(stats_dir: str | Path, entry: str) -> Path:
    """A stats ``file`` entry -> the label path on disk.

    Relative entries (ours) are relative to ``stats_dir``; absolute ones (DAFormer's) are used as they
    are when they exist, otherwise re-rooted at ``stats_dir`` from their ``gtFine/`` part on.
    """
    p = Path(entry)
    if not p.is_absolute():
        return Path(stats_dir) / p
    if p.exists() or "gtFine" not in p.parts:
        return p
    return Path(stats_dir).joinpath(*p.parts[p.parts.index("gtFine") :])
