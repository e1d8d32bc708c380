"""A keep-alive's cost on the broker's loop (issue 21: no stall over 50 ms at 10,000 users): no timer
per packet written, and a PINGREQ answered by the connection's reader with its read's PUBACKs.

amqtt's protocol handler moves a write timer (``call_later``, then ``cancel`` at the next packet)
at every packet it writes, for a ``handle_write_timeout`` that does nothing on a broker. asyncio
keeps a cancelled timer in its heap until half of the heap is cancelled, then rebuilds the heap
in one round of the loop, from every timer at once: with 10,000 users, each answered a PINGRESP
every 30 s, that round held the loop 20 ms and more (benchmarks/stalltrace.py, docs/PERFORMANCE.md).
``AckAfterJournal.attach`` (imcli/broker/amqtt_adapter.py) arms none. A PINGREQ's PINGRESP is
written with the PUBACKs of the same read, in the order the client sent them
(``PacketReader._small``, imcli/broker/reader.py), not through amqtt's packet decoding and events;
one alone in its read is answered in the transport's callback, without waking the reader's task
(``PacketReader._arrived``), and still counts as heard for the keep-alive.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from imcli.broker.accounts import AccountStore
from imcli.broker.amqtt_adapter import AckAfterJournal
from imcli.broker.limits import Limits
from imcli.broker.reader import PacketReader
from imcli.broker.settings import BrokerSettings
from imcli.core.wire import Topics
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import chat, connect_packet, field, packet, password_of, publish_packet, read_packets

PINGREQ, PINGRESP = b"\xc0\x00", 0xD0
ANSWERS = 50  # packets amqtt writes (_send_packet)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    limits = Limits(max_connections=100)
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, limits=limits)
    # asyncio's loop, whatever IMCLI_LOOP says: these tests read its timer heap (uvloop's timers are libuv's)
    with BackgroundServer(settings, workers=False, loop="asyncio") as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        yield info


def _timers(info: ServeInfo) -> tuple[int, list[object]]:
    """asyncio's count of cancelled timers in the broker's loop, and every scheduled timer's callback
    (read in the loop itself; asyncio private, read only)."""
    assert info.broker is not None
    loop = info.broker._loop  # amqtt private: the broker's loop
    if not hasattr(loop, "_timer_cancelled_count"):  # IMCLI_LOOP=uvloop: libuv's timers, not asyncio's heap
        pytest.skip("asyncio's own event loop only")

    async def read() -> tuple[int, list[object]]:
        return loop._timer_cancelled_count, [h._callback for h in loop._scheduled]

    return asyncio.run_coroutine_threadsafe(read(), loop).result(10)


def test_answering_a_client_arms_and_cancels_no_timer(broker: ServeInfo) -> None:
    """A client with a keep-alive subscribes and unsubscribes 25 times: each SUBACK and UNSUBACK is
    written through amqtt's ``_send_packet``, and no write timer is armed for the connection, nor any
    timer cancelled per answer (amqtt's handler: one per packet written, 50 here)."""
    _timers(broker)  # skipped on another loop than asyncio's, before any socket is opened
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    sock.sendall(connect_packet(b"alice:acks", b"alice", password_of("alice").encode(), keepalive=30))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x20, b"\x00\x00")]
    assert broker.broker is not None
    handler = broker.broker.session_table()["alice:acks"][1]
    mine = field(Topics().user_filter("alice").encode())
    cancelled_before, _ = _timers(broker)
    for i in range(1, ANSWERS // 2 + 1):
        pid = i.to_bytes(2, "big")
        sock.sendall(packet(0x82, pid + mine + b"\x00"))
        assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x90, pid + b"\x00")]
        sock.sendall(packet(0xA2, pid + mine))
        assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0xB0, pid)]
    cancelled_after, callbacks = _timers(broker)
    sock.close()
    assert cancelled_after - cancelled_before < ANSWERS // 5, (cancelled_before, cancelled_after)
    assert handler._keepalive_task is None  # amqtt private (AMQTT_PRIVATE): its write timer
    assert not [c for c in callbacks if getattr(c, "__func__", None) is type(handler).handle_write_timeout]


