"""Connections that have not sent their CONNECT yet, bounded per address and in all.

A peer that opens sockets and never speaks holds a file descriptor, a task and buffers each
until the CONNECT deadline (``BrokerSettings.packet_timeout``). Past
``Limits.pending_per_address`` such connections from one address (an IPv6 /64 counts as
one, imcli/broker/throttle.py's ``address_key``), or ``Limits.max_pending`` from everyone,
the *oldest* pending one is closed: a real client sends its CONNECT within a round trip of
connecting, so it is never the oldest for long, while a flood of silent sockets only pushes
out its own. Only a connection pending for ``GRACE`` (1 s) is closed so: a burst of real
clients from one address (a NAT, a team reconnecting) is accepted all at once, before any of
their CONNECTs (sent already) is read. A new arrival closes the oldest silent ones of its
address at once; an upkeep task (``run``) closes the rest once a second. The adapter
registers a connection when it is accepted and calls ``done`` when its CONNECT has been
read (or the connection ends).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from imcli.broker.throttle import address_key

log = logging.getLogger(__name__)

GRACE = 1.0  # seconds a new connection has to get its CONNECT read before it counts as silent
FD_CEILING = 1 << 20  # what "unlimited" is raised to


@dataclass(frozen=True)
class OpenFiles:
    """The open-file limit a server runs with after ``raise_fd_limit``, for its start-up lines."""

    soft: int  # in force now (FD_CEILING stands for unlimited)
    hard: int
    wanted: int  # what the broker's limits need at least

    def line(self) -> str:
        """``imcli serve``'s line: the limit, and what to do when it is below what the limits need."""
        said = f"{self.soft} (ulimit -n" + (", raised to the hard limit)" if self.soft == self.hard else ")")
        if self.soft < self.hard:
            said += f"; could not raise it to the hard limit, {self.hard}"
        if self.soft < self.wanted:
            said += f"; below the {self.wanted} the limits need: raise the hard limit (LimitNOFILE= in systemd)"
        return said


def raise_fd_limit(wanted: int) -> OpenFiles:
    """Raise this process's soft limit of open files to its hard limit (every connection,
    pending or not, is a file descriptor; many systems start servers with a soft limit of 1,024).
    Returns the limits now in force; warns when the soft one is below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY:
        soft = FD_CEILING
    elif soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, ceiling, exc)
    if soft < wanted:
        log.warning(
            "only %d open files allowed (ulimit -n): fewer than the %d connections the limits allow", soft, wanted
        )
    return OpenFiles(int(soft), int(ceiling), wanted)


class PendingConnections:
    """``run`` (an upkeep task) enforces the caps on connections past ``grace`` too."""

    def __init__(
        self, per_address: int, total: int, grace: float = GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.grace = grace
        self.clock = clock
        self._all: OrderedDict[Hashable, tuple[str, Callable[[], None], float]] = OrderedDict()
        self._by_address: dict[str, OrderedDict[Hashable, None]] = {}
        self.closed = 0  # connections closed for being past a limit (for logs and tests)

    def __len__(self) -> int:
        return len(self._all)

    def arrived(self, key: Hashable, address: str | None, close: Callable[[], None]) -> None:
        """A connection was accepted; ``close()`` aborts it."""
        where = address_key(address)
        now = self.clock()
        self._all[key] = (where, close, now)
        self._by_address.setdefault(where, OrderedDict())[key] = None
        self._trim(where, now)

    def done(self, key: Hashable) -> None:
        """The connection's CONNECT was read, or the connection ended (idempotent)."""
        entry = self._all.pop(key, None)
        if entry is None:
            return
        mine = self._by_address.get(entry[0])
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_address[entry[0]]

    def enforce(self) -> None:
        now = self.clock()
        for where in [w for w, mine in self._by_address.items() if len(mine) > self.per_address]:
            self._trim(where, now)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.grace)
            self.enforce()

    def _trim(self, where: str, now: float) -> None:
        # a burst of real clients is accepted all at once, before any of their CONNECTs (already
        # sent) is read: only connections silent for ``grace`` are counted as the flood
        mine = self._by_address.get(where)
        while mine and len(mine) > self.per_address and self._silent(next(iter(mine)), now):
            self._evict(next(iter(mine)), f"more than {self.per_address} from {where}")
        while len(self._all) > self.total and self._silent(next(iter(self._all)), now):
            self._evict(next(iter(self._all)), f"more than {self.total} in all")

    def _silent(self, key: Hashable, now: float) -> bool:
        return now - self._all[key][2] >= self.grace

    def _evict(self, key: Hashable, why: str) -> None:
        close = self._all[key][1]
        self.done(key)
        self.closed += 1
        if self.closed == 1 or self.closed % 1000 == 0:
            log.warning("closed a connection that sent no CONNECT yet: %s (%d so far)", why, self.closed)
        close()
