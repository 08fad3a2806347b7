"""The event representation CMDA trains on: rectified voxel grids and their normalisation.

Two pure functions, arrays in and arrays out:

* :func:`accumulate_voxels` — the Numba kernel. Each event, at its rectified position
  ``rectify_map[y, x]`` and normalised time ``tn = (B-1) * (t - t_first) / (t_last - t_first)``,
  adds ``(2p-1) (1-|xl-x|) (1-|yl-y|) (1-|tl-tn|)`` to the 8 surrounding cells, with the base corner
  found by truncation toward zero (``int()``), as CMDA's loader does with torch ``.int()``. The
  kernel only accumulates: callers may feed one window in several pieces (bounded memory for huge
  windows) as long as every piece uses the window's own ``t_first``/``t_last``. One bin sums
  polarities per raw pixel and splats each pixel once; several bins bucket the events by sensor
  row band first so the adds of one band stay in cache (see ``_accumulate_bands``).
* :func:`events_norm` — CMDA's normalisation of a window's grid before it enters the network.

The kernel is ``nopython``/``nogil`` so dask threads run several frames at once.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numba as nb
import numpy as np


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _corner_weights(v):  # pragma: no cover - numba
    # The linear weights 1 - |trunc(v) - v| and 1 - |trunc(v) + 1 - v| of coordinate v's two
    # corners, as (1 - |f|, f) with f = v - trunc(v) in (-1, 1): equal in exact arithmetic, but f
    # is exact in float32 and 1 - |f| is correctly rounded, where 1 - |1 - v| loses the bits of a
    # small v (v = 1.6e-4 came out 4e-4 off, relative).
    f = v - np.float32(np.int64(v))
    return np.float32(1.0) - abs(f), f


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _splat_table(map_x, map_y, height, width, exact=False):  # pragma: no cover - numba
    # For every raw pixel: one base index b into the flat (height, width) grid and the weights of
    # the 2x2 block b, b+1, b+W, b+W+1. The block is the pixel's 4 rectified corners (base corner by
    # truncation); at the grid border the block is shifted inside and off-grid corners get weight
    # 0, so the kernel needs no bounds checks and touches two adjacent pairs of cells.
    # exact=False: the weights as the 1-bin kernel always computed them (its stores' bytes depend
    # on them); exact=True: correctly rounded (_corner_weights), for the multi-bin kernel.
    n = map_x.size
    base = np.zeros(n, dtype=np.int32)
    weight = np.zeros((n, 4), dtype=np.float32)
    k = 0
    for sy in range(map_x.shape[0]):
        for sx in range(map_x.shape[1]):
            xf = map_x[sy, sx]
            yf = map_y[sy, sx]
            xi = np.int64(xf)
            yi = np.int64(yf)
            bx = min(max(xi, 0), width - 2)
            by = min(max(yi, 0), height - 2)
            base[k] = by * width + bx
            wx0, wx1 = _corner_weights(xf)
            wy0, wy1 = _corner_weights(yf)
            for dy in range(2):
                yl = yi + dy
                wy = (wy0 if dy == 0 else wy1) if exact else np.float32(1.0) - abs(np.float32(yl) - yf)
                for dx in range(2):
                    xl = xi + dx
                    wx = (wx0 if dx == 0 else wx1) if exact else np.float32(1.0) - abs(np.float32(xl) - xf)
                    if 0 <= xl < width and 0 <= yl < height:
                        weight[k, 2 * (yl - by) + (xl - bx)] = wy * wx
            k += 1
    return base, weight


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _splat_pixel(g, b, w, fv, weight, pix):  # pragma: no cover - numba
    # One raw pixel's polarity sum into the 2x2 block at flat index b of a grid w wide.
    g[b] += fv * weight[pix, 0]
    g[b + 1] += fv * weight[pix, 1]
    g[b + w] += fv * weight[pix, 2]
    g[b + w + 1] += fv * weight[pix, 3]


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _hist_dense(x, y, p, lo, hi, sensor_w, hist):  # pragma: no cover - numba
    for i in range(lo, hi):
        hist[np.int64(y[i]) * sensor_w + np.int64(x[i])] += 2 * np.int32(p[i]) - 1


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _hist_sparse(x, y, p, lo, hi, sensor_w, hist, seen, touched, n_touched):  # pragma: no cover - numba
    # Like _hist_dense, and lists the pixels in the order they are first touched.
    for i in range(lo, hi):
        pix = np.int64(y[i]) * sensor_w + np.int64(x[i])
        hist[pix] += 2 * np.int32(p[i]) - 1
        if seen[pix] == 0:
            seen[pix] = 1
            touched[n_touched] = pix
            n_touched += 1
    return n_touched


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _splat_dense(g, base, weight, w, hist, touched):  # pragma: no cover - numba
    # List the non-zero pixels in raster order without branching (a data-dependent branch at ~50%
    # density mispredicts), then splat that list; leaves hist all-zero.
    m = 0
    for pix in range(hist.shape[0]):
        touched[m] = pix
        m += hist[pix] != 0
    for j in range(m):
        pix = touched[j]
        _splat_pixel(g, base[pix], w, np.float32(hist[pix]), weight, pix)
        hist[pix] = 0


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _splat_sparse(g, base, weight, w, hist, seen, touched, n_touched):  # pragma: no cover - numba
    # Splat only the touched pixels, in touch order; leaves hist and seen all-zero.
    for j in range(n_touched):
        pix = touched[j]
        _splat_pixel(g, base[pix], w, np.float32(hist[pix]), weight, pix)
        hist[pix] = 0
        seen[pix] = 0


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _accumulate_1bin(x, y, p, base, weight, sensor_w, starts, stops, grids, hist, seen, touched):  # pragma: no cover
    # bins == 1: tn == 0 for every event, so the time weight is exactly 1 and every event at raw
    # pixel (x, y) adds (2p-1) times the SAME four spatial weights. Summing polarities per raw pixel
    # first (one integer add per event, exact) and splatting each pixel's sum once is the same sum
    # with 4 float scatters per *pixel* instead of per *event*.
    # hist and seen are all-zero on entry and are left all-zero (scratch reused across calls).
    n = base.shape[0]
    w = grids.shape[3]
    for k in range(starts.shape[0]):
        g = grids[k, 0].reshape(-1)
        if (stops[k] - starts[k]) * 8 > n:  # dense window
            _hist_dense(x, y, p, starts[k], stops[k], sensor_w, hist)
            _splat_dense(g, base, weight, w, hist, touched)
        else:
            n_touched = _hist_sparse(x, y, p, starts[k], stops[k], sensor_w, hist, seen, touched, 0)
            _splat_sparse(g, base, weight, w, hist, seen, touched, n_touched)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _hist_piece(x, y, p, sensor_w, dense, hist, seen, touched, n_touched):  # pragma: no cover - numba
    if dense:
        _hist_dense(x, y, p, 0, x.shape[0], sensor_w, hist)
        return n_touched
    return _hist_sparse(x, y, p, 0, x.shape[0], sensor_w, hist, seen, touched, n_touched)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _splat_hist(g, base, weight, w, dense, hist, seen, touched, n_touched):  # pragma: no cover - numba
    if dense:
        _splat_dense(g, base, weight, w, hist, touched)
    else:
        _splat_sparse(g, base, weight, w, hist, seen, touched, n_touched)


# The multi-bin kernel. Adding each event's 8 weights straight into a (B, H, W) grid of 6-18 MB
# misses the cache on almost every add, because consecutive events lie anywhere on the sensor.
# So each block of a window's events is first bucketed by raw sensor row band (a stable counting
# sort: time order is kept inside a band), and the bands are then splatted one after another:
# a band's events, in time order, touch only that band's rows of the splat table and of the two
# grid planes their times fall between, ~150 kB that stay in L1/L2. Block edges lie at fixed
# offsets from the window's first event, so a window fed in pieces (accumulate_window_in_pieces)
# adds in exactly the order of one call. (Summing each raw pixel's weights over a time slab first,
# as the 1-bin kernel does over the window, was slower: on a 50 ms window of the synthetic
# sequence a slab of 15 bins holds ~1.3 events per touched pixel.)
BLOCK_EVENTS = 1 << 19  # events bucketed at once (a 50 ms DSEC window: ~0.3 M); 6 MB scratch per thread
BAND_ROWS = 8  # raw sensor rows per band (60 bands on DSEC's 480): 2-8 measured alike, 32 ~8 % slower


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _normalised_times(t, lo, hi, t0, span, scale, out):  # pragma: no cover - numba
    # A loop of its own so LLVM vectorises the divisions. Returns whether every tn lies in
    # [0, scale] (always, unless the caller's t_first/t_last do not bracket the events).
    denom = np.float32(span)
    if span <= 0:
        out[:hi - lo] = 0
        return True
    inside = True
    for i in range(lo, hi):
        tn = scale * (np.float32(np.int64(t[i]) - t0) / denom)
        out[i - lo] = tn
        inside &= (tn >= 0) & (tn <= scale)
    return inside


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _bucket(x, y, p, t, lo, hi, sensor_w, band_of_row, t0, span, scale, counts, rec_pix, rec_tn,
            tn):  # pragma: no cover - numba
    # Events lo..hi-1 into rec_* grouped by band (counting sort, stable), each as (raw pixel * 2 +
    # polarity, normalised time tn); counts[b]..counts[b+1] is band b afterwards. Returns whether
    # every tn lies in [0, bins - 1].
    inside = _normalised_times(t, lo, hi, t0, span, scale, tn)
    counts[:] = 0
    for i in range(lo, hi):
        counts[band_of_row[y[i]] + 2] += 1
    for b in range(2, counts.shape[0]):
        counts[b] += counts[b - 1]
    for i in range(lo, hi):
        b = band_of_row[y[i]] + 1
        j = counts[b]
        counts[b] = j + 1
        rec_pix[j] = np.int32((np.int64(y[i]) * sensor_w + np.int64(x[i])) * 2 + np.int64(p[i]))
        rec_tn[j] = tn[i - lo]
    return inside


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _splat_inside(g, base, weight, w, plane, bins, rec_pix, rec_tn, n):  # pragma: no cover - numba
    # _splat_events for tn in [0, bins - 1], bins >= 2: planes ti and ti + 1 with ti = min(trunc(tn),
    # bins - 2) always exist. ti differs from trunc(tn) only at tn = bins - 1, where the weights
    # (1 - f, f) = (0, 1) put the event wholly in plane bins - 1, as the general path does; f is
    # exact and 1 - f correctly rounded, so both paths add the same values.
    for j in range(n):
        pp = rec_pix[j]
        pix = pp >> 1
        value = np.float32(2 * (pp & 1) - 1)
        tn = rec_tn[j]
        ti = min(np.int64(tn), bins - 2)
        f = tn - np.float32(ti)
        o = ti * plane + np.int64(base[pix])
        _splat_pixel(g, o, w, value * (np.float32(1.0) - f), weight, pix)
        _splat_pixel(g, o + plane, w, value * f, weight, pix)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _splat_events(g, base, weight, w, plane, bins, rec_pix, rec_tn, n, inside):  # pragma: no cover - numba
    # Each bucketed event adds v (1 - |tl - tn|) times its raw pixel's four spatial weights to the
    # 2x2 block of planes tl = trunc(tn) and tl + 1 (planes outside 0..bins-1 are skipped).
    if inside:  # every tn in [0, bins - 1]: the same adds without the plane checks (~15 % faster)
        _splat_inside(g, base, weight, w, plane, bins, rec_pix, rec_tn, n)
        return
    for j in range(n):
        pp = rec_pix[j]
        pix = pp >> 1
        value = np.float32(2 * (pp & 1) - 1)
        tn = rec_tn[j]
        ti = np.int64(tn)  # truncation toward zero, as torch's .int()
        w0, w1 = _corner_weights(tn)
        b = np.int64(base[pix])
        if 0 <= ti < bins:
            _splat_pixel(g, ti * plane + b, w, value * w0, weight, pix)
        if 0 <= ti + 1 < bins:
            _splat_pixel(g, (ti + 1) * plane + b, w, value * w1, weight, pix)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _accumulate_bands(x, y, p, t, base, weight, sensor_w, band_of_row, starts, stops, t_first, t_last, grids,
                      counts, rec_pix, rec_tn, tn):  # pragma: no cover - numba
    bins, w = grids.shape[1], grids.shape[3]
    plane = grids.shape[2] * w
    scale = np.float32(bins - 1)
    block = rec_pix.shape[0]
    for k in range(starts.shape[0]):
        g = grids[k].reshape(-1)
        for lo in range(starts[k], stops[k], block):
            hi = min(lo + block, stops[k])
            inside = _bucket(x, y, p, t, lo, hi, sensor_w, band_of_row, t_first[k], t_last[k] - t_first[k], scale,
                             counts, rec_pix, rec_tn, tn)
            _splat_events(g, base, weight, w, plane, bins, rec_pix, rec_tn, hi - lo, inside)


@dataclass(frozen=True, eq=False)
class Rectifier:
    """A rectify map prepared for the kernels: contiguous x/y planes and the per-pixel splat tables
    of the 1-bin and the multi-bin kernel (each computed on first use, once per map and grid size;
    ~6 MB each for DSEC)."""

    map_x: np.ndarray
    map_y: np.ndarray
    height: int = 480
    width: int = 640

    @functools.cached_property
    def splat(self) -> tuple[np.ndarray, np.ndarray]:
        return _splat_table(self.map_x, self.map_y, self.height, self.width)

    @functools.cached_property
    def splat_exact(self) -> tuple[np.ndarray, np.ndarray]:
        """The splat table with correctly rounded weights, for the multi-bin kernel."""
        return _splat_table(self.map_x, self.map_y, self.height, self.width, True)

    def scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-thread zeroed work arrays of the 1-bin kernel (allocating 4 MB per call costs more
        than a sparse frame's whole kernel)."""
        local = self.__dict__.setdefault("_scratch", threading.local())
        if not hasattr(local, "arrays"):
            n = self.map_x.size
            local.arrays = (np.zeros(n, np.int32), np.zeros(n, np.uint8), np.empty(n, np.int32))
        return local.arrays

    @functools.cached_property
    def band_of_row(self) -> np.ndarray:
        """Band of each raw sensor row for the multi-bin kernel (BAND_ROWS rows per band)."""
        return (np.arange(self.map_x.shape[0]) // BAND_ROWS).astype(np.int32)

    def band_scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-thread work arrays of the multi-bin kernel: band offsets and one block of bucketed
        events (overwritten by every call, so they need no clearing)."""
        local = self.__dict__.setdefault("_band_scratch", threading.local())
        if not hasattr(local, "arrays"):
            bands = int(self.band_of_row[-1]) + 1
            local.arrays = (np.zeros(bands + 2, np.int64), np.empty(BLOCK_EVENTS, np.int32),
                            np.empty(BLOCK_EVENTS, np.float32), np.empty(BLOCK_EVENTS, np.float32))
        return local.arrays


def rectifier(rectify_map: np.ndarray, height: int = 480, width: int = 640) -> Rectifier:
    """Prepare a (H_sensor, W_sensor, 2) rectify map for a (height, width) voxel grid."""
    rmap = np.asarray(rectify_map, dtype=np.float32)
    if rmap.ndim != 3 or rmap.shape[2] != 2 or min(rmap.shape[:2]) < 1:
        raise ValueError(f"rectify map must have shape (H, W, 2), got {rmap.shape}")
    if height < 2 or width < 2:
        raise ValueError(f"voxel grids must be at least 2x2, got {height}x{width}")
    if not np.all(np.isfinite(rmap)):
        raise ValueError("rectify map contains NaN or inf")
    if rmap.shape[0] * rmap.shape[1] >= 2**30:  # the multi-bin kernel packs pixel * 2 + p in an int32
        raise ValueError(f"rectify map of {rmap.shape[0]}x{rmap.shape[1]} pixels is too large (< 2**30 pixels)")
    return Rectifier(np.ascontiguousarray(rmap[..., 0]), np.ascontiguousarray(rmap[..., 1]), height, width)


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _count_invalid(x, y, p, width, height):  # pragma: no cover - numba
    # Branch-free count of events off the sensor or with a polarity other than 0/1 (LLVM
    # vectorises it; the widening to int64 also catches negative values of signed inputs).
    bad = 0
    for i in range(x.size):
        xi = np.int64(x[i])
        yi = np.int64(y[i])
        pi = np.int64(p[i])
        bad += (xi < 0) | (xi >= width) | (yi < 0) | (yi >= height) | (pi < 0) | (pi > 1)
    return bad


@dataclass(frozen=True)
class InvalidEvents:
    """The first event off the sensor (or with a bad polarity) in an array, and how many there are."""

    field: str  # "x", "y" or "p"
    index: int  # position of the first invalid event in the arrays
    value: int
    limit: str  # what the value should satisfy, e.g. "< 640"
    count: int  # invalid events in the arrays (any field)
    span: int  # length of the checked arrays

    def describe(self, offset: int = 0) -> str:
        return (f"events/{self.field}[{offset + self.index}] = {self.value} is outside the sensor "
                f"(must be {self.limit}); {self.count} invalid event(s) among events "
                f"{offset}..{offset + self.span - 1}")


def invalid_events(x: np.ndarray, y: np.ndarray, p: np.ndarray, width: int, height: int) -> InvalidEvents | None:
    """None when every event has ``0 <= x < width``, ``0 <= y < height`` and ``p`` in {0, 1}.

    One branch-free pass (~1 ms per million events on one core); only when something is wrong are
    the fields searched again to name the first bad value.
    """
    n = len(x)
    if len(y) != n or len(p) != n:
        raise ValueError(f"x, y, p must have the same length, got {len(x)}, {len(y)}, {len(p)}")
    count = int(_count_invalid(x, y, p, width, height)) if n else 0
    if count == 0:
        return None
    found = []
    for field, arr, lo, hi in (("x", x, 0, width), ("y", y, 0, height), ("p", p, 0, 2)):
        a = np.asarray(arr).astype(np.int64, copy=False)
        bad = np.flatnonzero((a < lo) | (a >= hi))
        if bad.size:
            limit = "0 or 1" if field == "p" else f"0 <= {field} < {hi}"
            found.append(InvalidEvents(field, int(bad[0]), int(a[bad[0]]), limit, count, n))
    return min(found, key=lambda f: f.index)


def accumulate_voxels(
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    t: np.ndarray,
    rect: Rectifier,
    starts: np.ndarray,
    stops: np.ndarray,
    t_first: np.ndarray,
    t_last: np.ndarray,
    grids: np.ndarray,
    *,
    checked: bool = False,
) -> np.ndarray:
    """Add events ``starts[k] .. stops[k]-1`` of the arrays into ``grids[k]`` (float32, (K, B, H, W)).

    ``t_first[k]``/``t_last[k]`` (int64, same clock as ``t``) are the window's first and last event
    times; they set the time normalisation, so a window fed in pieces still gets one normalisation.
    ``rect`` is :func:`rectifier` of the rectify map, for the grids' height and width. Returns ``grids``.

    The kernels run without bounds checks, so every argument is validated here first: an event off
    the rectify map's sensor or a polarity outside {0, 1} raises ValueError. ``checked=True`` skips
    only that per-event pass, for callers that have just run :func:`invalid_events` on the same
    arrays (``cmda preprocess`` does it while it checks the timestamp order).
    """
    if grids.dtype != np.float32 or grids.ndim != 4 or not grids.flags.c_contiguous:
        raise ValueError("grids must be a C-contiguous float32 array of shape (K, bins, H, W)")
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    stops = np.ascontiguousarray(stops, dtype=np.int64)
    if starts.shape != (grids.shape[0],) or stops.shape != starts.shape:
        raise ValueError("starts/stops must have one entry per grid")
    n = len(x)
    if len(y) != n or len(p) != n or len(t) != n:
        raise ValueError(f"x, y, p, t must have the same length, got {len(x)}, {len(y)}, {len(p)}, {len(t)}")
    for name, a in (("x", x), ("y", y), ("p", p), ("t", t)):
        if not isinstance(a, np.ndarray) or a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"events {name} must be a 1-D integer array")
    if starts.size and (starts.min() < 0 or stops.max() > n or np.any(stops < starts)):
        raise ValueError("window bounds outside the event arrays")
    if grids.shape[2:] != (rect.height, rect.width):
        raise ValueError(f"grids are {grids.shape[2:]}, the rectifier was prepared for {(rect.height, rect.width)}")
    if np.shape(t_first) != starts.shape or np.shape(t_last) != starts.shape:
        raise ValueError("t_first/t_last must have one entry per grid")
    if not checked and starts.size:
        # only the events the windows read (callers often pass a whole recording with one window)
        lo, hi = int(starts.min()), int(stops.max())
        sensor_h, sensor_w = rect.map_x.shape
        bad = invalid_events(x[lo:hi], y[lo:hi], p[lo:hi], sensor_w, sensor_h)
        if bad is not None:
            bad = dataclasses.replace(bad, index=bad.index + lo)
            raise ValueError(bad.describe())
    if grids.shape[1] == 0:
        return grids  # no time bins: nothing to add to
    if grids.shape[1] == 1:
        base, weight = rect.splat
        _accumulate_1bin(x, y, p, base, weight, rect.map_x.shape[1], starts, stops, grids, *rect.scratch())
    else:
        t_first = np.ascontiguousarray(t_first, dtype=np.int64)
        t_last = np.ascontiguousarray(t_last, dtype=np.int64)
        base, weight = rect.splat_exact
        _accumulate_bands(x, y, p, t, base, weight, rect.map_x.shape[1], rect.band_of_row, starts, stops, t_first,
                          t_last, grids, *rect.band_scratch())
    return grids


def accumulate_window_in_pieces(
    pieces: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    n_events: int,
    rect: Rectifier,
    t_first: int,
    t_last: int,
    grid: np.ndarray,
    *,
    checked: bool = False,
) -> np.ndarray:
    """Add ONE window of ``n_events`` events, given as consecutive pieces ``(x, y, p, t)``, to
    ``grid`` (float32, (1, B, H, W)): bounded memory for windows of any length.

    The result is bit-identical to one :func:`accumulate_voxels` call on the whole window: with
    several bins the pieces are regrouped into the kernel's blocks (``BLOCK_EVENTS`` events)
    counted from the window's first event, the blocks one call uses; with one bin the per-pixel
    polarity sums are carried across pieces and splatted once at the end, in the order the
    one-call kernel would use (raster order for a dense window, first-touch order otherwise).
    """
    if grid.ndim != 4 or grid.shape[0] != 1:
        raise ValueError("grid must have shape (1, bins, H, W)")
    t0 = np.array([t_first], np.int64)
    t1 = np.array([t_last], np.int64)
    fed = 0
    if grid.shape[1] != 1:
        block = rect.band_scratch()[1].size  # the kernel's block (BLOCK_EVENTS when the scratch was made)
        for x, y, p, t in _regroup(pieces, block):
            accumulate_voxels(x, y, p, t, rect, np.zeros(1, np.int64), np.array([len(x)], np.int64), t0, t1,
                              grid, checked=checked)
            fed += len(x)
    else:
        if grid.dtype != np.float32 or not grid.flags.c_contiguous or grid.shape[2:] != (rect.height, rect.width):
            raise ValueError("grid must be a C-contiguous float32 (1, 1, H, W) array of the rectifier's size")
        base, weight = rect.splat
        hist, seen, touched = rect.scratch()
        sensor_h, sensor_w = rect.map_x.shape
        dense = n_events * 8 > base.shape[0]
        n_touched = 0
        try:
            for x, y, p, _ in pieces:
                if len(y) != len(x) or len(p) != len(x):
                    raise ValueError("x, y, p must have the same length")
                if not checked:
                    bad = invalid_events(x, y, p, sensor_w, sensor_h)
                    if bad is not None:
                        raise ValueError(bad.describe())
                n_touched = _hist_piece(x, y, p, sensor_w, dense, hist, seen, touched, n_touched)
                fed += len(x)
        except BaseException:
            hist[:] = 0  # leave the shared scratch all-zero for the next window
            seen[:] = 0
            raise
        _splat_hist(grid[0, 0].reshape(-1), base, weight, grid.shape[3], dense, hist, seen, touched, n_touched)
    if fed != n_events:
        raise ValueError(f"the pieces held {fed} events, the window has {n_events}")
    return grid


def _regroup(pieces: Iterable[tuple[np.ndarray, ...]], size: int) -> Iterable[tuple[np.ndarray, ...]]:
    """The concatenated stream of ``pieces`` cut again into pieces of exactly ``size`` events (the
    last one shorter); a piece already of that size passes through without a copy."""
    held: list[tuple[np.ndarray, ...]] = []
    n_held = 0
    for piece in pieces:
        lengths = {len(a) for a in piece}
        if len(lengths) != 1:
            raise ValueError("x, y, p, t must have the same length")
        held.append(piece)
        n_held += lengths.pop()
        if n_held < size:
            continue
        joined = held[0] if len(held) == 1 else tuple(np.concatenate(f) for f in zip(*held, strict=True))
        cut = n_held - n_held % size
        for a in range(0, cut, size):
            yield tuple(f[a:a + size] for f in joined)
        held = [tuple(f[cut:] for f in joined)] if cut < n_held else []
        n_held -= cut
    if n_held:
        yield held[0] if len(held) == 1 else tuple(np.concatenate(f) for f in zip(*held, strict=True))


def voxel_grid(
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    t: np.ndarray,
    rectify_map: np.ndarray,
    bins: int,
    height: int = 480,
    width: int = 640,
) -> np.ndarray:
    """Voxel grid (bins, H, W) of ONE window holding all the given events (a convenience wrapper)."""
    grid = np.zeros((1, bins, height, width), dtype=np.float32)
    n = len(t)
    if n:
        t64 = np.asarray(t).astype(np.int64)
        accumulate_voxels(
            x, y, p, t, rectifier(rectify_map, height, width), np.array([0]), np.array([n]),
            t64[:1], t64[-1:], grid,
        )
    return grid[0]


@nb.njit(nogil=True, cache=True, boundscheck=False)
def first_decrease(t):  # pragma: no cover - numba
    """Index ``i`` of the first ``t[i] < t[i-1]``, or -1 if ``t`` never decreases.

    One pass without temporaries (``np.flatnonzero(t[1:] < t[:-1])`` allocates a 1 M-element mask
    per task), and it releases the GIL while another thread reads HDF5. Blocks of 4096 are checked
    with a branch-free OR over two shifted views, which LLVM vectorises (4x faster than stopping
    at the first decrease; indexing ``t[i - 1]`` directly defeats the vectoriser); only a block
    that holds a decrease is searched for its position.
    """
    n = t.size
    for lo in range(1, n, 4096):
        hi = min(lo + 4096, n)
        prev, cur = t[lo - 1:hi - 1], t[lo:hi]
        bad = False
        for i in range(hi - lo):
            bad |= cur[i] < prev[i]
        if bad:
            for i in range(lo, hi):
                if t[i] < t[i - 1]:
                    return i
    return -1


@nb.njit(nogil=True, cache=True, boundscheck=False, fastmath=False)
def _events_norm(g, clip, cmda_empty_part):  # pragma: no cover - numba
    # Three passes over the grid instead of NumPy's ~15 temporaries: statistics, standardise + clip
    # + part ranges, min-max (with reciprocals: within 1 ulp of the divisions).
    n = g.size
    nnz = 0
    total = 0.0
    sq = 0.0
    for i in range(n):
        v = np.float64(g[i])
        total += v
        sq += v * v
        nnz += v != 0
    mean = np.float32(0.0)
    inv = np.float32(1.0)
    if nnz > 0:
        m = total / nnz
        mean = np.float32(m)
        inv = np.float32(1.0 / (np.sqrt(max(sq / nnz - m * m, 0.0)) + 1e-8))
    out = np.empty(n, dtype=np.float32)
    zero = np.float32(0.0)
    lo = -clip
    pos_lo, pos_hi, neg_lo, neg_hi = clip, zero, zero, lo
    for i in range(n):
        v = g[i]
        z = (v - mean) * inv if v != 0 else zero
        z = min(max(z, lo), clip)
        out[i] = z
        pz = max(z, zero)
        nz = min(z, zero)
        pos_lo = min(pos_lo, pz)
        pos_hi = max(pos_hi, pz)
        neg_lo = min(neg_lo, nz)
        neg_hi = max(neg_hi, nz)
    use_pos = cmda_empty_part or pos_hi > 0
    use_neg = cmda_empty_part or neg_lo < 0
    pos_inv = np.float32(1.0) / (pos_hi - pos_lo + np.float32(1e-8)) if use_pos else zero
    neg_inv = np.float32(1.0) / (neg_hi - neg_lo + np.float32(1e-8)) if use_neg else zero
    shift = -pos_lo * pos_inv - (neg_lo * neg_inv + np.float32(1.0) if use_neg else zero)
    for i in range(n):
        z = out[i]
        out[i] = max(z, zero) * pos_inv + min(z, zero) * neg_inv + shift
    return out


def events_norm(grid: np.ndarray, n_events: int, *, cmda_empty_part: bool = False) -> np.ndarray:
    """CMDA's normalisation of a window's voxel grid, float32 in [-1, 1] (XiaRho/CMDA at 9d25129, datasets/dsec.py).

    Standardise over the non-zero cells, then map the positive part (clipped to [0, clip]) to
    [0, 1] and the negative part (clipped to [-clip, 0]) to [-1, 0] by min-max, and add them;
    ``clip = n_events / 500000 * 1.5`` grows with the event count, so busy windows keep contrast.

    Departure from CMDA (listed in docs/fidelity.md): CMDA's min-max maps a part with no cells of its
    sign to -1 everywhere (an empty window becomes a grid of -1). Here such a part contributes 0,
    so an empty window stays a zero grid. ``cmda_empty_part=True`` restores CMDA's behaviour.
    """
    g = np.ascontiguousarray(grid, dtype=np.float32)
    clip = np.float32(n_events / 500000.0 * 1.5)
    return _events_norm(g.reshape(-1), clip, cmda_empty_part).reshape(g.shape)
