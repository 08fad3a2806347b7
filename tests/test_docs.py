"""The docs: the generated reference pages are current, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["cli.md", "config.md"])
def test_the_committed_reference_pages_are_what_the_code_generates(page):
    gen = _generator()
    committed = (REPO / "docs" / "reference" / page).read_text()
    assert committed == gen.PAGES[page](), (
        f"docs/reference/{page} is out of date with the code: run `python docs/gen_reference.py` and commit it")


def test_the_cli_reference_lists_every_command_and_option():
    import typer

    from cli import app

    page = _generator().cli_page()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert f"## `cmda {name}`" in page
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}`" in page, f"cmda {name} {opt} missing from the CLI reference"


def test_every_setting_has_a_type_a_default_and_a_meaning():
    import dataclasses

    from train.config import TrainConfig

    page = _generator().config_page()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(getattr(TrainConfig(), section.name)):
            key = f"{section.name}.{'lambda' if f.name == 'lambda_' else f.name}"
            assert key in rows, f"{key} missing from the configuration reference"
            meaning = rows[key].rstrip().rstrip("|").rsplit("|", 1)[-1].strip()
            assert meaning, f"{key} has no meaning: add a comment beside the field in the code"


def test_the_range_column_reads_what_validate_says():
    page = _generator().config_page()
    row = next(line for line in page.splitlines() if line.startswith("| `run.keep_ckpts`"))
    assert "&gt;= 0 (0 = keep every checkpoint)" in row
    row = next(line for line in page.splitlines() if line.startswith("| `mic.ratio`"))
    assert "in [0, 1)" in row


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (pip install -e '.[docs]'): the site was not built")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
