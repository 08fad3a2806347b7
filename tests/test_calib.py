"""pipeline.calib: reading/writing DSEC cam_to_cam.yaml, the rectify map and the event->frame homography."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import yaml

from pipeline.calib import (
    calibration_to_yaml,
    event_to_frame_homography,
    load_calibration,
    parse_calibration,
    rectify_map_from_calibration,
    synthetic_calibration,
    write_calibration,
)
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_calibration(np.random.default_rng(3))


def _keys(tree, prefix=""):
    """Every key path of a nested mapping (the layout, without values)."""
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_real_calibration_loads(real_dir):
    calib = load_calibration(real_dir / "cam_to_cam.yaml")
    assert calib.raw[0].resolution == (640, 480)
    assert calib.raw[1].resolution == (1440, 1080)
    assert calib.rect[0].K[0, 0] == pytest.approx(583.3081203392971)
    assert calib.raw[0].distortion[0] == pytest.approx(-0.09798194451582616)
    assert calib.T_10[0, 3] == pytest.approx(-0.04410796144531285)
    assert np.allclose(calib.R_rect[1] @ calib.R_rect[1].T, np.eye(3), atol=1e-9)


def test_rectify_map_matches_dsec(real_dir):
    """Our map from the real calibration reproduces the shipped rectify_map.h5.

    Both come from OpenCV's iterative undistortion of the same numbers; the tolerance (1e-3 px) is far
    below anything that matters for voxelisation (the bilinear weights change by < 0.1 %).
    """
    ours = rectify_map_from_calibration(load_calibration(real_dir / "cam_to_cam.yaml"))
    with h5py.File(real_dir / "prophesee_gen3_vga" / "rectify_map.h5", "r") as f:
        theirs = f["rectify_map"][:]
    assert ours.dtype == np.float32 and ours.shape == (480, 640, 2)
    assert np.abs(ours - theirs).max() < 1e-3


def test_rectify_map_inverts_the_forward_camera_model(synthetic):
    """Independent of OpenCV's iterative undistortion: every raw pixel's rectified position, turned
    back into a ray (K_rect0^-1, R_rect0^T) and projected by cam0's own model (K, radtan
    distortion, cv2.projectPoints), lands on that raw pixel again."""
    rmap = rectify_map_from_calibration(synthetic).astype(np.float64)
    K0 = synthetic.rect[0].K
    pts = rmap.reshape(-1, 2)
    rays = np.column_stack([(pts[:, 0] - K0[0, 2]) / K0[0, 0], (pts[:, 1] - K0[1, 2]) / K0[1, 1], np.ones(len(pts))])
    rays = (synthetic.R_rect[0].T @ rays.T).T
    cam = synthetic.raw[0]
    back, _ = cv2.projectPoints(rays.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), cam.K, cam.distortion)
    ys, xs = np.mgrid[0:480, 0:640]
    assert rmap.shape == (480, 640, 2)
    assert np.abs(back.reshape(480, 640, 2) - np.stack([xs, ys], axis=-1)).max() < 1e-3


def test_homography_formula(real_dir):
    calib = load_calibration(real_dir / "cam_to_cam.yaml")
    H = event_to_frame_homography(calib)
    K0, K1 = calib.rect[0].K, calib.rect[1].K
    expected = K1 @ calib.R_rect[1] @ calib.T_10[:3, :3] @ calib.R_rect[0].T @ np.linalg.inv(K0)
    assert np.allclose(H, expected / expected[2, 2])
    # The event frame's centre lands near the frame camera's centre, scaled by the focal ratio (~2).
    c = H @ np.array([320.0, 240.0, 1.0])
    assert 600 < c[0] / c[2] < 850 and 450 < c[1] / c[2] < 700
    assert H[0, 0] == pytest.approx(K1[0, 0] / K0[0, 0], rel=0.03)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_homography_maps_directions(seed):
    """A direction d (cam0 coordinates) appears at K_rect0 R_rect0 d in the event frame and at
    K_rect1 R_rect1 R_10 d in the frame camera; H takes the first to the second."""
    calib = synthetic_calibration(np.random.default_rng(seed))
    H = event_to_frame_homography(calib)
    rng = np.random.default_rng(seed)
    d = np.column_stack([rng.uniform(-0.5, 0.5, 20), rng.uniform(-0.4, 0.4, 20), np.ones(20)])
    ev = (calib.rect[0].K @ calib.R_rect[0] @ d.T).T
    fr = (calib.rect[1].K @ calib.R_rect[1] @ calib.T_10[:3, :3] @ d.T).T
    mapped = (H @ ev.T).T
    assert np.allclose(mapped[:, :2] / mapped[:, 2:], fr[:, :2] / fr[:, 2:], atol=1e-6)


def test_write_and_reload_round_trip(tmp_path, synthetic):
    path = tmp_path / "calibration" / "cam_to_cam.yaml"
    write_calibration(path, synthetic)
    back = load_calibration(path)
    for a, b in zip(synthetic.raw + synthetic.rect, back.raw + back.rect, strict=True):
        assert np.array_equal(a.K, b.K) and a.resolution == b.resolution
    assert np.array_equal(back.raw[1].distortion, synthetic.raw[1].distortion)
    for name in ("T_10", "T_21", "T_32"):
        assert np.array_equal(getattr(back, name), getattr(synthetic, name))
    assert np.array_equal(event_to_frame_homography(back), event_to_frame_homography(synthetic))
    assert not list(tmp_path.rglob("*.tmp"))


def test_written_layout_is_dsecs(real_dir, synthetic):
    """Same key paths as DSEC's file, so DSEC tooling reads ours."""
    real = yaml.safe_load((real_dir / "cam_to_cam.yaml").read_text())
    ours = yaml.safe_load(calibration_to_yaml(synthetic))
    assert _keys(ours) == _keys(real) == DSEC_KEYS


