"""Typed view of ``datasets.yaml``: where data lives, which sequences exist, split rules, settings.

The YAML file is the single place users edit; this module turns it into frozen dataclasses (by
:func:`pipeline.yaml_dataclass.build_dataclass`) and rejects unknown keys, wrong types or values out
of range with an :class:`InputError` that names the file, so a typo never silently falls back to a
default. Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError
from pipeline.representations import VoxelSettings, parse_kind, store_suffix
from pipeline.yaml_dataclass import build_dataclass, yaml_problem

DEFAULT_CONFIG = Path("datasets.yaml")


@dataclass(frozen=True)
class SequenceSpec:
    """One DSEC sequence and the frame range its test labels cover (inclusive)."""

    labelled: tuple[int, int] = (0, -1)


@dataclass(frozen=True)
class DsecConfig:
    root: Path = Path("data/sample/DSEC_Night")
    out: Path = Path("data/processed/dsec")
    # Test frames: "labels" = every frame inside the labelled range that has a label file (CMDA's
    # rule; DSEC night's labels are not strictly periodic), "rule" = every `label_every`-th frame
    # from `label_first` inside the range (a missing label is then an error). The sample generator
    # writes labels by the rule, so both agree on it.
    test_split: str = "labels"
    label_first: int = 2
    label_every: int = 18
    # Train frames: after the labelled range, >= train_min_frame, even numbers only if train_even_only.
    train_min_frame: int = 2
    train_even_only: bool = True
    # Warped-image PNGs ("warp_images/"), read by the loader every time a frame is drawn:
    # "fast" = stored (uncompressed deflate, no row filter), decoded ~5x faster than "small"
    # (Huffman-coded, ~40% fewer bytes on noisy night images). Both are lossless PNG.
    warp_png: str = "fast"
    sequences: dict[str, SequenceSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Representation:
    """Voxel-grid settings. CMDA trains on 1 bin; DSEC/ESS baselines use 5 or 15."""

    bins: int = 1
    height: int = 480
    width: int = 640
    # Events read from HDF5 per streaming step: bounds peak memory whatever the sequence length.
    chunk_events: int = 1_000_000
    # Blosc codec of the stored voxel chunks: lz4 level 3 encodes a 1.2 MB frame in ~0.7 ms and
    # decodes it in ~0.3 ms (level 1: ~0.8 / ~0.6 ms, Blosc's smaller blocks, same size; zstd-1:
    # ~2.7 ms for a 15% smaller store), so preprocessing stays bound by reading events.h5.
    compressor: str = "lz4"
    clevel: int = 3
    # Representations `cmda preprocess` builds (pipeline.representations): "voxel" is CMDA's grid
    # above, in events.zarr; every other entry ({kind: NAME, parameters...}) gets its own store
    # under representations/ named by its settings. load_config turns the entries into settings objects.
    kinds: tuple[Any, ...] = ("voxel",)


@dataclass(frozen=True)
class CityscapesConfig:
    root: Path = Path("data/sample/cityscapes")
    out: Path = Path("data/processed/cityscapes")
    # (w, h) of the copies `cmda cityscapes` writes with CMDA's PIL resampling, which the training
    # loader reads instead of resizing every sample when data.source_resize matches; [0, 0]: none.
    resize: tuple[int, int] = (1024, 512)


@dataclass(frozen=True)
class TargetSampleConfig:
    """Size of the synthetic Dark Zurich / ACDC night trees (``cmda sample --target darkzurich|acdc``).

    Counts are images per split; ``day`` adds Dark Zurich's day training images (no labels; ACDC's
    tree has none). The real images are 1920x1080; the sample is smaller so it renders in seconds.
    """

    train: int = 16
    val: int = 8
    test: int = 6
    day: int = 4
    width: int = 960
    height: int = 540


@dataclass(frozen=True)
class SemanticSampleConfig:
    """Size of the synthetic DSEC-Semantic tree (``cmda sample --target dsec-semantic``): every sequence
    of ``dsec_semantic.train``/``test`` gets ``labels`` labels at 20 Hz after ``lead_in_us`` of events."""

    labels: int = 10
    event_rate: float = 400_000.0
    lead_in_us: int = 150_000


@dataclass(frozen=True)
class SampleConfig:
    """Size of the synthetic tree written by ``cmda sample`` (kept small so CI runs it in seconds)."""

    seed: int = 0
    frames: int = 60
    event_rate: float = 400_000.0  # events per second (real DSEC night: ~6.6 M/s)
    cityscapes_train: int = 12
    cityscapes_val: int = 4
    targets: TargetSampleConfig = field(default_factory=TargetSampleConfig)
    semantic: SemanticSampleConfig = field(default_factory=SemanticSampleConfig)


@dataclass(frozen=True)
class NightTargetConfig:
    """An image-only night target in its official layout (Dark Zurich or ACDC night; as their downloads ship them).

    ``root`` holds ``rgb_anon/`` and ``gt/``; ``out`` is where cmda writes what it derives (predictions,
    the test-server zip). The rest are CMDA's settings for this target, read by the trainer: target
    images resized to ``resize`` (width, height) then cropped ``crop`` x ``crop``; val/test at ``resize``;
    the pseudo-label weight is zero on the top ``pseudo_ignore_top`` and bottom ``pseudo_ignore_bottom``
    rows (the ego car and the sky border in Dark Zurich's frames).
    """

    root: Path = Path("data/sample_targets/darkzurich")
    out: Path = Path("data/processed/darkzurich")
    resize: tuple[int, int] = (960, 540)
    crop: int = 512
    pseudo_ignore_top: int = 15
    pseudo_ignore_bottom: int = 120


@dataclass(frozen=True)
class AcdcConfig(NightTargetConfig):
    """ACDC night: the same settings as Dark Zurich (CMDA has no ACDC config; DAFormer uses these)."""

    root: Path = Path("data/sample_targets/acdc")
    out: Path = Path("data/processed/acdc")


# DSEC-Semantic's split as ESS (DSEC/dataset/provider.py) and HMNet (data/dsec/scripts/prepair.sh) use it.
SEMANTIC_TRAIN = ("zurich_city_00_a", "zurich_city_01_a", "zurich_city_02_a", "zurich_city_04_a",
                  "zurich_city_05_a", "zurich_city_06_a", "zurich_city_07_a", "zurich_city_08_a")
SEMANTIC_TEST = ("zurich_city_13_a", "zurich_city_14_c", "zurich_city_15_a")


@dataclass(frozen=True)
class SemanticWindow:
    """The event input of one DSEC-Semantic label, as ESS builds it (config/settings_DSEC.yaml, DSEC/dataset/
    sequence.py): ``mode: events`` = the last ``events`` events strictly before the label time, cut into
    ``chunks`` runs of equal count; ``mode: duration`` = the ``duration_us`` before the label time, cut into
    ``chunks`` equal spans. Each chunk is a ``bins``-bin DSEC voxel grid with its own time normalisation, or
    (``kind``: any ``representation.kinds`` entry) that kind's frame of the chunk's events."""

    mode: str = "events"
    events: int = 2_000_000  # ESS: nr_events_data 20 x nr_events_window 100,000
    duration_us: int = 1_000_000  # ESS: 20 x delta_t_per_data 50 ms
    chunks: int = 20
    bins: int = 5
    # None (or "voxel"): ESS's DSEC voxel grid of `bins` bins, unnormalised; load_config turns any other
    # entry ({kind: histogram, bins: 10, cutoff: 10}, time_surface, ...) into its settings object.
    kind: Any = None


@dataclass(frozen=True)
class DsecSemanticConfig:
    """DSEC-Semantic (11 classes): where the tree is, its layout, the split, the windows and the index sampling.

    ``layout``: ``official`` (``<split>/<seq>/11classes/*.png``, ``<seq>_semantic_timestamps.txt``), ``ess``
    (``<split>/<seq>/semantic/11classes/data/*.png``, ``semantic/timestamps.txt``) or ``auto`` (per sequence,
    from the folders). ``sampling``: ``all`` labels, or ``ess`` (first 6 of each sequence dropped, then every
    2nd, as ESS trains and tests).
    """

    root: Path = Path("data/sample_semantic")
    out: Path = Path("data/processed/dsec_semantic")
    layout: str = "auto"
    train: tuple[str, ...] = SEMANTIC_TRAIN
    test: tuple[str, ...] = SEMANTIC_TEST
    window: SemanticWindow = field(default_factory=SemanticWindow)
    sampling: str = "all"
    compressor: str = "lz4"
    clevel: int = 3

    @property
    def sequences(self) -> dict[str, str]:
        """Sequence -> split, train first."""
        return {**{s: "train" for s in self.train}, **{s: "test" for s in self.test}}


@dataclass(frozen=True)
class DatasetsConfig:
    dsec: DsecConfig = field(default_factory=DsecConfig)
    representation: Representation = field(default_factory=Representation)
    cityscapes: CityscapesConfig = field(default_factory=CityscapesConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    darkzurich: NightTargetConfig = field(default_factory=NightTargetConfig)
    acdc: AcdcConfig = field(default_factory=AcdcConfig)
    dsec_semantic: DsecSemanticConfig = field(default_factory=DsecSemanticConfig)
    source: Path = DEFAULT_CONFIG

    # ------------------------------------------------------------------ sequences
    def sequence(self, name: str) -> str:
        """Canonical sequence name for ``name``; accepts ``zurich_city_09a`` for ``zurich_city_09_a``."""
        wanted = _squash(name)
        for seq in self.dsec.sequences:
            if _squash(seq) == wanted:
                return seq
        known = ", ".join(self.dsec.sequences) or "(none)"
        raise InputError(self.source, f"sequence {name!r} is not listed under dsec.sequences (known: {known})")


def _squash(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _resolve(cfg: DatasetsConfig, base: Path) -> DatasetsConfig:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    return dataclasses.replace(
        cfg,
        dsec=dataclasses.replace(cfg.dsec, root=rel(cfg.dsec.root), out=rel(cfg.dsec.out)),
        cityscapes=dataclasses.replace(cfg.cityscapes, root=rel(cfg.cityscapes.root), out=rel(cfg.cityscapes.out)),
        darkzurich=dataclasses.replace(cfg.darkzurich, root=rel(cfg.darkzurich.root), out=rel(cfg.darkzurich.out)),
        acdc=dataclasses.replace(cfg.acdc, root=rel(cfg.acdc.root), out=rel(cfg.acdc.out)),
        dsec_semantic=dataclasses.replace(cfg.dsec_semantic, root=rel(cfg.dsec_semantic.root),
                                          out=rel(cfg.dsec_semantic.out)),
    )


# Allowed ranges, checked at load time so a bad value is one line naming the key, not an all-zero
# store or a crash deep inside a kernel: key -> (lowest, highest) inclusive (None: unbounded).
RANGES: dict[str, tuple[float | None, float | None]] = {
    "representation.bins": (1, 1000),
    "representation.height": (2, 100_000),
    "representation.width": (2, 100_000),
    "representation.chunk_events": (1, None),
    "representation.clevel": (0, 9),
    "dsec.label_first": (0, None),
    "dsec.label_every": (1, None),
    "dsec.train_min_frame": (0, None),
    "sample.seed": (0, 2**32 - 1),
    "sample.frames": (2, None),
    "sample.event_rate": (1e-9, None),
    "sample.cityscapes_train": (1, None),
    "sample.cityscapes_val": (0, None),
    "dsec_semantic.clevel": (0, 9),
}

SEMANTIC_RANGES: dict[str, tuple[int, int | None]] = {
    "events": (1, None), "duration_us": (1, None), "chunks": (1, 1000), "bins": (1, 1000),
}


def _check_ranges(cfg: DatasetsConfig, path: Path) -> None:
    for key, (lo, hi) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check_range(path, key, value, lo, hi)


def _check_range(path: Path, key: str, value: float, lo: float | None, hi: float | None) -> None:
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):  # NaN too
        want = (f"between {lo} and {hi}" if lo is not None and hi is not None
                else f">= {lo}" if lo is not None else f"<= {hi}")
        if key == "sample.event_rate":
            want = "> 0"
        raise InputError(path, f"{key} must be {want}, got {value!r}")


def _check_semantic(cfg: DatasetsConfig, path: Path) -> None:
    """The dsec_semantic section: known modes, positive window sizes, no sequence listed twice."""
    sem = cfg.dsec_semantic
    choices = {"layout": ("auto", "official", "ess"), "sampling": ("all", "ess"),
               "window.mode": ("events", "duration")}
    for key, allowed in choices.items():
        value = sem.window.mode if key == "window.mode" else getattr(sem, key)
        if value not in allowed:
            raise InputError(path, f"dsec_semantic.{key} must be one of {', '.join(allowed)}, got {value!r}")
    if sem.compressor not in ("lz4", "lz4hc", "zstd", "zlib", "blosclz"):
        raise InputError(path, f"dsec_semantic.compressor must be a Blosc codec name, got {sem.compressor!r}")
    for name, (lo, hi) in SEMANTIC_RANGES.items():
        _check_range(path, f"dsec_semantic.window.{name}", getattr(sem.window, name), lo, hi)
    both = sorted(set(sem.train) & set(sem.test))
    if both:
        raise InputError(path, f"dsec_semantic: {', '.join(both)} listed under both train and test")
    for split, names in (("train", sem.train), ("test", sem.test)):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(path, f"dsec_semantic.{split} lists {', '.join(twice)} more than once")
    s = cfg.sample.semantic
    if s.labels < 1 or not s.event_rate > 0 or s.lead_in_us < 0:
        raise InputError(path, "sample.semantic: labels must be >= 1, event_rate > 0 and lead_in_us >= 0")


def _parse_kinds(rep: Representation, path: Path) -> tuple[Any, ...]:
    """``representation.kinds`` as settings objects; voxel must be listed (its store carries the
    event index the splits and the trainer read) and no two entries may share a store."""

    kinds = []
    for i, entry in enumerate(rep.kinds):
        try:
            s = parse_kind(entry, f"representation.kinds[{i}]")
        except InputError as exc:
            raise InputError(path, exc.problem) from None
        kinds.append(VoxelSettings(rep.bins) if s.kind == "voxel" else s)
    names = [store_suffix(s) for s in kinds]
    if "voxel" not in [s.kind for s in kinds]:
        raise InputError(path, "representation.kinds must list voxel (CMDA's grid in events.zarr, which the "
                         "splits and the trainer read)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(path, f"representation.kinds lists the same setting twice: {', '.join(dup)}")
    return tuple(kinds)


def _window_kind(entry: Any, path: Path) -> Any:
    """``dsec_semantic.window.kind`` as a settings object, or None for ESS's voxel grid (absent or ``voxel``)."""
    where = "dsec_semantic.window.kind"
    if entry is None or entry == "voxel" or (isinstance(entry, dict) and entry == {"kind": "voxel"}):
        return None
    if isinstance(entry, dict) and entry.get("kind") == "voxel":
        raise InputError(path, f"{where}: voxel takes its bins from dsec_semantic.window.bins")
    try:
        return parse_kind(entry, where)
    except InputError as exc:
        raise InputError(path, exc.problem) from None


def load_config(path: str | Path = DEFAULT_CONFIG) -> DatasetsConfig:
    """Read and validate ``datasets.yaml``; paths in it are relative to the file's folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "configuration file not found (run from the repository root or pass --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({yaml_problem(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the configuration ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(path, f"the top level must be a mapping of sections (dsec:, representation:, ...), "
                         f"got a {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "source"}
    cfg = build_dataclass(DatasetsConfig, data, "datasets.yaml", path)
    cfg = dataclasses.replace(cfg, source=path)
    rep = cfg.representation
    if cfg.dsec.test_split not in ("labels", "rule"):
        raise InputError(path, f"dsec.test_split must be 'labels' or 'rule', got {cfg.dsec.test_split!r}")
    if cfg.dsec.warp_png not in ("fast", "small"):
        raise InputError(path, f"dsec.warp_png must be 'fast' or 'small', got {cfg.dsec.warp_png!r}")
    if rep.compressor not in ("lz4", "lz4hc", "zstd", "zlib", "blosclz"):
        raise InputError(path, f"representation.compressor must be a Blosc codec name, got {rep.compressor!r}")
    _check_ranges(cfg, path)
    if min(cfg.cityscapes.resize) < 0 or (min(cfg.cityscapes.resize) == 0 < max(cfg.cityscapes.resize)):
        raise InputError(path, f"cityscapes.resize must be [width, height] >= 1, or [0, 0] for no resized "
                         f"copies, got {list(cfg.cityscapes.resize)}")
    cfg = dataclasses.replace(cfg, representation=dataclasses.replace(rep, kinds=_parse_kinds(rep, path)))
    sem = cfg.dsec_semantic
    window = dataclasses.replace(sem.window, kind=_window_kind(sem.window.kind, path))
    cfg = dataclasses.replace(cfg, dsec_semantic=dataclasses.replace(sem, window=window))
    _check_semantic(cfg, path)
    for key in ("darkzurich", "acdc"):
        t = getattr(cfg, key)
        if min(t.resize) < 1 or t.crop < 1 or t.pseudo_ignore_top < 0 or t.pseudo_ignore_bottom < 0:
            raise InputError(path, f"{key}: resize and crop must be positive, the pseudo_ignore rows >= 0")
    st = cfg.sample.targets
    if min(st.train, st.val, st.test, st.day) < 0 or st.train < 1 or st.val < 1 or min(st.width, st.height) < 64:
        raise InputError(path, "sample.targets: train and val need >= 1 image, test and day >= 0, "
                               "width and height >= 64")
    for name, spec in cfg.dsec.sequences.items():
        lo, hi = spec.labelled
        if lo < 0 or (hi < lo and hi != -1):
            raise InputError(path, f"dsec.sequences.{name}.labelled must be [first, last], got {list(spec.labelled)}")
    return _resolve(cfg, path.parent)
