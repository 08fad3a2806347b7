"""``cmda sample``: a small, SYNTHETIC but format-exact DSEC night + Cityscapes day tree.

One procedural street per DSEC sequence (pipeline.synthetic.scene) drives everything, so all parts agree:

* ``DSEC_Night/<seq>/events/left/events.h5`` — events simulated from the scene rendered as night log
  intensity at the RAW (distorted) event pixels: each raw pixel samples the rectified render at
  ``rectify_map[y, x]``; the rate is tuned to ``event_rate`` with the contrast threshold, plus noise.
* ``.../rectify_map.h5`` and ``calibration/cam_to_cam.yaml`` — a synthetic DSEC-like calibration.
* ``images/left/rectified/NNNNNN.png`` (1440x1080, 20 Hz, night look) and ``images/timestamps.txt``,
  rendered by a camera whose view is exactly the event camera's mapped through the event->frame
  homography, so ``warp_image(image, H)`` lines up with the labels and the events.
* ``labels/<seq>_NNNNNN_grey_gtFine_labelTrainIds.png`` — trainIds in the rectified event frame for
  the test frames of datasets.yaml (no truck, as in DSEC night).
* ``cityscapes/`` — daylight scenes of the same classes in Cityscapes' layout and polygon JSON.

Every sequence, image and Cityscapes frame has its own random stream derived from the seed, so the
output is byte-identical for a seed whatever the number of threads. The tree is built in a temporary
folder and moved into place at the end.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from pipeline import atomic
from pipeline.calib import (
    Calibration,
    event_to_frame_rotation,
    rectify_map_from_calibration,
    synthetic_calibration,
    write_calibration,
)
from pipeline.config import DatasetsConfig
from pipeline.dsec import SENSOR_HEIGHT, SENSOR_WIDTH, SequencePaths
from pipeline.errors import InputError
from pipeline.events_h5 import EventsH5Writer
from pipeline.parallel import run_tasks
from pipeline.synthetic.esim import count_events, merge_noise, step_events, threshold_maps
from pipeline.synthetic.render import (
    DAY,
    NIGHT,
    CompiledScene,
    Look,
    View,
    develop,
    polygon_objects,
    render_labels,
    render_radiance,
)
from pipeline.synthetic.scene import CITYSCAPES_RIG, DSEC_RIG, street_scene

FRAME_PERIOD_US = 50_000  # DSEC images: 20 Hz
CITYSCAPES_K = np.array([[2262.52, 0.0, 1096.98], [0.0, 2265.30, 513.14], [0.0, 0.0, 1.0]])
CITYSCAPES_SIZE = (2048, 1024)
CITYSCAPES_PERIOD_S = 1 / 17  # the sequence frames are 17 Hz
CITIES = {"train": ("aachen", "bremen", "zurich"), "val": ("frankfurt", "lindau")}
LOG_EPS = 0.02  # dark-current floor of the event pixels' log response (relative radiance)
NOISE_FRACTION = 0.1  # share of background-activity events in the stream


@dataclass(frozen=True)
class SampleSpec:
    seed: int
    frames: int
    event_rate: float
    cityscapes_train: int
    cityscapes_val: int
    dt_us: int = 5_000  # render step of the event simulation


def label_frames(cfg: DatasetsConfig, seq: str, n_frames: int) -> list[int]:
    """Test frames by datasets.yaml's rule: every ``label_every``-th from ``label_first`` in ``labelled``."""
    lo, hi = cfg.dsec.sequences[seq].labelled
    if hi < 0:
        hi = n_frames - 1
    hi = min(hi, n_frames - 1)
    first = max(lo, cfg.dsec.label_first)
    first += (cfg.dsec.label_first - first) % cfg.dsec.label_every
    return list(range(first, hi + 1, cfg.dsec.label_every))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# ---------------------------------------------------------------------------------------------- DSEC
