"""imcli: chat over an MQTT broker that enforces who may say what.

Commands parse their options, call a service (``imcli.chat``, ``imcli.embedded``,
``broker.accounts``) and render. Heavy modules (paho, pydantic, amqtt, Rich) are
imported inside the commands that use them, so ``imcli say`` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from imcli.errors import ImcliError, InvalidInput

if TYPE_CHECKING:
    from imcli.chat import Identity
    from imcli.config import Profile
    from imcli.mqtt import BrokerAddress


def print_error(exc: ImcliError) -> None:
    """The one way users see an expected failure: ``Error: <what> (<what to do>)`` on stderr."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False, soft_wrap=True).print(Text("Error: ", style="bold red") + Text(str(exc)))


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ImcliError as exc:
            print_error(exc)
            raise typer.Exit(1) from exc


app = typer.Typer(
    cls=_Group,
    help=__doc__.split("\n\n")[0] if __doc__ else None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
admin_app = typer.Typer(cls=_Group, help="Operator commands (run on the broker's machine).", no_args_is_help=True)
user_app = typer.Typer(cls=_Group, help="Accounts in the broker's data directory.", no_args_is_help=True)
admin_app.add_typer(user_app, name="user")
app.add_typer(admin_app, name="admin")
group_app = typer.Typer(cls=_Group, help="Group chat; membership is enforced by the broker.", no_args_is_help=True)
app.add_typer(group_app, name="group")
friend_app = typer.Typer(cls=_Group, help="Friends and friend requests.", no_args_is_help=True)
app.add_typer(friend_app, name="friend")
config_app = typer.Typer(cls=_Group, help="Your settings, kept by the broker's workers.", no_args_is_help=True)
app.add_typer(config_app, name="config")

HostOpt = Annotated[
    str | None,
    typer.Option("--host", envvar="IMCLI_HOST", help="Broker host [default: profile's, else 127.0.0.1]"),
]
PortOpt = Annotated[
    int | None,
    typer.Option("--port", envvar="IMCLI_PORT", help="Broker port [default: profile's, else 1883]"),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="IMCLI_DATA_DIR", help="Broker data directory [default: per-user data dir]"),
]


def main() -> NoReturn:
    sys.exit(app())


# ---------------------------------------------------------------- helpers


def _out() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _address(host: str | None, port: int | None, profile: Profile | None = None) -> BrokerAddress:
    from imcli.mqtt import BrokerAddress

    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"invalid port {port}", "use 1-65535")
    return BrokerAddress(
        host or (profile.host if profile else "127.0.0.1"),
        port if port is not None else (profile.port if profile else 1883),
    )


def _identity(host: str | None, port: int | None) -> Identity:
    from imcli.chat import Identity
    from imcli.config import load_profile

    profile = load_profile()
    return Identity(_address(host, port, profile), profile.credentials, profile.device)


def _password(from_stdin: bool, *, confirm: bool) -> str:
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


