"""``cmda stream``: replay a DSEC sequence from its raw files as a live system would see it, frame by frame.

For each image, in timestamp order, and using nothing computed ahead of time:

1. **read**: the index of the last event at or before the image's timestamp (``ms_to_idx`` + a binary
   search in one chunk), then the events since the previous image from the raw ``events.h5``
   (:class:`pipeline.dsec.EventFile`, the direct Blosc chunk reader), CMDA's window rule
   (events ``idx[i-1] .. idx[i]`` inclusive, as ``cmda preprocess`` cuts them);
2. **voxelise**: the model's event representation with the sequence's rectify map: CMDA's voxel grid by
   :func:`pipeline.voxel.accumulate_voxels`, any other kind by the kernel ``cmda preprocess`` stores it with
   (:func:`pipeline.representations.build`), the kind and parameters the checkpoint (or export) records;
3. **warp**: decode the 1440x1080 image and remap it into the rectified event frame
   (:func:`pipeline.warp.warp_image`, the homography of ``cmda warp``);
4. **normalise**: as the loader does (:func:`train.data.events_input.network_events`: CMDA's
   :func:`pipeline.voxel.events_norm` for the voxel grid) and the ImageNet normalisation, top rows cropped
   to the model's geometry (the 440 rows evaluation scores);
5. **model**: the checkpoint through :func:`train.checkpoints.inference.predict_logits` (exactly ``cmda predict``'s
   path) or an exported ``.onnx`` model on onnxruntime.

So its windows equal the preprocessed store's and its test-frame predictions equal ``cmda predict``'s
(both tested). ``realtime`` waits for each image's timestamp before processing it; a frame whose
result comes after the next image's timestamp missed its deadline. Frames are never dropped (every
prediction is written), so a slow model falls further behind and the count says by how much.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import write_png
from pipeline.calib import event_to_frame_homography, load_calibration
from pipeline.config import DatasetsConfig, load_config
from pipeline.dsec import EventFile, SequencePaths, load_rectify_map, load_timestamps
from pipeline.errors import InputError
from pipeline.voxel import accumulate_voxels, events_norm, rectifier
from pipeline.warp import warp_grid, warp_image
from train.checkpoints.inference import REPRESENTATION_KEY, predict_logits
from train.common.device import resolve_device
from train.common.stopping import FrameStop
from train.data.events_input import EventInput, from_record, network_events, voxel_input
from train.data.loaders import normalize_image, three_channels
from train.deploy.export import load_model
from train.deploy.onnx_runtime import open_onnx
from train.eval.predict import frame_panel
from train.eval.visualize import colorize

STAGES = ("read", "voxelise", "warp", "normalise", "model")


@dataclass
class RawFrame:
    """One image of the replay with its event window, before normalisation."""

    frame: int
    timestamp_us: int
    start: int  # first event of the window
    stop: int  # last event of the window (inclusive, CMDA's rule)
    grid: np.ndarray  # (channels, H, W) frame of the replay's representation, not normalised
    rgb: np.ndarray  # (H, W, 3) uint8 warped image, whole frame
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.stop - self.start + 1


class SequenceReplay:
    """A DSEC sequence's raw files, opened once, handed out one image (and its events) at a time."""

    def __init__(self, cfg: DatasetsConfig, seq: str):
        self.name = cfg.sequence(seq)
        self.paths = SequencePaths(cfg.dsec.root, self.name)
        rep = cfg.representation
        self.bins, self.height, self.width = rep.bins, rep.height, rep.width
        self.cfg = cfg
        self.events_input: EventInput = voxel_input(cfg)
        self.timestamps = load_timestamps(self.paths.timestamps)
        self.rect = rectifier(load_rectify_map(self.paths.rectify_map, rep.height, rep.width), rep.height, rep.width)
        calib = load_calibration(self.paths.calibration)
        if tuple(calib.rect[0].resolution) != (rep.width, rep.height):
            raise InputError(self.paths.calibration, f"rectified event camera is {calib.rect[0].resolution}, "
                             f"datasets.yaml's representation is {rep.width}x{rep.height}")
        self.maps = warp_grid(event_to_frame_homography(calib), calib.rect[0].resolution)
        self.src_size = tuple(calib.rect[1].resolution)
        self.events = EventFile(self.paths.events)
        self._warm_up()
        t0 = self.events.t_offset + self.events.t_first
        t1 = self.events.t_offset + self.events.t_last
        inside = (self.timestamps >= t0) & (self.timestamps <= t1)
        # an image has a window when it and the image before it both lie inside the stream
        self.with_window = np.flatnonzero(np.concatenate([[False], inside[1:] & inside[:-1]]))
        if self.with_window.size == 0:
            raise InputError(self.paths.timestamps, f"no image after the event stream starts has a window: the "
                             f"events span {t0}..{t1} us, the {len(self.timestamps)} image(s) "
                             f"{self.timestamps[0]}..{self.timestamps[-1]} us")

    def _warm_up(self) -> None:
        """Build the 1-bin splat table and load the compiled kernels now, so the first frame's timings
        show the steady state rather than one-off set-up."""
        empty_u16, t = np.zeros(0, np.uint16), np.zeros(1, np.int64)
        grid = np.zeros((1, self.bins, self.height, self.width), np.float32)
        accumulate_voxels(empty_u16, empty_u16, np.zeros(0, np.uint8), np.zeros(0, np.uint32), self.rect,
                          np.zeros(1, np.int64), np.zeros(1, np.int64), t, t, grid)
        events_norm(grid[0], 0)

    def use(self, events: EventInput) -> None:
        """Build ``events``' representation (the model's) instead of datasets.yaml's voxel grid."""
        self.events_input = events
        if events.kind != "voxel":
            n = np.zeros(3, np.int64)
            events.build(n.astype(np.uint16), n.astype(np.uint16), n.astype(np.uint8), n, self.rect)  # compile now
        self.bins = events.channels

    def close(self) -> None:
        self.events.close()

    def frames(self, first: int = 0, limit: int = 0) -> list[int]:
        """The images with an event window, from image ``first``, at most ``limit`` (0 = all)."""
        frames = [int(f) for f in self.with_window if f >= first]
        return frames[:limit] if limit else frames

    def _index(self, frame: int) -> int:
        return int(self.events.index_of_time(self.timestamps[frame:frame + 1])[0])

    def warped(self, frame: int) -> np.ndarray:
        """The image in the rectified event frame, RGB uint8 (what ``cmda warp`` writes)."""
        path = self.paths.image(frame)
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(path, "image missing or unreadable")
        if (img.shape[1], img.shape[0]) != self.src_size:
            raise InputError(path, f"image is {img.shape[1]}x{img.shape[0]}, the calibration's rectified frame "
                             f"camera is {self.src_size[0]}x{self.src_size[1]}")
        return np.ascontiguousarray(warp_image(img, np.eye(3), maps=self.maps)[..., ::-1])

    def frame_of(self, ev: dict[str, np.ndarray]) -> np.ndarray:
        """One window's (channels, H, W) frame of the replay's representation, as ``cmda preprocess`` builds it."""
        if self.events_input.kind != "voxel":
            t = ev["t"].astype(np.int64)
            return self.events_input.build(ev["x"], ev["y"], ev["p"], t, self.rect)
        grid = np.zeros((1, self.bins, self.height, self.width), np.float32)
        tt = ev["t"].astype(np.int64)
        accumulate_voxels(ev["x"], ev["y"], ev["p"], ev["t"], self.rect, np.zeros(1, np.int64),
                          np.array([len(tt)]), tt[:1], tt[-1:], grid)
        return grid[0]

    def replay(self, frames: list[int]) -> Iterator[RawFrame]:
        """Each frame's raw window grid and warped image, in order, timing the read/voxelise/warp stages."""
        prev_frame, prev_idx = None, -1
        for f in frames:
            t = time.perf_counter()
            start = prev_idx if prev_frame == f - 1 else self._index(f - 1)
            stop = self._index(f)
            ev = self.events.read(start, stop + 1)
            t_read = time.perf_counter()
            grid = self.frame_of(ev)
            t_vox = time.perf_counter()
            rgb = self.warped(f)
            t_warp = time.perf_counter()
            prev_frame, prev_idx = f, stop
            yield RawFrame(f, int(self.timestamps[f]), start, stop, grid, rgb,
                           {"read": t_read - t, "voxelise": t_vox - t_read, "warp": t_warp - t_vox})


