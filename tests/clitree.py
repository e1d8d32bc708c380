"""The command line's tree, walked from the typer app: every command a user can run, so the tests
that go through every command (tests/test_error_form.py, tests/test_cli_sweep.py) cover a new one
without being edited."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer

from imcli.cli.app import app


def leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every runnable command under ``command`` (a click group or command), with its path of names."""
    subs = getattr(command, "commands", None)
    if not subs:
        yield path, command
        return
    for name, sub in subs.items():
        yield from leaves(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = sorted(leaves(ROOT), key=lambda c: c[0])  # (names, click command), by name
