"""Output bound: what the broker holds for one connection that does not read (issue 15, item 4).

amqtt writes deliveries to a connection without waiting for the client to read them: the
bytes pile up in the connection's transport (asyncio's write buffer, for TCP, TLS and the
WebSocket's TCP connection alike) or, on amqtt's own path (QoS 2, WebSocket), in one task per
copy waiting for its ``drain``. A client that subscribes and never reads grew the broker by
173 MB in 20 s, freed only when it left (with keep-alive 0, never).

``OutputBound`` keeps, per connection, the bytes the broker holds for it: the transport's
write buffer, the copies of the current fan-out batch not yet handed to it
(imcli/broker/fanout.py), the QoS 1 copies not yet acknowledged, and the copies in amqtt's
publish tasks, each of these with ``HELD_COPY`` bytes more for the objects that hold it (a
client that never sends its PUBACKs holds the broker's memory as surely as one that does
not read, and the kernel's socket buffers can hide a non-reader for megabytes). Every copy
for a connected client asks ``admit`` first, as Mosquitto's ``max_queued_messages`` and
EMQX's force-shutdown policy decide:

* past ``Limits.output_drop`` bytes waiting, QoS 0 copies to that connection are dropped;
* a copy that would take it past ``Limits.output_close`` closes the connection (aborted: a
  graceful close would wait for the very buffer that does not drain);
* a connection that has had output waiting, and taken none of it (no PUBACK, no byte out
  of the transport's buffer), at every check for ``Limits.output_stuck`` seconds (checked
  once a second by ``run``) is closed too, so that a client that stopped reading does not
  hold its buffer, its session and its task for ever.

Once a connection is closing, its QoS 1 and 2 copies go to its persistent session's offline
queue (bounded by ``Limits.max_queued``), as for any offline session; a clean session's are
dropped (the archive has chat). Each connection is logged once when it starts dropping and
once when it is closed. Workers' connections are bounded too: they read at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter

log = logging.getLogger(__name__)

# what a copy the broker holds until its PUBACK (or in a task of amqtt's) costs beyond its
# bytes: amqtt's OutgoingApplicationMessage, a future and its callback, two table entries
HELD_COPY = 1024
INBOX = 100  # messages a connection sent that wait for its message loop: no more is read from it meanwhile
CHECK_SLICE = 200  # connections looked at per round of the event loop by ``run`` (about 0.25 ms of CPU)


class Transport(Protocol):
    def get_write_buffer_size(self) -> int: ...

    def abort(self) -> None: ...


class _Ended:
    """What a forgotten outlet holds instead of its connection's transport (``OutputBound.forget``)."""

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


ENDED = _Ended()


class ReadGate(ReaderAdapter):
    """amqtt's reader of one connection, reading nothing more while ``OutputBound.read_paused``
    says so: its output is past its transport's high-water mark, where any answer the broker
    writes to it waits for a drain (a SUBACK, a PUBACK, a PINGRESP), or ``INBOX`` messages it
    sent wait for the connection's message loop. amqtt reads each packet into a task of its own
    whatever the rest do: with the loop stuck in such a drain, a client that did not read kept
    sending, and 8,800 PUBLISHes of 200 KB waited, unchecked (rate and size are checked when
    the loop takes them), in the session's queue: +1.7 GB in 8 s; a client that sent small
    QoS 0 messages faster than the loop judged them queued 55,000. Now the kernel's socket
    buffers fill and the client's own sends block, as TCP means them to."""

    POLL = 0.05  # the longest wait between looks (seconds)
    FIRST_POLL = 0.001  # the first: doubled at each look that finds it still paused, up to POLL
    YIELD_EVERY = 32  # reads (a PUBLISH takes three or four)

    def __init__(self, inner: ReaderAdapter, output: OutputBound, writer: Any) -> None:
        self._inner = inner
        self._output = output
        self._writer = writer
        self._reads = 0

    async def read(self, n: int = -1) -> bytes:
        self._reads += 1
        if not self._reads % self.YIELD_EVERY:  # buffered bytes are read without a pause: let the
            await asyncio.sleep(0)  # tasks made of the packets read so far reach the inbox
        # a full inbox is often emptied by the next round of its message loop: a fixed 50 ms look
        # held a bot that sent faster than one loop round for 50 ms each time (issue 21)
        delay = self.FIRST_POLL
        while self._output.read_paused(self._writer):  # polled: asyncio has no event for these
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.POLL)
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class Verdict(enum.Enum):
    WRITE = "write"
    DROP = "drop"  # a QoS 0 copy past the drop limit
    CLOSED = "closed"  # the connection is being closed: a QoS 1 or 2 copy waits in its session's queue