def network_inputs(raw: RawFrame, rows: int, events_input: EventInput | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image [3, rows, W], events [channels, rows, W]) normalised as the loader does, top ``rows`` rows
    (``events_input``: the replay's representation; None: CMDA's voxel grid)."""
    events = (events_norm(raw.grid, raw.count) if events_input is None else
              network_events(events_input.settings, raw.grid, raw.count))
    return normalize_image(raw.rgb[:rows]), np.ascontiguousarray(events[:, :rows])


# ---------------------------------------------------------------------- models
@dataclass
class Runner:
    """A model as the stream calls it: labels [rows, W] uint8 from normalised (image, events)."""

    name: str
    rows: int
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]


def checkpoint_runner(path: Path, replay: SequenceReplay, device: str) -> Runner:

    dev = resolve_device(device)
    model, cfg, state = load_model(path, dev)
    replay.use(from_record(state.get(REPRESENTATION_KEY), replay.cfg, path))
    c = model.backbone_events.patch_embed1.proj.in_channels
    if not (c == replay.bins or (replay.bins == 1 and c == 3)):
        raise InputError(path, f"the model takes {c} event channels; the replay builds "
                         f"{replay.events_input.suffix} ({replay.bins} channel(s))")
    rows = min(cfg.data.test_rows, replay.height)

    def run(image: np.ndarray, events: np.ndarray) -> np.ndarray:
        img = torch.from_numpy(image)[None].to(dev)
        ev = torch.from_numpy(three_channels(events))[None].to(dev)
        logits = predict_logits(model, img, ev, ("fusion",), amp=cfg.run.amp, scale=cfg.data.test_scale)
        return logits["fusion"].argmax(1)[0].cpu().numpy().astype(np.uint8)

    return Runner(f"{path.name} ({cfg.model.backbone}, PyTorch on {dev})", rows, run)


def onnx_runner(path: Path, replay: SequenceReplay, threads: int) -> Runner:

    model = open_onnx(path, threads)
    if model.width is not None and (model.width != replay.width or model.height > replay.height):
        raise InputError(path, f"model input is {model.width}x{model.height}; the sequence's frames are "
                         f"{replay.width}x{replay.height} (the model may take their top rows, not more)")
    replay.use(from_record(model.representation, replay.cfg, path))
    c = model.event_channels
    if not (c == replay.bins or (replay.bins == 1 and c == 3)):
        raise InputError(path, f"model takes {c} event channel(s); the sequence is voxelised with {replay.bins} "
                         f"bin(s) (datasets.yaml representation.bins)")
    rows = model.height or min(int(model.metadata.get("height", 440)), replay.height)

    def run(image: np.ndarray, events: np.ndarray) -> np.ndarray:
        ev = three_channels(events) if c == 3 and replay.bins == 1 else events
        return model(image[None], ev[None])

    return Runner(f"{path.name} (onnxruntime CPU, {model.output})", rows, run)


# ---------------------------------------------------------------------- the loop
@dataclass
class StreamSummary:
    sequence: str
    model: str
    frames: int
    out: Path
    video: Path | None
    seconds: dict[str, list[float]]  # per stage, per frame
    wall: float  # whole loop, writing included
    interval_ms: float  # median camera interval
    missed: int | None = None  # frames past their deadline (realtime only)
    max_lag_ms: float | None = None
    planned: int = 0  # frames the replay was asked for; more than ``frames`` when interrupted

    @property
    def interrupted(self) -> bool:
        """Ctrl-C / SIGINT stopped the replay: ``frames`` of ``planned`` were finished, no video was kept."""
        return self.frames < self.planned

    def stage_table(self) -> str:
        if not self.frames:
            return "no frame finished"
        lines = [f"{'stage':<10} {'mean ms':>8} {'p95 ms':>8}"]
        total = np.zeros(self.frames)
        for s in STAGES:
            v = np.asarray(self.seconds[s]) * 1e3
            total += v
            lines.append(f"{s:<10} {v.mean():8.2f} {np.percentile(v, 95):8.2f}")
        lines.append(f"{'total':<10} {total.mean():8.2f} {np.percentile(total, 95):8.2f}")
        return "\n".join(lines)

    @property
    def fps(self) -> float:
        """End to end: frames per second of read .. model (what a live system must sustain)."""
        per_frame = sum(np.asarray(self.seconds[s]) for s in STAGES)
        return float(self.frames / per_frame.sum()) if self.frames else 0.0


class VideoOut:
    """mp4v MP4 of panels, written to a temporary name and renamed when complete."""

    def __init__(self, path: Path, fps: float):
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = rgb.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise InputError(self.path, "OpenCV cannot write an mp4v video here")
        self.writer.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self, keep: bool) -> None:
        if self.writer is not None:
            self.writer.release()
            if keep:
                os.replace(self.tmp, self.path)
        if self.tmp.exists():
            self.tmp.unlink()


def stream(seq: str, model: str | Path, *, config: str | Path = "datasets.yaml", out: str | Path | None = None,
           video: bool = False, realtime: bool = False, first: int = 0, limit: int = 0, device: str = "cpu",
           threads: int = 0, progress: bool = True) -> StreamSummary:
    """Replay ``seq`` through ``model`` (``.onnx`` or a checkpoint); write ``<seq>_<frame>_pred.png`` per
    image (and ``<seq>.mp4`` with ``video``) into ``out`` (default: ``stream_<seq>/`` beside the model)."""

    model = Path(model)
    if limit < 0 or first < 0:
        raise InputError(None, "--first and --limit must be >= 0")
    if threads < 0:
        raise InputError(None, f"--threads must be >= 0 (0 = onnxruntime's default), got {threads}")
    if not model.exists():
        raise InputError(model, "model file not found")
    cfg = load_config(config)
    replay = SequenceReplay(cfg, seq)
    try:
        runner = onnx_runner(model, replay, threads) if model.suffix == ".onnx" else checkpoint_runner(
            model, replay, device)
        # one untimed pass: onnxruntime and PyTorch allocate and pick kernels on their first run
        runner.run(np.zeros((3, runner.rows, replay.width), np.float32),
                   np.zeros((replay.bins, runner.rows, replay.width), np.float32))
        frames = replay.frames(first, limit)
        if not frames:
            raise InputError(None, f"no image with an event window from frame {first} on")
        out = Path(out) if out is not None else model.parent / f"stream_{replay.name}"
        interval = float(np.median(np.diff(replay.timestamps))) if len(replay.timestamps) > 1 else 50_000.0
        writer = VideoOut(out / f"{replay.name}.mp4", 1e6 / interval) if video else None
        pacing = Pacing(realtime, time.perf_counter(), replay.timestamps[frames[0]], interval, replay.timestamps)
        seconds: dict[str, list[float]] = {s: [] for s in STAGES}
        done = 0  # frames whose prediction is written
        bar = tqdm(total=len(frames), desc=f"stream {replay.name}", unit="frame", disable=not progress)
        try:
            with FrameStop() as stop:
                for _ in _predict_frames(replay, runner, frames, out, writer, pacing, seconds):
                    done += 1
                    bar.set_postfix(fps=f"{1 / sum(seconds[s][-1] for s in STAGES):.1f}", refresh=False)
                    bar.update()
                    stop.check()
        except KeyboardInterrupt:  # a user stopping the replay: report and keep the frames done
            pass
        finally:
            bar.close()
            complete = done == len(frames)
            if writer is not None:  # a video of some of the frames is not kept under the video's name
                writer.close(keep=complete)
        for s in STAGES:  # a frame cut mid-way may have some stages timed and no prediction written
            del seconds[s][done:]
        return StreamSummary(replay.name, runner.name, done, out, writer.path if writer and complete else None,
                             seconds, time.perf_counter() - pacing.start, interval / 1e3,
                             pacing.missed if realtime else None, pacing.max_lag * 1e3 if realtime else None,
                             planned=len(frames))
    finally:
        replay.close()


@dataclass
class Pacing:
    """``--realtime``: each image arrives at its timestamp, and a prediction finished after the next image's
    arrival is a missed deadline (counted, with the largest lag). Without it, frames go as fast as they can."""

    realtime: bool
    start: float       # wall clock (perf_counter) of the first image's arrival
    t_first: int       # the first image's timestamp, us
    interval: float    # median frame interval, us
    timestamps: np.ndarray
    missed: int = 0
    max_lag: float = 0.0

    def wait_for(self, f: int) -> None:
        """Sleep until image ``f`` arrives."""
        if self.realtime:
            wait = self.start + (self.timestamps[f] - self.t_first) * 1e-6 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)

    def finished(self, f: int, at: float) -> None:
        """Image ``f``'s prediction was ready at wall clock ``at``."""
        if not self.realtime:
            return
        last = f + 1 >= len(self.timestamps)
        nxt = self.timestamps[f] + self.interval if last else self.timestamps[f + 1]
        lag = at - (self.start + (nxt - self.t_first) * 1e-6)
        if lag > 0:
            self.missed += 1
            self.max_lag = max(self.max_lag, lag)


