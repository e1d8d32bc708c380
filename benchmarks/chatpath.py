"""Where a chat ping's time goes during a file transfer, stage by stage, in wall clock (issue 16).

    python -m benchmarks.chatpath [--mib 100] [--transfers 2] [--period-ms 5] [--idle-s 3] [--no-hold]

The embedded broker in this process (``serve_here``, as ``imcli serve`` runs it), the room ping
(``benchmarks/roomping.py --stamps``) in its own process, and ``--transfers`` uploads and
downloads of a new ``--mib`` file to a DM by a process of their own (``filestail._transfer``).
Every stamp is ``time.perf_counter()`` (CLOCK_MONOTONIC: one clock for every process on Linux).
Per ping: ``sent`` (the pinger, just before its publish), ``taken`` (the broker's transport
callback hands its bytes to the reader), ``begun`` and ``done`` (the reader's handling of the
PUBLISH: checks, fan-out, the copy's write), ``received`` (the listener's callback). Stages:

- ``to_loop`` = taken - sent: the pinger's publish (paho's thread, the kernel) and the broker's
  loop getting to the socket; split by what the loop did meanwhile (``.. _in_callbacks``: wall
  time the loop spent in callbacks, ``.. _in_select``: blocked in ``select()``, the rest: its own
  upkeep, or its thread without a core);
- ``to_handle`` = begun - taken: the reader's task waiting for its step (the round's other callbacks);
- ``handle`` = done - begun;
- ``to_listener`` = received - done: the kernel, and the listener's process getting a core and its
  paho thread the interpreter's lock.

One JSON line per transfer: each stage's p50, p90, p99 during ``--idle-s`` of pings without a
transfer and during the transfer; and for the slowest 2 % of pings in each, each stage's mean,
and the callbacks that overlapped ``to_loop`` (by kind: wall ms, CPU ms, count), so that a slow
ping names what it waited behind. Also, in the loop thread's CPU time (what the machine's load
moves least): the loop's rounds (``round_cpu_ms``: p50, p99, longest, count; the callbacks of
those over 0.5 ms), what is left of the round in progress for a chat packet arriving while the
loop is busy (``residual_ms_busy_q50_q90_q98``), the reader steps; and the chunks handled and
written while the ping's socket was readable already (``chunks_handled_while_chat_waited``,
``chunks_written_while_chat_waited``: count, of how many, their CPU in ms): chunk work that a
ping which had arrived waited behind, which imcli/broker/chatfirst.py is to avoid.
``--no-hold`` takes ``ChatFirst`` out (it never sees chat waiting: as before it), for the
comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.base_events
import asyncio.selector_events
import collections
import json
import os
import selectors
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from benchmarks.chunkcost import _name
from benchmarks.files import MIB, _source
from benchmarks.filestail import _transfer
from benchmarks.memory import _Here, serve_here
from benchmarks.roomping import TOPIC, RoomPing

PINGER = "pinga:files"


class _Stamps:
    """The loop's callbacks and selects (wall start, end, CPU, name) and each ping's stamps."""

    def __init__(self) -> None:
        self.on = False
        self.callbacks: list[tuple[float, float, float, str]] = []
        self.selects: list[tuple[float, float]] = []
        self.rounds: list[tuple[float, float, float, int]] = []  # wall start, end, CPU, callbacks
        # a file's chunks handled and written, and those begun while the ping's socket was readable
        # already (their CPU): the broker's work that a waiting chat message waited behind, which
        # chatfirst.ChatFirst is to avoid (what was begun before it arrived, it waits for anyway)
        self.ping_fd = -1
        self.bulk_steps = self.bulk_writes = 0
        self.late_steps: list[float] = []
        self.late_writes: list[float] = []
        self.taken: float = 0.0  # the pinger's connection's last bytes taken
        self.pings: dict[float, tuple[float, float, float]] = {}  # sent -> (taken, begun, done)

    def install(self) -> None:
        self._install_loop()
        self._install_broker()

    def _install_loop(self) -> None:
        """Every callback, select and round of the loop, stamped while ``on``."""
        stamps = self
        run = asyncio.events.Handle._run

        def timed(handle: asyncio.events.Handle) -> None:
            if not stamps.on:
                run(handle)
                return
            start, cpu = time.perf_counter(), time.thread_time()
            run(handle)
            stamps.callbacks.append((start, time.perf_counter(), time.thread_time() - cpu, _name(handle)))

        select = selectors.EpollSelector.select

        def selected(selector: Any, timeout: float | None = None) -> Any:
            start = time.perf_counter()
            events = select(selector, timeout)
            if stamps.on:
                stamps.selects.append((start, time.perf_counter()))
            return events

        once = getattr(asyncio.base_events.BaseEventLoop, "_run_once")  # noqa: B009 - asyncio private: the probe

        def round_(loop: Any) -> None:
            if not stamps.on:
                once(loop)
                return
            start, cpu, n = time.perf_counter(), time.thread_time(), len(stamps.callbacks)
            once(loop)
            stamps.rounds.append((start, time.perf_counter(), time.thread_time() - cpu, n))

        setattr(asyncio.base_events.BaseEventLoop, "_run_once", round_)  # noqa: B010
        setattr(asyncio.events.Handle, "_run", timed)  # noqa: B010 - a benchmark's probe
        setattr(selectors.EpollSelector, "select", selected)  # noqa: B010

    def _install_broker(self) -> None:
        """The ping's bytes taken and its handling; a chunk's handling and write, and whether the
        ping's socket was readable when they began."""
        from imcli.broker.amqtt_adapter import ImBroker
        from imcli.broker.fanout import CHUNK
        from imcli.broker.reader import PacketReader

        stamps = self
        take = PacketReader._take

        def taken(reader: Any, feed: Any, data: bytes) -> None:
            if reader._client_id == PINGER:
                stamps.taken = time.perf_counter()
                stamps.ping_fd = reader._guard.transport.get_extra_info("socket").fileno()
            take(reader, feed, data)

        def ping_readable() -> bool:
            epoll = asyncio.get_running_loop()._selector._selector  # type: ignore[attr-defined]
            return any(fd == stamps.ping_fd for fd, _ in epoll.poll(0, 64))

        write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

        def written(transport: Any, data: Any) -> None:
            if not (stamps.on and len(data) >= CHUNK):
                write(transport, data)
                return
            readable = ping_readable()
            cpu = time.thread_time()
            write(transport, data)
            if readable:
                stamps.late_writes.append(time.thread_time() - cpu)
            stamps.bulk_writes += 1

        deliver_now = ImBroker.deliver_now

        async def bulk_step(handling: Awaitable[Any]) -> bool:
            """A chunk's handling (either path), its thread CPU counted if a ping waited meanwhile."""
            readable, cpu = ping_readable(), time.thread_time()
            try:
                return bool(await handling)
            finally:
                stamps.bulk_steps += 1
                if readable:
                    stamps.late_steps.append(time.thread_time() - cpu)

        def stamp(topic: str, data: bytes, taken_at: float, begun: float) -> None:
            if stamps.on and topic.startswith(TOPIC):
                sent = json.loads(data)["sent"]
                stamps.pings[round(sent, 9)] = (taken_at, begun, time.perf_counter())

        async def handled(broker: Any, session: Any, message: Any, acknowledged: bool) -> bool:
            begun, taken_at = time.perf_counter(), stamps.taken
            if stamps.on and len(message.data or b"") >= CHUNK:
                return await bulk_step(deliver_now(broker, session, message, acknowledged))
            try:
                result: bool = await deliver_now(broker, session, message, acknowledged)
                return result
            finally:
                stamp(message.topic or "", message.data, taken_at, begun)

        deliver_line = getattr(ImBroker, "deliver_line", None)  # a QoS 1 chat line's own path (ninth session)

        async def handled_line(broker: Any, session: Any, topic: str, payload: bytes) -> bool:
            assert deliver_line is not None
            begun, taken_at = time.perf_counter(), stamps.taken
            try:
                return bool(await deliver_line(broker, session, topic, payload))
            finally:
                stamp(topic, payload, taken_at, begun)

        deliver_file = getattr(ImBroker, "deliver_file", None)  # a chunk's own path (seventh session)

        async def handled_file(broker: Any, session: Any, topic: str, payload: bytes) -> bool:
            assert deliver_file is not None
            if not (stamps.on and len(payload) >= CHUNK):
                return bool(await deliver_file(broker, session, topic, payload))
            return await bulk_step(deliver_file(broker, session, topic, payload))

        setattr(PacketReader, "_take", taken)  # noqa: B010
        setattr(asyncio.selector_events._SelectorSocketTransport, "write", written)  # type: ignore[attr-defined]  # noqa: B010
        setattr(ImBroker, "deliver_now", handled)  # noqa: B010
        if deliver_file is not None:
            setattr(ImBroker, "deliver_file", handled_file)  # noqa: B010
        if deliver_line is not None:
            setattr(ImBroker, "deliver_line", handled_line)  # noqa: B010

    def clear(self) -> None:
        self.callbacks.clear()
        self.selects.clear()
        self.pings.clear()
        self.rounds.clear()
        self.bulk_steps = self.bulk_writes = 0
        self.late_steps.clear()
        self.late_writes.clear()

    def stages(self, latencies: list[tuple[float, float]]) -> list[dict[str, Any]]:
        rows = []
        for sent, ms in latencies:
            got = self.pings.get(round(sent, 9))
            if got is None:
                continue
            taken, begun, done = got
            if not sent <= taken <= begun:  # a stale stamp (bytes of two pings in one read)
                continue
            received = sent + ms / 1000
            in_cb = _overlap(self.callbacks, sent, taken)
            in_sel = _overlap(self.selects, sent, taken)
            cpu = sum(
                c * _overlap([(a, b)], sent, begun) / (b - a)
                for a, b, c, _ in self.callbacks
                if b > sent and a < begun and b > a
            )
            rows.append({"loop_cpu": 1000 * cpu,
                "total": ms, "to_loop": 1000 * (taken - sent), "to_loop_in_callbacks": 1000 * in_cb,
                "to_loop_in_select": 1000 * in_sel, "to_handle": 1000 * (begun - taken),
                "handle": 1000 * (done - begun), "to_listener": 1000 * (received - done),
                "_window": (sent, taken),
            })  # fmt: skip
        return rows

    def behind(self, window: tuple[float, float]) -> dict[str, list[float]]:
        """The callbacks that overlapped a ping's way to the loop, by kind: wall ms, CPU ms."""
        by: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
        start, end = window
        for a, b, cpu, name in self.callbacks:
            if b > start and a < end:
                entry = by[name]
                entry[0] += 1000 * (min(b, end) - max(a, start))
                entry[1] += 1000 * cpu
                entry[2] += 1
        return by


