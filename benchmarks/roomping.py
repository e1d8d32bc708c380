"""A room's chat latency, from a process of its own: a message every 10 ms (``--period-ms``) from one user to another.

    python -m benchmarks.roomping --port P [--stamps] [--period-ms 10]
                                              # "ready" once subscribed; then per line on stdin:
                                              # "go" starts a phase, "end" ends it with one JSON line
                                              # (latencies in ms; with --stamps [sent, ms] pairs, sent
                                              # being time.perf_counter(): CLOCK_MONOTONIC, one clock for
                                              # every process on Linux)

Its own process, as a chat user's client is: in the benchmark's process the two clients waited
for the interpreter's lock behind the file transfer's sender and receiver, and measured that.
The messages leave on a fixed schedule (open loop: a slow answer does not delay the next
message; a slot missed because this process had no core is skipped, not made up in a burst).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.brokers import PASSWORD, REPO, Broker

PERIOD = 0.01  # 100 messages a second (the benchmark lifts the chat rate): a p99 of a 1.5 s transfer is not its largest
TOPIC = "im/room/pingfiles"


def _client(port: int, name: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}:files", protocol=paho.MQTTv311)
    client.max_inflight_messages_set(1000)  # paho's 20 would queue pings behind a slow PUBACK at a 2 ms period
    client.username_pw_set(name, PASSWORD)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def run(port: int, stamps: bool = False, period: float = PERIOD) -> None:
    latencies: list[tuple[float, float]] = []  # (sent, ms)
    sub, pub = _client(port, "pingb"), _client(port, "pinga")
    ready = threading.Event()

    def received(_c: object, _u: object, m: paho.MQTTMessage) -> None:
        sent = json.loads(m.payload)["sent"]
        latencies.append((sent, (time.perf_counter() - sent) * 1000))

    sub.on_message = received
    sub.on_subscribe = lambda *_: ready.set()
    sub.subscribe(f"{TOPIC}/+", qos=1)
    if not ready.wait(10):
        raise SystemExit("the ping subscriber got no SUBACK")
    print("ready", flush=True)
    stop = threading.Event()
    sender: threading.Thread | None = None

    def send() -> None:
        due = time.perf_counter()
        while True:
            due += period
            now = time.perf_counter()
            if due < now:  # slots missed (no core for this process): skipped, never sent in a burst
                due += (now - due) // period * period + period
            if stop.wait(due - now):
                return
            pub.publish(f"{TOPIC}/pinga", json.dumps({"sent": time.perf_counter()}), qos=1)

    for line in sys.stdin:
        if line.strip() == "go":
            latencies.clear()
            stop.clear()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
        elif line.strip() == "end" and sender is not None:
            stop.set()
            sender.join(5)
            time.sleep(0.3)  # the last one's way
            print(json.dumps(latencies if stamps else [ms for _, ms in latencies]), flush=True)
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()


class RoomPing:
    """The probe's process; ``phase`` yields the list its latencies (ms) fill when the block ends."""

    def __init__(self, broker: Broker, *, stamps: bool = False, period: float = PERIOD) -> None:
        """``stamps``: ``phase`` yields (sent, ms) pairs, sent on ``time.perf_counter()``'s clock;
        ``period``: seconds between two messages."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.roomping", "--port", str(broker.port), *(["--stamps"] * stamps),
             "--period-ms", f"{period * 1000:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the room ping did not start")

    @contextmanager
    def phase(self) -> Iterator[list[Any]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        latencies: list[Any] = []
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()
        try:
            yield latencies
        finally:
            self._proc.stdin.write("end\n")
            self._proc.stdin.flush()
            latencies.extend(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stamps", action="store_true", help="[sent, ms] pairs instead of ms")
    parser.add_argument("--period-ms", type=float, default=PERIOD * 1000, help="milliseconds between two messages")
    args = parser.parse_args()
    run(args.port, args.stamps, args.period_ms / 1000)


if __name__ == "__main__":
    main()
