"""The broker's CPU per chat line: a room line and a DM, on the embedded broker and on Mosquitto (issues 16, 21).

    python -m benchmarks.linecost [--brokers embedded,mosquitto] [--lines 1000] [--rate 200]
                                  [--listeners 1] [--rounds 3] [--profile] [--payload chat|bot]

The embedded broker runs in this process as ``imcli serve`` runs it (``serve_forever`` through
``benchmarks/memory.py``'s ``serve_here``, its workers in their child); Mosquitto as the suite
starts it (``benchmarks/brokers.py``, with ``imcli workers``). The clients are a process of their
own (``--client``): ``pinga`` sends ``--lines`` valid chat lines (``ChatMessage``, QoS 1, open loop
at ``--rate`` a second) to the room ``linecost``, which ``--listeners`` users read, then as many
DMs to ``pongr``, who reads his own topics; each phase ends when every copy has arrived.

Per phase, the broker's CPU during the lines minus its CPU over as long without any (its own
upkeep: the collector's ticks, the stuck-connection check), divided by the lines: on the embedded
broker both the loop thread's (``time.pthread_getcpuclockid`` of the thread that runs the loop: what
a DM waits behind) and the process's; on Mosquitto the process's (one thread). Kinds and rounds
alternate. One JSON line per broker and round, then one ``summary`` line per broker with the
median of the rounds: ``loop_us_per_room_line``, ``loop_us_per_dm`` (embedded),
``process_us_per_room_line``, ``process_us_per_dm``.

``--payload bot``: each line is ``{"sent": <time>}``, a bot's JSON without a ``type`` (the room
ping's of ``benchmarks.filesping``/``roomping``: a text line to the broker), not a ``ChatMessage``.

``--profile``: cProfile of the embedded broker's loop thread during the lines (each kind apart),
the functions with the largest own time and their cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from benchmarks import brokers
from benchmarks.brokerloop import BrokerLoop
from benchmarks.brokers import PASSWORD, REPO
from benchmarks.mqttload import LoadClient
from imcli.core.topics import Topics
from imcli.core.wire import ChatMessage, encode, new_id

T = Topics()
ROOM = "linecost"
SENDER, RECEIVER = "pinga", "pongr"
KINDS = ("room", "dm")


# ---------------------------------------------------------------- the clients' process


def _payload(kind: str, i: int) -> bytes:
    if kind == "bot":  # the room ping's (benchmarks/roomping.py)
        return json.dumps({"sent": time.perf_counter()}).encode()
    return encode(ChatMessage(id=new_id(), text=f"line {i} of the linecost benchmark"))


async def _clients(port: int, listeners: int, commands: IO[str], out: IO[str], payload: str = "chat") -> None:
    got = {"n": 0}
    arrived = asyncio.Event()
    wanted = {"n": 0}

    def received(_topic: str, _payload: bytes) -> None:
        got["n"] += 1
        if got["n"] >= wanted["n"]:
            arrived.set()

    readers = []
    for name in brokers.user_names(listeners)[:listeners]:
        client = LoadClient(on_message=received)
        assert await client.connect("127.0.0.1", port, name, PASSWORD, f"{name}:linecost") == 0
        await client.subscribe(T.room_filter(ROOM))
        readers.append(client)
    pongr = LoadClient(on_message=received)
    assert await pongr.connect("127.0.0.1", port, RECEIVER, PASSWORD, f"{RECEIVER}:linecost") == 0
    await pongr.subscribe(T.user_filter(RECEIVER))
    sender = LoadClient()
    assert await sender.connect("127.0.0.1", port, SENDER, PASSWORD, f"{SENDER}:linecost") == 0
    loop = asyncio.get_running_loop()
    print("ready", file=out, flush=True)
    while line := await loop.run_in_executor(None, commands.readline):
        kind, lines, rate = line.split()
        count, period = int(lines), 1.0 / float(rate)
        topic = T.room(ROOM, SENDER) if kind == "room" else T.dm(RECEIVER, SENDER)
        copies = listeners if kind == "room" else 1
        got["n"], wanted["n"] = 0, count * copies
        arrived.clear()
        started = next_at = time.perf_counter()
        pending = set()
        for i in range(count):
            pending.add(asyncio.ensure_future(sender.publish(topic, _payload(payload, i))))
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 30)
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - started
        print(json.dumps({"copies": got["n"], "wanted": wanted["n"], "seconds": seconds}), file=out, flush=True)
    for client in [*readers, pongr, sender]:
        await client.disconnect()


# ---------------------------------------------------------------- the harness


class Clients:
    """The clients' process: ``phase(kind)`` sends one kind's lines and returns when all arrived."""

    def __init__(self, port: int, listeners: int, payload: str = "chat") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.linecost", "--client", str(port), "--listeners", str(listeners),
             "--payload", payload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the clients did not start")

    def phase(self, kind: str, lines: int, rate: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{kind} {lines} {rate}\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _measure(
    clients: Clients,
    clocks: dict[str, Callable[[], float]],
    args: argparse.Namespace,
    on: Callable[[str, bool], None],
) -> dict[str, Any]:
    """One round: per kind, ``args.idle_s`` without lines, then the lines; CPU µs per line by clock."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        quiet = {name: clock() for name, clock in clocks.items()}
        time.sleep(args.idle_s)
        quiet = {name: (clock() - quiet[name]) / args.idle_s for name, clock in clocks.items()}
        busy = {name: clock() for name, clock in clocks.items()}
        on(kind, True)
        phase = clients.phase(kind, args.lines, args.rate)
        on(kind, False)
        busy = {name: clock() - busy[name] for name, clock in clocks.items()}
        seconds = phase["seconds"]
        out[kind] = {
            "lines": args.lines,
            "copies": phase["copies"],
            "seconds": round(seconds, 2),
            **{
                f"{name}_us_per_line": round((busy[name] - quiet[name] * seconds) * 1e6 / args.lines, 1)
                for name in clocks
            },
            **{f"{name}_idle_cpu_s_per_s": round(quiet[name], 4) for name in clocks},
        }
    return out


