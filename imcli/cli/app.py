"""imcli: chat over an MQTT broker that enforces who may say what.

Commands parse their options, call a service (``imcli.client.services``, ``imcli.serve.host``,
``imcli.broker.accounts``) and render. Heavy modules (paho, pydantic, amqtt, Rich) are
imported inside the commands that use them, so ``imcli say`` starts fast. The nouns
have their own modules: ``imcli.cli.social`` (group, friend, config), ``imcli.cli.admin``,
``imcli.cli.chat`` (chat, history), ``imcli.cli.workers`` (the workers alone).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from imcli.cli.admin import admin_app
from imcli.cli.chat import chat, history
from imcli.cli.common import (
    CaOpt,
    CliGroup,
    DataDirOpt,
    HostOpt,
    JsonOpt,
    PasswordStdin,
    PortOpt,
    TlsOpt,
    account_store,
    ask_password,
    check_tls_options,
    console,
    err_console,
)
from imcli.cli.social import config_app, friend_app, group_app
from imcli.cli.workers import workers
from imcli.client.identity import (
    broker_address,
    heartbeat_seconds,
    listen_session,
    max_payload_bytes,
    message_text,
    signed_in,
)
from imcli.core.errors import InvalidInput
from imcli.core.rules import PRESENCE_ACCOUNT
from imcli.core.topics import DEFAULT_MAX_PAYLOAD, device_client_id

app = typer.Typer(
    cls=CliGroup,
    help=__doc__.split("\n\n")[0] if __doc__ else None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(admin_app, name="admin")
app.add_typer(group_app, name="group")
app.add_typer(friend_app, name="friend")
app.add_typer(config_app, name="config")
app.command()(chat)
app.command()(history)


# ---------------------------------------------------------------- serve


@app.command()
def serve(
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 1883,
    data_dir: DataDirOpt = None,
    registration: Annotated[
        str,
        typer.Option(
            help="'open': anyone may register; 'invite': with a code from 'imcli admin invite'; "
            "'closed': only 'imcli admin user add'."
        ),
    ] = "open",
    registrations_per_hour: Annotated[
        int, typer.Option(help="Accounts one address may register per hour (open or invite registration).")
    ] = 10,
    password_checks: Annotated[
        int, typer.Option(help="Password checks (argon2, 64 MiB each) at once; more logins wait.")
    ] = 2,
    password_queue: Annotated[
        int, typer.Option(help="Logins waiting for a password check; past it CONNACK 3 (try again).")
    ] = 128,
    max_payload: Annotated[int, typer.Option(help="Largest message payload in bytes.")] = DEFAULT_MAX_PAYLOAD,
    max_rate: Annotated[float, typer.Option(help="Messages per second per account (bursts of 3 s allowed).")] = 20.0,
    max_connections: Annotated[int, typer.Option(help="Connections per account.")] = 10,
    max_subscriptions: Annotated[int, typer.Option(help="Subscriptions per connection.")] = 100,
    max_output: Annotated[
        int,
        typer.Option(
            help="Bytes waiting for one connection that does not read before it is closed "
            "(QoS 0 messages to it are dropped past an eighth of this)."
        ),
    ] = 8 << 20,
    output_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may keep output waiting, unread, before it is closed.")
    ] = 60.0,
    max_sessions: Annotated[
        int, typer.Option(help="Persistent sessions per account (past it, the longest idle one is dropped).")
    ] = 20,
    max_statuses: Annotated[int, typer.Option(help="Retained device statuses per account.")] = 20,
    max_status_bytes: Annotated[int, typer.Option(help="Largest device status in bytes.")] = 1024,
    max_groups: Annotated[int, typer.Option(help="Groups one account may own.")] = 50,
    group_rate: Annotated[int, typer.Option(help="Groups one account may create per minute.")] = 10,
    history_days: Annotated[
        float | None, typer.Option(help="Keep archived messages this many days [default: for ever].")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate (chain): TLS on --port and --ws-port.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    ws_port: Annotated[
        int | None, typer.Option("--ws-port", help="Also serve MQTT over WebSocket here (wss with TLS; 0: any).")
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow binding beyond loopback without TLS (passwords travel in clear)."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log connections and refusals.")] = False,
) -> None:
    """Run the embedded broker (accounts, topic ACL, limits) with its presence, group and archive workers."""
    import asyncio
    import ipaddress
    import logging
    import signal

    from imcli.broker.limits import Limits
    from imcli.broker.server import BrokerSettings
    from imcli.client.config import default_data_dir
    from imcli.serve.host import ServeInfo, serve_forever

    if registration not in ("open", "invite", "closed"):
        raise InvalidInput(f"invalid --registration {registration!r}", "use 'open', 'invite' or 'closed'")
    if not 0 <= port < 65536 or (ws_port is not None and not 0 <= ws_port < 65536):
        raise InvalidInput(f"invalid port {port if not 0 <= port < 65536 else ws_port}", "use 0-65535")
    check_tls_options(tls_cert, tls_key)
    if max_payload < 256:
        raise InvalidInput(f"--max-payload {max_payload} is too small", "use at least 256 bytes")
    if (
        max_rate <= 0
        or max_connections < 1
        or max_subscriptions < 8
        or min(registrations_per_hour, password_checks) < 1
        or password_queue < 0
    ):
        raise InvalidInput(
            "limits too small",
            "--max-rate > 0, --max-connections >= 1, --max-subscriptions >= 8 (listen needs 6), "
            "--registrations-per-hour >= 1, --password-checks >= 1, --password-queue >= 0",
        )
    if history_days is not None and history_days <= 0:
        raise InvalidInput(f"invalid --history-days {history_days:g}", "give a number of days above 0")
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError as exc:
        raise InvalidInput(f"invalid --bind address {bind!r}", "give an IP address such as 127.0.0.1") from exc
    if not loopback and not allow_remote and tls_cert is None:
        raise InvalidInput(
            f"refusing to listen on {bind}: beyond this machine, passwords would travel unencrypted",
            "give --tls-cert/--tls-key, or add --allow-remote if that is what you want",
        )
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if not verbose:  # amqtt logs every refused client at WARNING and more
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    settings = BrokerSettings(
        data_dir=(data_dir or default_data_dir()).expanduser(),
        bind="127.0.0.1" if bind == "localhost" else bind,
        port=port,
        registration=registration,
        max_payload=max_payload,
        history_days=history_days,
        tls_cert=tls_cert,
        tls_key=tls_key,
        ws_port=ws_port,
        limits=Limits(
            publish_rate=max_rate,
            publish_burst=max(1, int(max_rate * 3)),
            max_subscriptions=max_subscriptions,
            max_connections=max_connections,
            **output_bound(max_output, output_timeout, max_payload),
            registrations_per_hour=registrations_per_hour,
            password_checks=password_checks,
            password_queue=password_queue,
            **account_quotas(max_sessions, max_statuses, max_status_bytes, max_groups, group_rate),
        ),
    )
    out = console()

    def banner(info: ServeInfo) -> None:
        a = info.address
        out.print(f"imcli serve: listening on {info.bind}:{a.port}" + (" (TLS)" if a.tls else ""), style="bold green")
        if info.ws_port is not None:
            out.print(f"  websocket   {'wss' if a.tls else 'ws'}://{a.host}:{info.ws_port}/")
        out.print(f"  data        {info.data_dir}")
        out.print(f"  accounts    registration {info.registration}; presence, group and archive workers running")
        tls_hint = " --tls [--ca CA.pem]" if a.tls else ""
        out.print(f"  connect     imcli register NAME --host {a.host} --port {a.port}{tls_hint}")
        out.print("  stop        Ctrl-C", style="dim")
        sys.stdout.flush()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(settings, banner, stop)

    asyncio.run(run())
    out.print("imcli serve: stopped", style="dim")


def account_quotas(sessions: int, statuses: int, status_bytes: int, groups: int, group_rate: int) -> dict[str, int]:
    """imcli serve's per-account quotas (issue 15) as ``Limits`` fields, checked."""
    if min(sessions, statuses, groups, group_rate) < 1 or status_bytes < 128:
        raise InvalidInput(
            "limits too small",
            "--max-sessions, --max-statuses, --max-groups, --group-rate >= 1, --max-status-bytes >= 128",
        )
    return {
        "max_sessions": sessions,
        "max_retained": statuses,
        "max_status": status_bytes,
        "max_groups": groups,
        "group_rate": group_rate,
    }


