"""imcli admin …: operator commands, run on the broker's machine against its data directory."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imcli.cli.common import DataDirOpt, JsonOpt, PasswordStdin, account_store, ask_password, console, sub_app

admin_app = sub_app("Operator commands (run on the broker's machine).")
user_app = sub_app("Accounts in the broker's data directory.")
admin_app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDirOpt = None,
    service: Annotated[bool, typer.Option("--service", help="A worker's service account.")] = False,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse", help="Give the name of a removed account again (the archive's old direct messages go with it)."
        ),
    ] = False,
    password_stdin: PasswordStdin = False,
) -> None:
    """Create an account directly in the data directory (works with registration closed)."""
    from imcli.broker.accounts import Role, check_password
    from imcli.core.wire import check_name

    check_name(name)
    password = check_password(ask_password(password_stdin, confirm=True))
    account_store(data_dir).add(
        name, password, Role.SERVICE if service else Role.USER, allow_reserved=service, reuse=reuse
    )
    console().print(f"added {'service account' if service else 'user'} {name}")


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Delete an account: its connections to `imcli serve` close within a second, and its sessions end."""
    account_store(data_dir).remove(name)
    console().print(f"removed {name}")


@user_app.command("list")
def user_list(data_dir: DataDirOpt = None, json_: JsonOpt = False) -> None:
    """List accounts with their role and creation time."""
    import time

    accounts = account_store(data_dir).list_accounts()
    if json_:
        print(json.dumps([{"name": a.name, "role": a.role.value, "created": a.created} for a in accounts]))
        return
    from rich.table import Table

    table = Table("account", "role", "created", box=None)
    for a in accounts:
        table.add_row(a.name, a.role.value, time.strftime("%Y-%m-%d %H:%M", time.localtime(a.created)))
    console().print(table if accounts else "no accounts")
