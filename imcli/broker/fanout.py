"""The embedded broker's delivery path: indexes and batched writes (issue 7).

amqtt 0.12.1 matches every message against every subscription filter, scans every
retained topic on every SUBSCRIBE, and delivers each copy in its own task (a PUBLISH
packet object, a write lock, a ``drain``, a 5 s ``wait_for`` with its timer, and one
``send`` system call per copy). With 10,000 signed-in users that is 10,000 filters per
message; in a busy room most of the broker's time goes to those per-copy costs.

``ImBroker`` (imcli/broker/amqtt_adapter.py) uses these instead:

* ``FilterIndex``: subscription filters by their literal head (``im/user/alice`` for
  ``im/user/alice/#``), so a message is matched against the few filters that can match it;
* ``RetainedIndex``: retained topics by their first two and three levels, so a SUBSCRIBE
  looks only at the retained messages under its filter's literal head;
* ``Deliveries``: the copies of a batch of messages, encoded once per message and written
  to each connection with one ``write`` per batch (and per event-loop round); a QoS 1 copy registers amqtt's PUBACK
  waiter and in-flight record (a future with a callback, not a task);
* ``FanOut``: amqtt's ``_run_broadcast`` with the same rules (RECEIVE check per recipient,
  offline persistent sessions queue QoS 1 and 2), using the three above, run where a message
  is published (``FanOut.publish``) instead of in amqtt's broadcast loop, one task per message
  later: the copies of the messages one data arrival brought (imcli/broker/reader.py) share
  each connection's write, and no other task's wakeup stands between a PUBLISH and its copies;
* ``SessionFilters``: each client id's own filters, so that ending a session does not walk
  every filter on the broker.

amqtt's private parts (its subscription table, ``_matches``, ``_get_handler``, its offline
queueing, a handler's PUBACK waiters) are handed in by the adapter, which lists them.

Output per connection is bounded (issue 15, imcli/broker/output.py): every copy for a
connected client goes through ``FanOut.send``, which asks ``OutputBound.admit`` with the
bytes the broker already holds for the connection (its transport's buffer, its copies in
this batch, its QoS 1 copies not yet acknowledged, its copies in amqtt's publish tasks)
before it goes either into ``Deliveries.add`` (QoS 0 and 1 over TCP: one buffer per
connection, written by ``Deliveries.flush``) or to amqtt's own ``mqtt_publish`` (QoS 2,
WebSocket). A QoS 0 copy past the drop limit is dropped; a
copy past the close limit closes the connection, and a persistent session's QoS 1 and 2
copies then go to its offline queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.errors import AMQTTError
from amqtt.session import OutgoingApplicationMessage, Session

from imcli.broker import chatfirst
from imcli.broker.output import Outlet, OutputBound, Verdict
from imcli.broker.sessions import SubscriptionTable

log = logging.getLogger(__name__)

INDEX_DEPTH = 3  # levels of a filter's literal head used as an index key: im/user/<name>
MATCHES_KEPT = 4096  # topics whose matching filters FilterIndex.matching keeps
KEPT_TOPIC = 400  # characters: a longer topic (none of the contract's) is matched each time, not kept
CHUNK = 1 << 16  # a connection's copies this long hold a file's chunk (reader.BULK: chat keeps to 16 KiB)
AFTER_OTHERS = 1e-6  # seconds: a timer, not a bare yield (reader.AFTER_OTHERS)
WRITE_AT_ONCE = 4  # a message with this many copies or fewer is written at once, not at the end of the round

Subscriptions = SubscriptionTable  # filter -> its subscribers (imcli/broker/sessions.py)


def literal_head(topic_filter: str) -> tuple[str, ...]:
    """The levels before the first wildcard, at most ``INDEX_DEPTH`` of them."""
    head = []
    for level in topic_filter.split("/")[:INDEX_DEPTH]:
        if level in ("+", "#"):
            break
        head.append(level)
    return tuple(head)


class FilterIndex:
    """Which subscription filters can match a topic: those whose literal head is a prefix of it.

    Filters are only added (amqtt deletes them from ``Broker._subscriptions`` in several
    places); a filter whose subscriptions are gone is skipped by the caller and dropped
    here by ``discard``.
    """

    def __init__(self) -> None:
        self._by_head: dict[tuple[str, ...], set[str]] = defaultdict(set)
        # filter -> its bucket in ``_by_head``, a set: not its head, a tuple of strings. CPython stops
        # tracking a dict of only strings and such tuples at a full collection, and tracks it again, young,
        # as soon as a new filter's fresh tuple goes in: then the next full collection walked all 10,000
        # filters' entries again, every second of a join (issue 21); a dict of sets stays frozen
        self._head: dict[str, set[str]] = {}
        self._matching: dict[str, list[str]] = {}  # topic -> the filters that match it (``matching``)

    def add(self, topic_filter: str) -> None:
        if topic_filter not in self._head:
            bucket = self._head[topic_filter] = self._by_head[literal_head(topic_filter)]
            bucket.add(topic_filter)
            self._matching.clear()

    def discard(self, topic_filter: str) -> None:
        bucket = self._head.pop(topic_filter, None)
        if bucket is not None:
            self._matching.clear()
            bucket.discard(topic_filter)
            if not bucket:
                del self._by_head[literal_head(topic_filter)]

    def candidates(self, topic: str) -> Iterator[str]:
        levels = topic.split("/", INDEX_DEPTH)[:INDEX_DEPTH]
        for depth in range(len(levels) + 1):
            bucket = self._by_head.get(tuple(levels[:depth]))
            if bucket:
                yield from list(bucket)

    def matching(self, topic: str, matches: Callable[[str, str], bool]) -> list[str]:
        """The filters that match ``topic`` (``matches``: amqtt's rule, a pure function of both), kept
        per topic until a filter is added or discarded: a conversation's next line, and a DM's copy
        for its sender's devices, looked the same filters up and matched them again each time (issue
        21: a chat line's fixed cost). At most ``MATCHES_KEPT`` topics of up to ``KEPT_TOPIC``
        characters, forgotten all at once when full; the list returned is not to be changed."""
        found = self._matching.get(topic)
        if found is None:
            found = [topic_filter for topic_filter in self.candidates(topic) if matches(topic, topic_filter)]
            if len(topic) <= KEPT_TOPIC:
                if len(self._matching) >= MATCHES_KEPT:
                    self._matching.clear()
                self._matching[topic] = found
        return found

    def __len__(self) -> int:
        return len(self._head)


class RetainedIndex:
    """Retained topics by their first two and first three levels."""

    def __init__(self) -> None:
        self._by_head: dict[tuple[str, ...], set[str]] = defaultdict(set)

    @staticmethod
    def _heads(topic: str) -> Iterator[tuple[str, ...]]:
        levels = topic.split("/", INDEX_DEPTH)
        for depth in (2, INDEX_DEPTH):
            if len(levels) >= depth:
                yield tuple(levels[:depth])

    def add(self, topic: str) -> None:
        for head in self._heads(topic):
            self._by_head[head].add(topic)

    def discard(self, topic: str) -> None:
        for head in self._heads(topic):
            bucket = self._by_head.get(head)
            if bucket is not None:
                bucket.discard(topic)
                if not bucket:
                    del self._by_head[head]

    def under(self, topic_filter: str, every_topic: Iterable[str]) -> list[str]:
        """Topics that may match ``topic_filter``: a bucket when its head is long enough, else all."""
        head = literal_head(topic_filter)
        if len(head) >= 2:
            return list(self._by_head.get(head, ()))
        return list(every_topic)


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


class EncodedPublish:
    """One message's PUBLISH packet, encoded once: its heads (what comes before the payload) and its
    payload, which every copy shares; QoS 1 copies differ only in the packet id. ``retain``: the
    RETAIN flag, set on a retained message sent for a new subscription. ``qos0_size``: a QoS 0 copy's
    length. The payload is never copied into a whole packet here: a file's 256 KiB chunk was, for a
    QoS 0 copy that no one received (issue 16); a connection's copies are joined once, in its write."""

    __slots__ = ("data", "qos0_head", "qos0_size", "qos1_head", "retain", "topic")

    def __init__(self, topic: str, data: bytes, retain: bool = False) -> None:
        self.topic, self.data, self.retain = topic, data, retain
        name = topic.encode()
        variable = len(name).to_bytes(2, "big") + name
        flag = 1 if retain else 0
        self.qos0_head = bytes((0x30 | flag,)) + _remaining_length(len(variable) + len(data)) + variable
        self.qos0_size = len(self.qos0_head) + len(data)
        self.qos1_head = bytes((0x32 | flag,)) + _remaining_length(len(variable) + 2 + len(data)) + variable


class InFlight:
    """One connection's QoS 1 copies written by ``Deliveries`` and not yet acknowledged, by packet
    id (``AckAfterJournal.in_flight``): amqtt gave each a future, its callback and a loop round
    when its PUBACK resolved it. The reader of a stream connection settles them (only stream
    connections get ``Deliveries``' copies), and the handler forgets them when it stops."""

    __slots__ = ("_copies",)

    def __init__(self) -> None:
        self._copies: dict[int, tuple[Session, OutgoingApplicationMessage, int, Outlet | None]] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, packet_id: int) -> bool:
        return packet_id in self._copies

    def add(
        self, session: Session, packet_id: int, outgoing: OutgoingApplicationMessage, size: int, outlet: Outlet | None
    ) -> None:
        session.inflight_out[packet_id] = outgoing
        self._copies[packet_id] = (session, outgoing, size, outlet)

    def acknowledge(self, packet_id: int) -> bool:
        """The client's PUBACK for ``packet_id``; whether it was one of these copies."""
        copy = self._copies.pop(packet_id, None)
        if copy is None:
            return False
        self._settle(*copy)
        return True

    def forget_all(self) -> None:
        """The connection ended: a clean session's copies leave its in-flight table (it ends with
        them); a persistent session keeps them there, sent again when it resumes (MQTT-4.4.0-1,
        ``AckAfterJournal._retry_deliveries``). amqtt's flow forgot them too: a message written
        just before a phone lost its network was acknowledged by nobody and never came again."""
        copies, self._copies = self._copies, {}
        for session, outgoing, size, outlet in copies.values():
            if session.clean_session:
                self._settle(session, outgoing, size, outlet)
            elif outlet is not None:
                outlet.release(size)

    def resend(self, session: Session, outgoing: OutgoingApplicationMessage, writer: Any) -> None:
        """Write ``outgoing``, a QoS 1 copy an earlier connection of ``session`` left unacknowledged,
        again with its packet id and DUP set (MQTT-4.4.0-1), its PUBACK settled as the others'."""
        data = bytes(outgoing.data or b"")
        encoded = EncodedPublish(outgoing.topic, data, bool(outgoing.retain))
        head = bytes((encoded.qos1_head[0] | 0x08,)) + encoded.qos1_head[1:]  # DUP
        packet = b"".join((head, outgoing.packet_id.to_bytes(2, "big"), data))
        self.add(session, outgoing.packet_id, outgoing, len(packet), None)
        writer.write(packet)

    @staticmethod
    def _settle(session: Session, outgoing: OutgoingApplicationMessage, size: int, outlet: Outlet | None) -> None:
        if session.inflight_out.get(outgoing.packet_id) is outgoing:
            del session.inflight_out[outgoing.packet_id]
        if outlet is not None:
            outlet.release(size)


