"""Does every QoS 1 copy arrive? An in-process harness for the embedded broker's delivery path.

    python -m benchmarks.complete [--shape room|bot|rooms] [--runs 5] [--members 50] [--lines 40]

The embedded broker runs in a thread of this process (``BackgroundServer``, no workers); its
clients are asyncio connections in the main thread, speaking raw MQTT 3.1.1: listeners
subscribe to their room at QoS 1 and acknowledge every PUBLISH, talkers say their lines at
QoS 1 with up to ``INFLIGHT`` unacknowledged (as ``mosquitto_pub``). A run ends when every
expected copy has arrived, or when none has arrived for ``--stall`` seconds: it then reports
how many did, which is what a lost wakeup in the broker looks like (docs/PERFORMANCE.md: a
reader-loop rewrite once left a QoS 1 fan-out at 57,600 of 100,000, then nothing).

The shapes are those of ``benchmarks/fanout.py``: ``room`` (everyone talks, 50 members, 40 lines each:
100,000 copies), ``bot`` (one account that does not listen streams 2,000 lines to 50), ``rooms``
(20 rooms of 10, everyone talks). tests/test_delivery_complete.py runs small ones; run full
ones several times, ideally while the machine is busy, to trust a change to the reader or the
fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.framing import decode_length, encode_length
from imcli.core.wire import ChatMessage, Topics, encode
from imcli.serve.host import BackgroundServer

PASSWORD = "complete-harness-password"
INFLIGHT = 20  # a talker's unacknowledged PUBLISHes at most (mosquitto_pub's default)
T = Topics()


@dataclass(frozen=True)
class Shape:
    rooms: int
    members: int
    lines: int  # each talker's
    bot: bool = False  # one talker per room, who does not listen; else every member talks

    @property
    def expected(self) -> int:
        talkers = 1 if self.bot else self.members
        return self.rooms * talkers * self.lines * self.members


SHAPES = {
    "room": lambda members, lines: Shape(1, members, lines),
    "bot": lambda members, lines: Shape(1, members, lines * members, bot=True),
    "rooms": lambda members, lines: Shape(20, max(members // 5, 2), lines),
}


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


@dataclass
class Client:
    """One raw MQTT connection: counts the PUBLISHes it gets (and acknowledges them), and the PUBACKs."""

    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: int = 0
    acked: int = 0
    acks: asyncio.Event = field(default_factory=asyncio.Event)
    packets: asyncio.Queue[int] = field(default_factory=asyncio.Queue)  # first bytes of CONNACK, SUBACK

    async def pump(self) -> None:
        buf = bytearray()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await self.reader.read(65536):
                buf += data
                pos, answers = 0, bytearray()
                while True:
                    header = decode_length(buf, pos + 1)
                    if header is None:
                        break
                    length, i = header
                    if len(buf) < i + length:
                        break
                    first = buf[pos]
                    if first >> 4 == 3:  # PUBLISH
                        self.received += 1
                        if first & 0x06:
                            topic_length = int.from_bytes(buf[i : i + 2], "big")
                            answers += b"\x40\x02" + buf[i + 2 + topic_length : i + 4 + topic_length]
                    elif first >> 4 == 4:  # PUBACK
                        self.acked += 1
                        self.acks.set()
                    else:
                        self.packets.put_nowait(first)
                    pos = i + length
                del buf[:pos]
                if answers:
                    self.writer.write(bytes(answers))

    async def expect(self, first: int) -> None:
        got = await self.packets.get()
        if got != first:
            raise RuntimeError(f"{self.name}: packet {got:#x}, expected {first:#x}")

    async def talk(self, topic: bytes, lines: int) -> None:
        for n in range(1, lines + 1):
            while n - self.acked > INFLIGHT:
                self.acks.clear()
                await self.acks.wait()
            payload = encode(ChatMessage(text=f"{self.name} line {n}"))
            packet_id = (n - 1) % 65535 + 1
            self.writer.write(_packet(0x32, _field(topic) + packet_id.to_bytes(2, "big") + payload))
            await self.writer.drain()


async def _connect(port: int, name: str, client_id: str) -> tuple[Client, asyncio.Task[None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(name, reader, writer)
    pump = asyncio.create_task(client.pump())
    flags = 0x02 | 0x80 | 0x40
    body = _field(b"MQTT") + bytes([4, flags]) + (0).to_bytes(2, "big") + _field(client_id.encode())
    writer.write(_packet(0x10, body + _field(name.encode()) + _field(PASSWORD.encode())))
    await client.expect(0x20)
    return client, pump


async def _run(port: int, shape: Shape, stall: float) -> tuple[int, float]:
    """Copies delivered, and the seconds from the first line to the last copy (or to the stall)."""
    clients: list[tuple[Client, asyncio.Task[None]]] = []
    listeners: list[Client] = []
    talkers: list[tuple[Client, bytes]] = []
    try:
        for room in range(shape.rooms):
            members = [f"r{room}m{j}" for j in range(shape.members)]
            for name in members:
                client, pump = await _connect(port, name, f"{name}:harness")
                clients.append((client, pump))
                listeners.append(client)
                topic_filter = T.room_filter(f"room{room}").encode()
                client.writer.write(_packet(0x82, (1).to_bytes(2, "big") + _field(topic_filter) + b"\x01"))
                await client.expect(0x90)
            speakers = [f"r{room}bot"] if shape.bot else members
            for name in speakers:
                if shape.bot:
                    client, pump = await _connect(port, name, f"{name}:harness")
                    clients.append((client, pump))
                else:
                    client = next(c for c in listeners if c.name == name)
                talkers.append((client, T.room(f"room{room}", name).encode()))
        start = time.monotonic()
        talking = [asyncio.create_task(client.talk(topic, shape.lines)) for client, topic in talkers]
        delivered, last_progress, last_count = 0, time.monotonic(), -1
        while delivered < shape.expected:
            await asyncio.sleep(0.05)
            delivered = sum(c.received for c in listeners)
            now = time.monotonic()
            if delivered != last_count:
                last_count, last_progress = delivered, now
            elif now - last_progress > stall:
                break
        seconds = last_progress - start
        for task in talking:
            task.cancel()
        return delivered, seconds
    finally:
        for client, pump in clients:
            client.writer.close()
            pump.cancel()


def accounts(data: Path, names: list[str]) -> None:
    """Every account with the same cheaply hashed password (as benchmarks/brokers.py's)."""
    from argon2 import PasswordHasher

    data.mkdir(parents=True, exist_ok=True)
    store = AccountStore(data, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    digest = store._hasher.hash(PASSWORD)
    doc = {"version": 1, "accounts": {n: {"role": "user", "created": time.time(), "hash": digest} for n in names}}
    (data / AccountStore.FILE_NAME).write_text(json.dumps(doc))


def names_of(shape: Shape) -> list[str]:
    names = [f"r{room}m{j}" for room in range(shape.rooms) for j in range(shape.members)]
    return names + ([f"r{room}bot" for room in range(shape.rooms)] if shape.bot else [])


def run(shape: Shape, runs: int = 1, stall: float = 20.0) -> list[tuple[int, float]]:
    """``runs`` runs of ``shape``, each against a fresh broker: (copies delivered, seconds) each."""
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="complete-") as tmp:
            data = Path(tmp) / "data"
            accounts(data, names_of(shape))
            limits = Limits(publish_rate=1e6, publish_burst=10**6)
            settings = BrokerSettings(data_dir=data, port=0, limits=limits)
            with BackgroundServer(settings, workers=False) as info:
                results.append(asyncio.run(_run(info.address.port, shape, stall)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="room")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stall", type=float, default=20.0)
    args = parser.parse_args()
    shape = SHAPES[args.shape](args.members, args.lines)
    failed = 0
    for i in range(args.runs):
        [(got, took)] = run(shape, 1, args.stall)
        failed += got != shape.expected
        rate = got / took if took > 0 else 0.0
        stalled = "" if got == shape.expected else "  STALLED"
        print(f"run {i + 1}: {got:,} of {shape.expected:,} copies in {took:.1f} s ({rate:,.0f}/s){stalled}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
