"""What ``--users`` signing in and then leaving at once (DISCONNECT) cost the broker's thread in CPU.

    python -m benchmarks.leave [--users 3000] [--processes 2] [--listeners 0] [--profile] [--stock-gc]

Runs the embedded broker in this process (``BackgroundServer``, no workers: only the broker's own
work is counted) under the collector policy ``imcli serve`` applies (``gcpause.calm_collector``;
``--stock-gc``: CPython's default, as this benchmark ran before 2026-11-26 07:30, when a full
collection of the whole heap, about 65 us per user at 2,000 users, fell into the leave), signs the
users in from crowd processes (benchmarks/crowd.py, no status), waits, and has them all leave at
once, as the capacity scenario's end does. Prints the CPU time of the broker's thread
(``pthread_getcpuclockid``: what waiting for a core does not move) per user joining and per user
leaving, and of it the part spent in garbage collections; with ``--profile`` also a cProfile of the
broker's loop during the leave, by own time (the leave's CPU figure then includes the profiler's
own: about twice as much). A stall a mass leave makes is about (users leaving at once) x (CPU per
user leaving): asyncio serves ready sockets first come, first served (docs/PERFORMANCE.md, issue
21).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.memory import _Here, _write_accounts
from benchmarks.scenarios import Crowds
from imcli.broker.gcpause import calm_collector
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.serve.host import BackgroundServer


def _cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class _CollectorCpu:
    """``gc.callbacks`` entry: CPU seconds the broker's thread spent in garbage collections."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread, self.seconds, self._started = thread, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if threading.get_ident() != self.thread.ident:
            return
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._started


def _in_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], None]) -> None:
    done = threading.Event()

    def run() -> None:
        try:
            call()
        finally:
            done.set()

    loop.call_soon_threadsafe(run)
    done.wait(30)


def measure(users: int, processes: int, profile: bool, stock_gc: bool = False, listeners: int = 0) -> dict[str, object]:
    result: dict[str, object] = {
        "users": users,
        "listeners": listeners,
        "gc": "stock" if stock_gc else "calm_collector",
    }
    with tempfile.TemporaryDirectory(prefix="bench-leave-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _write_accounts(data, users)
        limits = Limits(publish_rate=1e6, publish_burst=1_000_000, password_queue=4096)
        server = BackgroundServer(BrokerSettings(data_dir=data, port=0, limits=limits), workers=False)
        profiler = cProfile.Profile()
        with server as info:
            loop, thread = server._loop, server._thread  # the broker's loop and thread (a benchmark's look inside)
            assert loop is not None
            if not stock_gc:  # as imcli serve does once it is up (BackgroundServer leaves CPython's policy)
                _in_loop(loop, calm_collector)
            collector = _CollectorCpu(thread)
            gc.callbacks.insert(0, collector)
            before_join = _cpu(thread)
            here: Any = _Here(info.address.port)  # what Crowds.join needs of a broker
            with Crowds.join(here, users, processes, status=False, listeners=listeners) as (_, joined):
                result["joined"] = joined["ok"]
                result["join_cpu_us_per_user"] = round((_cpu(thread) - before_join) * 1e6 / users, 1)
                time.sleep(3)
                if profile:
                    loop.call_soon_threadsafe(profiler.enable)
                before_leave, collector.seconds = _cpu(thread), 0.0
            time.sleep(5)  # every connection has ended, every session forgotten
            result["leave_cpu_us_per_user"] = round((_cpu(thread) - before_leave) * 1e6 / users, 1)
            result["leave_gc_cpu_us_per_user"] = round(collector.seconds * 1e6 / users, 1)
            if profile:
                loop.call_soon_threadsafe(profiler.disable)
                time.sleep(0.5)
    if profile:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        result["profile"] = out.getvalue()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--stock-gc", action="store_true", help="CPython's collector policy, not imcli serve's")
    parser.add_argument(
        "--listeners",
        type=int,
        default=0,
        help="users (of the first crowd) holding a room's filter too",
    )
    args = parser.parse_args()
    figures = measure(args.users, args.processes, args.profile, args.stock_gc, args.listeners)
    text = figures.pop("profile", None)
    print(json.dumps(figures, indent=1))
    if text:
        print(text)


if __name__ == "__main__":
    main()
