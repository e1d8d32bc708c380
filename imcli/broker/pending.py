"""Connections that have not sent their CONNECT yet, bounded per address and in all.

A peer that opens sockets and never speaks holds a file descriptor, a task and buffers each
until the CONNECT deadline (``BrokerSettings.packet_timeout``). Past
``Limits.pending_per_address`` such connections from one address (an IPv6 /64 counts as
one, imcli/broker/throttle.py's ``address_key``), or ``Limits.max_pending`` from everyone,
the *oldest* pending one is closed at once: a real client sends its CONNECT within a round
trip of connecting, so it is never the oldest for long, while a flood of silent sockets only
pushes out its own. The adapter registers a connection when it is accepted and calls
``done`` when its CONNECT has been read (or the connection ends).
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from collections.abc import Callable, Hashable

from imcli.broker.throttle import address_key

log = logging.getLogger(__name__)

FD_CEILING = 1 << 20  # what "unlimited" is raised to


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit of open files towards its hard limit (every connection,
    pending or not, is a file descriptor; many systems start servers with a soft limit of 1,024).
    Returns the soft limit now in force; warns when it is below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, ceiling, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "only %d open files allowed (ulimit -n): fewer than the %d connections the limits allow", soft, wanted
        )
    return int(soft)


class PendingConnections:
    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._all: OrderedDict[Hashable, tuple[str, Callable[[], None]]] = OrderedDict()
        self._by_address: dict[str, OrderedDict[Hashable, None]] = {}
        self.closed = 0  # connections closed for being past a limit (for logs and tests)

    def __len__(self) -> int:
        return len(self._all)

    def arrived(self, key: Hashable, address: str | None, close: Callable[[], None]) -> None:
        """A connection was accepted; ``close()`` aborts it."""
        where = address_key(address)
        self._all[key] = (where, close)
        mine = self._by_address.setdefault(where, OrderedDict())
        mine[key] = None
        if len(mine) > self.per_address:
            self._evict(next(iter(mine)), f"more than {self.per_address} from {where}")
        if len(self._all) > self.total:
            self._evict(next(iter(self._all)), f"more than {self.total} in all")

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

    def _evict(self, key: Hashable, why: str) -> None:
        close = self._all[key][1]
        self.done(key)
        self.closed += 1
        if self.closed == 1 or self.closed % 1000 == 0:
            log.warning("closed a connection that sent no CONNECT yet: %s (%d so far)", why, self.closed)
        close()
