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

Since 2026-11-26 (fourth session) a connection's end waits for a turn from the broker's
``teardown.TeardownGate``, ``SLICE`` connections a loop round; ``--slice N`` sets that slice
(``--slice 0``: no gate, every end at once, as before). ``--probe`` also measures what a client
waiting meanwhile sees: the stall probe (benchmarks/stallprobe.py, a PINGREQ every 10 ms from its
own process; ``leave_stall_longest_ms``, and ``leave_own_stall_longest_ms``: the broker thread's own
CPU within the longest round trip) and the loop's rounds during the leave (``leave_round_longest_ms``:
the broker thread's CPU from one poll's return to the next poll, that is what a packet read in
that poll waits for at most before its own callback runs; ``leave_ready_most``: the most sockets one
poll returned). ``--max-events N`` bounds what one poll returns (``epoll_wait``'s maxevents;
asyncio asks for as many as it watches). ``--slow-ping``: the probe's PINGREQs wake the reader's
task, as every packet but a lone PINGREQ or PUBACK still does (before 2026-11-26's seventh session a
lone PINGREQ did too: ``PacketReader.PING_AT_ONCE``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import math
import pstats
import select
import selectors
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.memory import _Here, _write_accounts
from benchmarks.scenarios import Crowds
from benchmarks.stallprobe import stalls
from imcli.broker import teardown
from imcli.broker.gcpause import calm_collector
from imcli.broker.limits import Limits
from imcli.broker.reader import PacketReader
from imcli.broker.settings import BrokerSettings
from imcli.serve import livefirst, loops
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


class _Rounds:
    """The broker loop's polls, wrapped (its selector's ``select``, called in the broker's thread): the
    thread's CPU from each poll's return to the next poll, and how many sockets each poll returned;
    with ``max_events``, at most that many per poll (``epoll_wait``'s maxevents; level-triggered, the
    rest are returned by the next polls)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_events: int = 0) -> None:
        self.selector: Any = loop._selector  # type: ignore[attr-defined]  # asyncio private: a benchmark's look inside
        self.inner, self.max_events = self.selector.select, max_events
        self.returned: float | None = None
        self.measuring = False
        self.longest: list[tuple[float, int]] = []  # (CPU seconds, sockets the poll returned), the 5 longest
        self.rounds = self.ready_most = self._ready = 0
        self.selector.select = self

    def __call__(self, timeout: float | None = None) -> list[Any]:
        if self.measuring and self.returned is not None:
            stretch = time.thread_time() - self.returned
            self.longest = sorted([*self.longest, (stretch, self._ready)], reverse=True)[:5]
            self.rounds += 1
        events = self._bounded(timeout) if self.max_events else self.inner(timeout)
        self.returned, self._ready = time.thread_time(), len(events)
        if self.measuring:
            self.ready_most = max(self.ready_most, len(events))
        return events

    def _bounded(self, timeout: float | None) -> list[Any]:
        """``selectors.EpollSelector.select`` with at most ``max_events`` (its own code, CPython 3.11)."""
        sel = self.selector
        wait = -1.0 if timeout is None else 0.0 if timeout <= 0 else math.ceil(timeout * 1e3) * 1e-3
        try:
            fd_events = sel._selector.poll(wait, min(max(len(sel._fd_to_key), 1), self.max_events))
        except InterruptedError:
            return []
        ready = []
        for fd, event in fd_events:
            mask = (selectors.EVENT_READ if event & ~select.EPOLLOUT else 0) | (
                selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0
            )
            key = sel._fd_to_key.get(fd)
            if key:
                ready.append((key, mask & key.events))
        return ready


class _Broker:
    """What ``stallprobe.stalls`` needs of a broker: its port, and the thread whose CPU is the loop's."""

    def __init__(self, port: int, thread: threading.Thread) -> None:
        self.port, self.pid = port, thread.native_id  # /proc/<tid>/schedstat: that thread's own


def measure(
    users: int,
    processes: int,
    profile: bool,
    stock_gc: bool = False,
    listeners: int = 0,
    *,
    slice_: int = teardown.SLICE,
    probe: bool = False,
    max_events: int = 0,
) -> dict[str, object]:
    result: dict[str, object] = {
        "users": users,
        "listeners": listeners,
        "gc": "stock" if stock_gc else "calm_collector",
        "slice": slice_,
        "max_events": max_events,
        "loop": loops.chosen_loop(),  # IMCLI_LOOP (imcli/serve/loops.py)
        "live_first": loops.LIVE_FIRST and livefirst.LiveFirstSelector.BOUND,
    }
    teardown.SLICE = slice_ or 1 << 30  # 0: no gate (every end at once)
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
            # the rounds are asyncio's selector's polls: uvloop's (libuv's) are not to be wrapped from Python
            selector = hasattr(loop, "_selector")
            rounds = _Rounds(loop, max_events) if (probe or max_events) and selector else None
            before_join = _cpu(thread)
            here: Any = _Here(info.address.port)  # what Crowds.join needs of a broker
            with contextlib.ExitStack() as stack:
                pings = stack.enter_context(stalls(_Broker(info.address.port, thread))) if probe else None  # type: ignore[arg-type]
                with Crowds.join(here, users, processes, status=False, listeners=listeners) as (_, joined):
                    result["joined"] = joined["ok"]
                    result["join_cpu_us_per_user"] = round((_cpu(thread) - before_join) * 1e6 / users, 1)
                    time.sleep(3)
                    if profile:
                        loop.call_soon_threadsafe(profiler.enable)
                    if pings is not None:
                        pings.phase("leave")
                    if rounds is not None:
                        rounds.measuring = True
                    before_leave, collector.seconds = _cpu(thread), 0.0
                time.sleep(5)  # every connection has ended, every session forgotten
                result["leave_cpu_us_per_user"] = round((_cpu(thread) - before_leave) * 1e6 / users, 1)
                result["leave_gc_cpu_us_per_user"] = round(collector.seconds * 1e6 / users, 1)
                if rounds is not None:
                    rounds.measuring = False
                if profile:
                    loop.call_soon_threadsafe(profiler.disable)
                    time.sleep(0.5)
            if pings is not None:
                result.update({k: v for k, v in pings.items() if k.startswith("leave_")})
            if rounds is not None:
                result["leave_round_longest_ms"] = [(round(cpu * 1000, 1), ready) for cpu, ready in rounds.longest]
                result["leave_rounds"], result["leave_ready_most"] = rounds.rounds, rounds.ready_most
            gate = info.broker.teardown if info.broker is not None else None
            result["ends_waited_for_a_turn"] = gate.waited if gate is not None else None
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
    parser.add_argument("--slice", type=int, default=teardown.SLICE, help="ends per loop round (0: no gate)")
    parser.add_argument("--probe", action="store_true", help="PINGREQ round trips and the loop's rounds")
    parser.add_argument("--max-events", type=int, default=0, help="at most this many sockets per poll")
    parser.add_argument(
        "--plain-selector",
        action="store_true",
        help="the stdlib's epoll selector, as before 2026-11-27 (not livefirst.LiveFirstSelector)",
    )
    parser.add_argument(
        "--slow-ping",
        action="store_true",
        help="the probe's PINGREQs through the reader's task, as before 2026-11-26's seventh session",
    )
    parser.add_argument("--bound", type=int, default=0, help="LiveFirstSelector.BOUND: events served a round")
    args = parser.parse_args()
    PacketReader.PING_AT_ONCE = not args.slow_ping
    loops.LIVE_FIRST = not args.plain_selector
    if args.bound:
        livefirst.LiveFirstSelector.BOUND = args.bound
    figures = measure(
        args.users, args.processes, args.profile, args.stock_gc, args.listeners,
        slice_=args.slice, probe=args.probe, max_events=args.max_events,
    )  # fmt: skip
    text = figures.pop("profile", None)
    print(json.dumps(figures, indent=1))
    if text:
        print(text)


if __name__ == "__main__":
    main()
