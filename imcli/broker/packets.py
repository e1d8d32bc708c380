"""A reader that hands amqtt one whole, bounded MQTT packet at a time.

amqtt 0.12.1 parses a packet field by field straight from the socket and trusts every
length it reads: a field that claims more bytes than its packet holds makes it read into
the next packet (or wait for bytes that never come); a packet it refuses half-way (a
wildcard in a PUBLISH topic) leaves the rest to be parsed as the next packets; a remaining
length of 256 MiB is buffered in full before the payload limit is looked at; and nothing
bounds how long the rest of a started packet may take.

``PacketGuard`` reads each packet itself, framed by its fixed header, and serves amqtt's
reads from it. It ends the connection (by raising ``MalformedPacket``) on:

* a read past the end of the packet (a lying length field, or amqtt out of step),
* a packet larger than ``limit``, as announced in its fixed header, before any of it is read,
* a packet not complete within ``timeout`` seconds of its first byte.

amqtt's reader loop ends the connection on an exception it does not know; its own
``MQTTError`` and ``NoDataError`` it swallows, and reads on.
"""

from __future__ import annotations

import asyncio

from amqtt.adapters import ReaderAdapter


class MalformedPacket(Exception):
    """The peer broke the framing, the size limit or the time limit: its connection is closed."""


class PacketGuard(ReaderAdapter):
    """Wraps amqtt's reader of one connection (TCP stream or WebSocket)."""

    def __init__(self, inner: ReaderAdapter, limit: int | None, timeout: float) -> None:
        self.limit = limit  # None: no size limit (the workers' service accounts)
        self.timeout = timeout
        self._inner = inner
        self._packet = b""
        self._pos = 0

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
                length, multiplier = 0, 1
                while True:
                    byte = (await self._exact(1))[0]
                    header.append(byte)
                    length += (byte & 0x7F) * multiplier
                    if not byte & 0x80:
                        break
                    multiplier *= 128
                    if multiplier > 128**3:
                        raise MalformedPacket("a remaining length of more than 4 bytes")
                if self.limit is not None and length > self.limit:
                    raise MalformedPacket(f"a packet of {length} bytes: the limit is {self.limit}")
                body = await self._exact(length) if length else b""
        except TimeoutError:
            raise MalformedPacket(f"a packet was not complete within {self.timeout:g}s") from None
        self._packet = bytes(header) + body
        self._pos = 0
