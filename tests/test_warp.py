"""pipeline.warp: rectified frame images -> the rectified event frame (CMDA's warp_images)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.calib import event_to_frame_homography, load_calibration, synthetic_calibration, write_calibration
from pipeline.dsec import SequencePaths
from pipeline.errors import InputError
from pipeline.warp import warp_grid, warp_image, warp_sequence
from tests.cli_checks import assert_one_line_error


def _calibrations(real_dir_or_none):
    cals = [("synthetic", synthetic_calibration(np.random.default_rng(11)))]
    if real_dir_or_none is not None:
        cals.append(("real", load_calibration(real_dir_or_none / "cam_to_cam.yaml")))
    return cals


@pytest.fixture(scope="module")
def calibrations(request):
    try:
        real = request.getfixturevalue("real_dir")
    except pytest.skip.Exception:
        real = None  # shared data absent: the generated calibration still runs the tests
    return _calibrations(real)


def test_warp_grid_is_the_homography():
    H = np.array([[2.0, 0.01, 60.0], [0.02, 1.9, 140.0], [1e-5, -2e-5, 1.0]])
    mx, my = warp_grid(H, (640, 480))
    assert mx.shape == (480, 640) and mx.dtype == np.float32
    for x, y in [(0, 0), (639, 0), (320, 240), (17, 401)]:
        p = H @ [x, y, 1.0]
        assert mx[y, x] == pytest.approx(p[0] / p[2], abs=1e-3)
        assert my[y, x] == pytest.approx(p[1] / p[2], abs=1e-3)


def test_matches_warp_perspective_on_checkerboard(calibrations):
    """Same result as OpenCV's warpPerspective with WARP_INVERSE_MAP (H maps output -> source pixels)."""
    yy, xx = np.mgrid[0:1080, 0:1440]
    board = ((((xx // 37) + (yy // 29)) % 2) * 200 + 30).astype(np.uint8)
    board = np.dstack([board, 255 - board, board // 2])
    for _, calib in calibrations:
        H = event_to_frame_homography(calib)
        ours = warp_image(board, H, (640, 480)).astype(int)
        ref = cv2.warpPerspective(board, H, (640, 480), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(int)
        assert ours.shape == (480, 640, 3)
        inner = (slice(2, -2), slice(2, -2))
        diff = np.abs(ours[inner] - ref[inner])
        # Both interpolate with OpenCV's fixed-point tables (1/32 px); they differ only where the two
        # compute the sampling position with different float rounding: at most one level, rarely.
        assert diff.max() <= 1
        assert np.mean(diff > 0) < 0.01


def test_a_direction_lands_where_the_calibration_says(calibrations):
    """Draw a dot where a direction d hits the frame camera; after warping it sits where d hits the
    rectified event camera."""
    for name, calib in calibrations:
        K0, K1 = calib.rect[0].K, calib.rect[1].K
        R_10 = calib.T_10[:3, :3]
        for d in ([0.1, -0.05, 1.0], [-0.3, 0.2, 1.0], [0.25, 0.15, 1.0]):
            d = np.asarray(d)
            ev = K0 @ calib.R_rect[0] @ d
            fr = K1 @ calib.R_rect[1] @ R_10 @ d
            ev, fr = ev[:2] / ev[2], fr[:2] / fr[2]
            img = np.zeros((1080, 1440), np.float32)
            yy, xx = np.mgrid[0:1080, 0:1440]
            img = (250 * np.exp(-((xx - fr[0]) ** 2 + (yy - fr[1]) ** 2) / (2 * 4.0**2))).astype(np.uint8)
            out = warp_image(img, event_to_frame_homography(calib)).astype(np.float64)
            w = np.where(out > 0.3 * out.max(), out, 0)
            ys, xs = np.mgrid[0:480, 0:640]
            found = np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
            assert np.linalg.norm(found - ev) < 1.0, (name, d, found, ev)


def _tiny_sequence(root: Path, n: int = 3) -> SequencePaths:
    paths = SequencePaths(root, "zurich_city_09_a")
    calib = synthetic_calibration(np.random.default_rng(5))
    write_calibration(paths.calibration, calib)
    paths.images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(paths.image(i)), rng.integers(0, 255, (1080, 1440, 3), dtype=np.uint8))
    return paths


def test_warp_sequence_writes_and_resumes(tmp_path):
    paths = _tiny_sequence(tmp_path / "dsec")
    out = tmp_path / "out" / paths.name
    s = warp_sequence(paths, out, workers=2)
    files = sorted((out / "warp_images").glob("*.png"))
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
    assert s["written"] == 3 and s["skipped"] == 0 and s["images"] == 3
    img = cv2.imread(str(files[1]))
    assert img.shape == (480, 640, 3)
    # Colour order is preserved: the warped image equals warping the source directly.
    src = cv2.imread(str(paths.image(1)))
    H = event_to_frame_homography(load_calibration(paths.calibration))
    assert np.array_equal(img, warp_image(src, H))
    files[0].unlink()
    s = warp_sequence(paths, out)
    assert s["written"] == 1 and s["skipped"] == 2
    assert not list((out / "warp_images").glob(".*"))


def test_warp_sequence_bad_input(tmp_path):
    with pytest.raises(InputError, match="rectified images folder not found"):
        warp_sequence(SequencePaths(tmp_path, "nope"), tmp_path / "out")
    paths = _tiny_sequence(tmp_path / "dsec", n=1)
    paths.calibration.unlink()
    with pytest.raises(InputError, match="calibration file not found"):
        warp_sequence(paths, tmp_path / "out")
    paths = _tiny_sequence(tmp_path / "dsec2", n=1)
    cv2.imwrite(str(paths.image(0)), np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(InputError, match="1440x1080"):
        warp_sequence(paths, tmp_path / "out2")


def test_cli_warp(tmp_path):
    paths = _tiny_sequence(tmp_path / "dsec", n=2)
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text("dsec:\n  root: dsec\n  out: processed\n  sequences:\n    zurich_city_09_a: {labelled: [0, 1]}\n")
    result = CliRunner().invoke(app, ["warp", "--seq", "zurich_city_09a", "--config", str(cfg)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert len(list((tmp_path / "processed" / paths.name / "warp_images").glob("*.png"))) == 2
    paths.calibration.unlink()
    result = CliRunner().invoke(app, ["warp", "--all", "--config", str(cfg)])
    assert_one_line_error(result, "calibration file not found")


def test_fast_and_small_png_hold_the_same_pixels(tmp_path):
    """dsec.warp_png only changes the PNG encoding: both decode to the same image, "fast" is stored
    uncompressed (bigger file) and "small" is deflate-coded."""
    paths = _tiny_sequence(tmp_path / "dsec", n=1)
    fast = warp_sequence(paths, tmp_path / "fast", png="fast")["out"]
    small = warp_sequence(paths, tmp_path / "small", png="small")["out"]
    a, b = Path(fast) / "000000.png", Path(small) / "000000.png"
    assert np.array_equal(cv2.imread(str(a)), cv2.imread(str(b)))
    assert a.stat().st_size > 640 * 480 * 3 > b.stat().st_size


def test_warp_png_setting_is_validated(tmp_path):
    from pipeline.config import load_config

    cfg = tmp_path / "datasets.yaml"
    cfg.write_text("dsec:\n  warp_png: tiny\n")
    with pytest.raises(InputError, match=r"dsec\.warp_png must be 'fast' or 'small'"):
        load_config(cfg)
