"""What a burst of keep-alive PINGREQs costs the broker's loop: ``--users`` connections each send one
PINGREQ at once, as a crowd whose keep-alive timers line up does (issue 21: 10,000 users joined in a
burst, or back after a reconnect storm, send their PINGREQs in clumps).

    python -m benchmarks.pingburst [--users 3000] [--bursts 5] [--clump N] [--slow]

Runs the embedded broker in this process (``BackgroundServer``, no workers, ``imcli serve``'s
collector policy), signs the users in from one client process with plain blocking sockets (no
status, no Will, keep-alive 600 s), then ``--bursts`` times: every connection (the first ``--clump``
of them) writes its PINGREQ,
one after the other as fast as the client can, and the client reads every PINGRESP. Prints, per
burst, the CPU time of the broker's thread (``pthread_getcpuclockid``: what waiting for a core does
not move) per PINGREQ, and the loop's longest rounds during the burst (the thread's CPU from one
poll's return to the next poll, with how many sockets that poll returned: what a chat packet read in
that poll waits for at most before its own callback). ``--slow`` turns the reader's direct answer
off (``PacketReader.PING_AT_ONCE = False``): every PINGREQ then wakes its reader's task, as before
2026-11-26's seventh session.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.brokers import PASSWORD, user_names
from benchmarks.leave import _cpu, _in_loop, _Rounds
from benchmarks.memory import _write_accounts
from imcli.broker import reader
from imcli.broker.gcpause import calm_collector
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.serve import loops
from imcli.serve.host import BackgroundServer


def _str(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _connect(port: int, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = _str("MQTT") + bytes([4, 0x02 | 0x80 | 0x40]) + struct.pack("!H", 600)
    body += _str(name) + _str(name) + _str(PASSWORD)
    sock.sendall(bytes([0x10, len(body)]) + body)
    connack = b""
    while len(connack) < 4:
        connack += sock.recv(4 - len(connack))
    if connack[3] != 0:
        raise SystemExit(f"{name}: CONNACK {connack[3]}")
    return sock


def client(port: int, users: int) -> None:
    """The client process: ``ready`` once every user is in, then a burst per ``burst`` line read."""
    socks = [_connect(port, name) for name in user_names(users)[:users]]
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "burst":
            break
        clump = socks[: int(words[1])]
        for sock in clump:
            sock.send(b"\xc0\x00")
        for sock in clump:
            got = b""
            while len(got) < 2:
                got += sock.recv(2 - len(got))
            if got != b"\xd0\x00":
                raise SystemExit(f"not a PINGRESP: {got!r}")
        print("done", flush=True)
    for sock in socks:
        sock.close()


def measure(users: int, bursts: int, slow: bool, clump: int = 0) -> dict[str, object]:
    reader.PacketReader.PING_AT_ONCE = not slow
    clump = clump or users
    result: dict[str, object] = {"users": users, "clump": clump, "slow": slow, "loop": loops.chosen_loop()}
    with tempfile.TemporaryDirectory(prefix="bench-pingburst-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _write_accounts(data, users)
        limits = Limits(publish_rate=1e6, publish_burst=1_000_000, password_queue=4096)
        server = BackgroundServer(BrokerSettings(data_dir=data, port=0, limits=limits), workers=False)
        with server as info:
            loop, thread = server._loop, server._thread  # the broker's loop and thread (a benchmark's look inside)
            assert loop is not None
            _in_loop(loop, calm_collector)
            rounds = _Rounds(loop) if hasattr(loop, "_selector") else None
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.pingburst",
                    "--client",
                    str(info.address.port),
                    "--users",
                    str(users),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            try:
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit("the client did not sign in")
                time.sleep(2)
                per_ping, longest = [], []
                for _ in range(bursts):
                    if rounds is not None:
                        rounds.longest, rounds.measuring = [], True
                    before = _cpu(thread)
                    proc.stdin.write(f"burst {clump}\n")
                    proc.stdin.flush()
                    if proc.stdout.readline().strip() != "done":
                        raise SystemExit("the burst failed")
                    per_ping.append((_cpu(thread) - before) * 1e6 / clump)
                    time.sleep(0.1)  # the round that wrote the last PINGRESP ends (its next poll) before it is read
                    if rounds is not None:
                        rounds.measuring = False
                        longest.append([(round(cpu * 1000, 2), ready) for cpu, ready in rounds.longest[:3]])
                    time.sleep(0.5)
            finally:
                proc.stdin.close()
                proc.wait(30)
        result["cpu_us_per_pingreq"] = [round(x, 1) for x in per_ping]
        result["cpu_us_per_pingreq_median"] = round(statistics.median(per_ping), 1)
        result["round_longest_ms"] = longest  # per burst: (CPU ms, sockets the poll returned), the 3 longest
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--clump", type=int, default=0, help="PINGREQs per burst, from the first users (0: all)")
    parser.add_argument("--slow", action="store_true", help="every PINGREQ through the reader's task (the old path)")
    parser.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--plain-selector", action="store_true", help="the stdlib's selector (loops.LIVE_FIRST off)")
    args = parser.parse_args()
    loops.LIVE_FIRST = not args.plain_selector
    if args.client:
        client(args.client, args.users)
        return
    print(json.dumps(measure(args.users, args.bursts, args.slow, args.clump)))


if __name__ == "__main__":
    main()
