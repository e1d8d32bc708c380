"""Scenario 6 (issue 17): after a broker restart, every device reconnects with its credential.

The embedded broker only (Mosquitto and stock amqtt have no device credentials). Before the
broker starts, ``users`` accounts are written with a **production** argon2id hash (argon2-cffi's
defaults, t=3, 64 MiB, p=4; one hash shared by all, since they share one password) and one
device credential each (``DeviceStore.issue_many``: the broker's own file and key). Then a
fresh ``imcli serve`` starts on that data directory (a restart: nothing is remembered), and:

1. every device connects at once (a bounded number of CONNECTs in flight): reconnects/s;
2. as many wrong credentials and unknown devices: refusals/s (they must be as fast);
3. everyone leaves and reconnects again while an attacker sends wrong *passwords* (each an
   argon2 check) and wrong credentials at the same time: reconnects/s under attack.

A device connects with a persistent session's client id ``<user>:<device>`` and clean
session, and stays connected until the phase ends; nothing is subscribed (the scenario
measures logins, not delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.brokers import _children, _python, _read_port, rss_mb
from benchmarks.mqttload import LoadClient

PASSWORD = "bench-production-password"
DEVICE = "bench-device"
# CONNECTs at once: below Limits.pending_per_address (64), since every device here comes from 127.0.0.1
IN_FLIGHT = 50


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def prepare(data: Path, users: int) -> list[tuple[str, str]]:
    """Accounts with a production argon2 hash, and a device credential each: (user, credential)."""
    from argon2 import PasswordHasher

    from imcli.broker.accounts import AccountStore
    from imcli.broker.devices import DeviceStore

    data.mkdir(parents=True, mode=0o700)
    digest = PasswordHasher().hash(PASSWORD)  # production parameters
    names = [f"d{i:05d}" for i in range(users)]
    created = time.time() - 60
    doc = {"version": 1, "accounts": {n: {"role": "user", "created": created, "hash": digest} for n in names}}
    (data / AccountStore.FILE_NAME).write_text(json.dumps(doc))
    os.chmod(data / AccountStore.FILE_NAME, 0o600)
    credentials = DeviceStore(data).issue_many([(n, DEVICE) for n in names])
    return list(zip(names, credentials, strict=True))


async def _connect_all(port: int, logins: list[tuple[str, str, str]]) -> tuple[float, list[LoadClient], list[int]]:
    """Connect every (user, password, client id) with at most ``IN_FLIGHT`` CONNECTs in flight;
    the seconds taken, the clients let in, and the CONNACK codes (-1: no answer)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    kept: list[LoadClient] = []
    codes: list[int] = []

    async def one(user: str, password: str, client_id: str) -> None:
        async with gate:
            client = LoadClient()
            try:
                rc = await client.connect("127.0.0.1", port, user, password, client_id)
            except (OSError, asyncio.IncompleteReadError):
                rc = -1
            codes.append(rc)
            if rc == 0:
                kept.append(client)
            else:
                client.abort()

    started = time.perf_counter()
    await asyncio.gather(*(one(*login) for login in logins))
    return time.perf_counter() - started, kept, codes


async def _leave(clients: list[LoadClient]) -> None:
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


def check_rates(data: Path, devices: list[tuple[str, str]]) -> dict[str, object]:
    """The checks alone, in this process: device credentials (HMAC) and production argon2."""
    from argon2 import PasswordHasher
    from argon2.exceptions import VerificationError

    from imcli.broker.devices import DeviceStore
    from imcli.core.rules import parse_device_credential

    store = DeviceStore(data)
    started = time.perf_counter()
    for user, credential in devices:
        parsed = parse_device_credential(credential)
        assert parsed is not None and store.verify(user, *parsed, not_before=0.0)
    hmac_s = time.perf_counter() - started
    hasher = PasswordHasher()
    digest = hasher.hash(PASSWORD)
    started = time.perf_counter()
    for _ in range(3):
        with contextlib.suppress(VerificationError):
            hasher.verify(digest, "a wrong guess")
    argon2_s = (time.perf_counter() - started) / 3
    return {"credential_checks_per_s": round(len(devices) / hmac_s), "argon2_check_ms": round(argon2_s * 1000, 1)}


def device_reconnects(users: int) -> dict[str, object]:
    _raise_fd_limit(users * 2 + 1024)
    workdir = tempfile.TemporaryDirectory(prefix="bench-devices-")
    data = Path(workdir.name) / "data"
    started = time.perf_counter()
    devices = prepare(data, users)
    result: dict[str, object] = {"devices": users, "prepare_s": round(time.perf_counter() - started, 1)}
    result.update(check_rates(data, devices))
    proc = _python(
        "-m", "imcli", "serve", "--port", "0", "--data-dir", str(data),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        port = _read_port(proc, r"listening on 127\.0\.0\.1:(\d+)")
        logins = [(u, c, f"{u}:{DEVICE}") for u, c in devices]
        wrong = [(u, c[:-4] + "AAAA", f"{u}:{DEVICE}") for u, c in devices[: users // 2]]
        unknown = [(u, "dc1:nodevice:" + c.rsplit(":", 1)[1], f"{u}:nodevice") for u, c in devices[users // 2 :]]

        async def run() -> None:
            seconds, kept, codes = await _connect_all(port, logins)
            result["reconnected"] = len(kept)
            result["reconnect_s"] = round(seconds, 2)
            result["reconnects_per_s"] = round(len(kept) / seconds)
            result["rss_mb_broker"] = round(rss_mb(proc.pid), 1)
            seconds, _, codes = await _connect_all(port, wrong + unknown)
            result["refused"] = codes.count(4)
            result["refusals_per_s"] = round(len(codes) / seconds)
            await _leave(kept)
            # again, under attack: wrong passwords (argon2 each) and wrong credentials meanwhile
            attack = [(u, "wrong-password-guess", f"{u}:x") for u, _ in devices[:200]] + wrong[:2000]
            attacking = asyncio.ensure_future(_connect_all(port, attack))
            seconds, kept, codes = await _connect_all(port, logins)
            _, _, attack_codes = await attacking
            result["reconnected_under_attack"] = len(kept)
            result["reconnects_per_s_under_attack"] = round(len(kept) / seconds)
            result["attack_refused"] = sum(1 for c in attack_codes if c in (3, 4))
            await _leave(kept)

        asyncio.run(run())
        for child in _children(proc.pid):
            result["rss_mb_workers"] = round(rss_mb(child), 1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        workdir.cleanup()
    return result