@dataclass
class SequencePlan:
    """Everything decided up front for one synthetic sequence (cheap; the heavy work is in tasks)."""

    name: str
    index: int
    calib: Calibration
    rectify_map: np.ndarray
    cs: CompiledScene
    t_offset: int
    timestamps: np.ndarray  # absolute us, int64
    t_end: int  # last simulated event time, us relative to t_offset
    labels: list[int]

    def t_seconds(self, frame: int) -> float:
        return (int(self.timestamps[frame]) - self.t_offset) * 1e-6

    @property
    def event_view(self) -> View:
        return View(self.calib.rect[0].K, self.calib.rect[0].resolution)

    @property
    def frame_view(self) -> View:
        return View(self.calib.rect[1].K, self.calib.rect[1].resolution, event_to_frame_rotation(self.calib))


def plan_sequence(cfg: DatasetsConfig, spec: SampleSpec, name: str, index: int) -> SequencePlan:
    n = spec.frames
    calib = synthetic_calibration(_rng(spec.seed, index, 1))
    rng = _rng(spec.seed, index, 2)
    t_offset = int(10_000_000_000 + rng.integers(0, 5_000_000_000))
    first = int(rng.integers(8_000, 12_000))  # frame 0 a little after the first events
    jitter = rng.integers(-25, 26, n)
    jitter[0] = 0
    rel = first + np.arange(n, dtype=np.int64) * FRAME_PERIOD_US + jitter
    # The stream stops 20 ms before image n-2: the last two images lie outside it, as at DSEC's ends.
    t_end = int(rel[n - 2] - 20_000)
    speed = float(rng.uniform(6.0, 11.0))
    scene = street_scene(_rng(spec.seed, index, 3), speed * (rel[-1] * 1e-6) + 10.0, night=True, rig=DSEC_RIG,
                         speed=speed)
    return SequencePlan(name, index, calib, rectify_map_from_calibration(calib), CompiledScene(scene), t_offset,
                        t_offset + rel, t_end, label_frames(cfg, name, n))


def write_sequence_static(plan: SequencePlan, root: Path) -> None:
    """Calibration, rectify map and timestamps of one sequence."""
    paths = SequencePaths(root, plan.name)
    write_calibration(paths.calibration, plan.calib)
    with atomic.atomic_path(paths.rectify_map) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("rectify_map", data=plan.rectify_map, track_times=False)
    atomic.write_text(paths.timestamps, "".join(f"{int(t)}\n" for t in plan.timestamps))


