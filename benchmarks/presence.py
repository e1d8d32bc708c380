"""Presence benchmark: N users come online against `imcli serve`, then churn.

    python -m benchmarks.presence --users 1000 [--churn-rounds 3]

Starts `imcli serve` (the embedded default: broker + presence worker) as its own process
on a free loopback port, connects N simulated users from one asyncio process (each with
its Last Will and a retained online status, as `imcli listen` does), and reports:

- join storm: connects per second (CONNACKs received);
- absorb: status changes per second until a watcher has seen all N presence records online;
- `who`: request → reply time with N online (median and max of 10), and reply size;
- churn: offline/online flips per second until the roster is consistent again;
- the broker process's resident memory.

The benchmark's accounts use cheap argon2 parameters (t=1, m=1 MiB) so that setup and
the join storm measure presence rather than password hashing; real accounts cost one
full argon2 verification per CONNECT (see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argon2 import PasswordHasher

from benchmarks.mqttload import LoadClient
from imcli.broker.accounts import AccountStore
from imcli.core.wire import DeviceStatus, Roster, Topics, WhoRequest, decode, encode, new_id

T = Topics()
PASSWORD = "bench-password"


def start_serve(data_dir: Path, *options: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imcli", "serve", "--port", "0", "--data-dir", str(data_dir), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("imcli serve did not start")
    return proc, int(match.group(1))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Watcher:
    """Counts presence records: which users the worker says are online."""

    def __init__(self) -> None:
        self.online: set[str] = set()
        self.records = 0
        self.changed = asyncio.Event()
        self.replies: dict[str, tuple[float, bytes]] = {}

    def __call__(self, topic: str, payload: bytes) -> None:
        parsed = T.parse(topic)
        if parsed is None:
            return
        if parsed.owner and parsed.key and "/reply/" in topic:
            self.replies[parsed.key] = (time.perf_counter(), payload)
        elif payload and parsed.owner:
            record = json.loads(payload)
            self.records += 1
            if record["state"] == "online":
                self.online.add(record["account"])
            else:
                self.online.discard(record["account"])
        self.changed.set()

    async def until(self, predicate: object, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not predicate():  # type: ignore[operator]
            self.changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError("the roster did not become consistent in time")
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                continue


async def ask_who(client: LoadClient, watcher: Watcher, include_offline: bool) -> tuple[float, int, int]:
    corr = new_id()
    started = time.perf_counter()
    await client.publish(T.request("bench-watch", corr), encode(WhoRequest(all=include_offline)))
    while corr not in watcher.replies:
        await asyncio.sleep(0.001)
    arrived, payload = watcher.replies.pop(corr)
    roster = decode(payload)
    assert isinstance(roster, Roster)
    return arrived - started, len(roster.users), len(payload)


async def run(users: int, rounds: int, port: int) -> dict[str, object]:
    names = [f"u{i:05d}" for i in range(users)]
    watcher = Watcher()
    watch = LoadClient(on_message=watcher)
    assert await watch.connect("127.0.0.1", port, "bench-watch", PASSWORD, "bench-watch:w") == 0
    await watch.subscribe(T.presence_filter())
    await watch.subscribe(T.reply_filter("bench-watch"))
    results: dict[str, object] = {"users": users}

    # join storm: connect with a Last Will, announce online (what `imcli listen` does)
    clients: dict[str, LoadClient] = {}
    gate = asyncio.Semaphore(200)
    status = encode(DeviceStatus(interval=3600))

    async def join(name: str) -> None:
        async with gate:
            client = LoadClient()
            topic = T.status(name, "bench")
            rc = await client.connect("127.0.0.1", port, name, PASSWORD, f"{name}:bench", will=(topic, b"", True))
            if rc != 0:
                raise RuntimeError(f"CONNECT refused for {name}: {rc}")
            clients[name] = client
            await client.publish(topic, status, qos=1, retain=True)

    started = time.perf_counter()
    await asyncio.gather(*(join(n) for n in names))
    joined = time.perf_counter() - started
    await watcher.until(lambda: len(watcher.online) >= users, timeout=600)
    absorbed = time.perf_counter() - started
    results["connects_per_s"] = round(users / joined, 1)
    results["join_absorbed_status_per_s"] = round(users / absorbed, 1)

    # who with everyone online
    timings = [await ask_who(watch, watcher, include_offline=False) for _ in range(10)]
    results["who_ms_median"] = round(statistics.median(t[0] for t in timings) * 1000, 1)
    results["who_ms_max"] = round(max(t[0] for t in timings) * 1000, 1)
    results["who_users"] = timings[0][1]
    results["who_reply_bytes"] = timings[0][2]

    # churn: every user flips offline and online again, `rounds` times
    flips = 0
    before = watcher.records  # each flip makes the worker publish two records: offline, online
    started = time.perf_counter()
    for _ in range(rounds):

        async def flip(name: str) -> None:
            async with gate:
                topic = T.status(name, "bench")
                await clients[name].publish(topic, b"", qos=1, retain=True)
                await clients[name].publish(topic, status, qos=1, retain=True)

        await asyncio.gather(*(flip(n) for n in names))
        flips += 2 * users
    await watcher.until(lambda: watcher.records >= before + flips and len(watcher.online) >= users, timeout=600)
    churn = time.perf_counter() - started
    results["churn_status_per_s"] = round(flips / churn, 1)
    consistent = await ask_who(watch, watcher, include_offline=False)
    results["roster_consistent"] = consistent[1] == users

    await asyncio.gather(*(c.disconnect() for c in clients.values()), return_exceptions=True)
    await watch.disconnect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--churn-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        store = AccountStore(data, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        store.add_many([(f"u{i:05d}", PASSWORD) for i in range(args.users)] + [("bench-watch", PASSWORD)])
        proc, port = start_serve(data)
        try:
            idle = rss_mb(proc.pid)
            results = asyncio.run(run(args.users, args.churn_rounds, port))
            results["broker_rss_mb_idle"] = round(idle, 1)
            results["broker_rss_mb_loaded"] = round(rss_mb(proc.pid), 1)
        finally:
            proc.terminate()
            proc.wait(30)

    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    results["machine"] = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"presence-{time.strftime('%Y-%m-%d')}-{args.users}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
