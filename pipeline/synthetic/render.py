"""Render a :mod:`pipeline.synthetic.scene` street through a pinhole camera: polygons, labels and shaded images.

Three steps, each usable alone:

1. :func:`project` moves the scene to time t, transforms every polygon into the camera, clips it at
   the near plane and projects it; the result is the list of 2-D polygons in drawing order (the
   painter's algorithm the Cityscapes JSON format also uses: later polygons cover earlier ones).
2. :func:`rasterize` fills those polygons into a surface-index image; a lookup turns it into trainIds.
3. :func:`shade` (a Numba kernel) intersects each pixel's ray with its surface's plane to get surface
   coordinates, samples the class texture there (so textures move with the surfaces and produce
   events like real ones) and lights it: sun and sky by day, street lamps, car lights and lit windows
   by night. :func:`develop` turns linear radiance into an 8-bit picture with the domain's look.

The texture atlas is generated from a fixed seed: every image, day or night, shares per-class textures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from numba import njit

from pipeline.synthetic.scene import TEX, TEXTURES, Scene, train_id

NEAR = 0.3  # metres: polygons are clipped here
MAX_LIGHTS = 6  # nearest lights that light surfaces and glare in a frame (bounds the shading cost)
MAX_LIGHT_DIST = 80.0
FAR = 400.0  # metres: surfaces entirely beyond are not drawn
TEX_SIZE = 128


# ---------------------------------------------------------------------------------------------- cameras
@dataclass(frozen=True, eq=False)
class View:
    """A pinhole camera rigidly attached to the vehicle camera: intrinsics K, image size (w, h) and the
    rotation R taking vehicle-camera coordinates into this camera's (identity for the vehicle camera)."""

    K: np.ndarray
    size: tuple[int, int]
    R: np.ndarray = field(default_factory=lambda: np.eye(3))

    def with_margin(self, mx: int, my: int) -> View:
        """The same camera on a canvas enlarged by (mx, my) pixels on every side."""
        K = self.K.copy()
        K[0, 2] += mx
        K[1, 2] += my
        return View(K, (self.size[0] + 2 * mx, self.size[1] + 2 * my), self.R)


def camera_pose(scene: Scene, t: float, view: View) -> tuple[np.ndarray, np.ndarray]:
    """(center, R_cw) of ``view`` at time t: ``p_cam = R_cw (P - center)``."""
    traj = scene.trajectory
    return traj.center(t), view.R @ traj.rotation(t).T


