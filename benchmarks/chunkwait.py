"""How much of the broker's loop a chat ping waits for behind files' chunks, in CPU time (issue 16).

    python -m benchmarks.chunkwait [--mib 50] [--transfers 2] [--period-ms 5] [--idle-s 3] [--no-rule]

The embedded broker in this process (``serve_forever``, through ``benchmarks/memory.py``'s
``serve_here``, as ``benchmarks/filestail.py`` runs it), the room ping (``benchmarks/roomping.py``)
in its own process, and ``--transfers`` uploads and downloads of a new ``--mib`` file to a DM by a
process of their own. For each ping: the loop's CPU time spent handling files' chunks (PUBLISHes
of ``reader.BULK`` bytes or more) after the ping's bytes were read from its socket and before the
ping itself was handled. CPU time of the loop's thread, so what other processes do to the machine
moves it little. ``--no-rule`` lifts ``reader.BULK`` out of reach: chunks are handled as soon as
they are read, as before the rule (imcli/broker/reader.py), for the comparison. One JSON line per
transfer: pings, chunks, the pings that waited behind a chunk read after them (how many, their
share), the p99 and the longest such wait, and a chunk's median handling time (ms of CPU); and
for every ping, all the loop's CPU between its bytes and its handling (``before_handled_cpu_ms``:
p50, p99, longest) during the transfer and during ``--idle-s`` of pings before it without one
(``idle_before_handled_cpu_ms``): the broker's own share of a ping's wait, idle and in transfer.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.files import MIB, _source
from benchmarks.filestail import _transfer
from benchmarks.memory import _Here, serve_here
from benchmarks.roomping import TOPIC, RoomPing


class _Waits:
    """Loop CPU stamps: when each connection's bytes were last fed to its reader, when each chunk's
    handling began and ended, when each ping's began (``time.thread_time``: the loop's thread)."""

    def __init__(self) -> None:
        self.on = False
        self.chunks: list[tuple[float, float]] = []
        self.pings: list[tuple[float, float]] = []  # (its bytes fed, its handling began)

    def install(self, bulk: int) -> None:
        import asyncio.streams

        from imcli.broker.amqtt_adapter import ImBroker
        from imcli.broker.reader import PacketReader

        feed = asyncio.streams.StreamReader.feed_data
        take = PacketReader._take

        def fed(reader: Any, data: bytes) -> None:
            reader._bench_fed = time.thread_time()
            feed(reader, data)

        def taken(packets: Any, into: Any, data: bytes) -> None:
            # the reader takes a connection's bytes straight from its transport (reader._take): the
            # stream is fed only where the reader could not hook its protocol
            packets._guard.stream._bench_fed = time.thread_time()
            take(packets, into, data)

        deliver_now = ImBroker.deliver_now
        waits = self

        async def handled(broker: Any, session: Any, message: Any, acknowledged: bool) -> bool:
            start = time.thread_time()
            try:
                result: bool = await deliver_now(broker, session, message, acknowledged)
                return result
            finally:
                if waits.on:
                    waits.note(broker, session, message, start, bulk)

        deliver_file = getattr(ImBroker, "deliver_file", None)  # a chunk's own path (seventh session)

        async def handled_file(broker: Any, session: Any, topic: str, payload: bytes) -> bool:
            assert deliver_file is not None
            start = time.thread_time()
            try:
                return bool(await deliver_file(broker, session, topic, payload))
            finally:
                if waits.on and len(payload) >= bulk:
                    waits.chunks.append((start, time.thread_time()))

        deliver_line = getattr(ImBroker, "deliver_line", None)  # a QoS 1 chat line's own path (ninth session)

        async def handled_line(broker: Any, session: Any, topic: str, payload: bytes) -> bool:
            assert deliver_line is not None
            start = time.thread_time()
            try:
                return bool(await deliver_line(broker, session, topic, payload))
            finally:
                if waits.on:
                    waits.note(broker, session, SimpleNamespace(topic=topic, data=payload), start, bulk)

        setattr(asyncio.streams.StreamReader, "feed_data", fed)  # noqa: B010 - a benchmark's probe
        setattr(PacketReader, "_take", taken)  # noqa: B010
        setattr(ImBroker, "deliver_now", handled)  # noqa: B010
        if deliver_file is not None:
            setattr(ImBroker, "deliver_file", handled_file)  # noqa: B010
        if deliver_line is not None:
            setattr(ImBroker, "deliver_line", handled_line)  # noqa: B010

    def note(self, broker: Any, session: Any, message: Any, start: float, bulk: int) -> None:
        if len(message.data or b"") >= bulk:
            self.chunks.append((start, time.thread_time()))
        elif (message.topic or "").startswith(TOPIC):
            handler = broker._sessions[session.client_id][1]
            stamp = getattr(getattr(handler.reader, "stream", None), "_bench_fed", None)
            if stamp is not None:
                self.pings.append((stamp, start))

    def before_handled(self) -> list[float]:
        """Per ping, the loop's CPU (ms) between its bytes fed and its handling: all it did meanwhile."""
        return [1000 * (start - fed) for fed, start in self.pings]

    def report(self) -> dict[str, Any]:
        starts = [s for s, _ in self.chunks]
        waits = []
        for fed, start in self.pings:
            later = self.chunks[bisect.bisect_left(starts, fed) :]
            waits.append(1000 * sum(end - begin for begin, end in later if end <= start))
        behind = [w for w in waits if w > 0]
        return {
            "pings": len(waits), "chunks": len(self.chunks),
            "pings_behind_a_later_chunk": len(behind),
            "share_pct": round(100 * len(behind) / len(waits), 2) if waits else None,
            "wait_cpu_ms_p99": round(statistics.quantiles(waits, n=100)[98], 3) if len(waits) >= 10 else None,
            "wait_cpu_ms_max": round(max(waits, default=0.0), 3),
            "chunk_cpu_ms_median": round(1000 * statistics.median(e - s for s, e in self.chunks), 3)
            if self.chunks else None,
            **_spread("before_handled_cpu_ms", self.before_handled()),
        }  # fmt: skip


