"""imcli: chat over an MQTT broker that enforces who may say what.

This module is the Typer app: it assembles every command and holds the ones about talking
(say, dm, listen, who, rename). Commands parse their options, call a service
(``imcli.client.services``, ``imcli.serve.host``, ``imcli.broker.accounts``) and render.
Heavy modules (paho, pydantic, amqtt, Rich) are imported inside the commands that use
them, so ``imcli say`` starts fast. The other commands have their own modules:
``imcli.cli.serve`` (serve), ``imcli.cli.account`` (register, login, logout, whoami),
``imcli.cli.social`` (group, friend, config), ``imcli.cli.admin``, ``imcli.cli.chat``
(chat, history), ``imcli.cli.workers`` (workers, presence: the workers alone). They never
import this module; it registers their commands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from imcli.cli.account import devices_app, login, logout, passwd, register, switch, token_app, whoami
from imcli.cli.admin import admin_app
from imcli.cli.chat import chat, history
from imcli.cli.common import (
    CliGroup,
    HostOpt,
    JsonOpt,
    PortOpt,
    console,
    not_answered,
)
from imcli.cli.files import files, get, rm, send
from imcli.cli.moments import moments_app
from imcli.cli.profile import profile_app
from imcli.cli.serve import serve
from imcli.cli.social import config_app, friend_app, group_app
from imcli.cli.workers import presence, workers
from imcli.client.identity import (
    heartbeat_seconds,
    listen_session,
    max_payload_bytes,
    message_text,
    signed_in,
)
from imcli.core.topics import device_client_id

app = typer.Typer(
    cls=CliGroup,
    help=__doc__.split("\n\n")[0] if __doc__ else None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help as plain text: "[default: lobby]" in a help string is text, not Rich markup
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version

        typer.echo(f"imcli {version('imcli')}")
        raise typer.Exit


app.add_typer(admin_app, name="admin")
app.add_typer(group_app, name="group")
app.add_typer(friend_app, name="friend")
app.add_typer(config_app, name="config")
app.add_typer(profile_app, name="profile")
app.add_typer(moments_app, name="moments")
app.add_typer(devices_app, name="devices")
app.add_typer(token_app, name="token")
# registered in the order `imcli --help` lists them
app.command()(chat)
app.command()(history)
app.command()(serve)  # imcli/cli/serve.py
app.command()(register)  # imcli/cli/account.py
app.command()(login)
app.command()(logout)
app.command()(whoami)
app.command()(switch)
app.command()(passwd)


@app.callback()
def main_options(
    account: Annotated[
        str | None,
        typer.Option("--account", envvar="IMCLI_ACCOUNT", help="Act as this logged-in account (default: current)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print imcli's version and exit.")
    ] = False,
) -> None:
    """imcli: chat over an MQTT broker that enforces who may say what."""
    from imcli.client import config

    config.choose_account(account)  # for this invocation only (tests run many in one process)


# ---------------------------------------------------------------- talking


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    room: Annotated[str | None, typer.Option("--room", "-r", help="Room to speak in [default: lobby].")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a message to a room (default: lobby)."""
    from imcli.cli.say import SayArgs, run_say  # the plain form never reaches Typer: main() sends it (issue 7)

    typer.echo(f"sent to {run_say(SayArgs(text, room, host, port))}")


