"""What every imcli command shares: the one error handler and the common options. The
options become an identity in :mod:`imcli.client.identity`.

Heavy modules (paho, pydantic, Rich) are imported inside the helpers that need them, so
importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from imcli.core.errors import ImcliError, InvalidInput

if TYPE_CHECKING:
    from imcli.broker.accounts import AccountStore


def print_error(exc: ImcliError) -> None:
    """The one way users see an expected failure: ``Error: <what> (<what to do>)`` on stderr, one
    line: what it quotes (a worker's or a broker's words, a certificate's names, what was typed)
    is ``safe``."""
    from rich.console import Console
    from rich.text import Text

    from imcli.core.text import safe

    error = Text("Error: ", style="bold red") + Text(safe(str(exc)))
    Console(stderr=True, highlight=False, soft_wrap=True).print(error)


class CliGroup(TyperGroup):
    """Every command group: an ImcliError becomes one red line and exit code 1, never a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ImcliError as exc:
            print_error(exc)
            raise typer.Exit(1) from exc


def sub_app(help_text: str) -> typer.Typer:
    """A noun's sub-app (``imcli group …``) with the shared error handling."""
    return typer.Typer(cls=CliGroup, help=help_text, no_args_is_help=True)


HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="IMCLI_HOST",
        help="Broker host, or a cluster's nodes: a:1883,b:1883,c:1883 [default: profile's, else 127.0.0.1]",
    ),
]
PortOpt = Annotated[
    int | None,
    typer.Option("--port", envvar="IMCLI_PORT", help="Broker port [default: profile's, else 1883]"),
]
TlsOpt = Annotated[
    bool | None,
    typer.Option("--tls/--no-tls", help="Speak TLS to the broker [default: IMCLI_TLS, else profile's, else no]"),
]
CaOpt = Annotated[
    Path | None,
    typer.Option("--ca", help="PEM file of the CA that signed the broker's certificate (implies --tls; IMCLI_CA)"),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="IMCLI_DATA_DIR", help="Broker data directory [default: per-user data dir]"),
]


def console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def check_tls_options(cert: Path | None, key: Path | None) -> None:
    """``imcli serve``'s --tls-cert/--tls-key: both or neither, and a pair that loads."""
    if (cert is None) != (key is None):
        raise InvalidInput("--tls-cert and --tls-key go together", "give both PEM files, or neither")
    if cert is not None and key is not None:
        from imcli.broker.server import check_tls_files

        try:
            check_tls_files(cert, key)
        except ValueError as exc:
            raise InvalidInput(f"unusable TLS certificate: {exc}", "give a PEM certificate and its key") from exc


def ask_password(from_stdin: bool, *, confirm: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise InvalidInput("no password on stdin")
        return line
    env = os.environ.get("IMCLI_PASSWORD")
    if env:
        return env
    if not sys.stdin.isatty():
        raise InvalidInput("no password given", "type it at a terminal, set IMCLI_PASSWORD or use --password-stdin")
    value: str = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    return value


def account_store(data_dir: Path | None) -> AccountStore:
    from imcli.broker.accounts import AccountStore
    from imcli.client.config import default_data_dir

    return AccountStore((data_dir or default_data_dir()).expanduser())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> float:
    """``30m``, ``2h``, ``3d`` ago; or a local date/time (``2026-11-23``, ``2026-11-23 09:30``, ``09:30`` today)."""
    import datetime as dt

    value = text.strip()
    if value[:-1].isdigit() and value[-1:] in _UNITS:
        return now - int(value[:-1]) * _UNITS[value[-1]]
    today = dt.datetime.fromtimestamp(now).date()
    for fmt, on_today in (("%H:%M", True), ("%Y-%m-%d", False), ("%Y-%m-%d %H:%M", False), ("%Y-%m-%dT%H:%M", False)):
        try:
            parsed = dt.datetime.strptime(value, fmt)
        except ValueError:
            continue
        if on_today:
            parsed = dt.datetime.combine(today, parsed.time())
        return parsed.timestamp()
    raise InvalidInput(f"invalid time {text!r}", "give a duration (30m, 2h, 3d) or a time (2026-11-23 09:30)")
