"""DSEC camera calibration: read and write ``cam_to_cam.yaml``, derive the rectify map and the homography.

DSEC ships one ``calibration/cam_to_cam.yaml`` per sequence: raw intrinsics with radtan distortion for
the two event cameras (cam0 left, cam3 right, 640x480) and the two frame cameras (cam1 left, cam2 right,
1440x1080), the rectified pinhole intrinsics camRect0..3, the chained extrinsics T_10, T_21, T_32 and the
rectifying rotations R_rect0..3. Everything the pipeline derives from a calibration lives here, as pure
functions of a :class:`Calibration`:

* :func:`rectify_map_from_calibration` rebuilds DSEC's ``rectify_map.h5`` (raw event pixel -> rectified).
* :func:`event_to_frame_homography` is the infinite-depth map from the rectified left event camera to
  the rectified left frame camera, which CMDA's never-published ``warp_images`` step needs.
* :func:`synthetic_calibration` makes a self-consistent calibration with DSEC-like magnitudes for the
  synthetic sample (the real file stays outside the repository).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from pipeline import atomic
from pipeline.errors import InputError

# Camera name -> (camera_type, camera_location) in DSEC's layout.
CAMERAS = {0: ("event", "left"), 1: ("frame", "left"), 2: ("frame", "right"), 3: ("event", "right")}
EXTRINSICS = ("T_10", "T_21", "T_32")


@dataclass(frozen=True, eq=False)
class Camera:
    """One camera entry of ``intrinsics``: pinhole K, optional radtan distortion, resolution (w, h)."""

    K: np.ndarray
    resolution: tuple[int, int]
    distortion: np.ndarray | None = None

    @property
    def params(self) -> list[float]:
        """DSEC's ``camera_matrix`` list ``[fx, fy, cx, cy]``."""
        return [float(self.K[0, 0]), float(self.K[1, 1]), float(self.K[0, 2]), float(self.K[1, 2])]


@dataclass(frozen=True, eq=False)
class Calibration:
    """A DSEC ``cam_to_cam.yaml``: raw cameras 0..3, rectified cameras 0..3, extrinsics, R_rect0..3."""

    raw: tuple[Camera, Camera, Camera, Camera]
    rect: tuple[Camera, Camera, Camera, Camera]
    T_10: np.ndarray
    T_21: np.ndarray
    T_32: np.ndarray
    R_rect: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    disparity_to_depth: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path | None = None


def camera_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------------------------- reading
def _get(tree: dict, keys: tuple[str, ...], path: Path):
    node = tree
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise InputError(path, f"missing key '{'.'.join(keys[: i + 1])}' (DSEC cam_to_cam.yaml layout)")
        node = node[key]
    return node


