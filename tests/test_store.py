"""The Zarr voxel store: direct chunk writes equal Zarr's own, read-side validation."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline import store as zstore
from pipeline.errors import InputError


@pytest.mark.parametrize("cname", ["lz4", "zstd"])
def test_frame_writer_bytes_equal_zarr_writes(tmp_path, cname):
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((2, 48, 64)).astype(np.float32)
    grid[grid < 0.5] = 0
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    for path in (ours, theirs):
        zstore.open_for_writing(path, {"k": 1}, frames=3, bins=2, height=48, width=64, cname=cname, clevel=1)
    zstore.FrameChunks(ours).write(1, grid)
    zstore.FrameChunks(ours).write(2, np.zeros_like(grid))  # all-zero: no chunk, reads as fill value
    zarr.open_array(theirs / "voxels", mode="r+")[1] = grid
    chunk = "voxels/c.1.0.0.0"  # flat chunk keys, as Zarr names them with the "." separator
    assert (ours / chunk).read_bytes() == (theirs / chunk).read_bytes()
    arr = zarr.open_array(ours / "voxels", mode="r")
    np.testing.assert_array_equal(arr[1], grid)
    assert not arr[2].any() and not (ours / "voxels/c.2.0.0.0").exists()
    with pytest.raises(ValueError, match="shape"):
        zstore.FrameChunks(ours).write(0, grid[:1])


def test_frame_chunks_read_nested_keys_of_format_1_stores(tmp_path):
    """Stores written before the flat layout (Zarr's default "/" keys) still read frame by frame."""
    path = tmp_path / "old.zarr"
    grid = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    group = zarr.open_group(path, mode="w")
    arr = group.create_array("voxels", shape=(3, 2, 4, 5), chunks=(1, 2, 4, 5), dtype="float32", fill_value=0.0,
                             compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=3, shuffle="noshuffle"))
    arr[1] = grid
    assert (path / "voxels/c/1/0/0/0").exists()
    np.testing.assert_array_equal(zstore.FrameChunks(path).read(1), grid)


def test_store_of_an_older_format_is_rebuilt(tmp_path):
    path = tmp_path / "s.zarr"
    zstore.open_for_writing(path, {"bins": 1}, frames=4, bins=1, height=8, width=8, cname="lz4", clevel=1)
    zarr.open_group(path, mode="r+").attrs["format"] = zstore.STORE_FORMAT - 1
    zstore.mark_done(path, 0, 1)
    _, done, complete = zstore.open_for_writing(path, {"bins": 1}, frames=4, bins=1, height=8, width=8,
                                                cname="lz4", clevel=1)
    assert not done.any() and not complete


def test_open_for_writing_resumes_only_same_identity(tmp_path):
    path = tmp_path / "s.zarr"
    zstore.open_for_writing(path, {"bins": 1}, frames=4, bins=1, height=8, width=8, cname="lz4", clevel=1)
    zstore.mark_done(path, 0, 1)
    _, done, complete = zstore.open_for_writing(path, {"bins": 1}, frames=4, bins=1, height=8, width=8,
                                                cname="lz4", clevel=1)
    assert done.tolist() == [True, True, False, False] and not complete
    _, done, _ = zstore.open_for_writing(path, {"bins": 5}, frames=4, bins=5, height=8, width=8,
                                         cname="lz4", clevel=1)
    assert not done.any() and not zstore.progress_dir(path).exists()
    assert zarr.open_array(path / "voxels").shape == (4, 5, 8, 8)


def test_voxel_store_refuses_incomplete_and_missing(tmp_path):
    with pytest.raises(InputError, match="not found"):
        zstore.VoxelStore.open(tmp_path / "nope.zarr")
    path = tmp_path / "s.zarr"
    group, _, _ = zstore.open_for_writing(path, {"settings": {"bins": 1}}, frames=2, bins=1, height=8, width=8,
                                          cname="lz4", clevel=1)
    with pytest.raises(InputError, match="incomplete"):
        zstore.VoxelStore.open(path)
    zstore.mark_complete(group, path, {"frames": 2})
    assert zstore.VoxelStore.open(path, bins=1).settings == {"bins": 1}
