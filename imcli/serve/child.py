"""The embedded default's workers in a child process of ``imcli serve`` (issue 7).

In the broker's process the presence worker's paho thread took 17 % of a join storm's
samples under the same GIL as the broker; in a process of its own it runs on the second
core. ``imcli serve`` stays one command: ``ChildSupervisor`` starts the child once the broker
listens, restarts it if it dies, and stops it on exit. The child gets its settings and the
service accounts' passwords as one JSON line on stdin (never in argv or the environment,
which other users can read), says ``workers running`` on stdout, and then runs until its
stdin ends: the parent closes it to stop the child, and the kernel closes it when the
parent dies, even by SIGKILL, so a child never outlives its broker.

    python -m imcli.serve.child      # started by imcli serve only
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from imcli.core.errors import ImcliError
from imcli.core.text import log_to_stderr

log = logging.getLogger(__name__)

READY_LINE = "workers running"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before each restart in a row
STEADY = 60.0  # seconds a child must live for its end to count as a first failure again


def main() -> int:
    """The child: run the three workers until stdin ends."""
    # the workers' modules are imported here, not at the top: the parent imports this module too
    from imcli.broker.accounts import AccountStore
    from imcli.broker.limits import Limits
    from imcli.core.mqtt import BrokerAddress
    from imcli.core.wire import DEFAULT_MAX_PAYLOAD, Topics
    from imcli.serve.workers import StoreDirectory, embedded_workers

    parent = os.getppid()
    # Ctrl-C in a terminal reaches the whole process group: imcli serve stops the child itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.stdin.readline())
    log_to_stderr(config.get("log_level", logging.WARNING), "%(asctime)s imcli serve's child: %(name)s %(message)s")
    local = BrokerAddress(config["host"], int(config["port"]))
    data_dir = Path(config["data_dir"])
    topics = Topics(config["prefix"])
    directory = StoreDirectory(AccountStore(data_dir))
    limits = Limits(**config.get("group_limits", {}))  # of imcli serve's limits, the group and files workers'
    workers = embedded_workers(
        local,
        config["passwords"],
        directory,
        data_dir,
        topics,
        config["history_days"],
        limits,
        config.get("max_payload", DEFAULT_MAX_PAYLOAD),
    )
    with ExitStack() as running:
        for worker in workers:
            running.enter_context(worker)
        print(READY_LINE, flush=True)
        sys.stdin.read()  # until the parent closes the pipe or dies
        if os.getppid() != parent:  # the broker died with it: nobody to say goodbye to, and it may restart now
            os._exit(0)
    return 0


class ChildSupervisor:
    """Starts, restarts and stops the child that runs the workers (in the broker's event loop).

    Not a worker itself (those are ``ServiceWorker``s, in the child), nor ``imcli workers``
    (the same workers run alone against another broker).
    """

    def __init__(self, config: dict[str, object]) -> None:
        self._config = json.dumps(config) + "\n"
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = False  # the running child said READY_LINE: it reads its stdin, and stops when it ends
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and wait until its workers have read their state; raise if they do not."""
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self._ready = False
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imcli.serve.child", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self._proc = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(self._config.encode())
        await proc.stdin.drain()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.decode().strip() != READY_LINE:
            await self._end(proc, ready=False)
            raise ImcliError(
                f"the workers did not start (exit status {proc.returncode})", "see the lines above for why"
            )
        self._ready = True

    async def _supervise(self) -> None:
        failures = 0  # in a row: a child that dies soon after each start is restarted ever more slowly
        started = time.monotonic()
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            await proc.wait()
            if self._stopping:
                return
            failures = failures + 1 if time.monotonic() - started < STEADY else 0
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.warning("the workers' process ended (exit status %s): restarting it in %g s", proc.returncode, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            started = time.monotonic()
            try:
                await self._spawn()
                self.restarts += 1
            except (ImcliError, OSError) as exc:
                log.warning("the workers' process did not restart: %s", exc)

    async def stop(self) -> None:
        """Stop supervising and end the child: at once if it has not said it runs (a stop request wins
        over a start or a restart in progress), else by closing its stdin, so its workers leave cleanly."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._proc is not None:
            await self._end(self._proc, ready=self._ready)

    @staticmethod
    async def _end(proc: asyncio.subprocess.Process, *, ready: bool) -> None:
        if proc.returncode is None and ready and proc.stdin is not None:
            proc.stdin.close()  # the child's signal to stop
        elif proc.returncode is None:
            # still starting (or hung before its first line): it reads its stdin only once its workers
            # run, and closing it waited STOP_TIMEOUT for nothing; its workers have no clients yet
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.wait_closed()


if __name__ == "__main__":
    sys.exit(main())
