"""The embedded broker's CPU per MiB of a file transfer, in its loop's thread, and where it goes (issue 16).

    python -m benchmarks.chunkcost [--mib 30] [--transfers 3] [--profile] [--callbacks]

The embedded broker runs in this process as ``imcli serve`` runs it (``serve_forever`` through
``benchmarks/memory.py``'s ``serve_here``, its workers in their child), and ``--transfers`` uploads
and downloads of a new ``--mib`` file to a DM are made one after another by a process of their own
(``benchmarks/filestail.py``'s client). No chat: what a transfer costs alone. One JSON line per
transfer: MB/s, and CPU milliseconds per MiB of the file (both legs) of the broker's loop thread
(``time.pthread_getcpuclockid`` of the thread that runs the loop: what a chat line waits behind),
of the broker's process, of the workers' child and of the transfer's process. CPU time, so the
figure moves little with what the rest of the machine does (it does move: caches, frequency);
compare trees by alternating runs (``PYTHONPATH=<tree>`` runs another checkout's code).

``--profile``: cProfile of the loop thread over the transfers, timed in the thread's CPU
(``time.thread_time``: a wall-clock profile counts the waits for a core); its own cost triples
Python's share, so it ranks the pieces, the per-MiB figures of that run do not count.
``--callbacks``: every loop callback's CPU during each transfer, by what it ran (a task by its
coroutine): how many, their sum per MiB, p50, p99 and the longest, and the twelve longest of all,
i.e. what a chat packet arriving meanwhile can wait behind.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import collections
import cProfile
import io
import json
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.brokerloop import BrokerLoop
from benchmarks.brokers import _children, cpu_seconds
from benchmarks.files import MIB, _source
from benchmarks.filestail import _transfer
from benchmarks.memory import serve_here


class _Callbacks:
    """Every callback's CPU in the loop's thread while ``on``, by what it ran."""

    def __init__(self) -> None:
        self.on = False
        self.seen: list[tuple[float, str]] = []

    def install(self) -> None:
        run = asyncio.events.Handle._run
        probe = self

        def timed(handle: asyncio.events.Handle) -> None:
            if not probe.on:
                run(handle)
                return
            start = time.thread_time()
            run(handle)
            probe.seen.append((time.thread_time() - start, _name(handle)))

        setattr(asyncio.events.Handle, "_run", timed)  # noqa: B010 - a benchmark's probe

    def report(self, mib: int) -> dict[str, Any]:
        by: dict[str, list[float]] = collections.defaultdict(list)
        for seconds, name in self.seen:
            by[name].append(seconds * 1e6)
        kinds = {}
        for name, us in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:8]:
            us.sort()
            kinds[name] = {
                "n": len(us), "ms_per_MiB": round(sum(us) / 1000 / mib, 2),
                "p50_us": round(us[len(us) // 2]), "p99_us": round(us[int(len(us) * 0.99)]), "max_us": round(us[-1]),
            }  # fmt: skip
        longest = sorted(seconds * 1e6 for seconds, _ in self.seen)[-12:]
        return {"callbacks": len(self.seen), "by_kind": kinds, "longest_us": [round(x) for x in longest]}


def _name(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)  # a benchmark's probe: what the handle runs
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return "task " + str(getattr(owner.get_coro(), "__qualname__", "?"))
    name = getattr(callback, "__qualname__", None) or getattr(getattr(callback, "func", None), "__qualname__", None)
    return str(name or type(callback).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunkcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=30)
    parser.add_argument("--transfers", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile of the loop thread, in its CPU time")
    parser.add_argument("--callbacks", action="store_true", help="every loop callback's CPU, by kind")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    loop = BrokerLoop()
    loop.install()
    callbacks = _Callbacks()
    if args.callbacks:
        callbacks.install()
    profile = cProfile.Profile(time.thread_time)
    loop_clock = time.pthread_getcpuclockid(threading.get_ident())  # serve_here runs the loop in this thread
    me = os.getpid()

    def drive(port: int) -> None:
        time.sleep(2)  # the workers' first records
        workers = _children(me)[0]
        with tempfile.TemporaryDirectory(prefix="bench-chunkcost-") as tmp:
            for _ in range(args.transfers):
                source = _source(Path(tempfile.mkdtemp(dir=tmp)), args.mib * MIB)  # new bytes: a real upload
                # this process's CPU from its own clock: /proc's is counted in ticks of 10 ms (20 ms for a
                # 2 MiB transfer), and came out below the loop thread's precise clock (CI, test_benchmarks)
                before = (time.clock_gettime(loop_clock), time.process_time(), cpu_seconds(workers))
                if args.profile:
                    loop.call(profile.enable)
                callbacks.seen.clear()
                callbacks.on = True
                client = _transfer(port, source)
                callbacks.on = False
                if args.profile:
                    loop.call(profile.disable)
                after = (time.clock_gettime(loop_clock), time.process_time(), cpu_seconds(workers))
                per_mib = [round((b - a) * 1000 / args.mib, 2) for a, b in zip(before, after, strict=True)]
                line: dict[str, Any] = {
                    "load": round(os.getloadavg()[0], 1), "MBps": round(args.mib * MIB / client["seconds"] / 1e6, 1),
                    "loop_ms_per_MiB": per_mib[0], "process_ms_per_MiB": per_mib[1],
                    "workers_ms_per_MiB": per_mib[2], "client_ms_per_MiB": round(client["cpu"] * 1000 / args.mib, 2),
                    "profiled": args.profile,
                }  # fmt: skip
                if args.callbacks:
                    line.update(callbacks.report(args.mib))
                print(json.dumps(line), flush=True)

    serve_here(2, "bench-chunkcost-", drive)
    if args.profile:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        print(f"-- cProfile of the loop thread (CPU time)\n{text.getvalue()}")


if __name__ == "__main__":
    main()
