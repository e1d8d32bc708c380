"""Connections' ends a slice per event-loop round (imcli/broker/teardown.py, issue 21): when many
connections end at once, another client's packet read with their last ones is handled before most
of their ends, not after all of them; and what a connection's end must keep still holds while it
waits for its turn (its session is not forgotten, a take-over ends it at once, its DISCONNECT
counts, its Last Will fires after what it sent)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imcli.broker import teardown
from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.reader import PacketReader
from imcli.broker.session_sweep import forgettable
from imcli.broker.settings import BrokerSettings
from imcli.broker.teardown import TeardownGate
from imcli.core.wire import Topics
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.brokers import loop_held
from tests.rawmqtt import chat, connect_packet, field, packet, password_of, publish_packet, read_packets, wait_until

T = Topics()
PINGREQ, PINGRESP = b"\xc0\x00", 0xD0
PINGRESP_BYTES = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"
NAMES = ("alice", "bob", "carol", "dave")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    with _broker(tmp_path) as info:
        yield info


@contextlib.contextmanager
def _broker(tmp_path: Path) -> Iterator[ServeInfo]:
    limits = Limits(publish_rate=1e6, publish_burst=10**6, max_connections=100)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, limits=limits), workers=False) as info:
        store = AccountStore(info.data_dir)
        for name in NAMES:
            store.add(name, password_of(name))
        yield info


def _connect(
    info: ServeInfo,
    name: str,
    client_id: str,
    *,
    will: tuple[str, bytes] | None = None,
    clean: bool = True,
    present: bool = False,
    after: list[tuple[int, bytes]] | None = None,
) -> socket.socket:
    """Signed in as ``name`` (keep-alive 0), with a Last Will (QoS 0, not retained) if given;
    ``clean`` false: a persistent session, ``present`` if it is resumed; ``after`` gets what came in
    the CONNACK's read after it (a resumed session's copies may: uvloop writes them that soon)."""
    sock = socket.create_connection((info.address.host, info.address.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if will is None:
        body = connect_packet(client_id.encode(), name.encode(), password_of(name).encode(), keepalive=0)
        if not clean:
            body = body[:9] + bytes([body[9] & ~0x02]) + body[10:]  # the connect flags: no clean session
        sock.sendall(body)
    else:
        flags = 0x80 | 0x40 | 0x04 | 0x02  # username, password, Will, clean session
        body = field(b"MQTT") + bytes([4, flags]) + b"\x00\x00" + field(client_id.encode())
        body += field(will[0].encode()) + field(will[1]) + field(name.encode()) + field(password_of(name).encode())
        sock.sendall(packet(0x10, body))
    got, _ = read_packets(sock, lambda p: len(p) >= 1)
    assert got[:1] == [(0x20, b"\x01\x00" if present else b"\x00\x00")], got
    if after is None:
        assert len(got) == 1, got
    else:
        after.extend(got[1:])
    return sock


def _subscribed(info: ServeInfo, name: str, client_id: str) -> socket.socket:
    """Signed in, subscribed at QoS 0 to everything for ``name``."""
    sock = _connect(info, name, client_id)
    sock.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter(name).encode()) + b"\x00"))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x00")]
    return sock


def _handler(info: ServeInfo, client_id: str) -> Any:
    assert info.broker is not None
    return info.broker.session_table()[client_id][1]


# ---------------------------------------------------------------- the gate alone


def test_the_gate_gives_a_slice_of_turns_per_loop_round_in_the_order_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teardown, "SLICE", 3)
    rounds: list[tuple[int, int]] = []  # (who, the loop round its turn came in)

    async def main() -> None:
        gate, round_now = TeardownGate(), [0]

        async def ticks() -> None:
            while True:
                round_now[0] += 1
                await asyncio.sleep(0)

        async def end(who: int) -> None:
            await gate.turn()
            rounds.append((who, round_now[0]))

        ticker = asyncio.create_task(ticks())
        await asyncio.sleep(0)
        ends = [asyncio.create_task(end(who)) for who in range(8)]
        await asyncio.sleep(0)  # every end has asked: three went on, five wait
        assert len(gate) == 5
        loop = asyncio.get_running_loop()
        # a parked DISCONNECT (reader._park): called at its turn, it wakes its reader for the next round
        gate.queue(lambda: loop.call_soon(lambda: rounds.append((8, round_now[0]))))
        ends[4].cancel()  # a take-over ends one while it waits: the others keep their places
        await asyncio.gather(*ends, return_exceptions=True)
        while len(gate):
            await asyncio.sleep(0)
        ticker.cancel()
        assert (gate.turns, gate.waited, len(gate)) == (8, 6, 0)

    asyncio.run(main())
    assert [who for who, _ in rounds] == [0, 1, 2, 3, 5, 6, 7, 8]
    by_round: dict[int, int] = {}
    for _, at in rounds:
        by_round[at] = by_round.get(at, 0) + 1
    assert list(by_round.values()) == [3, 3, 2]


def test_the_gate_gives_turns_at_once_while_nobody_waits() -> None:
    async def main() -> int:
        gate = TeardownGate()
        for _ in range(teardown.SLICE):
            await gate.turn()  # no await of a future: the end goes on in the same callback
        return gate.waited

    assert asyncio.run(main()) == 0


# ---------------------------------------------------------------- through the broker


@pytest.mark.parametrize(("gated", "at_once"), [(True, False), (False, False), (True, True)])
def test_a_ping_read_with_many_ends_is_answered_before_most_of_them(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch, gated: bool, at_once: bool
) -> None:
    """30 connections send DISCONNECT and then another client a PINGREQ, all while the broker's loop
    is held: its next look finds the 31 sockets readable in that order. The PINGREQ stands first for
    any packet the reader's task handles (a chat line: ``at_once`` false, the reader's direct answer
    to a lone PINGREQ off). With the gate (a slice of 5 here) only the first slice of ends has gone
    on when it is handled; with the slice out of reach (``gated`` false) every end went on before
    it, as before the gate: the order the test asserts is the change's. A lone PINGREQ as it is
    answered now (``at_once``: in the transport's callback, imcli/broker/reader.py) waits for none of
    them. Every connection ends all the same, its clean session forgotten."""
    assert broker.broker is not None
    monkeypatch.setattr(teardown, "SLICE", 5 if gated else 1 << 30)
    monkeypatch.setattr(PacketReader, "PING_AT_ONCE", at_once)
    count = 30
    table = broker.broker.session_table()
    leaving = [_connect(broker, NAMES[i % 4], f"{NAMES[i % 4]}:leave{i}") for i in range(count)]
    handlers = [_handler(broker, f"{NAMES[i % 4]}:leave{i}") for i in range(count)]
    seen: list[tuple[int, int]] = []  # (ends gone on, sessions marked ended) when the PINGRESP was written
    write_answers = PacketReader._write_answers  # the PINGRESP is written there, either way

    def recorded(reader: PacketReader, data: bytes, kept: bool) -> None:
        if data == PINGRESP_BYTES:  # the probe's (the others send only their DISCONNECT)
            ended = sum(1 for h in handlers if h.session is None or not h.session.transitions.is_connected())
            seen.append((sum(1 for h in handlers if h._stopped), ended))
        write_answers(reader, data, kept)

    monkeypatch.setattr(PacketReader, "_write_answers", recorded)
    with _connect(broker, "alice", "alice:probe") as probe:
        with loop_held(broker):
            for sock in leaving:
                sock.sendall(DISCONNECT)
            probe.sendall(PINGREQ)
        got, closed = read_packets(probe, lambda p: len(p) >= 1)
        assert (got, closed) == ([(PINGRESP, b"")], False)
        for sock in leaving:
            assert read_packets(sock, lambda p: False) == ([], True)  # closed by the broker
            sock.close()
        assert wait_until(lambda: not any(f"leave{i}" in cid for cid in table for i in range(count)), 10)
    [(stopped, ended)] = seen
    if at_once:
        assert stopped == 0 and ended == 0, seen
    elif gated:
        assert stopped == 5 and ended == 0, seen  # the first slice stopped; no message loop has ended one yet
        assert broker.broker.teardown.waited >= count - 5
    else:
        assert stopped == count, seen


class _Never:
    """A gate that never gives the turn: ``asked`` once a connection's end waits on it."""

    def __init__(self) -> None:
        self.asked = False

    def turn_now(self) -> bool:
        return False

    def queue(self, waiter: object) -> None:
        self.asked = True

    async def turn(self) -> None:
        self.asked = True
        await asyncio.get_running_loop().create_future()


def test_an_end_waiting_for_its_turn_keeps_its_session_and_a_takeover_ends_it_with_its_disconnect(
    broker: ServeInfo,
) -> None:
    """bob:phone (with a Last Will) sends DISCONNECT; its end waits for a turn that does not come.
    Meanwhile its session is still connected (not forgettable, the sweep leaves it) and its message
    loop has not ended. A new CONNECT of bob:phone takes the session over at once: the old
    connection is closed, and its DISCONNECT still counts (no Will), the newer one goes on."""
    assert broker.broker is not None
    table = broker.broker.session_table()
    will_topic = T.dm("alice", "bob")
    with _subscribed(broker, "alice", "alice:watch") as alice:
        real, never = broker.broker.teardown, _Never()
        broker.broker.teardown = never  # type: ignore[assignment]
        try:  # the connection's handler takes the broker's gate before its CONNACK
            old = _connect(broker, "bob", "bob:phone", will=(will_topic, chat("will of the old")))
        finally:
            broker.broker.teardown = real
        handler = _handler(broker, "bob:phone")
        assert handler.teardown_gate is never
        session = table["bob:phone"][0]
        old.sendall(DISCONNECT)
        assert wait_until(lambda: never.asked, 5)  # read, and waiting for its turn
        assert handler.said_goodbye and not handler._stopped and not handler.loop_ended
        assert (
            not handler.reader.transport.is_reading()
        )  # nothing after a DISCONNECT is read, its end of stream neither
        assert session.transitions.is_connected()
        assert not forgettable(table, "bob:phone", session)  # the sweep leaves it
        with _connect(broker, "bob", "bob:phone") as new:
            assert read_packets(old, lambda p: False)[1]  # the old connection is closed
            assert table["bob:phone"][1] is not handler
            new.sendall(PINGREQ)
            assert read_packets(new, lambda p: len(p) >= 1) == ([(PINGRESP, b"")], False)
        assert handler._stopped and handler.loop_ended
        old.close()
        alice.sendall(PINGREQ)
        got, _ = read_packets(alice, lambda p: any(first == PINGRESP for first, _ in p))
    assert [first for first, _ in got] == [PINGRESP], got  # no Will: the DISCONNECT counted


def test_a_will_fires_after_the_last_message_when_the_end_waits_for_its_turn(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """carol sends a burst of DMs (more than the reader handles itself) and drops her connection
    without DISCONNECT, while 20 other connections end in the same loop round (a slice of 2): alice
    gets every DM in order, then the Will, once."""
    monkeypatch.setattr(teardown, "SLICE", 2)
    will_topic = T.dm("alice", "carol")
    leaving = [_connect(broker, "dave", f"dave:leave{i}") for i in range(20)]
    with _subscribed(broker, "alice", "alice:watch") as alice:
        carol = _connect(broker, "carol", "carol:phone", will=(will_topic, chat("carol is gone")))
        burst = b"".join(
            publish_packet(will_topic.encode(), chat(f"line {i}"), qos=1, packet_id=i) for i in range(1, 81)
        )
        with loop_held(broker):
            for sock in leaving:
                sock.sendall(DISCONNECT)
            carol.sendall(burst)
            carol.close()
        got, closed = read_packets(alice, lambda p: any(b"carol is gone" in body for _, body in p))
        assert not closed
    texts = [body.split(b'"text":"')[1].split(b'"')[0].decode() for first, body in got if first >> 4 == 3]
    for sock in leaving:
        sock.close()
    assert texts == [f"line {i}" for i in range(1, 81)] + ["carol is gone"]


def _copies(got: list[tuple[int, bytes]]) -> list[tuple[str, int, bool]]:
    """(text, packet id, DUP) of every QoS 1 PUBLISH in ``got``."""
    out = []
    for first, body in got:
        if first >> 4 == 3 and first & 0x06 == 0x02:
            n = int.from_bytes(body[:2], "big")
            text = body.split(b'"text":"')[1].split(b'"')[0].decode()
            out.append((text, int.from_bytes(body[2 + n : 4 + n], "big"), bool(first & 0x08)))
    return out


def test_a_persistent_sessions_unacknowledged_copies_outlive_an_end_waiting_for_its_turn(broker: ServeInfo) -> None:
    """bob's persistent session gets a DM (QoS 1) and does not acknowledge it, sends DISCONNECT and
    waits for a turn that does not come; a second DM is written to him meanwhile (his session is
    still connected). He resumes the session from a new connection (a take-over of the waiting
    one): both copies come again, with their packet ids and DUP set (MQTT-4.4.0-1)."""
    assert broker.broker is not None
    real, never = broker.broker.teardown, _Never()
    broker.broker.teardown = never  # type: ignore[assignment]
    try:
        bob = _connect(broker, "bob", "bob:laptop", clean=False)
    finally:
        broker.broker.teardown = real
    dm = T.dm("bob", "alice").encode()
    with bob, _connect(broker, "alice", "alice:phone") as alice:
        bob.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
        alice.sendall(publish_packet(dm, chat("first"), qos=1, packet_id=1))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        [(_, first_id, _)] = _copies(read_packets(bob, lambda p: bool(_copies(p)))[0])
        bob.sendall(DISCONNECT)
        assert wait_until(lambda: never.asked, 5)
        alice.sendall(publish_packet(dm, chat("second"), qos=1, packet_id=2))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x02")]
        [(_, second_id, _)] = _copies(read_packets(bob, lambda p: bool(_copies(p)))[0])
        got: list[tuple[int, bytes]] = []  # what came with the CONNACK
        with _connect(broker, "bob", "bob:laptop", clean=False, present=True, after=got) as resumed:
            assert read_packets(bob, lambda p: False)[1]  # the waiting connection is closed
            got += read_packets(resumed, lambda p: len(_copies(got + p)) >= 2)[0]
    assert sorted(_copies(got)) == sorted([("first", first_id, True), ("second", second_id, True)])


def test_a_ping_and_a_dm_behind_a_crowd_closing_are_read_first_and_every_end_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 connections send DISCONNECT and close (FIN), then alice sends a DM to bob and a PINGREQ,
    all while the broker's loop is held: its next poll finds the 41 sockets readable, alice's last.
    On the live-first selector (imcli/serve/livefirst.py; a bound of 10 here) alice's socket, whose
    peer has not closed, is read in the first slice, before any of the 40 DISCONNECTs (the stdlib's
    selector reads all 40 first: the count the test asserts is the change's). The DM is delivered, and
    every leaver's end goes on all the same, its session forgotten. (Its own broker, with
    ``LIVE_FIRST`` set whatever the default.)"""
    from imcli.serve import livefirst, loops

    monkeypatch.setattr(livefirst.LiveFirstSelector, "BOUND", 10)
    monkeypatch.setattr(loops, "LIVE_FIRST", True)
    with _broker(tmp_path) as broker:
        _crowd_closing(broker, monkeypatch)


def _crowd_closing(broker: ServeInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 40
    assert broker.broker is not None
    table = broker.broker.session_table()
    read_before: list[int] = []  # DISCONNECTs read when alice's read came
    reads = {"leavers": 0}
    arrived = PacketReader._arrived

    def counted(reader: PacketReader, feed: Any, data: bytes) -> None:
        if data == DISCONNECT:
            reads["leavers"] += 1
        elif data.endswith(PINGREQ):
            read_before.append(reads["leavers"])
        arrived(reader, feed, data)

    monkeypatch.setattr(PacketReader, "_arrived", counted)  # before the connections: each reader hooks it once
    leaving = [_connect(broker, NAMES[i % 4], f"{NAMES[i % 4]}:gone{i}") for i in range(count)]
    dm = T.dm("bob", "alice").encode()
    with _subscribed(broker, "bob", "bob:watch") as bob, _connect(broker, "alice", "alice:live") as alice:
        with loop_held(broker):
            for sock in leaving:
                sock.sendall(DISCONNECT)
                sock.shutdown(socket.SHUT_WR)
            alice.sendall(publish_packet(dm, chat("still here"), qos=1, packet_id=7) + PINGREQ)
        got, _ = read_packets(alice, lambda p: (PINGRESP, b"") in p)
        assert (0x40, b"\x00\x07") in got  # the DM's PUBACK, then the PINGRESP
        delivered, _ = read_packets(bob, lambda p: len(p) >= 1)
        assert delivered and delivered[0][0] >> 4 == 3 and b"still here" in delivered[0][1]
        for sock in leaving:
            assert read_packets(sock, lambda p: False) == ([], True)
            sock.close()
        assert wait_until(lambda: not any(f"gone{i}" in cid for cid in table for i in range(count)), 10)
    assert read_before == [0], read_before
