"""Atomic writes must look like ordinary writes to everyone but a reader of a half-written file.

mkstemp creates its file 0600 whatever the umask; renamed into place, that made every PNG, JSON and
store chunk cmda wrote readable by its owner only (found on a fresh clone: 602 of 648 files under
data/ were 0600), so a lab sharing one processed tree could not read it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline.atomic import atomic_path, write_bytes, write_json, write_png


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_ordinary_modes(files: list[Path]) -> None:
    """Every file has the mode a plain write gets under this process's umask (read here with os.umask,
    independently of pipeline.atomic's own reading)."""
    mask = os.umask(0)
    os.umask(mask)
    modes = {oct(_mode(p)) for p in files}
    assert modes == {oct(0o666 & ~mask)}, modes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_get_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
        write_json(tmp_path / "b.json", {"k": 1})
        write_png(tmp_path / "c.png", np.zeros((4, 4), np.uint8))
        with atomic_path(tmp_path / "d.txt") as tmp:
            tmp.write_text("d")  # a writer that reopens the temp name (cv2, zarr, h5py do)
        plain = tmp_path / "plain.txt"
        plain.write_text("p")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert _mode(plain) == want
    for name in ("a.bin", "b.json", "c.png", "d.txt"):
        assert _mode(tmp_path / name) == want, (name, oct(_mode(tmp_path / name)))


def test_a_replaced_file_gets_the_umask_mode_and_no_temp_is_left(tmp_path):
    """A rename puts a new file in place: it takes the writer's umask, not the old file's mode."""
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    target.chmod(0o600)
    old = os.umask(0o022)
    try:
        write_bytes(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_processed_tree_is_readable_as_the_umask_allows(training_tree):
    """The voxel store, index files, warped images and RCS statistics: what a lab shares."""
    processed = [p for p in training_tree.parent.rglob("*") if p.is_file()]
    assert len(processed) > 20
    assert_ordinary_modes([p for p in processed if not p.name.endswith(".lock")])


def test_a_failed_write_names_the_file_asked_for_not_the_temp(tmp_path):
    """The CLI prints an OSError's filename: it must be the user's path, not '.name.x8f2.tmp'."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as err:
        write_bytes(folder, b"x")
    assert err.value.filename == str(folder)
    with pytest.raises(IsADirectoryError) as err, atomic_path(folder) as tmp:
        tmp.write_bytes(b"x")
    assert err.value.filename == str(folder)
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError) as err:
        write_bytes(blocker / "inside.bin", b"x")  # a file where a folder should be
    assert err.value.filename == str(blocker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]
    assert not list(folder.iterdir())