class LoopProfile(BrokerLoop):
    """cProfile of the broker's loop thread, switched on and off from it (a profiler is per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.profiles = {kind: cProfile.Profile(time.thread_time) for kind in KINDS}  # CPU, not the poll's wait

    def switch(self, kind: str, on: bool) -> None:
        profile = self.profiles[kind]
        self.call(profile.enable if on else profile.disable)

    def report(self, top: int, dump: str | None = None) -> dict[str, str]:
        out = {}
        for kind, profile in self.profiles.items():
            if dump:
                profile.dump_stats(f"{dump}-{kind}.prof")
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            out[kind] = text.getvalue()
        return out


def _embedded(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.memory import serve_here
    from imcli.serve import loops

    loop = loops.chosen_loop()  # IMCLI_LOOP: serve_here runs the broker on it

    rounds: list[dict[str, Any]] = []
    profile = LoopProfile() if args.profile else None
    if profile is not None:
        profile.install()
    loop_clock = time.pthread_getcpuclockid(threading.get_ident())  # serve_here runs the loop in this thread
    me = os.getpid()

    def drive(port: int) -> None:
        time.sleep(3)  # the workers' first records
        clients = Clients(port, args.listeners, args.payload)
        clocks = {"loop": lambda: time.clock_gettime(loop_clock), "process": lambda: brokers.cpu_seconds(me)}
        try:
            for i in range(args.rounds):
                on = profile.switch if profile is not None else _ignore
                rounds.append({"broker": "embedded", "loop": loop, "round": i, **_measure(clients, clocks, args, on)})
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            clients.close()

    serve_here(max(args.listeners, 10), "bench-linecost-", drive)
    if profile is not None:
        for kind, text in profile.report(args.top, args.profile_dump).items():
            print(f"-- cProfile of the loop thread, {kind} lines\n{text}")
    return rounds


def _ignore(_kind: str, _on: bool) -> None:
    pass


def _mosquitto(args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    with brokers.start("mosquitto", max(args.listeners, 10)) as broker:
        time.sleep(3)
        clients = Clients(broker.port, args.listeners, args.payload)
        clocks = {"process": lambda: brokers.cpu_seconds(broker.pid)}
        try:
            for i in range(args.rounds):
                rounds.append({"broker": "mosquitto", "round": i, **_measure(clients, clocks, args, _ignore)})
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            clients.close()
    return rounds


def summary(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": name, "rounds": len(rounds), "load": os.getloadavg()[0]}
    for clock in ("loop", "process"):
        for kind, label in (("room", "room_line"), ("dm", "dm")):
            values = [r[kind][f"{clock}_us_per_line"] for r in rounds if f"{clock}_us_per_line" in r[kind]]
            if values:
                out[f"{clock}_us_per_{label}"] = round(statistics.median(values), 1)
                out[f"{clock}_us_per_{label}_range"] = [min(values), max(values)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="embedded,mosquitto")
    parser.add_argument("--lines", type=int, default=1000, help="lines of each kind per round")
    parser.add_argument("--rate", type=float, default=200.0, help="lines a second")
    parser.add_argument("--listeners", type=int, default=1, help="readers of the room")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds without lines before each phase")
    parser.add_argument(
        "--payload", choices=("chat", "bot"), default="chat", help='ChatMessage, or the room ping\'s {"sent": ...}'
    )
    parser.add_argument("--profile", action="store_true", help="cProfile of the embedded broker's loop thread")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--profile-dump", help="also write each kind's profile to PREFIX-<kind>.prof (pstats)")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the clients' process, on this port
    args = parser.parse_args()
    if args.client is not None:
        asyncio.run(_clients(args.client, args.listeners, sys.stdin, sys.stdout, args.payload))
        return
    print(json.dumps({"uptime_load": os.getloadavg(), "args": vars(args)}), flush=True)
    for name in args.brokers.split(","):
        if name == "mosquitto" and not brokers.mosquitto_available():
            print(json.dumps({"broker": name, "skipped": "mosquitto is not installed"}))
            continue
        rounds = _embedded(args) if name == "embedded" else _mosquitto(args)
        print(json.dumps(summary(name, rounds)), flush=True)


if __name__ == "__main__":
    main()
