"""Event representations beyond CMDA's voxel grid: settings, store names and Numba kernels.

Each kind turns ONE event window into a dense (channels, H, W) array, after the same
rectification as CMDA's voxel grid (:mod:`pipeline.voxel`): a raw pixel (x, y) goes to
``rectify_map[y, x]``. The voxel kinds splat that float position bilinearly; the counting kinds
(histogram, time surface, MDES, ERGO-12) need an integer pixel, so they take the NEAREST rectified
pixel (``floor(v + 0.5)``) and drop events whose pixel lands off the grid. With an identity map
both reduce to the raw pixel, which is how the reference implementations are compared.

Kinds (definitions and references in ``docs/representations.md``):

* ``voxel`` - CMDA's grid, built by :mod:`pipeline.voxel` into ``events.zarr`` (unchanged here).
* ``histogram`` - RVT's stacked histogram (Gehrig & Scaramuzza, CVPR 2023; RVT
  ``data/utils/representations.py`` ``StackedHistogram``): per polarity, ``bins`` time bins,
  counts clipped to ``cutoff``, uint8, channel ``p * bins + k``. RVT accumulates in uint8 and wraps
  at 256 before clipping; here counts are exact unless ``rvt_wrap`` asks for RVT's bytes.
* ``time_surface`` - per polarity ``exp(-(T - t_last(x, y)) / tau)`` sampled at the window's last
  event, 0 where the pixel never fired; with ``dt_us`` tonic's sliced form
  (``tonic.functional.to_timesurface_numpy``): ``slices`` surfaces at ``t_first + (i+1) dt``.
* ``mdes`` - RVT's mixed-density event stack (``MixedDensityEventStack``): channel c sums the
  polarities (+-1) of the events with normalised time ``u < 2**(c + 1 - bins)``, int8, optional
  cutoff. RVT's int8 sums wrap; here they saturate unless ``rvt_wrap``.
* ``ergo12`` - the 12 channels of ERGO-12 (Zubic et al., ICCV 2023, "From Chaos Comes Order";
  ``representations/optimized_representation.py`` of uzh-rpg/event_representation_study).
* ``voxel_dsec`` - DSEC's official ``VoxelGrid`` (uzh-rpg/DSEC ``scripts/dataset/representations.py``):
  the same bilinear kernel as ``voxel`` with ``bins`` bins, then (``normalize``) mean / unbiased std
  over the non-zero cells, as DSEC's and ESS's loaders feed networks.

Kernels accumulate window by window in pieces (bounded memory for any window length): every
piece uses the window's own first/last event times and event count, so a window fed in pieces
gives the same array as one call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numba as nb
import numpy as np

from pipeline.errors import InputError
from pipeline.voxel import Rectifier, accumulate_window_in_pieces, invalid_events

KINDS = ("voxel", "histogram", "time_surface", "mdes", "ergo12", "voxel_dsec")
_NEVER = np.iinfo(np.int64).min  # time-surface memory of a pixel that never fired
_MAX_TABLE = 1 << 21  # time surfaces look exp() up in a table of at most this many ages (8 MB)


# --------------------------------------------------------------------------- settings
def _bad(kind: str, name: str, want: str, value: Any) -> InputError:
    return InputError(None, f"{kind}.{name} must be {want}, got {value!r}")


def _int(kind: str, name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise _bad(kind, name, f"an integer between {lo} and {hi}", value)


def _bool(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(kind, name, "true or false", value)


@dataclass(frozen=True)
class VoxelSettings:
    """CMDA's voxel grid: built into ``events.zarr`` from ``representation.bins`` (not from here)."""

    kind: ClassVar[str] = "voxel"
    bins: int = 1

    def __post_init__(self) -> None:
        _int(self.kind, "bins", self.bins, 1, 1000)


