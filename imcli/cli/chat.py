"""The commands people live in: ``imcli chat`` (interactive) and ``imcli history``."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from imcli.cli.common import (
    HostOpt,
    JsonOpt,
    PortOpt,
    console,
    err_console,
    parse_since,
)
from imcli.client.identity import heartbeat_seconds, max_payload_bytes, signed_in


def history(
    where: Annotated[
        str | None,
        typer.Argument(help="A room (lobby), a person (@bob) or a group (#team) [default: everything you can read]"),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many messages, newest last (1-1000).")] = 50,
    since: Annotated[
        str | None, typer.Option(help="Only messages since: 30m, 2h, 3d, or a date/time (2026-11-23 09:30).")
    ] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Past messages of a room, a direct conversation or a group, from the archive."""
    from imcli.cli.render import print_line, received_line
    from imcli.client import services

    target = services.Conversation.parse(where) if where is not None else None
    start = parse_since(since, time.time()) if since is not None else None
    identity = signed_in(host, port)
    page = services.history(identity, target, limit, since=start)
    if json_:
        for item in page.messages:
            sys.stdout.write(item.to_json() + "\n")
        return
    out = console()
    if not page.messages:
        out.print(f"no messages{f' in {target}' if target else ''}{' since then' if since else ''}")
        if target is not None and target.kind == "room":  # `history alice` reads a room of that name
            err_console().print(f"(a direct conversation is @{target.name}, a group #{target.name})", style="dim")
        return
    if page.more:  # a full page: pages the archive cut to the broker's payload limit were followed
        err_console().print("(older messages left out: raise --limit, or use --since)", style="dim")
    for item in page.messages:
        print_line(out, received_line(item, identity.account))


def chat(host: HostOpt = None, port: PortOpt = None) -> None:
    """Talk interactively: rooms, direct messages and groups in one window (/help inside).

    Messages sent to you while you were away arrive when you come back, marked missed,
    each once; the archive fills in what the broker could not keep.
    """
    from imcli.cli.chat_ui import run_chat

    run_chat(signed_in(host, port), heartbeat_seconds(), max_payload_bytes())