def output_bound(max_output: int, timeout: float, max_payload: int) -> dict[str, Any]:
    """imcli serve's bound on what one connection that does not read holds (issue 15), as ``Limits`` fields."""
    if max_output < max(1 << 16, 4 * max_payload) or timeout <= 0:
        raise InvalidInput(
            "output limits too small", "--max-output >= 64 KiB and 4 times --max-payload, --output-timeout > 0"
        )
    return {"output_drop": max_output // 8, "output_close": max_output, "output_stuck": timeout}


# ---------------------------------------------------------------- accounts


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="Account name: lowercase letters, digits, '_' or '-'.")],
    host: HostOpt = None,
    port: PortOpt = None,
    tls: TlsOpt = None,
    ca: CaOpt = None,
    password_stdin: PasswordStdin = False,
    invite: Annotated[
        str | None, typer.Option("--invite", help="Invite code (brokers run with --registration invite).")
    ] = None,
) -> None:
    """Create an account on the broker (if its registration is open, or with an invite code) and log in."""
    from imcli.broker.accounts import check_password
    from imcli.client import services
    from imcli.client.config import Profile, new_device_name, save_profile
    from imcli.core.mqtt import Credentials
    from imcli.core.wire import RESERVED_NAMES, check_name

    check_name(name)
    if name in RESERVED_NAMES:
        raise InvalidInput(f"the name {name!r} is reserved", "choose another name")
    password = check_password(ask_password(password_stdin, confirm=True))
    address = broker_address(host, port, tls=tls, ca=ca)
    services.register(address, name, password, invite=invite)
    device = new_device_name()
    services.verify_login(address, Credentials(name, password), device)
    save_profile(Profile(name, password, address.host, address.port, device, address.tls, address.ca))
    console().print(f"registered {name} on {address} and logged in")


