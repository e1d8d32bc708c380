"""The reader of a TCP (or TLS) connection once its CONNECT is accepted: every complete packet
of each data arrival handled in the connection's own task, none in a task of its own (issue 21).

amqtt 0.12.1's ``ProtocolHandler._reader_loop`` reads each packet's fixed header through
``asyncio.wait_for(..., keep_alive)`` (in Python 3.11 a Task, its Context and a timer per
packet), through ``PacketGuard`` and ``ReadGate`` a few bytes per ``await``, and then handles
each packet in a task of its own. At QoS 1 every copy the broker fans out comes back as a
PUBACK: in a profile of a bot streaming into a room of 50 (docs/PERFORMANCE.md) that path was
about a quarter of the broker's time, and since every read took at least one event-loop round,
the messages of one publisher were fanned out one per round (one ``send`` per copy).

``PacketReader.run`` replaces that loop for stream connections:

* the bytes the transport reads go straight into the reader's own buffer (``_arrived``, in the
  transport's callback), and the reader's task is woken only once the buffer holds a whole packet
  (or one it must refuse); it then handles every complete packet in it, in order; what is left of
  a packet waits for the next bytes. The connection's ``StreamReader`` carries only its end (EOF,
  or the error that ended it), and what it held when the reader began (after the CONNECT). A
  file's 256 KiB chunk came in four to five reads of 64 KiB, each a step of this task and two
  more copies (into the ``StreamReader``'s buffer, out of it), and past 128 KiB the
  ``StreamReader`` paused and resumed its transport (two ``epoll_ctl``) for every chunk (issue 16);
  the transport is paused only while the buffer holds a whole packet and ``INPUT_HIGH`` bytes;
* each packet is checked exactly as ``PacketGuard`` checks it (``check_packet``: the grammar,
  the size limit as soon as the fixed header is known, a started packet complete within the
  guard's ``timeout``) before amqtt decodes it from its own bytes; a malformed one ends the
  connection;
* a QoS 0 or 1 PUBLISH read while nothing the client sent before waits is handled here, in this
  callback (its checks, its fan-out, its copies written, its row handed to the journal:
  ``AckAfterJournal.may_deliver_now``), up to ``client_loop.FAIR_SHARE`` of one read; the rest
  wait for the connection's message loop, in order, as before; a QoS 1 chat line (neither DUP nor
  RETAIN, on a room's, DM's or group's topic) takes its own path there (``_directly``:
  ``ImBroker.deliver_line``, the same token, checks, fan-out and journal without amqtt's packet and
  message objects; issue 16, ninth session);
* the PUBACKs of a read are written once the journal's thread has committed the rows recorded
  until then (imcli/broker/journal.py), and a packet with an answer of its own (PINGREQ,
  SUBSCRIBE, ...) is handled only once they are: no answer overtakes them;
* a file's chunk (a PUBLISH of ``BULK`` bytes or more) is handled only after what the loop
  already knows of (its ready callbacks, the sockets its next look finds readable): a chat
  message read with it, or arriving while it waited, goes first (issue 16); a QoS 1 chunk on an
  upload or download topic then takes its own path (``_directly``: the same checks and fan-out
  without amqtt's packet and message objects; its copy's write in a callback of its own);
* PUBACK resolves the waiting copy's future where it is read; a PINGREQ's PINGRESP is written
  with the read's PUBACKs, in order (``_small``: about 27 us of the loop's CPU against amqtt's
  50, at 10,000 users one every 3 ms), and a PINGREQ alone in its read, with everything before
  it handled and answered, in the transport's callback, the reader's task not woken (``_arrived``:
  about 16 us of the loop's CPU per PINGREQ of a burst, against 42 through the task; issue 21,
  seventh session); every other packet goes to
  amqtt's own handler method, awaited in this task (they resolve a future, queue a message or
  a subscription for the connection's message loop, or write an answer), except a QoS 2
  PUBLISH, whose flow waits for the client's PUBREL and so runs in a task of its own as in
  amqtt;
* a DISCONNECT is the last packet it handles: the rest of that read, and of the stream, is
  dropped (MQTT-3.14.4-1; a PUBLISH written after it was delivered);
* once the connection's last packet is read (a DISCONNECT, the end of the stream, an error), the
  rest of its end (the handler's stop, the close, the message loop's disconnect and the Last
  Will) waits for a turn from the broker's ``teardown.TeardownGate``, a slice of connections per
  loop round: a mass leave no longer queues all its ends ahead of a packet read meanwhile; a
  DISCONNECT alone in its read, with no turn free, waits in the transport's callback, the task
  not woken and the socket not read again until its turn (``_park``);
* nothing more is read while ``readable`` says the connection's output is past its
  high-water mark or its inbox is full (``output.ReadGate``'s rule, looked at before every
  read and after every PUBLISH);
* the keep-alive (the session's ``keep_alive``, already the read timeout of
  ``sessions.read_timeout``) is one timer per connection, moved only when it fires: nothing
  heard for that long calls the handler's ``handle_read_timeout`` as amqtt's loop did.

The broker's fan-out does not wait on any of this (``FanOut.publish`` fans a message out where
it is published: imcli/broker/fanout.py), so the reader owns no scheduling that another task
depends on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader

from imcli.broker import chatfirst
from imcli.broker.client_loop import FAIR_SHARE
from imcli.broker.packets import (
    DISCONNECT,
    PINGREQ,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MalformedPacket,
    PacketGuard,
    check_packet,
    check_publish_head,
    publish_head_size,
)
from imcli.core.framing import MalformedLength, decode_length

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16  # bytes asked of the stream at once (only where the reader cannot hook its protocol)
INPUT_HIGH = 1 << 18  # bytes held, a whole packet among them, past which the transport stops reading
# a PUBLISH this long is a file's chunk (issue 16: chat and every other payload keep to 16 KiB by
# default, a chunk is up to 256 KiB): before handling one, the reader lets the loop run what it
# already knows of first (``_handle_publish``): a chat message must not wait behind a chunk in hand
BULK = 1 << 16
AFTER_OTHERS = 1e-6  # seconds: any delay above 0 makes asyncio's sleep a timer, not a bare yield
POLL, FIRST_POLL = 0.05, 0.001  # output.ReadGate's looks while reading is paused

# packets with nothing after their fixed header, built as amqtt's from_stream builds them, without
# its reader over the (empty) body: one of each per user leaving, per keep-alive (issue 21)
BODYLESS: dict[int, type[DisconnectPacket] | type[PingReqPacket]] = {
    DISCONNECT: DisconnectPacket,
    PINGREQ: PingReqPacket,
}

GOODBYE = b"\xe0\x00"  # a DISCONNECT (MQTT 3.1.1: no body)
PINGREQ_BYTES = b"\xc0\x00"
PINGRESP = b"\xd0\x00"

# packet type -> the name of amqtt's handler method for it (PUBACK is handled here)
HANDLERS = {
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}


def only_pubacks(data: bytes) -> bool:
    """Whether ``data`` is one or more whole PUBACKs (MQTT 3.1.1: ``40 02`` and a packet id), none
    with packet id 0 (which ends the connection: the reader's task says so)."""
    size = len(data)
    if not size or size % 4:
        return False
    for at in range(0, size, 4):
        if data[at] != 0x40 or data[at + 1] != 2 or not (data[at + 2] or data[at + 3]):
            return False
    return True


def take_buffered(stream: asyncio.StreamReader, transport: Any) -> bytes:
    """What ``stream`` holds already (what the client sent with its CONNECT, read by amqtt through
    the stream), taken out of it, and its transport reading again if the stream had paused it. The
    one place that reaches into ``asyncio.StreamReader``'s private buffer: it has no public way to
    take what it holds without waiting when it holds nothing (``PacketReader._hook``)."""
    buffered: bytearray | None = getattr(stream, "_buffer", None)
    if not buffered:
        return b""
    data = bytes(buffered)
    buffered.clear()
    set_reading(transport, True)  # a no-op unless the stream paused it
    return data


def set_reading(transport: Any, on: bool) -> bool:
    """``resume_reading`` (``on``) or ``pause_reading`` of a transport that is not closing; whether it
    was asked. Looked up, not ``isinstance(asyncio.ReadTransport)``: uvloop's transports are none of
    asyncio's classes, and were never paused (a parked DISCONNECT's socket went on being read)."""
    method = getattr(transport, "resume_reading" if on else "pause_reading", None)
    if method is None or transport.is_closing():
        return False
    method()
    return True


class StreamGuard(PacketGuard):
    """``PacketGuard`` over a stream connection, which ``PacketReader`` reads directly once the
    CONNECT is in: ``stream`` is its ``asyncio.StreamReader``, ``transport`` its transport,
    ``readable`` whether more may be read now (``OutputBound.read_paused``, negated)."""

    def __init__(
        self,
        inner: Any,
        limit: int | None,
        timeout: float,
        max_client_id: int,
        *,
        stream: asyncio.StreamReader,
        transport: asyncio.WriteTransport,
        readable: Callable[[], bool],
    ) -> None:
        super().__init__(inner, limit, timeout, max_client_id)
        self.stream = stream
        self.transport = transport
        self.readable = readable


class PacketReader:
    """Reads the packets of one connection for its handler (a ``BrokerProtocolHandler``)."""

    # a PINGREQ alone in its read, everything before it handled and answered, is answered in the
    # transport's callback (``_arrived``); false: through the reader's task, as before (benchmarks)
    PING_AT_ONCE = True

    def __init__(self, handler: Any, guard: StreamGuard) -> None:
        self._handler = handler
        self._guard = guard
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._heard = self._loop.time()  # when the last bytes came
        self._started: float | None = None  # when the first byte of the unfinished packet came
        self._timer: asyncio.TimerHandle | None = None
        self._expired: str | None = None  # why the timer ended the connection
        self._tasks: set[asyncio.Task[None]] = set()  # QoS 2 PUBLISH flows
        self._held = False  # the buffer's head is complete packets, held while reading is paused
        self._said_goodbye = False  # a DISCONNECT was read: nothing after it is the client's (MQTT-3.14.4-1)
        self._asked = handler.answered  # SUBSCRIBEs and UNSUBSCRIBEs read (AckAfterJournal.answered)
        self._waiting = False  # suspended in the stream's read, everything before handled: see _arrived
        self._gate = getattr(handler, "teardown_gate", None)  # teardown.TeardownGate: see _end
        self._turned = False  # the connection's end has had its turn (a DISCONNECT parked in _arrived)
        self._ended = False  # run's read loop is over
        self._recorded = 0  # the journal's rows recorded up to this connection's last PUBLISH (Journal.recorded)
        self._direct = False  # the transport's bytes come straight into _buffer (_hook): see _arrived
        self._wake: asyncio.Future[None] | None = None  # what _more waits on, in direct mode
        self._input_paused = False  # the transport paused by _arrived (INPUT_HIGH), resumed by run
        self._fd = chatfirst.fileno(guard.transport)  # its socket (chatfirst.ChatFirst: a transfer's?)
        keep_alive = handler.session.keep_alive if handler.session is not None else 0
        self._keep_alive: float | None = keep_alive if keep_alive and keep_alive > 0 else None

    async def run(self) -> None:
        """Read until the connection ends; then end the handler as amqtt's loop does."""
        handler, readable = self._handler, self._guard.readable
        handler._reader_ready.set()  # amqtt private (AMQTT_PRIVATE): start() waits for it
        self._arm()
        unhook = self._hook()
        cancelled = False
        try:
            while not self._said_goodbye:
                if not readable():
                    await self._until_readable()
                if self._held:  # complete packets left in the buffer while reading was paused
                    await self._handle_buffer()
                    continue
                if not await self._read():
                    break
        except asyncio.CancelledError:
            log.debug("reader of %s cancelled", self._client_id)
            cancelled = True
        except ConnectionError as exc:  # reset by the peer: an end like any other
            log.debug("%s: connection lost: %r", self._client_id, exc)
            exc.__traceback__ = None  # see below
        except Exception as exc:  # amqtt's loop ends the connection on anything it does not know
            log.warning("%s: reader ended: %r", self._client_id, exc)
            # The exception is also the stream's (``StreamReader._exception``, and its read's
            # future's): its traceback holds the frames that hold the stream, its transport and the
            # connection's handler, a cycle that only a full collection frees, and, frozen with
            # the connection (imcli/broker/gcpause.py), only a compaction: 829 of 10,000
            # connections left 46 objects each that way (docs/PERFORMANCE.md, issue 21).
            exc.__traceback__ = None
        finally:
            self._ended = True
            chatfirst.for_loop(self._loop).forget(self._fd)
            unhook()
            if self._timer is not None:
                self._timer.cancel()
            for task in list(self._tasks):
                task.cancel()
        await self._end(cancelled)

    async def _read(self) -> bool:
        """Handle what the buffer holds, or wait for more; false once the stream has ended."""
        stream = self._guard.stream
        if self._direct:
            if self._ready():
                await self._handle_buffer()
                return True
            exc = stream.exception()
            if exc is not None:
                raise exc
            if not stream.at_eof():
                await self._more()
                return True
        else:
            self._waiting = True
            try:
                data = await stream.read(READ_SIZE)
            finally:
                self._waiting = False
            if data:
                self._heard = self._loop.time()
                self._buffer += data
                await self._handle_buffer()
                return True
        if self._expired is not None:  # the deadline aborted the transport
            log.warning("%s: reader ended: %s", self._client_id, self._expired)
        return False

    async def _end(self, cancelled: bool) -> None:
        """End the handler once this connection's turn comes (imcli/broker/teardown.py: a slice of
        connections a loop round, so that a packet of another client read meanwhile is not handled
        after all of them); a cancelled reader (a take-over, the broker's shutdown) does not wait."""
        handler, gate = self._handler, self._gate
        if gate is not None and not cancelled and not self._turned:
            if self._said_goodbye:
                self._pause()  # its end of stream, which nothing waits for, is not read
            try:
                await gate.turn()
            except asyncio.CancelledError:  # a take-over (AckAfterJournal.stop) waits for what follows
                log.debug("%s: ended while waiting for its turn", self._client_id)
        await handler.handle_connection_closed()  # the DISCONNECT read, if any, takes effect now
        handler._reader_stopped.set()  # amqtt private (AMQTT_PRIVATE): stop() waits for it
        await handler.stop()

    def _hook(self) -> Callable[[], None]:
        """``_arrived`` in front of the stream's protocol, and what the stream holds already (bytes that
        came with the CONNECT) into the reader's buffer; returns what takes the hooks away (they and
        the protocol hold each other).

        asyncio's transports (selector and TLS) look their protocol's ``data_received``,
        ``eof_received`` and ``connection_lost`` up at every call, so the instance's attributes are
        enough. uvloop's TCP transport keeps the bound ``data_received`` it found when its protocol
        was set (``UVBaseTransport._set_protocol``; the other two it looks up): without a new
        ``set_protocol``, ``_arrived`` was never called under uvloop (the PUBACKs and the parked
        DISCONNECTs went the slow way). ``set_protocol`` with the same protocol makes it look again;
        the transport is asked only when it is not asyncio's own, whose behaviour stays as it was."""
        transport = self._guard.transport
        protocol = transport.get_protocol()
        if not isinstance(protocol, asyncio.StreamReaderProtocol):
            return lambda: None
        caches = not type(transport).__module__.startswith("asyncio.")
        self._direct = True
        self._buffer += take_buffered(self._guard.stream, transport)
        protocol.data_received = partial(self._arrived, protocol.data_received)  # type: ignore[method-assign]
        protocol.eof_received = partial(self._ended_by, protocol.eof_received)  # type: ignore[method-assign]
        protocol.connection_lost = partial(self._ended_by, protocol.connection_lost)  # type: ignore[method-assign]
        if caches:
            transport.set_protocol(protocol)

        def unhook() -> None:
            del protocol.data_received, protocol.eof_received, protocol.connection_lost  # the class's own again
            # a closing uvloop transport drops its protocol (and the hook) once the connection is lost
            if caches and not transport.is_closing():
                transport.set_protocol(protocol)

        return unhook

    def _ended_by(self, method: Callable[..., Any], *args: Any) -> Any:
        """The protocol's end of stream or loss (its stream now says which), then the reader woken."""
        try:
            return method(*args)
        finally:
            self._wake_up()

    def _ready(self) -> bool:
        """Whether the buffer starts with a whole packet, or with one the reader must refuse (its
        length malformed or over the limit): what is worth waking the reader's task for."""
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        try:
            header = decode_length(buffer, 1)
        except MalformedLength:
            return True
        if header is None:
            return False
        length, start = header
        limit = self._guard.limit
        return start + length <= len(buffer) or (limit is not None and length > limit)

    async def _more(self) -> None:
        """Until ``_arrived`` has a whole packet, or the stream ends; the transport reads meanwhile."""
        if self._input_paused:
            self._input_paused = False
            set_reading(self._guard.transport, True)
        self._unfinished(bool(self._buffer))
        self._wake = self._loop.create_future()
        self._waiting = True
        try:
            await self._wake
        finally:
            self._waiting = False
            self._wake = None

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        self._waiting = False

    def _take(self, feed: Callable[[bytes], None], data: bytes) -> None:
        """``data`` read: into the reader's buffer (the task woken once a whole packet is there, the
        transport paused if the reader is behind), or, where the reader could not hook, the stream's."""
        if not self._direct:
            self._waiting = False  # the task is woken: what follows waits for it, in order
            feed(data)
            return
        self._heard = self._loop.time()
        self._buffer += data
        if not self._ready():
            self._unfinished(True)  # a packet begun: it has the guard's timeout to be complete
            return
        if self._wake is not None:  # the task waits in _more (a parked DISCONNECT's too)
            self._wake_up()
        elif len(self._buffer) >= INPUT_HIGH and not self._input_paused:
            self._input_paused = set_reading(self._guard.transport, False)

    def _arrived(self, feed: Callable[[bytes], None], data: bytes) -> None:
        """The connection's data, where the transport hands it over (its protocol's ``data_received``).

        Bytes that are only whole PUBACKs, arriving while this reader waits in the stream's read
        with everything before them handled, are settled here, in the transport's callback: they
        take effect in the order they were sent all the same, and the reader's task is not woken
        for them. At QoS 1 every copy the broker fans out comes back as a PUBACK, most of them
        alone in their read: each was a callback and a task step, now one callback (a room's
        message to 50 listeners: 50 task steps fewer, which a DM read just after them no longer
        waits behind; issue 21, docs/PERFORMANCE.md).

        A PINGREQ alone in its read, in the same state and with every answer owed before it written
        (``_answers_settled``: no PUBACK waits for the journal), is answered here too: its PINGRESP
        written, the keep-alive told it was heard, the task not woken. 10,000 users' keep-alives
        come in clumps (they joined, or came back after a restart, together), and each wake was a
        task step and a round of the reader's loop, some 25 us of the loop's CPU more per PINGREQ
        (benchmarks/pingburst.py). Anything else goes to the stream, as ever."""
        if self._waiting and not self._buffer:
            if only_pubacks(data):
                self._heard = self._loop.time()
                for at in range(2, len(data), 4):
                    self._puback(data[at] << 8 | data[at + 1])
                return
            if data == PINGREQ_BYTES and self.PING_AT_ONCE and self._answers_settled():
                self._heard = self._loop.time()
                self._write_answers(PINGRESP, True)
                return
        if self._waiting and data == GOODBYE and not self._buffer and self._gate is not None:
            self._park(feed, data)
            return
        self._take(feed, data)

    def _answers_settled(self) -> bool:
        """Whether every answer this connection's reader owes so far is written: the PUBACKs of its
        PUBLISHes wait for the journal's commit of their rows (``_answer``), and an answer written now
        must not overtake them."""
        journal = self._handler.journal
        return journal is None or journal.is_kept(self._recorded)

    def _park(self, feed: Callable[[bytes], None], data: bytes) -> None:
        """A DISCONNECT alone in its read, everything before it handled: when 10,000 users leave at
        once, most of their ends wait for a turn (imcli/broker/teardown.py), and reading each one's
        DISCONNECT in its task, then its end of stream in one more callback, was most of what a
        PINGREQ read meanwhile still waited behind (docs/PERFORMANCE.md, 2026-11-26 fourth session).
        Without a turn free now, the bytes go to the stream only when the turn comes (the reader's
        task, woken then, handles the DISCONNECT as any other, and its end goes on at once), and
        nothing more is read from the socket (nothing after a DISCONNECT is the client's,
        MQTT-3.14.4-1). A take-over meanwhile counts the DISCONNECT (``say_goodbye``: no Will)."""
        self._waiting = False
        gate, handler = self._gate, self._handler
        assert gate is not None
        if gate.turn_now():
            self._turned = True
            self._take(feed, data)
            return
        if hasattr(handler, "say_goodbye"):
            packet = DisconnectPacket(MQTTFixedHeader(DISCONNECT, 0, 0))
            packet.protocol_ts = datetime.now(UTC)
            handler.say_goodbye(packet)
        self._pause()
        gate.queue(partial(self._resume, feed, data))

    def _pause(self) -> None:
        set_reading(self._guard.transport, False)

    def _resume(self, feed: Callable[[bytes], None], data: bytes) -> None:
        """The parked DISCONNECT's turn: to the stream, unless the connection ended meanwhile."""
        self._turned = True
        if not self._ended and not self._guard.transport.is_closing():
            self._take(feed, data)

    @property
    def _client_id(self) -> str:
        session = self._handler.session
        return str(session.client_id) if session is not None else "?"

    async def _until_readable(self) -> None:
        delay = FIRST_POLL
        while not self._guard.readable():  # polled: asyncio has no event for these
            await asyncio.sleep(delay)
            delay = min(2 * delay, POLL)

    async def _handle_buffer(self) -> None:
        """Handle every complete packet at the head of the buffer, in order."""
        buffer, guard = self._buffer, self._guard
        pos, size = 0, len(buffer)
        self._held = False
        # PUBACKs of this read's PUBLISHes and PINGRESPs of its PINGREQs, in order, written once at its end
        answers = self._handler.answers = bytearray()
        self._handler.at_once = FAIR_SHARE  # PUBLISHes it may handle itself (AckAfterJournal.may_deliver_now)
        try:
            while pos < size and not self._said_goodbye:
                first = buffer[pos]
                i = pos + 1
                if i < size and buffer[i] < 0x80:  # a remaining length of one byte (PUBACK): no call
                    length, i = buffer[i], i + 1
                else:
                    header = decode_length(buffer, i)
                    if header is None:
                        return
                    length, i = header
                if guard.limit is not None and length > guard.limit:
                    raise MalformedPacket(f"a packet of {length} bytes: the limit is {guard.limit}")
                end = i + length
                if end > size:
                    return
                pos = end
                if (first == 0x40 and length == 2) or (first == 0xC0 and length == 0):
                    self._small(first, buffer, i, answers)  # a PUBACK or a PINGREQ: no decoding
                    continue
                if first >> 4 == PUBLISH and length >= 2:
                    await self._handle_publish(first, buffer, i, end)
                else:
                    body = bytes(buffer[i:end])
                    check_packet(first, body, connected=True, max_client_id=guard.max_client_id)
                    await self._dispatch(first, body)
                if first >> 4 == PUBLISH and not guard.readable():
                    self._held = pos < size  # the rest waits until it may be read (output.ReadGate's rule)
                    return
        except MalformedLength as exc:
            raise MalformedPacket(str(exc)) from None
        finally:
            self._answer()
            self._handler.answers = None
            del buffer[: size if self._said_goodbye else pos]
            self._unfinished(bool(buffer) and not self._held)

    async def _handle_publish(self, first: int, buffer: bytearray, start: int, end: int) -> None:
        """The PUBLISH in ``buffer[start:end]``; a file's chunk (``BULK`` bytes or more) only after
        every callback the loop has ready and every socket it finds readable at its next look: a
        chunk takes up to a millisecond of the loop (its copies, checks and 256 KiB written), and a
        chat message read in the same round, or arriving meanwhile, waited for it (and for the next
        chunk of the same read) in the round after (issue 16: a room's chat latency during a
        transfer). ``asyncio.sleep(0)`` would not do: its wakeup runs at the head of the next round,
        before the sockets that round finds readable; a timer's runs after them, and the task it wakes
        after the tasks they woke. The PUBACKs gathered so far wait, as for the rest of the read:
        nothing else answers this connection meanwhile (its other packets' answers are written by
        this reader, after ``_answer``).

        The wait's wakeup is queued for the round after the timer's, at its head: a chat message
        whose bytes arrived meanwhile is read in that round only after the chunk, and handled in the
        next. So if chat is readable when the wait ends (``chatfirst.ChatFirst``, which also holds
        the chunk's write while chat waits: ``fanout.Deliveries``), the chunk waits once more."""
        head = self._head(first, buffer, start, end)
        if end - start >= BULK:
            look = chatfirst.for_loop(self._loop)
            carries = getattr(self._handler, "carries_file_bytes", None)
            if self._fd is not None and carries is not None and carries(head[0]):
                look.bulk.add(self._fd)  # a transfer's: its socket's next bytes are not chat
            await asyncio.sleep(AFTER_OTHERS)
            if look.chat_waiting():  # chat came while this waited (this round began with it): once more
                await asyncio.sleep(AFTER_OTHERS)
        journal = self._handler.journal
        before = journal.recorded if journal is not None else 0
        if not await self._directly(first, buffer, end, *head, bulk=end - start >= BULK):
            await self._dispatch(first, b"", self._publish(first, buffer, start, end, head))
        if journal is not None and journal.recorded != before:  # it was kept: answers wait for its row
            self._recorded = journal.recorded  # (a file's chunk, a request, a status wait for nobody's)

    def _answer(self) -> None:
        """Write the PUBACKs gathered so far (before any other answer, which must not overtake them)
        once the journal has committed every row recorded until now (imcli/broker/journal.py: a
        PUBACK never goes out before its message is kept), in the order they were read."""
        answers = self._handler.answers
        if answers:
            data = bytes(answers)
            answers.clear()
            journal = self._handler.journal
            if journal is None:
                self._write_answers(data, True)
            else:
                journal.after_commit(partial(self._write_answers, data), self._recorded)

    async def _answers_first(self) -> None:
        """The PUBACKs gathered so far written (``_answer``) before a packet with an answer of its own
        is handled: that answer, written by another path, would overtake them, or come before a line
        this connection sent is kept."""
        self._answer()
        journal = self._handler.journal
        if journal is not None and not journal.is_kept(self._recorded):
            await journal.committed(self._recorded)

    def _write_answers(self, data: bytes, kept: bool) -> None:
        writer, transport = self._handler.writer, self._guard.transport
        if writer is None or transport.is_closing():  # its end: the client sends them again
            return
        if not kept:  # the journal's batch failed: not acknowledged, and the client sends them again
            log.error("%s: closed: the journal could not keep its messages", self._client_id)
            transport.abort()
            return
        try:
            writer.write(data)
        except (ConnectionError, RuntimeError) as exc:  # closing: the read ends the connection
            log.debug("%s: answers to a closing connection dropped: %s", self._client_id, exc)

    def _small(self, first: int, buffer: bytearray, start: int, answers: bytearray) -> None:
        """A PUBACK (by far the most frequent packet), or a PINGREQ: its PINGRESP goes with this read's
        PUBACKs, in order (``_answer``), not through amqtt's ``handle_pingreq`` (the packet decoded, two
        plugin events, the write lock, the packet encoded: about 50 us of the loop's CPU per PINGREQ
        against 27, measured in-process; at 10,000 users a PINGREQ comes every 3 ms, and after a
        mass reconnect their keep-alives come in step: issue 21, docs/PERFORMANCE.md)."""
        if first == 0x40:
            self._puback(buffer[start] << 8 | buffer[start + 1])
        else:
            answers += PINGRESP

    def _puback(self, packet_id: int) -> None:
        if not packet_id:
            raise MalformedPacket("packet id 0 (MQTT-2.3.1-1)")
        if self._handler.in_flight.acknowledge(packet_id):  # a copy of the fan-out's (fanout.InFlight)
            return
        waiter = self._handler._puback_waiters.get(packet_id)  # amqtt private (AMQTT_PRIVATE)
        if waiter is not None and not waiter.done():
            # amqtt keeps the PUBACK packet only to say the copy is acknowledged (its flow then
            # forgets the copy): building one per copy was 7 % of the broker's time in a fan-out
            waiter.set_result(None)
        else:
            log.debug("%s: PUBACK for no message in flight (%d)", self._client_id, packet_id)

    async def _directly(
        self, first: int, buffer: bytearray, end: int, topic: str, packet_id: int | None, head_end: int, *, bulk: bool
    ) -> bool:
        """A file's chunk (``bulk``: a QoS 1 PUBLISH of ``BULK`` bytes or more, neither DUP nor RETAIN,
        on an upload or file-data topic), handled by the handler's ``file_bytes``
        (``ImBroker.deliver_file``: the same checks, the fan-out, the copy written or held while chat
        waits), or a chat line (shorter, QoS 1, neither DUP nor RETAIN, on a room's, DM's or group's
        topic) by its ``chat_line`` (``ImBroker.deliver_line``: the rate token, the same checks, the
        fan-out, the journal), without amqtt's packet and message objects and the layers of the
        general path, its PUBACK added to this read's answers as ``_deliver_at_once`` adds it. False:
        neither, or the handler may not handle it now (``may_deliver_now``): the general path takes
        it, in order.

        A chunk's handling is what a chat message arriving meanwhile waits behind: through the
        general path it was 200 to 250 us of the loop at the median, and its copy's write about a
        third of it (issue 16, docs/PERFORMANCE.md seventh session); a chat line's is what the chat
        tail multiplies (ninth session)."""
        handler = self._handler
        if first & 0x0F != 0x02 or packet_id is None:
            return False
        if bulk:
            handle = getattr(handler, "file_bytes", None)
            if handle is None or not handler.file_topic(topic):
                return False
        else:
            handle = getattr(handler, "chat_line", None)
            if handle is None or not handler.line_topic(topic):
                return False
        if not handler.may_deliver_now():
            return False
        with memoryview(buffer) as view:  # released before the buffer is resized
            payload = bytes(view[head_end:end])
        await handle(topic, packet_id, payload)
        return True

    @staticmethod
    def _head(first: int, buffer: bytearray, start: int, end: int) -> tuple[str, int | None, int]:
        """The topic and packet id of the PUBLISH in ``buffer[start:end]``, checked as ``check_packet``
        checks them, and where its payload begins."""
        head_end = min(end, start + publish_head_size(first, buffer[start : start + 2]))
        topic, packet_id = check_publish_head(first, bytes(buffer[start:head_end]))
        return topic, packet_id, head_end

    @staticmethod
    def _publish(
        first: int, buffer: bytearray, start: int, end: int, head: tuple[str, int | None, int] | None = None
    ) -> PublishPacket:
        """The PUBLISH in ``buffer[start:end]``, checked as ``check_packet`` checks it (``head``: by
        ``_head`` already), built as amqtt's ``from_stream`` builds it, with its payload copied once
        out of the buffer: amqtt's decoding copied a file's 256 KiB chunk four times over (the body,
        a bytearray, its bytes; issue 16)."""
        topic, packet_id, head_end = head or PacketReader._head(first, buffer, start, end)
        with memoryview(buffer) as view:  # released before the buffer is resized
            payload = bytes(view[head_end:end])
        header = MQTTFixedHeader(PUBLISH, first & 0x0F, end - start)
        packet = PublishPacket(header, PublishVariableHeader(topic, packet_id), PublishPayload(payload))
        packet.protocol_ts = datetime.now(UTC)
        return packet

    async def _dispatch(self, first: int, body: bytes, publish: PublishPacket | None = None) -> None:
        """Handle one packet: ``body``, or ``publish`` already built."""
        kind = first >> 4
        # the client's last packet: what follows it in the same read (a PUBLISH) is dropped, as the
        # rest of the stream is, and the message loop handles only what came before (MQTT-3.14.4-1)
        self._said_goodbye |= kind == DISCONNECT
        name = HANDLERS.get(kind)
        if name is None:  # check_packet lets only CONNECT (refused: a second one) and these through
            raise MalformedPacket(f"packet type {kind} after the CONNECT")
        handler = self._handler
        if kind != PUBLISH or first & 0x06 == 0x04:  # its answer, if any, is written by another path
            await self._answers_first()
        if kind in (SUBSCRIBE, UNSUBSCRIBE):  # after the messages read before it (see below)
            await self._until(handler.session.delivered_message_queue.empty)
        try:
            if publish is not None:
                packet = publish
            elif not body and (bodyless := BODYLESS.get(kind)) is not None:
                header = MQTTFixedHeader(kind, first & 0x0F, 0)
                packet = bodyless(header)
                packet.protocol_ts = datetime.now(UTC)
            else:
                header = MQTTFixedHeader(kind, first & 0x0F, len(body))
                packet = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
            await handler.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=handler.session)
            if kind == PUBLISH and (first >> 1) & 0x03 == 2:  # its flow waits for the PUBREL read after it
                task = asyncio.create_task(handler.handle_publish(packet))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == DISCONNECT and hasattr(handler, "say_goodbye"):
                handler.say_goodbye(packet)  # its effect waits for the connection's turn to end (run)
            else:
                await getattr(handler, name)(packet)
        except (MQTTError, NoDataError) as exc:  # amqtt's loop discards such a packet and reads on
            log.debug("%s: packet discarded: %r", self._client_id, exc)
            return
        # Packets take effect, and answers go out, in the order the client sent them: the
        # connection's message loop takes a SUBSCRIBE or UNSUBSCRIBE only once it has handled the
        # messages read before it (waited for above), and what is read after it only once it is
        # answered (a message then reaches the new subscription; a PINGRESP follows the SUBACK).
        # A QoS 2 flow's task answers its PUBLISH (PUBREC), PUBREL (PUBCOMP) or PUBREC (PUBREL) in
        # its first step.
        if kind in (SUBSCRIBE, UNSUBSCRIBE):
            self._asked += 1
            await self._until(lambda: handler.answered >= self._asked)
        elif kind in (PUBREL, PUBREC) or (kind == PUBLISH and first & 0x06 == 0x04):
            await asyncio.sleep(0)

    async def _until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, which the connection's message loop makes true (it never waits for this
        reader: imcli/broker/client_loop.py), or that loop or the connection has ended."""
        handler, transport = self._handler, self._guard.transport
        delay = 0.0
        while not done() and not handler.loop_ended and not transport.is_closing():
            await asyncio.sleep(delay)  # polled: within a round or two, unless the loop's write waits for a drain
            delay = min(2 * delay, POLL) if delay else FIRST_POLL / 4

    # ---------------------------------------------------------------- deadlines, one timer

    def _unfinished(self, started: bool) -> None:
        if not started:
            self._started = None
        elif self._started is None:
            self._started = self._loop.time()
            if self._timer is None or self._timer.when() > self._started + self._guard.timeout:
                self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = []
        if self._keep_alive is not None:
            deadlines.append(self._heard + self._keep_alive)
        if self._started is not None:
            deadlines.append(self._started + self._guard.timeout)
        if deadlines:
            self._timer = self._loop.call_at(min(deadlines), self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._started is not None and now >= self._started + self._guard.timeout:
            self._expired = f"a packet was not complete within {self._guard.timeout:g}s"
            self._guard.transport.abort()  # the read ends; run() reports why
            return
        if self._keep_alive is not None and now >= self._heard + self._keep_alive:
            self._heard = now  # as amqtt's loop: one more keep-alive period after the timeout
            self._handler.handle_read_timeout()
        self._arm()
