"""The file scenario (issue 16): files of 1, 10 and 100 MiB sent to a DM and to a 20-member group.

For each size and conversation the figure is end to end: from ``imcli send``'s first byte
(hashing included) to the receiver's verified copy (``imcli get``), through the files worker,
as bytes per second. Beside it on Mosquitto, the same bytes as one raw message,
``mosquitto_pub -f`` → ``mosquitto_sub -C 1``: the floor MQTT allows. During the largest DM
transfer the broker's resident memory is sampled (its growth is reported) and a room's chat
latency is measured (a ping every 5 ms: p99 with its 95 % interval, and the median), against
the same measure without a transfer. The
sender's, the worker's and the receiver's bulk threads run at the priority ``IMCLI_BULK_PRIORITY``
chooses (``imcli/core/bulk.py``; the JSON's ``bulk_priority``): set it before the run to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.brokers import MOSQUITTO_PUB, MOSQUITTO_SUB, PASSWORD, Broker, cpu_seconds
from benchmarks.quantile import interval
from benchmarks.roomping import RoomPing
from imcli.client import services
from imcli.client.files import FileConnection
from imcli.client.identity import Identity
from imcli.client.services import Conversation
from imcli.core import bulk
from imcli.core.errors import RequestTimeout
from imcli.core.mqtt import BrokerAddress, Credentials

MIB = 1 << 20
GROUP = "benchfiles"
RESUMES = 5  # a background download that stalls is run again (resumed) this many times before the scenario fails
# seconds between two chat pings during the largest DM transfer: hundreds of pings per 100 MiB
# transfer, so that its p99 is not its second-largest ping (at 10 ms it was); each costs the embedded
# broker about 0.45 ms of CPU (its journal row among it), so 200 a second are a tenth of a core
# (benchmarks/filesping.py measures it; docs/PERFORMANCE.md)
PING_PERIOD = 0.005


def _identity(broker: Broker, name: str) -> Identity:
    return Identity(BrokerAddress("127.0.0.1", broker.port), Credentials(name, PASSWORD), "bench")


def _source(folder: Path, size: int) -> Path:
    path = folder / f"source-{size // MIB}MiB.bin"
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    return path


def _send_and_fetch(
    broker: Broker, path: Path, where: Conversation, receiver: str, out: Path, cpu: dict[str, float] | None = None
) -> float:
    """Seconds from the sender's start to the receiver's verified copy; ``cpu`` gets each process's CPU seconds."""
    before = _cpu(broker)
    started = time.perf_counter()
    with FileConnection(_identity(broker, "u00000"), "bench-send") as sender:
        target = sender.target(where)
        info = sender.upload(path, target)
        sender.post(where, target, info)
    with FileConnection(_identity(broker, receiver), "bench-get") as getter:
        getter.download(info.id, out, force=True)
    elapsed = time.perf_counter() - started
    if cpu is not None:
        cpu.update(_cpu(broker, since=before))
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


def p99(values: list[float]) -> float | None:
    if len(values) < 10:
        return None
    return round(statistics.quantiles(values, n=100)[98], 1)


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


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
            copy = folder / "copy.bin"
            cpu: dict[str, float] = {}
            if size == largest and kind == "dm":
                seconds = _watched(broker, source, where, receiver, copy, out, cpu)
            else:
                seconds = _send_and_fetch(broker, source, where, receiver, copy, cpu)
            if size == largest:  # CPU per MiB of each process: a figure the machine's load moves far less
                for part, used in cpu.items():
                    out[f"{kind}_cpu_ms_per_MiB_{part}"] = round(used * 1000 / size, 1)
            out[f"{kind}_{size}MiB_MBps"] = round(size * MIB / seconds / 1e6, 1)
        if broker.name == "mosquitto":
            out[f"raw_{size}MiB_MBps"] = round(size * MIB / raw_transfer(broker, source) / 1e6, 1)
        source.unlink()
    return out


def _watched(
    broker: Broker,
    source: Path,
    where: Conversation,
    receiver: str,
    copy: Path,
    out: dict[str, Any],
    cpu: dict[str, float],
) -> float:
    """``_send_and_fetch`` while a room's chat latency (against 5 s without) and the broker's memory are measured."""
    ping = RoomPing(broker, period=PING_PERIOD)
    try:
        with ping.phase() as idle:
            time.sleep(5.0)
        sampler = _RssSampler(broker)
        try:
            with ping.phase() as busy:
                seconds = _send_and_fetch(broker, source, where, receiver, copy, cpu)
        finally:
            out["rss_growth_MiB"] = sampler.stop()
    finally:
        ping.close()
    out["chat_p99_ms_idle"], out["chat_p99_ms_transfer"] = p99(idle), p99(busy)
    out["chat_p50_ms_idle"], out["chat_p50_ms_transfer"] = p50(idle), p50(busy)
    out["chat_pings_idle"], out["chat_pings_transfer"] = len(idle), len(busy)
    for phase, pings in (("idle", idle), ("transfer", busy)):  # the p99's 95 % interval (benchmarks/quantile.py)
        low, high = interval(pings, 0.99)
        out[f"chat_p99_ms_{phase}_ci95"] = [None if x is None else round(x, 1) for x in (low, high)]
    out["bulk_priority"] = bulk.policy()  # the transfer's threads' (imcli/core/bulk.py, IMCLI_BULK_PRIORITY)
    return seconds


