"""A reader that hands amqtt one whole, bounded, well-formed MQTT packet at a time.

amqtt 0.12.1 parses a packet field by field straight from the socket and trusts every
length it reads: a field that claims more bytes than its packet holds makes it read into
the next packet (or wait for bytes that never come); a packet it refuses half-way (a
wildcard in a PUBLISH topic) leaves the rest to be parsed as the next packets; a remaining
length of 256 MiB is buffered in full before the payload limit is looked at; and nothing
bounds how long the rest of a started packet may take.

Worse, it decodes a string that is not UTF-8 into the text ``"b'...'"`` (longer than the
bytes it came from) and computes what follows from that text's length: a PUBLISH's payload
length, a SUBSCRIBE's count of bytes read. A PUBLISH whose topic holds one bad byte has the
tail of its own payload parsed as further packets: a PUBLISH or a PINGREQ smuggled inside
another packet's payload is acted upon. Packets with no fields at all (PINGREQ, DISCONNECT)
or a packet id only (PUBACK …) leave any extra bytes of their remaining length to be parsed
the same way.

``PacketGuard`` therefore reads each packet itself, framed by its fixed header, checks the
whole packet against the MQTT 3.1.1 grammar (``check_packet``) before amqtt sees a byte of
it, and serves amqtt's reads from it. amqtt's decoders consume a well-formed packet exactly,
so what they read and what the remaining length says can no longer disagree. It ends the
connection (by raising ``MalformedPacket``) on:

* a packet that is not well-formed (``check_packet``: every string in strict UTF-8 without
  U+0000, every length inside its packet, no byte left over, the flags and packet ids the
  spec demands, a CONNECT first and only once),
* a read past the end of the packet (amqtt out of step: a last line of defence),
* a packet larger than ``limit``, as announced in its fixed header, before any of it is read,
* a packet not complete within ``timeout`` seconds of its first byte.

A well-formed CONNECT whose client id is longer than ``max_client_id`` characters is not
malformed: it deserves CONNACK 2 (identifier rejected), which the broker sends when it sees
``connect_refusal``.

amqtt waits for the CONNECT itself for ever: ``connect_within`` gives it the same deadline.

amqtt's reader loop ends the connection on an exception it does not know; its own
``MQTTError`` and ``NoDataError`` it swallows, and reads on.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable
from typing import TypeVar

from amqtt.adapters import ReaderAdapter, WebSocketsReader
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from websockets.exceptions import ConnectionClosed

from imcli.core.framing import MalformedLength, decode_length

log = logging.getLogger(__name__)
T = TypeVar("T")

IDENTIFIER_REJECTED = 2  # the CONNACK return code (MQTT 3.1.1, 3.2.2.3)
DEFAULT_MAX_CLIENT_ID = 128  # characters; MQTT 3.1.1 only promises 23 (MQTT-3.1.3-5)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# the fixed-header flags each packet type a client sends must carry (MQTT-2.2.2-1, -2);
# PUBLISH has its own rules, the others (CONNACK, SUBACK, …, 0 and 15) a client never sends
_FLAGS = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0,
          DISCONNECT: 0}  # fmt: skip


class MalformedPacket(Exception):
    """The peer broke the grammar, the framing, the size limit or the time limit: its connection is closed."""


class _Fields:
    """The fields of one packet's body, read in order; every read stays inside the body."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._body) - self._pos:
            raise MalformedPacket(f"{what} runs {n - len(self._body) + self._pos} bytes past the end of its packet")
        data = self._body[self._pos : self._pos + n]
        self._pos += n
        return data

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def packet_id(self) -> int:
        packet_id = self.u16("the packet id")
        if packet_id == 0:
            raise MalformedPacket("packet id 0 (MQTT-2.3.1-1)")
        return packet_id

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def string(self, what: str) -> str:
        """A UTF-8 encoded string (MQTT 1.5.3): well-formed (no surrogates, no overlong forms), no U+0000."""
        raw = self.binary(what)
        try:
            text = raw.decode("utf-8")  # strict: ill-formed sequences and encoded surrogates raise
        except UnicodeDecodeError:
            raise MalformedPacket(f"{what} is not well-formed UTF-8 (MQTT-1.5.3-1)") from None
        if "\x00" in text:
            raise MalformedPacket(f"{what} holds U+0000 (MQTT-1.5.3-2)")
        return text

    @property
    def left(self) -> int:
        return len(self._body) - self._pos

    def end(self, what: str) -> None:
        if self.left:
            raise MalformedPacket(f"{self.left} bytes left over after {what}")


def check_topic_name(topic: str, what: str) -> None:
    if not topic:
        raise MalformedPacket(f"{what} is empty (MQTT-4.7.3-1)")
    if "+" in topic or "#" in topic:
        raise MalformedPacket(f"{what} holds a wildcard (MQTT-3.3.2-2)")


