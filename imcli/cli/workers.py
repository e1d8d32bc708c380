"""``imcli workers``: the presence, group, archive and files workers alone, against a broker run
elsewhere (Mosquitto, a NATS cluster, or another ``imcli serve``). ``imcli serve`` runs the same four
inside it. ``imcli presence`` runs the presence worker alone."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imcli.cli.common import (
    HostOpt,
    PasswordStdin,
    PortOpt,
    account_store,
    ask_password,
    console,
)
from imcli.client.identity import broker_address
from imcli.core.errors import InvalidInput
from imcli.core.rules import ARCHIVE_ACCOUNT, FILES_ACCOUNT, GROUPS_ACCOUNT, PRESENCE_ACCOUNT
from imcli.core.text import quoted
from imcli.core.topics import DEFAULT_MAX_PAYLOAD

if TYPE_CHECKING:
    from imcli.core.mqtt import BrokerAddress, Credentials
    from imcli.core.service import ServiceWorker
    from imcli.files.worker import FileLimits
    from imcli.groups.natsauth import NatsAuth


def password_variable(account: str) -> str:
    return f"IMCLI_{account.upper().replace('-', '_')}_PASSWORD"


def _passwords(from_stdin: bool, accounts: list[str]) -> list[str]:
    """One password per service account: stdin lines in order, else IMCLI_<ACCOUNT>_PASSWORD, else a prompt."""
    found: list[str] = []
    for account in accounts:
        if from_stdin:
            value = sys.stdin.readline().rstrip("\r\n")
        else:
            value = os.environ.get(password_variable(account), "")
            if not value and sys.stdin.isatty():
                value = typer.prompt(f"Password of {account}", hide_input=True)
        if not value:
            raise InvalidInput(
                f"no password for the service account {quoted(account)}",
                f"give one line per account on stdin (--password-stdin: {', '.join(accounts)}) "
                f"or set {password_variable(account)}",
            )
        found.append(value)
    return found


def _stores(archive: Path | None, files: Path | None, moments: Path | None) -> str:
    """Where the workers keep what they keep, for the start-up line: as typed (any bytes, ``shown``)."""
    from imcli.cli.render import shown

    return "".join(
        f"; {what} in {shown(str(where))}" if where is not None else f"; no {what}"
        for what, where in (("archive", archive), ("files", files), ("moments", moments))
    )


def _mode(dynsec: bool, nats_users: Path | None) -> str:
    if nats_users is not None:
        return f"; NATS permissions kept in {nats_users}"
    return "; groups enforced through dynamic security" if dynsec else ""


def _nats_auth(users: Path | None, accounts: Path | None, pidfiles: list[Path], dynsec: bool) -> NatsAuth | None:
    if users is None:
        return None
    if dynsec or accounts is None:
        raise InvalidInput(
            "--nats-users needs --accounts-file (the name:password lines) and no --dynsec", "see deploy/nats/README.md"
        )
    from imcli.core.wire import Topics
    from imcli.groups.natsauth import NatsAuth

    for path, what in ((users, "--nats-users"), *((p, "--nats-pidfile") for p in pidfiles)):
        if path.exists() and not path.is_file():  # read whole: /dev/zero, a FIFO
            raise InvalidInput(
                f"{what} {quoted(str(path))} is not a regular file", "give a file (or a path to make one)"
            )
    try:
        return NatsAuth(Topics(), accounts.expanduser(), users.expanduser(), pidfiles)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the accounts file {accounts}: {exc}", "check the path and its mode") from exc


def workers(
    host: HostOpt = None,
    port: PortOpt = None,
    presence_account: Annotated[str, typer.Option(help="Service account of the presence worker.")] = PRESENCE_ACCOUNT,
    groups_account: Annotated[str, typer.Option(help="Service account of the group worker.")] = GROUPS_ACCOUNT,
    archive_account: Annotated[str, typer.Option(help="Service account of the archive worker.")] = ARCHIVE_ACCOUNT,
    files_account: Annotated[str, typer.Option(help="Service account of the files worker.")] = FILES_ACCOUNT,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the passwords from stdin, one line each: presence's, groups', archive's (unless "
            "--no-archive), files' (unless --no-files).",
        ),
    ] = False,
    accounts_file: Annotated[
        Path | None,
        typer.Option(help="Mosquitto password file, to know every account (else: only accounts seen online)."),
    ] = None,
    dynsec: Annotated[
        bool,
        typer.Option("--dynsec", help="Enforce groups and dm-policy on Mosquitto through its dynamic-security plugin."),
    ] = False,
    nats_users: Annotated[
        Path | None,
        typer.Option(
            help="NATS: the users file the nodes include (deploy/nats), kept in step with groups, friends-only "
            "DMs and --accounts-file (name:password lines), reloading the nodes after each change.",
        ),
    ] = None,
    nats_pidfile: Annotated[
        list[Path] | None,
        typer.Option(help="NATS: pid_file of a node on this machine, sent SIGHUP after each change (repeatable)."),
    ] = None,
    archive: Annotated[
        bool, typer.Option("--archive/--no-archive", help="Run the archive worker (history, offline catch-up).")
    ] = True,
    archive_dir: Annotated[
        Path | None,
        typer.Option(
            "--archive-dir",
            help="Directory of the archive's archive.sqlite3 [default: the per-user data dir's workers/]",
        ),
    ] = None,
    history_days: Annotated[
        float | None, typer.Option(help="Keep archived messages this many days [default: for ever].")
    ] = None,
    files: Annotated[bool, typer.Option("--files/--no-files", help="Run the files worker (imcli send, get).")] = True,
    moments: Annotated[
        bool,
        typer.Option(
            "--moments/--no-moments",
            help="Run the moments worker (imcli moments), as the group worker's account; its file is in --archive-dir.",
        ),
    ] = True,
    files_dir: Annotated[
        Path | None,
        typer.Option("--files-dir", help="Directory of the files worker's files/ [default: the archive's directory]"),
    ] = None,
    max_file_mib: Annotated[int, typer.Option(help="Largest file one may send, in MiB.")] = 100,
    file_quota_mib: Annotated[int, typer.Option(help="Storage per account for files, in MiB.")] = 1024,
    max_uploads: Annotated[int, typer.Option(help="Unfinished uploads one account may have going at once.")] = 4,
    max_payload: Annotated[
        int,
        typer.Option(
            help="The broker's largest payload (Mosquitto's message_size_limit; 262144 in deploy/mosquitto): the"
            " files' chunks and the archive's and moments' pages fit in it. The default is what any broker set up"
            " for chat takes; give the broker's own to send files faster and page history less."
        ),
    ] = DEFAULT_MAX_PAYLOAD,
    max_groups: Annotated[int, typer.Option(help="Groups one account may own.")] = 50,
    group_rate: Annotated[int, typer.Option(help="Groups one account may create per minute.")] = 10,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the workers do.")] = False,
) -> None:
    """Run the presence, group, archive and files workers against an external broker, until Ctrl-C or SIGTERM."""
    import logging
    import signal
    import threading

    from imcli.archive.worker import ArchiveWorker
    from imcli.client.config import default_workers_dir
    from imcli.core.mqtt import Credentials
    from imcli.core.service import PasswordFileDirectory
    from imcli.core.text import log_to_stderr
    from imcli.core.wire import check_name
    from imcli.files.worker import FileLimits
    from imcli.groups.worker import GroupWorker
    from imcli.presence.worker import PresenceWorker

    accounts = [presence_account, groups_account] + ([archive_account] if archive else [])
    accounts += [files_account] if files else []
    for account in (
        presence_account,
        groups_account,
        archive_account,
        files_account,
    ):  # the archive's also names a dynsec role
        check_name(account, "service account name")
    if len(set(accounts)) != len(accounts):
        raise InvalidInput(f"the {len(accounts)} workers need {len(accounts)} service accounts", "give different names")
    if history_days is not None and (history_days <= 0 or not archive):
        raise InvalidInput(
            f"invalid --history-days {history_days:g}", "give a number of days above 0, with the archive"
        )
    if max_groups < 1 or group_rate < 1:
        raise InvalidInput("limits too small", "--max-groups and --group-rate >= 1")
    log_to_stderr(logging.INFO if verbose else logging.WARNING, "%(asctime)s %(name)s %(message)s")
    directory = PasswordFileDirectory(accounts_file.expanduser()) if accounts_file is not None else None
    passwords = dict(zip(accounts, _passwords(password_stdin, accounts), strict=True))
    address = broker_address(host, port)
    data_dir = (archive_dir or default_workers_dir()).expanduser()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def creds(account: str) -> Credentials:
        return Credentials(account, passwords[account])

    makers: list[Callable[[], ServiceWorker]] = [
        lambda: PresenceWorker(
            address,
            creds(presence_account),
            directory,
            device=_device("workers", passwords[presence_account], nats_users),
        ),
        lambda: GroupWorker(
            address,
            creds(groups_account),
            directory,
            device=_device("workers", passwords[groups_account], nats_users),
            dynsec=dynsec,
            dm_readers=(archive_account,),
            max_groups=max_groups,
            group_rate=group_rate,
            nats=_nats_auth(nats_users, accounts_file, nats_pidfile or [], dynsec),
        ),
    ]
    if archive:
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise InvalidInput(f"cannot create the archive directory {data_dir}: {exc}", "check --archive-dir") from exc
        makers.append(
            lambda: ArchiveWorker(
                address,
                creds(archive_account),
                data_dir,
                device=_device("workers", passwords[archive_account], nats_users),
                retention_days=history_days,
                max_payload=max_payload,
            )
        )
    makers += [_moments_worker(address, creds(groups_account), data_dir, nats_users, max_payload)] if moments else []
    store_dir = (files_dir or data_dir).expanduser()
    if files:
        limits = FileLimits(max_file_mib << 20, file_quota_mib << 20, max_uploads, max_payload)
        makers.append(
            _files_worker(
                address,
                creds(files_account),
                store_dir,
                limits,
                _device("workers", passwords[files_account], nats_users),
            )
        )
    with contextlib.ExitStack() as stack:
        for make in makers:  # made one by one: a worker that fails to start closes those before it
            stack.enter_context(_for_broker(make(), nats_users))
        where = _stores(
            data_dir if archive else None, store_dir / "files" if files else None, data_dir if moments else None
        )
        mode = _mode(dynsec, nats_users)
        console().print(f"workers running as {', '.join(accounts)} on {address}{mode}{where} (Ctrl-C to stop)")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


def _for_broker(worker: ServiceWorker, nats_users: Path | None) -> ServiceWorker:
    """On NATS (``--nats-users``) a worker hears requests and the state it rebuilds from retained
    messages at QoS 0: plain NATS subscriptions, not JetStream consumers (imcli/core/service.py,
    deploy/nats/README.md)."""
    worker.at_most_once = nats_users is not None
    return worker


def _device(name: str, password: str, nats_users: Path | None) -> str:
    """A worker's device; on NATS (``--nats-users``), where any user may take a client id over (and so
    disconnect the worker holding it), one nobody can guess without the service account's password."""
    if nats_users is None:
        return name
    from imcli.groups.natsauth import private_device

    return private_device(name, password)


