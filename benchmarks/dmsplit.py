"""Where each DM's time goes, piece by piece, with the DM scenario's load (issue 21: DM p99).

    python -m benchmarks.dmsplit [--users 1000] [--samples 1000] [--slow-ms 1] [--keep-ms 0.2]
                                 [--flood-rate 0 --flood-listeners 50] [--top 8]

The broker runs in this process as ``imcli serve`` runs it (benchmarks/dmtail.py: its workers in
their child process, the collector tuned), with the DM scenario's background (1,000 idle users,
50 room listeners, 10 room messages a second; ``--flood-rate`` adds the ``dmflood`` scenario's
room flood, ``mosquitto_pub`` into a room of ``--flood-listeners`` ``mosquitto_sub``), and the
scenario's own pinger (``scenarios.dm_pings``) in a process of its own. ``perf_counter`` is one
clock for every process of the machine (CLOCK_MONOTONIC), so each DM's way is cut where the
broker saw it:

* ``busy`` and ``wake``: from the pinger's send (its stamp, taken just before its task writes)
  to the return of the broker's ``select()`` of the round before the one that handled the DM
  (its bytes came in that round's ``_read_ready``): ``busy`` while the broker's loop was still
  running callbacks when the DM was sent (until it next entered ``select()``), ``wake`` the rest
  (the pinger's write, the kernel's loopback, the broker's process waiting to be scheduled);
* ``queue``: from that ``select()``'s return to the start of the reader's step that handled the
  DM (the callbacks run ahead of it, in that round and the next);
* ``path``: from that step's start to the start of the ``Deliveries.flush`` that writes the
  recipient's copy (the DM's own work: its PUBLISH read and checked, its fan-out), wall and CPU;
* ``to_client``: from that write to the pinger's receipt (the kernel, the pinger's process and
  its event loop).

Every broker callback of ``--keep-ms`` or more is kept with its name, and the callbacks that
ran in each DM's ``busy`` and ``queue`` are summed by kind: for each DM slower than ``--slow-ms``
the largest piece and what ran ahead of it. Wall times on a loaded machine are the machine's;
the CPU figures are the broker thread's own.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import io
import json
import pstats
import selectors
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from benchmarks.brokers import REPO
from benchmarks.memory import _Here, serve_here
from benchmarks.scenarios import Crowds, dm_pings
from imcli.broker.fanout import WRITE_AT_ONCE, Deliveries, FanOut

PIECES = ("busy", "wake", "queue", "path", "to_client")
DM_TO = "/user/pongr/dm/"  # the pinger's receiver


def _shape(topic: str) -> str:
    """A topic without its names: ``im/room/*/*``, ``im/user/*/dm/*``."""
    levels = topic.split("/")
    kept = (0, 1, 3) if levels[1:2] == ["user"] else (0, 1)
    return "/".join(level if i in kept else "*" for i, level in enumerate(levels))


def _tag(copies: int, shapes: set[str]) -> str:
    """What a callback published: the topics' shapes and how many copies (1-4: a DM's; 5+: a room's)."""
    if not copies and not shapes:
        return ""
    return f" [{'1-4' if copies <= WRITE_AT_ONCE else '5+'} copies of {' '.join(sorted(shapes))}]"


def _kind(callback: Any, tag: str = "") -> str:
    """A callback's name: a task's step by its coroutine, anything else by its function; with
    what it published (``_tag``)."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        name = "task " + str(getattr(owner.get_coro(), "__qualname__", "?"))
    else:
        name = str(getattr(callback, "__qualname__", type(callback).__qualname__))
    return name + tag


class SplitProbe:
    """Inside the broker's thread: every ``select()`` (entered, returned), every callback (start,
    end, CPU, callback) and every DM to the pinger's receiver (its payload, the start of the
    callback that handled it, the start of the ``Deliveries.flush`` that wrote its copy, the CPU
    between the two)."""

    def __init__(self) -> None:
        self.thread = 0
        self.profile = self.profiling = False  # whether it should be, and is, on
        self.selects: list[tuple[float, float]] = []  # (entered, returned)
        self.callbacks: list[tuple[float, float, float, Any, str]] = []  # (start, end, CPU s, callback, _tag)
        self.copies = self.copies_at_start = 0  # Deliveries.add calls, ever; when the DMs began
        self.notices = 0  # notices published (the workers' sync markers, the broker's refusals)
        self.notice_texts: list[str] = []  # the first few (what went wrong)
        self.shapes: set[str] = set()  # the shapes of the topics published in the callback under way
        self.profiler: cProfile.Profile | None = None  # started by the broker's thread at its next callback
        self.dms: list[tuple[bytes, float, float, float]] = []  # (payload, step start, written, step CPU to written)
        self._step_start = self._step_cpu = 0.0
        self._flushed = self._flushed_cpu = 0.0  # the start of the last Deliveries.flush, wall and CPU

    def install(self) -> None:
        self.thread = threading.get_ident()
        probe = self
        run = asyncio.events.Handle._run
        select = selectors.EpollSelector.select
        publish = FanOut.publish
        flush = Deliveries.flush
        add = Deliveries.add

        def timed(handle: asyncio.Handle) -> None:
            if threading.get_ident() != probe.thread:
                run(handle)
                return
            if probe.profiler is not None and probe.profiling != probe.profile:
                probe.profiling = probe.profile
                if probe.profile:
                    probe.profiler.enable()
                else:
                    probe.profiler.disable()
            started = probe._step_start = time.perf_counter()
            cpu = probe._step_cpu = time.thread_time()
            copies = probe.copies
            probe.shapes.clear()
            run(handle)
            tag = _tag(probe.copies - copies, probe.shapes)
            probe.callbacks.append((started, time.perf_counter(), time.thread_time() - cpu, handle._callback, tag))  # type: ignore[attr-defined]

        def added(deliveries: Deliveries, *args: Any) -> None:
            probe.copies += 1
            add(deliveries, *args)

        def selected(selector: selectors.EpollSelector, timeout: float | None = None) -> Any:
            if threading.get_ident() != probe.thread:
                return select(selector, timeout)
            entered = time.perf_counter()
            ready = select(selector, timeout)
            probe.selects.append((entered, time.perf_counter()))
            return ready

        def flushed(deliveries: Deliveries, *only: Any) -> None:
            probe._flushed, probe._flushed_cpu = time.perf_counter(), time.thread_time()
            flush(deliveries, *only)

        async def published(fan_out: FanOut, broadcast: dict[str, Any]) -> None:
            await publish(fan_out, broadcast)
            if threading.get_ident() != probe.thread:
                return
            probe.shapes.add(_shape(str(broadcast.get("topic"))))
            if "/notice" in str(broadcast.get("topic")):
                probe.notices += 1
                if len(probe.notice_texts) < 3:
                    probe.notice_texts.append(bytes(broadcast["data"] or b"")[:200].decode(errors="replace"))
            if DM_TO in str(broadcast.get("topic")):
                probe.dms.append((
                    bytes(broadcast["data"] or b""), probe._step_start, probe._flushed,
                    probe._flushed_cpu - probe._step_cpu,
                ))  # fmt: skip

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]
        selectors.EpollSelector.select = selected  # type: ignore[method-assign,assignment]
        FanOut.publish = published  # type: ignore[method-assign,assignment]
        Deliveries.flush = flushed  # type: ignore[method-assign,assignment]
        Deliveries.add = added  # type: ignore[method-assign,assignment]


def _pieces(sent: float, received: float, dm: tuple[bytes, float, float, float], probe: SplitProbe,
            entered: list[float], returned: list[float], starts: list[float]) -> dict[str, Any]:  # fmt: skip
    """One DM's pieces (ms) and what ran in the broker before its step (CPU ms by kind)."""
    _, step, written, step_cpu = dm
    # the select() whose round read the DM's bytes: the last one to return before the step's own round
    k = bisect.bisect_right(returned, step) - 1  # the step's round
    read_round = max(k - 1, 0)
    read_at = returned[read_round]
    if read_at < sent:  # not behind the send: the bytes came in the step's own round (or the clocks disagree)
        read_at = returned[k]
    # the loop at the send: in select() (idle) or running callbacks (busy until it next entered select())
    j = bisect.bisect_right(entered, sent) - 1
    idle = j >= 0 and returned[j] >= sent
    next_select = entered[j + 1] if j + 1 < len(entered) else read_at
    busy = 0.0 if idle else max(0.0, min(next_select, read_at) - sent)
    ahead: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    first = bisect.bisect_left(starts, sent)
    for start, _end, cpu, callback, tag in probe.callbacks[first:]:
        if start >= step:
            break
        kind = ahead[_kind(callback, tag)]
        kind[0] += cpu * 1000
        kind[1] += 1
    return {
        "total": (received - sent) * 1000,
        "busy": busy * 1000,
        "wake": max(0.0, read_at - sent - busy) * 1000,
        "queue": max(0.0, step - read_at) * 1000,
        "path": (written - step) * 1000,
        "path_cpu": step_cpu * 1000,
        "to_client": (received - written) * 1000,
        "ahead_cpu": sum(c for c, _ in ahead.values()),
        "ahead": sorted(((k, round(c, 3), int(n)) for k, (c, n) in ahead.items()), key=lambda a: -a[1]),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 3), "p90": round(q[89], 3), "p99": round(q[98], 3), "max": round(max(values), 3)}


def explain(
    stamps: list[tuple[str, float, float]], probe: SplitProbe, slow_ms: float, keep_ms: float, top: int
) -> dict[str, Any]:
    by_id = {}
    for dm in probe.dms:
        with contextlib.suppress(ValueError, KeyError):
            by_id[json.loads(dm[0])["id"]] = dm
    entered = [s[0] for s in probe.selects]
    returned = [s[1] for s in probe.selects]
    starts = [c[0] for c in probe.callbacks]
    rows = [_pieces(sent, received, by_id[i], probe, entered, returned, starts)
            for i, sent, received in stamps if i in by_id]  # fmt: skip
    result: dict[str, Any] = {"samples": len(stamps), "seen_in_broker": len(rows)}
    for piece in ("total", *PIECES, "path_cpu", "ahead_cpu"):
        result[piece + "_ms"] = _quantiles([r[piece] for r in rows])
    slow = [r for r in rows if r["total"] >= slow_ms]
    result[f"dms_over_{slow_ms:g}ms"] = len(slow)
    largest: dict[str, int] = defaultdict(int)
    for r in slow:
        largest[max(PIECES, key=lambda p: r[p])] += 1
    result["slow_by_largest_piece"] = dict(largest)
    result["slow_mean_ms"] = (
        {p: round(statistics.fmean(r[p] for r in slow), 3) for p in (*PIECES, "ahead_cpu")} if slow else {}
    )
    # what the slow DMs waited behind: the CPU of the callbacks run ahead of their step, by kind
    behind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in slow:
        for kind, cpu, n in r["ahead"]:
            behind[kind][0] += cpu
            behind[kind][1] += n
    result["slow_waited_behind_cpu_ms"] = sorted(
        ((k, round(c, 1), int(n)) for k, (c, n) in behind.items()), key=lambda x: -x[1]
    )[:10]
    result["worst"] = [
        {k: (round(v, 3) if isinstance(v, float) else v[:4] if k == "ahead" else v) for k, v in r.items()}
        for r in sorted(slow, key=lambda r: -r["total"])[:top]
    ]
    result["background"] = background(probe, by_id, keep_ms)
    if probe.callbacks:
        seconds = max(probe.callbacks[-1][1] - probe.callbacks[0][0], 1e-9)
        result["broker_cpu_ms_per_s"] = round(sum(c[2] for c in probe.callbacks) * 1000 / seconds, 1)
        result["callbacks_per_s"] = round(len(probe.callbacks) / seconds)
        copies = probe.copies - probe.copies_at_start
        result["copies_per_s"] = round(copies / seconds)
        # the broker's CPU per copy it wrote, everything included (the PUBACKs, the DMs, the checks)
        result["cpu_us_per_copy"] = round(sum(c[2] for c in probe.callbacks) * 1e6 / max(copies, 1), 1)
    result["notices"] = probe.notices
    result["first_notices"] = probe.notice_texts
    result["callbacks"] = len(probe.callbacks)
    result["rounds"] = len(probe.selects)
    return result


def background(probe: SplitProbe, by_id: dict[str, Any], keep_ms: float) -> list[tuple[str, float, int, float, float]]:
    """The broker's callbacks other than the DMs' own steps, by kind: (kind, CPU ms a second,
    count, p99 and max CPU ms of one), the largest CPU a second first."""
    dm_steps = {dm[1] for dm in by_id.values()}
    if not probe.callbacks:
        return []
    seconds = max(probe.callbacks[-1][1] - probe.callbacks[0][0], 1e-9)
    kinds: dict[str, list[float]] = defaultdict(list)
    for start, _end, cpu, callback, tag in probe.callbacks:
        if start not in dm_steps:
            kinds[_kind(callback, tag)].append(cpu * 1000)
    rows = []
    for kind, cpus in kinds.items():
        cpus.sort()
        if cpus[-1] >= keep_ms:
            p99 = cpus[min(len(cpus) - 1, int(len(cpus) * 0.99))]
            rows.append((kind, round(sum(cpus) / seconds, 2), len(cpus), round(p99, 3), round(cpus[-1], 3)))
    return sorted(rows, key=lambda r: -r[1])[:12]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"users": args.users, "flood_rate": args.flood_rate}
    probe = SplitProbe()

    def drive(port: int) -> None:
        with contextlib.ExitStack() as stack:
            _, joined = stack.enter_context(Crowds.join(_Here(port), args.users, 2, listeners=50, talk=10.0))  # type: ignore[arg-type]
            result["joined"] = joined["ok"]
            if args.flood_rate:
                from benchmarks.fanout import room_flood

                result["flood"] = stack.enter_context(room_flood(_Here(port), args.flood_listeners, args.flood_rate))  # type: ignore[arg-type]
            time.sleep(5)  # the presence worker's records
            probe.callbacks.clear()
            probe.selects.clear()
            probe.notices, probe.notice_texts = 0, []
            probe.copies_at_start = probe.copies
            if args.profile:
                probe.profiler, probe.profile = cProfile.Profile(), True
            pinger = subprocess.run(
                [sys.executable, "-m", "benchmarks.dmsplit", "--pinger", str(port), "--samples", str(args.samples)],
                capture_output=True, text=True, cwd=REPO, check=True,
            )  # fmt: skip
            if probe.profiler is not None:
                probe.profile = False
                time.sleep(0.5)  # its disable comes from the broker's thread (a profiler is per thread)
                out = io.StringIO()
                pstats.Stats(probe.profiler, stream=out).sort_stats("tottime").print_stats(40)
                result["profile"] = out.getvalue()
            stamps = [tuple(s) for s in json.loads(pinger.stdout)]
            result.update(explain(stamps, probe, args.slow_ms, args.keep_ms, args.top))

    probe.install()
    serve_here(args.users, "bench-dmsplit-", drive)
    return result


async def _pings(port: int, samples: int) -> list[tuple[str, float, float]]:
    stamps: list[tuple[str, float, float]] = []
    await dm_pings(port, samples, 50.0, stamps=stamps)
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--slow-ms", type=float, default=1.0)
    parser.add_argument("--keep-ms", type=float, default=0.2)
    parser.add_argument("--flood-rate", type=float, default=0.0)
    parser.add_argument("--flood-listeners", type=int, default=50)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="cProfile of the broker's thread over the DMs")
    parser.add_argument("--pinger", type=int, default=0, help=argparse.SUPPRESS)  # the pinger's process
    args = parser.parse_args()
    if args.pinger:
        print(json.dumps(asyncio.run(_pings(args.pinger, args.samples))))
        return
    print(json.dumps(measure(args), indent=1))


if __name__ == "__main__":
    main()