def write_frames(plan: SequencePlan, root: Path, spec: SampleSpec, frames: list[int]) -> int:
    """Night RGB images (and labels for test frames) of the given frames."""
    paths = SequencePaths(root, plan.name)
    full = plan.frame_view
    # Rendered and developed at half resolution, then upsampled: night frame-camera images are soft
    # (motion blur, denoised noise) and the warp to 640x480 halves them again, so full-resolution
    # shading would add cost and PNG bytes (pixel-level noise), not content.
    half = View(full.K * np.array([[0.5], [0.5], [1.0]]) + np.array([[0, 0, -0.25], [0, 0, -0.25], [0, 0, 0]]),
                (full.size[0] // 2, full.size[1] // 2), full.R)
    for i in frames:
        t = plan.t_seconds(i)
        rgb, _, _ = render_radiance(plan.cs, t, half, NIGHT)
        img = develop(rgb, NIGHT, _rng(spec.seed, plan.index, 4, i))
        atomic.write_png(paths.image(i), cv2.resize(img, full.size, interpolation=cv2.INTER_LINEAR), photo=True)
        if i in plan.labels:
            atomic.write_png(paths.label(i), render_labels(plan.cs, t, plan.event_view))
    return len(frames)


class EventCamera:
    """Renders the scene as log intensity at the raw event pixels (render rectified, then look up)."""

    def __init__(self, plan: SequencePlan, look: Look = NIGHT):
        self.cs = plan.cs
        self.look = look
        rmap = plan.rectify_map
        w, h = plan.calib.rect[0].resolution
        mx = int(np.ceil(max(0.0, -rmap[..., 0].min(), rmap[..., 0].max() - (w - 1)))) + 2
        my = int(np.ceil(max(0.0, -rmap[..., 1].min(), rmap[..., 1].max() - (h - 1)))) + 2
        self.view = plan.event_view.with_margin(mx, my)
        self.map1, self.map2 = cv2.convertMaps(rmap[..., 0] + mx, rmap[..., 1] + my, cv2.CV_16SC2)

    def log_intensity(self, t_us: int) -> np.ndarray:
        rgb, _, _ = render_radiance(self.cs, t_us * 1e-6, self.view, self.look, mono=True)
        lum = rgb[..., 0] * np.float32(self.look.exposure)
        lum = cv2.GaussianBlur(lum, (0, 0), 0.6)  # optics: edges spread over about a pixel
        raw = cv2.remap(lum, self.map1, self.map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return np.log(raw + np.float32(LOG_EPS)).astype(np.float32)


def tune_threshold(cam: EventCamera, t_end: int, target: float, dt_us: int, windows: int = 3,
                   steps: int = 10) -> tuple[float, float]:
    """Contrast threshold giving about ``target`` scene events/s, from a few short pilot runs.

    Returns (threshold, achieved scene rate at it); the caller tops up with noise if even the
    smallest threshold cannot reach the target.
    """
    candidates = np.geomspace(0.01, 2.0, 24)
    counts = np.zeros(candidates.size)
    span = steps * dt_us
    starts = np.linspace(0, max(0, t_end - span), windows).astype(np.int64)
    for s in starts:
        frames = [cam.log_intensity(int(s + k * dt_us)) for k in range(steps + 1)]
        counts += count_events(frames, candidates)
    rate = counts / (windows * span * 1e-6)
    if rate[0] <= target:
        return float(candidates[0]), float(rate[0])
    if rate[-1] >= target:
        return float(candidates[-1]), float(rate[-1])
    # Log-log interpolation between the bracketing candidates (rate falls as the threshold grows).
    j = int(np.flatnonzero(rate >= target)[-1])
    lr = np.log(np.maximum(rate[j:j + 2], 1.0))
    w = (np.log(target) - lr[0]) / (lr[1] - lr[0]) if lr[1] != lr[0] else 0.0
    c = float(np.exp(np.log(candidates[j]) + w * (np.log(candidates[j + 1]) - np.log(candidates[j]))))
    return c, target


def simulate_events(plan: SequencePlan, root: Path, spec: SampleSpec, look: Look = NIGHT) -> dict:
    """Simulate and stream one sequence's events.h5 (``root/<name>/events/left``); returns its summary."""
    paths = SequencePaths(root, plan.name)
    cam = EventCamera(plan, look)
    rng = _rng(spec.seed, plan.index, 5)
    target = spec.event_rate
    c, scene_rate = tune_threshold(cam, plan.t_end, target * (1 - NOISE_FRACTION), spec.dt_us)
    noise_rate = max(target * NOISE_FRACTION, target - scene_rate)
    c0 = c
    shape = (SENSOR_HEIGHT, SENSOR_WIDTH)
    cpos, cneg = threshold_maps(rng, c, shape)
    hot = rng.choice(shape[0] * shape[1], 40, replace=False)
    n_steps = int(np.ceil(plan.t_end / spec.dt_us))
    L0 = cam.log_intensity(0)
    ref = L0.copy()
    n = 0
    with EventsH5Writer(paths.events, plan.t_offset) as writer:
        for k in tqdm(range(1, n_steps + 1), desc=f"events {plan.name}", unit="step", leave=False, disable=None):
            t0, t1 = (k - 1) * spec.dt_us, min(k * spec.dt_us, plan.t_end + 1)
            L1 = cam.log_intensity(t1)
            ev = step_events(L0, L1, ref, cpos, cneg, t0, t1)
            ev = merge_noise(ev, rng, noise_rate, t0, t1, shape, hot)
            keep = ev["t"] <= plan.t_end
            writer.append(ev["x"][keep], ev["y"][keep], ev["p"][keep], ev["t"][keep].astype(np.uint32))
            n += int(keep.sum())
            L0 = L1
            # Slow feedback on the contrast threshold keeps the running rate near the target even where
            # the short pilot runs misjudged the scene (like a sensor's bias auto-tuning).
            if t1 >= 20 * spec.dt_us:
                factor = float(np.clip((n / (target * t1 * 1e-6)) ** 0.1, 0.98, 1.02))
                if factor != 1.0 and c * factor > 1e-3:
                    c *= factor
                    cpos *= np.float32(factor)
                    cneg *= np.float32(factor)
    duration = (plan.t_end + 1) * 1e-6
    return {"sequence": plan.name, "events": n, "rate": n / duration, "threshold": c0, "final_threshold": c,
            "noise_rate": noise_rate,
            "t_offset": plan.t_offset, "frames": spec.frames, "labels": plan.labels}


# ---------------------------------------------------------------------------------------------- Cityscapes
def cityscapes_names(split: str, count: int) -> list[tuple[str, str]]:
    """(city, base name) of the synthetic Cityscapes frames of a split, e.g. ('aachen', 'aachen_000000')."""
    cities = CITIES[split]
    return [(cities[j % len(cities)], f"{cities[j % len(cities)]}_{j // len(cities):06d}") for j in range(count)]


def write_cityscapes_frame(root: Path, spec: SampleSpec, split: str, j: int) -> dict:
    """One annotated day frame (000019), its previous frame (000018) and the polygons JSON."""
    city, base = cityscapes_names(split, j + 1)[j]
    rng = _rng(spec.seed, 1000 + (split == "val"), j)
    scene = street_scene(rng, 80.0, night=False, rig=CITYSCAPES_RIG)
    cs = CompiledScene(scene)
    view = View(CITYSCAPES_K, CITYSCAPES_SIZE)
    t19 = float(rng.uniform(0.5, 4.0))
    w, h = CITYSCAPES_SIZE
    border = int(rng.integers(3, 9))  # rectification border on the left, annotated 'out of roi'
    pngs = {}
    objects: list[dict] = []
    for frame, t in ((19, t19), (18, t19 - CITYSCAPES_PERIOD_S)):
        rgb, proj, _ = render_radiance(cs, t, view, DAY)
        img = develop(rgb, DAY, _rng(spec.seed, 2000 + (split == "val"), j, frame))
        img[:, :border] = 0
        _, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]), atomic.png_params(photo=True))
        pngs[frame] = buf.tobytes()
        if frame == 19:
            objects = polygon_objects(cs, proj, view.size)
            objects.append({"label": "out of roi", "polygon": [[0, 0], [border - 1, 0], [border - 1, h - 1],
                                                                  [0, h - 1]]})
            present = {name for name in (o["label"] for o in objects)}
    name19 = f"{base}_000019"
    atomic.write_bytes(root / "leftImg8bit" / split / city / f"{name19}_leftImg8bit.png", pngs[19])
    for frame in (18, 19):
        atomic.write_bytes(root / "leftImg8bit_sequence" / split / city / f"{base}_0000{frame}_leftImg8bit.png",
                           pngs[frame])
    atomic.write_json(root / "gtFine" / split / city / f"{name19}_gtFine_polygons.json",
                      {"imgHeight": h, "imgWidth": w, "objects": objects}, indent=1)
    return {"split": split, "name": name19, "labels": sorted(present)}


