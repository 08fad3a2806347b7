"""Frame-camera images in the rectified event frame ("warp_images"): the step CMDA never released.

CMDA trains on 640x480 RGB frames aligned with the rectified left event camera. Under the
infinite-depth assumption a rectified event pixel ``u`` sees what the rectified frame camera sees
at ``H u`` (the infinite-depth homography, :func:`pipeline.calib.event_to_frame_homography`), so each warped image
is a single ``cv2.remap`` of the 1440x1080 image at ``H u`` for every pixel of the 640x480 grid.

:func:`warp_sequence` does that for every image of a sequence, in parallel, writing each PNG
atomically; an existing PNG is therefore complete and is skipped on a re-run (resumable).
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from pipeline import atomic, lock
from pipeline.calib import event_to_frame_homography, load_calibration
from pipeline.dsec import SENSOR_HEIGHT, SENSOR_WIDTH, SequencePaths
from pipeline.errors import InputError
from pipeline.parallel import run_tasks

EVENT_FRAME = (SENSOR_WIDTH, SENSOR_HEIGHT)
FRAMES_PER_TASK = 16


def warp_grid(H: np.ndarray, size: tuple[int, int] = EVENT_FRAME) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps (float32 x, y of shape (h, w)): for every pixel u of the ``size`` = (w, h) output,
    the source pixel ``H u`` (homogeneous, divided by its third coordinate)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    H = np.asarray(H, np.float64)
    den = H[2, 0] * xs + H[2, 1] * ys + H[2, 2]
    map_x = (H[0, 0] * xs + H[0, 1] * ys + H[0, 2]) / den
    map_y = (H[1, 0] * xs + H[1, 1] * ys + H[1, 2]) / den
    return map_x.astype(np.float32), map_y.astype(np.float32)


def warp_image(image: np.ndarray, H: np.ndarray, size: tuple[int, int] = EVENT_FRAME,
               maps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Sample ``image`` at ``H u`` for every output pixel u (bilinear; black outside the image).

    Equivalent to ``cv2.warpPerspective(image, H, size, flags=INTER_LINEAR | WARP_INVERSE_MAP)``;
    pass precomputed ``maps`` from :func:`warp_grid` to warp many images with the same H.
    """
    map_x, map_y = maps if maps is not None else warp_grid(H, size)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _frames(images_dir: Path) -> list[int]:
    frames = []
    for p in sorted(images_dir.glob("*.png")):
        if p.stem.isdigit() and len(p.stem) == 6:
            frames.append(int(p.stem))
    return frames


def _warp_frames(paths: SequencePaths, out: Path, frames: list[int], maps, src_size: tuple[int, int],
                 stored: bool) -> int:
    written = 0
    for f in frames:
        dst = out / f"{f:06d}.png"
        if dst.exists():  # atomic writes: an existing file is a finished one
            continue
        img = cv2.imread(str(paths.image(f)), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(paths.image(f), "not a readable image")
        if (img.shape[1], img.shape[0]) != src_size:
            raise InputError(paths.image(f), f"image is {img.shape[1]}x{img.shape[0]}, the calibration's rectified "
                             f"frame camera (camRect1) is {src_size[0]}x{src_size[1]}")
        warped = warp_image(img, np.eye(3), maps=maps)[..., ::-1]  # BGR in, RGB to write_png
        atomic.write_png(dst, warped, photo=True, stored=stored)
        written += 1
    return written


def warp_sequence(paths: SequencePaths, out_dir: str | Path, *, scheduler: str | None = None,
                  workers: int = 0, png: str = "fast") -> dict:
    """Write ``out_dir/warp_images/NNNNNN.png`` (640x480, rectified event frame) for every image of a
    sequence; images already warped are skipped. Returns a summary dict.

    ``png="fast"`` stores the PNGs uncompressed (the training loader decodes them ~5x faster),
    ``"small"`` Huffman-codes them (datasets.yaml ``dsec.warp_png``).
    """
    out = Path(out_dir) / "warp_images"
    if not paths.images_dir.is_dir():
        raise InputError(paths.images_dir, "rectified images folder not found (DSEC: <seq>/images/left/rectified)")
    frames = _frames(paths.images_dir)
    if not frames:
        raise InputError(paths.images_dir, "no NNNNNN.png images found")
    calib = load_calibration(paths.calibration)
    H = event_to_frame_homography(calib)
    maps = warp_grid(H, calib.rect[0].resolution)
    src_size = calib.rect[1].resolution
    out.mkdir(parents=True, exist_ok=True)
    with lock.exclusive(out, "`cmda warp`"):  # one writer; its .tmp files are a killed run's
        lock.remove_stale_temp_files(out)
        todo = [f for f in frames if not (out / f"{f:06d}.png").exists()]
        chunks = [todo[i:i + FRAMES_PER_TASK] for i in range(0, len(todo), FRAMES_PER_TASK)]
        start = time.perf_counter()
        tasks = [lambda c=c: _warp_frames(paths, out, c, maps, src_size, png == "fast") for c in chunks]
        written = run_tasks(tasks, desc=f"warp {paths.name}", scheduler=scheduler, workers=workers, unit="image",
                            weights=[len(c) for c in chunks])
    return {"sequence": paths.name, "images": len(frames), "written": int(sum(written)),
            "skipped": len(frames) - len(todo), "out": str(out), "homography": H.tolist(),
            "seconds": time.perf_counter() - start}
