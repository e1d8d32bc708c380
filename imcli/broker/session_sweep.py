"""Ended clean sessions leave the broker's table a slice at a time (issue 21: no stall over 50 ms).

amqtt 0.12.1's ``Broker._session_monitor`` walks every session in the table once a second and
cleans up, in the same callback, every disconnected clean (or anonymous) session it finds: with
10,000 signed-in users the walk alone took 5 to 7 ms of CPU every second, and when the 10,000 left
at once one callback took 232 ms of CPU (``python -m benchmarks.memory --users 10000 --hold 30
--probe``: ``Broker._session_monitor`` resuming from its sleep; docs/PERFORMANCE.md).

``EndedSessions`` replaces it (``ImBroker._session_monitor``): the broker names each session whose
connection ended (``ended``), and ``run`` forgets them with amqtt's own cleanup (stop the handler,
drop the subscriptions, clear the queues), ``SLICE`` at a time, letting the event loop run between
slices. Whether a session may be forgotten is amqtt's rule, checked when its turn comes
(``forgettable``): it is still the table's session for its client id (a new connection may have
taken the id since), disconnected, and clean or anonymous. Every ``SWEEP_EVERY`` seconds the whole
table is looked over, a slice at a time too, for one that ended some other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from amqtt.session import Session

from imcli.broker.client_loop import Bell

SLICE = 100  # sessions forgotten (about 25 us of CPU each at 10,000 users) before the loop runs others
SWEEP_SLICE = 1000  # sessions looked at per round of a sweep of the table
SWEEP_EVERY = 60.0  # seconds between sweeps (amqtt's monitor: every second)


def forgettable(table: Mapping[str, tuple[Session, Any]], client_id: str, session: Session) -> bool:
    """amqtt's rule: the table's session for ``client_id`` is ``session``, disconnected, clean or anonymous."""
    current = table.get(client_id, (None, None))[0]
    if current is not session:
        return False
    return bool(session.transitions.is_disconnected() and (session.is_anonymous or session.clean_session))


class EndedSessions:
    """Client ids whose connection ended, in the order they ended, each with its session."""

    def __init__(self) -> None:
        # an OrderedDict: its first item is taken in O(1); a dict's ``next(iter(d))`` walks past the
        # slots its earlier deletions left (3.6 us a session when 10,000 ended at once, against 0.9 at 2,000)
        self._ended: OrderedDict[str, Session] = OrderedDict()
        self._bell = Bell()
        self.forgotten = 0  # sessions forgotten so far (tests)

    def ended(self, client_id: str | None, session: Session) -> None:
        if client_id:
            self._ended[client_id] = session
            self._bell.set()

    def __len__(self) -> int:
        return len(self._ended)

    async def run(
        self, table: Mapping[str, tuple[Session, Any]], forget: Callable[[str], Awaitable[None]]
    ) -> None:  # fmt: skip
        """Forget ended sessions as they come, and sweep the table now and then (until cancelled)."""
        next_sweep = time.monotonic() + SWEEP_EVERY
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bell.wait(), max(0.0, next_sweep - time.monotonic()))
            self._bell.clear()
            if time.monotonic() >= next_sweep:
                await self.sweep(table)
                next_sweep = time.monotonic() + SWEEP_EVERY
            await self.forget_ended(table, forget)

    async def forget_ended(
        self, table: Mapping[str, tuple[Session, Any]], forget: Callable[[str], Awaitable[None]]
    ) -> None:  # fmt: skip
        """Forget every session named so far that may be, ``SLICE`` at a time."""
        looked = 0
        while self._ended:
            client_id, session = self._ended.popitem(last=False)
            if forgettable(table, client_id, session):
                await forget(client_id)
                self.forgotten += 1
            looked += 1
            if looked % SLICE == 0:
                await asyncio.sleep(0)

    async def sweep(self, table: Mapping[str, tuple[Session, Any]]) -> None:
        """Name every session of the table that may be forgotten (amqtt's monitor did this every second).

        A copy of the client ids, not of the table's items: ``list(table.items())`` made a tuple per
        session, 10,000 new objects at once, and the collections they set off (the young generations
        full, then a full one: imcli/broker/gcpause.py) took the sweep's first slice 11 to 18 ms of
        CPU at 10,000 users, 8 to 14 of them the collector's (``--trace-stalls``, docs/PERFORMANCE.md)."""
        for looked, client_id in enumerate(list(table), 1):
            entry = table.get(client_id)
            if entry is not None and forgettable(table, client_id, entry[0]):
                self._ended[client_id] = entry[0]
            if looked % SWEEP_SLICE == 0:
                await asyncio.sleep(0)
