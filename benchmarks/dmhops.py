"""One DM's way through the embedded broker, by event-loop callbacks and CPU (issue 21: DM p99).

    python -m benchmarks.dmhops [--samples 500] [--idle 0] [--gap-ms 2] [--trace 3] [--profile]
                                [--flood-rate 200 --flood-listeners 50]

The embedded broker runs in a thread of this process (``BackgroundServer``, no workers, the
journal on as ever); alice and bob are raw MQTT 3.1.1 connections in the main thread (bob
subscribed to his own filter at QoS 1 and acknowledging every copy). Alice sends ``--samples``
DMs to bob at QoS 1, one at a time: each waits for bob's copy and alice's PUBACK, then
``--gap-ms``, so the broker does nothing else meanwhile (``--idle N`` more connections sit
signed in). Inside the broker's thread every event-loop callback (``Handle._run``) and every
loop round (``_run_once`` that ran a callback) is counted, and the broker thread's CPU time
read, which waiting for a core does not move (the figures to trust on a loaded machine):

* callbacks, rounds and CPU µs per DM, the whole exchange (alice's PUBLISH, bob's copy, bob's
  PUBACK, alice's PUBACK);
* callbacks and rounds from alice's send to bob's receipt (the DM's own path), and the wall
  time of that (the machine's, under load; alice and bob share the broker's interpreter);
* the broker thread's CPU from the first callback after alice's send to the start of the
  ``Deliveries.flush`` that writes bob's copy (``path_cpu_us``: the broker's own share of the
  DM's latency);
* ``--trace N``: the callbacks of the first N DMs' paths, in order, with their wall and CPU µs;
* ``--profile``: cProfile of the broker thread over the run, the top functions by own time;
* ``--flood-rate R``: meanwhile a bot says R lines a second at QoS 1 into a room that
  ``--flood-listeners`` hear (the ``dmflood`` scenario's background): then the callbacks and CPU
  before bob's copy include the flood's that ran ahead of the DM (``path_cpu_us``: the flush
  that writes bob's copy, not the flood's).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.complete import _connect, _field, _packet, accounts
from imcli.broker.fanout import Deliveries
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.wire import ChatMessage, Topics, encode
from imcli.serve.host import BackgroundServer

T = Topics()
BOB = "bob:hops"
PROFILE_SORT = "cumulative"


class _Probe:
    """Counts the callbacks and loop rounds of one thread; keeps a timeline while ``tracing``."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.callbacks = 0
        self.rounds = 0
        self.tracing = False
        self.timeline: list[tuple[float, float, float, str]] = []  # (start, wall s, CPU s, what)
        self._undo: list[Callable[[], None]] = []
        self.first_cpu: float | None = None  # thread CPU when the first callback after ``mark`` started
        self.written_cpu: float | None = None  # ... and when the first ``Deliveries.flush`` after it started

    def mark(self) -> None:
        self.first_cpu = self.written_cpu = None

    def install(self) -> None:
        probe = self
        run = asyncio.events.Handle._run
        run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

        def counted(handle: asyncio.Handle) -> None:
            if threading.get_ident() != probe.thread:
                run(handle)
                return
            probe.callbacks += 1
            if probe.first_cpu is None:
                probe.first_cpu = time.thread_time()
            if not probe.tracing:
                run(handle)
                return
            started, cpu = time.perf_counter(), time.thread_time()
            run(handle)
            wall = time.perf_counter() - started
            probe.timeline.append((started, wall, time.thread_time() - cpu, _what(handle)))

        def once(loop: Any) -> None:
            if threading.get_ident() == probe.thread and loop._ready:
                probe.rounds += 1
            run_once(loop)

        def flush(deliveries: Deliveries, *only: Any) -> None:
            mine = threading.get_ident() == probe.thread and probe.written_cpu is None
            if mine and any(getattr(handler.session, "client_id", None) == BOB for handler in deliveries._chunks):
                probe.written_cpu = time.thread_time()
            write(deliveries, *only)

        write = Deliveries.flush
        asyncio.events.Handle._run = counted  # type: ignore[method-assign,assignment]
        asyncio.base_events.BaseEventLoop._run_once = once  # type: ignore[attr-defined]
        Deliveries.flush = flush  # type: ignore[method-assign,assignment]
        self._undo = [
            lambda: setattr(asyncio.events.Handle, "_run", run),
            lambda: setattr(asyncio.base_events.BaseEventLoop, "_run_once", run_once),
            lambda: setattr(Deliveries, "flush", write),
        ]

    def uninstall(self) -> None:
        for undo in self._undo:
            undo()


