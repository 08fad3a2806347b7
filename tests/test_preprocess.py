"""cmda preprocess: image->event index, windows, stored voxel grids, resume, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import preprocess as pre
from pipeline.dsec import EventFile, load_rectify_map
from pipeline.errors import InputError
from pipeline.store import VoxelStore
from pipeline.voxel import voxel_grid
from tests.cli_checks import assert_one_line_error
from tests.dsec_fixtures import SYN_T_OFFSET, sequence_config, synthetic_events


@pytest.fixture(params=["generated", "real"])
def source(request):
    """None for a sequence the test generates itself (always runs), the real data folder otherwise
    (skipped where ../shared is absent)."""
    return request.getfixturevalue("real_dir") if request.param == "real" else None


def brute_force_index(t_rel: np.ndarray, t_offset: int, ts: np.ndarray) -> np.ndarray:
    t_abs = t_rel.astype(np.int64) + t_offset
    out = []
    for s in ts:
        if s < t_abs[0] or s > t_abs[-1]:
            out.append(-1)
        else:
            out.append(int(np.flatnonzero(t_abs <= s)[-1]))
    return np.array(out)


def test_index_matches_brute_force_on_real_recording(real_dir):
    with EventFile(real_dir / "prophesee_gen3_vga" / "events.h5") as ef:
        t = ef.read_t(0, ef.n_events)
        rng = np.random.default_rng(0)
        ts = ef.t_offset + np.concatenate([
            rng.integers(int(t[0]) - 2_000, int(t[-1]) + 2_000, 300),
            t[[0, 1, 1000, len(t) - 1]].astype(np.int64),  # exactly on events, incl. the first/last
            t[[1000]].astype(np.int64) - 1,
        ])
        got = ef.index_of_time(ts)
        threaded = ef.index_of_time(ts, workers=2)
    np.testing.assert_array_equal(got, brute_force_index(t, ef.t_offset, ts))
    np.testing.assert_array_equal(threaded, got)


def test_index_matches_brute_force_on_generated_events(tmp_path):
    from pipeline.events_h5 import write_events_h5

    x, y, p, t = synthetic_events(150_000, seed=4)
    t[1000:1300] = t[1000]  # a run of equal timestamps: "last event at or before" must pick its end
    t = np.maximum.accumulate(t)
    write_events_h5(tmp_path / "e.h5", x, y, p, t, SYN_T_OFFSET)
    with EventFile(tmp_path / "e.h5") as ef:
        rng = np.random.default_rng(0)
        ts = ef.t_offset + np.concatenate([
            rng.integers(int(t[0]) - 2_000, int(t[-1]) + 2_000, 300),
            t[[0, 1, 1000, 1299, len(t) - 1]].astype(np.int64),
            t[[1000]].astype(np.int64) - 1,
        ])
        got = ef.index_of_time(ts)
        threaded = ef.index_of_time(ts, workers=2)
    np.testing.assert_array_equal(got, brute_force_index(t, SYN_T_OFFSET, ts))
    np.testing.assert_array_equal(threaded, got)


def _digest_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_store_matches_windows(source, tmp_path):
    cfg = sequence_config(source, tmp_path, bins=5, chunk_events=100_000)
    summary = pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=2)
    store = VoxelStore.open(pre.store_path(cfg, "zurich_city_09_a"), bins=5)
    index = store.index("event_index")
    ts = store.index("timestamps")
    assert index[0] == -1 and index[-1] == -1  # first image before, last after the stream
    assert summary["frames_outside_stream"] == 2
    with EventFile(cfg.dsec.root / "zurich_city_09_a" / "events" / "left" / "events.h5") as ef:
        ev = ef.read(0, ef.n_events)
        np.testing.assert_array_equal(index, brute_force_index(ev["t"], ef.t_offset, ts))
    rmap = load_rectify_map(cfg.dsec.root / "zurich_city_09_a" / "events" / "left" / "rectify_map.h5")
    valid = store.index("valid")
    assert valid.sum() == len(ts) - 3  # frame 0 and the frames next to the outside ones
    for i in np.flatnonzero(valid):
        a, b = index[i - 1], index[i]
        assert store.index("window_start")[i] == a and store.index("window_stop")[i] == b
        assert store.index("event_count")[i] == b - a + 1
        sl = slice(a, b + 1)  # inclusive ends
        ref = voxel_grid(ev["x"][sl], ev["y"][sl], ev["p"][sl], ev["t"][sl], rmap, 5)
        np.testing.assert_allclose(store.voxels(int(i)), ref, atol=1e-4)
    for i in np.flatnonzero(~valid):
        assert not store.voxels(int(i)).any()
    # CMDA-compatible index file beside the store
    lines = (cfg.dsec.out / "zurich_city_09_a" / "images_to_events_index.txt").read_text().split()
    np.testing.assert_array_equal(np.array(lines, dtype=np.int64), index)


def test_second_run_is_a_no_op_and_bins_change_rebuilds(source, tmp_path):
    cfg = sequence_config(source, tmp_path, bins=1)
    pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    path = pre.store_path(cfg, "zurich_city_09_a")
    before = _digest_tree(path)
    calls = []
    orig = pre._run_batch
    pre._run_batch = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    finally:
        pre._run_batch = orig
    assert calls == [] and _digest_tree(path) == before
    cfg5 = dataclasses.replace(cfg, representation=dataclasses.replace(cfg.representation, bins=5))
    with pytest.raises(InputError, match="bins=1"):
        VoxelStore.open(path, bins=5)
    pre.preprocess_sequence(cfg5, "zurich_city_09_a", workers=1)
    assert VoxelStore.open(path, bins=5).group["voxels"].shape[1] == 5


def test_interrupted_run_resumes_byte_identical(source, tmp_path, monkeypatch):
    cfg = sequence_config(source, tmp_path, bins=5, chunk_events=60_000)
    clean = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "clean"))
    pre.preprocess_sequence(clean, "zurich_city_09_a", workers=1)

    orig = pre._run_batch
    seen = []

    def flaky(batch, **kw):
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C looks like inside the task loop
        seen.append(batch.frames)
        return orig(batch, **kw)

    monkeypatch.setattr(pre, "_run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    path = pre.store_path(cfg, "zurich_city_09_a")
    with pytest.raises(InputError, match="incomplete"):
        VoxelStore.open(path)

    redone = []
    monkeypatch.setattr(pre, "_run_batch", lambda batch, **kw: redone.append(batch.frames) or orig(batch, **kw))
    pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    done_first = {f for frames in seen for f in frames}
    assert redone and not done_first & {f for frames in redone for f in frames}  # nothing recomputed
    assert _digest_tree(path) == _digest_tree(pre.store_path(clean, "zurich_city_09_a"))


def _corrupt(tmp_path, source, edit):
    cfg = sequence_config(source, tmp_path)
    events = cfg.dsec.root / "zurich_city_09_a" / "events" / "left" / "events.h5"
    with h5py.File(events, "r+") as f:
        edit(f)
    return cfg, events


def test_wrong_dtype_is_reported(source, tmp_path):
    def edit(f):
        x = f["events/x"][:]
        del f["events/x"]
        f["events/x"] = x.astype(np.int32)

    cfg, events = _corrupt(tmp_path, source, edit)
    with pytest.raises(InputError, match=r"events/x.*int32.*uint16") as err:
        pre.preprocess_sequence(cfg, "zurich_city_09_a")
    assert err.value.path == events
    assert not pre.store_path(cfg, "zurich_city_09_a").exists()


def test_missing_dataset_is_reported(source, tmp_path):
    cfg, _ = _corrupt(tmp_path, source, lambda f: f.__delitem__("ms_to_idx"))
    with pytest.raises(InputError, match="missing dataset 'ms_to_idx'"):
        pre.preprocess_sequence(cfg, "zurich_city_09_a")


def test_non_monotonic_timestamps_are_reported(source, tmp_path):
    def edit(f):
        t = f["events/t"][:]
        t[150_000] = t[150_000] + 20_000  # jumps ahead, then back: not monotonic
        f["events/t"][:] = t

    cfg, events = _corrupt(tmp_path, source, edit)
    with pytest.raises(InputError, match="not monotonic") as err:
        pre.preprocess_sequence(cfg, "zurich_city_09_a")
    assert err.value.path == events
    with pytest.raises(InputError, match="incomplete"):
        VoxelStore.open(pre.store_path(cfg, "zurich_city_09_a"))


def test_bad_rectify_map_is_reported(source, tmp_path):
    cfg = sequence_config(source, tmp_path)
    rpath = cfg.dsec.root / "zurich_city_09_a" / "events" / "left" / "rectify_map.h5"
    with h5py.File(rpath, "w") as f:
        f["rectify_map"] = np.zeros((480, 640, 2), np.float64)
    with pytest.raises(InputError, match="float64, expected float32"):
        pre.preprocess_sequence(cfg, "zurich_city_09_a")
    with h5py.File(rpath, "w") as f:
        f["rectify_map"] = np.zeros((480, 641, 2), np.float32)
    with pytest.raises(InputError, match="shape"):
        pre.preprocess_sequence(cfg, "zurich_city_09_a")


def test_cli_errors_exit_2_in_one_line(source, tmp_path):
    sequence_config(source, tmp_path)
    runner = CliRunner()
    cfg_path = str(tmp_path / "datasets.yaml")
    res = runner.invoke(app, ["preprocess", "--seq", "zurich_city_09z", "--config", cfg_path])
    assert_one_line_error(res, "zurich_city_09z")
    (tmp_path / "DSEC" / "zurich_city_09_a" / "events" / "left" / "events.h5").unlink()
    res = runner.invoke(app, ["preprocess", "--seq", "zurich_city_09a", "--config", cfg_path])
    assert_one_line_error(res, "events.h5: events file not found")


def test_cli_accepts_both_name_spellings(source, tmp_path):
    cfg = sequence_config(source, tmp_path)
    args = ["preprocess", "--seq", "zurich_city_09a", "--config", str(tmp_path / "datasets.yaml")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and res.exception is None, res.output
    assert VoxelStore.open(pre.store_path(cfg, "zurich_city_09_a"))
    assert "zurich_city_09_a:" in res.stdout and "frames written" in res.stdout
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "already complete" in res.stdout


def test_plan_batches_bounds_span_and_isolates_huge_windows():
    start = np.array([-1, 0, 10, 20, 1000, 1010, 1020])
    stop = np.array([-1, 10, 20, 1000, 1010, 1020, 1030])
    todo = start >= 0
    batches = pre.plan_batches(start, stop, todo, max_events=100, max_frames=10)
    assert [b.frames for b in batches] == [(1, 2), (3,), (4, 5, 6)]
    assert all(b.stop_event - b.first_event <= 100 or len(b.frames) == 1 for b in batches)
    todo[5] = False  # a done frame splits a run of frames
    assert [b.frames for b in pre.plan_batches(start, stop, todo, 100, 10)] == [(1, 2), (3,), (4,), (6,)]


def test_distributed_scheduler_gives_the_same_store(source, tmp_path):
    distributed = pytest.importorskip("distributed")
    cfg = sequence_config(source, tmp_path, bins=5, chunk_events=100_000)
    local = dataclasses.replace(cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "local"))
    pre.preprocess_sequence(local, "zurich_city_09_a", workers=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        pre.preprocess_sequence(cfg, "zurich_city_09_a", scheduler=lc.scheduler_address)
    assert _digest_tree(pre.store_path(cfg, "zurich_city_09_a")) == _digest_tree(
        pre.store_path(local, "zurich_city_09_a"))


def test_distributed_errors_come_back_as_input_errors(source, tmp_path):
    distributed = pytest.importorskip("distributed")

    def edit(f):
        t = f["events/t"][:]
        t[150_000] = t[150_000] + 20_000
        f["events/t"][:] = t

    cfg, events = _corrupt(tmp_path, source, edit)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    with cluster as lc, pytest.raises(InputError, match="not monotonic") as err:
        pre.preprocess_sequence(cfg, "zurich_city_09_a", scheduler=lc.scheduler_address)
    assert err.value.path == events


@pytest.mark.parametrize("bins", [1, 5])
def test_chunked_path_gives_a_byte_identical_store(source, tmp_path, bins):
    """Windows streamed in pieces far smaller than themselves (the path that keeps memory flat on
    long windows) give exactly the bytes of windows read in one go."""
    cfg = sequence_config(source, tmp_path, bins=bins, chunk_events=1_000_000)
    whole = pre.preprocess_sequence(cfg, "zurich_city_09_a", workers=1)
    counts = VoxelStore.open(pre.store_path(cfg, "zurich_city_09_a")).index("event_count")
    small = int(counts.max()) // 7  # every window longer than this is streamed in >= 2 pieces
    assert small >= 1 and np.count_nonzero(counts > small) >= 3
    chunked = dataclasses.replace(
        cfg, dsec=dataclasses.replace(cfg.dsec, out=tmp_path / "chunked"),
        representation=dataclasses.replace(cfg.representation, chunk_events=small))
    streamed = []
    orig = pre.accumulate_window_in_pieces
    pre.accumulate_window_in_pieces = lambda *a, **k: streamed.append(a[1]) or orig(*a, **k)
    try:
        pre.preprocess_sequence(chunked, "zurich_city_09_a", workers=1)
    finally:
        pre.accumulate_window_in_pieces = orig
    assert len(streamed) == np.count_nonzero(counts > small)  # the chunked branch really ran
    assert whole["frames_written"] > 0
    assert _digest_tree(pre.store_path(chunked, "zurich_city_09_a")) == _digest_tree(
        pre.store_path(cfg, "zurich_city_09_a"))
