"""MQTT's fixed header: the remaining length (MQTT 3.1.1 §2.2.3), encoded and decoded once.

A variable-length integer of one to four bytes, seven bits each, least significant first;
the high bit says another byte follows. The broker's readers (imcli/broker/reader.py,
imcli/broker/packets.py), the raw clients of the tests and the benchmarks all frame packets
with these two functions.
"""

from __future__ import annotations

MAX_REMAINING_LENGTH = 128**4 - 1  # four bytes of seven bits: 268,435,455


class MalformedLength(ValueError):
    """A remaining length of more than four bytes: the stream can no longer be framed."""


def encode_length(n: int) -> bytes:
    """The remaining-length bytes of ``n`` (0 to ``MAX_REMAINING_LENGTH``)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"a remaining length of {n}: MQTT allows 0 to {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_length(buffer: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """The remaining length whose first byte is ``buffer[at]`` (just after a packet's first byte),
    and where the body starts; ``None`` while its bytes have not all come. ``MalformedLength``
    as soon as a fourth byte still says that another follows, before a fifth is read.

    One and two bytes (packets up to 16 KiB: nearly all) are unrolled: the broker's reader
    frames every packet of every connection with this."""
    try:  # free in CPython 3.11 until it is raised: once a read at most, at its unfinished end
        first = buffer[at]
        if first < 0x80:
            return first, at + 1
        second = buffer[at + 1]
        if second < 0x80:
            return (first & 0x7F) | second << 7, at + 2
    except IndexError:
        return None
    length, shift, i, size = 0, 0, at, len(buffer)
    while i < size:
        byte = buffer[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, i
        shift += 7
        if shift == 28:
            raise MalformedLength("a remaining length of more than 4 bytes")
    return None