# ---------------------------------------------------------------------------------------------- README
README = """# Synthetic cmda sample (generated by `cmda sample`)

**This data is SYNTHETIC.** Nothing here was recorded by a camera. It was generated by
`cmda sample --seed {seed} --frames {frames} --event-rate {rate:g}` so the whole pipeline (preprocessing,
splits, Cityscapes conversion, training, evaluation) can run end to end without downloading DSEC or
Cityscapes, in their real file formats and folder layouts.

How it was made: each DSEC sequence is one procedural street (roads, sidewalks, buildings, vegetation,
poles, signs, traffic lights, people, cars, sometimes riders, bicycles, motorcycles, buses) made of
labelled 3-D polygons, seen from a car driving forward with a gentle pan. From that one geometry:

- `DSEC_Night/<seq>/events/left/events.h5`: events simulated ESIM-style from the night rendering of the
  scene (log intensity, contrast-threshold crossings between {dt} us render steps, interpolated
  timestamps, plus background noise), at the raw distorted pixels of the synthetic event camera;
  DSEC's exact schema (x, y uint16; p uint8; t uint32 us relative to the int64 `t_offset`;
  `ms_to_idx`; Blosc/zstd). Read with `import hdf5plugin`.
- `rectify_map.h5` and `calibration/cam_to_cam.yaml`: a synthetic, self-consistent DSEC-like
  calibration (values generated in code, not copied from DSEC).
- `images/left/rectified/NNNNNN.png`: 1440x1080 night images at 20 Hz (dark, orange street light,
  glare, sensor noise), `images/timestamps.txt` in the same clock as `t_offset + t`. The last two
  images lie after the end of the event stream, as at the ends of real DSEC sequences.
- `labels/<seq>_NNNNNN_grey_gtFine_labelTrainIds.png`: Cityscapes trainIds (255 = ignore) in the
  rectified event frame, for the test frames of datasets.yaml; no truck, as in DSEC night.
- `cityscapes/`: daylight scenes of the same classes in Cityscapes' layout: `leftImg8bit`,
  `leftImg8bit_sequence` (frames 000018 and 000019) and `gtFine/*_gtFine_polygons.json`.

Sequences: {sequences}. Cityscapes: {cs_train} train, {cs_val} val frames.
"""