def _text(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _heartbeat() -> float:
    from imcli.wire import DEFAULT_HEARTBEAT

    raw = os.environ.get("IMCLI_HEARTBEAT")
    if raw is None:
        return DEFAULT_HEARTBEAT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 1 <= value <= 3600:
        raise InvalidInput(f"invalid IMCLI_HEARTBEAT {raw!r}", "give seconds between 1 and 3600")
    return value


def _max_payload() -> int:
    from imcli.wire import DEFAULT_MAX_PAYLOAD

    raw = os.environ.get("IMCLI_MAX_PAYLOAD")
    if raw is None:
        return DEFAULT_MAX_PAYLOAD
    if not raw.isdigit() or int(raw) < 64:
        raise InvalidInput(f"invalid IMCLI_MAX_PAYLOAD {raw!r}", "give a number of bytes, at least 64")
    return int(raw)


# ---------------------------------------------------------------- serve


@app.command()
def serve(
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 1883,
    data_dir: DataDirOpt = None,
    registration: Annotated[
        str, typer.Option(help="'open': anyone may register; 'closed': only 'imcli admin user add'.")
    ] = "open",
    max_payload: Annotated[int, typer.Option(help="Largest message payload in bytes.")] = 16 * 1024,
    max_rate: Annotated[float, typer.Option(help="Messages per second per account (bursts of 3 s allowed).")] = 20.0,
    max_connections: Annotated[int, typer.Option(help="Connections per account.")] = 10,
    max_subscriptions: Annotated[int, typer.Option(help="Subscriptions per connection.")] = 100,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow binding beyond loopback (passwords travel in clear)."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log connections and refusals.")] = False,
) -> None:
    """Run the embedded broker (accounts, topic ACL, limits) and the presence worker."""
    import asyncio
    import ipaddress
    import logging
    import signal

    from broker.limits import Limits
    from broker.server import BrokerSettings
    from imcli.config import default_data_dir
    from imcli.embedded import ServeInfo, serve_forever

    if registration not in ("open", "closed"):
        raise InvalidInput(f"invalid --registration {registration!r}", "use 'open' or 'closed'")
    if not 0 <= port < 65536:
        raise InvalidInput(f"invalid port {port}", "use 0-65535")
    if max_payload < 256:
        raise InvalidInput(f"--max-payload {max_payload} is too small", "use at least 256 bytes")
    if max_rate <= 0 or max_connections < 1 or max_subscriptions < 8:
        raise InvalidInput(
            "limits too small", "--max-rate > 0, --max-connections >= 1, --max-subscriptions >= 8 (listen needs 6)"
        )
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError as exc:
        raise InvalidInput(f"invalid --bind address {bind!r}", "give an IP address such as 127.0.0.1") from exc
    if not loopback and not allow_remote:
        raise InvalidInput(
            f"refusing to listen on {bind}: beyond this machine, passwords would travel unencrypted",
            "add --allow-remote if that is what you want",
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
        limits=Limits(
            publish_rate=max_rate,
            publish_burst=max(1, int(max_rate * 3)),
            max_subscriptions=max_subscriptions,
            max_connections=max_connections,
        ),
    )
    out = _out()

    def banner(info: ServeInfo) -> None:
        a = info.address
        out.print(f"imcli serve: listening on {info.bind}:{a.port}", style="bold green")
        out.print(f"  data        {info.data_dir}")
        out.print(f"  accounts    registration {info.registration}; presence worker running")
        out.print(f"  connect     imcli register NAME --host {a.host} --port {a.port}")
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


# ---------------------------------------------------------------- accounts


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="Account name: lowercase letters, digits, '_' or '-'.")],
    host: HostOpt = None,
    port: PortOpt = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Create an account on the broker (if its registration is open) and log in."""
    from broker.accounts import check_password
    from imcli import chat
    from imcli.config import Profile, new_device_name, save_profile
    from imcli.mqtt import Credentials
    from imcli.wire import RESERVED_NAMES, check_name

    check_name(name)
    if name in RESERVED_NAMES:
        raise InvalidInput(f"the name {name!r} is reserved", "choose another name")
    password = check_password(_password(password_stdin, confirm=True))
    address = _address(host, port)
    chat.register(address, name, password)
    device = new_device_name()
    chat.verify_login(address, Credentials(name, password), device)
    save_profile(Profile(name, password, address.host, address.port, device))
    _out().print(f"registered {name} on {address} and logged in")


@app.command()
def login(
    name: Annotated[str, typer.Argument(help="Your account name.")],
    host: HostOpt = None,
    port: PortOpt = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Check your password with the broker and remember this login (file mode 0600)."""
    from imcli import chat
    from imcli.config import Profile, new_device_name, save_profile
    from imcli.mqtt import Credentials
    from imcli.wire import check_name

    check_name(name)
    password = _password(password_stdin, confirm=False)
    address = _address(host, port)
    device = new_device_name()
    chat.verify_login(address, Credentials(name, password), device)
    save_profile(Profile(name, password, address.host, address.port, device))
    _out().print(f"logged in as {name} on {address}")


@app.command()
def logout() -> None:
    """Forget the stored login."""
    from imcli.config import delete_profile

    profile = delete_profile()
    _out().print(f"logged out {profile.account}")