def check_topic_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise MalformedPacket("an empty topic filter (MQTT-4.7.3-1)")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise MalformedPacket(f"a misplaced wildcard in the filter {topic_filter!r} (MQTT-4.7.1-2, -3)")


def check_packet(first: int, body: bytes, *, connected: bool, max_client_id: int) -> int:
    """Raise ``MalformedPacket`` unless ``first`` (the fixed header's first byte) and ``body``
    (the ``remaining length`` bytes after it) are a packet a client may send now, under MQTT
    3.1.1. Return the CONNACK code a well-formed CONNECT deserves on its form alone (0, or
    ``IDENTIFIER_REJECTED``); 0 for every other packet."""
    kind, flags = first >> 4, first & 0x0F
    if kind != CONNECT and not connected:
        raise MalformedPacket(f"packet type {kind} before CONNECT (MQTT-3.1.0-1)")
    if kind == CONNECT and connected:
        raise MalformedPacket("a second CONNECT (MQTT-3.1.0-2)")
    if kind == PUBLISH:
        _check_publish(flags, _Fields(body))
        return 0
    if kind not in _FLAGS:
        raise MalformedPacket(f"packet type {kind}, which a client never sends")
    if flags != _FLAGS[kind]:
        raise MalformedPacket(f"flags {flags:#x} in a packet of type {kind} (MQTT-2.2.2-2)")
    fields = _Fields(body)
    if kind == CONNECT:
        return _check_connect(fields, max_client_id)
    if kind in (SUBSCRIBE, UNSUBSCRIBE):
        fields.packet_id()
        if not fields.left:
            raise MalformedPacket("a (UN)SUBSCRIBE without a topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2)")
        while fields.left:
            check_topic_filter(fields.string("a topic filter"))
            if kind == SUBSCRIBE and fields.byte("a requested QoS") > 2:
                raise MalformedPacket("a requested QoS above 2, or reserved bits set (MQTT-3.8.3-4)")
        return 0
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        fields.packet_id()
    fields.end(f"a packet of type {kind}")
    return 0


def _check_publish(flags: int, fields: _Fields) -> tuple[str, int | None]:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("a PUBLISH with QoS 3 (MQTT-3.3.1-4)")
    if qos == 0 and flags & 0x08:
        raise MalformedPacket("a QoS 0 PUBLISH with DUP set (MQTT-3.3.1-2)")
    topic = fields.string("the topic name")
    check_topic_name(topic, "the topic name")
    return topic, fields.packet_id() if qos else None  # the rest is the payload, of any length and content


def publish_head_size(first: int, body_start: bytes | bytearray) -> int:
    """How many bytes of a PUBLISH's body come before its payload (its topic name and packet id),
    from the body's first two bytes; ``check_publish_head`` checks them."""
    return 2 + (body_start[0] << 8 | body_start[1]) + (2 if first & 0x06 else 0)


def check_publish_head(first: int, head: bytes) -> tuple[str, int | None]:
    """``check_packet`` for a PUBLISH whose ``head`` (the body up to its payload, or the whole body if
    shorter) is given apart from its payload: the same checks, the payload being any bytes. Its topic
    name and packet id (``None`` at QoS 0). The reader takes a large message's payload straight from
    its buffer, in one copy (imcli/broker/reader.py)."""
    return _check_publish(first & 0x0F, _Fields(head))


def _check_connect(fields: _Fields, max_client_id: int) -> int:
    name = fields.string("the protocol name")
    level = fields.byte("the protocol level")
    flags = fields.byte("the connect flags")
    fields.u16("the keep-alive")
    if (name, level) != ("MQTT", 4):
        # not MQTT 3.1.1: amqtt answers CONNACK 1 (unacceptable protocol version) and hangs up,
        # without reading the rest, whose grammar (MQTT 5 properties, MQIsdp) is not ours to check
        return 0
    if flags & 0x01:
        raise MalformedPacket("the reserved connect flag is set (MQTT-3.1.2-3)")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if not will and (will_qos or will_retain):
        raise MalformedPacket("Will QoS or Will Retain without the Will flag (MQTT-3.1.2-13, -15)")
    if will_qos == 3:
        raise MalformedPacket("Will QoS 3 (MQTT-3.1.2-14)")
    username, password = bool(flags & 0x80), bool(flags & 0x40)
    if password and not username:
        raise MalformedPacket("a password without a user name (MQTT-3.1.2-22)")
    client_id = fields.string("the client id")
    if will:
        check_topic_name(fields.string("the Will topic"), "the Will topic")
        fields.binary("the Will message")
    if username:
        fields.string("the user name")
    if password:
        # Binary Data in MQTT 3.1.1; amqtt decodes it as a string, and this broker's passwords are
        # text: one that is not UTF-8 can never be right, and would reach the account check as "b'...'"
        fields.string("the password")
    fields.end("the CONNECT payload")
    return IDENTIFIER_REJECTED if len(client_id) > max_client_id else 0