@dataclass(frozen=True)
class HistogramSettings:
    """RVT's stacked histogram; RVT's preprocessing uses bins=10, cutoff=10."""

    kind: ClassVar[str] = "histogram"
    bins: int = 10
    cutoff: int = 10
    rvt_wrap: bool = False  # True: RVT's uint8 accumulation, counts wrap at 256 before the clip

    def __post_init__(self) -> None:
        _int(self.kind, "bins", self.bins, 1, 1000)
        _int(self.kind, "cutoff", self.cutoff, 1, 255)
        _bool(self.kind, "rvt_wrap", self.rvt_wrap)


@dataclass(frozen=True)
class TimeSurfaceSettings:
    """Exponential time surface per polarity; ``dt_us`` gives tonic's sliced form."""

    kind: ClassVar[str] = "time_surface"
    tau_us: float = 50_000.0
    dt_us: int | None = None
    slices: int = 1

    def __post_init__(self) -> None:
        tau = self.tau_us
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not (math.isfinite(tau) and tau > 0):
            raise _bad(self.kind, "tau_us", "a finite number > 0 (microseconds)", tau)
        if self.dt_us is not None:
            _int(self.kind, "dt_us", self.dt_us, 1, 10**12)
        _int(self.kind, "slices", self.slices, 1, 1000)
        if self.dt_us is None and self.slices != 1:
            raise _bad(self.kind, "slices", "1 when dt_us is not given (one surface at the window's end)",
                       self.slices)


@dataclass(frozen=True)
class MdesSettings:
    """RVT's mixed-density event stack; RVT's preprocessing uses bins=10, cutoff=32."""

    kind: ClassVar[str] = "mdes"
    bins: int = 10
    cutoff: int | None = 32
    rvt_wrap: bool = False  # True: RVT's int8 sums, which wrap at +-128 before the cutoff

    def __post_init__(self) -> None:
        _int(self.kind, "bins", self.bins, 1, 64)
        if self.cutoff is not None:
            _int(self.kind, "cutoff", self.cutoff, 0, 127)
        _bool(self.kind, "rvt_wrap", self.rvt_wrap)


@dataclass(frozen=True)
class Ergo12Settings:
    """ERGO-12 has no parameters (its windows and channel recipe are fixed by the study)."""

    kind: ClassVar[str] = "ergo12"


@dataclass(frozen=True)
class VoxelDsecSettings:
    """DSEC's ``VoxelGrid``: DSEC's loader uses 15 bins, ESS 5; ``normalize`` as DSEC's Sequence."""

    kind: ClassVar[str] = "voxel_dsec"
    bins: int = 15
    normalize: bool = True

    def __post_init__(self) -> None:
        _int(self.kind, "bins", self.bins, 1, 1000)
        _bool(self.kind, "normalize", self.normalize)


Settings = (VoxelSettings | HistogramSettings | TimeSurfaceSettings | MdesSettings | Ergo12Settings
            | VoxelDsecSettings)
_CLASSES: dict[str, type] = {c.kind: c for c in (VoxelSettings, HistogramSettings, TimeSurfaceSettings,
                                                  MdesSettings, Ergo12Settings, VoxelDsecSettings)}