class Deliveries:
    """The copies of a batch of messages, by connection; ``flush`` writes each connection's once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        output: OutputBound | None = None,
        chat_first: chatfirst.ChatFirst | None = None,
        file_topic: Callable[[str], bool] | None = None,
    ) -> None:
        self._loop = loop
        self._file_topic = file_topic
        self._output = output
        self._chunks: dict[Any, list[bytes]] = {}
        self._sizes: dict[Any, int] = {}  # bytes in each connection's chunks
        self._flush_scheduled = False
        # a file's chunk is not written while chat waits to be read (imcli/broker/chatfirst.py): the
        # connections whose copies wait (their later copies join them, in order) until ``_release``
        self._chat_first = chat_first
        self._held: set[Any] = set()
        self._deferred: set[Any] = set()  # copies with a chunk, written in a callback of their own (_write_deferred)
        self.copies = 0  # copies added, ever (FanOut.publish counts a message's)
        self.recent: list[Any] = []  # the connections given copies since FanOut.publish cleared it

    def batched(self, handler: Any) -> int:
        """Bytes of this batch for ``handler``'s connection, not yet written."""
        return self._sizes.get(handler, 0)

    def flush_soon(self) -> None:
        """Write at the end of this event-loop round: copies queued meanwhile share the write."""
        if not self._flush_scheduled and self._chunks:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def add(self, handler: Any, session: Session, message: EncodedPublish, qos: int) -> None:
        chunks = self._chunks.get(handler)
        if chunks is None:
            chunks = self._chunks[handler] = []
        self.copies += 1
        self.recent.append(handler)
        look, file_topic = self._chat_first, self._file_topic
        if len(message.data) >= CHUNK and look is not None and file_topic is not None and file_topic(message.topic):
            look.mark_bulk(getattr(getattr(handler, "reader", None), "transport", None))  # a transfer's: no chat
        if qos == 0:
            chunks += (message.qos0_head, message.data)
            self._sizes[handler] = self._sizes.get(handler, 0) + message.qos0_size
            return
        try:
            packet_id = session.next_packet_id
        except AMQTTError:
            log.warning("message on %s not delivered to %s: 65535 messages in flight", message.topic, session.client_id)
            return
        self._await_puback(handler, session, packet_id, message)
        chunks += (message.qos1_head, packet_id.to_bytes(2, "big"), message.data)
        self._sizes[handler] = self._sizes.get(handler, 0) + len(message.qos1_head) + 2 + len(message.data)

    def _await_puback(self, handler: Any, session: Session, packet_id: int, message: EncodedPublish) -> None:
        # what amqtt's _handle_qos1_message_flow records (its redelivery on reconnect and its
        # packet ids look there), and the copy in the connection's own table, which its reader
        # (imcli/broker/reader.py) settles when the PUBACK comes: no future and no callback per copy
        outgoing = OutgoingApplicationMessage(packet_id, message.topic, 1, message.data, message.retain)
        size = len(message.qos1_head) + 2 + len(message.data)
        outlet = self._output.hold(handler.writer, size) if self._output is not None else None  # until its PUBACK
        handler.in_flight.add(session, packet_id, outgoing, size, outlet)

    def flush(self, only: Iterable[Any] | None = None, *, hold: bool = True) -> None:
        """Write the batch, one write per connection; ``only``: just these connections' copies (each
        connection's whole buffer, so its copies keep their order), the rest at the end of the round."""
        if only is None:
            self._flush_scheduled = False
            self.recent.clear()
            handlers = list(self._chunks)
        else:
            handlers = [handler for handler in dict.fromkeys(only) if handler in self._chunks]
        if hold and self._chat_first is not None:
            handlers = self._hold_bulk(handlers, self._chat_first)
        batch = {handler: self._chunks.pop(handler) for handler in handlers}
        for handler in batch:
            self._sizes.pop(handler, None)
        if only is not None and len(self._chunks) > len(self._held) + len(self._deferred):
            self.flush_soon()  # whatever is left (already scheduled, as a room's copies always are)
        for handler, chunks in batch.items():
            writer = handler.writer
            if writer is None:
                continue
            data = b"".join(chunks)
            try:
                writer.write(data)
                if self._output is not None:
                    self._output.handed(writer, len(data))
            except (ConnectionError, RuntimeError) as exc:  # closing: its reader loop ends the session
                log.debug("delivery to a closing connection dropped: %s", exc)

    def _hold_bulk(self, handlers: list[Any], chat_first: chatfirst.ChatFirst) -> list[Any]:
        """``handlers`` less those whose copies wait: already waiting, or holding a file's chunk
        (``CHUNK`` bytes or more: a file's, or a big reply such as ``who``'s for many users; only a
        copy on a file's topic makes its connection a transfer's, whose own readable socket is no
        chat: ``mark_bulk`` in ``add``). Such copies are never written in the callback that made
        them (the chunk's handling, issue 16, seventh session): a chat message arriving during that
        handling would wait for the write too (a 256 KiB ``send`` that on loopback does the
        receiver's TCP work as well, about a third of the handling). If chat waits to be read now
        (``ChatFirst.chat_waiting``) they are held (``_release``: one loop round after a timer, after
        the sockets the loop's next look finds readable and the reader steps they wake, as the reader
        holds a chunk's handling: imcli/broker/reader.py ``_handle_publish``); else they are written
        in a callback of their own, next (``_write_deferred``), which looks again. A connection's
        later copies join its waiting ones, in order."""
        held, deferred = self._held, self._deferred
        if held or deferred:
            handlers = [handler for handler in handlers if handler not in held and handler not in deferred]
        sizes = self._sizes
        bulk = [handler for handler in handlers if sizes.get(handler, 0) >= CHUNK]
        if not bulk:
            return handlers
        if chat_first.chat_waiting():
            self._hold(bulk)
        else:
            if not deferred:
                self._loop.call_soon(self._write_deferred)
            deferred.update(bulk)
        return [handler for handler in handlers if handler not in bulk]

    def _hold(self, handlers: Iterable[Any]) -> None:
        if not self._held:
            self._loop.call_later(AFTER_OTHERS, self._loop.call_soon, self._release)
        self._held.update(handlers)

    def _write_deferred(self) -> None:
        """The copies ``_hold_bulk`` put off written, in a callback of their own: held instead if chat
        waits to be read now (it came during the chunk's handling)."""
        deferred, self._deferred = self._deferred, set()
        waiting = [handler for handler in deferred if handler in self._chunks and handler not in self._held]
        if not waiting:
            return
        if self._chat_first is not None and self._chat_first.chat_waiting():
            self._hold(waiting)
        else:
            self.flush(waiting, hold=False)

    def _release(self) -> None:
        """The held copies written, whether or not chat waits again: a chunk is held once at most
        (under a room's flood chat always waits; the transfer still goes on)."""
        held, self._held = self._held, set()
        self.flush([handler for handler in held if handler in self._chunks], hold=False)


