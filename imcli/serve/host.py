"""The embedded default: broker and workers as one command (``imcli serve``).

``serve_forever`` runs them on the current event loop until ``stop`` is set;
``BackgroundServer`` runs the same in a thread (tests, benchmarks, bots' fixtures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.errors import BrokerError as AmqttBrokerError

from imcli.archive.store import ARCHIVE_FILE, ArchiveStore
from imcli.broker.gcpause import calm_collector
from imcli.broker.server import (
    WS_LISTENER,
    BrokerSettings,
    EmbeddedBroker,
    ImBroker,
    new_service_password,
)
from imcli.core.errors import ImcliError
from imcli.core.mqtt import BrokerAddress
from imcli.core.rules import SERVICE_ACCOUNTS
from imcli.serve import loops
from imcli.serve.child import ChildSupervisor
from imcli.serve.workers import StoreDirectory, embedded_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeInfo:
    address: BrokerAddress  # where clients on this machine connect
    bind: str
    data_dir: Path
    registration: str
    broker: ImBroker | None = field(default=None, compare=False, repr=False)  # for tests and benchmarks
    ws_port: int | None = None  # the WebSocket listener's port, if there is one


def connect_host(bind: str) -> str:
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapping away from them
    return wildcard.get(bind, bind)


def open_archive(data_dir: Path) -> ArchiveStore:
    """The archive the broker's journal writes before each PUBACK (the archive worker reads it)."""
    return ArchiveStore(data_dir / ARCHIVE_FILE)


async def serve_forever(
    settings: BrokerSettings,
    ready: Callable[[ServeInfo], None],
    stop: asyncio.Event,
    *,
    workers: bool = True,
    tune_gc: bool = True,
    workers_in_child: bool = True,
) -> None:
    """Run the broker and its workers until ``stop``.

    ``imcli serve`` runs the workers in a child process (imcli/serve/child.py: the second
    core) and tunes this process's garbage collector (imcli/broker/gcpause.py); BackgroundServer,
    which runs inside another program (tests, bots' fixtures), keeps them in threads and
    leaves the collector alone.
    """
    try:
        broker_cm = EmbeddedBroker(settings, open_archive)
        broker = await broker_cm.__aenter__()
    except AmqttBrokerError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise ImcliError(
                f"cannot listen on {settings.bind}:{settings.port}: {cause.strerror or cause}",
                "is another broker running there? choose another --port",
            ) from exc
        raise ImcliError(
            f"the broker did not start: {exc}", "see the log above; imcli serve --verbose says more"
        ) from exc
    try:
        address = BrokerAddress(connect_host(settings.bind), broker.bound_port(), tls=settings.tls)
        ws_port = broker.bound_port(WS_LISTENER) if settings.ws_port is not None else None
        info = ServeInfo(address, settings.bind, settings.data_dir, settings.registration, broker, ws_port)
        async with contextlib.AsyncExitStack() as running:  # the workers stop first, the broker last
            if workers:
                broker.admission.hold_clients()  # until the workers are in: imcli/broker/admission.py
                # with TLS the workers use the broker's plain loopback-only listener (see BrokerSettings)
                local = BrokerAddress("127.0.0.1", broker.worker_port()) if settings.tls else address
                passwords: dict[str, str] = {}
                for account in SERVICE_ACCOUNTS:
                    passwords[account] = new_service_password()
                    await asyncio.to_thread(broker.accounts.ensure_service, account, passwords[account])
                if workers_in_child:
                    if not await _unless_stopped(_start_child(running, settings, local, passwords), stop):
                        return  # SIGTERM while the workers' child started: it is ended as the stack unwinds
                else:
                    await _start_threads(running, settings, broker, local, passwords)
            broker.admission.workers_ready()
            if tune_gc:
                calm_collector()
            ready(info)
            await stop.wait()
    finally:
        await broker_cm.__aexit__(None, None, None)


