"""Procedural street scenes as ordered, labelled 3-D polygons: the one geometry behind the whole sample.

Every visible thing is a planar polygon with a Cityscapes label, a surface look (albedo, texture) and a
motion. Because the scene is vector geometry, one definition yields, for any camera and any time:
the Cityscapes polygon JSON (project, clip, list in drawing order), the DSEC trainId label PNGs (the
same polygons rasterised), the RGB images (the same polygons shaded, day or night) and the events (the
same polygons shaded at fine time steps). Labels, images and events therefore agree by construction.

World frame: X right, Y down, Z forward along the street; the ground is Y = 0, metres and seconds.
Each polygon lies in a plane of constant X (side faces: facades, car sides), Y (ground) or Z (frontal
faces: people, car backs, poles), which makes per-pixel surface coordinates a cheap ray-plane hit.
Drawing order is the painter's algorithm by layer, then by distance: ground, background, buildings,
walls and fences, then things sorted far to near, then the ego vehicle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cityscapesscripts.helpers.labels import name2label

# Plane axes of a surface; FLAT surfaces (the ego vehicle) are shaded without a world plane.
SIDE, GROUND, FRONTAL, FLAT = 0, 1, 2, 3

# Drawing layers (painter's algorithm), lowest first.
L_GROUND, L_ROAD, L_MARKING, L_SIDEWALK, L_BACKGROUND, L_BUILDING, L_BARRIER, L_THING, L_EGO = (
    1.0, 1.1, 1.2, 1.3, 2.0, 3.0, 3.5, 4.0, 9.0)

# Surface textures (rows of the atlas in pipeline.synthetic.render); shared by day and night so the per-class
# appearance is the same in both domains and only the lighting changes.
TEXTURES = ("flat", "asphalt", "paving", "facade", "concrete", "fence", "foliage", "grass", "metal", "cloth",
            "paint", "glass")
TEX = {name: i for i, name in enumerate(TEXTURES)}

NIGHT_FORBIDDEN = ("truck",)  # never annotated in DSEC night


def train_id(label: str) -> int:
    """Cityscapes trainId of a label name (255 for every non-training label)."""
    tid = name2label[label].trainId
    return 255 if tid < 0 else int(tid)


@dataclass
class Surface:
    """One planar, labelled polygon. ``verts`` are world coordinates at t = 0 (vehicle-camera
    coordinates if ``attached``); the polygon moves rigidly with ``velocity``."""

    label: str
    verts: np.ndarray
    axis: int
    albedo: tuple[float, float, float]
    texture: str = "flat"
    tex_scale: float = 1.0
    tex_amp: float = 0.0
    layer: float = L_THING
    anchor_z: float = 0.0
    group: int = 0
    velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)
    emissive: tuple[float, float, float] = (0.0, 0.0, 0.0)
    attached: bool = False
    tex_origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Light:
    """A point light (street lamp, traffic or car light): lights surfaces at night and causes glare."""

    position: tuple[float, float, float]
    rgb: tuple[float, float, float]
    radius: float = 6.0  # metres over which its light falls off
    size: float = 0.25  # glare core size in metres
    velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Trajectory:
    """The vehicle camera: forward at ``speed`` with a gentle lateral sway and a panning yaw."""

    speed: float = 9.0
    x: float = 1.7
    height: float = 1.4
    z0: float = 0.0
    yaw_amp: float = 0.05
    yaw_period: float = 5.0
    yaw_phase: float = 0.0
    pitch: float = 0.0
    sway_amp: float = 0.3
    sway_period: float = 7.0

    def center(self, t: float) -> np.ndarray:
        return np.array([self.x + self.sway_amp * np.sin(2 * np.pi * t / self.sway_period),
                         -self.height, self.z0 + self.speed * t])

    def rotation(self, t: float) -> np.ndarray:
        """R_wc: vehicle-camera axes (x right, y down, z forward) expressed in the world frame."""
        yaw = self.yaw_amp * np.sin(2 * np.pi * t / self.yaw_period + self.yaw_phase)
        cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(self.pitch), np.sin(self.pitch)
        r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        return r_yaw @ r_pitch


@dataclass
class Scene:
    surfaces: list[Surface] = field(default_factory=list)
    lights: list[Light] = field(default_factory=list)
    trajectory: Trajectory = field(default_factory=Trajectory)
    sky: str = "clear"

    def labels(self) -> set[str]:
        return {s.label for s in self.surfaces}


# ---------------------------------------------------------------------------------------------- 2-D outlines
def rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 12) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 14) -> np.ndarray:
    """An irregular round outline (tree crowns, bushes)."""
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    rr = r * rng.uniform(0.7, 1.15, n)
    return np.stack([cx + rr * np.cos(a), cy + 0.85 * rr * np.sin(a)], axis=1)


# Front view of a standing person, height 1 (x across, y up).
_BODY = np.array([[-0.17, 0.83], [0.17, 0.83], [0.21, 0.47], [0.16, 0.46], [0.13, 0.68], [0.12, 0.48],
                  [-0.12, 0.48], [-0.13, 0.68], [-0.16, 0.46], [-0.21, 0.47]])
_LEGS = np.array([[-0.12, 0.50], [0.12, 0.50], [0.11, 0.0], [0.03, 0.0], [0.0, 0.42], [-0.03, 0.0], [-0.11, 0.0]])


# ---------------------------------------------------------------------------------------------- builder
class _Builder:
    """Collects surfaces and lights; each ``add_*`` lifts a 2-D outline onto one of the three planes."""

    def __init__(self, rng: np.random.Generator, night: bool):
        self.rng = rng
        self.night = night
        self.surfaces: list[Surface] = []
        self.lights: list[Light] = []
        self.group = 0

    def new_group(self) -> int:
        self.group += 1
        return self.group

    def _add(self, label: str, verts: np.ndarray, axis: int, albedo, texture: str, **kw) -> Surface:
        if self.night and label in NIGHT_FORBIDDEN:
            raise ValueError(f"{label} must not appear in night scenes")
        origin = tuple(float(v) for v in self.rng.uniform(0, 50, 3))
        s = Surface(label, np.asarray(verts, np.float64), axis, tuple(float(a) for a in albedo), texture,
                    tex_origin=origin, **kw)
        self.surfaces.append(s)
        return s

    def frontal(self, label, outline, x0, z, albedo, texture="flat", **kw) -> Surface:
        """Outline (x across, y up) on the plane Z = z, shifted by x0."""
        o = np.asarray(outline, np.float64)
        verts = np.stack([x0 + o[:, 0], -o[:, 1], np.full(len(o), z)], axis=1)
        kw.setdefault("anchor_z", z)
        return self._add(label, verts, FRONTAL, albedo, texture, **kw)

    def side(self, label, outline, x, z0, albedo, texture="flat", **kw) -> Surface:
        """Outline (along Z from z0, y up) on the plane X = x."""
        o = np.asarray(outline, np.float64)
        verts = np.stack([np.full(len(o), x), -o[:, 1], z0 + o[:, 0]], axis=1)
        kw.setdefault("anchor_z", z0 + float(o[:, 0].min()))
        return self._add(label, verts, SIDE, albedo, texture, **kw)

    def ground(self, label, outline, albedo, texture="flat", y=0.0, **kw) -> Surface:
        """Outline (x, z) on the plane Y = y."""
        o = np.asarray(outline, np.float64)
        verts = np.stack([o[:, 0], np.full(len(o), y), o[:, 1]], axis=1)
        kw.setdefault("anchor_z", float(o[:, 1].min()))
        return self._add(label, verts, GROUND, albedo, texture, **kw)

    def light(self, pos, rgb, **kw) -> None:
        self.lights.append(Light(tuple(float(v) for v in pos), tuple(float(v) for v in rgb), **kw))


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.08) -> tuple[float, float, float]:
    return tuple(float(np.clip(c * (1 + rng.normal(0, amount)), 0.01, 0.95)) for c in rgb)


# ---------------------------------------------------------------------------------------------- objects
SODIUM = (1.0, 0.55, 0.2)
LED = (0.9, 0.85, 0.75)


def add_person(b: _Builder, x: float, z: float, *, label: str = "person", vel=(0.0, 0.0, 0.0), y0: float = 0.0,
               height: float | None = None) -> None:
    rng = b.rng
    h = height or rng.uniform(1.6, 1.9)
    w = h * rng.uniform(0.9, 1.1)
    g = b.new_group()
    cloth = _jitter(rng, rng.choice([(0.1, 0.1, 0.12), (0.5, 0.1, 0.1), (0.15, 0.2, 0.45), (0.6, 0.55, 0.4),
                                     (0.25, 0.3, 0.2)]), 0.15)
    trousers = _jitter(rng, (0.12, 0.12, 0.18), 0.2)
    kw = {"group": g, "velocity": vel, "anchor_z": z}
    b.frontal(label, _LEGS * [w, h] + [0, y0], x, z, trousers, "cloth", tex_scale=0.5, tex_amp=0.2, **kw)
    b.frontal(label, _BODY * [w, h] + [0, y0], x, z, cloth, "cloth", tex_scale=0.5, tex_amp=0.25, **kw)
    b.frontal(label, ellipse(0, 0.92 * h + y0, 0.07 * h, 0.08 * h, 10), x, z, (0.7, 0.5, 0.4), **kw)


def add_car(b: _Builder, x: float, z: float, *, facing_away: bool, vel=(0.0, 0.0, 0.0), side_x: float | None = None,
            label: str = "car", size=(1.8, 1.45, 4.3)) -> None:
    """A car seen from behind (or from the front if not ``facing_away``) with its visible side face."""
    rng = b.rng
    w, h, length = size
    g = b.new_group()
    paint = _jitter(rng, rng.choice([(0.6, 0.6, 0.62), (0.08, 0.08, 0.1), (0.55, 0.08, 0.06), (0.1, 0.2, 0.5),
                                     (0.8, 0.8, 0.78), (0.3, 0.32, 0.3)]), 0.1)
    glass, tyre = (0.04, 0.05, 0.06), (0.03, 0.03, 0.03)
    kw = {"group": g, "velocity": vel, "anchor_z": z}
    if side_x is not None:  # the side face runs from the visible face (at z) away from the camera
        side = np.array([[0, 0.25], [length, 0.25], [length, 0.95], [0.82 * length, 1.0], [0.66 * length, h],
                         [0.3 * length, h], [0.16 * length, 1.0], [0, 0.95]])
        b.side(label, side, side_x, z, paint, "paint", tex_scale=2.0, tex_amp=0.15, **kw)
        b.side(label, np.array([[0.2 * length, 1.02], [0.62 * length, 1.02], [0.64 * length, 0.93 * h],
                                [0.32 * length, 0.93 * h]]), side_x, z, glass, "glass", tex_scale=2.0, tex_amp=0.3,
               **kw)
        for cz in (0.18 * length, 0.8 * length):
            b.side(label, ellipse(cz, 0.33, 0.33, 0.33, 10), side_x, z, tyre, **kw)
    body = np.array([[-w / 2, 0.25], [w / 2, 0.25], [w / 2, 0.95], [0.42 * w, 1.0], [0.36 * w, h], [-0.36 * w, h],
                     [-0.42 * w, 1.0], [-w / 2, 0.95]])
    for cx in (-w / 2 + 0.2, w / 2 - 0.2):
        b.frontal(label, rect(cx - 0.15, cx + 0.15, 0.0, 0.3), x, z, tyre, **kw)
    b.frontal(label, body, x, z, paint, "paint", tex_scale=2.0, tex_amp=0.15, **kw)
    b.frontal(label, np.array([[-0.33 * w, 1.05], [0.33 * w, 1.05], [0.3 * w, 0.95 * h], [-0.3 * w, 0.95 * h]]),
              x, z, glass, "glass", tex_scale=2.0, tex_amp=0.3, **kw)
    lamp = (0.9, 0.1, 0.05) if facing_away else (0.95, 0.95, 0.85)
    for cx in (-w / 2 + 0.17, w / 2 - 0.17):
        emis = tuple(c * (0.6 if facing_away else 2.0) for c in lamp) if b.night and any(vel) else (0.0, 0.0, 0.0)
        b.frontal(label, rect(cx - 0.13, cx + 0.13, 0.72, 0.88), x, z, lamp, emissive=emis, **kw)
        if b.night and any(vel):  # parked cars are dark
            b.light((x + cx, -0.8, z - 0.05), lamp, radius=4.0 if facing_away else 9.0,
                    size=0.12 if facing_away else 0.3, velocity=vel)


def add_box_vehicle(b: _Builder, label: str, x: float, z: float, *, side_x: float | None, vel=(0.0, 0.0, 0.0)) -> None:
    """Bus, truck or tram: a tall box seen from behind with a long side face."""
    rng = b.rng
    g = b.new_group()
    kw = {"group": g, "velocity": vel, "anchor_z": z}
    if label == "bus":
        w, h, length, paint = 2.55, 3.1, 12.0, _jitter(rng, (0.1, 0.3, 0.65))
    elif label == "train":
        w, h, length, paint = 2.4, 3.4, 25.0, _jitter(rng, (0.15, 0.35, 0.75))
    else:
        w, h, length, paint = 2.5, 3.6, 8.5, _jitter(rng, (0.75, 0.75, 0.72))
    glass, tyre = (0.04, 0.05, 0.06), (0.03, 0.03, 0.03)
    clear = 0.0 if label == "train" else 0.35
    if side_x is not None:
        b.side(label, rect(0, length, clear, h), side_x, z, paint, "paint", tex_scale=3.0, tex_amp=0.12, **kw)
        if label in ("bus", "train"):
            b.side(label, rect(0.5, length - 0.5, 1.6, h - 0.4), side_x, z, glass, "glass", tex_scale=3.0,
                   tex_amp=0.3, **kw)
        else:
            b.side(label, rect(length - 2.2, length - 0.3, 1.7, h - 0.9), side_x, z, glass, "glass", **kw)
        if label != "train":
            for cz in (1.5, length - 2.5):
                b.side(label, ellipse(cz, 0.5, 0.5, 0.5, 12), side_x, z, tyre, **kw)
    b.frontal(label, rect(-w / 2, w / 2, clear, h), x, z, paint, "paint", tex_scale=3.0, tex_amp=0.12, **kw)
    b.frontal(label, rect(-0.4 * w, 0.4 * w, 1.7, h - 0.3), x, z, glass, "glass", tex_scale=3.0, tex_amp=0.2, **kw)
    for cx in (-w / 2 + 0.2, w / 2 - 0.2):
        emis = (0.8, 0.08, 0.04) if b.night and any(vel) else (0.0, 0.0, 0.0)
        b.frontal(label, rect(cx - 0.12, cx + 0.12, 0.6, 0.85), x, z, (0.9, 0.1, 0.05), emissive=emis, **kw)
        if b.night and any(vel):
            b.light((x + cx, -0.7, z - 0.05), (0.9, 0.1, 0.05), radius=4.0, size=0.12, velocity=vel)


def add_cyclist(b: _Builder, kind: str, x: float, z: float, *, crossing: bool, vel=(0.0, 0.0, 0.0)) -> None:
    """A bicycle or motorcycle with its rider, side view when crossing the street, else from behind."""
    rng = b.rng
    g = b.new_group()
    kw = {"group": g, "velocity": vel, "anchor_z": z}
    frame = _jitter(rng, (0.1, 0.1, 0.1) if kind == "motorcycle" else rng.choice([(0.5, 0.1, 0.1), (0.1, 0.3, 0.5)]))
    tyre = (0.03, 0.03, 0.03)
    r = 0.31 if kind == "motorcycle" else 0.34
    wb = 1.4 if kind == "motorcycle" else 1.05
    seat = 0.85 if kind == "motorcycle" else 0.95
    if crossing:
        d = 1.0 if vel[0] >= 0 else -1.0
        for cx in (-wb / 2, wb / 2):
            b.frontal(kind, ellipse(cx, r, r, r, 12), x, z, tyre, **kw)
        if kind == "motorcycle":
            body = np.array([[-wb / 2, r], [wb / 2, r], [wb / 2, 0.75], [0.1, 0.95], [-0.5, 0.9]])
            body[:, 0] *= d
        else:
            body = np.array([[-wb / 2, r], [0.0, r + 0.05], [wb / 2 - 0.1, 0.85], [wb / 2, 0.9], [0.05, 0.9],
                             [-0.25, 0.95], [-0.3, 0.88], [-wb / 2 + 0.05, r + 0.06]])
            body[:, 0] *= d
        b.frontal(kind, body, x, z, frame, "metal", tex_scale=1.0, tex_amp=0.2, **kw)
        rider = np.array([[-0.25, seat], [0.1, seat], [0.2, seat - 0.5], [0.3, seat - 0.5], [0.25, seat + 0.1],
                          [0.35, seat + 0.55], [0.2, seat + 0.7], [0.05, seat + 0.72], [-0.2, seat + 0.6]])
        rider[:, 0] *= d
        cloth = _jitter(rng, (0.15, 0.15, 0.2), 0.3)
        b.frontal("rider", rider, x, z, cloth, "cloth", tex_scale=0.5, tex_amp=0.2, **kw)
        b.frontal("rider", ellipse(d * 0.18, seat + 0.83, 0.11, 0.12, 10), x, z, (0.7, 0.5, 0.4), **kw)
    else:
        wide = 0.7 if kind == "motorcycle" else 0.12
        b.frontal(kind, rect(-0.05, 0.05, 0.0, 2 * r), x, z, tyre, **kw)
        b.frontal(kind, rect(-wide / 2, wide / 2, 2 * r - 0.1, seat + 0.1), x, z, frame, "metal", tex_scale=1.0,
                  tex_amp=0.2, **kw)
        add_person(b, x, z - 0.05, label="rider", vel=vel, y0=seat - 0.45, height=1.55)
        b.surfaces[-1].group = b.surfaces[-2].group = b.surfaces[-3].group = g
        if b.night and kind == "motorcycle":
            b.light((x, -(seat - 0.1), z - 0.1), (0.9, 0.1, 0.05), radius=3.0, size=0.1, velocity=vel)


def add_lamp(b: _Builder, x: float, z: float, toward: float) -> None:
    """Street lamp: pole, arm reaching over the road (direction ``toward``), lamp head and its light."""
    rng = b.rng
    g = b.new_group()
    h = rng.uniform(6.5, 8.0)
    arm = rng.uniform(1.0, 1.8)
    grey = _jitter(b.rng, (0.35, 0.36, 0.38))
    kw = {"group": g, "anchor_z": z}
    b.frontal("pole", rect(-0.09, 0.09, 0, h), x, z, grey, "metal", tex_scale=4.0, tex_amp=0.2, **kw)
    b.frontal("pole", rect(min(0, toward * arm), max(0, toward * arm), h - 0.12, h), x, z, grey, "metal", **kw)
    hx = x + toward * arm
    emis = (1.6, 0.95, 0.4) if b.night else (0.0, 0.0, 0.0)
    b.frontal("pole", rect(-0.3, 0.3, h - 0.28, h - 0.1), hx, z - 0.01, (0.8, 0.8, 0.75), emissive=emis, **kw)
    if b.night:
        b.light((hx, -(h - 0.35), z - 0.02), SODIUM if rng.random() < 0.75 else LED, radius=9.0, size=0.35)


def add_sign(b: _Builder, x: float, z: float) -> None:
    rng = b.rng
    g = b.new_group()
    h = rng.uniform(2.2, 3.0)
    kw = {"group": g, "anchor_z": z}
    b.frontal("pole", rect(-0.04, 0.04, 0, h), x, z, (0.45, 0.45, 0.47), "metal", tex_scale=3.0, tex_amp=0.2, **kw)
    shape = rng.integers(0, 3)
    r = rng.uniform(0.28, 0.42)
    if shape == 0:
        plate = ellipse(0, h + r * 0.8, r, r, 12)
    elif shape == 1:
        plate = np.array([[-r, h + 0.1], [r, h + 0.1], [0, h + 0.1 + 1.7 * r]])
    else:
        plate = rect(-r, r, h, h + 1.4 * r)
    colour = _jitter(rng, rng.choice([(0.75, 0.08, 0.06), (0.08, 0.2, 0.65), (0.85, 0.75, 0.08), (0.8, 0.8, 0.8)]))
    b.frontal("traffic sign", plate, x, z - 0.02, colour, "paint", tex_scale=0.5, tex_amp=0.1, **kw)


def add_traffic_light(b: _Builder, x: float, z: float) -> None:
    rng = b.rng
    g = b.new_group()
    h = rng.uniform(2.8, 3.6)
    kw = {"group": g, "anchor_z": z}
    b.frontal("pole", rect(-0.07, 0.07, 0, h), x, z, (0.3, 0.3, 0.32), "metal", tex_scale=3.0, tex_amp=0.2, **kw)
    b.frontal("traffic light", rect(-0.17, 0.17, h, h + 0.85), x, z - 0.02, (0.08, 0.08, 0.08), **kw)
    lit = int(rng.integers(0, 3))
    for i, colour in enumerate([(0.9, 0.1, 0.05), (0.95, 0.6, 0.05), (0.1, 0.9, 0.3)]):
        cy = h + 0.70 - i * 0.27
        on = i == lit
        emis = tuple(c * (2.0 if b.night else 0.6) for c in colour) if on else (0.0, 0.0, 0.0)
        b.frontal("traffic light", ellipse(0, cy, 0.09, 0.09, 10), x, z - 0.03,
                  tuple(c * (0.9 if on else 0.25) for c in colour), emissive=emis, **kw)
        if on and b.night:
            b.light((x, -cy, z - 0.05), colour, radius=2.5, size=0.12)


def add_tree(b: _Builder, x: float, z: float) -> None:
    rng = b.rng
    g = b.new_group()
    trunk_h = rng.uniform(1.8, 3.0)
    r = rng.uniform(1.4, 2.8)
    kw = {"group": g, "anchor_z": z}
    b.frontal("vegetation", rect(-0.13, 0.13, 0, trunk_h + 0.5), x, z, (0.22, 0.16, 0.1), "foliage", tex_scale=1.5,
              tex_amp=0.25, **kw)
    b.frontal("vegetation", blob(rng, 0, trunk_h + 0.8 * r, r), x, z, _jitter(rng, (0.1, 0.24, 0.07), 0.15),
              "foliage", tex_scale=1.5, tex_amp=0.6, **kw)


def add_bin(b: _Builder, x: float, z: float) -> None:
    g = b.new_group()
    b.frontal("static", rect(-0.3, 0.3, 0, 1.0), x, z, _jitter(b.rng, (0.15, 0.25, 0.15)), "metal", tex_scale=1.0,
              tex_amp=0.2, group=g, anchor_z=z)


# ---------------------------------------------------------------------------------------------- street
@dataclass(frozen=True)
class Rig:
    """How the ego vehicle appears in a camera: the hood outline in normalised coordinates (x/z, y/z)."""

    hood_top: float  # y/z of the hood's highest point (centre)
    hood_drop: float  # how much lower the hood is at x/z = +-0.7


DSEC_RIG = Rig(hood_top=0.345, hood_drop=0.12)
CITYSCAPES_RIG = Rig(hood_top=0.16, hood_drop=0.08)


def add_ego(b: _Builder, rig: Rig) -> None:
    """The ego vehicle's hood, attached to the camera ('ego vehicle', ignored in evaluation)."""
    xs = np.linspace(-1.6, 1.6, 17)
    top = rig.hood_top + rig.hood_drop * (xs / 0.7) ** 2
    outline = np.concatenate([np.stack([xs, top], 1), [[1.6, 2.0], [-1.6, 2.0]]])
    z = 2.0
    verts = np.stack([outline[:, 0] * z, outline[:, 1] * z, np.full(len(outline), z)], axis=1)
    b.surfaces.append(Surface("ego vehicle", verts, FLAT, (0.05, 0.05, 0.06), layer=L_EGO, attached=True,
                              group=b.new_group()))