@app.command()
def dm(
    user: Annotated[str, typer.Argument(help="Recipient: account or display name (张三, @alice).")],
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a direct message that only USER can read."""
    from imcli.client import services

    identity = signed_in(host, port)
    message = services.prepare_text(message_text(text), max_payload_bytes())
    from imcli.core.names import label
    from imcli.core.text import safe

    to = services.send_dm(identity, user, message)
    typer.echo(f"sent to {safe(label(to.account, to.nick))}")  # plain, as in say


@app.command()
def listen(
    room: Annotated[
        list[str] | None, typer.Option("--room", "-r", help="Only these rooms (repeatable) [default: all]")
    ] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Print room, direct and group messages, notices and events as they arrive, until Ctrl-C."""
    from rich.console import Console

    from imcli.cli.chat_state import SEEN_KEPT, device_session, listen_state_path, load_state, save_state
    from imcli.cli.render import print_line, received_line
    from imcli.client.listener import Listener, RecentIds

    identity = signed_in(host, port)
    out = console()
    err = Console(stderr=True, highlight=False)
    heartbeat = heartbeat_seconds()

    def connection(up: bool) -> None:
        err.print("reconnected" if up else "connection lost, reconnecting…", style="dim")

    import signal

    # a persistent session per device and room selection: the broker keeps what arrives while away
    session = listen_session(identity.device, room)
    # SIGTERM (service managers, kill) ends the loop like Ctrl-C, so the device says offline; one that
    # arrives while connecting (the status may be out already) exits at once and the Last Will says it
    closing: list[Callable[[], None]] = []
    signal.signal(signal.SIGTERM, lambda *_: closing[0]() if closing else sys.exit(0))
    # what it saw and when it was last connected: if the broker lost the session (a restart), the
    # archive gives back what arrived since, once (imcli.client.listener)
    client_id = device_client_id(identity.account, session)
    state_file = listen_state_path(client_id)
    try:
        with device_session(client_id) as own:
            state = load_state(identity.account, state_file) if own else None
            seen = RecentIds(initial=state.seen) if state else None
            try:
                with Listener(
                    identity,
                    room or None,
                    on_connection=connection,
                    heartbeat=heartbeat,
                    session=session if own else None,
                    seen=seen,
                    since=state.last_seen if state else None,
                ) as listener:
                    closing.append(listener.close)
                    if not json_:
                        err.print(
                            f"listening as {identity.account} on {identity.address} (Ctrl-C to stop)", style="dim"
                        )
                    for item in listener:
                        if json_:
                            sys.stdout.write(item.to_json() + "\n")
                            sys.stdout.flush()
                        else:
                            print_line(out, received_line(item, identity.account))
            finally:
                if state is not None and closing:
                    state.last_seen = listener.last_contact
                    state.seen = listener.seen.newest(SEEN_KEPT)
                    save_state(identity.account, state, state_file)
    except KeyboardInterrupt:
        pass


@app.command()
def who(
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Include offline users with when they were last seen.")
    ] = False,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Who is online (nickname, account, since when, on which devices)."""
    from imcli.client import services

    identity = signed_in(host, port)
    users = services.who(identity, include_offline=all_)
    profiles = services.profiles_of(identity, [u.account for u in users])
    if profiles is None:
        not_answered("signatures")
    signatures = {a: p.signature for a, p in (profiles or {}).items()}
    if json_:
        print(json.dumps([{**u.model_dump(), "signature": signatures.get(u.account, "")} for u in users]))
        return
    from rich.table import Table

    from imcli.cli.render import ago, name_style, shown

    if not users:
        console().print("nobody is online" if not all_ else "no users yet")
        return
    table = Table("nick", "account", "state" if all_ else "since", *(["since"] if all_ else []), "devices", box=None)
    if any(signatures.values()):
        table.add_column("signature")
    for u in users:
        state = [u.state] if all_ else []
        nick, account = f"[{name_style(u.account)}]{shown(u.nick)}[/]", shown(u.account)
        since = ago(u.since) if u.since > 0 else "never online"
        signature = [shown(signatures.get(u.account, ""))] if any(signatures.values()) else []
        devices = ", ".join(shown(d) for d in u.device_names) if u.device_names else str(u.devices)
        table.add_row(nick, account, *(shown(s) for s in state), since, devices, *signature)
    console().print(table)


@app.command()
def rename(
    nick: Annotated[
        str,
        typer.Argument(help="New display name, in any script (张三, José): letters, digits, '_', '-', '.', spaces."),
    ],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change your display name (unique among display and account names; case, width and
    look-alike letters do not make a name different)."""
    from imcli.client import services

    new = services.rename(signed_in(host, port), nick)
    console().print(f"you are now known as {new}")


app.command()(send)  # imcli/cli/files.py: files and images (issue 16)
app.command()(files)
app.command()(rm)
app.command()(get)
app.command()(presence)  # imcli/cli/workers.py: the workers against an external broker
app.command()(workers)