@app.command()
def whoami(json_: JsonOpt = False) -> None:
    """Show the stored login (account, broker, device)."""
    from imcli.config import load_profile

    p = load_profile()
    if json_:
        print(json.dumps({"account": p.account, "host": p.host, "port": p.port, "device": p.device}))
    else:
        _out().print(f"{p.account} on {p.host}:{p.port} (device {p.device})")


# ---------------------------------------------------------------- chat


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    room: Annotated[str | None, typer.Option("--room", "-r", help="Room to speak in [default: lobby].")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a message to a room (default: lobby)."""
    from imcli import chat
    from imcli.wire import DEFAULT_ROOM, check_name

    room = room or DEFAULT_ROOM
    check_name(room, "room name")
    identity = _identity(host, port)
    message = chat.prepare_text(_text(text), _max_payload())
    chat.say(identity, room, message)
    _out().print(f"sent to #{room}")


@app.command()
def dm(
    user: Annotated[str, typer.Argument(help="Recipient: account name (or nickname).")],
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a direct message that only USER can read."""
    from imcli import chat

    identity = _identity(host, port)
    message = chat.prepare_text(_text(text), _max_payload())
    to = chat.send_dm(identity, user, message)
    _out().print(f"sent to @{to}")


@app.command()
def listen(
    room: Annotated[
        list[str] | None, typer.Option("--room", "-r", help="Only these rooms (repeatable) [default: all]")
    ] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Print room and direct messages as they arrive, until Ctrl-C."""
    from rich.console import Console

    from imcli.chat import Listener
    from imcli.render import received_line

    identity = _identity(host, port)
    out = _out()
    err = Console(stderr=True, highlight=False)
    heartbeat = _heartbeat()

    def connection(up: bool) -> None:
        err.print("reconnected" if up else "connection lost, reconnecting…", style="dim")

    import signal

    try:
        with Listener(identity, room or None, on_connection=connection, heartbeat=heartbeat) as listener:
            # SIGTERM (service managers, kill) ends the loop like Ctrl-C, so the device says offline
            signal.signal(signal.SIGTERM, lambda *_: listener.close())
            if not json_:
                err.print(f"listening as {identity.account} on {identity.address} (Ctrl-C to stop)", style="dim")
            for item in listener:
                if json_:
                    sys.stdout.write(item.to_json() + "\n")
                    sys.stdout.flush()
                else:
                    out.print(received_line(item, identity.account))
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
    from imcli import chat

    users = chat.who(_identity(host, port), include_offline=all_)
    if json_:
        print(json.dumps([u.model_dump() for u in users]))
        return
    from rich.markup import escape
    from rich.table import Table

    from imcli.render import ago, name_style

    if not users:
        _out().print("nobody is online" if not all_ else "no users yet")
        return
    table = Table("nick", "account", "state" if all_ else "since", *(["since"] if all_ else []), "devices", box=None)
    for u in users:
        state = [u.state] if all_ else []
        table.add_row(f"[{name_style(u.account)}]{escape(u.nick)}[/]", u.account, *state, ago(u.since), str(u.devices))
    _out().print(table)


@app.command()
def rename(
    nick: Annotated[str, typer.Argument(help="New nickname: letters, digits, '_', '-' or '.'.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change your nickname (unique, case-insensitively, among nicknames and account names)."""
    from imcli import chat

    new = chat.rename(_identity(host, port), nick)
    _out().print(f"you are now known as {new}")


@app.command()
def presence(
    host: HostOpt = None,
    port: PortOpt = None,
    account: Annotated[str, typer.Option(help="The worker's service account.")] = "presence",
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Embedded broker's data dir, to know every account.")
    ] = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Run the presence worker alone against any broker (imcli serve already runs one)."""
    import signal
    import threading

    from imcli.mqtt import Credentials
    from presence.worker import PresenceWorker

    directory = None
    if data_dir is not None:
        from imcli.embedded import StoreDirectory

        directory = StoreDirectory(_store(data_dir))
    password = _password(password_stdin, confirm=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    address = _address(host, port)
    with PresenceWorker(address, Credentials(account, password), directory, device="standalone"):
        _out().print(f"presence worker running as {account} on {address} (Ctrl-C to stop)")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


# ---------------------------------------------------------------- groups

GroupArg = Annotated[str, typer.Argument(help="Group name.")]


def _group_line(info: Any) -> str:
    kind = "private" if info.private else "public"
    return (
        f"&{info.name}  {kind}, {len(info.members)} member{'s' if len(info.members) != 1 else ''}, owner {info.owner}"
    )


@group_app.command("create")
def group_create(
    name: GroupArg,
    private: Annotated[bool, typer.Option("--private", help="Only invited people can join or see it.")] = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Create a group; you become its owner."""
    from imcli import chat

    chat.group_request(_identity(host, port), "create", name, private=private)
    _out().print(f"created &{name} ({'private' if private else 'public'})")


@group_app.command("join")
def group_join(name: GroupArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Join a public group."""
    from imcli import chat

    chat.group_request(_identity(host, port), "join", name)
    _out().print(f"joined &{name}")


@group_app.command("leave")
def group_leave(name: GroupArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Leave a group (the last one out deletes it)."""
    from imcli import chat

    reply = chat.group_request(_identity(host, port), "leave", name)
    gone = getattr(reply, "group", True) is None
    _out().print(f"left &{name}" + (" (it had no other members and is gone)" if gone else ""))


@group_app.command("invite")
def group_invite(name: GroupArg, user: Annotated[str, typer.Argument(help="Account to add.")],
                 host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Add someone to a group (owner and admins)."""
    from imcli import chat

    chat.group_request(_identity(host, port), "invite", name, user=user.removeprefix("@"))
    _out().print(f"added {user} to &{name}")


@group_app.command("kick")
def group_kick(name: GroupArg, user: Annotated[str, typer.Argument(help="Member to remove.")],
               host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Remove a member (owner and admins); they stop receiving at once."""
    from imcli import chat

    chat.group_request(_identity(host, port), "kick", name, user=user.removeprefix("@"))
    _out().print(f"removed {user} from &{name}")


@group_app.command("promote")
def group_promote(name: GroupArg, user: Annotated[str, typer.Argument(help="Member to make an admin.")],
                  host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Make a member an admin (owner only): admins may invite and kick."""
    from imcli import chat

    chat.group_request(_identity(host, port), "promote", name, user=user.removeprefix("@"))
    _out().print(f"{user} is now an admin of &{name}")


@group_app.command("list")
def group_list(json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Groups you are in, and public groups you can join."""
    from imcli import chat
    from imcli.wire import GroupList

    reply = chat.group_request(_identity(host, port), "list")
    assert isinstance(reply, GroupList)
    if json_:
        print(
            json.dumps({"mine": [g.model_dump() for g in reply.mine], "public": [g.model_dump() for g in reply.public]})
        )
        return
    out = _out()
    out.print("your groups:" if reply.mine else "you are in no group")
    for info in reply.mine:
        out.print("  " + _group_line(info))
    if reply.public:
        out.print("public groups you can join:")
        for info in reply.public:
            out.print("  " + _group_line(info))


@group_app.command("members")
def group_members(name: GroupArg, json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Members of a group (yours, or a public one)."""
    from imcli import chat
    from imcli.errors import NotFound
    from imcli.wire import GroupReply

    reply = chat.group_request(_identity(host, port), "members", name)
    if not isinstance(reply, GroupReply) or reply.group is None:
        raise NotFound(f"no group &{name}")
    info = reply.group
    if json_:
        print(info.model_dump_json())
        return
    out = _out()
    out.print(_group_line(info))
    for member in info.members:
        role = "owner" if member == info.owner else "admin" if member in info.admins else ""
        out.print(f"  {member}" + (f"  ({role})" if role else ""))


@group_app.command("say")
def group_say(
    name: GroupArg,
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a message to a group you are a member of."""
    from imcli import chat

    identity = _identity(host, port)
    message = chat.prepare_text(_text(text), _max_payload())
    chat.group_say(identity, name, message)
    _out().print(f"sent to &{name}")


# ---------------------------------------------------------------- friends

UserArg = Annotated[str, typer.Argument(help="Account name.")]


def _friend(op: str, user: str | None, host: str | None, port: int | None, done: str) -> None:
    from imcli import chat

    chat.friend_request(_identity(host, port), op, user)  # type: ignore[arg-type]
    _out().print(done)


@friend_app.command("add")
def friend_add(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Send a friend request (it waits for USER even while they are offline)."""
    _friend("add", user, host, port, f"asked {user} to be your friend")


@friend_app.command("accept")
def friend_accept(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Accept a friend request."""
    _friend("accept", user, host, port, f"you and {user} are friends")


@friend_app.command("decline")
def friend_decline(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Decline a friend request."""
    _friend("decline", user, host, port, f"declined {user}'s request")


@friend_app.command("remove")
def friend_remove(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Remove a friend (on both sides)."""
    _friend("remove", user, host, port, f"removed {user} from your friends")


@friend_app.command("list")
def friend_list(json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your friends with their presence, and pending requests."""
    from imcli import chat
    from imcli.errors import RequestTimeout

    identity = _identity(host, port)
    record = chat.friend_request(identity, "list")
    try:
        presence = {u.account: u for u in chat.who(identity, include_offline=True)}
    except RequestTimeout:
        presence = {}  # no presence worker: the list is still worth showing
    if json_:
        rows = [{"account": f, "state": presence[f].state if f in presence else "unknown"} for f in record.friends]
        print(json.dumps({"friends": rows, "incoming": record.incoming, "outgoing": record.outgoing,
                          "dm_policy": record.dm_policy}))  # fmt: skip
        return
    from imcli.render import ago

    out = _out()
    out.print("friends:" if record.friends else "no friends yet")
    for f in record.friends:
        p = presence.get(f)
        out.print(f"  {f}  " + (f"{p.state} since {ago(p.since)}" if p else "presence unknown"))
    for asker in record.incoming:
        out.print(f"  {asker} wants to be your friend (imcli friend accept {asker})")
    for asked in record.outgoing:
        out.print(f"  waiting for {asked} to answer")
    out.print(f"direct messages from: {'friends only' if record.dm_policy == 'friends' else 'anyone'}", style="dim")


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="Setting: dm-policy.")],
    value: Annotated[str, typer.Argument(help="dm-policy: 'anyone' or 'friends'.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change a setting: 'dm-policy friends' lets only friends send you direct messages."""
    from imcli import chat

    if key != "dm-policy":
        raise InvalidInput(f"unknown setting {key!r}", "settings: dm-policy")
    if value not in ("anyone", "friends"):
        raise InvalidInput(f"invalid dm-policy {value!r}", "use 'anyone' or 'friends'")
    chat.friend_request(_identity(host, port), "policy", policy=value)  # type: ignore[arg-type]
    _out().print(f"dm-policy is now {value}")


# ---------------------------------------------------------------- admin


def _store(data_dir: Path | None) -> Any:
    from broker.accounts import AccountStore
    from imcli.config import default_data_dir

    return AccountStore((data_dir or default_data_dir()).expanduser())


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDirOpt = None,
    service: Annotated[bool, typer.Option("--service", help="A worker's service account.")] = False,
    password_stdin: PasswordStdin = False,
) -> None:
    """Create an account directly in the data directory (works with registration closed)."""
    from broker.accounts import Role, check_password
    from imcli.wire import check_name

    check_name(name)
    password = check_password(_password(password_stdin, confirm=True))
    _store(data_dir).add(name, password, Role.SERVICE if service else Role.USER, allow_reserved=service)
    _out().print(f"added {'service account' if service else 'user'} {name}")


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Delete an account (its next connection is refused)."""
    _store(data_dir).remove(name)
    _out().print(f"removed {name}")


@user_app.command("list")
def user_list(data_dir: DataDirOpt = None, json_: JsonOpt = False) -> None:
    """List accounts with their role and creation time."""
    import time

    accounts = _store(data_dir).list_accounts()
    if json_:
        print(json.dumps([{"name": a.name, "role": a.role.value, "created": a.created} for a in accounts]))
        return
    from rich.table import Table

    table = Table("account", "role", "created", box=None)
    for a in accounts:
        table.add_row(a.name, a.role.value, time.strftime("%Y-%m-%d %H:%M", time.localtime(a.created)))
    _out().print(table if accounts else "no accounts")
