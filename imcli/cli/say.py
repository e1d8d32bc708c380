"""``imcli say`` without Typer or pydantic (issue 7).

``imcli say`` is what scripts and bots run in a loop, and Typer 0.29 alone takes longer to
import and build than a whole paho publish. So :func:`main` reads the plain form of the
command itself::

    imcli say TEXT [--room/-r ROOM] [--host HOST] [--port PORT]

(``--opt=value`` too, with IMCLI_HOST and IMCLI_PORT as defaults) and sends it with
:mod:`imcli.client.send`. Anything else (help, an unknown or repeated option, ``--``, a value that
Typer would refuse or read differently) goes to the Typer app, which owns the command's
definition, help and errors: this parser only ever steps aside or agrees with it.
tests/test_quick.py checks that over generated argument lists, and that ``imcli say``
imports neither Typer nor pydantic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imcli.client.identity import Identity

_OPTIONS = {"--room": "room", "-r": "room", "--host": "host", "--port": "port"}
_ENVIRONMENT = {"host": "IMCLI_HOST", "port": "IMCLI_PORT"}
_PORT = re.compile(r"[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class SayArgs:
    """What ``imcli say`` was asked to do, as Typer's ``say`` command receives it."""

    text: str
    room: str | None = None
    host: str | None = None
    port: int | None = None


def parse_say(argv: Sequence[str], environ: Mapping[str, str]) -> SayArgs | None:
    """``argv`` (without the program name) as a plain ``say``, or ``None`` for Typer to handle."""
    if not argv or argv[0] != "say":
        return None
    text: str | None = None
    given: dict[str, str] = {}
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and name in _OPTIONS:
            key = _OPTIONS[name]
        elif arg in _OPTIONS and rest:
            key, value = _OPTIONS[arg], rest.pop(0)
        elif arg == "-" or (arg and not arg.startswith("-")):
            if text is not None:
                return None  # a second argument: Typer's error
            text = arg
            continue
        else:
            return None  # --help, --, an unknown option, an option without its value
        if key in given or not value or value.startswith("-"):
            return None
        given[key] = value
    for key, variable in _ENVIRONMENT.items():
        if key not in given and environ.get(variable):
            given[key] = environ[variable]
    port = given.get("port")
    if text is None or (port is not None and not _PORT.fullmatch(port)):
        return None
    if not all(is_text(value) for value in (text, *given.values())):
        return None  # Typer's usage error (imcli.cli.common), as for every command
    return SayArgs(text, given.get("room"), given.get("host"), int(port) if port else None)


def is_text(value: str) -> bool:
    """Whether an argument is text: bytes of argv or the environment that are not UTF-8 arrive as
    lone surrogates, which no payload can carry. Every command's parameters are checked with this
    (``imcli.cli.common``: a usage error), and the fast path steps aside for the same values."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOTE_WAIT = 2.0  # seconds: how long ``say --room`` waits to learn whether a group has the room's name


def run_say(args: SayArgs) -> str:
    """Send the line; returns the room it went to. Typer's ``say`` command calls this too."""
    from imcli.client.identity import max_payload_bytes, message_text, signed_in
    from imcli.client.send import say_text
    from imcli.core.topics import DEFAULT_ROOM, check_name

    room = check_name(DEFAULT_ROOM if args.room is None else args.room, "room name")  # --room '' is no lobby
    identity = signed_in(args.host, args.port)
    say_text(identity, room, message_text(args.text), max_payload_bytes())
    if room != DEFAULT_ROOM:
        _say_if_a_group(identity, room)
    return room


def _say_if_a_group(identity: Identity, room: str) -> None:
    """Rooms and groups are apart (``team`` and ``#team``): the line went to the room, and the
    user is told there is a group of that name. Only for ``--room``: the plain form stays fast.
    The line is already sent, so this courtesy waits at most ``NOTE_WAIT``: where no groups
    worker answers (a bare Mosquitto), ``say`` must not hang for a whole request timeout."""
    import sys

    from imcli.client import services
    from imcli.core.errors import ImcliError
    from imcli.core.request_reply import request_timeout

    try:
        with services.Connection(identity, "say", timeout=min(NOTE_WAIT, request_timeout())) as connection:
            reply = services.ask_group(connection, "members", room)
    except ImcliError:
        return  # no such group (or a private one of others), or no group worker
    if getattr(reply, "group", None) is not None:
        print(f"note: {room} is a room; #{room} is a group: imcli group say {room} TEXT", file=sys.stderr)