def _spread(name: str, values: list[float]) -> dict[str, float | None]:
    cuts = statistics.quantiles(values, n=100) if len(values) >= 10 else None
    return {
        f"{name}_p50": round(statistics.median(values), 3) if values else None,
        f"{name}_p99": round(cuts[98], 3) if cuts else None,
        f"{name}_max": round(max(values), 3) if values else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunkwait", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--transfers", type=int, default=2)
    parser.add_argument("--period-ms", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of pings without a transfer, each time")
    parser.add_argument("--no-rule", action="store_true", help="chunks handled as soon as read (before the rule)")
    args = parser.parse_args()
    from imcli.broker import reader

    bulk = reader.BULK
    if args.no_rule:
        reader.BULK = sys.maxsize
    waits = _Waits()
    waits.install(bulk)

    def drive(port: int) -> None:
        ping = RoomPing(_Here(port), period=args.period_ms / 1000)  # type: ignore[arg-type]
        try:
            with tempfile.TemporaryDirectory(prefix="bench-chunkwait-") as tmp:
                for _ in range(args.transfers):
                    source = _source(Path(tempfile.mkdtemp(dir=tmp)), args.mib * MIB)
                    waits.pings.clear()
                    with ping.phase():  # as long without a transfer: the same measure of the pings alone
                        waits.on = True
                        time.sleep(args.idle_s)
                        waits.on = False
                    idle = _spread("idle_before_handled_cpu_ms", waits.before_handled())
                    waits.chunks.clear()
                    waits.pings.clear()
                    with ping.phase():
                        waits.on = True
                        _transfer(port, source)
                        waits.on = False
                    print(json.dumps({"rule": not args.no_rule, **waits.report(), **idle}), flush=True)
        finally:
            ping.close()

    serve_here(2, "bench-chunkwait-", drive)


if __name__ == "__main__":
    main()
