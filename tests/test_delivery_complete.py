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
from imcli.core.wire import DeviceStatus, Topics, encode
from imcli.serve.host import ServeInfo
from tests.rawmqtt import chat, connect_packet, field, packet, password_of, publish_packet, read_packets

PINGREQ = b"\xc0\x00"
T = Topics()


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


def test_retained_messages_for_a_subscription_come_as_retained_and_wait_for_their_puback(server: ServeInfo) -> None:
    """A subscription's retained messages go out in the connection's batched write, like fan-out
    copies, with the RETAIN flag and a packet id each, and stay in flight until their PUBACK: amqtt's
    own path gave each a task that gave up after 5 s without a PUBACK (a failed delivery logged per
    copy: 15,553 in a 10,000-user run, docs/PERFORMANCE.md)."""
    assert server.broker is not None
    store = AccountStore(server.data_dir)
    names = ["alice", "bob", "carol", "mallory"]
    for name in names:
        store.add(name, password_of(name))
    status = encode(DeviceStatus(interval=3600))
    address = (server.address.host, server.address.port)
    with socket.create_connection(address, timeout=10) as probe:
        # three users' presence records, retained by the presence worker once their statuses come
        probe.sendall(connect_packet(b"mallory:probe", b"mallory", password_of("mallory").encode(), keepalive=0))
        probe.sendall(packet(0x82, b"\x00\x01" + field(b"im/presence/+") + b"\x00"))
        read_packets(probe, lambda p: len(p) >= 2)  # CONNACK, SUBACK
        for i, name in enumerate(names[:3], start=1):
            with socket.create_connection(address, timeout=10) as other:
                other.sendall(connect_packet(f"{name}:laptop".encode(), name.encode(), password_of(name).encode()))
                retained = publish_packet(T.status(name, "laptop").encode(), status, qos=1, packet_id=i)
                other.sendall(bytes([retained[0] | 0x01]) + retained[1:])
                read_packets(other, lambda p: len(p) >= 2)  # CONNACK, PUBACK
                other.sendall(b"\xe0\x00")
        read_packets(probe, lambda p: len({body for first, body in p if first >> 4 == 3}) >= 3)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(connect_packet(b"mallory:retained", b"mallory", password_of("mallory").encode(), keepalive=0))
        sock.sendall(packet(0x82, b"\x00\x01" + field(b"im/presence/+") + b"\x01"))
        got, closed = read_packets(sock, lambda p: sum(1 for first, _ in p if first >> 4 == 3) >= 3)
        assert not closed
        assert got[:2] == [(0x20, b"\x00\x00"), (0x90, b"\x00\x01\x01")]
        records = [(first, body) for first, body in got if first >> 4 == 3]
        assert len(records) == 3
        assert {first for first, _ in records} == {0x33}  # QoS 1, RETAIN
        ids = [body[2 + int.from_bytes(body[:2], "big") :][:2] for _, body in records]
        assert len(set(ids)) == 3
        assert sorted(body[2 : 2 + int.from_bytes(body[:2], "big")] for _, body in records) == [
            f"im/presence/{name}".encode() for name in names[:3]
        ]
        sessions = server.broker._sessions  # amqtt private: (session, handler) by client id
        handlers = [handler for _, handler in sessions.values() if handler.session.client_id == "mallory:retained"]
        assert len(handlers) == 1
        assert len(handlers[0].in_flight) == 3  # in flight until their PUBACKs, however long they take
        sock.sendall(b"".join(b"\x40\x02" + pid for pid in ids) + PINGREQ)
        got, _ = read_packets(sock, lambda p: any(first == 0xD0 for first, _ in p))
        assert len(handlers[0].in_flight) == 0


def test_the_load_generator_frames_what_one_read_brings(server: ServeInfo) -> None:
    """The load generator's reader (benchmarks/mqttload.py) frames with imcli.core.framing: messages
    of one, two and three bytes of remaining length, many in one read, each arrive whole and once."""
    import asyncio

    from benchmarks.mqttload import LoadClient

    store = AccountStore(server.data_dir)
    for name in ("alice", "bob"):
        store.add(name, password_of(name))
    sizes = [1, 100, 127, 128, 5000, 16383, 16384] * 3  # 16384: max_payload, 3 bytes of length
    got: list[tuple[str, bytes]] = []

    async def exchange() -> None:
        done = asyncio.Event()

        def received(topic: str, payload: bytes) -> None:
            got.append((topic, payload))
            if len(got) == len(sizes):
                done.set()

        host, port = server.address.host, server.address.port
        bob, alice = LoadClient(on_message=received), LoadClient()
        assert await bob.connect(host, port, "bob", password_of("bob"), "bob:load") == 0
        assert await bob.subscribe(T.dm("bob", "alice")) == 1
        assert await alice.connect(host, port, "alice", password_of("alice"), "alice:load") == 0
        await asyncio.gather(*(alice.publish(T.dm("bob", "alice"), bytes([i % 251]) * n) for i, n in enumerate(sizes)))
        await asyncio.wait_for(done.wait(), 30)
        await alice.disconnect()
        await bob.disconnect()

    asyncio.run(exchange())
    assert sorted(got) == sorted((T.dm("bob", "alice"), bytes([i % 251]) * n) for i, n in enumerate(sizes))
