"""Accounts: names, roles and argon2 hashes in one JSON file under the data directory.

The running broker and the operator's ``imcli admin user …`` commands share the file:
writers take an exclusive ``flock`` and replace the file atomically; readers notice a
changed file by its ``stat`` and reload. Passwords exist only as argon2id hashes
(argon2-cffi's defaults, RFC 9106 "low memory": t=3, m=64 MiB, p=4; the workers' service
accounts, whose passwords are random keys of one run, at t=1, m=1 MiB, p=1); neither a
password nor a hash is ever logged.

A full verification costs about 150 ms of CPU and 64 MiB, on purpose. So that a team
reconnecting after a network blip (or ``imcli say`` in a loop) is not throttled to a few
logins a second, ``verify`` remembers the last password it verified for each account as
an HMAC-SHA256 under a secret drawn when the process starts: never the password, never
written anywhere, dropped when the account's file entry changes or the account goes
(the account's argon2 hash is part of the HMAC input too). Trade-off: someone who can
read the broker's memory could test guesses against a remembered HMAC at SHA-256 speed
instead of argon2 speed; such a reader already sees passwords as CONNECT packets arrive.
A wrong password is never remembered, so guessing over the network still costs argon2.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from imcli.core.errors import AccountError, InvalidInput, NameTaken, NotFound
from imcli.core.names import look_alike
from imcli.core.rules import DEVICE_CREDENTIAL_PREFIX
from imcli.core.wire import NAME_RULE, RESERVED_NAMES, is_name

log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


class Role(enum.StrEnum):
    USER = "user"
    SERVICE = "service"  # workers: may write replies, notices, presence, events


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: Role
    created: float
    hash: str  # argon2 encoded hash, never logged (excluded from repr below)

    def __repr__(self) -> str:
        return f"Account(name={self.name!r}, role={self.role.value!r})"


def unusable_data_dir(data_dir: Path, exc: OSError) -> AccountError:
    return AccountError(
        f"cannot use the data directory {data_dir}: {exc.strerror or exc}",
        "give a writable directory with --data-dir or IMCLI_DATA_DIR",
    )


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput("password too short", f"choose one of at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInput("password too long", f"choose one of at most {MAX_PASSWORD_LENGTH} characters")
    if password.startswith(DEVICE_CREDENTIAL_PREFIX):  # the broker reads such a password as a device credential
        raise InvalidInput(f"a password may not start with {DEVICE_CREDENTIAL_PREFIX!r}", "choose another password")
    return password


# A service account's password is a random key of one run (imcli/broker/server.py's
# new_service_password, 192 bits): argon2's cost protects passwords people choose, which can be
# guessed, and a key cannot; at its lowest cost imcli serve re-keys its five workers in
# milliseconds instead of seconds of CPU (each ~1.5 s on a loaded 2-core machine).
SERVICE_KEY_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


_ROLES = {role.value: role for role in Role}
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _parse(text: str) -> dict[str, Account]:
    """accounts.json's accounts, read one entry per call into json: ``json.loads`` of the whole file
    holds the interpreter 20 ms and more at 10,000 accounts (1.8 MB), a stall of the event loop even
    from another thread; between two entries the interpreter may switch to the loop's thread."""
    accounts: dict[str, Account] = {}
    found = []

    def entry(name: str, at: int) -> int:
        value, end = _DECODER.raw_decode(text, at)
        accounts[name] = Account(name, _ROLES[value["role"]], float(value["created"]), value["hash"])
        return end

    def member(key: str, at: int) -> int:
        if key == "accounts":
            accounts.clear()  # a repeated key: the last one counts, as with json.loads
            found.append(key)
            return _object(text, at, entry)
        return int(_DECODER.raw_decode(text, at)[1])

    end = _object(text, _space(text, 0), member)
    if _space(text, end) != len(text):
        raise ValueError(f"extra data at {end}")
    if not found:
        raise KeyError("accounts")
    return accounts