# The key paths of DSEC's cam_to_cam.yaml (read off a real file; checked against ../shared's copy
# above where it exists), so the layout test also runs without it.
_CAM_KEYS = ("camera_location", "camera_matrix", "camera_model", "camera_type", "is_rectified", "resolution")
DSEC_KEYS = (
    {"disparity_to_depth", "disparity_to_depth.cams_03", "disparity_to_depth.cams_12", "extrinsics", "intrinsics"}
    | {f"extrinsics.{k}" for k in ("R_rect0", "R_rect1", "R_rect2", "R_rect3", "T_10", "T_21", "T_32")}
    | {f"intrinsics.cam{i}" for i in range(4)} | {f"intrinsics.camRect{i}" for i in range(4)}
    | {f"intrinsics.cam{i}.{k}" for i in range(4) for k in (*_CAM_KEYS, "distortion_coeffs", "distortion_model")}
    | {f"intrinsics.cam{i}.T_cn_cnm1" for i in (1, 2, 3)}
    | {f"intrinsics.camRect{i}.{k}" for i in range(4) for k in _CAM_KEYS}
)


def test_written_layout_has_dsecs_keys(synthetic):
    assert _keys(yaml.safe_load(calibration_to_yaml(synthetic))) == DSEC_KEYS


def test_synthetic_calibration_is_dsec_like(synthetic):
    """Generated, not copied: but with DSEC's magnitudes (focal lengths, baselines, a valid warp)."""
    assert 540 < synthetic.rect[0].K[0, 0] < 640
    assert 1080 < synthetic.rect[1].K[0, 0] < 1260
    assert 0.03 < abs(synthetic.T_10[0, 3]) < 0.06
    assert 0.45 < abs(synthetic.T_21[0, 3]) < 0.56
    rmap = rectify_map_from_calibration(synthetic)
    assert -60 < rmap[..., 0].min() < 5 and 635 < rmap[..., 0].max() < 700
    # The whole event frame falls inside the 1440x1080 frame image (up to a few rows).
    H = event_to_frame_homography(synthetic)
    corners = np.array([[0, 0, 1], [639, 0, 1], [0, 479, 1], [639, 479, 1]], float) @ H.T
    uv = corners[:, :2] / corners[:, 2:]
    assert uv[:, 0].min() > -10 and uv[:, 0].max() < 1450 and uv[:, 1].min() > -10 and uv[:, 1].max() < 1100
    Q = synthetic.disparity_to_depth["cams_03"]
    assert Q[3, 2] == pytest.approx(1 / 0.6, rel=0.1)  # ~0.6 m event-camera baseline, as in DSEC


def test_missing_key_is_reported(tmp_path, synthetic):
    tree = yaml.safe_load(calibration_to_yaml(synthetic))
    del tree["extrinsics"]["R_rect1"]
    path = tmp_path / "cam_to_cam.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(InputError, match=r"extrinsics\.R_rect1") as err:
        load_calibration(path)
    assert err.value.path == path


def test_wrong_shape_is_reported(synthetic):
    tree = yaml.safe_load(calibration_to_yaml(synthetic))
    tree["intrinsics"]["camRect0"]["camera_matrix"] = [583.0, 583.0, 336.0]
    with pytest.raises(InputError, match=r"intrinsics\.camRect0\.camera_matrix.*shape"):
        parse_calibration(tree, "x.yaml")
    tree = yaml.safe_load(calibration_to_yaml(synthetic))
    tree["extrinsics"]["T_10"][0][0] = 2.0
    with pytest.raises(InputError, match="rotation"):
        parse_calibration(tree, "x.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("intrinsics: [unclosed")
    with pytest.raises(InputError, match="YAML"):
        load_calibration(bad)
