"""``imcli workers``: the presence and group workers alone, against a broker run elsewhere
(Mosquitto, EMQX, or another ``imcli serve``). ``imcli serve`` runs the same two inside it."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from imcli.cli_common import HostOpt, PortOpt, broker_address, console
from imcli.errors import InvalidInput


def _passwords(from_stdin: bool, accounts: tuple[str, str]) -> tuple[str, str]:
    """One password per service account: stdin lines in order, else IMCLI_<ACCOUNT>_PASSWORD, else a prompt."""
    found: list[str] = []
    for account in accounts:
        if from_stdin:
            value = sys.stdin.readline().rstrip("\r\n")
        else:
            value = os.environ.get(f"IMCLI_{account.upper().replace('-', '_')}_PASSWORD", "")
            if not value and sys.stdin.isatty():
                value = typer.prompt(f"Password of {account}", hide_input=True)
        if not value:
            raise InvalidInput(
                f"no password for the service account {account!r}",
                f"give one line per account on stdin (--password-stdin) or set IMCLI_{account.upper()}_PASSWORD",
            )
        found.append(value)
    return found[0], found[1]


def workers(
    host: HostOpt = None,
    port: PortOpt = None,
    presence_account: Annotated[str, typer.Option(help="Service account of the presence worker.")] = "presence",
    groups_account: Annotated[str, typer.Option(help="Service account of the group worker.")] = "groups",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the two passwords (presence's, then groups') from stdin.")
    ] = False,
    accounts_file: Annotated[
        Path | None,
        typer.Option(help="Mosquitto password file, to know every account (else: only accounts seen online)."),
    ] = None,
    dynsec: Annotated[
        bool,
        typer.Option("--dynsec", help="Enforce groups and dm-policy on Mosquitto through its dynamic-security plugin."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the workers do.")] = False,
) -> None:
    """Run the presence and group workers against an external broker, until Ctrl-C or SIGTERM."""
    import logging
    import signal
    import threading

    from groups.worker import GroupWorker
    from imcli.mqtt import Credentials
    from imcli.wire import check_name
    from imcli.worker import PasswordFileDirectory
    from presence.worker import PresenceWorker

    for account in (presence_account, groups_account):
        check_name(account, "service account name")
    if presence_account == groups_account:
        raise InvalidInput("the two workers need two service accounts", "give different names")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    directory = PasswordFileDirectory(accounts_file.expanduser()) if accounts_file is not None else None
    presence_password, groups_password = _passwords(password_stdin, (presence_account, groups_account))
    address = broker_address(host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    presence = PresenceWorker(address, Credentials(presence_account, presence_password), directory, device="workers")
    groups = GroupWorker(
        address, Credentials(groups_account, groups_password), directory, device="workers", dynsec=dynsec
    )
    with presence, groups:
        mode = "; groups enforced through dynamic security" if dynsec else ""
        console().print(
            f"workers running as {presence_account} and {groups_account} on {address}{mode} (Ctrl-C to stop)"
        )
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