def _moments_worker(
    address: BrokerAddress, credentials: Credentials, data_dir: Path, nats_users: Path | None, max_payload: int
) -> Callable[[], ServiceWorker]:
    """The moments worker's maker (the group worker's account, a device of its own), its directory made."""
    from imcli.moments.worker import MomentsWorker

    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InvalidInput(f"cannot create the moments directory {data_dir}: {exc}", "check --archive-dir") from exc
    device = _device("workers-moments", credentials.password, nats_users)
    return lambda: MomentsWorker(address, credentials, data_dir, device=device, max_payload=max_payload)


def _files_worker(
    address: BrokerAddress, credentials: Credentials, store_dir: Path, limits: FileLimits, device: str
) -> Callable[[], ServiceWorker]:
    """The files worker's maker, its directory made and its limits checked first."""
    from imcli.files.worker import FilesWorker

    if min(limits.max_file, limits.quota, limits.max_uploads) < 1 or limits.max_payload < 256:
        raise InvalidInput(
            "file limits too small", "--max-file-mib, --file-quota-mib, --max-uploads >= 1, --max-payload >= 256"
        )
    try:
        store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InvalidInput(f"cannot create the files directory {store_dir}: {exc}", "check --files-dir") from exc
    return lambda: FilesWorker(address, credentials, store_dir, device=device, limits=limits)


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
