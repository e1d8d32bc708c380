"""The embedded broker's event loop, seen from a benchmark that runs the broker in its own process
(``benchmarks.memory.serve_here``): noted once the broker starts, for calls into its thread (a
profiler, like a thread's CPU clock, is per thread). Used by ``benchmarks.linecost`` and
``benchmarks.chunkcost``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class BrokerLoop:
    """``install`` before the broker starts; ``call(fn)`` then runs ``fn()`` in the loop's thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        from imcli.broker.amqtt_adapter import ImBroker

        start = ImBroker.start
        probe = self

        async def started(broker: Any) -> None:
            probe.loop = asyncio.get_running_loop()
            await start(broker)

        setattr(ImBroker, "start", started)  # noqa: B010 - a benchmark's probe

    def call(self, fn: Callable[[], None]) -> None:
        """``fn()`` in the loop's thread, waited for (at most 10 s); nothing before the broker runs."""
        if self.loop is None:
            return
        done = threading.Event()

        def run() -> None:
            fn()
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
