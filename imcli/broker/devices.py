"""Device credentials (issue 17): what a device keeps instead of the account password.

``imcli login`` trades the password, once, for a device credential: the MQTT password
``dc1:<device>:<secret>`` (imcli/core/rules.py) with a 256-bit random secret, bound to the
client ids ``<account>:<device>`` and ``<account>:<device>.<session>``. Bots get the same
from ``imcli token create LABEL``, listed as tokens.

The broker keeps, per account and device, only ``HMAC-SHA256(key, account, device, secret)``
in ``devices.json`` in the data directory, under a key of its own in ``device.key`` (both
mode 0600): a secret drawn at random with 256 bits cannot be guessed, so the check needs no
argon2 and costs microseconds, and a stolen ``devices.json`` without the key (or with it:
HMAC is not reversible) gives no credential. An unknown device is checked against a dummy
record, so that it costs the same as a known one; neither goes through the login throttle,
so that guessing at credentials slows nobody else (and cannot lock the real user out).

A device record made before its account's ``created`` is dead: an account removed and
given again (``--reuse``) does not inherit the old owner's devices. When a device was last
seen is kept in memory and written out at most once a minute (and at shutdown), so that
10,000 reconnects do not write 10,000 files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from imcli.core.errors import InvalidInput, NameTaken, NotFound
from imcli.core.rules import device_credential
from imcli.core.wire import NAME_RULE, is_name

log = logging.getLogger(__name__)

MAX_DEVICES = 100  # devices and tokens per account: the file stays bounded against a password holder
SEEN_FLUSH = 60.0  # seconds: how stale a written ``last_seen`` may be


@dataclass
class DeviceRecord:
    name: str
    kind: str  # "device" or "token"
    created: float
    digest: str  # hex HMAC of the secret, never logged
    last_seen: float | None = None

    def __repr__(self) -> str:
        return f"DeviceRecord(name={self.name!r}, kind={self.kind!r})"


class DeviceStore:
    """The device records of one data directory; the broker's process alone writes them."""

    FILE_NAME = "devices.json"
    KEY_NAME = "device.key"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.FILE_NAME
        self._key = self._load_key(data_dir / self.KEY_NAME)
        self._devices: dict[str, dict[str, DeviceRecord]] = self._read()
        self._dummy = self._digest("-", "-", secrets.token_urlsafe(32))
        self._dirty = False
        self._flushed = time.monotonic()

    @staticmethod
    def _load_key(path: Path) -> bytes:
        try:
            key = path.read_bytes()
            if len(key) >= 32:
                return key
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return key

    def _read(self) -> dict[str, dict[str, DeviceRecord]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        devices: dict[str, dict[str, DeviceRecord]] = {}
        for account, records in raw["devices"].items():
            devices[account] = {
                name: DeviceRecord(name, r["kind"], float(r["created"]), r["digest"], r.get("last_seen"))
                for name, r in records.items()
            }
        return devices

    def _write(self) -> None:
        doc = {
            "version": 1,
            "devices": {
                account: {
                    r.name: {"kind": r.kind, "created": r.created, "digest": r.digest, "last_seen": r.last_seen}
                    for r in records.values()
                }
                for account, records in self._devices.items()
                if records
            },
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._dirty = False
        self._flushed = time.monotonic()

    def _digest(self, account: str, device: str, secret: str) -> str:
        message = b"\0".join((account.encode(), device.encode(), secret.encode()))
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    # ---------------------------------------------------------------- checking

    def verify(self, account: str, device: str, secret: str, not_before: float) -> bool:
        """Whether ``secret`` is the credential of ``account``'s ``device`` (made at or after
        ``not_before``, the account's creation). As fast for an unknown device as a known one."""
        record = self._devices.get(account, {}).get(device)
        expected = record.digest if record is not None else self._dummy
        right = hmac.compare_digest(expected, self._digest(account, device, secret))
        return right and record is not None and record.created >= not_before

    def seen(self, account: str, device: str, now: float | None = None) -> None:
        """The device connected or left just now (kept in memory; ``flush`` writes it)."""
        record = self._devices.get(account, {}).get(device)
        if record is not None:
            record.last_seen = time.time() if now is None else now
            self._dirty = True

    def flush(self, force: bool = False) -> None:
        """Write the ``last_seen`` times if they changed (at most once per ``SEEN_FLUSH`` unless ``force``)."""
        if self._dirty and (force or time.monotonic() - self._flushed >= SEEN_FLUSH):
            self._write()

    # ---------------------------------------------------------------- managing

    def of(self, account: str) -> list[DeviceRecord]:
        return sorted(self._devices.get(account, {}).values(), key=lambda r: (r.created, r.name))

    def issue(self, account: str, name: str, kind: str = "device") -> str:
        """A new credential for ``account``'s device (or token) ``name``, returned once."""
        if not is_name(name):
            raise InvalidInput(f"invalid device name {name!r}", NAME_RULE)
        records = self._devices.setdefault(account, {})
        if name in records:
            hint = "revoke it first, or choose another name"
            raise NameTaken(f"{account} has a device or token named {name!r}", hint)
        if len(records) >= MAX_DEVICES:
            hint = "revoke one with 'imcli devices revoke'"
            raise InvalidInput(f"{account} has {MAX_DEVICES} devices and tokens, the most allowed", hint)
        secret = secrets.token_urlsafe(32)
        records[name] = DeviceRecord(name, kind, time.time(), self._digest(account, name, secret))
        self._write()
        log.info("%s %s of %s issued", kind, name, account)
        return device_credential(name, secret)

    def issue_many(self, account_devices: list[tuple[str, str]]) -> list[str]:
        """Credentials for many (account, device) pairs in one write (benchmarks, imports)."""
        credentials = []
        now = time.time()
        for account, name in account_devices:
            secret = secrets.token_urlsafe(32)
            self._devices.setdefault(account, {})[name] = DeviceRecord(
                name, "device", now, self._digest(account, name, secret)
            )
            credentials.append(device_credential(name, secret))
        self._write()
        return credentials

    def revoke(self, account: str, name: str) -> DeviceRecord:
        record = self._devices.get(account, {}).pop(name, None)
        if record is None:
            raise NotFound(f"{account} has no device or token named {name!r}", "see 'imcli devices'")
        self._write()
        log.info("%s %s of %s revoked", record.kind, name, account)
        return record

    def forget_account(self, account: str) -> None:
        if self._devices.pop(account, None):
            self._write()