def _residual(rounds: list[float], q: float) -> float:
    """The q-quantile of what is left of the round a chat packet arriving while the loop is busy
    finds in progress (each round's CPU as its length: the loop's own work, whatever the machine)."""
    total = sum(rounds)
    lo, hi = 0.0, max(rounds)
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(max(0.0, c - mid) for c in rounds) / total > 1 - q:
            lo = mid
        else:
            hi = mid
    return float(lo)


def _p50_p99_max_n(ordered: list[float]) -> list[float]:
    """A sorted list's p50, p99 and largest (rounded), and its length."""
    return [round(ordered[len(ordered) // 2], 3), round(ordered[int(len(ordered) * 0.99)], 3), round(ordered[-1], 3),
            len(ordered)]  # fmt: skip


def _overlap(spans: list[tuple[Any, ...]], start: float, end: float) -> float:
    return float(sum(max(0.0, min(s[1], end) - max(s[0], start)) for s in spans if s[1] > start and s[0] < end))


STAGES = (
    "total",
    "loop_cpu",
    "to_loop",
    "to_loop_in_callbacks",
    "to_loop_in_select",
    "to_handle",
    "handle",
    "to_listener",
)


def _summary(stamps: _Stamps, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pings": len(rows),
        "chunks_handled_while_chat_waited": [
            len(stamps.late_steps),
            stamps.bulk_steps,
            round(1000 * sum(stamps.late_steps), 2),
        ],
        "chunks_written_while_chat_waited": [
            len(stamps.late_writes),
            stamps.bulk_writes,
            round(1000 * sum(stamps.late_writes), 2),
        ],
    }
    if len(rows) < 20:
        return out
    for stage in STAGES:
        cuts = statistics.quantiles([r[stage] for r in rows], n=100)
        out[stage] = [round(cuts[49], 3), round(cuts[89], 3), round(cuts[98], 3)]
    rounds = sorted(1000 * (c) for _, _, c, _ in stamps.rounds)
    if rounds:
        out["round_cpu_ms"] = _p50_p99_max_n(rounds)
        busy = sum(rounds)
        out["rounds_over_0.5ms_share_of_loop_cpu"] = (
            round(sum(r for r in rounds if r > 0.5) / busy, 3) if busy else None
        )
        out["residual_ms_busy_q50_q90_q98"] = [round(_residual(rounds, q), 3) for q in (0.5, 0.9, 0.982)]
        in_long: collections.Counter[str] = collections.Counter()
        ends = [n for *_, n in stamps.rounds[1:]] + [len(stamps.callbacks)]
        long = [(rnd, e) for rnd, e in zip(stamps.rounds, ends, strict=True) if rnd[2] > 0.0005]
        for rnd, e in long:
            in_long.update(name for *_, name in stamps.callbacks[rnd[3] : e])
        out["long_rounds"] = len(long)
        out["long_round_callbacks_mean"] = (
            {k: round(v / len(long), 2) for k, v in in_long.most_common(8)} if long else {}
        )
    steps = sorted(1000 * c for _, _, c, name in stamps.callbacks if name == "task AckAfterJournal._reader_loop")
    if steps:
        out["reader_step_cpu_ms"] = _p50_p99_max_n(steps)
    slow = sorted(rows, key=lambda r: -r["total"])[: max(1, len(rows) // 50)]
    out["slowest_2pct_mean"] = {stage: round(statistics.mean(r[stage] for r in slow), 3) for stage in STAGES}
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in slow:
        for name, (wall, cpu, n) in stamps.behind(r["_window"]).items():
            kinds[name][0] += wall / len(slow)
            kinds[name][1] += cpu / len(slow)
            kinds[name][2] += n / len(slow)
    top = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:8]
    out["slowest_behind_per_ping"] = {k: [round(w, 3), round(c, 3), round(n, 1)] for k, (w, c, n) in top}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chatpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--transfers", type=int, default=2)
    parser.add_argument("--period-ms", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--no-hold", action="store_true", help="chunks' writes never held for chat (as before)")
    args = parser.parse_args()
    from imcli.broker import chatfirst

    if args.no_hold:
        setattr(chatfirst.ChatFirst, "chat_waiting", lambda self: False)  # noqa: B010 - the comparison
    stamps = _Stamps()
    stamps.install()

    def drive(port: int) -> None:
        ping = RoomPing(_Here(port), stamps=True, period=args.period_ms / 1000)  # type: ignore[arg-type]
        try:
            with tempfile.TemporaryDirectory(prefix="bench-chatpath-") as tmp:
                for _ in range(args.transfers):
                    source = _source(Path(tempfile.mkdtemp(dir=tmp)), args.mib * MIB)
                    stamps.clear()
                    stamps.on = True
                    with ping.phase() as idle:
                        time.sleep(args.idle_s)
                    stamps.on = False
                    quiet = _summary(stamps, stamps.stages(idle))
                    stamps.clear()
                    looks = [(c.looks, c.held) for c in chatfirst._BY_LOOP.values()]
                    stamps.on = True
                    with ping.phase() as busy:
                        client = _transfer(port, source)
                    stamps.on = False
                    line = {
                        "load": round(os.getloadavg()[0], 1),
                        "MBps": round(args.mib * MIB / client["seconds"] / 1e6, 1),
                        "hold": not args.no_hold,
                        "looks_held": [
                            [c.looks - a, c.held - b]
                            for c, (a, b) in zip(chatfirst._BY_LOOP.values(), looks, strict=False)
                        ],
                        "idle": quiet, "transfer": _summary(stamps, stamps.stages(busy)),
                    }  # fmt: skip
                    print(json.dumps(line), flush=True)
        finally:
            ping.close()

    serve_here(2, "bench-chatpath-", drive)


if __name__ == "__main__":
    main()
