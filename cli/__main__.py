"""``python -m cli``: the ``cmda`` command."""

from cli import app

app()
