"""What a wave of leavers costs the loop's selector, alone: ``--sockets`` asyncio connections each write a
lone MQTT DISCONNECT at once (no FIN), then one more writes a PINGREQ.

    python -m benchmarks.leavewave [--sockets 8000] [--runs 2] [--warm]

asyncio's loop on the broker's selector (imcli/serve/livefirst.py), in this process, with plain protocols
that pause their reading on a DISCONNECT, as a parked one does (imcli/broker/reader.py): no broker, so the
figures are the selector's and asyncio's own. ``--warm``: the one that writes the PINGREQ has written one
just before the wave too (served lately, as a chatting client or the stall probe is: the selector peeks it
at once; docs/PERFORMANCE.md, issue 21, tenth session); else it is silent until then, as the leavers are.
Prints the loop thread's CPU (``time.thread_time``) from the
last write to the PINGREQ's ``data_received`` and to the last one's, and the selector's longest polls (CPU
ms, events returned). The collector is off during the wave. Run it in two worktrees to compare selectors
(docs/PERFORMANCE.md, issue 21, ninth session).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import socket
import time
from typing import Any

from imcli.serve import livefirst

DISCONNECT, PINGREQ = b"\xe0\x00", b"\xc0\x00"


async def _wave(sockets: int, warm: bool = False) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    selector: Any = loop._selector  # type: ignore[attr-defined]  # asyncio private: a benchmark's look inside
    inner = selector.select
    polls: list[tuple[float, int]] = []

    def timed(timeout: float | None = None) -> list[Any]:
        started = time.thread_time()
        ready: list[Any] = inner(timeout)
        polls.append((time.thread_time() - started, len(ready)))
        return ready

    selector.select = timed
    heard: list[tuple[float, bytes]] = []
    transports: list[asyncio.Transport] = []

    class Parking(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            transports.append(transport)

        def data_received(self, data: bytes) -> None:
            heard.append((time.thread_time(), data))
            if data == DISCONNECT:
                self.transport.pause_reading()

    server = await loop.create_server(Parking, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    clients = []
    for n in range(sockets):
        clients.append(socket.create_connection(("127.0.0.1", port)))
        if n % 500 == 0:
            await asyncio.sleep(0)
    live = socket.create_connection(("127.0.0.1", port))
    while len(transports) < sockets + 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    if warm:
        live.sendall(PINGREQ)
        while not heard:
            await asyncio.sleep(0)
        heard.clear()
    gc.collect()
    gc.disable()
    polls.clear()
    for client in clients:  # all in one callback: every byte is there before the loop's next poll
        client.sendall(DISCONNECT)
    live.sendall(PINGREQ)
    sent = time.thread_time()
    while len(heard) < sockets + 1:
        await asyncio.sleep(0)
    gc.enable()
    ping = next(at for at, data in heard if data == PINGREQ)
    for client in [*clients, live]:
        client.close()
    for transport in transports:
        transport.close()
    server.close()
    return {
        "ping_heard_after_cpu_ms": round((ping - sent) * 1e3, 1),
        "all_heard_after_cpu_ms": round((max(at for at, _ in heard) - sent) * 1e3, 1),
        "polls": len(polls),
        "longest_polls_cpu_ms": [(round(cpu * 1e3, 1), n) for cpu, n in sorted(polls, reverse=True)[:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="the PINGREQ's client has written one just before")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for _ in range(args.runs):
        loop = asyncio.SelectorEventLoop(livefirst.new_selector())
        try:
            print(json.dumps(loop.run_until_complete(_wave(args.sockets, args.warm))))
        finally:
            loop.close()


if __name__ == "__main__":
    main()