def _object(text: str, at: int, value: Callable[[str, int], int]) -> int:
    """Walk the JSON object at ``text[at]``: ``value(key, where its value starts)`` reads each member's
    value and says where it ends; where the object ends."""
    if text[at : at + 1] != "{":
        raise ValueError(f"an object expected at {at}")
    at = _space(text, at + 1)
    if text[at : at + 1] == "}":
        return at + 1
    while True:
        if text[at : at + 1] != '"':
            raise ValueError(f"a key expected at {at}")
        key, at = _DECODER.raw_decode(text, at)
        at = _space(text, at)
        if text[at : at + 1] != ":":
            raise ValueError(f"':' expected at {at}")
        at = _space(text, value(key, _space(text, at + 1)))
        if text[at : at + 1] == "}":
            return at + 1
        if text[at : at + 1] != ",":
            raise ValueError(f"',' or '}}' expected at {at}")
        at = _space(text, at + 1)


def _space(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()  # type: ignore[union-attr]  # matches everywhere (zero or more)


class AccountStore:
    """Accounts of one data directory. Thread-safe; safe against concurrent processes."""

    FILE_NAME = "accounts.json"

    def __init__(self, data_dir: Path, hasher: PasswordHasher | None = None) -> None:
        self.data_dir = data_dir
        self.path = data_dir / self.FILE_NAME
        self._lock_path = data_dir / "accounts.lock"
        self._removed_path = data_dir / "removed-accounts.json"  # names not given again without --reuse
        self._hasher = hasher or PasswordHasher()
        self._mutex = threading.Lock()
        self._reloading = threading.Lock()
        self._gone: set[str] = set()  # ``take_gone``
        self._accounts: dict[str, Account] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.generation = 0  # counts reloads: whoever caches something of the accounts compares it
        self._secret = secrets.token_bytes(32)  # keys the remembered logins; lives and dies with the process
        self._verified: dict[str, bytes] = {}  # account -> HMAC of the password last verified for it
        # verifying against a fixed hash for unknown names keeps their timing like a known name's
        self._dummy_hash = self._hasher.hash("imcli-dummy-password")
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.refresh()
        except OSError as exc:
            raise unusable_data_dir(data_dir, exc) from exc

    # ------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Reload the file if another process (or this one) changed it. In the broker's event loop,
        ``await refresh_off_loop()`` instead: at 10,000 accounts a reload is 50 ms of CPU."""
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return
        with self._reloading:  # one reload at a time: the login checks' threads would each parse the file
            if stamp == self._stamp:
                return
            self._install(self._read(), stamp)

    def stale(self) -> bool:
        """Whether the file changed since it was loaded (one ``stat``: cheap enough for the event loop)."""
        return self._stamp_now() != self._stamp

    async def refresh_off_loop(self) -> bool:
        """``refresh`` from the event loop: the file is parsed in a thread, a few entries per call into
        json (``_parse``), so the loop gets the interpreter between them, and the new accounts replace
        the old in one step. Whether it reloaded (issue 21: 30 to 46 ms of the loop's CPU at 10,000
        accounts before)."""
        if not self.stale():
            return False
        generation = self.generation
        await asyncio.to_thread(self.refresh)
        return self.generation != generation

    def _stamp_now(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _install(self, accounts: dict[str, Account], stamp: tuple[int, int, int] | None) -> None:
        old = self._accounts
        # found before the swap, outside the mutex (at 10,000 accounts a few ms; the broker reloads in a
        # thread): accounts gone or made again (a new creation stamp; ``passwd`` keeps it), and the
        # remembered logins to forget (a login remembered meanwhile for an account that changes fails
        # all the same: its HMAC covers the account's hash)
        gone = [n for n, a in old.items() if (new := accounts.get(n)) is None or new.created != a.created]
        # a snapshot of the names (one C call, which no other thread interrupts): the password checks'
        # threads add to ``_verified`` meanwhile, and iterating it here could raise "changed size"
        forgotten = [n for n in list(self._verified) if accounts.get(n) != old.get(n)]
        with self._mutex:
            self._accounts, self._stamp = accounts, stamp
            for name in forgotten:
                self._verified.pop(name, None)
            self._gone.update(gone)
            self.generation += 1

    def take_gone(self) -> set[str]:
        """The accounts removed or made again (another owner of the name) since the last call: their
        sessions must end (imcli/broker/session_upkeep.py). Found at each reload, against the accounts
        this process had loaded, so whatever logged in with the old account sees the change."""
        with self._mutex:
            gone, self._gone = self._gone, set()
        return gone

    def _read(self) -> dict[str, Account]:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            raise AccountError(f"account file {self.path} is damaged: {exc}", "restore it from a backup") from exc

    def snapshot(self) -> Mapping[str, Account]:
        """The accounts as last loaded, without touching the disk (replaced, never changed, by a reload)."""
        return self._accounts

    def get(self, name: str) -> Account | None:
        self.refresh()
        return self._accounts.get(name)

    def cached_role(self, name: str) -> Role | None:
        """The role as last loaded, without touching the disk (hot path: topic checks)."""
        account = self._accounts.get(name)
        return account.role if account else None

    def list_accounts(self) -> list[Account]:
        self.refresh()
        return sorted(self._accounts.values(), key=lambda a: a.name)

    def verify(self, name: str, password: str) -> Account | None:
        """The account if ``password`` is right; ``None`` otherwise (unknown name included).

        Slow on purpose (argon2) unless ``recall`` would succeed: call it from a worker
        thread in async code.
        """
        account = self.recall(name, password)
        if account is not None:
            return account
        account = self.get(name)
        try:
            self._hasher.verify(account.hash if account else self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if account is not None:
            self._verified[name] = self._login_digest(account, password)
        return account

    def recall(self, name: str, password: str, *, reload: bool = True) -> Account | None:
        """The account if ``password`` is the one last verified for it (cheap: no argon2).
        ``reload=False``: against the accounts as last loaded (the event loop, after ``refresh_off_loop``)."""
        remembered = self._verified.get(name)
        if remembered is None:
            return None
        account = self.get(name) if reload else self._accounts.get(name)
        if account is None or not hmac.compare_digest(remembered, self._login_digest(account, password)):
            return None
        return account

    def _login_digest(self, account: Account, password: str) -> bytes:
        message = b"\0".join((account.name.encode(), account.hash.encode(), password.encode()))
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    # ------------------------------------------------------------------ writing

    def add(
        self, name: str, password: str, role: Role = Role.USER, *, allow_reserved: bool = False, reuse: bool = False
    ) -> Account:
        """A new account. The name of a removed one is refused unless ``reuse``: the archive
        still holds the old owner's direct messages, which the name would open to the new one."""
        if not is_name(name):
            raise InvalidInput(f"invalid account name {name!r}", NAME_RULE)
        if name in RESERVED_NAMES and not allow_reserved:
            raise InvalidInput(f"the name {name!r} is reserved", "choose another name")
        if not allow_reserved and (reserved := look_alike(name, sorted(RESERVED_NAMES))) is not None:
            raise InvalidInput(f"the name {name!r} looks like the reserved name {reserved!r}", "choose another name")
        hashed = self._hasher.hash(check_password(password))  # slow: outside the file lock
        with self._locked() as accounts:
            if name in accounts:
                raise NameTaken(f"the name {name!r} is taken", "choose another name")
            if (other := look_alike(name, accounts)) is not None:  # a1ice beside alice (TR39 skeletons)
                raise NameTaken(f"the name {name!r} looks like the account {other!r}", "choose another name")
            removed = self._read_removed()
            if name in removed:
                if not reuse:
                    raise NameTaken(
                        f"the name {name!r} belonged to a removed account",
                        "choose another name; an operator may give it again with 'imcli admin user add --reuse'",
                    )
                del removed[name]
                self._write_removed(removed)
            account = Account(name, role, time.time(), hashed)
            accounts[name] = account
        log.info("account %s added (role %s)", name, role.value)
        return account

    def add_many(self, credentials: list[tuple[str, str]], role: Role = Role.USER) -> None:
        """Add several accounts in one write (imports, benchmarks); all or none."""
        hashed = []
        for name, password in credentials:
            if not is_name(name) or name in RESERVED_NAMES:
                raise InvalidInput(f"invalid or reserved account name {name!r}", NAME_RULE)
            hashed.append((name, self._hasher.hash(check_password(password))))
        with self._locked() as accounts:
            removed = self._read_removed()
            taken = [name for name, _ in hashed if name in accounts or name in removed]
            if taken:
                raise NameTaken(f"the name {taken[0]!r} is taken", "choose another name")
            now = time.time()
            for name, digest in hashed:
                accounts[name] = Account(name, role, now, digest)

    def ensure_service(self, name: str, password: str) -> None:
        """Create or re-key a service account (used by ``imcli serve`` for its own workers, with a
        random key of at least 128 bits: argon2 at its lowest cost, ``SERVICE_KEY_HASHER``).

        The password just hashed is remembered as verified (``recall``): the worker's login that
        follows costs no argon2 check. Each start of ``imcli serve`` re-keys its five workers; on a
        loaded machine those hashes and checks, one after another, held its start for 10 s and more."""
        hashed = SERVICE_KEY_HASHER.hash(check_password(password))
        with self._locked() as accounts:
            old = accounts.get(name)
            if old is not None and old.role is not Role.SERVICE:
                raise NameTaken(
                    f"the service account name {name!r} belongs to a user",
                    "remove that user or configure another service account name",
                )
            account = accounts[name] = Account(name, Role.SERVICE, old.created if old else time.time(), hashed)
        self._verified[name] = self._login_digest(account, password)  # after the re-read, which forgets the old

    def set_password(self, name: str, password: str) -> None:
        """A new password for an existing account (``imcli passwd``); its devices keep working."""
        hashed = self._hasher.hash(check_password(password))  # slow: outside the file lock
        with self._locked() as accounts:
            old = accounts.get(name)
            if old is None:
                raise NotFound(f"no account named {name!r}", "see imcli admin user list")
            accounts[name] = Account(name, old.role, old.created, hashed)
        log.info("account %s has a new password", name)

    def remove(self, name: str) -> None:
        with self._locked() as accounts:
            if accounts.pop(name, None) is None:
                raise NotFound(f"no account named {name!r}", "see imcli admin user list")
            removed = self._read_removed()
            removed[name] = time.time()
            self._write_removed(removed)  # before accounts.json: a crash leaves it kept
        log.info("account %s removed", name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Account]]:
        """Read-modify-write under an exclusive lock shared with other processes."""
        try:
            with self._locked_unchecked() as accounts:
                yield accounts
        except OSError as exc:
            raise unusable_data_dir(self.data_dir, exc) from exc

    @contextlib.contextmanager
    def _locked_unchecked(self) -> Iterator[dict[str, Account]]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            accounts = self._read()
            yield accounts
            self._write(accounts)
        finally:
            os.close(fd)  # closing releases the flock
        self.refresh()

    def _write(self, accounts: dict[str, Account]) -> None:
        doc = {
            "version": 1,
            "accounts": {
                a.name: {"role": a.role.value, "created": a.created, "hash": a.hash}
                for a in sorted(accounts.values(), key=lambda a: a.name)
            },
        }
        self._write_json(self.path, doc)

    def _read_removed(self) -> dict[str, float]:
        """Removed account names -> when (read under the file lock)."""
        try:
            raw = json.loads(self._removed_path.read_text())
            return {str(name): float(when) for name, when in raw["removed"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AccountError(
                f"account file {self._removed_path} is damaged: {exc}", "restore it from a backup, or remove it"
            ) from exc

    def _write_removed(self, removed: dict[str, float]) -> None:
        self._write_json(self._removed_path, {"version": 1, "removed": removed})

    @staticmethod
    def _write_json(path: Path, doc: object) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
