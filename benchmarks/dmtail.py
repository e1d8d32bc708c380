"""Where the slow DMs of the DM latency scenario go (issue 21: DM p99 <= 2 x Mosquitto's).

    python -m benchmarks.dmtail [--users 1000] [--samples 1000] [--slow-ms 5]

Runs the broker as ``imcli serve`` does (``serve_forever`` in this process, its workers in their
child process, the collector tuned by imcli/broker/gcpause.py), signs in ``--users`` idle users
with the DM scenario's background (benchmarks/scenarios.py ``dm_latency``: 50 room listeners, 10
room messages a second), and sends ``--samples`` DMs at 50/s from five senders in a process of
their own, with the scenario's own pinger (``scenarios.dm_pings``). Inside the broker it times
every event-loop callback and every collection (wall clock and the thread's CPU time, with
``time.time()`` stamps); the pinger reports when each DM left and how long it took. Each DM
slower than ``--slow-ms`` is then matched with what the broker's loop did while it was on its
way: a collection, a callback that used the CPU (which one), or a callback that took wall time
but little CPU (the process waited for a core: the machine, not the broker's code). Prints the
counts and the worst cases.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.brokers import REPO, rss_mb
from benchmarks.memory import _Here, serve_here
from benchmarks.scenarios import Crowds, dm_pings

SLOW_CALLBACK_MS = 2.0  # callbacks at least this long are kept
SLOW_ROUND_MS = 20.0  # rounds of the loop whose callbacks took at least this long are kept


def describe(handle: asyncio.Handle) -> str:
    """What a callback ran: for a task's step, its coroutine and the innermost one it now awaits
    (a task's handle says only ``TaskStepMethWrapper`` or ``task_wakeup``), else the handle."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)  # asyncio private: read only
    if not isinstance(task, asyncio.Task):
        return repr(handle)[:160]
    coro: Any = task.get_coro()
    names = [getattr(getattr(coro, "cr_code", None), "co_qualname", repr(coro)[:40])]
    while (inner := getattr(coro, "cr_await", None)) is not None and hasattr(inner, "cr_code"):
        coro = inner
    if coro is not task.get_coro():
        frame = coro.cr_frame
        names.append(f"{coro.cr_code.co_qualname}:{frame.f_lineno if frame else '-'}")
    return "task " + " > ".join(names)


def kind_of(handle: asyncio.Handle) -> str:
    """``describe`` for a task's step; anything else by its function's name, without the handle's
    addresses (callbacks of one kind add up in a round: ``_LoopProbe.rounds``)."""
    callback = getattr(handle, "_callback", None)
    if isinstance(getattr(callback, "__self__", None), asyncio.Task):
        return describe(handle)
    return str(getattr(callback, "__qualname__", type(callback).__qualname__))


class _LoopProbe:
    """Times every event-loop callback (``asyncio.Handle._run``) and every collection; with
    ``rounds=True`` also each round of the loop (``BaseEventLoop._run_once``: the callbacks one
    ``select()`` made ready, run back to back, so that a client's packet that arrives meanwhile waits
    for all of them): a round whose callbacks took ``slow_round_ms`` (``SLOW_ROUND_MS``) or more is
    kept with what ran in it, by kind (``kind_of``)."""

    def __init__(self, *, rounds: bool = False, slow_round_ms: float = SLOW_ROUND_MS) -> None:
        self.callbacks: list[tuple[float, float, float, str]] = []  # (end epoch, wall ms, CPU ms, what)
        self.collections: list[tuple[float, float, float, int]] = []  # (end epoch, wall ms, CPU ms, generation)
        self._gc_started = self._gc_cpu = 0.0
        self.handled = 0
        self.running_since = 0.0  # perf_counter() when the callback now running began; 0.0 between callbacks
        # every callback's (end on perf_counter's clock, wall ms), once a list is put here (filestail: how busy
        # the loop was while a ping was on its way, short callbacks included)
        self.every: list[tuple[float, float]] | None = None
        self.rounds_on = rounds
        self.slow_round_ms = slow_round_ms
        self.thread = 0
        # (end epoch, wall ms, CPU ms, callbacks, [(what, CPU ms, count), ...] by CPU)
        self.rounds: list[tuple[float, float, float, int, list[tuple[str, float, int]]]] = []
        self._round: dict[str, list[float]] = {}  # what -> [CPU s, callbacks] in the round under way
        self._round_wall = self._round_cpu = 0.0
        self._round_count = 0

    def install(self) -> None:
        """Probe the event loops this thread runs (call it in the thread that runs the broker's)."""
        self.thread = threading.get_ident()
        original = asyncio.events.Handle._run
        probe = self

        def timed(handle: asyncio.Handle) -> None:
            if threading.get_ident() != probe.thread:  # another loop (a harness's own, in a thread)
                original(handle)
                return
            what = kind_of(handle) if probe.rounds_on else ""
            started, cpu = time.perf_counter(), time.thread_time()
            probe.running_since = started
            original(handle)
            probe.running_since = 0.0
            ended = time.perf_counter()
            took, used = ended - started, time.thread_time() - cpu
            probe.handled += 1
            if probe.every is not None:
                probe.every.append((ended, took * 1000))
            if probe.rounds_on:
                probe._round_wall += took
                probe._round_cpu += used
                probe._round_count += 1
                kind = probe._round.setdefault(what, [0.0, 0])
                kind[0] += used
                kind[1] += 1
            if took * 1000 >= SLOW_CALLBACK_MS:
                probe.callbacks.append((time.time(), took * 1000, used * 1000, what or describe(handle)))

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]
        gc.callbacks.insert(0, self._collection)
        if self.rounds_on:
            once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

            def counted(loop: asyncio.base_events.BaseEventLoop) -> None:
                once(loop)
                if threading.get_ident() == probe.thread:
                    probe._end_round()

            asyncio.base_events.BaseEventLoop._run_once = counted  # type: ignore[attr-defined]

    def _end_round(self) -> None:
        if self._round_wall * 1000 >= self.slow_round_ms:
            kinds = sorted(((w, c * 1000, int(n)) for w, (c, n) in self._round.items()), key=lambda k: -k[1])
            self.rounds.append(
                (time.time(), self._round_wall * 1000, self._round_cpu * 1000, self._round_count, kinds[:6])
            )
        self._round.clear()
        self._round_wall = self._round_cpu = 0.0
        self._round_count = 0

    def slow_rounds(self, since: float, until: float, top: int = 5) -> dict[str, object]:
        """The rounds over ``slow_round_ms`` that ended between two epochs: how many, and the longest
        with what ran in them (what, CPU ms, callbacks)."""
        these = [r for r in self.rounds if since <= r[0] <= until]
        longest = sorted(these, key=lambda r: -r[1])[:top]
        return {
            f"rounds_over_{self.slow_round_ms:g}ms": len(these),
            "longest_rounds": [
                {
                    "ended_utc": time.strftime("%H:%M:%S", time.gmtime(end)),
                    "wall_ms": round(wall, 1), "cpu_ms": round(cpu, 1), "callbacks": count,
                    "by_kind": [(w, round(c, 1), n) for w, c, n in kinds],
                }
                for end, wall, cpu, count, kinds in longest
            ],
            "callbacks_over_20ms_cpu": [
                (round(w, 1), round(c, 1), what) for end, w, c, what in self.callbacks
                if since <= end <= until and c >= 20.0
            ][:top],
            "collections_over_5ms_cpu": [
                (round(w, 1), round(c, 1), g) for end, w, c, g in self.collections if since <= end <= until and c >= 5.0
            ][:top],
        }  # fmt: skip

    def _collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started, self._gc_cpu = time.perf_counter(), time.thread_time()
            return
        wall = (time.perf_counter() - self._gc_started) * 1000
        if wall >= 0.5:
            cpu = (time.thread_time() - self._gc_cpu) * 1000
            self.collections.append((time.time(), wall, cpu, info["generation"]))


