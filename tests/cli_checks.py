"""The CLI's promise for bad input, checked the same way everywhere: exit code 2, no exception
escaping the command (typer's CliRunner swallows them, so the output alone proves nothing), and
exactly one line on stderr naming the problem (besides any one-line ``warning:`` the command
printed before it failed: those are part of the same promise, one line each)."""

from __future__ import annotations


def assert_one_line_error(res, *needles: str, code: int = 2) -> str:
    """Assert ``res`` (a CliRunner result) failed cleanly in one stderr line holding every needle."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    # typer.Exit is how the wrapper ends the command; anything else is a traceback in a real shell.
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