def _predict_frames(replay: SequenceReplay, runner, frames: list[int], out: Path, writer: VideoOut | None,
                    pacing: Pacing, seconds: dict[str, list[float]]) -> Iterator[int]:
    """Predict each frame, write its PNG (then its video panel) and time its stages into ``seconds``; yields
    each frame once its prediction is written."""
    raw_iter = replay.replay(frames)
    for f in frames:
        pacing.wait_for(f)
        raw = next(raw_iter)
        t = time.perf_counter()
        image, events = network_inputs(raw, runner.rows, replay.events_input)
        t_norm = time.perf_counter()
        pred = runner.run(image, events)
        t_model = time.perf_counter()
        for s in ("read", "voxelise", "warp"):
            seconds[s].append(raw.seconds[s])
        seconds["normalise"].append(t_norm - t)
        seconds["model"].append(t_model - t_norm)
        pacing.finished(f, t_model)
        write_png(out / f"{replay.name}_{f:06d}_pred.png", colorize(pred))
        yield f  # the frame counts as done once its prediction is written
        if writer is not None:
            writer.write(frame_panel(raw.rgb[:runner.rows], events, pred, None, "fusion"))


def window_grids(cfg: DatasetsConfig, seq: str, frames: list[int]) -> Iterator[RawFrame]:
    """The replay's raw frames (tests compare their windows with the preprocessed store)."""
    replay = SequenceReplay(cfg, seq)
    try:
        yield from replay.replay(frames)
    finally:
        replay.close()


__all__ = ["STAGES", "RawFrame", "Runner", "SequenceReplay", "StreamSummary", "network_inputs", "stream",
           "window_grids"]