def test_pings_read_with_messages_are_answered_in_the_order_sent(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PINGREQs and QoS 1 PUBLISHes in one read: a PINGRESP for each PINGREQ, a PUBACK for each
    PUBLISH, in the order the client sent them; a PINGREQ alone in its read is answered too; all by
    the reader, none through amqtt's ``handle_pingreq``."""
    through_amqtt: list[object] = []

    async def handle_pingreq(self: object, packet: object) -> None:
        through_amqtt.append(packet)

    monkeypatch.setattr(AckAfterJournal, "handle_pingreq", handle_pingreq)
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    sock.sendall(connect_packet(b"alice:pings", b"alice", password_of("alice").encode(), keepalive=30))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x20, b"\x00\x00")]
    dm = Topics().dm("bob", "alice").encode()
    burst = PINGREQ + publish_packet(dm, chat("one"), qos=1, packet_id=1) + PINGREQ + PINGREQ
    burst += publish_packet(dm, chat("two"), qos=1, packet_id=2) + PINGREQ
    sock.sendall(burst)
    got, closed = read_packets(sock, lambda p: len(p) >= 6)
    assert not closed
    assert got == [
        (PINGRESP, b""), (0x40, b"\x00\x01"), (PINGRESP, b""), (PINGRESP, b""), (0x40, b"\x00\x02"), (PINGRESP, b"")
    ]  # fmt: skip
    sock.sendall(PINGREQ)
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(PINGRESP, b"")]
    sock.close()
    assert through_amqtt == []


def reader_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each step of a reader's task from now on (its buffer's length then): a packet answered in the
    transport's callback adds none."""
    steps: list[int] = []
    handle_buffer = PacketReader._handle_buffer

    async def counted(self: PacketReader) -> None:
        steps.append(len(self._buffer))
        await handle_buffer(self)

    monkeypatch.setattr(PacketReader, "_handle_buffer", counted)
    return steps


def test_a_ping_alone_in_its_read_is_answered_without_waking_the_reader(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PINGREQ alone in its read, with everything the client sent before handled, is answered in the
    transport's callback (``PacketReader._arrived``): the reader's task is not woken for it (issue 21:
    10,000 users' keep-alives come in clumps, and each wake was a task step of some 25 us more)."""
    steps = reader_steps(monkeypatch)
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    sock.sendall(connect_packet(b"alice:alone", b"alice", password_of("alice").encode(), keepalive=30))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x20, b"\x00\x00")]
    sock.sendall(PINGREQ)  # the first may come before the reader waits for bytes
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(PINGRESP, b"")]
    steps.clear()
    for _ in range(5):
        sock.sendall(PINGREQ)
        assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(PINGRESP, b"")]
    sock.close()
    assert steps == []


def test_a_client_that_only_pings_stays_connected_past_its_keep_alive(broker: ServeInfo) -> None:
    """Keep-alive 1 s (the broker waits 3 s: ``sessions.read_timeout``): PINGREQs every 0.4 s for 5 s,
    each answered in the transport's callback, count as heard; the connection is still open, and the
    broker still answers. (One that sends nothing is closed: test_account_limits.py.)"""
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    sock.sendall(connect_packet(b"alice:pinger", b"alice", password_of("alice").encode(), keepalive=1))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x20, b"\x00\x00")]
    for _ in range(13):
        sock.sendall(PINGREQ)
        got, closed = read_packets(sock, lambda p: len(p) >= 1)
        assert got == [(PINGRESP, b"")] and not closed
        time.sleep(0.4)
    assert broker.broker is not None
    assert "alice:pinger" in broker.broker.session_table()
    sock.close()


def test_a_paho_client_idle_past_its_keep_alive_stays_connected_on_pings_answered_at_once(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho (a client we did not write) with keep-alive 1 s, idle for 5 s: it sends its PINGREQs, the
    broker answers them in the transport's callback (at most the first through the reader's task), and
    neither side closes (paho closes when a PINGRESP is late, the broker when nothing is heard)."""
    steps = reader_steps(monkeypatch)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:paho", clean_session=True)
    client.username_pw_set("alice", password_of("alice"))
    connected, disconnected = threading.Event(), threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.on_disconnect = lambda *_a: disconnected.set()
    client.connect(broker.address.host, broker.address.port, keepalive=1)
    client.loop_start()
    try:
        assert connected.wait(10)
        steps.clear()
        assert not disconnected.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    assert len(steps) <= 1, steps
