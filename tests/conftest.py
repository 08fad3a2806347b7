"""Shared fixtures. Real-data tests read ../shared only where it exists and skip visibly elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CMDA_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


NEEDS_GB = 1.4  # peak of a full fast run under pytest's temp folder (README, "Quickstart")


def pytest_report_header(config) -> str:
    """Say up front how much disk the temp folder has: a full disk once failed CI 84 % of the way through."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    low = f"; LOW: the suite needs ~{NEEDS_GB} GB at its peak" if free < 2 * NEEDS_GB else ""
    return f"cmda: {free:.1f} GB free in {tempfile.gettempdir()}{low}"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real DSEC calibration and Prophesee recording; skipped where ../shared is absent."""
    if not (REAL / "prophesee_gen3_vga" / "events.h5").exists():
        pytest.skip(f"real data not available: {REAL} is absent (set CMDA_SHARED to the shared folder)")
    return REAL


@pytest.fixture(scope="session")
def training_tree(tmp_path_factory) -> Path:
    """datasets.yaml of a small processed DSEC night + Cityscapes tree, shared read-only by tests."""
    from tests.trees import training_tree as build

    return build(tmp_path_factory.mktemp("training_tree"))
