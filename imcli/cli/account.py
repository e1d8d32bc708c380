"""The account commands: ``imcli register``, ``login``, ``logout`` and ``whoami`` (the stored
login, file mode 0600, in :mod:`imcli.client.config`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imcli.cli.common import (
    CaOpt,
    HostOpt,
    JsonOpt,
    PasswordStdin,
    PortOpt,
    TlsOpt,
    ask_password,
    console,
    err_console,
)
from imcli.client.identity import broker_address
from imcli.core.errors import InvalidInput


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
    save_profile(Profile(name, password, address.hosts, address.port, device, address.tls, address.ca))
    console().print(f"registered {name} on {address} and logged in")


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
    save_profile(Profile(name, password, address.hosts, address.port, device, address.tls, address.ca))
    console().print(f"logged in as {name} on {address}")


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


def whoami(json_: JsonOpt = False) -> None:
    """Show the stored login (account, broker, device)."""
    from imcli.client.config import load_profile

    p = load_profile()
    if json_:
        print(json.dumps({"account": p.account, "host": p.host, "port": p.port, "device": p.device}))
    else:
        console().print(f"{p.account} on {p.address} (device {p.device})")
