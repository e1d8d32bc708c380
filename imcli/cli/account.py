"""The account commands: ``imcli register``, ``login``, ``logout``, ``whoami``, ``switch``,
``passwd``, and the ``devices`` and ``token`` sub-apps (issue 17). The stored logins (file
mode 0600, a device credential each, never the password) are in :mod:`imcli.client.config`;
the requests about devices in :mod:`imcli.client.devices`."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from imcli.cli.common import (
    CaOpt,
    CliGroup,
    HostOpt,
    JsonOpt,
    PasswordStdin,
    PortOpt,
    TlsOpt,
    ask_new_password,
    ask_password,
    console,
    err_console,
    sub_app,
)
from imcli.client.identity import broker_address
from imcli.core.errors import InvalidInput
from imcli.core.text import quoted

if TYPE_CHECKING:
    from imcli.core.mqtt import BrokerAddress

KEPT_NOTE = "this broker issues no device credentials (Mosquitto, NATS): the password is kept in {path} (mode 0600)"


def _remember(name: str, password: str, address: BrokerAddress) -> None:
    """Trade the password for this device's credential and remember the login (the current one)."""
    from imcli.client.config import Profile, new_device_name, save_profile
    from imcli.client.devices import trade_password

    device = new_device_name()
    traded = trade_password(address, name, password, device)
    path = save_profile(
        Profile(
            name,
            traded.credential,
            address.hosts,
            address.port,
            device,
            address.tls,
            address.ca,
            password_kept=traded.password_kept,
        )
    )
    if traded.password_kept:
        from imcli.cli.render import shown

        err_console().print(KEPT_NOTE.format(path=shown(str(path))), style="yellow")  # IMCLI_CONFIG_DIR: any bytes


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
    from imcli.core.wire import RESERVED_NAMES, check_name

    check_name(name)
    if name in RESERVED_NAMES:
        raise InvalidInput(f"the name {quoted(name)} is reserved", "choose another name")
    password = check_password(ask_password(password_stdin, confirm=True))
    address = broker_address(host, port, tls=tls, ca=ca)
    services.register(address, name, password, invite=invite)
    _remember(name, password, address)
    console().print(f"registered {name} on {address} and logged in")