def street_scene(rng: np.random.Generator, length: float, *, night: bool, rig: Rig = DSEC_RIG,
                 speed: float | None = None, rare: float = 0.35) -> Scene:
    """A random straight street ``length`` metres long (plus what is visible beyond), with its camera path.

    ``rare`` is the chance that each rare class (rider, bicycle, motorcycle, bus, and truck by day)
    appears, so Rare Class Sampling has something to do; night scenes never contain a truck.
    """
    b = _Builder(rng, night)
    speed = float(speed if speed is not None else rng.uniform(6.0, 11.0))
    road_w = rng.uniform(7.0, 12.0)
    half = road_w / 2
    lane_x = half / 2
    # Cars park along a curb only where the street is wide enough to pass them (and oncoming traffic).
    parking = {s: half >= 5.0 and rng.random() < 0.75 for s in (-1, 1)}
    if parking[1]:
        lane_x = min(lane_x, half - 3.3)
    opp_x = min(half / 2, half - 3.3) if parking[-1] else half / 2  # oncoming lane centre (negated)
    traj = Trajectory(speed=speed, x=lane_x + rng.normal(0, 0.2), height=rng.uniform(1.25, 1.5),
                      yaw_amp=np.deg2rad(rng.uniform(1.5, 4.0)), yaw_period=rng.uniform(3.5, 7.0),
                      yaw_phase=rng.uniform(0, 2 * np.pi), pitch=np.deg2rad(rng.normal(0, 0.7)),
                      sway_amp=rng.uniform(0.05, 0.4), sway_period=rng.uniform(5.0, 10.0))
    z_end = length + rng.uniform(120, 200)
    z_start = -30.0
    walk = {s: rng.uniform(2.0, 4.5) for s in (-1, 1)}
    strip = {s: (rng.uniform(1.5, 3.5) if rng.random() < 0.4 else 0.0) for s in (-1, 1)}
    line = {s: half + walk[s] + strip[s] for s in (-1, 1)}

    # Ground: terrain everywhere, road, markings, sidewalks with their curbs, grass strips.
    b.ground("terrain", rect(-90, 90, z_start, z_end + 50), (0.28, 0.34, 0.15), "grass", tex_scale=3.0, tex_amp=0.35,
             layer=L_GROUND)
    b.ground("road", rect(-half, half, z_start, z_end), _jitter(rng, (0.2, 0.2, 0.21), 0.1), "asphalt",
             tex_scale=4.0, tex_amp=0.25, layer=L_ROAD)
    dash, gap = rng.uniform(2.5, 4.0), rng.uniform(5.0, 9.0)
    for z in np.arange(z_start, z_end, dash + gap):
        b.ground("road", rect(-0.08, 0.08, z, z + dash), (0.75, 0.75, 0.72), "asphalt", tex_scale=4.0, tex_amp=0.1,
                 layer=L_MARKING, y=-0.002)
    for s in (-1, 1):
        lo, hi = sorted((s * half, s * (half + walk[s])))
        b.ground("sidewalk", rect(lo, hi, z_start, z_end), _jitter(rng, (0.45, 0.43, 0.4), 0.1), "paving",
                 tex_scale=2.0, tex_amp=0.3, layer=L_SIDEWALK, y=-0.12)
        b.side("sidewalk", rect(z_start, z_end, 0.0, 0.12), s * half, 0.0, (0.5, 0.5, 0.48), "concrete",
               tex_scale=2.0, tex_amp=0.2, layer=L_SIDEWALK, anchor_z=z_start)
        if strip[s]:
            lo, hi = sorted((s * (half + walk[s]), s * line[s]))
            b.ground("terrain", rect(lo, hi, z_start, z_end), (0.25, 0.36, 0.12), "grass", tex_scale=3.0,
                     tex_amp=0.35, layer=L_SIDEWALK, y=-0.1)

    # Background: a tree line behind the houses and a building closing the street far ahead.
    for s in (-1, 1):
        zs = np.arange(z_start, z_end + 10, 6.0)
        tops = rng.uniform(7, 13, zs.size)
        outline = np.concatenate([np.stack([zs - z_start, tops], 1), [[zs[-1] - z_start, 0], [0, 0]]])
        b.side("vegetation", outline, s * (line[s] + rng.uniform(15, 25)), z_start, (0.08, 0.2, 0.06), "foliage",
               tex_scale=2.5, tex_amp=0.5, layer=L_BACKGROUND, anchor_z=z_end)
    b.frontal("building", rect(-60, 60, 0, rng.uniform(15, 28)), 0.0, z_end, _jitter(rng, (0.5, 0.47, 0.42)),
              "facade", tex_scale=6.0, tex_amp=0.5, layer=L_BACKGROUND, anchor_z=z_end)

    # Buildings along both sides, with gaps holding walls, fences or hedges.
    for s in (-1, 1):
        z = z_start
        while z < z_end:
            seg = rng.uniform(8, 30)
            x = s * (line[s] + rng.uniform(0, 1.5))
            h = rng.uniform(6, 24)
            colour = _jitter(rng, rng.choice([(0.62, 0.58, 0.5), (0.5, 0.5, 0.52), (0.55, 0.35, 0.28),
                                              (0.7, 0.68, 0.62), (0.42, 0.4, 0.36)]), 0.06)
            g = b.new_group()
            b.side("building", rect(0, seg, 0, h), x, z, colour, "facade", tex_scale=6.0, tex_amp=0.5,
                   layer=L_BUILDING, group=g)
            b.frontal("building", rect(min(x, x + s * 14), max(x, x + s * 14), 0, h), 0.0, z, colour, "facade",
                      tex_scale=6.0, tex_amp=0.5, layer=L_BUILDING, group=g)
            z += seg
            if rng.random() < 0.35:
                gap_len = rng.uniform(3, 12)
                kind = rng.choice(["wall", "fence", "vegetation", "none"], p=[0.3, 0.35, 0.2, 0.15])
                if kind != "none":
                    hh = rng.uniform(1.0, 2.4)
                    look = {"wall": ((0.5, 0.5, 0.5), "concrete", 0.3), "fence": ((0.35, 0.3, 0.25), "fence", 0.6),
                            "vegetation": ((0.1, 0.25, 0.07), "foliage", 0.6)}[str(kind)]
                    b.side(str(kind), rect(0, gap_len, 0, hh), s * line[s], z, look[0], look[1], tex_scale=2.0,
                           tex_amp=look[2], layer=L_BARRIER)
                z += gap_len

    # Street furniture and trees on the sidewalks.
    lamp_side = int(rng.choice([-1, 1]))
    for z in np.arange(z_start + rng.uniform(0, 30), z_end - 5, rng.uniform(22, 38)):
        s = lamp_side if rng.random() < 0.8 else -lamp_side
        add_lamp(b, s * (half + 0.45), float(z), toward=-s)
    for s in (-1, 1):
        z = z_start + rng.uniform(0, 10)
        while z < z_end - 5:
            r = rng.random()
            x_curb = s * (half + rng.uniform(0.4, 0.9))
            if r < 0.25:
                add_sign(b, x_curb, z)
            elif r < 0.33:
                add_traffic_light(b, x_curb, z)
            elif r < 0.55:
                add_tree(b, s * (half + walk[s] - rng.uniform(0.5, 1.2) + strip[s] * 0.5), z)
            elif r < 0.62:
                add_bin(b, s * (half + walk[s] - 0.5), z)
            z += rng.uniform(6, 20)

    # People, parked and moving vehicles.
    for s in (-1, 1):
        for z in rng.uniform(0, z_end - 10, int(rng.poisson(length / 25 + 2))):
            v = rng.choice([0.0, 1.3, -1.3])
            add_person(b, s * (half + rng.uniform(0.5, walk[s] - 0.3)), float(z), vel=(0.0, 0.0, float(v)))
        if parking[s]:  # a row of parked cars along the curb
            z = rng.uniform(0, 20)
            while z < z_end - 10:
                if rng.random() < 0.75:
                    cx = s * (half - 1.1)
                    add_car(b, cx, float(z), facing_away=True, side_x=cx - s * 0.9)
                z += rng.uniform(5.0, 9.0)
    for z in rng.uniform(10, z_end, int(rng.poisson(length / 40 + 1))):  # oncoming traffic
        v = -rng.uniform(7, 13)
        add_car(b, -opp_x, float(z), facing_away=False, side_x=-opp_x + 0.9, vel=(0.0, 0.0, float(v)))
    if rng.random() < 0.6:  # a car ahead in our lane, slowly changing distance
        add_car(b, lane_x + rng.normal(0, 0.2), rng.uniform(12, 35), facing_away=True, side_x=None,
                vel=(0.0, 0.0, speed + rng.normal(0, 0.8)))

    # Rare classes, each in some scenes only.
    def crossing_time(z: float) -> float:  # when the camera is ~15 m before z
        return max(0.0, (z - 15.0) / speed)

    for kind in ("bicycle", "motorcycle"):
        if rng.random() < rare:
            for _ in range(int(rng.integers(1, 3))):
                z = float(rng.uniform(15, max(20, z_end - 40)))
                if rng.random() < 0.5:
                    v = rng.choice([-1, 1]) * (4.5 if kind == "bicycle" else 7.0)
                    x0 = -v * crossing_time(z)
                    add_cyclist(b, kind, x0, z, crossing=True, vel=(float(v), 0.0, 0.0))
                else:
                    v = rng.uniform(4, 6) if kind == "bicycle" else rng.uniform(8, 12)
                    add_cyclist(b, kind, half - 0.8, z, crossing=False, vel=(0.0, 0.0, float(v)))
    for kind in ("bus", "truck", "train"):
        if night and kind in NIGHT_FORBIDDEN:
            continue
        if rng.random() < (rare if kind != "train" else rare / 3):
            z = float(rng.uniform(20, max(25, z_end - 60)))
            if kind == "train" or rng.random() < 0.5 or not parking[1]:
                add_box_vehicle(b, kind, -opp_x, z, side_x=-opp_x + 1.25, vel=(0.0, 0.0, -float(rng.uniform(5, 9))))
            else:
                cx = half - 1.5
                add_box_vehicle(b, kind, cx, z, side_x=cx - 1.25)
    add_ego(b, rig)
    return Scene(b.surfaces, b.lights, traj, sky="clear")