@app.command()
def login(
    name: Annotated[str, typer.Argument(help="Your account name.")],
    host: HostOpt = None,
    port: PortOpt = None,
    tls: TlsOpt = None,
    ca: CaOpt = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Check your password with the broker and remember this login (file mode 0600)."""
    from imcli.client import services
    from imcli.client.config import Profile, new_device_name, save_profile
    from imcli.core.mqtt import Credentials
    from imcli.core.wire import check_name

    check_name(name)
    password = ask_password(password_stdin, confirm=False)
    address = broker_address(host, port, tls=tls, ca=ca)
    device = new_device_name()
    services.verify_login(address, Credentials(name, password), device)
    save_profile(Profile(name, password, address.host, address.port, device, address.tls, address.ca))
    console().print(f"logged in as {name} on {address}")


@app.command()
def logout() -> None:
    """Forget the stored login, and ask the broker to drop what it keeps for this device."""
    from imcli.client.config import delete_profile

    profile = delete_profile()
    console().print(f"logged out {profile.account}")
    from imcli.client import services

    if not services.drop_device_sessions(profile.address, profile.credentials, profile.device):
        err_console().print(
            "the broker was not reachable: it keeps this device's offline messages until it expires them", style="dim"
        )


@app.command()
def whoami(json_: JsonOpt = False) -> None:
    """Show the stored login (account, broker, device)."""
    from imcli.client.config import load_profile

    p = load_profile()
    if json_:
        print(json.dumps({"account": p.account, "host": p.host, "port": p.port, "device": p.device}))
    else:
        console().print(f"{p.account} on {p.host}:{p.port} (device {p.device})")


# ---------------------------------------------------------------- chat


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
    user: Annotated[str, typer.Argument(help="Recipient: account name (or nickname).")],
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a direct message that only USER can read."""
    from imcli.client import services

    identity = signed_in(host, port)
    message = services.prepare_text(message_text(text), max_payload_bytes())
    to = services.send_dm(identity, user, message)
    typer.echo(f"sent to @{to}")  # plain, as in say


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
    """Who is online (nickname, account, since when, how many devices)."""
    from imcli.client import services

    users = services.who(signed_in(host, port), include_offline=all_)
    if json_:
        print(json.dumps([u.model_dump() for u in users]))
        return
    from rich.table import Table

    from imcli.cli.render import ago, name_style, shown

    if not users:
        console().print("nobody is online" if not all_ else "no users yet")
        return
    table = Table("nick", "account", "state" if all_ else "since", *(["since"] if all_ else []), "devices", box=None)
    for u in users:
        state = [u.state] if all_ else []
        nick, account = f"[{name_style(u.account)}]{shown(u.nick)}[/]", shown(u.account)
        table.add_row(nick, account, *(shown(s) for s in state), ago(u.since), str(u.devices))
    console().print(table)


@app.command()
def rename(
    nick: Annotated[str, typer.Argument(help="New nickname: letters, digits, '_', '-' or '.'.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change your nickname (unique, case-insensitively, among nicknames and account names)."""
    from imcli.client import services

    new = services.rename(signed_in(host, port), nick)
    console().print(f"you are now known as {new}")


@app.command()
def presence(
    host: HostOpt = None,
    port: PortOpt = None,
    account: Annotated[str, typer.Option(help="The worker's service account.")] = PRESENCE_ACCOUNT,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Embedded broker's data dir, to know every account.")
    ] = None,
    accounts_file: Annotated[
        Path | None, typer.Option(help="Mosquitto password file, to know every account (as imcli workers).")
    ] = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Run the presence worker alone against any broker (imcli serve already runs one)."""
    import signal
    import threading

    from imcli.core.mqtt import Credentials
    from imcli.core.service import AccountDirectory, PasswordFileDirectory
    from imcli.presence.worker import PresenceWorker

    if data_dir is not None and accounts_file is not None:
        raise InvalidInput("--data-dir and --accounts-file both name the accounts", "give one of them")
    directory: AccountDirectory | None = None
    if data_dir is not None:
        from imcli.serve.workers import StoreDirectory

        directory = StoreDirectory(account_store(data_dir))
    elif accounts_file is not None:
        directory = PasswordFileDirectory(accounts_file.expanduser())
    password = ask_password(password_stdin, confirm=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    address = broker_address(host, port)
    with PresenceWorker(address, Credentials(account, password), directory, device="standalone"):
        console().print(f"presence worker running as {account} on {address} (Ctrl-C to stop)")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


app.command()(workers)  # imcli/cli/workers.py: the three workers against an external broker