def parse_kind(entry: Any, where: str = "representation.kinds") -> Settings:
    """One ``representation.kinds`` entry: a kind name, or a mapping ``{kind: NAME, param: value}``
    (a settings object is returned as it is).

    Unknown kinds or parameters and bad values raise :class:`InputError` naming the setting
    (``where`` prefixes it; callers re-raise with the config file's path).
    """
    if isinstance(entry, tuple(_CLASSES.values())):
        return entry
    if isinstance(entry, str):
        entry = {"kind": entry}
    if not isinstance(entry, Mapping) or "kind" not in entry:
        raise InputError(None, f"{where} entries must be a kind name or a mapping with 'kind', got {entry!r}")
    kind = entry["kind"]
    if kind not in _CLASSES:
        raise InputError(None, f"{where}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    cls = _CLASSES[kind]
    params = {k: v for k, v in entry.items() if k != "kind"}
    if kind == "voxel" and params:
        raise InputError(None, f"{where}: voxel takes its settings from representation.bins, "
                         f"not from {', '.join(map(str, params))}")
    unknown = sorted(set(map(str, params)) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(None, f"{where}: unknown parameter(s) of {kind}: {', '.join(unknown)}")
    if kind == "time_surface" and isinstance(params.get("tau_us"), int) and not isinstance(params["tau_us"], bool):
        params["tau_us"] = float(params["tau_us"])
    try:
        return cls(**params)
    except InputError as exc:
        raise InputError(None, f"{where}: {exc.problem}") from None


def _num(v: float) -> str:
    """A number as a store-name token: 50000.0 -> '50000', 2.5 -> '2p5' (no dots in names)."""
    return str(int(v)) if float(v).is_integer() else repr(float(v)).replace(".", "p").replace("-", "m")


def store_suffix(s: Settings) -> str:
    """The canonical name of a setting's store, e.g. ``histogram_b10_c10``: every parameter is in
    it, so two different settings never share (or overwrite) a store."""
    if isinstance(s, VoxelSettings):
        return f"voxel_b{s.bins}"
    if isinstance(s, HistogramSettings):
        return f"histogram_b{s.bins}_c{s.cutoff}" + ("_wrap" if s.rvt_wrap else "")
    if isinstance(s, TimeSurfaceSettings):
        sliced = f"_dt{s.dt_us}_s{s.slices}" if s.dt_us is not None else ""
        return f"time_surface_tau{_num(s.tau_us)}{sliced}"
    if isinstance(s, MdesSettings):
        cut = "none" if s.cutoff is None else str(s.cutoff)
        return f"mdes_b{s.bins}_c{cut}" + ("_wrap" if s.rvt_wrap else "")
    if isinstance(s, Ergo12Settings):
        return "ergo12"
    if isinstance(s, VoxelDsecSettings):
        return f"voxel_dsec_b{s.bins}_" + ("norm" if s.normalize else "raw")
    raise TypeError(f"not a representation setting: {s!r}")


def channels(s: Settings) -> int:
    """Channels of one frame of the kind (the event encoder's input channels)."""
    if isinstance(s, HistogramSettings):
        return 2 * s.bins
    if isinstance(s, TimeSurfaceSettings):
        return 2 * s.slices
    if isinstance(s, Ergo12Settings):
        return 12
    return s.bins  # voxel, mdes, voxel_dsec


def frame_dtype(s: Settings) -> np.dtype:
    if isinstance(s, HistogramSettings):
        return np.dtype(np.uint8)
    if isinstance(s, MdesSettings):
        return np.dtype(np.int8)
    return np.dtype(np.float32)


def describe(s: Settings) -> dict[str, Any]:
    """The kind and its parameters as plain JSON values (stored in the store's attributes)."""
    return {"kind": s.kind, **{f.name: getattr(s, f.name) for f in fields(s)}}


# --------------------------------------------------------------------------- rectification
@nb.njit(nogil=True, cache=True, boundscheck=False)
def _nearest_table(map_x, map_y, height, width):  # pragma: no cover - numba
    # Raw pixel -> flat index of the nearest rectified pixel, -1 when it lands off the grid.
    out = np.empty(map_x.size, np.int32)
    k = 0
    for sy in range(map_x.shape[0]):
        for sx in range(map_x.shape[1]):
            xi = np.int64(np.floor(map_x[sy, sx] + np.float32(0.5)))
            yi = np.int64(np.floor(map_y[sy, sx] + np.float32(0.5)))
            out[k] = yi * width + xi if 0 <= xi < width and 0 <= yi < height else -1
            k += 1
    return out


def pixel_table(rect: Rectifier) -> np.ndarray:
    """Per raw pixel (``y * sensor_w + x``), the flat index of its nearest rectified pixel or -1;
    computed once per rectifier."""
    table = rect.__dict__.get("_nearest")
    if table is None:
        table = _nearest_table(rect.map_x, rect.map_y, rect.height, rect.width)
        rect.__dict__["_nearest"] = table
    return table


# --------------------------------------------------------------------------- kernels
@nb.njit(nogil=True, cache=True, boundscheck=False)
def _hist_add(x, y, p, t, table, sensor_w, t0, span, cutoff, wrap, out):  # noqa: PLR0913  # pragma: no cover - numba
    # out: uint8 (2, bins, H*W), the counts themselves: saturating at the cutoff, or (wrap) adding
    # modulo 256 as RVT's uint8 tensor does, clipped at the end. Time bin as RVT computes it in
    # float32: floor(dt / span * bins), the last event clamped into bin bins-1.
    bins = out.shape[1]
    fspan = np.float32(max(span, 1))
    fbins = np.float32(bins)
    for i in range(x.shape[0]):
        d = table[np.int64(y[i]) * sensor_w + np.int64(x[i])]
        if d < 0:
            continue
        k = np.int64(np.floor((np.float32(np.int64(t[i]) - t0) / fspan) * fbins))
        if k > bins - 1:
            k = bins - 1
        c = np.int64(p[i])
        v = out[c, k, d]
        if wrap:
            out[c, k, d] = (v + 1) & 255
        elif v < cutoff:
            out[c, k, d] = v + 1


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _hist_clip(out, cutoff):  # pragma: no cover - numba
    o = out.reshape(-1)
    for i in range(o.shape[0]):
        o[i] = min(o[i], cutoff)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _ts_emit(mem, touched, n_touched, at, tau, table, out):  # pragma: no cover - numba
    # out: one surface, flat (2 * H * W) float32 and zero on entry: exp(-(at - last) / tau) on the
    # n_touched cells that have fired (the others stay 0). Ages inside the table (every age a window
    # can have, when it fits) are looked up instead of exponentiated.
    size = table.shape[0]
    for k in range(n_touched):
        j = touched[k]
        d = at - mem[j]
        out[j] = table[d] if d < size else np.float32(np.exp(-np.float64(d) / tau))


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _ts_add(x, y, p, t, table, sensor_w, t_first, dt, tau, ages, state, mem, touched, out):  # noqa: PLR0913  # pragma: no cover
    # mem: flat (2 * H * W) latest event time per cell (_NEVER: none yet); touched lists the cells
    # that have fired, state = [next surface to emit, len(touched)]. With dt > 0, surface i is
    # sampled at t_first + (i+1) dt from the events strictly before it (tonic's half-open slices).
    slices = out.shape[0]
    hw = mem.shape[0] // 2
    for i in range(x.shape[0]):
        ti = np.int64(t[i])
        if dt > 0:
            while state[0] < slices and ti >= t_first + (state[0] + 1) * dt:
                _ts_emit(mem, touched, state[1], t_first + (state[0] + 1) * dt, tau, ages, out[state[0]])
                state[0] += 1
        d = table[np.int64(y[i]) * sensor_w + np.int64(x[i])]
        if d >= 0:
            j = np.int64(p[i]) * hw + d
            if mem[j] == _NEVER:
                touched[state[1]] = j
                state[1] += 1
            mem[j] = ti


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _floor_log2(u):  # pragma: no cover - numba
    # floor(log2(u)) for u > 0, exact (no transcendental rounding at powers of two).
    _, e = math.frexp(u)
    return e - 1


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _mdes_add(x, y, p, t, table, sensor_w, t0, span, acc):  # noqa: PLR0913  # pragma: no cover - numba
    # acc int32 (bins, H*W): polarity sums per log2 time bin, bin = max(0, bins + floor(log2 u)),
    # u = dt / span in float32 clamped to [1e-6, 1 - 1e-6] as RVT does.
    bins = acc.shape[0]
    fspan = np.float32(max(span, 1))
    lo = np.float32(1e-6)
    hi = np.float32(1.0 - 1e-6)
    for i in range(x.shape[0]):
        d = table[np.int64(y[i]) * sensor_w + np.int64(x[i])]
        if d < 0:
            continue
        u = min(max(np.float32(np.int64(t[i]) - t0) / fspan, lo), hi)
        k = max(bins + _floor_log2(u), 0)
        acc[k, d] += 2 * np.int32(p[i]) - 1


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _mdes_finish(acc, limit, wrap, out):  # pragma: no cover - numba
    # Cumulative sums over the bins (channel c = bins 0..c), then wrap (RVT) and clamp to +-limit.
    for j in range(acc.shape[1]):
        s = 0
        for c in range(acc.shape[0]):
            s += acc[c, j]
            v = s
            if wrap:
                v = ((v + 128) & 255) - 128
            out[c, j] = min(max(v, -limit), limit)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _ergo_add(x, y, p, t, table, sensor_w, offset, n, t0, span, out, aux):  # noqa: C901, PLR0913  # pragma: no cover - numba
    # out float64 (12, H*W); aux float64 (4, H*W): w0 count, w3 sum of t^2 and count of negative
    # events, w2 count of positive events. Windows by event index g in the window of n events:
    # w1..w3 = thirds (n // 3 each), w4..w6 start at n//2, n//2 + n//4, n//2 + n//4 + n//8.
    n3 = n // 3
    s4 = n // 2
    s5 = s4 + n // 4
    s6 = s5 + n // 8
    for i in range(x.shape[0]):
        d = table[np.int64(y[i]) * sensor_w + np.int64(x[i])]
        if d < 0:
            continue
        g = offset + i
        pos = p[i] != 0
        pol = 1.0 if pos else -1.0
        ts = np.float64(np.int64(t[i]) - t0) / np.float64(span) if span > 0 else 0.0
        out[0, d] += pol
        aux[0, d] += 1.0
        if pos:
            out[9, d] = max(out[9, d], ts)
        if g < n3:
            out[11, d] = 1.0
            if not pos:
                out[8, d] = max(out[8, d], ts)
        elif g < 2 * n3:
            if pos:
                out[6, d] += ts
                aux[3, d] += 1.0
            else:
                out[2, d] = 1.0
        elif g < 3 * n3 and not pos:
            out[1, d] += ts
            aux[1, d] += ts * ts
            aux[2, d] += 1.0
        if g >= s4:
            out[10, d] = max(out[10, d], ts)
        if g >= s5:
            if pos:
                out[4, d] = 1.0
            else:
                out[7, d] = 1.0
        if g >= s6:
            out[3, d] += pol
            out[5, d] += 1.0


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _ergo_finish(out, aux, res):  # pragma: no cover - numba
    # Means and variances (E[v^2] - E[v]^2, as the study computes them); empty pixels stay 0.
    for j in range(out.shape[1]):
        c0 = aux[0, j]
        if c0 > 0:
            m = out[0, j] / c0
            out[0, j] = c0 / c0 - m * m
        c1 = aux[2, j]
        if c1 > 0:
            m = out[1, j] / c1
            out[1, j] = aux[1, j] / c1 - m * m
        c6 = aux[3, j]
        if c6 > 0:
            out[6, j] = out[6, j] / c6
    for c in range(out.shape[0]):
        for j in range(out.shape[1]):
            res[c, j] = np.float32(out[c, j])


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _dsec_normalize(g):  # pragma: no cover - numba
    # DSEC's VoxelGrid normalisation, in place: over the non-zero cells, (v - mean) / std with the
    # unbiased std (mean only when std is 0 or undefined); mean and std rounded to float32 as
    # torch's are. Zero cells add nothing to the sums, so the statistics pass needs no branch: four
    # interleaved partial sums (a fixed order, so the result does not depend on the machine) keep
    # it from waiting on one add chain.
    m = g.shape[0]
    s = np.zeros(4)
    q = np.zeros(4)
    n = 0
    for i in range(0, m - m % 4, 4):
        for k in range(4):
            v = np.float64(g[i + k])
            s[k] += v
            q[k] += v * v
            n += v != 0
    for i in range(m - m % 4, m):
        v = np.float64(g[i])
        s[0] += v
        q[0] += v * v
        n += v != 0
    if n == 0:
        return
    total = (s[0] + s[1]) + (s[2] + s[3])
    mean = total / n
    var = ((q[0] + q[1]) + (q[2] + q[3]) - total * mean) / (n - 1) if n > 1 else 0.0
    std = np.float32(np.sqrt(max(var, 0.0)))
    m32 = np.float32(mean)
    zero = np.float32(0.0)
    if std > 0:
        for i in range(m):
            v = g[i]
            g[i] = (v - m32) / std if v != zero else zero
    else:
        for i in range(m):
            v = g[i]
            g[i] = v - m32 if v != zero else zero


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _exp_table(size, tau):  # pragma: no cover - numba
    # exp(-d / tau) for every whole-microsecond age d < size, as _ts_value computes it.
    out = np.empty(size, np.float32)
    for d in range(size):
        out[d] = np.float32(np.exp(-np.float64(d) / tau))
    return out


# --------------------------------------------------------------------------- accumulators
class _Builder:
    """One window's state for a kind: :meth:`add` pieces in stream order, then :meth:`finish`."""

    def __init__(self, s: Settings, rect: Rectifier, n_events: int, t_first: int, t_last: int):
        self.s, self.rect, self.n = s, rect, int(n_events)
        self.t0, self.span = int(t_first), int(t_last) - int(t_first)
        self.t_last = int(t_last)
        self.hw = rect.height * rect.width
        self.table = pixel_table(rect)
        self.sensor_w = rect.map_x.shape[1]
        self.fed = 0
        if isinstance(s, HistogramSettings):
            self.state = (np.zeros((2, s.bins, self.hw), np.uint8),)
        elif isinstance(s, TimeSurfaceSettings):
            self.state = (np.zeros(2, np.int64), np.full(2 * self.hw, _NEVER, np.int64),
                          np.empty(2 * self.hw, np.int32), np.zeros((s.slices, 2 * self.hw), np.float32))
            # every age (sample time - event time) the window can have, when that is a small table
            last = self.t0 + s.slices * s.dt_us if s.dt_us is not None else self.t_last
            ages = last - self.t0 + 1
            self.ages = _exp_table(ages if ages <= _MAX_TABLE else 0, float(s.tau_us))
        elif isinstance(s, MdesSettings):
            self.state = (np.zeros((s.bins, self.hw), np.int32),)
        elif isinstance(s, Ergo12Settings):
            self.state = (np.zeros((12, self.hw), np.float64), np.zeros((4, self.hw), np.float64))
        else:
            raise TypeError(f"{s.kind} is built by pipeline.voxel, not by a counting kernel")

    def add(self, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray) -> None:
        s, a = self.s, (x, y, p, t, self.table, self.sensor_w)
        if isinstance(s, HistogramSettings):
            _hist_add(*a, self.t0, self.span, s.cutoff, s.rvt_wrap, self.state[0])
        elif isinstance(s, TimeSurfaceSettings):
            _ts_add(*a, self.t0, s.dt_us or 0, float(s.tau_us), self.ages, *self.state)
        elif isinstance(s, MdesSettings):
            _mdes_add(*a, self.t0, self.span, self.state[0])
        else:
            _ergo_add(*a, self.fed, self.n, self.t0, self.span, *self.state)
        self.fed += len(x)

    def finish(self) -> np.ndarray:
        s, shape = self.s, (channels(self.s), self.rect.height, self.rect.width)
        if self.fed != self.n:
            raise ValueError(f"the pieces held {self.fed} events, the window has {self.n}")
        if isinstance(s, HistogramSettings):
            out = self.state[0].reshape(shape)
            if s.rvt_wrap:
                _hist_clip(out, s.cutoff)
            return out
        if isinstance(s, TimeSurfaceSettings):
            state, mem, touched, surf = self.state
            tau = float(s.tau_us)
            if s.dt_us is None:
                _ts_emit(mem, touched, state[1], self.t_last, tau, self.ages, surf[0])
            else:
                for i in range(int(state[0]), s.slices):
                    _ts_emit(mem, touched, state[1], self.t0 + (i + 1) * s.dt_us, tau, self.ages, surf[i])
            return surf.reshape(shape)
        out = np.empty(shape, frame_dtype(s))
        if isinstance(s, MdesSettings):
            limit = 127 if s.cutoff is None else s.cutoff
            _mdes_finish(self.state[0], limit, s.rvt_wrap, out.reshape(s.bins, -1))
        else:
            _ergo_finish(*self.state, out.reshape(12, -1))
        return out


def _check(rect: Rectifier, x, y, p, t) -> None:
    n = len(x)
    if len(y) != n or len(p) != n or len(t) != n:
        raise ValueError(f"x, y, p, t must have the same length, got {len(x)}, {len(y)}, {len(p)}, {len(t)}")
    for name, a in (("x", x), ("y", y), ("p", p), ("t", t)):
        if not isinstance(a, np.ndarray) or a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"events {name} must be a 1-D integer array")
    sensor_h, sensor_w = rect.map_x.shape
    bad = invalid_events(x, y, p, sensor_w, sensor_h)
    if bad is not None:
        raise ValueError(bad.describe())


def build_in_pieces(
    s: Settings,
    pieces: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    n_events: int,
    rect: Rectifier,
    t_first: int,
    t_last: int,
    *,
    checked: bool = False,
) -> np.ndarray:
    """The kind's (channels, H, W) frame of ONE window of ``n_events`` events given as consecutive
    pieces ``(x, y, p, t)`` (bounded memory), identical to :func:`build` on the whole window.

    ``t_first``/``t_last`` are the window's first and last event times (they set the time
    normalisation). Events off the rectify map's sensor or with p outside {0, 1} raise ValueError
    unless ``checked`` says the caller has validated them (``cmda preprocess`` does).
    """
    def validated():
        for piece in pieces:
            if not checked:
                _check(rect, *piece)
            yield piece

    if isinstance(s, VoxelDsecSettings | VoxelSettings):
        # The voxel kernel itself (same weights, same float32 time, same piece rule as `voxel`).
        grid = np.zeros((1, s.bins, rect.height, rect.width), np.float32)
        accumulate_window_in_pieces(validated(), n_events, rect, t_first, t_last, grid, checked=True)
        if isinstance(s, VoxelDsecSettings) and s.normalize:
            _dsec_normalize(grid.reshape(-1))
        return grid[0]
    b = _Builder(s, rect, n_events, t_first, t_last)
    for x, y, p, t in validated():
        if len(x):
            b.add(x, y, p, t)
    return b.finish()


def build(s: Settings, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray, rect: Rectifier) -> np.ndarray:
    """The kind's (channels, H, W) frame of one window holding exactly the given events (time-sorted)."""
    n = len(t)
    t0, t1 = (int(t[0]), int(t[-1])) if n else (0, 0)
    return build_in_pieces(s, [(x, y, p, t)], n, rect, t0, t1)


def histogram(x, y, p, t, rect: Rectifier, bins: int = 10, cutoff: int = 10, *, rvt_wrap: bool = False) -> np.ndarray:
    """RVT stacked histogram (2*bins, H, W) uint8; channel ``p * bins + k``."""
    return build(HistogramSettings(bins, cutoff, rvt_wrap), x, y, p, t, rect)


def time_surface(x, y, p, t, rect: Rectifier, tau_us: float = 50_000.0, dt_us: int | None = None,
                 slices: int = 1) -> np.ndarray:
    """Time surfaces (2*slices, H, W) float32, channel ``2 * slice + p``."""
    return build(TimeSurfaceSettings(float(tau_us), dt_us, slices), x, y, p, t, rect)


def mdes(x, y, p, t, rect: Rectifier, bins: int = 10, cutoff: int | None = 32, *, rvt_wrap: bool = False) -> np.ndarray:
    """RVT mixed-density event stack (bins, H, W) int8."""
    return build(MdesSettings(bins, cutoff, rvt_wrap), x, y, p, t, rect)


def ergo12(x, y, p, t, rect: Rectifier) -> np.ndarray:
    """ERGO-12 (12, H, W) float32 (the study's loader multiplies by 255; this array does not)."""
    return build(Ergo12Settings(), x, y, p, t, rect)


def voxel_dsec(x, y, p, t, rect: Rectifier, bins: int = 15, normalize: bool = True) -> np.ndarray:
    """DSEC's VoxelGrid (bins, H, W) float32, normalised over its non-zero cells when asked."""
    return build(VoxelDsecSettings(bins, normalize), x, y, p, t, rect)
