"""The floor under ``benchmarks.leave``: what a user joining and leaving costs a Python asyncio server
that does nothing else, measured as ``benchmarks.leave`` measures the broker (docs/PERFORMANCE.md,
"A user leaving", issue 21).

    python -m benchmarks.leavefloor [--users 2000] [--processes 2] [--server protocol|streams]

The server answers CONNECT (CONNACK 0), SUBSCRIBE (SUBACK granting QoS 1) and PINGREQ (PINGRESP) and
closes the connection on DISCONNECT: no sessions, no checks, no storage. ``protocol`` is an
``asyncio.Protocol`` parsing in ``data_received``; ``streams`` is ``asyncio.start_server`` with one
task per connection reading its ``StreamReader`` (the design amqtt is built on). The same crowds
(benchmarks/crowd.py, no status) sign in and leave at once; printed: the CPU time of the server's
thread per user joining and per user leaving, under ``imcli serve``'s collector policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

from benchmarks.memory import _Here
from benchmarks.scenarios import Crowds
from imcli.broker.gcpause import calm_collector
from imcli.core.framing import decode_length

CONNACK, PINGRESP = b"\x20\x02\x00\x00", b"\xd0\x00"


def answers(buffer: bytearray) -> tuple[bytes, bool]:
    """The answers to every complete packet at the head of ``buffer`` (consumed), and whether one
    was a DISCONNECT (the rest is then left unread)."""
    out = bytearray()
    while len(buffer) >= 2:
        header = decode_length(buffer, 1)
        if header is None:
            break
        length, start = header
        if len(buffer) < start + length:
            break
        kind, body = buffer[0] >> 4, bytes(buffer[start : start + length])
        del buffer[: start + length]
        if kind == 1:
            out += CONNACK
        elif kind == 8:
            out += b"\x90\x03" + body[:2] + b"\x01"
        elif kind == 12:
            out += PINGRESP
        elif kind == 14:
            return bytes(out), True
    return bytes(out), False


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out, bye = answers(self.buffer)
        if out:
            self.transport.write(out)
        if bye:
            self.transport.close()


async def stream_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buffer = bytearray()
    while data := await reader.read(1 << 16):
        buffer += data
        out, bye = answers(buffer)
        if out:
            writer.write(out)
        if bye:
            break
    writer.close()
    await writer.wait_closed()


def _cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(users: int, processes: int, server: str) -> dict[str, object]:
    ready, port = threading.Event(), [0]

    def run() -> None:
        async def serve() -> None:
            if server == "protocol":
                listening = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", 0, backlog=4096)
            else:
                listening = await asyncio.start_server(stream_responder, "127.0.0.1", 0, backlog=4096)
            calm_collector()
            port[0] = listening.sockets[0].getsockname()[1]
            ready.set()
            await asyncio.Event().wait()

        asyncio.run(serve())

    thread = threading.Thread(target=run, name="floor", daemon=True)
    thread.start()
    ready.wait(30)
    here: Any = _Here(port[0])
    before = _cpu(thread)
    with Crowds.join(here, users, processes, status=False) as (_, joined):
        join = _cpu(thread) - before
        time.sleep(3)
        before = _cpu(thread)
    time.sleep(5)  # every connection has ended
    leave = _cpu(thread) - before
    return {
        "server": server,
        "users": users,
        "joined": joined["ok"],
        "join_cpu_us_per_user": round(join * 1e6 / users, 1),
        "leave_cpu_us_per_user": round(leave * 1e6 / users, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--server", choices=("protocol", "streams"), default="protocol")
    args = parser.parse_args()
    print(json.dumps(measure(args.users, args.processes, args.server), indent=1))


if __name__ == "__main__":
    main()