def _what(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f"{frame.f_code.co_qualname}" if frame is not None else "?"
        return f"task step: {getattr(coro, '__qualname__', '?')} (at {where})"
    name = getattr(callback, "__qualname__", None) or repr(callback)
    return str(name)


def _cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


async def _flood(port: int, rate: float, listeners: int) -> None:
    """A bot says ``rate`` lines a second at QoS 1 into a room that ``listeners`` hear (as ``dmflood``)."""
    clients = []
    try:
        for j in range(listeners):
            client, pump = await _connect(port, f"flood{j}", f"flood{j}:hops")
            clients.append((client, pump))
            room_filter = T.room_filter("flood").encode()
            client.writer.write(_packet(0x82, (1).to_bytes(2, "big") + _field(room_filter) + b"\x01"))
            await client.expect(0x90)
        bot, pump = await _connect(port, "floodbot", "floodbot:hops")
        clients.append((bot, pump))
        topic, period, next_at, n = T.room("flood", "floodbot").encode(), 1.0 / rate, time.perf_counter(), 0
        while True:
            n += 1
            payload = encode(ChatMessage(text="flood " + "x" * 60))
            bot.writer.write(_packet(0x32, _field(topic) + (n % 65535 + 1).to_bytes(2, "big") + payload))
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    finally:
        for client, pump in clients:
            client.writer.close()
            pump.cancel()


async def _exchange(
    port: int, samples: int, idle: int, gap: float, trace: int, probe: _Probe, flood_shape: tuple[float, int]
) -> dict[str, Any]:
    alice, alice_pump = await _connect(port, "alice", "alice:hops")
    bob, bob_pump = await _connect(port, "bob", BOB)
    others = [await _connect(port, f"idle{i}", f"idle{i}:hops") for i in range(idle)]
    bob.writer.write(_packet(0x82, (1).to_bytes(2, "big") + _field(T.user_filter("bob").encode()) + b"\x01"))
    await bob.expect(0x90)
    topic = T.dm("bob", "alice").encode()
    flood = asyncio.create_task(_flood(port, *flood_shape)) if flood_shape[0] else None
    await asyncio.sleep(0.5 if flood else 0)
    path_callbacks, path_rounds, path_wall, path_cpu, traces = [], [], [], [], []
    await asyncio.sleep(0.2)
    thread = next(t for t in threading.enumerate() if t.ident == probe.thread)
    cpu0, callbacks0, rounds0 = _cpu(thread), probe.callbacks, probe.rounds
    for n in range(1, samples + 1):
        payload = encode(ChatMessage(text=f"dm {n}"))
        got, acked = bob.received, alice.acked
        probe.tracing = n <= trace
        probe.timeline = []
        c0, r0 = probe.callbacks, probe.rounds
        probe.mark()
        sent = time.perf_counter()
        alice.writer.write(_packet(0x32, _field(topic) + (n % 65535 + 1).to_bytes(2, "big") + payload))
        while bob.received == got:
            await asyncio.sleep(0)
        arrived = time.perf_counter()
        c1, r1 = probe.callbacks, probe.rounds
        probe.tracing = False
        path_callbacks.append(c1 - c0)
        path_rounds.append(r1 - r0)
        path_wall.append(arrived - sent)
        if probe.first_cpu is not None and probe.written_cpu is not None:
            path_cpu.append(probe.written_cpu - probe.first_cpu)
        if n <= trace:
            traces.append(
                [(start - sent, wall, cpu, what) for start, wall, cpu, what in probe.timeline if start < arrived]
            )
        while alice.acked == acked:
            await asyncio.sleep(0)
        await asyncio.sleep(gap)
    cpu = _cpu(thread) - cpu0
    callbacks, rounds = probe.callbacks - callbacks0, probe.rounds - rounds0
    if flood is not None:
        flood.cancel()
    for client, pump in [(alice, alice_pump), (bob, bob_pump), *others]:
        client.writer.close()
        pump.cancel()
    return {
        "samples": samples,
        "cpu_us_per_dm": round(cpu / samples * 1e6, 1),
        "callbacks_per_dm": round(callbacks / samples, 2),
        "rounds_per_dm": round(rounds / samples, 2),
        "path_callbacks_median": statistics.median(path_callbacks),
        "path_rounds_median": statistics.median(path_rounds),
        "path_cpu_us_median": round(statistics.median(path_cpu) * 1e6, 1) if path_cpu else None,
        "path_wall_us_p50": round(statistics.median(path_wall) * 1e6),
        "path_wall_us_p99": round(statistics.quantiles(path_wall, n=100)[98] * 1e6),
        "traces": traces,
    }


def run(
    samples: int, idle: int, gap: float, trace: int, profile: bool, flood: tuple[float, int] = (0.0, 0)
) -> tuple[dict[str, Any], str]:
    probe = _Probe()
    with tempfile.TemporaryDirectory(prefix="dmhops-") as tmp:
        data = Path(tmp) / "data"
        others = [*(f"idle{i}" for i in range(idle)), *(f"flood{j}" for j in range(flood[1])), "floodbot"]
        accounts(data, ["alice", "bob", *others])
        settings = BrokerSettings(data_dir=data, port=0, limits=Limits(publish_rate=1e6, publish_burst=10**6))
        profiler = cProfile.Profile()
        server = BackgroundServer(settings, workers=False)
        with server as info:
            loop = server._loop
            assert loop is not None
            probe.thread = server._thread.ident
            probe.install()
            try:
                if profile:
                    loop.call_soon_threadsafe(profiler.enable)
                result = asyncio.run(_exchange(info.address.port, samples, idle, gap, trace, probe, flood))
                if profile:
                    done = threading.Event()

                    def stop() -> None:
                        profiler.disable()
                        done.set()

                    loop.call_soon_threadsafe(stop)
                    done.wait(5)
            finally:
                probe.uninstall()
    text = ""
    if profile:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(PROFILE_SORT).print_stats(45)
        text = out.getvalue()
    return result, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--trace", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--flood-rate", type=float, default=0.0, help="room lines a second meanwhile (dmflood: 200)")
    parser.add_argument("--flood-listeners", type=int, default=50)
    args = parser.parse_args()
    flood = (args.flood_rate, args.flood_listeners if args.flood_rate else 0)
    result, profile = run(args.samples, args.idle, args.gap_ms / 1000, args.trace, args.profile, flood)
    traces = result.pop("traces")
    for key, value in result.items():
        print(f"{key}: {value}")
    for i, trace in enumerate(traces, 1):
        print(f"DM {i}: from alice's send to bob's receipt")
        for offset, wall, cpu, what in trace:
            print(f"  +{offset * 1e6:7.0f} µs  wall {wall * 1e6:6.0f} µs  CPU {cpu * 1e6:6.0f} µs  {what}")
    if profile:
        print(profile)


if __name__ == "__main__":
    main()