def _explain(pings: list[tuple[float, float]], probe: _LoopProbe, slow_ms: float, top: int) -> dict[str, object]:
    latencies = sorted(s for _, s in pings)
    n = len(latencies)
    result: dict[str, object] = {
        "samples": n,
        "p50_ms": round(latencies[n // 2] * 1000, 2) if n else None,
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 2) if n else None,
        "max_ms": round(latencies[-1] * 1000, 2) if n else None,
    }
    kinds = ("collection", "callback using CPU", "callback waiting for a core", "nothing slow in the broker")
    causes = dict.fromkeys(kinds, 0)
    worst: list[dict[str, object]] = []
    for sent, took in sorted(pings, key=lambda p: -p[1]):
        if took * 1000 < slow_ms:
            break
        end = sent + took
        # what ended while the DM was on its way (a callback's stamp is its end)
        during_gc = [c for c in probe.collections if sent <= c[0] <= end + 0.001]
        during_cb = [c for c in probe.callbacks if sent <= c[0] <= end + 0.001 and c[0] - c[1] / 1000 <= end]
        cpu_cb = [c for c in during_cb if c[2] >= 0.5 * c[1]]
        if any(c[1] >= 1.0 for c in during_gc):
            cause = "collection"
        elif cpu_cb:
            cause = "callback using CPU"
        elif during_cb:
            cause = "callback waiting for a core"
        else:
            cause = "nothing slow in the broker"
        causes[cause] += 1
        if len(worst) < top:
            worst.append({
                "ms": round(took * 1000, 2),
                "cause": cause,
                "collections": [(round(w, 1), round(c, 1), g) for _, w, c, g in during_gc][:4],
                "callbacks": [(round(w, 1), round(c, 1), what) for _, w, c, what in during_cb][:4],
            })  # fmt: skip
    result[f"dms_over_{slow_ms:g}ms_by_cause"] = causes
    result["worst"] = worst
    cpu_callbacks = sorted((c for c in probe.callbacks if c[2] >= 1.0), key=lambda c: -c[2])
    result["callbacks_over_1ms_cpu"] = len(cpu_callbacks)
    result["worst_cpu_callbacks"] = [(round(w, 1), round(c, 1), what) for _, w, c, what in cpu_callbacks[:top]]
    result["collections_by_generation"] = {
        g: {
            "count": sum(1 for c in probe.collections if c[3] == g),
            "cpu_ms_max": round(max((c[2] for c in probe.collections if c[3] == g), default=0.0), 2),
        }
        for g in (0, 1, 2)
    }
    result["loop_callbacks"] = probe.handled
    return result


def measure(users: int, samples: int, slow_ms: float, top: int) -> dict[str, object]:
    result: dict[str, object] = {"users": users}
    probe = _LoopProbe()

    def drive(port: int) -> None:
        with Crowds.join(_Here(port), users, 2, listeners=50, talk=10.0) as (_, joined):  # type: ignore[arg-type]
            result["joined"] = joined["ok"]
            time.sleep(5)  # the presence worker's records
            result["rss_mb"] = round(rss_mb(os.getpid()), 1)
            pinger = subprocess.run(
                [sys.executable, "-m", "benchmarks.dmtail", "--pinger", str(port), "--samples", str(samples)],
                capture_output=True, text=True, cwd=REPO, check=True,
            )  # fmt: skip
            pings = [tuple(p) for p in json.loads(pinger.stdout)]
            result.update(_explain(pings, probe, slow_ms, top))

    probe.install()
    serve_here(users, "bench-dmtail-", drive)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--slow-ms", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--pinger", type=int, default=0, help=argparse.SUPPRESS)  # the pinger's process
    args = parser.parse_args()
    if args.pinger:
        print(json.dumps(asyncio.run(dm_pings(args.pinger, args.samples, 50.0))))
        return
    print(json.dumps(measure(args.users, args.samples, args.slow_ms, args.top), indent=1))


if __name__ == "__main__":
    main()
