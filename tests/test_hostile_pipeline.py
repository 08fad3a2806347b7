"""Hostile input to the data pipeline (issue 10): each test reproduces a fault of an earlier version
(silent corruption, lost work, a traceback where one line is due) on data it generates itself."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline import preprocess as pre
from pipeline import store as zstore
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.splits import write_sequence_split
from pipeline.store import VoxelStore
from pipeline.voxel import accumulate_voxels, rectifier, voxel_grid
from tests.cli_checks import assert_one_line_error
from tests.dsec_fixtures import (
    synthetic_rectify_map,
    synthetic_sequence_tree,
    write_config,
    write_rectify_map,
)

SEQ = "zurich_city_09_a"
N = 40_000


def _tree(root: Path, n: int = N, **rep):
    """A generated sequence of ``n`` events (~20 images) and its datasets.yaml."""
    seq, ts = synthetic_sequence_tree(root, SEQ, n=n)
    cfg = load_config(write_config(root, root / "DSEC", {SEQ: (0, 5)}, **rep))
    return cfg, seq, ts


def _events(seq: Path) -> Path:
    return seq / "events" / "left" / "events.h5"


def _digest_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------- 1. events outside the sensor
@pytest.mark.parametrize(("field", "value"), [("x", 700), ("x", 65535), ("y", 480), ("y", 65535),
                                              ("p", 2), ("p", 255)])
def test_events_off_the_sensor_or_with_bad_polarity_are_an_error(tmp_path, field, value):
    cfg, seq, _ = _tree(tmp_path)
    with h5py.File(_events(seq), "r+") as f:
        f[f"events/{field}"][20_000:21_000] = value  # 1,000 bad events in the middle of the stream
    with pytest.raises(InputError) as err:
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    msg = err.value.problem
    assert err.value.path == _events(seq)
    assert f"events/{field}[20000] = {value}" in msg and "1000 invalid event(s)" in msg
    with pytest.raises(InputError, match="incomplete"):
        VoxelStore.open(pre.store_path(cfg, SEQ))
    res = _invoke("preprocess", "--seq", SEQ, "--config", str(cfg.source))
    assert_one_line_error(res, "events.h5", f"events/{field}[20000]")


def test_kernels_refuse_hostile_arrays_instead_of_writing_out_of_bounds():
    from pipeline.voxel import accumulate_window_in_pieces

    rmap = synthetic_rectify_map(0)
    rect = rectifier(rmap)
    rng = np.random.default_rng(0)
    n = 5_000
    x = rng.integers(0, 640, n).astype(np.uint16)
    y = rng.integers(0, 480, n).astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    t = np.sort(rng.integers(0, 10_000, n)).astype(np.uint32)
    one = (np.array([0]), np.array([n]), t[:1].astype(np.int64), t[-1:].astype(np.int64))
    for bins in (1, 3):
        guard = np.zeros((3, bins, 480, 640), np.float32)  # grids[1] is the target, 0 and 2 are guards
        target = guard[1:2]
        for name, bad in (("x", 640), ("x", 65535), ("y", 480), ("p", 2), ("p", 255)):
            arrays = {"x": x.copy(), "y": y.copy(), "p": p.copy()}
            arrays[name][n // 2] = bad
            with pytest.raises(ValueError, match=f"events/{name}\\[{n // 2}\\] = {bad}"):
                accumulate_voxels(arrays["x"], arrays["y"], arrays["p"], t, rect, *one,
                                  np.ascontiguousarray(target))
            with pytest.raises(ValueError, match="outside the sensor"):
                accumulate_window_in_pieces([(arrays["x"], arrays["y"], arrays["p"], t)], n, rect, int(t[0]),
                                            int(t[-1]), np.zeros((1, bins, 480, 640), np.float32))
        signed = x.astype(np.int32)
        signed[7] = -1
        with pytest.raises(ValueError, match=r"events/x\[7\] = -1"):
            accumulate_voxels(signed, y, p, t, rect, *one, np.zeros((1, bins, 480, 640), np.float32))
        with pytest.raises(ValueError, match="same length"):
            accumulate_voxels(x[:-1], y, p, t, rect, *one, np.zeros((1, bins, 480, 640), np.float32))
        with pytest.raises(ValueError, match="t_first"):
            accumulate_voxels(x, y, p, t, rect, one[0], one[1], np.zeros(0, np.int64), one[3],
                              np.zeros((1, bins, 480, 640), np.float32))
        assert not guard.any()
    with pytest.raises(ValueError, match="2x2"):
        rectifier(rmap, 1, 640)
    nan_map = rmap.copy()
    nan_map[3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rectifier(nan_map)
    # A refused piece leaves the 1-bin kernel's shared scratch clean: the next window is exact.
    ok = np.zeros((1, 1, 480, 640), np.float32)
    accumulate_window_in_pieces([(x, y, p, t)], n, rect, int(t[0]), int(t[-1]), ok)
    np.testing.assert_array_equal(ok[0], voxel_grid(x, y, p, t, rmap, 1))


def test_kernel_is_exact_at_the_sensor_edges():
    """Events on the last row/column and a map sending pixels to the grid's edges and beyond stay in
    bounds (the guards around the target grid stay zero) and equal the per-event formula."""
    from tests.test_voxel import reference_voxels

    rmap = synthetic_rectify_map(1)
    rmap[479, :, 1] = 479.999  # rows rectified onto the last grid row
    rmap[:, 639, 0] = 1e9  # a column sent far off the grid
    rmap[0, :, 0] = -0.999  # a row just left of the grid (truncation keeps corner 0)
    x = np.array([0, 639, 639, 0, 320, 639], np.uint16)
    y = np.array([0, 479, 0, 479, 479, 240], np.uint16)
    p = np.array([1, 0, 1, 1, 0, 1], np.uint8)
    t = np.arange(6, dtype=np.uint32)
    for bins in (1, 2):
        grids = np.zeros((3, bins, 480, 640), np.float32)
        target = np.ascontiguousarray(grids[1:2])
        accumulate_voxels(x, y, p, t, rectifier(rmap), np.array([0]), np.array([6]), np.array([0]),
                          np.array([5]), target)
        assert not grids[0].any() and not grids[2].any()
        np.testing.assert_allclose(target[0], reference_voxels(x, y, p, t, rmap, bins), atol=1e-5)


# ---------------------------------------------------------------------- 2. datasets.yaml ranges
@pytest.mark.parametrize(("section", "key", "value"), [
    ("representation", "chunk_events", -1), ("representation", "chunk_events", 0),
    ("representation", "clevel", 10), ("representation", "clevel", -1), ("representation", "bins", 0),
    ("representation", "height", 0), ("representation", "width", 1), ("dsec", "label_every", 0),
    ("sample", "frames", 0), ("sample", "event_rate", -5.0), ("sample", "event_rate", ".nan"),
])
def test_out_of_range_settings_are_one_line_errors(tmp_path, section, key, value):
    path = tmp_path / "datasets.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(InputError, match=rf"{section}\.{key} must be") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    assert_one_line_error(_invoke("preprocess", "--all", "--config", str(path)), f"{section}.{key}")


@pytest.mark.parametrize(("text", "needle"), [
    ("dsec:\n  root: [unclosed\n", "not valid YAML (line 3"),
    ("dsec: {root: a\n  out: b", "not valid YAML"),
    ("- dsec\n- representation\n", "top level must be a mapping"),
    ("42\n", "top level must be a mapping"),
])
def test_yaml_syntax_errors_and_a_top_level_list_are_one_line(tmp_path, text, needle):
    path = tmp_path / "datasets.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=needle.replace("(", r"\(")) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    assert_one_line_error(_invoke("index", "--config", str(path)), needle)


def test_a_store_is_complete_only_when_its_frames_were_written(tmp_path, monkeypatch):
    """A task that reports success without writing (what chunk_events <= 0 did) can no longer
    leave a store marked complete: completion counts the frames and events behind the markers."""
    cfg, _, _ = _tree(tmp_path, chunk_events=5_000)
    orig = pre._run_batch
    calls = []

    def lazy(batch, **kw):
        calls.append(batch)
        if len(calls) % 2:
            return orig(batch, **kw)
        return batch.stop_event - batch.first_event  # claims the events, writes nothing

    monkeypatch.setattr(pre, "_run_batch", lazy)
    with pytest.raises(InputError, match="not marking the store complete"):
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    with pytest.raises(InputError, match="incomplete"):
        VoxelStore.open(pre.store_path(cfg, SEQ))
    monkeypatch.setattr(pre, "_run_batch", orig)
    summary = pre.preprocess_sequence(cfg, SEQ, workers=1)  # the rerun writes the missing frames only
    assert summary["status"] == "built" and 0 < summary["frames_written"] < summary["frames_with_window"]
    clean = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "clean"))
    pre.preprocess_sequence(clean, SEQ, workers=1)
    assert _digest_tree(pre.store_path(cfg, SEQ)) == _digest_tree(pre.store_path(clean, SEQ))


def test_a_marker_without_an_event_count_does_not_count(tmp_path):
    cfg, _, _ = _tree(tmp_path)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    path = pre.store_path(cfg, SEQ)
    valid = VoxelStore.open(path).index("valid")
    zstore.mark_done(path, 1, len(valid) - 1, events=5)  # too few events for these frames
    with pytest.raises(InputError, match=r"of .* window events were accumulated"):
        zstore.check_written(path, valid, 10_000)
    (zstore.progress_dir(path) / f"000001-{len(valid) - 1:06d}.done").write_text("")  # torn marker
    done, _ = zstore.read_marks(path, len(valid))
    assert not done.any()


# ---------------------------------------------------------------------- 3. a changed source is noticed
def test_events_changed_in_place_rebuild_the_store(tmp_path):
    cfg, seq, _ = _tree(tmp_path)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    path = pre.store_path(cfg, SEQ)
    with h5py.File(_events(seq), "r+") as f:  # same size, same count, same first/last timestamps
        x = f["events/x"][20_000:20_100]
        f["events/x"][20_000:20_100] = np.where(x > 0, x - 1, x + 1)
    summary = pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert summary["status"] == "built" and summary["frames_written"] == summary["frames_with_window"]
    clean = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "clean"))
    pre.preprocess_sequence(clean, SEQ, workers=1)
    assert _digest_tree(path) == _digest_tree(pre.store_path(clean, SEQ))


# ---------------------------------------------------------------------- 6. images, maps, windows
def test_more_images_than_timestamps_is_an_error(tmp_path):
    cfg, seq, ts = _tree(tmp_path)
    images = seq / "images" / "left" / "rectified"
    images.mkdir(parents=True)
    for f in range(len(ts) + 3):
        (images / f"{f:06d}.png").write_bytes(b"png")
    with pytest.raises(InputError, match=f"{len(ts)} timestamps for {len(ts) + 3} images"):
        pre.preprocess_sequence(cfg, SEQ, workers=1)


def test_a_rectify_map_sending_every_pixel_off_the_grid_is_an_error(tmp_path):
    cfg, seq, _ = _tree(tmp_path)
    write_rectify_map(seq / "events" / "left" / "rectify_map.h5", synthetic_rectify_map(0) + 5_000)
    with pytest.raises(InputError, match="every one of its 307200 pixels off the 640x480"):
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert not pre.store_path(cfg, SEQ).exists()


def test_images_all_outside_the_event_stream_is_an_error(tmp_path):
    cfg, seq, ts = _tree(tmp_path)
    (seq / "images" / "timestamps.txt").write_text("".join(f"{v + 10**9}\n" for v in ts))  # 1000 s later
    with pytest.raises(InputError, match=f"no image has an event window: {len(ts)} of {len(ts)}"):
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert not pre.store_path(cfg, SEQ).exists()



def _interrupt_after_one_batch(cfg, monkeypatch) -> None:
    """Run preprocess until its second batch, then stop it as Ctrl-C would (one batch written)."""
    orig = pre._run_batch
    seen = []

    def interrupted(batch, **kw):
        if seen:
            raise KeyboardInterrupt
        seen.append(batch)
        return orig(batch, **kw)

    monkeypatch.setattr(pre, "_run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_sequence(cfg, SEQ, workers=1)


def test_index_refuses_an_unfinished_store(tmp_path, monkeypatch):
    cfg, _, _ = _tree(tmp_path, chunk_events=5_000)
    _interrupt_after_one_batch(cfg, monkeypatch)
    with pytest.raises(InputError, match="incomplete"):
        write_sequence_split(cfg, SEQ)
    assert_one_line_error(_invoke("index", "--seq", SEQ, "--config", str(cfg.source)), "events.zarr",
                          "incomplete")


# ---------------------------------------------------------------------- 10. one line where one line is due
def test_a_one_point_cityscapes_polygon_is_one_line(tmp_path):
    from tests.test_cityscapes import make_tree

    root = make_tree(tmp_path / "cs", samples=[("train", "aachen", "aachen_000000_000019")])
    poly = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_polygons.json"
    ann = json.loads(poly.read_text())
    ann["objects"].insert(1, {"label": "road", "polygon": [[5, 5]]})
    poly.write_text(json.dumps(ann))
    cfg = tmp_path / "datasets.yaml"
    cfg.write_text("cityscapes:\n  root: cs\n  out: cs_out\n")
    res = _invoke("cityscapes", "--config", str(cfg), "--workers", "1")
    assert_one_line_error(res, "polygons.json", "object 1 ('road') has a polygon of 1 point(s)")


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    cfg, _, _ = _tree(tmp_path)

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(zstore, "write_bytes", no_space)
    res = _invoke("preprocess", "--seq", SEQ, "--config", str(cfg.source), "--workers", "1")
    assert_one_line_error(res, "No space left on device", "voxels", code=1)


def test_the_losing_one_of_two_concurrent_runs_says_so_in_one_line(tmp_path):
    from pipeline import lock

    cfg, _, _ = _tree(tmp_path)
    path = pre.store_path(cfg, SEQ)
    with lock.exclusive(path, "`cmda preprocess`"):  # what a running preprocess holds
        with pytest.raises(InputError, match=r"another `cmda preprocess` \(pid \d+\) is writing"):
            pre.preprocess_sequence(cfg, SEQ, workers=1)
        res = _invoke("preprocess", "--seq", SEQ, "--config", str(cfg.source))
        assert_one_line_error(res, "events.zarr", "another `cmda preprocess`")
    assert pre.preprocess_sequence(cfg, SEQ, workers=1)["status"] == "built"  # released: the next run works


# ---------------------------------------------------------------------- 13. what was done
def test_preprocess_reports_what_it_did_and_all_without_sequences_says_so(tmp_path):
    cfg, _, _ = _tree(tmp_path)
    args = ("preprocess", "--seq", SEQ, "--config", str(cfg.source), "--workers", "1")
    first = _invoke(*args)
    assert first.exit_code == 0 and first.exception is None
    assert f"{SEQ}: " in first.stdout and "frames written" in first.stdout
    again = _invoke(*args)
    assert again.exit_code == 0 and "already complete, nothing to do" in again.stdout
    empty = tmp_path / "empty.yaml"
    empty.write_text("dsec:\n  root: DSEC\n")
    for command in ("preprocess", "warp"):
        assert_one_line_error(_invoke(command, "--all", "--config", str(empty)), "no sequences are listed")


# ---------------------------------------------------------------------- 14. leftovers of killed writers
def test_temp_files_of_a_killed_writer_are_removed_on_the_next_run(tmp_path, monkeypatch):
    cfg, _, _ = _tree(tmp_path, chunk_events=5_000)
    orig = pre._run_batch
    _interrupt_after_one_batch(cfg, monkeypatch)
    path = pre.store_path(cfg, SEQ)
    # What kill -9 inside atomic.write_bytes leaves: a half-written temporary beside its target.
    (path / "voxels" / ".c.7.0.0.0.k2x9q_1.tmp").write_bytes(b"half a chunk")
    (zstore.progress_dir(path) / ".000009-000009.done.ab12.tmp").write_bytes(b"")
    monkeypatch.setattr(pre, "_run_batch", orig)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    assert not [p.name for p in path.rglob("*.tmp")]
    assert VoxelStore.open(path)


# ---------------------------------------------------------------------- issue 16.4: no broad except
def test_a_transient_read_error_does_not_delete_a_finished_store(tmp_path, monkeypatch):
    cfg, _, _ = _tree(tmp_path)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    path = pre.store_path(cfg, SEQ)
    before = _digest_tree(path)
    real_open = zarr.open_group

    def flaky(store, *a, mode="a", **k):
        if mode == "r":
            raise OSError(errno.EIO, "Input/output error", str(store))
        return real_open(store, *a, mode=mode, **k)

    monkeypatch.setattr(zstore.zarr, "open_group", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        pre.preprocess_sequence(cfg, SEQ, workers=1)
    monkeypatch.setattr(zstore.zarr, "open_group", real_open)
    assert _digest_tree(path) == before
    assert pre.preprocess_sequence(cfg, SEQ, workers=1)["status"] == "already complete"


def test_an_unparsable_store_is_rebuilt(tmp_path):
    cfg, _, _ = _tree(tmp_path)
    pre.preprocess_sequence(cfg, SEQ, workers=1)
    path = pre.store_path(cfg, SEQ)
    (path / "zarr.json").write_text("{torn")
    assert pre.preprocess_sequence(cfg, SEQ, workers=1)["status"] == "built"
    assert VoxelStore.open(path)



def test_warp_and_cityscapes_remove_a_killed_runs_temp_files_and_refuse_a_second_writer(tmp_path):
    from pipeline import lock
    from pipeline.cityscapes import convert_cityscapes
    from pipeline.warp import warp_sequence
    from tests.test_cityscapes import make_tree
    from tests.test_warp import _tiny_sequence

    paths = _tiny_sequence(tmp_path / "dsec", n=2)
    out = tmp_path / "processed" / paths.name
    stale = out / "warp_images" / ".000001.png.x8k2_.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    with lock.exclusive(out / "warp_images", "`cmda warp`"), pytest.raises(InputError, match="another `cmda warp`"):
        warp_sequence(paths, out)
    assert stale.exists()  # a live writer's file is left alone
    assert warp_sequence(paths, out)["written"] == 2 and not stale.exists()

    root = make_tree(tmp_path / "cs", samples=[("train", "aachen", "aachen_000000_000019")])
    cs_out = tmp_path / "cs_out"
    stale = cs_out / "gtFine" / "train" / "aachen" / ".aachen_000000_000019_gtFine_labelTrainIds.png.q1.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    convert_cityscapes(root, cs_out, workers=1)
    assert not list(cs_out.rglob("*.tmp"))
