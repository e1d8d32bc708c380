"""The console script: a plain ``imcli say`` through :mod:`imcli.cli.say`, everything else
through the Typer app (:mod:`imcli.cli.app`), which is imported only then (issue 7)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from imcli.cli.say import parse_say, run_say
from imcli.core.errors import ImcliError


def main() -> NoReturn:
    """``imcli``: a plain ``say`` here, every other command through the Typer app."""
    args = parse_say(sys.argv[1:], os.environ)
    if args is None:
        from imcli.cli.app import app

        sys.exit(app())
    try:
        room = run_say(args)
    except ImcliError as exc:
        from imcli.cli.common import print_error

        print_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nAborted!", file=sys.stderr)  # as Typer says it
        sys.exit(1)
    print(f"sent to {room}")
    sys.exit(0)
