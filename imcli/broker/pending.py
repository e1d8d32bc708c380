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
from collections import OrderedDict
from collections.abc import Callable, Hashable

from imcli.broker.throttle import address_key

log = logging.getLogger(__name__)


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
