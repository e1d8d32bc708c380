"""What the embedded broker's loop waits for while a room's chat goes on, with no transfer (issue 16, eighth session).

    python -m benchmarks.idlewait [--seconds 10] [--period-ms 5] [--at-once] [--reference]

The broker in this process (``serve_here``, as ``imcli serve`` runs it), the room ping
(``benchmarks/roomping.py``) in its own process, ``--seconds`` of pings every ``--period-ms``. For
every loop callback that used 100 µs of CPU or more (a ping's handling, nearly all of them): its wall
time, its thread CPU time (``time.thread_time``) and how long the loop's thread waited in the run
queue meanwhile (``/proc/self/task/<tid>/schedstat``: runnable, not running: another thread or
process had the core); what is left of the wall time is ``blocked`` (the interpreter's lock, or a
system call). Also the journal writer's batches, and how many began while such a callback ran.
``--at-once``: the journal hands each row to its writer as soon as ``record`` has it, as before the
eighth session (imcli/broker/journal.py), for the comparison. One JSON line: the pings' p50, p99 and
how many took over 5 ms, then each figure's p50, p99 and sum in ms, and the longest callbacks by CPU.
``--reference``: meanwhile, a process of its own runs a fixed piece of pure Python (``REFERENCE``,
about 0.6 ms of CPU) every 5 ms and reports its thread CPU's p50, p99 and longest: how much the
machine itself stretches the same work now and then (``reference_cpu_ms``), beside the broker's.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.brokers import REPO
from benchmarks.memory import _Here, serve_here
from benchmarks.quantile import quantile, r
from benchmarks.roomping import RoomPing

HEAVY = 0.0001  # seconds of CPU: a callback that did a ping's work
REFERENCE = {"text": "hello world", "id": "abc", "ts": 1.0, "n": list(range(20))}  # 60 json round trips of it


def reference(seconds: float) -> dict[str, Any]:
    """The fixed piece, every 5 ms for ``seconds``: its thread CPU time's p50, p99 and longest (ms)."""
    used: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        cpu = time.thread_time()
        for _ in range(60):
            json.loads(json.dumps(REFERENCE))
        used.append((time.thread_time() - cpu) * 1000)
        time.sleep(0.005)
    return {"runs": len(used), "cpu_ms_p50_p99_max": [r(quantile(used, 0.5)), r(quantile(used, 0.99)), r(max(used))]}


class _Probe:
    def __init__(self) -> None:
        self.on = False
        self.callbacks: list[tuple[float, float, float, float, str]] = []  # start, wall, CPU, run queue (s), what
        self.batches: list[float] = []  # the writer's batches' starts (perf_counter)

    def install(self, at_once: bool) -> None:
        """In the thread that will run the broker's loop."""
        from imcli.archive.store import ArchiveStore
        from imcli.broker.journal import Journal
        from imcli.core.wire import Received

        schedstat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        loop_thread, probe, run = threading.get_ident(), self, asyncio.events.Handle._run

        def queued() -> float:
            return int(os.pread(schedstat, 100, 0).split()[1]) / 1e9

        def timed(handle: asyncio.Handle) -> None:
            if not probe.on or threading.get_ident() != loop_thread:
                run(handle)
                return
            started, cpu, waited = time.perf_counter(), time.thread_time(), queued()
            run(handle)
            used = time.thread_time() - cpu
            if used >= HEAVY:
                what = getattr(handle, "_callback", None)
                name = getattr(getattr(what, "__self__", None), "get_coro", None)
                label = name().__qualname__ if callable(name) else getattr(what, "__qualname__", repr(what))
                took = time.perf_counter() - started
                probe.callbacks.append((started, took, used, queued() - waited, str(label)))

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]
        add_many = ArchiveStore.add_many

        def noted(store: ArchiveStore, items: Sequence[tuple[Received, float]]) -> None:
            if probe.on:
                probe.batches.append(time.perf_counter())
            add_many(store, items)

        ArchiveStore.add_many = noted  # type: ignore[method-assign,assignment]
        if at_once:
            record = Journal.record_line  # Journal.record's too (a chat line's own path calls it directly)

            def handed_at_once(journal: Journal, username: str | None, topic: str, data: bytes) -> None:
                record(journal, username, topic, data)
                journal._hand_over()

            Journal.record_line = handed_at_once  # type: ignore[method-assign,assignment]


def _ms(values: list[float]) -> list[float | None]:
    """p50, p99 and sum of ``values`` (seconds), in ms."""
    ms = [v * 1000 for v in values]
    return [r(quantile(ms, 0.5)), r(quantile(ms, 0.99)), r(sum(ms), 1)]


def measure(seconds: float, period: float, at_once: bool, with_reference: bool = False) -> dict[str, Any]:
    probe = _Probe()
    pings: list[float] = []
    beside: dict[str, Any] = {}

    def drive(port: int) -> None:
        ping = RoomPing(_Here(port), period=period)  # type: ignore[arg-type]
        try:
            with ping.phase():
                time.sleep(1.0)
            probe.on = True
            other = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.idlewait", "--reference-child", str(seconds)],
                stdout=subprocess.PIPE, text=True, cwd=REPO,
            ) if with_reference else None  # fmt: skip
            with ping.phase() as latencies:
                time.sleep(seconds)
            probe.on = False
            if other is not None:
                beside["reference_cpu_ms"] = json.loads(other.communicate(timeout=seconds + 30)[0])
            pings.extend(latencies)
        finally:
            ping.close()

    probe.install(at_once)
    serve_here(2, "bench-idlewait-", drive)
    heavy = probe.callbacks
    starts = sorted(probe.batches)
    during = 0
    for started, took, *_ in heavy:
        i = bisect.bisect_left(starts, started)
        during += i < len(starts) and starts[i] < started + took
    return {
        "at_once": at_once, "load": round(os.getloadavg()[0], 1), "pings": len(pings),
        "ping_p50_ms": r(quantile(pings, 0.5)), "ping_p99_ms": r(quantile(pings, 0.99)),
        "pings_over_5ms": sum(x > 5 for x in pings),
        "callbacks": len(heavy),
        "cpu_ms_p50_p99_sum": _ms([c for _, _, c, _, _ in heavy]),
        "run_queue_ms_p50_p99_sum": _ms([q for _, _, _, q, _ in heavy]),
        "blocked_ms_p50_p99_sum": _ms([max(0.0, w - c - q) for _, w, c, q, _ in heavy]),
        "writer_batches": len(starts), "writer_batches_begun_during_a_callback": during,
        "longest_by_cpu": [(r(c * 1000), r(w * 1000), r(q * 1000), what)
                           for _, w, c, q, what in sorted(heavy, key=lambda h: -h[2])[:5]],
        **beside,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idlewait", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--period-ms", type=float, default=5.0)
    parser.add_argument("--at-once", action="store_true", help="rows handed to the writer at once (as before)")
    parser.add_argument("--reference", action="store_true", help="a fixed piece of Python timed meanwhile")
    parser.add_argument("--reference-child", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        print(json.dumps(reference(args.reference_child)), flush=True)
        return
    print(json.dumps(measure(args.seconds, args.period_ms / 1000, args.at_once, args.reference)), flush=True)


if __name__ == "__main__":
    main()