@dataclass
class Outlet:
    """One connection's output: its transport, the bytes in amqtt's publish tasks, and what was logged."""

    transport: Transport
    label: str = "a connection"
    in_tasks: int = 0  # bytes of copies not yet acknowledged (QoS 1) or written (amqtt's tasks)
    handed: int = 0  # bytes handed to the transport since the last check
    buffered: int = 0  # the transport's buffer at the last check
    progressed: bool = False  # a copy was acknowledged or written since the last check
    stalled_since: float | None = None  # first check that found output waiting and no progress
    dropping: bool = False
    closing: bool = False
    dropped: int = 0
    inbox: Any = None  # the session's queue of messages read from the connection, not yet handled

    def waiting(self) -> int:
        return self.transport.get_write_buffer_size() + self.in_tasks

    def release(self, size: int) -> None:
        """A copy held with ``OutputBound.hold`` was acknowledged (or its connection ended)."""
        self.in_tasks -= size + HELD_COPY
        self.progressed = True


class OutputBound:
    """The bytes each connection has waiting, and what becomes of one more copy for it."""

    def __init__(self, drop_at: int, close_at: int, stuck_after: float) -> None:
        self.drop_at = drop_at
        self.close_at = close_at
        self.stuck_after = stuck_after
        self._outlets: dict[Any, Outlet] = {}  # by amqtt's writer adapter (a handler's ``writer``)
        self.closed: list[str] = []  # labels of the connections closed, oldest first (for tests)
        self.peak = 0  # the most bytes seen waiting for one connection

    def watch(self, writer: Any, transport: Transport) -> None:
        self._outlets[writer] = Outlet(transport)

    def forget(self, writer: Any) -> None:
        """The connection of ``writer`` has ended. Its outlet lets go of the transport and the inbox at
        once: ``run``'s list of the outlets it checks lives up to a second, and through the transport
        it held each ended connection's objects (protocol, reader, handler, session, queues), all
        freed in the one step that dropped the list: 18 to 27 ms of CPU, freeing, when thousands
        had left within that second (docs/PERFORMANCE.md, issue 21, tenth session)."""
        outlet = self._outlets.pop(writer, None)
        if outlet is None:
            return
        outlet.closing = True  # nothing more to check or admit
        outlet.transport, outlet.inbox = ENDED, None
        if outlet.dropped:
            log.info("%s: %d QoS 0 messages dropped while it did not read", outlet.label, outlet.dropped)

    def attach_inbox(self, writer: Any, inbox: Any) -> None:
        """``inbox`` (an asyncio queue) holds what the connection of ``writer`` sent, not yet handled."""
        outlet = self._outlets.get(writer)
        if outlet is not None:
            outlet.inbox = inbox

    def read_paused(self, writer: Any) -> bool:
        """Whether nothing more is to be read from the connection of ``writer`` for now (``ReadGate``)."""
        outlet = self._outlets.get(writer)
        if outlet is None or outlet.closing:
            return False
        transport: Any = outlet.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            return True
        return outlet.inbox is not None and outlet.inbox.qsize() >= INBOX

    def readable(self, writer: Any) -> bool:
        """Whether more may be read from the connection of ``writer`` now (imcli/broker/reader.py)."""
        return not self.read_paused(writer)

    def waiting(self, writer: Any) -> int:
        outlet = self._outlets.get(writer)
        return 0 if outlet is None else outlet.waiting()

    def largest(self, label: str | None = None) -> int:
        """The most bytes one connection (of client id ``label``, if given) has waiting now."""
        outlets = [o for o in list(self._outlets.values()) if label is None or o.label == label]
        return max((outlet.waiting() for outlet in outlets), default=0)

    def admit(self, writer: Any, label: str, qos: int, size: int, batched: int = 0) -> Verdict:
        """Whether a copy of ``size`` bytes may be written to the connection of ``writer``,
        which already has ``batched`` bytes in the current batch (not yet in its transport)."""
        outlet = self._outlets.get(writer)
        if outlet is None:
            return Verdict.WRITE
        if outlet.closing:
            return Verdict.CLOSED
        outlet.label = label
        waiting = outlet.transport.get_write_buffer_size() + outlet.in_tasks + batched
        if waiting <= self.drop_at and waiting + size <= self.close_at:
            return Verdict.WRITE  # every copy asks: the common case first
        self.peak = max(self.peak, waiting)
        if waiting + size > self.close_at:
            self._close(outlet, f"{waiting} bytes waiting, the limit is {self.close_at}")
            return Verdict.CLOSED
        if qos == 0 and waiting > self.drop_at:
            if not outlet.dropping:
                outlet.dropping = True
                log.warning("%s does not read: QoS 0 messages to it are dropped (%d bytes waiting)", label, waiting)
            outlet.dropped += 1
            return Verdict.DROP
        return Verdict.WRITE

    def hold(self, writer: Any, size: int) -> Outlet | None:
        """A copy of ``size`` bytes the broker holds until its PUBACK: the caller calls the
        returned outlet's ``release`` with the same ``size`` then (imcli/broker/fanout.py)."""
        outlet = self._outlets.get(writer)
        if outlet is not None:
            outlet.in_tasks += size + HELD_COPY
        return outlet

    def in_task(self, writer: Any, size: int, task: asyncio.Future[Any]) -> None:
        """A copy whose bytes the broker holds until ``task`` is done: a QoS 1 copy until its
        PUBACK (imcli/broker/fanout.py), a copy handed to amqtt's own ``mqtt_publish`` until
        written and acknowledged."""
        outlet = self._outlets.get(writer)
        if outlet is None:
            return
        size += HELD_COPY
        outlet.in_tasks += size

        def done(_: asyncio.Future[Any]) -> None:
            outlet.in_tasks -= size
            outlet.progressed = True

        task.add_done_callback(done)

    def handed(self, writer: Any, size: int) -> None:
        """``size`` bytes were just written to the connection's transport."""
        outlet = self._outlets.get(writer)
        if outlet is not None:
            outlet.handed += size

    def check(self, now: float) -> None:
        """Close the connections that have had output waiting, and made no progress (nothing
        acknowledged, nothing taken from the transport's buffer), at every check for
        ``stuck_after`` seconds."""
        self._check(list(self._outlets.values()), now)

    def _check(self, outlets: list[Outlet], now: float) -> None:
        for outlet in outlets:
            if outlet.closing:
                continue
            buffered = outlet.transport.get_write_buffer_size()
            sent = outlet.buffered + outlet.handed - buffered
            progressed = outlet.progressed or sent > 0
            outlet.buffered, outlet.handed, outlet.progressed = buffered, 0, False
            waiting = buffered + outlet.in_tasks
            self.peak = max(self.peak, waiting)
            if not waiting or progressed:
                outlet.stalled_since = None
            elif outlet.stalled_since is None:
                outlet.stalled_since = now
            elif now - outlet.stalled_since >= self.stuck_after:
                self._close(outlet, f"{waiting} bytes waiting, none taken for {now - outlet.stalled_since:.0f} s")

    async def run(self, period: float = 1.0) -> None:
        """``check`` every ``period``, ``CHECK_SLICE`` connections per round of the event loop: all
        10,000 of them at once were 11 to 12 ms of CPU every second, and a slice of 1,000 (1.2 to 1.6 ms)
        was still the longest callback a DM could wait behind at 1,000 users (issue 21, docs/PERFORMANCE.md)."""
        while True:
            await asyncio.sleep(min(period, self.stuck_after / 2))
            now, outlets = time.monotonic(), list(self._outlets.values())
            for start in range(0, len(outlets), CHECK_SLICE):
                if start:
                    await asyncio.sleep(0)
                self._check(outlets[start : start + CHECK_SLICE], now)

    def _close(self, outlet: Outlet, why: str) -> None:
        outlet.closing = True
        self.closed.append(outlet.label)
        log.warning("closing %s: it does not read (%s)", outlet.label, why)
        outlet.transport.abort()  # its reader sees the end: amqtt ends the session (and fires its Will)