class PacketGuard(ReaderAdapter):
    """Wraps amqtt's reader of one connection (TCP stream or WebSocket)."""

    def __init__(
        self, inner: ReaderAdapter, limit: int | None, timeout: float, max_client_id: int = DEFAULT_MAX_CLIENT_ID
    ) -> None:
        self.limit = limit  # None: no size limit (the workers' service accounts)
        self.timeout = timeout
        self.max_client_id = max_client_id
        self.connect_refusal = 0  # the CONNACK code the CONNECT deserves on its form alone (see check_packet)
        self._inner = inner
        self._packet = b""
        self._pos = 0
        self._connected = False  # a CONNECT went by

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    async def _exact(self, n: int) -> bytes:
        data: bytes = await self._inner.read(n)
        if len(data) < n:  # the WebSocket reader returns what it has when the connection closes
            raise asyncio.IncompleteReadError(data, n)
        return data

    async def read(self, n: int = -1) -> bytes:
        if n == 0:  # an empty field (a zero-length password or payload)
            return b""
        if n < 0:  # amqtt never reads "everything" from a connection; refuse rather than guess
            raise MalformedPacket("unbounded read")
        if self._pos == len(self._packet):
            await self._next_packet()
        if n > len(self._packet) - self._pos:
            raise MalformedPacket(f"a field runs {n - len(self._packet) + self._pos} bytes past the end of its packet")
        data = self._packet[self._pos : self._pos + n]
        self._pos += n
        return data

    async def _next_packet(self) -> None:
        # waiting for a packet to start is not timed here: amqtt's keep-alive (and, before the
        # CONNECT, the broker's CONNECT deadline) bound that. IncompleteReadError at the end of
        # the stream is what amqtt expects from a closed connection.
        first = await self._exact(1)
        try:
            async with asyncio.timeout(self.timeout):
                header = bytearray(first)
                while (decoded := decode_length(header, 1)) is None:
                    header += await self._exact(1)
                length = decoded[0]
                if self.limit is not None and length > self.limit:
                    raise MalformedPacket(f"a packet of {length} bytes: the limit is {self.limit}")
                body = await self._exact(length) if length else b""
        except TimeoutError:
            raise MalformedPacket(f"a packet was not complete within {self.timeout:g}s") from None
        except MalformedLength as exc:
            raise MalformedPacket(str(exc)) from None
        refusal = check_packet(first[0], body, connected=self._connected, max_client_id=self.max_client_id)
        if first[0] >> 4 == CONNECT:
            self._connected = True
            self.connect_refusal = refusal
        self._packet = bytes(header) + body
        self._pos = 0


async def connect_within(reading: Awaitable[T], seconds: float, address: str, port: int) -> T:
    """The CONNECT ``reading`` reads, within ``seconds``: without a deadline any peer
    holds a connection, a task and its buffers open for as long as it likes. One that is bad
    or late is logged and raised as the ``AMQTTError`` amqtt's caller expects."""
    try:
        return await asyncio.wait_for(reading, seconds)
    except (AMQTTError, MQTTError, NoDataError, TimeoutError, MalformedPacket, UnicodeDecodeError) as exc:
        log.info("bad CONNECT from %s:%s: %s", address, port, exc or "none in time")
        raise AMQTTError(exc) from exc


class CheckedWebSocketsReader(WebSocketsReader):
    """amqtt 0.12.1's WebSocket reader without its two faults (``ImBroker.ws_connected`` builds one
    per WebSocket connection, under ``PacketGuard``).

    Its ``_feed_buffer`` kept the last frame in a variable across the loop and took a
    ``ConnectionClosed`` for "no frame": once the peer closed after an *empty* binary frame,
    ``recv`` raised at once (without yielding to the event loop) and the loop added that empty
    frame for ever, a busy loop that froze the whole broker (every listener, every client) from
    one WebSocket. And it took text frames as MQTT bytes, which MQTT-6.0.0-1 forbids: the
    connection is closed.
    """

    _stream: io.BytesIO  # set by amqtt's __init__

    async def _feed_buffer(self, n: int = 1) -> None:  # amqtt private (AMQTT_PRIVATE)
        buffer = bytearray(self._stream.read())
        while len(buffer) < n:
            try:
                message = await self._protocol.recv()
            except ConnectionClosed:
                break  # the end of the stream: the read returns what there is, and PacketGuard ends it
            if isinstance(message, str):
                raise MalformedPacket("a WebSocket text frame: MQTT travels in binary frames (MQTT-6.0.0-1)")
            buffer.extend(message)
        self._stream = io.BytesIO(buffer)
