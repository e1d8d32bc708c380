"""Invite codes for ``imcli serve --registration invite``, in ``invites.json`` of the data directory.

``imcli admin invite`` makes a code: 128 random bits, shown once. The file keeps only its
SHA-256 (a code is random, so a fast hash is enough: nobody can guess one back from it),
how many uses are left and when it expires; it is written like the account file (mode
0600, atomically, under an exclusive ``flock`` shared with the broker). A registration
redeems a code under that lock, so a code meant for one use makes one account; a use whose
account could not be made (name taken) is given back. Codes used up or expired are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imcli.core.errors import AccountError, InvalidInput


@dataclass(frozen=True)
class Invite:
    id: str  # the first 12 hex digits of the code's hash: enough to tell codes apart in a list
    uses: int  # left
    expires: float | None  # epoch seconds
    created: float


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


class InviteStore:
    FILE_NAME = "invites.json"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / self.FILE_NAME
        self._lock_path = data_dir / "invites.lock"

    def create(self, uses: int = 1, expires_in: float | None = None, now: float | None = None) -> tuple[str, Invite]:
        """A new code (returned once, never stored) and what is kept of it."""
        if uses < 1:
            raise InvalidInput(f"invalid number of uses {uses}", "give 1 or more")
        if expires_in is not None and expires_in <= 0:
            raise InvalidInput("an invite must expire in the future", "give a duration such as 7d, 12h or 30m")
        now = time.time() if now is None else now
        code = secrets.token_urlsafe(16)  # letters, digits, '-' and '_': never ':'
        entry = {"uses": uses, "expires": None if expires_in is None else now + expires_in, "created": now}
        with self._locked() as invites:
            invites[_digest(code)] = entry
        return code, self._invite(_digest(code), entry)

    def redeem(self, code: str, now: float | None = None) -> dict[str, float | None] | None:
        """Use the code once if it is valid (known, not expired): what was kept of it, for ``give_back``."""
        now = time.time() if now is None else now
        key = _digest(code)
        with self._locked() as invites:
            entry = invites.get(key)
            if entry is None or _spent(entry, now) or not entry["uses"]:
                return None
            entry = dict(entry)
            invites[key]["uses"] = int(entry["uses"] or 0) - 1
            if not invites[key]["uses"]:
                del invites[key]  # used up
            return entry

    def give_back(self, code: str, entry: dict[str, float | None]) -> None:
        """A redeemed use whose account could not be made (``entry``: what ``redeem`` returned)."""
        with self._locked() as invites:
            kept = invites.setdefault(_digest(code), {**entry, "uses": 0})
            kept["uses"] = int(kept["uses"] or 0) + 1

    def list_invites(self) -> list[Invite]:
        with self._locked() as invites:
            return sorted((self._invite(k, e) for k, e in invites.items()), key=lambda i: i.created)

    def revoke(self, invite_id: str) -> int:
        """Drop the codes whose id starts with ``invite_id``; how many."""
        if len(invite_id) < 4:
            raise InvalidInput(f"invite id {invite_id!r} too short", "give at least 4 characters of its id")
        with self._locked() as invites:
            gone = [k for k in invites if k.startswith(invite_id)]
            for k in gone:
                del invites[k]
        return len(gone)

    @staticmethod
    def _invite(key: str, entry: dict[str, float | None]) -> Invite:
        expires = entry["expires"]
        return Invite(key[:12], int(entry["uses"] or 0), expires, float(entry["created"] or 0.0))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, float | None]]]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AccountError(
                f"cannot use the data directory {self.data_dir}: {exc.strerror or exc}",
                "check its owner and permissions, or choose another with --data-dir",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            invites = self._read()
            yield invites
            now = time.time()
            for key in [k for k, e in invites.items() if _spent(e, now)]:
                del invites[key]
            self._write(invites)
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, float | None]]:
        try:
            raw = json.loads(self.path.read_text())
            return {str(k): dict(v) for k, v in raw["invites"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AccountError(
                f"invite file {self.path} is damaged: {exc}", "restore it from a backup, or remove it"
            ) from exc

    def _write(self, invites: dict[str, dict[str, float | None]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "invites": invites}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def _spent(entry: dict[str, float | None], now: float) -> bool:
    expires = entry["expires"]
    return expires is not None and expires <= now


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``, ``2w`` or a plain number of seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise InvalidInput(f"invalid duration {text!r}", "give a number with s, m, h, d or w, such as 7d") from None
    if not value > 0 or value == float("inf"):
        raise InvalidInput(f"invalid duration {text!r}", "give a duration above 0, such as 7d")
    return value