def login(
    name: Annotated[str, typer.Argument(help="Your account name.")],
    host: HostOpt = None,
    port: PortOpt = None,
    tls: TlsOpt = None,
    ca: CaOpt = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Trade your password, once, for this device's credential (the password is not kept).

    The credential is kept with mode 0600; several accounts may be logged in ('imcli switch')."""
    from imcli.core.wire import check_name

    check_name(name)
    password = ask_password(password_stdin, confirm=False)
    address = broker_address(host, port, tls=tls, ca=ca)
    _remember(name, password, address)
    console().print(f"logged in as {name} on {address}")


def logout(
    name: Annotated[str | None, typer.Argument(help="The account to log out [default: the current one].")] = None,
) -> None:
    """Forget a login and revoke this device's credential on the broker.

    Its running chat and listen stop, and what the broker kept for it goes."""
    from imcli.client.config import delete_profile
    from imcli.client.devices import end_device
    from imcli.client.identity import Identity

    profile = delete_profile(name)
    console().print(f"logged out {profile.account}")
    from imcli.client import services

    if profile.password_kept:
        reached = services.drop_device_sessions(profile.address, profile.credentials, profile.device)
    else:
        reached = end_device(Identity(profile.address, profile.credentials, profile.device))
    if not reached:
        err_console().print(
            "the broker was not reachable: this device's credential still works until you revoke it "
            f"from another device ('imcli devices revoke {profile.device}')",
            style="dim",
        )


def whoami(json_: JsonOpt = False) -> None:
    """Show the login in use (account, broker, device), and the other accounts logged in here."""
    from imcli.client.config import load_logins, load_profile

    p = load_profile()
    others = sorted(n for n in load_logins().profiles if n != p.account)
    if json_:
        print(json.dumps({"account": p.account, "host": p.host, "port": p.port, "device": p.device, "others": others}))
        return
    console().print(f"{p.account} on {p.address} (device {p.device})")
    if others:
        console().print(f"also logged in: {', '.join(others)} ('imcli switch NAME')", style="dim")


def switch(name: Annotated[str, typer.Argument(help="An account logged in on this machine.")]) -> None:
    """Make another remembered login the current one."""
    from imcli.client.config import switch_profile

    p = switch_profile(name)
    console().print(f"now {p.account} on {p.address}")


def _two_passwords(from_stdin: bool) -> tuple[str, str]:
    """The old and the new password: two lines of stdin, or asked at a terminal."""
    if from_stdin:
        old, new = sys.stdin.readline().rstrip("\r\n"), sys.stdin.readline().rstrip("\r\n")
        if not old or not new:
            raise InvalidInput("no password on stdin", "give the old and the new password on two lines of stdin")
        return old, new
    if not sys.stdin.isatty():
        raise InvalidInput("no password given", "type them at a terminal or use --password-stdin (two lines)")
    asked_old: str = typer.prompt("Old password", hide_input=True)
    asked_new = ask_new_password("New password")
    return asked_old, asked_new


def passwd(
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the old, then the new password from two lines of stdin.")
    ] = False,
    revoke_others: Annotated[
        bool | None,
        typer.Option("--revoke-others/--keep-others", help="Revoke every other device and token [default: ask]."),
    ] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change your account password (the old one first); offers to revoke every other device."""
    from imcli.broker.accounts import check_password
    from imcli.client.devices import change_password
    from imcli.client.identity import signed_in

    identity = signed_in(host, port)
    old, new = _two_passwords(password_stdin)
    check_password(new)
    if revoke_others is None:
        revoke_others = sys.stdin.isatty() and typer.confirm("Revoke every other device and token?", default=False)
    revoked = change_password(identity, old, new, revoke_others=revoke_others)
    console().print(f"password of {identity.account} changed")
    if revoked:
        console().print(f"revoked: {', '.join(revoked)}")


# ---------------------------------------------------------------- devices and tokens

devices_app = typer.Typer(cls=CliGroup, help="Your devices: list them, revoke one.", no_args_is_help=False)
token_app = sub_app("Credentials for bots: 'imcli token create LABEL', listed and revoked like devices.")


def _show_devices(kind: str, json_: bool, host: str | None, port: int | None) -> None:
    from imcli.cli.render import ago, shown
    from imcli.client.devices import list_devices
    from imcli.client.identity import signed_in

    identity = signed_in(host, port)
    listed = [d for d in list_devices(identity) if d.kind == kind]
    if json_:
        print(json.dumps([d.model_dump() for d in listed]))
        return
    if not listed:
        console().print(f"no {kind}s")
        return
    from rich.table import Table

    table = Table("name", "created", "last seen", "online", box=None)
    for d in listed:
        mine = " (this one)" if d.name == identity.device else ""
        seen = ago(d.last_seen) if d.last_seen else "never"
        table.add_row(shown(d.name) + mine, ago(d.created), seen, "yes" if d.online else "no")
    console().print(table)


def _revoke(name: str, host: str | None, port: int | None) -> None:
    from imcli.client.devices import revoke
    from imcli.client.identity import signed_in

    revoke(signed_in(host, port), name)
    console().print(f"revoked {name}: its connections are closed and its credential no longer works")


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your devices: name, created, last seen, online."""
    if ctx.invoked_subcommand is None:
        _show_devices("device", json_, host, port)


@devices_app.command("revoke")
def devices_revoke(
    name: Annotated[str, typer.Argument(help="The device's name (see 'imcli devices').")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Revoke a device: its connections close at once and its credential stops working."""
    _revoke(name, host, port)


@token_app.command("create")
def token_create(
    label: Annotated[str, typer.Argument(help="The bot's name: its client id is <account>:<LABEL>.")],
    password_stdin: PasswordStdin = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Print a new credential for a bot, once (it needs your password)."""
    from imcli.client.devices import create_token
    from imcli.client.identity import signed_in
    from imcli.core.wire import NAME_RULE, is_name

    if not is_name(label):
        raise InvalidInput(f"invalid token label {quoted(label)}", NAME_RULE)
    identity = signed_in(host, port)
    password = ask_password(password_stdin, confirm=False)
    credential = create_token(identity.address, identity.account, password, label)
    print(credential)
    err_console().print(
        f"shown once: use it as the password with client id {identity.account}:{label}, e.g. "
        f"mosquitto_pub -u {identity.account} -P '…' -i {identity.account}:{label}",
        style="dim",
    )


@token_app.command("list")
def token_list(json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your bots' tokens: label, created, last seen, online."""
    _show_devices("token", json_, host, port)


@token_app.command("revoke")
def token_revoke(
    label: Annotated[str, typer.Argument(help="The token's label.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Revoke a bot's token: its connections close and it stops working."""
    _revoke(label, host, port)
