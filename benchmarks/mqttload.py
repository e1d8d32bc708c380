"""A minimal asyncio MQTT 3.1.1 client for load generation only.

paho runs one thread per client when looped in the background; thousands of simulated
users need one event loop instead. This speaks just enough MQTT (CONNECT with Will,
PUBLISH QoS 0/1, SUBSCRIBE, PUBACK, DISCONNECT; PINGREQ for the stall probe and for crowds
that stay longer than their keepalive) to drive the broker; the product itself uses paho (imcli/core/mqtt.py).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from imcli.core.framing import MalformedLength, decode_length, encode_length


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + encode_length(len(body)) + body


class LoadClient:
    def __init__(self, on_message: Callable[[str, bytes], None] | None = None) -> None:
        self.on_message = on_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pong: asyncio.Future[None] | None = None
        self.last_ping = time.monotonic()  # of the CONNECT, then of the last send_ping()

    async def connect(
        self, host: str, port: int, username: str, password: str, client_id: str,
        will: tuple[str, bytes, bool] | None = None, keepalive: int = 600,
    ) -> int:  # fmt: skip
        self._reader, self._writer = await asyncio.open_connection(host, port)
        self.last_ping = time.monotonic()
        flags = 0x02 | 0x80 | 0x40  # clean session, username, password
        payload = _str(client_id)
        if will is not None:
            flags |= 0x04 | (1 << 3) | (0x20 if will[2] else 0)  # will, QoS 1, retain
            payload += _str(will[0]) + _str(will[1])
        payload += _str(username) + _str(password)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
        self._writer.write(_packet(0x10, body))
        header = await self._reader.readexactly(4)
        if header[3] == 0:
            self._task = asyncio.create_task(self._read_loop())
        return header[3]

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert self._writer is not None
        flags = (qos << 1) | (1 if retain else 0)
        if qos == 0:
            self._writer.write(_packet(0x30 | flags, _str(topic) + payload))
            return
        pid = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[pid] = fut
        self._writer.write(_packet(0x30 | flags, _str(topic) + struct.pack("!H", pid) + payload))
        await fut

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        assert self._writer is not None
        pid = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[pid] = fut
        self._writer.write(_packet(0x82, struct.pack("!H", pid) + _str(topic) + bytes([qos])))
        return (await fut)[0]

    async def ping(self) -> None:
        """A PINGREQ, answered when its PINGRESP arrives."""
        assert self._writer is not None
        self._pong = asyncio.get_running_loop().create_future()
        self._writer.write(b"\xc0\x00")
        await self._pong

    def send_ping(self) -> None:
        """A PINGREQ whose answer nobody waits for: a client's keepalive."""
        self.last_ping = time.monotonic()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(b"\xc0\x00")

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (its Last Will fires)."""
        if self._writer is not None:
            self._writer.transport.abort()
        if self._task is not None:
            self._task.cancel()

    async def disconnect(self) -> None:
        if self._writer is not None:
            self._writer.write(b"\xe0\x00")
            await self._writer.drain()
            self._writer.close()
        if self._task is not None:
            self._task.cancel()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        buffer = bytearray()
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    break
                buffer += data
                at = 0  # packets are framed with the broker's own decoder (imcli.core.framing)
                while (header := decode_length(buffer, at + 1)) is not None:
                    length, start = header
                    if start + length > len(buffer):
                        break
                    self._handle(buffer[at], bytes(buffer[start : start + length]))
                    at = start + length
                del buffer[:at]
        except (MalformedLength, ConnectionError, asyncio.CancelledError):
            pass
        finally:  # the connection is gone: whoever waits for an acknowledgement hears so (no hang)
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("the connection closed before its acknowledgement"))
            self._acks.clear()

    def _handle(self, first: int, body: bytes) -> None:
        assert self._writer is not None
        kind = first >> 4
        if kind == 3:  # PUBLISH
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2 : 2 + tlen].decode()
            rest = body[2 + tlen :]
            if (first >> 1) & 3:
                pid = rest[:2]
                rest = rest[2:]
                self._writer.write(b"\x40\x02" + pid)
            if self.on_message is not None:
                self.on_message(topic, rest)
        elif kind == 13:  # PINGRESP
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        elif kind in (4, 9):  # PUBACK, SUBACK
            pid = struct.unpack("!H", body[:2])[0]
            fut = self._acks.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(body[2:])