# ---------------------------------------------------------------------------------------------- driver
def generate_sample(cfg: DatasetsConfig, out: str | Path, *, seed: int | None = None, frames: int | None = None,
                    event_rate: float | None = None, scheduler: str | None = None, workers: int = 0,
                    dt_us: int = 5_000) -> dict:
    """Write the synthetic sample tree to ``out`` (replacing it atomically); returns a summary."""
    out = Path(out)
    s = cfg.sample
    spec = SampleSpec(seed=s.seed if seed is None else int(seed), frames=s.frames if frames is None else int(frames),
                      event_rate=s.event_rate if event_rate is None else float(event_rate),
                      cityscapes_train=s.cityscapes_train, cityscapes_val=s.cityscapes_val, dt_us=int(dt_us))
    if spec.frames < 4:
        raise InputError(cfg.source, f"the sample needs at least 4 frames per sequence, got {spec.frames}")
    if not spec.event_rate > 0:
        raise InputError(cfg.source, f"the event rate must be positive, got {spec.event_rate}")
    if not cfg.dsec.sequences:
        raise InputError(cfg.source, "no sequences listed under dsec.sequences")
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dsec_root, cs_root = tmp / "DSEC_Night", tmp / "cityscapes"
    plans = [plan_sequence(cfg, spec, name, k) for k, name in enumerate(cfg.dsec.sequences)]
    for plan in plans:
        write_sequence_static(plan, dsec_root)

    tasks, weights = [], []
    for plan in plans:  # the long event simulations first, so the short tasks fill in around them
        tasks.append(lambda plan=plan: simulate_events(plan, dsec_root, spec))
        weights.append(spec.frames)
    for plan in plans:
        for chunk in np.array_split(np.arange(spec.frames), max(1, spec.frames // 8)):
            tasks.append(lambda plan=plan, chunk=chunk: write_frames(plan, dsec_root, spec, chunk.tolist()))
            weights.append(len(chunk))
    for split, count in (("train", spec.cityscapes_train), ("val", spec.cityscapes_val)):
        for j in range(count):
            tasks.append(lambda split=split, j=j: write_cityscapes_frame(cs_root, spec, split, j))
            weights.append(1)
    results = run_tasks(tasks, desc="sample", scheduler=scheduler, workers=workers, unit="frame", weights=weights)
    sequences = results[: len(plans)]
    cityscapes = [r for r in results if isinstance(r, dict) and "split" in r]
    atomic.write_text(tmp / "README.md", README.format(
        seed=spec.seed, frames=spec.frames, rate=spec.event_rate, dt=spec.dt_us,
        sequences=", ".join(p.name for p in plans), cs_train=spec.cityscapes_train, cs_val=spec.cityscapes_val))
    atomic.replace_dir(tmp, out)
    return {"out": str(out), "seconds": time.perf_counter() - start, "sequences": sequences,
            "cityscapes": cityscapes, "spec": spec.__dict__}