# ---------------------------------------------------------------------------------------------- compiled scene
class CompiledScene:
    """Flat arrays of a :class:`Scene` (vertices stacked, per-surface attributes) for fast projection."""

    def __init__(self, scene: Scene):
        self.scene = scene
        surf = scene.surfaces
        n = len(surf)
        self.labels = [s.label for s in surf]
        self.train_ids = np.array([train_id(s.label) for s in surf], np.uint8)
        counts = np.array([len(s.verts) for s in surf], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.verts = np.concatenate([s.verts for s in surf]).astype(np.float64)
        self.velocity = np.array([s.velocity for s in surf], np.float64).reshape(n, 3)
        self.vert_velocity = np.repeat(self.velocity, counts, axis=0)
        self.attached = np.array([s.attached for s in surf], bool)
        self.vert_attached = np.repeat(self.attached, counts)
        self.axis = np.array([s.axis for s in surf], np.int64)
        self.offset = np.array([s.verts[0, s.axis] if s.axis < 3 else 0.0 for s in surf], np.float64)
        self.albedo = np.array([s.albedo for s in surf], np.float32).reshape(n, 3)
        self.emissive = np.array([s.emissive for s in surf], np.float32).reshape(n, 3)
        self.texture = np.array([TEX[s.texture] for s in surf], np.int64)
        self.tex_scale = np.array([s.tex_scale for s in surf], np.float64)
        self.tex_amp = np.array([s.tex_amp for s in surf], np.float32)
        self.tex_origin = np.array([s.tex_origin for s in surf], np.float64).reshape(n, 3)
        self.layer = np.array([s.layer for s in surf], np.float64)
        self.anchor_z = np.array([s.anchor_z for s in surf], np.float64)
        self.group = np.array([s.group for s in surf], np.int64)
        zs = self.verts[:, 2]
        self.zmin = np.minimum.reduceat(zs, self.starts[:-1])
        self.zmax = np.maximum.reduceat(zs, self.starts[:-1])
        lights = scene.lights
        self.light_pos = np.array([li.position for li in lights], np.float64).reshape(-1, 3)
        self.light_vel = np.array([li.velocity for li in lights], np.float64).reshape(-1, 3)
        self.light_rgb = np.array([li.rgb for li in lights], np.float64).reshape(-1, 3)
        self.light_radius = np.array([li.radius for li in lights], np.float64)
        self.light_size = np.array([li.size for li in lights], np.float64)


# ---------------------------------------------------------------------------------------------- projection
def clip_near(p: np.ndarray, near: float = NEAR) -> np.ndarray:
    """Sutherland-Hodgman clip of a 3-D polygon (camera coordinates) to z >= near."""
    out = []
    n = len(p)
    for i in range(n):
        a, b = p[i], p[(i + 1) % n]
        ina, inb = a[2] >= near, b[2] >= near
        if ina:
            out.append(a)
        if ina != inb:
            s = (near - a[2]) / (b[2] - a[2])
            out.append(a + s * (b - a))
    return np.array(out).reshape(-1, 3)


def clip_rect(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a 2-D polygon to the rectangle [x0, x1] x [y0, y1]."""
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(poly) == 0:
            break
        out = []
        n = len(poly)
        for i in range(n):
            a, b = poly[i], poly[(i + 1) % n]
            ina = a[axis] >= bound if keep_above else a[axis] <= bound
            inb = b[axis] >= bound if keep_above else b[axis] <= bound
            if ina:
                out.append(a)
            if ina != inb:
                s = (bound - a[axis]) / (b[axis] - a[axis])
                out.append(a + s * (b - a))
        poly = np.array(out).reshape(-1, 2)
    return poly


@dataclass
class Projection:
    """Visible surfaces of one frame in drawing order: their indices and 2-D polygons (pixels)."""

    index: np.ndarray
    polygons: list[np.ndarray]
    t: float
    center: np.ndarray
    R_cw: np.ndarray


def project(cs: CompiledScene, t: float, view: View) -> Projection:
    center, R_cw = camera_pose(cs.scene, t, view)
    w, h = view.size
    vz = cs.velocity[:, 2] * t
    cand = (cs.zmax + vz > center[2] + NEAR - 60.0) & (cs.zmin + vz < center[2] + FAR)
    cand |= cs.attached
    world = cs.verts + cs.vert_velocity * t
    cam = (world - center) @ R_cw.T
    cam[cs.vert_attached] = cs.verts[cs.vert_attached] @ view.R.T
    z = cam[:, 2]
    starts = cs.starts[:-1]
    behind = np.minimum.reduceat(z, starts) < NEAR
    ahead = np.maximum.reduceat(z, starts) >= NEAR
    cand &= ahead
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam @ view.K.T)[:, :2] / np.maximum(z, NEAR)[:, None]
    umin = np.minimum.reduceat(uv[:, 0], starts)
    umax = np.maximum.reduceat(uv[:, 0], starts)
    vmin = np.minimum.reduceat(uv[:, 1], starts)
    vmax = np.maximum.reduceat(uv[:, 1], starts)
    onscreen = (umax >= -1) & (umin <= w) & (vmax >= -1) & (vmin <= h)
    tiny = (umax - umin < 0.25) | (vmax - vmin < 0.25)  # thinner than a quarter pixel: fills nothing
    cand &= (onscreen & ~tiny) | behind
    idx = np.flatnonzero(cand)
    depth = cs.anchor_z[idx] + vz[idx] - center[2]
    order = np.lexsort((idx, cs.group[idx], -depth, cs.layer[idx]))
    idx = idx[order]
    polys, keep = [], []
    for i in idx:
        a, b = cs.starts[i], cs.starts[i + 1]
        if behind[i]:
            p = clip_near(cam[a:b])
            if len(p) < 3:
                continue
            q = (p @ view.K.T)
            poly = q[:, :2] / q[:, 2:3]
        else:
            poly = uv[a:b]
        polys.append(poly)
        keep.append(i)
    return Projection(np.array(keep, np.int64), polys, t, center, R_cw)


def rasterize(proj: Projection, size: tuple[int, int]) -> np.ndarray:
    """Surface-index image (int32): 0 = sky, k = proj.index[k-1]; later polygons cover earlier ones."""
    w, h = size
    ids = np.zeros((h, w), np.int32)
    if not proj.polygons:
        return ids
    lim = 1 << 26  # keep fixed-point coordinates inside int32
    counts = np.cumsum([len(p) for p in proj.polygons])[:-1]
    fixed = np.clip(np.round(np.concatenate(proj.polygons) * 16.0), -lim, lim).astype(np.int32)
    for k, pts in enumerate(np.split(fixed, counts), start=1):
        cv2.fillPoly(ids, [pts], k, lineType=cv2.LINE_8, shift=4)
    return ids


def label_image(cs: CompiledScene, proj: Projection, ids: np.ndarray) -> np.ndarray:
    """trainIds (uint8, 255 = ignore) of a surface-index image."""
    lut = np.concatenate([[train_id("sky")], cs.train_ids[proj.index]]).astype(np.uint8)
    return lut[ids]


def render_labels(cs: CompiledScene, t: float, view: View) -> np.ndarray:
    proj = project(cs, t, view)
    return label_image(cs, proj, rasterize(proj, view.size))


def polygon_objects(cs: CompiledScene, proj: Projection, size: tuple[int, int]) -> list[dict]:
    """Cityscapes polygon objects (label, integer polygon inside the image) in drawing order, sky first."""
    w, h = size
    objects = [{"label": "sky", "polygon": [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]}]
    for i, poly in zip(proj.index, proj.polygons, strict=True):
        p = clip_rect(poly, 0, 0, w - 1, h - 1)
        if len(p) < 3:
            continue
        q = np.round(p).astype(np.int64)
        keep = np.ones(len(q), bool)
        keep[1:] = np.any(q[1:] != q[:-1], axis=1)
        q = q[keep]
        if len(q) > 1 and np.all(q[0] == q[-1]):
            q = q[:-1]
        if len(q) < 3:
            continue
        area = 0.5 * abs(np.dot(q[:, 0], np.roll(q[:, 1], -1)) - np.dot(q[:, 1], np.roll(q[:, 0], -1)))
        if area < 1.0:
            continue
        objects.append({"label": cs.labels[i], "polygon": q.tolist()})
    return objects


# ---------------------------------------------------------------------------------------------- textures
@dataclass(frozen=True, eq=False)
class Atlas:
    """Mip-mapped texture tiles packed flat for the kernel: level l of texture t is a (T>>l)^2 tile at
    ``pattern[offset[t, l]:]``. Far or grazing surfaces read coarser levels, which averages texture
    detail the way a real pixel does instead of aliasing into flicker (and spurious events)."""

    pattern: np.ndarray
    glow: np.ndarray
    offset: np.ndarray
    size: int
    levels: int


@lru_cache(maxsize=1)
def texture_atlas(size: int = TEX_SIZE, levels: int = 6) -> Atlas:
    """Per-texture tiles, generated from a fixed seed so every image shares them, day or night.

    ``pattern`` is a zero-mean modulation of the albedo; ``glow`` marks lit windows (facades at night).
    """
    rng = np.random.default_rng(20240611)
    n = len(TEXTURES)
    pat = np.zeros((n, size, size), np.float32)
    glow = np.zeros((n, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = np.fft.fftfreq(size)
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2

    def noise(sigma: float) -> np.ndarray:
        """Unit-variance Gaussian noise blurred by ``sigma`` px, periodic so the tile wraps seamlessly."""
        a = rng.normal(0, 1, (size, size))
        a = np.fft.ifft2(np.fft.fft2(a) * np.exp(-2 * np.pi**2 * sigma**2 * f2)).real
        return (a / (a.std() + 1e-9)).astype(np.float32)

    pat[TEX["asphalt"]] = 0.6 * noise(0.7) + 0.4 * noise(6)
    joints = ((xx * 8) % 1 < 0.06) | ((yy * 8) % 1 < 0.06)
    pat[TEX["paving"]] = 0.35 * noise(0.8) - 1.6 * joints
    # Facade tile (6 m): 2 x 2 windows, wall with plaster noise; some windows lit at night.
    wx, wy = (xx * 2) % 1, (yy * 2) % 1
    window = (wx > 0.3) & (wx < 0.7) & (wy > 0.25) & (wy < 0.7)
    pat[TEX["facade"]] = 0.25 * noise(1.5) - 1.0 * window + 0.3 * ((wy > 0.72) & (wy < 0.78))
    lit = rng.random((2, 2)) < 0.35
    glow[TEX["facade"]] = window * lit[(yy * 2).astype(int) % 2, (xx * 2).astype(int) % 2]
    pat[TEX["concrete"]] = 0.4 * noise(2) - 0.8 * ((yy * 4) % 1 < 0.04)
    pat[TEX["fence"]] = np.where((xx * 16) % 1 < 0.35, 0.8, -0.9) + 0.1 * noise(1)
    pat[TEX["foliage"]] = 0.5 * noise(0.8) + 0.5 * noise(3)
    pat[TEX["grass"]] = 0.5 * noise(0.6) + 0.5 * noise(5)
    pat[TEX["metal"]] = 0.5 * np.sin(2 * np.pi * yy * 3) + 0.3 * noise(4)
    pat[TEX["cloth"]] = 0.5 * noise(1.2) + 0.3 * np.sin(2 * np.pi * yy * 6)
    pat[TEX["paint"]] = 0.6 * noise(12) + 0.4 * np.sin(2 * np.pi * yy * 2)
    pat[TEX["glass"]] = 0.7 * noise(8) + 0.5 * np.sin(2 * np.pi * (xx + yy) * 2)
    pat = np.clip(pat, -1.5, 1.5).astype(np.float32)
    flat_p, flat_g, offset, pos = [], [], np.zeros((n, levels), np.int64), 0
    for t in range(n):
        p, g = pat[t], glow[t]
        for level in range(levels):
            offset[t, level] = pos
            flat_p.append(p.ravel())
            flat_g.append(g.ravel())
            pos += p.size
            # Box-average 2 x 2 texels into the next level (the tile stays periodic).
            p = 0.25 * (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2])
            g = 0.25 * (g[0::2, 0::2] + g[1::2, 0::2] + g[0::2, 1::2] + g[1::2, 1::2])
    return Atlas(np.concatenate(flat_p), np.concatenate(flat_g), offset, size, levels)


# ---------------------------------------------------------------------------------------------- looks
@dataclass(frozen=True)
class Look:
    """Lighting and camera response of a domain (day: sun and sky; night: lamps, glare, noise)."""

    night: bool
    ambient: tuple[float, float, float]
    sun_dir: tuple[float, float, float]
    sun_rgb: tuple[float, float, float]
    sky_zenith: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    fog_rgb: tuple[float, float, float]
    fog_dist: float
    window_glow: tuple[float, float, float]
    light_gain: float
    exposure: float
    white_balance: tuple[float, float, float]
    black: float  # veiling offset after the tone curve (low contrast at night)
    contrast: float
    noise: float  # read noise, in 8-bit levels
    shot: float  # shot-noise factor
    glare: float


DAY = Look(False, ambient=(0.42, 0.45, 0.5), sun_dir=(0.45, -0.75, 0.48), sun_rgb=(0.9, 0.86, 0.78),
           sky_zenith=(0.28, 0.45, 0.8), sky_horizon=(0.75, 0.82, 0.9), fog_rgb=(0.7, 0.75, 0.82), fog_dist=350.0,
           window_glow=(0.0, 0.0, 0.0), light_gain=0.0, exposure=1.0, white_balance=(1.0, 1.0, 1.0), black=0.0,
           contrast=1.0, noise=1.0, shot=0.0, glare=0.0)
NIGHT = Look(True, ambient=(0.006, 0.007, 0.011), sun_dir=(0.0, -1.0, 0.0), sun_rgb=(0.0, 0.0, 0.0),
             sky_zenith=(0.003, 0.004, 0.009), sky_horizon=(0.03, 0.022, 0.016), fog_rgb=(0.008, 0.006, 0.004),
             fog_dist=90.0, window_glow=(0.25, 0.17, 0.08), light_gain=0.9, exposure=1.0,
             white_balance=(1.0, 0.85, 0.62), black=0.03, contrast=0.7, noise=1.6, shot=0.006, glare=0.6)


# ---------------------------------------------------------------------------------------------- shading
@njit(nogil=True, cache=True, fastmath=True)
def _put(out, v, u, r, g, b, mono):
    if mono:
        out[v, u, 0] = 0.3 * r + 0.59 * g + 0.11 * b
    else:
        out[v, u, 0] = r
        out[v, u, 1] = g
        out[v, u, 2] = b


@njit(nogil=True, cache=True, fastmath=True)
def _shade_kernel(ids, M, focal, cam, axis, offset, tshift, tex, tinv, tamp, albedo, emis, pattern, glow, toff,
                  tsize, levels, lpos, lrgb, lrad2, ambient, sun_dir, sun_rgb, sky_zen, sky_hor, fog_rgb, fog_dist,
                  window_glow, out):
    """Per pixel: hit the pixel's surface plane, sample its mip-mapped texture, light it, add fog.

    (One flat loop body on purpose: factoring it into a helper returning a tuple made Numba's code
    several times slower.)
    """
    h, w = ids.shape
    mono = out.shape[2] == 1
    for v in range(h):
        for u in range(w):
            k = ids[v, u]
            dx = M[0, 0] * u + M[0, 1] * v + M[0, 2]
            dy = M[1, 0] * u + M[1, 1] * v + M[1, 2]
            dz = M[2, 0] * u + M[2, 1] * v + M[2, 2]
            a = axis[k]
            if a < 0:  # sky: gradient with elevation
                elev = -dy / math.sqrt(dx * dx + dy * dy + dz * dz)
                f = min(max(elev * 3.0, 0.0), 1.0)
                _put(out, v, u, sky_hor[0] * (1.0 - f) + sky_zen[0] * f, sky_hor[1] * (1.0 - f) + sky_zen[1] * f,
                     sky_hor[2] * (1.0 - f) + sky_zen[2] * f, mono)
                continue
            if a == 3:  # flat (ego vehicle): no world plane
                shade = 1.5 * (0.6 + 0.4 * v / h)
                _put(out, v, u, albedo[k, 0] * ambient[0] * shade + emis[k, 0],
                     albedo[k, 1] * ambient[1] * shade + emis[k, 1], albedo[k, 2] * ambient[2] * shade + emis[k, 2],
                     mono)
                continue
            d = dx if a == 0 else (dy if a == 1 else dz)
            o = cam[0] if a == 0 else (cam[1] if a == 1 else cam[2])
            s = 1e4
            if abs(d) > 1e-12:
                s = (offset[k] - o) / d
                if s <= 0.0:
                    s = 1e4
            px = cam[0] + s * dx
            py = cam[1] + s * dy
            pz = cam[2] + s * dz
            if a == 0:
                tu, tv = pz + tshift[k, 2], py + tshift[k, 1]
            elif a == 1:
                tu, tv = px + tshift[k, 0], pz + tshift[k, 2]
            else:
                tu, tv = px + tshift[k, 0], py + tshift[k, 1]
            # Mip level from the pixel's footprint on the surface, in texels of the finest level.
            d2r = dx * dx + dy * dy + dz * dz
            foot = s * d2r / (focal * max(abs(d), 1e-6)) * tinv[k] * tsize
            level = 0
            while foot > 1.5 and level < levels - 1:
                foot *= 0.5
                level += 1
            size = tsize >> level
            mask = size - 1
            base = toff[tex[k], level]
            fu = tu * tinv[k] * size
            fv = tv * tinv[k] * size
            iu = math.floor(fu)
            iv = math.floor(fv)
            au = fu - iu
            av = fv - iv
            iu0 = int(iu) & mask  # sizes are powers of two: wraps negative coordinates too
            iv0 = int(iv) & mask
            iu1 = (iu0 + 1) & mask
            iv1 = (iv0 + 1) & mask
            r0 = base + iv0 * size
            r1 = base + iv1 * size
            pat = ((pattern[r0 + iu0] * (1 - au) + pattern[r0 + iu1] * au) * (1 - av)
                   + (pattern[r1 + iu0] * (1 - au) + pattern[r1 + iu1] * au) * av)
            gl = glow[r0 + iu0]
            mod = max(1.0 + tamp[k] * pat, 0.05)
            # Surface normal facing the camera along the plane axis.
            sgn = -1.0 if d > 0 else 1.0
            ir = ambient[0]
            ig = ambient[1]
            ib = ambient[2]
            cs = sgn * (sun_dir[0] if a == 0 else (sun_dir[1] if a == 1 else sun_dir[2]))
            if cs < 0.0:  # sun_dir points from the sun: light arrives when the normal faces against it
                ir -= sun_rgb[0] * cs
                ig -= sun_rgb[1] * cs
                ib -= sun_rgb[2] * cs
            for li in range(lpos.shape[0]):
                lx = lpos[li, 0] - px
                ly = lpos[li, 1] - py
                lz = lpos[li, 2] - pz
                dd = lx * lx + ly * ly + lz * lz
                if dd > 16.0 * lrad2[li]:  # contributes < 6 %: skip the square root
                    continue
                ln = lx if a == 0 else (ly if a == 1 else lz)
                cosl = sgn * ln / math.sqrt(dd + 1e-6)
                if cosl > 0.0:
                    g = cosl / (1.0 + dd / lrad2[li])
                    ir += lrgb[li, 0] * g
                    ig += lrgb[li, 1] * g
                    ib += lrgb[li, 2] * g
            fog = 1.0 / (1.0 + s / fog_dist)
            _put(out, v, u,
                 (albedo[k, 0] * mod * ir + emis[k, 0] + window_glow[0] * gl) * fog + fog_rgb[0] * (1 - fog),
                 (albedo[k, 1] * mod * ig + emis[k, 1] + window_glow[1] * gl) * fog + fog_rgb[1] * (1 - fog),
                 (albedo[k, 2] * mod * ib + emis[k, 2] + window_glow[2] * gl) * fog + fog_rgb[2] * (1 - fog), mono)


def _lights_at(cs: CompiledScene, t: float, center: np.ndarray, look: Look) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray, np.ndarray]:
    if not look.night or cs.light_pos.shape[0] == 0:
        e = np.zeros((0, 3))
        return e, e, np.zeros(0), np.zeros(0)
    pos = cs.light_pos + cs.light_vel * t
    ahead = pos[:, 2] - center[2]
    near = np.flatnonzero((ahead > -10.0) & (ahead < MAX_LIGHT_DIST))
    near = near[np.argsort(np.abs(ahead[near]), kind="stable")[:MAX_LIGHTS]]
    return pos[near], cs.light_rgb[near] * look.light_gain, cs.light_radius[near] ** 2, cs.light_size[near]


def shade(cs: CompiledScene, proj: Projection, ids: np.ndarray, view: View, look: Look, mono: bool = False
          ) -> np.ndarray:
    """Linear radiance (float32, h x w x 3, or h x w x 1 luminance if ``mono``) of a rasterised frame."""
    t = proj.t
    idx = proj.index
    n = idx.size + 1
    axis = np.full(n, -1, np.int64)
    axis[1:] = cs.axis[idx]
    vel = cs.velocity[idx]
    offset = np.zeros(n)
    ax = np.minimum(cs.axis[idx], 2)
    offset[1:] = cs.offset[idx] + vel[np.arange(idx.size), ax] * t
    tshift = np.zeros((n, 3))
    tshift[1:] = cs.tex_origin[idx] - vel * t
    tex = np.zeros(n, np.int64)
    tex[1:] = cs.texture[idx]
    tinv = np.ones(n)
    tinv[1:] = 1.0 / cs.tex_scale[idx]
    tamp = np.zeros(n, np.float32)
    tamp[1:] = cs.tex_amp[idx]
    albedo = np.zeros((n, 3), np.float32)
    albedo[1:] = cs.albedo[idx]
    emis = np.zeros((n, 3), np.float32)
    if look.night:
        emis[1:] = cs.emissive[idx]
    atlas = texture_atlas()
    M = proj.R_cw.T @ np.linalg.inv(view.K)
    lpos, lrgb, lrad2, _ = _lights_at(cs, t, proj.center, look)
    out = np.empty((*ids.shape, 1 if mono else 3), np.float32)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    _shade_kernel(ids, M, float(view.K[0, 0]), proj.center, axis, offset, tshift, tex, tinv, tamp, albedo, emis,
                  atlas.pattern, atlas.glow, atlas.offset, atlas.size, atlas.levels, f64(lpos).reshape(-1, 3),
                  f64(lrgb).reshape(-1, 3), f64(lrad2), f64(look.ambient), f64(look.sun_dir), f64(look.sun_rgb),
                  f64(look.sky_zenith), f64(look.sky_horizon), f64(look.fog_rgb), float(look.fog_dist),
                  f64(look.window_glow), out)
    return out


def add_glare(rgb: np.ndarray, cs: CompiledScene, proj: Projection, view: View, look: Look) -> None:
    """Night glare: a bright core and a faint halo around every light in front of the camera."""
    if not look.night or look.glare <= 0:
        return
    lpos, lrgb, _, lsize = _lights_at(cs, proj.t, proj.center, look)
    if lpos.shape[0] == 0:
        return
    cam = (lpos - proj.center) @ proj.R_cw.T
    h, w = rgb.shape[:2]
    f = view.K[0, 0]
    scale = f / 600.0  # glare sizes in pixels of a ~600 px focal length camera, scaled to this one
    for p, colour, size in zip(cam, lrgb, lsize, strict=True):
        if p[2] < 1.0:
            continue
        u = view.K[0, 0] * p[0] / p[2] + view.K[0, 2]
        v = view.K[1, 1] * p[1] / p[2] + view.K[1, 2]
        core = min(max(0.8 * scale, f * size / p[2]), 12.0 * scale)
        halo = min(4.0 * core + 2.0 * scale, 30.0 * scale)
        r = int(2.5 * halo) + 1
        x0, x1 = max(0, int(u) - r), min(w, int(u) + r + 1)
        y0, y1 = max(0, int(v) - r), min(h, int(v) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx2 = ((np.arange(x0, x1, dtype=np.float32) - np.float32(u)) ** 2)[None, :]
        dy2 = ((np.arange(y0, y1, dtype=np.float32) - np.float32(v)) ** 2)[:, None]
        # Separable Gaussians: exp(-(dx2 + dy2)/2s^2) = outer product of two 1-D profiles.
        core_p = np.exp(-dy2 / (2 * core**2)) * np.exp(-dx2 / (2 * core**2))
        halo_p = np.exp(-dy2 / (2 * halo**2)) * np.exp(-dx2 / (2 * halo**2))
        blob = (look.glare * (3.0 * core_p + 0.08 * halo_p)).astype(np.float32)
        if rgb.shape[2] == 1:
            colour = np.array([0.3 * colour[0] + 0.59 * colour[1] + 0.11 * colour[2]])
        rgb[y0:y1, x0:x1] += blob[..., None] * colour.astype(np.float32)[None, None, :]


def render_radiance(cs: CompiledScene, t: float, view: View, look: Look, mono: bool = False
                    ) -> tuple[np.ndarray, Projection, np.ndarray]:
    """(linear radiance with glare, projection, surface ids) of one frame; see :func:`shade`."""
    proj = project(cs, t, view)
    ids = rasterize(proj, view.size)
    rgb = shade(cs, proj, ids, view, look, mono)
    add_glare(rgb, cs, proj, view, look)
    return rgb, proj, ids


@lru_cache(maxsize=4)
def _tone_lut(look: Look) -> np.ndarray:
    """8-bit response (as float) of 4096 exposure-scaled linear levels in [0, 4): tone curve, gamma,
    contrast and black level in one table."""
    x = np.linspace(0, 4, 4096, dtype=np.float64)
    y = np.clip(x / (1.0 + x) * 1.6, 0, 1) if look.night else np.clip(x, 0, 1)
    y = look.black + look.contrast * y ** (1 / 2.2)
    return (255.0 * y).astype(np.float32)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of unit Gaussian samples; each image reads a random window of it (much cheaper than
    drawing millions of fresh samples per image, and just as noisy to the eye and to a network)."""
    return np.random.default_rng(7).standard_normal(1 << 23, np.float32)


def develop(rgb: np.ndarray, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Linear radiance -> 8-bit RGB with the domain's response: exposure, white balance, tone curve,
    contrast and black level, then sensor noise (read + shot)."""
    gain = (np.float32(look.exposure) * np.asarray(look.white_balance, np.float32) * np.float32(1023.75))
    idx = np.clip(rgb * gain, 0, 4095).astype(np.uint16)
    x = _tone_lut(look)[idx]
    if look.noise > 0 or look.shot > 0:
        bank = _noise_bank()
        start = int(rng.integers(0, bank.size - x.size)) if x.size < bank.size else 0
        noise = bank[start:start + x.size].reshape(x.shape)
        sigma = np.sqrt(np.float32(look.noise**2) + np.float32(look.shot * 255.0) * x)
        sigma *= noise if rng.random() < 0.5 else -noise
        x += sigma
    x += np.float32(0.5)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
