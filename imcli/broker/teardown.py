"""A connection's end done a slice of connections per event-loop round (issue 21: no stall over 50 ms).

When 10,000 users leave at once, their DISCONNECTs (or ends of stream) are read within a few
rounds of the event loop, and asyncio runs what each read made ready in the order it was made
ready: before this gate, each reader went on at once to the whole of its connection's end (the
handler's stop, the transport's close, the message loop's ``_handle_disconnect``, the Last Will,
the session's bookkeeping, about 60 to 80 us of CPU), so a PINGREQ or a chat line read in the
same round waited behind every one of them (814 ms of the loop's own CPU in the lead's run of
2026-11-26: docs/PERFORMANCE.md).

``TeardownGate.turn`` is what a stream connection's reader (imcli/broker/reader.py) awaits once
it has read the connection's last packet: ``SLICE`` connections a round go on, the others wait
for a later round, in the order they asked. What the client sent before its end is not held:
what waits is the end itself. While a connection waits its turn, nothing that its end sets off
has happened: its message loop has not been told (it goes on handling what the client sent
before), its Last Will is not decided, its session is still connected (so not forgettable:
imcli/broker/session_sweep.py), and a take-over (``ImBroker.take_over``) ends it at once, as it
ends a live one, with the DISCONNECT it read counted (``AckAfterJournal.goodbye``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

# connections whose end goes on per loop round (60 to 150 us of CPU each); 100 until the eighth session,
# when the loop's selector began to hand it at most 256 sockets a round (imcli/serve/livefirst.py) and
# rounds that ran 100 ends took 30 to 50 ms (docs/PERFORMANCE.md, issue 21, eighth session)
SLICE = 25


class TeardownGate:
    """Turns for connections' ends, ``SLICE`` a loop round, first asked first served."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None] | Callable[[], object]] = deque()
        self._given = 0  # turns given in this round
        self._next: asyncio.Handle | None = None  # the next round's refill, once scheduled
        self.turns = 0  # turns given so far (tests, benchmarks)
        self.waited = 0  # turns that waited for a later round (tests, benchmarks)

    def __len__(self) -> int:
        return len(self._waiting)

    async def turn(self) -> None:
        """Return when this connection's end may go on (at once if this round has a turn left)."""
        if self.turn_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue(waiter)
        await waiter  # cancelled (a take-over, the broker's shutdown): the refill passes it by

    def turn_now(self) -> bool:
        """Take a turn if this round has one left and nobody waits; whether it did."""
        if self._waiting or self._given >= SLICE:
            return False
        self._given += 1
        self.turns += 1
        self._schedule()
        return True

    def queue(self, waiter: asyncio.Future[None] | Callable[[], object]) -> None:
        """Wait for a turn: ``waiter`` is a future to resolve, or a callable to call, when it comes."""
        self._waiting.append(waiter)
        self.waited += 1
        self._schedule()

    def _schedule(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        """A new round: the next ``SLICE`` waiters go on (their tasks run in the round after this one)."""
        self._next = None
        self._given = 0
        waiting = self._waiting
        while waiting and self._given < SLICE:
            waiter = waiting.popleft()
            if isinstance(waiter, asyncio.Future):
                if waiter.done():
                    continue
                waiter.set_result(None)
            else:
                waiter()
            self._given += 1
            self.turns += 1
        if waiting or self._given:
            self._schedule()