class SessionFilters:
    """Each client id's own subscriptions (filter -> granted QoS)."""

    def __init__(self) -> None:
        self._by_client: dict[str, dict[str, int]] = {}

    def of(self, client_id: str | None) -> dict[str, int]:
        return self._by_client.get(client_id or "", {})

    def held(self, client_id: str | None) -> dict[str, int]:
        """The client's filters, as a table to add to."""
        return self._by_client.setdefault(client_id or "", {})

    def removed(self, client_id: str | None, topic_filter: str) -> None:
        held = self._by_client.get(client_id or "")
        if held is not None:
            held.pop(topic_filter, None)
            if not held:
                del self._by_client[client_id or ""]


class FanOut:
    """amqtt's ``_run_broadcast`` with the same rules, minus its per-copy costs."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        matches: Callable[[str, str], bool],
        get_handler: Callable[[Session], Any],
        queue_offline: Callable[[dict[str, Any], int, Session], Awaitable[None]],
        receive_check: Callable[[str], Callable[[str | None], bool]],
        output: OutputBound | None = None,
        *,
        file_topic: Callable[[str], bool] | None = None,
    ) -> None:
        self.filters = FilterIndex()
        self.output = output
        self._file_topic = file_topic  # whether a topic carries a file's chunks (Deliveries: a transfer's)
        self._subscriptions = subscriptions
        self._matches = matches
        self._get_handler = get_handler
        self._queue_offline = queue_offline
        self._receive_check = receive_check
        self._deliveries: Deliveries | None = None  # created in the running loop
        self._tasks: set[asyncio.Future[Any]] = set()  # copies in amqtt's own publish tasks

    async def publish(self, broadcast: dict[str, Any]) -> None:
        """Fan one message out now, in the publisher's task: its copies join the connections'
        buffers, written together at the end of this event-loop round (``Deliveries.flush_soon``),
        or at once if it has ``WRITE_AT_ONCE`` copies or fewer (a DM: its recipient's devices and
        the archive's), with whatever the batch holds already for those connections (nothing
        overtakes it on a connection). The other connections' copies (a room's message fanned out
        just before, 50 writes) wait for the end of the round as before: the DM does not wait
        for them (issue 21: a DM that came just after a room's message waited for all its writes).

        amqtt queued each message for its broadcast loop, which took it in a task of its own,
        one event-loop round (at least) after the publisher's; nothing else here waits on that
        loop any more (its wakeups, under load, once stalled a QoS 1 fan-out for good:
        docs/PERFORMANCE.md). Nothing in ``send`` suspends: the offline queue is unbounded."""
        deliveries = self._batch()
        before = deliveries.copies
        deliveries.recent.clear()
        await self.send(broadcast, deliveries, self._tasks)
        if 0 < deliveries.copies - before <= WRITE_AT_ONCE:
            deliveries.flush(
                deliveries.recent
            )  # not one round later: the copies of a room's messages still share writes
        else:
            deliveries.flush_soon()

    def _batch(self) -> Deliveries:
        if self._deliveries is None:
            loop = asyncio.get_running_loop()
            self._deliveries = Deliveries(loop, self.output, chatfirst.for_loop(loop), self._file_topic)
        return self._deliveries

    def publish_later(self, handler: Any, messages: list[tuple[str, bytes, int]], *, retain: bool) -> None:
        """Send one connection ``messages`` (a subscription's retained state, or what a resumed
        session's queue kept), in order, without waiting for them.

        Over TCP, QoS 0 and 1 go into the connection's batched write as fan-out copies do (a QoS 1
        copy waits for its PUBACK in the connection's in-flight table, ``InFlight``, for as long as
        the connection lasts). amqtt's own ``mqtt_publish`` (kept for QoS 2 and WebSocket) gives
        each its own task and gives up after 5 s without the PUBACK, raising ``TimeoutError``: a
        watcher subscribing to the presence of 10,000 users got 10,000 tasks at once, and every
        copy its client had not acknowledged within 5 s (a client reading 10,000 messages on a
        loaded machine) was logged as a failed delivery, although it had been delivered
        (docs/PERFORMANCE.md, issue 21)."""
        session = handler.session
        direct = session is not None and isinstance(handler.writer, StreamWriterAdapter)
        deliveries = self._batch()
        for topic, data, qos in messages:
            if direct and qos in (0, 1):
                deliveries.add(handler, session, EncodedPublish(topic, bytes(data or b""), retain), qos)
                continue
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain))
            self._tasks.add(task)
            task.add_done_callback(_finished)
            task.add_done_callback(self._tasks.discard)
        deliveries.flush_soon()

    def keep(self, task: asyncio.Future[Any]) -> None:
        """A task of the broker's that sends copies (cancelled at shutdown with the others)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_tasks(self) -> None:
        """At shutdown: the copies still in amqtt's own publish tasks (QoS 2, WebSocket)."""
        for task in list(self._tasks):
            task.cancel()

    async def send(
        self, broadcast: dict[str, Any], deliveries: Deliveries, running_tasks: set[asyncio.Future[Any]]
    ) -> None:
        """One message to every subscriber that may receive it."""
        topic = broadcast["topic"]
        forced_qos = broadcast.get("qos")
        # the packet and the RECEIVE check are made for the first copy: a DM's copy for its sender's
        # other devices (``ImBroker.sent_copy``) usually has none (issue 21)
        encoded: EncodedPublish | None = None
        may_receive: Callable[[str | None], bool] | None = None
        subscriptions = self._subscriptions
        for topic_filter in self.filters.matching(topic, self._matches):
            targets = subscriptions.get(topic_filter)
            if targets is None:
                self.filters.discard(topic_filter)
                continue
            if not targets:
                continue
            if may_receive is None:
                may_receive = self._receive_check(topic)
            for session, sub_qos in targets:  # a copy (sessions.Subscribers): the loop awaits
                qos = sub_qos if forced_qos is None else forced_qos
                if not may_receive(session.username):
                    continue
                if session.transitions.state != "connected":
                    # as amqtt: kept for an offline persistent session, at QoS 1 or 2
                    if not session.clean_session and qos in (1, 2) and not session.is_anonymous:
                        await self._queue_offline(broadcast, qos, session)
                    continue
                if encoded is None:
                    encoded = EncodedPublish(topic, bytes(broadcast["data"] or b""))
                if self._to_connection(encoded, session, qos, deliveries, running_tasks):
                    await self._queue_offline(broadcast, qos, session)  # its connection is being closed

    def _to_connection(
        self,
        encoded: EncodedPublish,
        session: Session,
        qos: int,
        deliveries: Deliveries,
        running_tasks: set[asyncio.Future[Any]],
    ) -> bool:
        """One copy for a connected client, within its connection's output bound; whether the
        copy goes to the session's offline queue instead (QoS 1 or 2, persistent, being closed)."""
        handler = self._get_handler(session)
        if handler is None:
            return False
        if self.output is not None:
            size = encoded.qos0_size + (2 if qos else 0)
            verdict = self.output.admit(
                handler.writer, session.client_id or "?", qos, size, deliveries.batched(handler)
            )
            if verdict is not Verdict.WRITE:
                return verdict is Verdict.CLOSED and qos in (1, 2) and not session.clean_session
        if qos in (0, 1) and isinstance(handler.writer, StreamWriterAdapter):
            deliveries.add(handler, session, encoded, qos)
        else:  # QoS 2, or a transport that needs its drain: amqtt's own path
            task = asyncio.ensure_future(handler.mqtt_publish(encoded.topic, encoded.data, qos, retain=False))
            running_tasks.add(task)
            task.add_done_callback(_finished)
            task.add_done_callback(running_tasks.discard)
            if self.output is not None:
                self.output.in_task(handler.writer, encoded.qos0_size, task)
        return False


def _finished(task: asyncio.Future[Any]) -> None:
    """A copy of amqtt's own path is done: what it raised is logged, as amqtt's broadcast loop did."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("a delivery failed: %r", exc)
