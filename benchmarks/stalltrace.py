"""What the broker's event loop ran when it held the CPU long (issue 21: no stall over 50 ms at 10,000 users).

    python -m benchmarks.stalltrace OUT [--ms 10] -- serve --port P ...   # ``imcli serve`` with its loop traced

Runs imcli's command line (``python -m imcli ARGS``) in this process with the event loop of the
main thread traced in the thread's CPU time (``time.thread_time``: a process waiting for a core on
a shared machine uses none, so the figures are the broker's own work, not the machine's load):

- every callback (``asyncio.Handle._run``) that used ``--ms`` or more: what it was (a task's step:
  its coroutine and where the innermost coroutine it awaits is suspended after the step; else the
  callback's function), when it ended, and how much of it was the collector's (``gc_ms``);
- every round of the loop (``BaseEventLoop._run_once``: ``select()``, the timers due, then the
  callbacks made ready, back to back) that used ``--ms`` or more: its callbacks by kind (CPU ms,
  count) and what the round used outside them (the loop's own upkeep: the timer heap, the
  selector's events), so that many short callbacks of one kind at once name themselves too, and
  asyncio's timers before it (scheduled, of which cancelled: past half, the round rebuilds the heap);
- every collection of the cyclic collector that used ``--ms`` or more (its generation);
- every ``PROFILE_EVERY`` seconds, each kind of callback (a task's coroutine, a function) whose
  longest call used 0.5 ms or more since the last: its calls, CPU and longest (every periodic job
  of the broker, measured where it runs, at the load it runs under).

Each is a JSON line appended to OUT as it happens (only the rare slow ones are written: the cost
on the loop is two ``thread_time`` calls per callback and per round, and a dict's update). ``read(OUT, since, until)``
sums them up for the capacity hold (``python -m benchmarks --only capacity --hold S --trace-stalls``).
Only the broker's process is traced (its workers' child process is not), and only on asyncio's own
event loop (``imcli serve``'s default; uvloop's callbacks and rounds are C code: nothing is recorded).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

TRACE_MS = 10.0  # callbacks, rounds and collections that use this much CPU or more are written
TOP = 12  # the longest of each kind that ``read`` reports
PROFILE_EVERY = 10.0  # seconds between two records of every kind of callback's calls, CPU and longest


def describe(handle: asyncio.Handle) -> str:
    """What a callback ran: a task's step as its chain of coroutines, each with the line it is
    suspended at after the step (not before it), else the callback's module and name."""
    callback = getattr(handle, "_callback", None)  # asyncio private: read only
    task = getattr(callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        name = getattr(callback, "__qualname__", None) or type(callback).__qualname__
        module = getattr(callback, "__module__", None) or ""
        return f"{module}.{name}" if module else str(name)
    chain: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and hasattr(coro, "cr_code") and len(chain) < 8:
        frame = coro.cr_frame
        chain.append(f"{coro.cr_code.co_qualname}:{frame.f_lineno if frame else 'done'}")
        coro = coro.cr_await
    return "task " + " > ".join(chain or [repr(task.get_coro())[:60]])


def kind(callback: object) -> str:
    """A callback's kind without addresses (callbacks of one kind add up in a round)."""
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        return "task " + str(getattr(getattr(task.get_coro(), "cr_code", None), "co_qualname", "?"))
    return str(getattr(callback, "__qualname__", None) or type(callback).__qualname__)


class Tracer:
    """Installs itself on ``asyncio.Handle._run``, ``BaseEventLoop._run_once`` and ``gc.callbacks``
    for the thread that calls ``install`` (the one that runs the broker's loop)."""

    def __init__(self, out: TextIO, ms: float = TRACE_MS) -> None:
        self.out = out
        self.limit = ms / 1000
        self.thread = 0
        self.round: list[tuple[float, object]] = []  # (CPU s, callback) of the round under way
        self._gc_cpu = 0.0
        self._gc_count: tuple[int, int, int] = (0, 0, 0)  # objects by generation as the last full collection began
        self.collecting = 0.0  # CPU seconds the loop's thread spent in collections so far
        self._originals: tuple[Any, Any] = (None, None)
        self.kinds: dict[str, list[float]] = {}  # kind -> [calls, CPU s, longest CPU s] since the last profile
        self._profiled = time.monotonic()

    def write(self, record: dict[str, object]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def install(self) -> None:
        self.thread = threading.get_ident()
        tracer = self
        run = asyncio.events.Handle._run
        once: Callable[[asyncio.AbstractEventLoop], None] = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]
        clock = time.thread_time

        def timed_run(handle: asyncio.Handle) -> None:
            if threading.get_ident() != tracer.thread:
                run(handle)
                return
            cpu, collecting = clock(), tracer.collecting
            run(handle)
            used = clock() - cpu
            callback = handle._callback  # type: ignore[attr-defined]
            tracer.round.append((used, callback))
            k = tracer.kinds.get(what := kind(callback))
            if k is None:
                tracer.kinds[what] = [1, used, used]
            else:
                k[0] += 1
                k[1] += used
                if used > k[2]:
                    k[2] = used
            if used >= tracer.limit:
                tracer.write({"at": time.time(), "what": "callback", "cpu_ms": round(used * 1000, 2),
                              "gc_ms": round((tracer.collecting - collecting) * 1000, 2),
                              "name": describe(handle)})  # fmt: skip

        def timed_once(loop: asyncio.AbstractEventLoop) -> None:
            if threading.get_ident() != tracer.thread:
                once(loop)
                return
            tracer.round.clear()
            # asyncio's timers before the round: how many, how many of them cancelled (past half, the
            # round rebuilds the heap: ``BaseEventLoop._run_once``, asyncio private, read only)
            timers, cancelled = len(loop._scheduled), loop._timer_cancelled_count  # type: ignore[attr-defined]
            cpu, collecting = clock(), tracer.collecting
            once(loop)
            used = clock() - cpu
            if used >= tracer.limit:
                tracer._slow_round(used, tracer.collecting - collecting, (timers, cancelled))
            if time.monotonic() - tracer._profiled >= PROFILE_EVERY:
                tracer.profile()

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
        asyncio.base_events.BaseEventLoop._run_once = timed_once  # type: ignore[attr-defined]
        gc.callbacks.insert(0, self._collection)
        self._originals = (run, once)

    def uninstall(self) -> None:
        """Put asyncio back as it was (tests; the broker's process keeps its tracer to the end)."""
        run, once = self._originals
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        asyncio.base_events.BaseEventLoop._run_once = once  # type: ignore[attr-defined]
        gc.callbacks.remove(self._collection)

    def _slow_round(self, used: float, collecting: float, timers: tuple[int, int]) -> None:
        kinds: dict[str, list[float]] = {}
        for cpu, callback in self.round:
            k = kinds.setdefault(kind(callback), [0.0, 0])
            k[0] += cpu
            k[1] += 1
        in_callbacks = sum(cpu for cpu, _ in self.round)
        top = sorted(kinds.items(), key=lambda item: -item[1][0])[:6]
        self.write({
            "at": time.time(), "what": "round", "cpu_ms": round(used * 1000, 2), "callbacks": len(self.round),
            "outside_callbacks_ms": round((used - in_callbacks) * 1000, 2), "gc_ms": round(collecting * 1000, 2),
            "by_kind": [[name, round(c * 1000, 2), int(n)] for name, (c, n) in top],
            "timers_before": timers[0], "cancelled_timers_before": timers[1],
        })  # fmt: skip
        self.round.clear()

    def profile(self) -> None:
        """Every kind of callback since the last profile whose longest used 0.5 ms or more: calls,
        CPU ms and the longest's CPU ms (the loop's periodic jobs, each measured as it ran)."""
        kinds = [
            [name, int(n), round(c * 1000, 2), round(m * 1000, 2)]
            for name, (n, c, m) in self.kinds.items()
            if m >= 0.0005
        ]
        self.write({"at": time.time(), "what": "profile", "kinds": kinds})
        self.kinds.clear()
        self._profiled = time.monotonic()

    def _collection(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self.thread:
            return
        if phase == "start":
            # a full collection: the objects it will walk, by generation (young, middle, old; the frozen
            # ones are not walked), listed before its CPU is timed (the round's figure includes the listing)
            if info["generation"] == 2:
                self._gc_count = (len(gc.get_objects(0)), len(gc.get_objects(1)), len(gc.get_objects(2)))
            self._gc_cpu = time.thread_time()
            return
        used = time.thread_time() - self._gc_cpu
        self.collecting += used
        if used >= self.limit:
            self.write({"at": time.time(), "what": "collection", "cpu_ms": round(used * 1000, 2),
                        "generation": info["generation"], "collected": info.get("collected", 0),
                        "objects_walked": list(self._gc_count) if info["generation"] == 2 else None})  # fmt: skip


def read(path: Path, since: float = 0.0, until: float = float("inf"), top: int = TOP) -> dict[str, object]:
    """The trace's records between two epochs: how many of each, and the longest (CPU ms, UTC, what)."""
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by the broker's end
                    continue
                if since <= record["at"] <= until:
                    records.append(record)
    except OSError:
        return {}
    figures: dict[str, object] = {"trace_ms": TRACE_MS}
    for what in ("callback", "round", "collection"):
        these = sorted((r for r in records if r["what"] == what), key=lambda r: -r["cpu_ms"])
        figures[f"trace_{what}s"] = len(these)
        figures[f"trace_{what}s_over_50ms"] = sum(1 for r in these if r["cpu_ms"] >= 50)
        figures[f"trace_{what}_longest_ms"] = these[0]["cpu_ms"] if these else 0.0
        figures[f"trace_longest_{what}s"] = [
            {"utc": time.strftime("%H:%M:%S", time.gmtime(r["at"])),
             **{k: v for k, v in r.items() if k not in ("at", "what")}}
            for r in these[:top]
        ]  # fmt: skip
    kinds: dict[str, list[float]] = {}
    for record in records:
        if record["what"] == "profile":
            for name, calls, cpu, longest in record["kinds"]:
                k = kinds.setdefault(name, [0, 0.0, 0.0])
                k[0], k[1], k[2] = k[0] + calls, k[1] + cpu, max(k[2], longest)
    # each kind of callback: its longest (CPU ms), calls, and CPU ms in all (kinds whose longest used 0.5 ms+)
    figures["trace_kinds_by_longest"] = [
        [name, round(longest, 2), int(calls), round(cpu, 1)]
        for name, (calls, cpu, longest) in sorted(kinds.items(), key=lambda kv: -kv[1][2])[: 3 * top]
    ]
    return figures


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or not argv[0] or argv[0].startswith("-"):
        sys.exit("usage: python -m benchmarks.stalltrace OUT [--ms 10] -- IMCLI-ARGS...")
    mine, imcli_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    ms = float(mine[mine.index("--ms") + 1]) if "--ms" in mine else TRACE_MS
    out = Path(mine[0]).open("a", encoding="utf-8")  # noqa: SIM115 - open as long as the broker runs
    Tracer(out, ms).install()
    sys.argv = ["imcli", *imcli_args]
    from imcli.cli.main import main as imcli_main

    imcli_main()


if __name__ == "__main__":
    main()
