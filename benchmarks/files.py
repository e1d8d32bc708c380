"""The file scenario (issue 16): files of 1, 10 and 100 MiB sent to a DM and to a 20-member group.

For each size and conversation the figure is end to end: from ``imcli send``'s first byte
(hashing included) to the receiver's verified copy (``imcli get``), through the files worker,
as bytes per second. Beside it on Mosquitto, the same bytes as one raw message,
``mosquitto_pub -f`` → ``mosquitto_sub -C 1``: the floor MQTT allows. During the largest DM
transfer the broker's resident memory is sampled (its growth is reported) and a room's chat
latency is measured (p99), against the same measure without a transfer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.brokers import MOSQUITTO_PUB, MOSQUITTO_SUB, PASSWORD, Broker
from imcli.client import services
from imcli.client.files import FileConnection
from imcli.client.identity import Identity
from imcli.client.services import Conversation
from imcli.core.mqtt import BrokerAddress, Credentials

MIB = 1 << 20
GROUP = "benchfiles"


def _identity(broker: Broker, name: str) -> Identity:
    return Identity(BrokerAddress("127.0.0.1", broker.port), Credentials(name, PASSWORD), "bench")


def _source(folder: Path, size: int) -> Path:
    path = folder / f"source-{size // MIB}MiB.bin"
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    return path


def _send_and_fetch(broker: Broker, path: Path, where: Conversation, receiver: str, out: Path) -> float:
    """Seconds from the sender's start to the receiver's verified copy."""
    started = time.perf_counter()
    with FileConnection(_identity(broker, "u00000"), "bench-send") as sender:
        target = sender.target(where)
        info = sender.upload(path, target)
        sender.post(where, target, info)
    with FileConnection(_identity(broker, receiver), "bench-get") as getter:
        getter.download(info.id, out, force=True)
    elapsed = time.perf_counter() - started
    if out.stat().st_size != path.stat().st_size:
        raise AssertionError("the copy differs in size")
    out.unlink()
    return elapsed


def raw_transfer(broker: Broker, path: Path) -> float:
    """Seconds for mosquitto_pub -f → mosquitto_sub -C 1 of the same bytes (one message)."""
    assert MOSQUITTO_PUB is not None and MOSQUITTO_SUB is not None
    common = ["-h", "127.0.0.1", "-p", str(broker.port), "-P", PASSWORD, "-q", "1"]
    topic = "im/room/rawfile/u00000"
    sink = path.with_suffix(".raw")
    with sink.open("wb") as out:
        sub = subprocess.Popen(
            [MOSQUITTO_SUB, *common, "-u", "u00001", "-i", "u00001:rawsub", "-t", "im/room/rawfile/+", "-C", "1", "-N"],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal; a second is plenty on loopback
        started = time.perf_counter()
        subprocess.run(
            [MOSQUITTO_PUB, *common, "-u", "u00000", "-i", "u00000:rawpub", "-t", topic, "-f", str(path)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=600,
        )
        sub.wait(600)
        elapsed = time.perf_counter() - started
    if sink.stat().st_size != path.stat().st_size:
        raise AssertionError(f"mosquitto_sub got {sink.stat().st_size} bytes of {path.stat().st_size}")
    sink.unlink()
    return elapsed


class RoomPing:
    """A room message every 100 ms from one user to another; latencies in ms."""

    def __init__(self, broker: Broker) -> None:
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._pub = self._client(broker, "pinga")
        self._sub = self._client(broker, "pingb")
        ready = threading.Event()
        self._sub.on_message = lambda _c, _u, m: self.latencies.append(
            (time.perf_counter() - json.loads(m.payload)["text_sent"]) * 1000
        )
        self._sub.on_subscribe = lambda *_: ready.set()
        self._sub.subscribe("im/room/pingfiles/+", qos=1)
        if not ready.wait(10):
            raise TimeoutError("the ping subscriber got no SUBACK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _client(broker: Broker, name: str) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}:files", protocol=paho.MQTTv311)
        client.username_pw_set(name, PASSWORD)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        return client

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # 10/s: within the embedded broker's chat rate
            payload = json.dumps({"text_sent": time.perf_counter()})  # not a ChatMessage: the room takes text
            self._pub.publish("im/room/pingfiles/pinga", payload, qos=1)

    def measure(self, seconds: float) -> None:
        self.latencies.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(seconds)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(5)
        time.sleep(0.3)
        return list(self.latencies)

    def close(self) -> None:
        for client in (self._pub, self._sub):
            client.disconnect()
            client.loop_stop()


def p99(values: list[float]) -> float | None:
    if len(values) < 10:
        return None
    return round(statistics.quantiles(values, n=100)[98], 1)


def file_transfer(broker: Broker, sizes_mib: list[int], members: int) -> dict[str, Any]:
    folder = Path(broker.workdir.name) / "files-bench"
    folder.mkdir()
    owner = _identity(broker, "u00000")
    services.group_request(owner, "create", GROUP, private=True)
    for i in range(1, members):
        services.group_request(owner, "invite", GROUP, user=f"u{i:05d}")
    out: dict[str, Any] = {}
    largest = max(sizes_mib)
    for size in sizes_mib:
        source = _source(folder, size * MIB)
        for kind, where, receiver in (
            ("dm", Conversation("dm", "u00001"), "u00001"),
            ("group", Conversation("group", GROUP), f"u{members - 1:05d}"),
        ):
            watch = size == largest and kind == "dm"
            ping = RoomPing(broker) if watch else None
            sampler = _RssSampler(broker) if watch else None
            if ping is not None:
                ping.measure(5.0)
                out["chat_p99_ms_idle"] = p99(ping.stop())
                ping.measure(0)
            seconds = _send_and_fetch(broker, source, where, receiver, folder / "copy.bin")
            if ping is not None and sampler is not None:
                out["chat_p99_ms_transfer"] = p99(ping.stop())
                ping.close()
                out["rss_growth_MiB"] = sampler.stop()
            out[f"{kind}_{size}MiB_MBps"] = round(size * MIB / seconds / 1e6, 1)
        if broker.name == "mosquitto":
            out[f"raw_{size}MiB_MBps"] = round(size * MIB / raw_transfer(broker, source) / 1e6, 1)
        source.unlink()
    return out


class _RssSampler:
    """The broker's resident memory every 50 ms; ``stop`` returns the growth over the first sample."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.first = broker.rss_mb()
        self.peak = self.first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._broker.rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return round(self.peak - self.first, 1)