def _cpu(broker: Broker, since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds used so far by the broker, the workers (imcli serve's child, or imcli workers) and this
    process (the sender's and the receiver's imcli code); minus ``since``."""
    now = {
        "broker": cpu_seconds(broker.pid),
        "workers": cpu_seconds(broker.extra_pids["workers"]),
        "clients": time.process_time(),
    }
    return {k: v - since[k] for k, v in now.items()} if since else now


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


# ---------------------------------------------------------------- transfers in the background (dmbusy)


@contextlib.contextmanager
def transfers_running(broker: Broker, mib: int) -> Iterator[dict[str, Any]]:
    """Files of ``mib`` MiB sent to a DM (u00000 to u00001) and fetched back, one after another, for as
    long as the block runs, by a process of their own (so that their client code shares no interpreter
    with the caller's measure); each file differs from the last (the store keeps one copy of equal
    contents, and a second upload of one would move no bytes). The figures are added to the yielded
    dict at the block's end: ``transfers`` completed and ``transfer_MBps`` over them."""
    figures: dict[str, Any] = {}
    folder = Path(broker.workdir.name) / "busy-files"
    folder.mkdir(exist_ok=True)
    command = ["--port", str(broker.port), "--mib", str(mib), "--folder", str(folder)]
    errors = (folder / "errors.txt").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.files", *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":  # its file written: the transfers start now
        proc.kill()
        raise RuntimeError("the background transfer process did not start")
    try:
        yield figures
    finally:
        proc.stdin.close()  # it stops after the transfer in hand
        out = proc.stdout.read()
        proc.wait(60)
        errors.seek(0)
        said = errors.read().strip().splitlines()
        errors.close()
    if proc.returncode:  # the transfers stopped before the block's end: its figures had less load than said
        raise RuntimeError(f"the background transfers stopped: {said[-1] if said else proc.returncode}")
    done = [line.split() for line in out.splitlines() if line.strip()]
    seconds = [float(line[0]) for line in done]
    figures["transfers"] = len(seconds)
    if resumed := sum(int(line[1]) for line in done):  # downloads that stalled 15 s and were run again
        figures["transfer_downloads_resumed"] = resumed
    figures["transfer_mib"] = mib
    figures["transfer_MBps"] = round(len(seconds) * mib * MIB / sum(seconds) / 1e6, 1) if seconds else None


def _loop(port: int, mib: int, folder: Path) -> None:
    """The process of ``transfers_running``: transfer until stdin ends, printing each one's seconds."""
    address = BrokerAddress("127.0.0.1", port)
    source = _source(folder, mib * MIB)
    stop = threading.Event()

    def until_stdin_ends() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_ends, daemon=True).start()
    print("ready", flush=True)
    n = 0
    while not stop.is_set():
        n += 1
        with source.open("r+b") as f:  # a new file each time: its first bytes are the transfer's number
            f.write(n.to_bytes(8, "big"))
        started = time.perf_counter()
        with FileConnection(Identity(address, Credentials("u00000", PASSWORD), "bench"), "busy-send") as sender:
            where = Conversation("dm", "u00001")
            target = sender.target(where)
            sender.post(where, target, info := sender.upload(source, target))
            resumed = 0
            with FileConnection(Identity(address, Credentials("u00001", PASSWORD), "bench"), "busy-get") as getter:
                while True:
                    try:
                        getter.download(info.id, folder / "copy.bin", force=True)
                        break
                    except RequestTimeout:
                        # no chunk for 15 s (the NATS cluster under the room flood): what the error tells a
                        # user to do, run it again, and it goes on from its .part file (counted)
                        resumed += 1
                        if resumed > RESUMES:
                            raise
            print(f"{time.perf_counter() - started:.3f} {resumed}", flush=True)
            sender.delete(info.id)  # within the account's storage quota (1 GiB) however long the block runs


def main() -> None:
    parser = argparse.ArgumentParser(description="transfers_running's process (benchmarks' dmbusy scenario)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args()
    _loop(args.port, args.mib, args.folder)


if __name__ == "__main__":
    main()
