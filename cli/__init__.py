"""The ``cmda`` command: one entry point for the data pipeline and the trainer.

:mod:`cli.app` holds the typer application; each command group lives in its own module and registers its
commands on import (:mod:`cli.data`, :mod:`cli.train`, :mod:`cli.evaluate`, :mod:`cli.deploy`,
:mod:`cli.tools`). ``python -m cli`` runs it like ``cmda``.
"""

from __future__ import annotations

from cli import data, deploy, evaluate, tools, train
from cli.app import app

__all__ = ["app", "data", "deploy", "evaluate", "main", "tools", "train"]


def main() -> None:  # pragma: no cover - console entry point
    app()