async def _unless_stopped(step: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``step`` unless ``stop`` is set first, then cancel it and say so: imcli serve stops on a
    SIGTERM or Ctrl-C even while its workers' child starts (it waited up to START_TIMEOUT)."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()  # its error, if it failed
    return True


async def _start_child(
    running: contextlib.AsyncExitStack, settings: BrokerSettings, local: BrokerAddress, passwords: dict[str, str]
) -> None:
    child = ChildSupervisor(
        {
            "host": local.host,
            "port": local.port,
            "data_dir": str(settings.data_dir.resolve()),
            "prefix": settings.prefix,
            "history_days": settings.history_days,
            "group_limits": {
                "max_groups": settings.limits.max_groups,
                "group_rate": settings.limits.group_rate,
                "max_file": settings.limits.max_file,
                "file_quota": settings.limits.file_quota,
                "max_uploads": settings.limits.max_uploads,
                "max_chunk": settings.limits.max_chunk,
                "output_close": settings.limits.output_close,  # the files worker keeps its uploads within it
            },
            "max_payload": settings.max_payload,
            "passwords": passwords,  # service account -> its password for this run
            "log_level": logging.getLogger().getEffectiveLevel(),  # `imcli serve --verbose` reaches the workers
        }
    )
    running.push_async_callback(child.stop)  # before start: a start cancelled half-way is ended too
    await child.start()


async def _start_threads(
    running: contextlib.AsyncExitStack,
    settings: BrokerSettings,
    broker: ImBroker,
    local: BrokerAddress,
    passwords: dict[str, str],
) -> None:
    directory = StoreDirectory(broker.accounts)
    for worker in embedded_workers(
        local,
        passwords,
        directory,
        settings.data_dir,
        broker.topics,
        settings.history_days,
        settings.limits,
        settings.max_payload,
    ):
        await asyncio.to_thread(worker.__enter__)
        running.push_async_callback(asyncio.to_thread, worker.__exit__, None, None, None)


class BackgroundServer:
    """``with BackgroundServer(settings) as info:`` runs the embedded default in a thread.

    ``stop()`` (what leaving the ``with`` does) may come from any thread at any time, more than once:
    before the start, while it starts (the start then ends with an error, and nothing it began is
    left running), or after the thread has ended."""

    STOP_TIMEOUT = 30.0  # seconds stop() waits for the thread (the workers and the broker close in it)

    def __init__(
        self, settings: BrokerSettings, start_timeout: float = 30.0, *, workers: bool = True, loop: str | None = None
    ) -> None:
        self.settings = settings
        self.loop = loop  # the event loop's kind (imcli/serve/loops.py; None: IMCLI_LOOP, else the default)
        self._workers = workers
        self._start_timeout = start_timeout
        self._ready = threading.Event()
        self._info: ServeInfo | None = None
        self._error: BaseException | None = None
        # the loop and its stop event, and whether stop() was called, are read and set under the lock:
        # a stop() that finds no loop yet is seen by the loop as it starts, never lost between the two
        self._lock = threading.Lock()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="imcli-serve", daemon=True)

    def __enter__(self) -> ServeInfo:
        with self._lock:
            if not self._stopping:
                self._thread.start()
        try:
            started = self._thread.ident is None or self._ready.wait(self._start_timeout)
        except BaseException:  # Ctrl-C: what started so far is stopped, not left running
            self.stop()
            raise
        if not started:  # nor when the time is up
            self.stop()
            raise ImcliError(
                f"the embedded broker did not start within {self._start_timeout:g}s",
                "see the log; is the machine busy?",
            )
        if self._error is not None:
            raise self._error
        if self._stopping or self._info is None:
            self.stop()
            raise ImcliError("the embedded broker was stopped while it started", "start it again")
        return self._info

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the broker and its workers and wait for the thread (at most ``STOP_TIMEOUT``)."""
        with self._lock:
            self._stopping = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the thread ends or has ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(self.STOP_TIMEOUT)

    def _run(self) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._stop = stop
                if self._stopping:
                    stop.set()  # stopped before the loop was there: it starts and stops at once
            await serve_forever(
                self.settings, self._on_ready, stop, workers=self._workers, tune_gc=False, workers_in_child=False
            )

        try:
            loops.run(main(), self.loop)
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, info: ServeInfo) -> None:
        self._info = info
        self._ready.set()
