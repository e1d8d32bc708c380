"""Throttles of the connection gate: failed logins, registrations, password checks at once.

Failed logins (and failed registrations, wrong invite codes among them) are counted in three
bounded tables; past a number of free failures each further attempt on a key waits a delay
that doubles with every failure, up to a cap. While it waits, an attempt is refused at once
(CONNACK 3) *without looking at its password*: the refusal says nothing about the password,
and costs no argon2.

* per (account, address): the ordinary guesser; few free failures (``Limits.login_failures``).
* per address, over all accounts: password spraying, unknown names, registrations and invite
  codes (``Limits.address_failures``).
* per account, over all addresses: a guesser spread over many addresses
  (``Limits.account_failures``). So that such an attacker cannot lock the real user out,
  this table (and the per-address one) does not apply to an (account, address) pair that has
  logged in successfully before (``known``, remembered in memory): the user's usual devices
  keep working during an attack; a user on an address never seen for the account waits like
  the attacker. Failures from a known pair do not count against the account either.

A refused attempt does not lengthen the delay (else an attacker could keep the account's
table locked for ever); only attempts that reached the password check and failed do.
Every table is an LRU of at most ``Limits.throttle_entries`` keys, and failures are forgotten
``Limits.failures_forgotten`` seconds after the last one: memory stays bounded.

``PasswordChecks`` bounds how many argon2 checks (64 MiB and ~150 ms of CPU each) run at
once, and how many wait for one; past that a login is refused at once (CONNACK 3) instead
of piling up threads and memory.

An IPv6 address counts by its /64 (whoever has one address usually has the whole prefix).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from imcli.broker.limits import Limits

K = TypeVar("K")
T = TypeVar("T")


def address_key(address: str | None) -> str:
    """The key an address is counted under: IPv4 as is, IPv6 by its /64."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def backoff(failures: int, free: int, first: float, cap: float) -> float:
    """The delay after ``failures`` failures of which ``free`` cost nothing: ``first``, doubled per failure, capped."""
    over = failures - free
    if over <= 0:
        return 0.0
    return min(cap, first * 2.0 ** min(over - 1, 64))


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    until: float = 0.0  # attempts before this moment are refused


@dataclass
class FailureTable(Generic[K]):
    """Failures per key with backoff, at most ``size`` keys (least recently touched forgotten first)."""

    free: int
    first: float
    cap: float
    forget: float
    size: int
    _entries: OrderedDict[K, _Failures] = field(default_factory=OrderedDict)

    def wait(self, key: K, now: float) -> float:
        """Seconds before ``key`` may try again (0: now)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        if now - entry.last > self.forget and now >= entry.until:
            del self._entries[key]
            return 0.0
        return max(0.0, entry.until - now)

    def failed(self, key: K, now: float) -> float:
        """Count a failure; the delay it starts (0: still free)."""
        entry = self._entries.pop(key, None)
        if entry is None or now - entry.last > self.forget:
            entry = _Failures()
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        entry.count += 1
        entry.last = now
        delay = backoff(entry.count, self.free, self.first, self.cap)
        entry.until = max(entry.until, now + delay)
        return delay

    def clear(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class LoginThrottle:
    """The three failure tables and the (account, address) pairs that have logged in before."""

    def __init__(self, limits: Limits) -> None:
        timing = (limits.login_backoff, limits.login_backoff_cap, limits.failures_forgotten, limits.throttle_entries)
        self.pairs = FailureTable[tuple[str, str]](limits.login_failures, *timing)
        self.accounts = FailureTable[str](limits.account_failures, *timing)
        self.addresses = FailureTable[str](limits.address_failures, *timing)
        self.known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._known_size = limits.throttle_entries

    def wait(self, account: str, address: str, now: float) -> float:
        """Seconds before a login of ``account`` from ``address`` may be checked (0: now)."""
        pair = (account, address)
        left = self.pairs.wait(pair, now)
        if pair not in self.known:
            left = max(left, self.accounts.wait(account, now), self.addresses.wait(address, now))
        return left

    def failed(self, account: str, address: str, now: float) -> float:
        """Count a wrong password (or unknown name); the longest delay it starts."""
        pair = (account, address)
        delays = [self.pairs.failed(pair, now), self.addresses.failed(address, now)]
        if pair not in self.known:
            delays.append(self.accounts.failed(account, now))
        return max(delays)

    def succeeded(self, account: str, address: str) -> None:
        pair = (account, address)
        self.pairs.clear(pair)
        self.known[pair] = None
        self.known.move_to_end(pair)
        while len(self.known) > self._known_size:
            self.known.popitem(last=False)

    # registrations and invite codes: the per-address table only (there is no account yet)

    def address_wait(self, address: str, now: float) -> float:
        return self.addresses.wait(address, now)

    def address_failed(self, address: str, now: float) -> float:
        return self.addresses.failed(address, now)


@dataclass
class WindowCount:
    """At most ``limit`` events per key in any ``window`` seconds (registrations per address), ``size`` keys."""

    limit: int
    window: float
    size: int
    _events: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def wait(self, key: str, now: float) -> float:
        """Seconds before one more event of ``key`` is allowed (0: now)."""
        events = self._events.get(key)
        if events is None:
            return 0.0
        while events and now - events[0] >= self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return 0.0
        return 0.0 if len(events) < self.limit else events[0] + self.window - now

    def add(self, key: str, now: float) -> None:
        events = self._events.pop(key, None) or deque()
        events.append(now)
        while len(events) > self.limit:
            events.popleft()
        self._events[key] = events
        while len(self._events) > self.size:
            self._events.popitem(last=False)


class Busy(Exception):
    """Too many password checks are running and waiting already."""


class PasswordChecks:
    """At most ``concurrent`` slow checks in threads at once, and ``queued`` waiting for one."""

    def __init__(self, concurrent: int, queued: int) -> None:
        self._slots = asyncio.Semaphore(concurrent)
        self._queued = queued
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Logins waiting for a check to start."""
        return self._waiting

    async def run(self, check: Callable[[], T]) -> T:
        """``check()`` in a worker thread; ``Busy`` at once when the queue is full."""
        if self._slots.locked() and self._waiting >= self._queued:
            raise Busy
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.to_thread(check)
        finally:
            self._slots.release()
