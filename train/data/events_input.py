"""Which event representation a run trains on, decided once when the run (or the inference model) is built.

A run's event input is one entry of ``datasets.yaml``'s ``representation.kinds``: CMDA's ``voxel`` grid
(the default; ``events.zarr``) or another kind's store (``representations/<suffix>.zarr``, built by
``cmda preprocess``). ``--set representation.kind=NAME`` picks it by kind name (``histogram``) or, when two
entries share a kind, by store name (``histogram_b10_c10``). The choice fixes, before the first iteration:

* the store the loaders read (:meth:`EventInput.open`) and how a frame becomes network input
  (:func:`network_events`);
* the event encoder's input channels (:attr:`EventInput.network_channels`): the kind's channels, except
  that a 1-channel kind is repeated to 3, as CMDA feeds its 1-bin grid;
* the record a checkpoint keeps (:meth:`EventInput.record`): kind, parameters, store suffix, channels.
  Inference reads the checkpoint's record (:func:`from_record`; none = CMDA's voxel grid, as every
  checkpoint before the record existed) and refuses a store holding another setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import representations as reps
from pipeline.config import DatasetsConfig
from pipeline.errors import InputError
from pipeline.store import RepresentationStore, VoxelStore
from pipeline.voxel import Rectifier, events_norm

VOXEL = "voxel"


def network_events(s: reps.Settings, frame: np.ndarray, n_events: int, *, cmda_empty_part: bool = False
                   ) -> np.ndarray:
    """One stored frame (channels, H, W) -> float32 network input, zero where no event fell.

    * ``voxel``: CMDA's :func:`pipeline.voxel.events_norm` (unchanged; ``cmda_empty_part`` is
      ``data.cmda_empty_part``);
    * ``voxel_dsec``: as stored (DSEC's own normalisation when ``normalize``, raw otherwise);
    * ``histogram``: counts / cutoff, in [0, 1];
    * ``mdes``: sums / cutoff (127 without one), in [-1, 1];
    * ``time_surface``: as stored, in [0, 1];
    * ``ergo12``: as stored (ten channels in [0, 1]; channels 3 and 5 are event counts of the last
      eighth of the window, unbounded, as the study defines them).
    """
    if isinstance(s, reps.VoxelSettings):
        return events_norm(frame, n_events, cmda_empty_part=cmda_empty_part)
    if isinstance(s, reps.HistogramSettings):
        return frame.astype(np.float32) * np.float32(1.0 / s.cutoff)
    if isinstance(s, reps.MdesSettings):
        return frame.astype(np.float32) * np.float32(1.0 / (127 if s.cutoff is None else max(s.cutoff, 1)))
    return np.array(frame, dtype=np.float32)


@dataclass(frozen=True)
class EventInput:
    """One representation setting as a run uses it (see the module docstring)."""

    settings: reps.Settings

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def suffix(self) -> str:
        return reps.store_suffix(self.settings)

    @property
    def channels(self) -> int:
        """Channels of a stored frame."""
        return reps.channels(self.settings)

    @property
    def network_channels(self) -> int:
        """Channels of the event encoder's input: a 1-channel kind is repeated to 3 (CMDA's copy)."""
        return 3 if self.channels == 1 else self.channels

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps: ``{kind, parameters..., suffix, channels, network_channels}``."""
        return {**reps.describe(self.settings), "suffix": self.suffix, "channels": self.channels,
                "network_channels": self.network_channels}

    def store_path(self, events_store: str | Path) -> Path:
        """The store of this setting for a sequence whose voxel store is ``events_store`` (index.csv's
        ``store`` column): ``events.zarr`` itself for ``voxel``, else ``representations/<suffix>.zarr``
        beside it."""
        events_store = Path(events_store)
        return events_store if self.kind == VOXEL else events_store.parent / "representations" / f"{self.suffix}.zarr"

    def open(self, events_store: str | Path) -> FrameReader:
        """Open this setting's store for a sequence; a store of another setting is an InputError naming it."""
        path = self.store_path(events_store)
        if self.kind == VOXEL:
            return FrameReader(self.settings, VoxelStore.open(path, bins=self.settings.bins).voxels)
        if not path.exists():
            raise InputError(path, f"no {self.suffix} store: the model takes {self.suffix} events; list "
                             f"{self.kind} with these parameters in datasets.yaml's representation.kinds and run "
                             "`cmda preprocess` (or `dvc repro`)")
        return FrameReader(self.settings, RepresentationStore.open(path, expect=reps.describe(self.settings)).frame)

    def build(self, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray, rect: Rectifier) -> np.ndarray:
        """One window's frame (channels, H, W) built live from its events, with the preprocessing kernels."""
        return reps.build(self.settings, x, y, p, t, rect)


@dataclass(frozen=True)
class FrameReader:
    """A sequence's store of one setting: frame index -> network input."""

    settings: reps.Settings
    read: Any  # frame -> stored array

    def events(self, frame: int, n_events: int, cmda_empty_part: bool = False) -> np.ndarray:
        return network_events(self.settings, self.read(frame), n_events, cmda_empty_part=cmda_empty_part)


def voxel_input(cfg: DatasetsConfig) -> EventInput:
    """CMDA's voxel grid with datasets.yaml's bins (what a run without a choice, or a checkpoint without a
    record, uses)."""
    return EventInput(reps.VoxelSettings(cfg.representation.bins))


def resolve(selector: str, cfg: DatasetsConfig) -> EventInput:
    """The ``representation.kinds`` entry ``selector`` names: a kind (``histogram``) or a store name
    (``histogram_b10_c10``). Unlisted or ambiguous names are an InputError naming datasets.yaml."""
    if selector in (VOXEL, f"voxel_b{cfg.representation.bins}"):
        return voxel_input(cfg)
    listed = [reps.parse_kind(k) for k in cfg.representation.kinds]
    found = [s for s in listed if selector in (s.kind, reps.store_suffix(s))]
    where = getattr(cfg, "source", None)
    names = ", ".join(reps.store_suffix(s) for s in listed)
    if not found:
        raise InputError(where, f"representation.kind={selector!r} is not among representation.kinds ({names}); "
                         f"add it there and run `cmda preprocess`")
    if len(found) > 1:
        raise InputError(where, f"representation.kind={selector!r} matches {len(found)} entries "
                         f"({', '.join(reps.store_suffix(s) for s in found)}): name one by its store name")
    return EventInput(found[0])


def from_record(record: Any, cfg: DatasetsConfig, path: Path | None = None) -> EventInput:
    """The setting a checkpoint was trained on: its record, or (no record: every older checkpoint and CMDA's
    released files) CMDA's voxel grid with datasets.yaml's bins."""
    if record is None:
        return voxel_input(cfg)
    if not isinstance(record, dict) or "kind" not in record:
        raise InputError(path, f"checkpoint's representation record is not a mapping with a kind: {record!r}")
    params = {k: v for k, v in record.items() if k not in ("suffix", "channels", "network_channels")}
    if params["kind"] == VOXEL:
        return EventInput(reps.VoxelSettings(int(params.get("bins", 1))))
    try:
        return EventInput(reps.parse_kind(params, "checkpoint representation"))
    except InputError as exc:
        raise InputError(path, exc.problem) from None
