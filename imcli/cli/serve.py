"""``imcli serve``: the embedded broker with its presence, group and archive workers, and the
checks of its options (issue 15's limits) before anything starts."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imcli.cli.common import DataDirOpt, check_tls_options, console
from imcli.core.errors import InvalidInput
from imcli.core.text import quoted
from imcli.core.topics import DEFAULT_MAX_CHUNK, DEFAULT_MAX_PAYLOAD

if TYPE_CHECKING:
    from imcli.serve.host import ServeInfo


def _data_lines(info: ServeInfo) -> str:
    """The start-up lines on the data directory (as typed: any bytes, ``shown``) and on the open-file
    limit (every connection is one)."""
    from imcli.cli.render import shown

    files = info.broker.open_files if info.broker is not None else None
    return f"  data        {shown(str(info.data_dir))}" + ("" if files is None else f"\n  open files  {files.line()}")


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
    max_rate: Annotated[
        float, typer.Option(help="Messages per second per account (a burst of 3 seconds' worth is allowed).")
    ] = 20.0,
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
    max_file_mib: Annotated[int, typer.Option(help="Largest file one may send, in MiB.")] = 100,
    file_quota_mib: Annotated[
        int, typer.Option(help="Storage per account for files, in MiB (unfinished uploads count).")
    ] = 1024,
    max_uploads: Annotated[int, typer.Option(help="Unfinished uploads one account may have going at once.")] = 4,
    max_chunk: Annotated[
        int,
        typer.Option(help="Largest payload on upload topics (a file's chunks), in bytes; chat keeps --max-payload."),
    ] = DEFAULT_MAX_CHUNK,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate (chain): TLS on --port and --ws-port.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    ws_port: Annotated[
        int | None,
        typer.Option(
            "--ws-port", help="Also serve MQTT over WebSocket and the web client here (wss/https with TLS; 0: any)."
        ),
    ] = None,
    ws_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--ws-origin",
            help="Another browser origin allowed to open the WebSocket (https://chat.example.org); repeatable.",
        ),
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow binding beyond loopback without TLS (passwords travel in clear)."),
    ] = False,
    loop: Annotated[
        str,
        typer.Option(
            "--loop",
            envvar="IMCLI_LOOP",
            callback=check_loop,
            help="The broker's event loop: 'asyncio' (Python's own) or 'uvloop' (an experiment: docs/PERFORMANCE.md).",
        ),
    ] = "asyncio",
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
    from imcli.core.text import log_to_stderr
    from imcli.serve.host import serve_forever

    if registration not in ("open", "invite", "closed"):
        raise InvalidInput(f"invalid --registration {quoted(registration)}", "use 'open', 'invite' or 'closed'")
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
        raise InvalidInput(f"invalid --bind address {quoted(bind)}", "give an IP address such as 127.0.0.1") from exc
    if not loopback and not allow_remote and tls_cert is None:
        raise InvalidInput(
            f"refusing to listen on {bind}: beyond this machine, passwords would travel unencrypted",
            "give --tls-cert/--tls-key, or add --allow-remote if that is what you want",
        )
    log_to_stderr(logging.INFO if verbose else logging.WARNING, "%(asctime)s %(name)s %(message)s")
    # --verbose is this project's events (connections, refusals, accounts, workers); amqtt's and its
    # state machine's (transitions) internals stay out, and amqtt logs every refused client at WARNING
    logging.getLogger("amqtt").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    logging.getLogger("transitions").setLevel(logging.WARNING)
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
        ws_origins=tuple(check_origin(o) for o in ws_origin or ()),
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
            **file_limits(max_file_mib, file_quota_mib, max_uploads, max_chunk),
        ),
    )
    out = console()

    def banner(info: ServeInfo) -> None:
        a = info.address
        out.print(f"imcli serve: listening on {info.bind}:{a.port}" + (" (TLS)" if a.tls else ""), style="bold green")
        if info.ws_port is not None:
            out.print(  # the web client's page and its MQTT share the port
                f"  websocket   {'wss' if a.tls else 'ws'}://{a.host}:{info.ws_port}/mqtt\n"
                f"  web client  {'https' if a.tls else 'http'}://{a.host}:{info.ws_port}/"
            )
        out.print(_data_lines(info))
        out.print(f"  accounts    registration {info.registration}; presence, group, archive and files workers running")
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

    run_on(run(), loop)
    out.print("imcli serve: stopped", style="dim")


def check_loop(loop: str) -> str:
    """``--loop`` (or ``IMCLI_LOOP``): a bad name, or uvloop missing, is one line before anything starts."""
    from imcli.serve import loops

    return loops.chosen_loop(loop)


def run_on(main: Coroutine[Any, Any, None], loop: str) -> None:
    """``asyncio.run(main)`` on the event loop ``--loop`` names (imcli/serve/loops.py)."""
    from imcli.serve import loops

    loops.run(main, loop)


def check_origin(origin: str) -> str:
    """A ``--ws-origin``: scheme, host and optional port, as a browser sends it in ``Origin``."""
    import re

    if re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", origin) is None:
        raise InvalidInput(
            f"invalid --ws-origin {quoted(origin)}", "give scheme://host[:port], e.g. https://chat.example.org"
        )
    return origin


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


def file_limits(max_file_mib: int, quota_mib: int, uploads: int, max_chunk: int) -> dict[str, int]:
    """imcli serve's limits on files (issue 16) as ``Limits`` fields, checked."""
    if min(max_file_mib, quota_mib, uploads) < 1:
        raise InvalidInput("file limits too small", "--max-file-mib, --file-quota-mib and --max-uploads >= 1")
    if max_chunk < 256:
        raise InvalidInput(f"--max-chunk {max_chunk} is too small", "use at least 256 bytes")
    return {
        "max_file": max_file_mib << 20,
        "file_quota": quota_mib << 20,
        "max_uploads": uploads,
        "max_chunk": max_chunk,
    }


MIN_OUTPUT_TIMEOUT = 5.0  # seconds


def output_bound(max_output: int, timeout: float, max_payload: int) -> dict[str, Any]:
    """imcli serve's bound on what one connection that does not read holds (issue 15), as ``Limits`` fields."""
    # a client is closed once nothing was taken for --output-timeout: under a second, the workers were closed
    # as they started (1e-320: their subscriptions never acknowledged, the workers' process ended in a traceback)
    if max_output < max(1 << 16, 4 * max_payload) or timeout < MIN_OUTPUT_TIMEOUT:
        raise InvalidInput(
            "output limits too small",
            f"--max-output >= 64 KiB and 4 times --max-payload, --output-timeout >= {MIN_OUTPUT_TIMEOUT:g}",
        )
    return {"output_drop": max_output // 8, "output_close": max_output, "output_stuck": timeout}
