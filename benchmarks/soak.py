"""Soak: N users chat at QoS 1 for D seconds against `imcli serve`; nothing may be lost and the
broker's memory may not creep.

    python -m benchmarks.soak [--users 1000] [--duration 600] [--room-size 10] [--interval 10] [--procs 4]
                              [--slow-readers 1] [--will-rate 100] [--max-output BYTES]

Starts `imcli serve` as its own process on a free loopback port (accounts with cheap argon2
parameters, as benchmarks/presence.py does), splits the users over --procs load processes
(benchmarks/mqttload.py, one asyncio loop each) and puts them in rooms of --room-size. Every
user subscribes to its room and publishes one message every --interval seconds (at a random
phase) at QoS 1, each with a unique id, and waits for the PUBACK. The rate per account stays far
under the broker's default limit (20/s); the broker sees users/interval messages a second and
room-size times as many deliveries.

Beside them, two attackers (issue 15), from a process of their own:
- --slow-readers raw sockets (a 4 KiB receive buffer) log in, subscribe to every room at QoS 1
  and never read again; each sends a PINGREQ every second, and when the broker has closed it
  (imcli/broker/output.py: past `imcli serve --max-output`, or unread for --output-timeout),
  it logs in again and does the same;
- one account reconnects in a loop, --will-rate times a second, each connection leaving a Last
  Will on the first room and dropped without DISCONNECT: the Wills pass the publish checks when
  they fire, so the room's members get at most the account's burst plus its rate of them.

Checks, printed as a table and in the exit code (1 if any fails):
- every message that was acknowledged reached every member of its room (the sender included)
  while they were connected: a list of losses otherwise;
- the broker's resident memory (sampled every --sample seconds from /proc via psutil) at the end
  is at most 10 % above the sample taken when warm-up ended (--warmup seconds, default a fifth);
- no member of the first room got more Wills than the broker's default burst (60) plus its rate
  (20/s) times the time the loop ran.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import socket
import struct
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from argon2 import PasswordHasher

from benchmarks.mqttload import LoadClient
from benchmarks.presence import PASSWORD, start_serve
from imcli.broker.accounts import AccountStore
from imcli.core.wire import ChatMessage, Topics, decode_chat, encode

T = Topics()
MAX_RSS_GROWTH = 0.10
WILLS = "wflood"  # the account reconnecting in a loop with a Last Will
SLOW = "wslow"  # the account of the readers that never read
RATE, BURST = 20.0, 60  # the broker's default publish limits (imcli/broker/limits.py)


def user(i: int) -> str:
    return f"s{i:05d}"


def room_of(i: int, room_size: int) -> str:
    return f"soak{i // room_size:04d}"


@dataclass
class Report:
    """What one load process saw; sent to the parent when it is done."""

    sent: dict[str, int] = field(default_factory=dict)  # sender -> messages acknowledged (seq 0..n-1)
    unacked: int = 0
    received: dict[str, dict[str, set[int]]] = field(default_factory=dict)  # receiver -> sender -> seqs
    duplicates: int = 0
    wills: dict[str, int] = field(default_factory=dict)  # receiver -> Last Wills of WILLS received
    disconnected: list[str] = field(default_factory=list)
    connect_failures: list[str] = field(default_factory=list)


def load_process(
    port: int, indices: list[int], args: argparse.Namespace, ready: Any, go: Any, stop: Any,
    delivered: Any, acked: Any, results: Any,
) -> None:  # fmt: skip
    asyncio.run(_load(port, indices, args, ready, go, stop, delivered, acked, results))


async def _load(
    port: int, indices: list[int], args: argparse.Namespace, ready: Any, go: Any, stop: Any,
    delivered: Any, acked: Any, results: Any,
) -> None:  # fmt: skip
    report = Report()
    clients: dict[str, LoadClient] = {}
    # logins at once, over all load processes: under the broker's 32 logins waiting for a password check
    # (Limits.password_queue: past it CONNACK 3) and its 64 pending connections per address
    gate = asyncio.Semaphore(max(1, 16 // args.procs))
    local_delivered = 0

    def on_message_for(receiver: str) -> Any:
        inbox = report.received.setdefault(receiver, defaultdict(set))

        def on_message(topic: str, payload: bytes) -> None:
            nonlocal local_delivered
            parsed = T.parse(topic)
            message, _plain = decode_chat(payload)
            if parsed is None or parsed.sender is None or not isinstance(message, ChatMessage):
                return
            if parsed.sender == WILLS:
                report.wills[receiver] = report.wills.get(receiver, 0) + 1
                return
            seq = int(message.text.rsplit(" ", 1)[1])
            seqs = inbox[parsed.sender]
            if seq in seqs:
                report.duplicates += 1  # QoS 1 is at-least-once
            seqs.add(seq)
            local_delivered += 1

        return on_message

    async def join(i: int) -> None:
        name = user(i)
        client = LoadClient(on_message_for(name))
        async with gate:
            try:
                code = await client.connect("127.0.0.1", port, name, PASSWORD, f"{name}:soak", keepalive=0)
                topic_filter = T.room_filter(room_of(i, args.room_size))
                granted = await client.subscribe(topic_filter, 1) if code == 0 else None
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                report.connect_failures.append(f"{name}: {exc!r}")
                return
        if code != 0 or granted != 1:
            report.connect_failures.append(f"{name}: CONNACK {code}, SUBACK {granted}")
            return
        clients[name] = client

    await asyncio.gather(*(join(i) for i in indices))
    ready.release()
    await asyncio.to_thread(go.wait)
    start = time.monotonic()
    end = start + args.duration

    async def chat(i: int) -> None:
        name = user(i)
        client = clients.get(name)
        if client is None:
            return
        topic = T.room(room_of(i, args.room_size), name)
        await asyncio.sleep(random.uniform(0, args.interval))
        seq = 0
        while time.monotonic() < end:
            payload = encode(ChatMessage(text=f"soak {name} {seq}"))
            try:
                await asyncio.wait_for(client.publish(topic, payload, qos=1), 30)
            except (TimeoutError, OSError, ConnectionError):
                report.unacked += 1
                report.disconnected.append(name)
                return
            seq += 1
            report.sent[name] = seq
            await asyncio.sleep(args.interval)

    async def publish_counters() -> None:
        while not stop.is_set():
            delivered.value = local_delivered
            acked.value = sum(report.sent.values())
            await asyncio.sleep(0.5)

    counters = asyncio.create_task(publish_counters())
    await asyncio.gather(*(chat(i) for i in indices))
    while not stop.is_set():  # keep receiving until the parent has seen every delivery (or gave up)
        await asyncio.sleep(0.2)
    counters.cancel()
    delivered.value = local_delivered
    await asyncio.gather(*(c.disconnect() for c in clients.values()), return_exceptions=True)
    report.received = {r: dict(s) for r, s in report.received.items()}
    results.put(report)


def _packet(first: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([first])
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def _field(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await asyncio.get_running_loop().sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionResetError("closed while logging in")
        data += chunk
    return data


async def _slow_reader(port: int, k: int, stop: Any, closed: Any) -> None:
    """Log in, subscribe to every room, never read; when the broker closes it, do it again."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            flags = 0x02 | 0x80 | 0x40
            body = _field("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + _field(f"{SLOW}:r{k}")
            await loop.sock_sendall(sock, _packet(0x10, body + _field(SLOW) + _field(PASSWORD)))
            await _recv_exactly(sock, 4)  # CONNACK
            subscribe = struct.pack("!H", 1) + _field("im/room/+/+") + b"\x01"
            await loop.sock_sendall(sock, _packet(0x82, subscribe))
            await _recv_exactly(sock, 5)  # SUBACK (no delivery comes before it)
            while not stop.is_set():  # reads no more; a PINGREQ a second finds out when it is closed
                await asyncio.sleep(1)
                sock.send(b"\xc0\x00")
        except (OSError, ConnectionError):
            closed.value += 1
        finally:
            sock.close()


async def _will_loop(port: int, rate: float, stop: Any, fired: Any, started: Any) -> None:
    topic = T.room(room_of(0, 1), WILLS)
    started.value = time.time()
    while not stop.is_set():
        client = LoadClient()
        will = encode(ChatMessage(text=f"will {fired.value}"))
        try:
            code = await client.connect("127.0.0.1", port, WILLS, PASSWORD, f"{WILLS}:loop", (topic, will, False), 0)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
            continue
        client.abort()
        if code == 0:
            fired.value += 1
        await asyncio.sleep(1 / rate)


def attack_process(port: int, args: argparse.Namespace, stop: Any, closed: Any, fired: Any, started: Any) -> None:
    async def attack() -> None:
        tasks = [_slow_reader(port, k, stop, closed) for k in range(args.slow_readers)]
        if args.will_rate > 0:
            tasks.append(_will_loop(port, args.will_rate, stop, fired, started))
        await asyncio.gather(*tasks)

    asyncio.run(attack())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of chat")
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between one user's messages")
    parser.add_argument("--procs", type=int, default=4, help="load-generating processes")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last deliveries")
    parser.add_argument("--slow-readers", type=int, default=1, help="clients that subscribe to every room, never read")
    parser.add_argument("--will-rate", type=float, default=100.0, help="reconnects a second with a Will (0: none)")
    parser.add_argument("--max-output", type=int, default=None, help="imcli serve --max-output (bytes)")
    parser.add_argument("--output-timeout", type=float, default=None, help="imcli serve --output-timeout (s)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else args.duration / 5
    if args.interval * 1.0 < 1 / 20:
        raise SystemExit("--interval below the broker's per-account rate limit (20/s)")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        store = AccountStore(data, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        store.add_many([(user(i), PASSWORD) for i in range(args.users)] + [(WILLS, PASSWORD), (SLOW, PASSWORD)])
        options = [] if args.max_output is None else ["--max-output", str(args.max_output)]
        options += [] if args.output_timeout is None else ["--output-timeout", str(args.output_timeout)]
        proc, port = start_serve(data, *options)
        broker = psutil.Process(proc.pid)
        ctx = mp.get_context("spawn")
        ready, go, stop = ctx.Semaphore(0), ctx.Event(), ctx.Event()
        results: Any = ctx.Queue()
        shards = [list(range(args.users))[k :: args.procs] for k in range(args.procs)]
        delivered = [ctx.Value("q", 0, lock=False) for _ in shards]
        acked = [ctx.Value("q", 0, lock=False) for _ in shards]
        workers = [
            ctx.Process(target=load_process, args=(port, s, args, ready, go, stop, delivered[k], acked[k], results))
            for k, s in enumerate(shards)
        ]
        closed, fired, started = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("d", 0.0)
        attacker = ctx.Process(target=attack_process, args=(port, args, stop, closed, fired, started))
        samples: list[tuple[float, float, int, int]] = []  # (t, rss MB, acked, delivered)
        try:
            for w in workers:
                w.start()
            t0 = time.monotonic()
            for _ in workers:
                while not ready.acquire(timeout=1):
                    if any(w.exitcode is not None for w in workers):
                        raise SystemExit("a load process died before it was ready")
                    if time.monotonic() - t0 > 300:
                        raise SystemExit("the load processes did not connect within 300 s")
            print(f"{args.users} users connected and subscribed in {time.monotonic() - t0:.1f} s", flush=True)
            attacker.start()
            go.set()
            start = time.monotonic()
            print(f"{'t (s)':>7} {'broker RSS (MB)':>16} {'acked':>9} {'delivered':>10} {'deliveries/s':>13}")
            last = (start, 0)
            while time.monotonic() - start < args.duration + args.interval:
                time.sleep(args.sample)
                now = time.monotonic()
                total_delivered = sum(v.value for v in delivered)
                row = (now - start, broker.memory_info().rss / 2**20, sum(v.value for v in acked), total_delivered)
                samples.append(row)
                rate = (total_delivered - last[1]) / (now - last[0])
                last = (now, total_delivered)
                print(f"{row[0]:7.0f} {row[1]:16.1f} {row[2]:9d} {row[3]:10d} {rate:13.0f}", flush=True)
            drain_end = time.monotonic() + args.drain
            expected = sum(v.value for v in acked) * args.room_size  # an upper bound: a last room may be smaller
            while time.monotonic() < drain_end and sum(v.value for v in delivered) < expected:
                time.sleep(0.5)
            stop.set()
            will_seconds = time.time() - started.value if started.value else 0.0
            reports: list[Report] = [results.get(timeout=120) for _ in workers]
            for w in workers:
                w.join(60)
        finally:
            stop.set()
            for w in [*workers, attacker]:
                if w.is_alive():
                    w.terminate()
            proc.terminate()
            proc.wait(30)

    sent: dict[str, int] = {}
    received: dict[str, dict[str, set[int]]] = {}
    for r in reports:
        sent.update(r.sent)
        received.update(r.received)
    disconnected = sorted({n for r in reports for n in r.disconnected})
    failures = [f for r in reports for f in r.connect_failures]
    connected = set(received) - set(disconnected)
    members: dict[str, list[str]] = defaultdict(list)
    for i in range(args.users):
        members[room_of(i, args.room_size)].append(user(i))
    lost: list[str] = []
    deliveries = 0
    for i in range(args.users):
        sender = user(i)
        for receiver in members[room_of(i, args.room_size)]:
            if receiver not in connected:
                continue
            got = received[receiver].get(sender, set())
            missing = [seq for seq in range(sent.get(sender, 0)) if seq not in got]
            deliveries += sent.get(sender, 0)
            if missing:
                lost.append(f"{sender} -> {receiver}: {len(missing)} lost (e.g. seq {missing[:5]})")

    baseline = next((s for s in samples if s[0] >= warmup), samples[0])
    final = samples[-1]
    growth = (final[1] - baseline[1]) / baseline[1]
    total_sent = sum(sent.values())
    print()
    print(f"users                    {args.users} in rooms of {args.room_size}, {args.procs} load processes")
    print(f"chat                     {args.duration:g} s, one message per user every {args.interval:g} s, QoS 1")
    print(f"messages acknowledged    {total_sent} ({total_sent / args.duration:.0f}/s)")
    print(f"deliveries expected      {deliveries} ({deliveries / args.duration:.0f}/s)")
    print(f"deliveries lost          {sum(int(x.split(': ')[1].split()[0]) for x in lost)}")
    print(f"duplicates (QoS 1)       {sum(r.duplicates for r in reports)}")
    print(f"connect failures         {len(failures)}")
    print(f"dropped mid-run          {len(disconnected)}")
    print(f"broker RSS               {baseline[1]:.1f} MB at {baseline[0]:.0f} s (warm-up end) -> {final[1]:.1f} MB "
          f"at {final[0]:.0f} s: {growth:+.1%} (limit +{MAX_RSS_GROWTH:.0%})")  # fmt: skip
    wills_seen = max((n for r in reports for n in r.wills.values()), default=0)
    wills_allowed = BURST + RATE * will_seconds
    print(f"slow readers             {args.slow_readers}, closed by the broker {closed.value} times")
    print(
        f"Last Wills fired         {fired.value} in {will_seconds:.0f} s ({fired.value / max(will_seconds, 1):.0f}/s)"
    )
    print(f"Wills a member received  at most {wills_seen} (allowed: {BURST} + {RATE:g}/s = {wills_allowed:.0f})")
    print(f"machine                  {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    for line in lost[:20]:
        print("LOST", line)
    for line in failures[:20]:
        print("CONNECT FAILED", line)
    ok = not lost and not failures and not disconnected and growth <= MAX_RSS_GROWTH and total_sent > 0
    ok = ok and wills_seen <= wills_allowed
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
