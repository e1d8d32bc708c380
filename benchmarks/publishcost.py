"""The loop's CPU per PUBLISH handled by each of the embedded broker's entry points, in process (tenth session).

    python -m benchmarks.publishcost [--calls 3000] [--blocks 7] [--kinds file,line,now1,now0,file,line]

The embedded broker alone (no workers, rate unbounded) in this process's thread, alice and bob signed
in through raw sockets, bob reading his own topics (a thread drains his socket). In the broker's loop,
``--calls`` calls in a row of one entry point, timed in the loop thread's CPU (``time.thread_time``),
``--blocks`` times with a pause between (the journal's thread commits meanwhile); per kind, the median
of the blocks in microseconds per call:

- ``line``: ``ImBroker.deliver_line`` (a chat line's direct path), a DM from alice to bob (a copy
  written to bob, a row journalled);
- ``now1``, ``now0``: ``ImBroker.deliver_now`` (the reader's handling of a message amqtt built), the
  same DM at QoS 1 and at QoS 0;
- ``file``: ``ImBroker.deliver_file`` (a chunk's direct path), 256 KiB on alice's upload topic, which
  nobody reads here: the path's own work (the checks, the chat-first look), not the copy's write.

A kind named twice is measured twice and the second kept (the first warms the caches). What it
leaves out is what every route shares after the entry point (the reader before it; the kernel's
send), so a change to the path shows here when it is lost in ``benchmarks.linecost``'s noise. To
compare two trees, run it with the cwd in each, alternately: it imports the code of the cwd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the tree to measure

from amqtt.session import IncomingApplicationMessage

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.wire import ChatMessage, Topics, encode
from imcli.serve.host import BackgroundServer

T = Topics()
PASSWORD = "publishcost-password"


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _signed_in(host: str, port: int, name: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    user, password, cid = name.encode(), PASSWORD.encode(), f"{name}:cost".encode()
    body = _field(b"MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big") + _field(cid) + _field(user) + _field(password)
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def _drain(sock: socket.socket) -> None:
    sock.settimeout(None)
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--kinds", default="file,line,now1,now0,file,line")
    args = parser.parse_args()
    limits = Limits(publish_rate=1e6, publish_burst=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        settings = BrokerSettings(data_dir=Path(tmp) / "data", port=0, limits=limits)
        with BackgroundServer(settings, workers=False) as info:
            broker = info.broker
            assert broker is not None
            store = AccountStore(info.data_dir)
            for name in ("alice", "bob"):
                store.add(name, PASSWORD)
            alice = _signed_in(info.address.host, info.address.port, "alice")
            bob = _signed_in(info.address.host, info.address.port, "bob")
            body = b"\x00\x01" + _field(T.user_filter("bob").encode()) + b"\x01"
            bob.sendall(bytes([0x82, len(body)]) + body)
            assert bob.recv(5) == b"\x90\x03\x00\x01\x01"  # SUBACK
            threading.Thread(target=_drain, args=(bob,), daemon=True).start()
            [session] = [s for s, _ in broker._sessions.values() if s.client_id == "alice:cost"]
            dm, line = T.dm("bob", "alice"), encode(ChatMessage(text="x" * 40))
            upload, chunk = T.upload("alice", "u" * 32), bytes(256 * 1024)

            async def run(kind: str) -> list[float]:
                per_call = []
                for _ in range(args.blocks):
                    start = time.thread_time()
                    for i in range(args.calls):
                        if kind == "line":
                            await broker.deliver_line(session, dm, line)
                        elif kind == "file":
                            await broker.deliver_file(session, upload, chunk)
                        else:
                            qos = 1 if kind == "now1" else 0
                            message = IncomingApplicationMessage(i % 60000 + 1 if qos else None, dm, qos, line, False)
                            message.publish_packet = None
                            await broker.deliver_now(session, message, bool(qos))
                    per_call.append((time.thread_time() - start) / args.calls * 1e6)
                    await asyncio.sleep(0.05)  # the journal's thread commits
                return per_call

            figures: dict[str, float] = {}
            for kind in args.kinds.split(","):
                blocks = asyncio.run_coroutine_threadsafe(run(kind), broker._loop).result(600)
                figures[f"{kind}_us"] = round(statistics.median(blocks), 2)
            print(json.dumps({"tree": os.getcwd(), "load": round(os.getloadavg()[0], 2), **figures}), flush=True)
            alice.close()
            bob.close()


if __name__ == "__main__":
    main()
