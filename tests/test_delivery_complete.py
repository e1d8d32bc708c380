"""Every QoS 1 copy of a fan-out arrives (benchmarks/complete.py; issue 21).

A rewrite of the broker's reader once left QoS 1 fan-out stalled, intermittently and under
load only, with most copies never sent (docs/PERFORMANCE.md). The broker's own reader
(imcli/broker/reader.py) and its fan-out where a message is published (imcli/broker/fanout.py)
are checked here at small sizes in each shape; ``python -m benchmarks.complete --runs N`` runs
the full sizes (100,000 copies) as often as one likes.
"""

from __future__ import annotations

import socket

import pytest

from benchmarks.complete import SHAPES, run
from imcli.broker.accounts import AccountStore
from imcli.serve.host import ServeInfo
from tests.rawmqtt import chat, connect_packet, field, packet, password_of, publish_packet, read_packets

PINGREQ = b"\xc0\x00"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_qos1_copy_arrives(shape: str) -> None:
    chosen = SHAPES[shape](10, 10)
    [(delivered, _)] = run(chosen, 1, stall=20.0)
    assert delivered == chosen.expected


def test_packets_sent_at_once_are_answered_in_order(server: ServeInfo) -> None:
    """A client that pipelines (50 QoS 1 PUBLISHes, a SUBSCRIBE, a PUBLISH it hears, a PINGREQ in
    one write) gets every answer, in the order of what it sent: the broker's reader handles all of
    one read's packets at once and writes their PUBACKs together (imcli/broker/reader.py)."""
    assert server.broker is not None
    AccountStore(server.data_dir).add("mallory", password_of("mallory"))
    with socket.create_connection((server.address.host, server.address.port), timeout=10) as sock:
        sock.sendall(connect_packet(b"mallory:pipe", b"mallory", password_of("mallory").encode(), keepalive=0))
        got, _ = read_packets(sock, lambda p: len(p) >= 1)
        assert got == [(0x20, b"\x00\x00")]
        topic = b"im/room/pipe/mallory"
        burst = b"".join(publish_packet(topic, chat(f"line {i}"), qos=1, packet_id=i) for i in range(1, 51))
        burst += packet(0x82, (51).to_bytes(2, "big") + field(b"im/room/pipe/+") + b"\x01")
        burst += publish_packet(topic, chat("after the SUBSCRIBE"), qos=1, packet_id=52) + PINGREQ
        sock.sendall(burst)
        got, closed = read_packets(
            sock, lambda p: any(first == 0xD0 for first, _ in p) and any(first >> 4 == 3 for first, _ in p)
        )
    assert not closed
    answers = [(first, body) for first, body in got if first >> 4 != 3]
    expected = [(0x40, i.to_bytes(2, "big")) for i in range(1, 51)] + [(0x90, b"\x00\x33\x01"), (0x40, b"\x00\x34")]
    assert answers == [*expected, (0xD0, b"")]
    heard = [body for first, body in got if first >> 4 == 3]  # the copy may come before or after the PINGRESP
    assert len(heard) == 1  # only what was said after the subscription
    assert b"after the SUBSCRIBE" in heard[0]