def _array(tree: dict, keys: tuple[str, ...], shape: tuple[int, ...], path: Path) -> np.ndarray:
    value = _get(tree, keys, path)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"'{'.'.join(keys)}' must be numbers, got {value!r}") from None
    if arr.shape != shape:
        raise InputError(path, f"'{'.'.join(keys)}' must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(path, f"'{'.'.join(keys)}' contains NaN or inf")
    return arr


def _camera(tree: dict, name: str, path: Path, distorted: bool) -> Camera:
    fx, fy, cx, cy = _array(tree, ("intrinsics", name, "camera_matrix"), (4,), path)
    w, h = _array(tree, ("intrinsics", name, "resolution"), (2,), path)
    if w < 1 or h < 1 or w != int(w) or h != int(h):
        raise InputError(path, f"'intrinsics.{name}.resolution' must be two positive integers, got {[w, h]}")
    dist = None
    if distorted:
        model = _get(tree, ("intrinsics", name, "distortion_model"), path)
        if model != "radtan":
            raise InputError(path, f"'intrinsics.{name}.distortion_model' is {model!r}; only radtan is supported")
        dist = _array(tree, ("intrinsics", name, "distortion_coeffs"), (4,), path)
    return Camera(camera_matrix(fx, fy, cx, cy), (int(w), int(h)), dist)


def parse_calibration(tree: dict, path: str | Path = "cam_to_cam.yaml") -> Calibration:
    """Build a :class:`Calibration` from the parsed YAML mapping; InputError names the bad key."""
    path = Path(path)
    if not isinstance(tree, dict):
        raise InputError(path, "expected a mapping with 'intrinsics' and 'extrinsics'")
    raw = tuple(_camera(tree, f"cam{i}", path, distorted=True) for i in range(4))
    rect = tuple(_camera(tree, f"camRect{i}", path, distorted=False) for i in range(4))
    ext = {name: _array(tree, ("extrinsics", name), (4, 4), path) for name in EXTRINSICS}
    r_rect = tuple(_array(tree, ("extrinsics", f"R_rect{i}"), (3, 3), path) for i in range(4))
    for name, T in [*ext.items(), *((f"R_rect{i}", R) for i, R in enumerate(r_rect))]:
        R = T[:3, :3]
        if np.abs(R @ R.T - np.eye(3)).max() > 1e-4:
            raise InputError(path, f"'extrinsics.{name}' does not hold a rotation (R R^T != I)")
    q = {}
    for name in ("cams_03", "cams_12"):
        node = tree.get("disparity_to_depth") or {}
        if name in node:
            q[name] = _array(tree, ("disparity_to_depth", name), (4, 4), path)
    return Calibration(raw, rect, ext["T_10"], ext["T_21"], ext["T_32"], r_rect, q, path)  # type: ignore[arg-type]


def load_calibration(path: str | Path) -> Calibration:
    """Read a DSEC ``cam_to_cam.yaml``. Missing keys or wrong shapes raise InputError(path, key)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "calibration file not found (DSEC keeps it at <seq>/calibration/cam_to_cam.yaml)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from None
    return parse_calibration(tree, path)


# ---------------------------------------------------------------------------------------------- writing
def _matrix(a: np.ndarray) -> list:
    return [[float(v) for v in row] for row in np.asarray(a)]


def calibration_to_yaml(calib: Calibration) -> str:
    """The calibration as text in DSEC's ``cam_to_cam.yaml`` layout (same keys, order and nesting)."""
    intr: dict[str, dict] = {}
    T = {1: calib.T_10, 2: calib.T_21, 3: calib.T_32}
    for i in range(4):
        kind, loc = CAMERAS[i]
        cam = calib.raw[i]
        entry: dict = {"camera_type": kind, "camera_location": loc, "is_rectified": False}
        if i in T:
            entry["T_cn_cnm1"] = _matrix(T[i])
        entry["camera_model"] = "pinhole"
        entry["distortion_coeffs"] = [float(v) for v in cam.distortion]  # type: ignore[union-attr]
        entry["distortion_model"] = "radtan"
        entry["resolution"] = list(cam.resolution)
        entry["camera_matrix"] = cam.params
        intr[f"cam{i}"] = entry
        rc = calib.rect[i]
        intr[f"camRect{i}"] = {"camera_type": kind, "camera_location": loc, "is_rectified": True,
                               "camera_model": "pinhole", "camera_matrix": rc.params,
                               "resolution": list(rc.resolution)}
    ext = {"T_10": _matrix(calib.T_10), "T_21": _matrix(calib.T_21), "T_32": _matrix(calib.T_32)}
    ext.update({f"R_rect{i}": _matrix(R) for i, R in enumerate(calib.R_rect)})
    tree: dict = {"intrinsics": intr, "extrinsics": ext}
    if calib.disparity_to_depth:
        tree["disparity_to_depth"] = {k: _matrix(v) for k, v in calib.disparity_to_depth.items()}
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def write_calibration(path: str | Path, calib: Calibration) -> None:
    atomic.write_text(path, calibration_to_yaml(calib))


# ---------------------------------------------------------------------------------------------- derived maps
def rectify_map_from_calibration(calib: Calibration) -> np.ndarray:
    """DSEC's forward rectify map of cam0: float32 (h, w, 2), raw pixel (y, x) -> rectified (x, y).

    Each raw (distorted) pixel is undistorted with cam0's K and radtan coefficients, rotated by R_rect0
    and projected with camRect0's K (what OpenCV's undistortPoints does with R and P), so events can be
    rectified by a table lookup.
    """
    cam = calib.raw[0]
    w, h = cam.resolution
    ys, xs = np.mgrid[0:h, 0:w]
    pts = np.stack([xs, ys], axis=-1).reshape(-1, 1, 2).astype(np.float64)
    out = cv2.undistortPoints(pts, cam.K, cam.distortion, R=calib.R_rect[0], P=calib.rect[0].K)
    return out.reshape(h, w, 2).astype(np.float32)


def event_to_frame_rotation(calib: Calibration) -> np.ndarray:
    """Rotation from the rectified left event camera to the rectified left frame camera."""
    return calib.R_rect[1] @ calib.T_10[:3, :3] @ calib.R_rect[0].T


def event_to_frame_homography(calib: Calibration) -> np.ndarray:
    """``H = K_rect1 R_rect1 R_10 R_rect0^T K_rect0^-1`` (infinite-depth assumption): rectified event px -> frame px.

    Exact for points at infinity; the 4.4 cm baseline between the two left cameras makes nearer points
    shift by ``f * b / Z`` (about 5 px at 10 m in the 1440x1080 frame), which CMDA accepts.
    """
    H = calib.rect[1].K @ event_to_frame_rotation(calib) @ np.linalg.inv(calib.rect[0].K)
    return H / H[2, 2]


# ---------------------------------------------------------------------------------------------- synthetic
def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    rvec = rng.normal(0.0, np.deg2rad(degrees), 3)
    return cv2.Rodrigues(rvec)[0]


def _transform(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def _raw_camera(rng: np.random.Generator, f: float, size: tuple[int, int], k1: float, k2: float) -> Camera:
    w, h = size
    K = camera_matrix(f * (1 + rng.normal(0, 0.004)), f * (1 + rng.normal(0, 0.004)),
                      w / 2 + rng.normal(0, 0.015 * w), h / 2 + rng.normal(0, 0.015 * h))
    dist = np.array([k1 * (1 + rng.normal(0, 0.1)), k2 * (1 + rng.normal(0, 0.1)),
                     rng.normal(0, 5e-4), rng.normal(0, 5e-4)])
    return Camera(K, size, dist)


def _stereo(left: Camera, right: Camera, T_rl: np.ndarray) -> tuple[np.ndarray, np.ndarray, Camera, Camera, np.ndarray]:
    """Rectify a stereo pair like DSEC's tooling: common K, zero disparity at infinity, valid pixels only."""
    R1, R2, P1, P2, Q, _, _ = cv2.stereoRectify(
        left.K, left.distortion, right.K, right.distortion, left.resolution, T_rl[:3, :3], T_rl[:3, 3:4].copy(),
        flags=cv2.CALIB_ZERO_DISPARITY, alpha=0)
    K = P1[:3, :3]
    return R1, R2, Camera(K.copy(), left.resolution), Camera(P2[:3, :3].copy(), right.resolution), Q


def synthetic_calibration(rng: np.random.Generator) -> Calibration:
    """A self-consistent DSEC-like rig: event cameras 640x480 (f ~ 555 px, mild barrel distortion), frame
    cameras 1440x1080 (f ~ 1190 px, strong distortion), 4.5 cm between each event and frame camera, a
    0.5 m frame baseline, sub-degree misalignments, rectified with OpenCV's stereoRectify."""
    cam0 = _raw_camera(rng, 556.0, (640, 480), -0.10, 0.21)
    cam3 = _raw_camera(rng, 556.0, (640, 480), -0.11, 0.26)
    cam1 = _raw_camera(rng, 1190.0, (1440, 1080), -0.43, 0.18)
    cam2 = _raw_camera(rng, 1220.0, (1440, 1080), -0.43, 0.18)
    T_10 = _transform(_rotation(rng, 0.8), np.array([-0.044, 0.001, -0.012]) + rng.normal(0, 0.002, 3))
    T_21 = _transform(_rotation(rng, 0.6), np.array([-0.509, -0.002, 0.006]) + rng.normal(0, 0.003, 3))
    T_32 = _transform(_rotation(rng, 0.8), np.array([-0.046, -0.001, 0.014]) + rng.normal(0, 0.002, 3))
    T_30 = T_32 @ T_21 @ T_10
    R0, R3, rect0, rect3, q03 = _stereo(cam0, cam3, T_30)
    R1, R2, rect1, rect2, q12 = _stereo(cam1, cam2, T_21)
    return Calibration((cam0, cam1, cam2, cam3), (rect0, rect1, rect2, rect3), T_10, T_21, T_32,
                       (R0, R1, R2, R3), {"cams_03": q03, "cams_12": q12})
