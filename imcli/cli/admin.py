"""imcli admin …: operator commands, run on the broker's machine against its data directory."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imcli.cli.common import DataDirOpt, JsonOpt, PasswordStdin, account_store, ask_password, console, sub_app
from imcli.core.errors import InvalidInput
from imcli.core.text import quoted

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


LONGEST_INVITE = 3650 * 86400  # seconds: ten years


@admin_app.command("invite")
def invite(
    data_dir: DataDirOpt = None,
    uses: Annotated[int, typer.Option("--uses", help="Accounts the code may create.")] = 1,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Valid for this long: 30m, 12h, 7d, 2w, or never.")
    ] = "7d",
    list_: Annotated[
        bool, typer.Option("--list", help="List the codes not used up (by id: codes are kept hashed).")
    ] = False,
    revoke: Annotated[str | None, typer.Option("--revoke", help="Drop the code with this id (from --list).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Make an invite code for 'imcli serve --registration invite' ('imcli register NAME --invite CODE')."""
    import time

    from imcli.broker.invites import InviteStore, parse_duration
    from imcli.core.errors import NotFound

    store = InviteStore(account_store(data_dir).data_dir)  # the account store makes and checks the directory
    if revoke is not None:
        if not store.revoke(revoke):
            raise NotFound(f"no invite with id {quoted(revoke)}", "see imcli admin invite --list")
        console().print(f"revoked invite {revoke}")
        return
    if list_:
        invites = store.list_invites()
        if json_:
            print(
                json.dumps([{"id": i.id, "uses": i.uses, "expires": i.expires, "created": i.created} for i in invites])
            )
            return
        for i in invites:
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.expires)) if i.expires else "never"
            console().print(f"{i.id}  {i.uses} use{'s' if i.uses != 1 else ''} left, expires {until}")
        if not invites:
            console().print("no invites")
        return
    lifetime = parse_duration(expires) if expires and expires != "never" else None
    if lifetime is not None and lifetime > LONGEST_INVITE:  # its end must be a date: 10**40 s was an OverflowError
        raise InvalidInput(
            f"invalid duration {quoted(str(expires))}", f"give at most {LONGEST_INVITE // 86400}d, or never"
        )
    code, made = store.create(uses, lifetime)
    if json_:
        print(json.dumps({"code": code, "id": made.id, "uses": made.uses, "expires": made.expires}))
        return
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(made.expires)) if made.expires else "never"
    console().print(f"invite code {code}  ({made.uses} use{'s' if made.uses != 1 else ''}, expires {until})")
    console().print(f"register with: imcli register NAME --invite {code}", style="dim")
