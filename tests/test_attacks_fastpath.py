"""This session's broker hot path attacked from outside, through raw sockets (issue 21 and 16):
the PUBLISH head checked apart from its payload and handled in the reader's own callback (the
"fast path", ``AckAfterJournal.may_deliver_now``) or queued for the message loop, a new
subscription's retained records sent a slice per loop round, and the aggregated rate notice.

Each case is framed so that the reader's fast path is taken: a valid DM just before the attack
(alone in its read, it goes out from the reader) and one just after it in the same write. The
verdict must be the one ``check_packet`` gives (the connection closed), and nothing of the attack
or after it is delivered to anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imcli.broker import amqtt_adapter
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.client_loop import FAIR_SHARE
from imcli.broker.limits import REQUEST_NOTICES, Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.framing import decode_length
from imcli.core.wire import MAX_NOTICE_REQUESTS, DeviceStatus, Notice, Topics, decode_as, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import brokers
from tests.rawmqtt import chat, connect_packet, field, packet, password_of, publish_packet, read_packets, signed_in

T = Topics()
PINGREQ, PINGRESP = b"\xc0\x00", 0xD0
DISCONNECT = b"\xe0\x00"
STATUS = encode(DeviceStatus(interval=30))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInfo]:
    settings = BrokerSettings(
        data_dir=tmp_path_factory.mktemp("fastpath") / "data",
        port=0,
        ws_port=0,
        packet_timeout=2.0,
        limits=Limits(publish_rate=1e6, publish_burst=10**6, max_connections=100),
    )
    with BackgroundServer(settings, workers=False) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob", "mallory"):
            store.add(name, password_of(name))
        store.add("auditor", password_of("auditor"), Role.SERVICE)  # may read statuses, as the presence worker
        yield info


def _connect(info: ServeInfo, name: str, client_id: bytes, *, clean: bool = True, window: int = 0) -> socket.socket:
    return signed_in(info.address, name, client_id, clean=clean, window=window)


def _subscribed(info: ServeInfo, name: str, client_id: bytes, *filters: str, window: int = 0) -> socket.socket:
    sock = _connect(info, name, client_id, window=window)
    body = b"\x00\x01" + b"".join(field(f.encode()) + b"\x01" for f in filters)
    sock.sendall(packet(0x82, body))
    got, _ = read_packets(sock, lambda p: any(first == 0x90 for first, _ in p))
    assert got[-1] == (0x90, b"\x00\x01" + b"\x01" * len(filters)), got
    return sock


def _publishes(got: list[tuple[int, bytes]]) -> list[tuple[str, bytes]]:
    """(topic, payload) of every PUBLISH in ``got``."""
    out = []
    for first, body in got:
        if first >> 4 == 3:
            n = int.from_bytes(body[:2], "big")
            start = 2 + n + (2 if first & 0x06 else 0)
            out.append((body[2 : 2 + n].decode(), body[start:]))
    return out


def _texts(got: list[tuple[int, bytes]]) -> list[str]:
    return [
        payload.decode().split('"text":"')[1].split('"')[0] for _, payload in _publishes(got) if b'"text"' in payload
    ]


def _drain(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Everything ``sock`` gets up to the PINGRESP of a PINGREQ sent now (a barrier)."""
    sock.sendall(PINGREQ)
    got, closed = read_packets(sock, lambda p: any(first == PINGRESP for first, _ in p))
    assert not closed
    return got


# ---------------------------------------------------------------- 1. malformed PUBLISH framing

DM = T.dm("bob", "mallory").encode()
LIMIT = BrokerSettings(data_dir=Path("."), port=0).max_packet

BAD = {
    "topic length past the packet end (QoS 0)": publish_packet(DM, b"x", qos=0, topic_length=len(DM) + 10),
    "topic length past the packet end (QoS 1)": publish_packet(DM, b"", qos=1, topic_length=len(DM) + 3),
    "topic length 0xffff": publish_packet(DM, b"payload", qos=1, topic_length=0xFFFF),
    "zero-length topic (QoS 0)": packet(0x30, field(b"") + b"payload"),
    "zero-length topic (QoS 1)": packet(0x32, field(b"") + b"\x00\x07payload"),
    "QoS 1, remaining length ends at the topic (no packet id)": packet(0x32, field(DM)),
    "QoS 1, one byte of packet id": packet(0x32, field(DM) + b"\x00"),
    "QoS 1, packet id 0": packet(0x32, field(DM) + b"\x00\x00" + chat("zero id")),
    "QoS 3": packet(0x36, field(DM) + b"\x00\x07" + chat("qos 3")),
    "DUP at QoS 0": packet(0x38, field(DM) + chat("dup")),
    "remaining length 0": packet(0x30, b""),
    "remaining length 1": packet(0x32, b"\x00"),
    "remaining length 2, topic length 5": packet(0x30, b"\x00\x05"),
    "wildcard + in the topic": publish_packet(b"im/user/bob/dm/+", chat("wild"), qos=1),
    "wildcard # in the topic": publish_packet(b"im/user/bob/#", chat("wild"), qos=0),
    "U+0000 in the topic": publish_packet(DM + b"\x00", chat("nul"), qos=1),
    "invalid UTF-8 in the topic": publish_packet(DM + b"\xff", chat("utf"), qos=1),
    "an encoded surrogate in the topic": publish_packet(DM + b"\xed\xa0\x80", chat("surrogate"), qos=1),
    "an overlong encoding in the topic": publish_packet(b"im/user/bob/dm/mallory\xc0\xaf", chat("overlong"), qos=0),
    "a $ topic": publish_packet(b"$SYS/broker/x", chat("sys"), qos=1),
    "one byte over the packet limit": b"\x32" + packet(0x32, b"", length=LIMIT + 1)[1:] + field(DM) + b"\x00\x01",
    "a remaining length of five bytes": b"\x30\xff\xff\xff\xff\x01",
}


def _attack(
    broker: ServeInfo, bad: bytes, *, one_byte_at_a_time: bool = False, closes: bool = True
) -> tuple[list[str], bool]:
    """mallory sends a DM, then ``bad`` and a DM after it in one write (or byte by byte); the texts
    bob got up to a barrier, and whether mallory's connection was closed (read until it is, if it ``closes``)."""
    with _subscribed(broker, "bob", b"bob:attack", T.user_filter("bob")) as bob:
        with _connect(broker, "mallory", b"mallory:attack") as mallory:
            mallory.sendall(publish_packet(DM, chat("before"), qos=1, packet_id=1))
            acks, _ = read_packets(mallory, lambda p: len(p) >= 1)
            assert acks == [(0x40, b"\x00\x01")]
            data = bad + publish_packet(DM, chat("after"), qos=1, packet_id=2) + PINGREQ
            if one_byte_at_a_time:
                for i in range(len(data)):
                    try:
                        mallory.sendall(data[i : i + 1])
                    except (BrokenPipeError, ConnectionResetError):  # the broker's verdict came first
                        break
                    time.sleep(0.0005)  # each its own segment, most its own read
            else:
                mallory.sendall(data)
            _, closed = read_packets(mallory, lambda p: not closes and any(first == PINGRESP for first, _ in p))
        return _texts(_drain(bob)), closed


@pytest.mark.parametrize("case", list(BAD))
def test_a_malformed_publish_on_the_fast_path_closes_and_delivers_nothing(broker: ServeInfo, case: str) -> None:
    texts, closed = _attack(broker, BAD[case])
    assert closed
    assert texts == ["before"]  # neither the malformed one nor the one after it reached bob


@pytest.mark.parametrize(
    "case",
    ["topic length past the packet end (QoS 1)", "QoS 1, one byte of packet id", "an encoded surrogate in the topic"],
)
def test_a_malformed_publish_sent_a_byte_at_a_time_gets_the_same_verdict(broker: ServeInfo, case: str) -> None:
    texts, closed = _attack(broker, BAD[case], one_byte_at_a_time=True)
    assert closed
    assert texts == ["before"]


def test_a_publish_sent_a_byte_at_a_time_arrives_whole(broker: ServeInfo) -> None:
    """The same bytes as one read or as many: a DM whose head and payload arrive one byte per
    segment is delivered once, intact, and the one after it too."""
    texts, closed = _attack(
        broker, publish_packet(DM, chat("split" * 40), qos=0), one_byte_at_a_time=True, closes=False
    )
    assert not closed
    assert texts == ["before", "split" * 40, "after"]


def test_edge_publishes_that_are_well_formed_keep_the_connection(broker: ServeInfo) -> None:
    """Remaining length exactly at the head (an empty payload) at QoS 0 and 1, and DUP at QoS 1:
    well-formed, so the connection stays and what follows is delivered."""
    edge = (
        packet(0x30, field(DM))
        + packet(0x32, field(DM) + b"\x00\x09")
        + packet(0x3A, field(DM) + b"\x00\x0a" + chat("dup at qos 1"))
    )
    texts, closed = _attack(broker, edge, closes=False)
    assert not closed
    assert texts == ["before", "dup at qos 1", "after"]


# ---------------------------------------------------------------- 2. identity and order across both paths


def test_many_publishes_in_one_segment_mixing_qos_and_a_forgery_keep_order_and_identity(broker: ServeInfo) -> None:
    """mallory writes, in one segment, more QoS 0 and QoS 1 DMs than a read handles itself
    (both paths), with DMs forged as alice (to bob, from alice) among them, first and in the
    queued part: bob gets every genuine one in order and no forged one; mallory every PUBACK in order."""
    forged = T.dm("bob", "alice").encode()
    with _subscribed(broker, "bob", b"bob:mixed", T.user_filter("bob")) as bob:
        with _connect(broker, "mallory", b"mallory:mixed") as mallory:
            data, want, acks = bytearray(), [], []
            for i in range(1, 3 * FAIR_SHARE + 1):
                if i in (1, 2 * FAIR_SHARE):
                    data += publish_packet(forged, chat(f"forged {i}"), qos=i % 2, packet_id=i)
                    acks += [i] if i % 2 else []
                    continue
                data += publish_packet(DM, chat(f"line {i}"), qos=i % 2, packet_id=i)
                want.append(f"line {i}")
                acks += [i] if i % 2 else []
            mallory.sendall(bytes(data))
            # every PUBACK, then the barrier: the reader answers a PINGREQ itself, so its PINGRESP may come
            # before what the message loop still handles of the burst (on uvloop it does: tests/test_uvloop.py)
            got = read_packets(mallory, lambda p: sum(first == 0x40 for first, _ in p) >= len(acks))[0]
            got += _drain(mallory)
        texts = _texts(read_packets(bob, lambda p: len(_texts(p)) >= len(want))[0] + _drain(bob))
    assert [body for first, body in got if first == 0x40] == [i.to_bytes(2, "big") for i in acks]
    assert texts == want
    assert not any(t.startswith("forged") for t in texts)


@pytest.mark.parametrize("queued", [False, True], ids=["fast path", "queued"])
def test_a_dm_forged_from_another_is_never_delivered(broker: ServeInfo, queued: bool) -> None:
    """mallory publishes on alice's side of a DM to bob (``im/user/bob/dm/alice``), and on bob's
    own notice topic: alone (the reader handles it) or behind a burst (the message loop does)."""
    forged = [T.dm("bob", "alice").encode(), T.notice("bob").encode(), T.dm("alice", "bob").encode()]
    bob = _subscribed(broker, "bob", b"bob:forged", T.user_filter("bob"))
    alice = _subscribed(broker, "alice", b"alice:forged", T.user_filter("alice"))
    with bob, alice:
        with _connect(broker, "mallory", b"mallory:forged") as mallory:
            burst = b"".join(
                publish_packet(DM, chat(f"burst {i}"), qos=1, packet_id=100 + i) for i in range(2 * FAIR_SHARE)
            )
            for n, topic in enumerate(forged, start=1):
                attack = publish_packet(topic, chat(f"forged {n}"), qos=n % 2, packet_id=n)
                mallory.sendall((burst + attack) if queued else attack)
                _drain(mallory)
        seen = _publishes(_drain(bob)) + _publishes(_drain(alice))
    assert not [t for t, p in seen if b"forged" in p]
    with sqlite3.connect(broker.data_dir / "archive.sqlite3") as archive:  # journalled before delivery: not either
        assert archive.execute("SELECT text FROM messages WHERE text LIKE 'forged%'").fetchall() == []
        if queued:  # the genuine ones around them were
            assert archive.execute("SELECT count(*) FROM messages WHERE text LIKE 'burst%'").fetchone()[0] > 0


def test_a_publish_after_disconnect_in_the_same_segment_is_not_delivered(broker: ServeInfo) -> None:
    """DISCONNECT ends the client's session: bytes after it in the same segment (a PUBLISH) are
    not a message of that client, on either path."""
    with _subscribed(broker, "bob", b"bob:after", T.user_filter("bob")) as bob:
        for qos in (0, 1):
            with _connect(broker, "mallory", b"mallory:after") as mallory:
                mallory.sendall(
                    publish_packet(DM, chat(f"sent {qos}"), qos=qos, packet_id=1)
                    + DISCONNECT
                    + publish_packet(DM, chat(f"after disconnect {qos}"), qos=qos, packet_id=2)
                )
                _, closed = read_packets(mallory, lambda p: False)
                assert closed
        texts = _texts(_drain(bob))
    assert texts == ["sent 0", "sent 1"]


def test_a_qos2_exchange_completed_just_before_disconnect_is_delivered(broker: ServeInfo) -> None:
    """PUBLISH (QoS 2), its PUBREL and DISCONNECT in one segment: the reader stops at the
    DISCONNECT, but the message released before it is still delivered, each time."""
    with _subscribed(broker, "bob", b"bob:q2", T.user_filter("bob")) as bob:
        for i in range(5):
            with _connect(broker, "mallory", b"mallory:q2") as mallory:
                mallory.sendall(
                    packet(0x34, field(DM) + b"\x00\x05" + chat(f"released {i}"))
                    + packet(0x62, b"\x00\x05")
                    + DISCONNECT
                )
                _, closed = read_packets(mallory, lambda p: False)
                assert closed
        heard: list[str] = []
        deadline = time.monotonic() + 10
        while len(heard) < 5 and time.monotonic() < deadline:  # a flow's delivery may follow the close
            heard += _texts(_drain(bob))
    assert heard == [f"released {i}" for i in range(5)]


def test_a_publish_after_disconnect_over_websocket_is_not_delivered(broker: ServeInfo) -> None:
    """The same over WebSocket, whose reader is amqtt's own loop (it reads on after a DISCONNECT):
    the handler drops a PUBLISH that comes after it."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    assert broker.ws_port is not None
    login = connect_packet(b"mallory:ws", b"mallory", password_of("mallory").encode(), keepalive=0)
    with _subscribed(broker, "bob", b"bob:ws", T.user_filter("bob")) as bob:
        with connect(f"ws://127.0.0.1:{broker.ws_port}/", subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
            ws.send(login)
            assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"
            ws.send(
                publish_packet(DM, chat("ws sent"), qos=0)
                + DISCONNECT
                + publish_packet(DM, chat("ws after disconnect"), qos=0)
            )
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    ws.recv(timeout=2)
        texts = _texts(_drain(bob))
    assert texts == ["ws sent"]


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_a_takeover_mid_stream_closes_the_old_connection_and_does_not_mix_them(broker: ServeInfo, clean: bool) -> None:
    """mallory streams QoS 1 DMs on one connection and takes its client id over from another at
    once: the old connection is closed (MQTT-3.1.4-2; a clean takeover left it open, publishing on),
    the new one is acknowledged for its own message only (no PUBACK of the old one's ids), and bob
    gets each message at most once, in the order sent."""
    with _subscribed(broker, "bob", b"bob:takeover", T.user_filter("bob")) as bob:
        old = _connect(broker, "mallory", b"mallory:same", clean=clean)
        with old:
            old.sendall(
                b"".join(publish_packet(DM, chat(f"old {i}"), qos=1, packet_id=i) for i in range(1, 3 * FAIR_SHARE))
            )
            with _connect(broker, "mallory", b"mallory:same", clean=clean) as new:
                new.sendall(publish_packet(DM, chat("new"), qos=1, packet_id=40000) + PINGREQ)
                got, closed = read_packets(new, lambda p: any(first == PINGRESP for first, _ in p))
                assert not closed
                assert [b for f, b in got if f == 0x40] == [(40000).to_bytes(2, "big")]
                _, old_closed = read_packets(old, lambda p: False)
                assert old_closed
                with contextlib.suppress(OSError):  # the old connection cannot publish as that client any more
                    old.sendall(publish_packet(DM, chat("zombie"), qos=0))
        texts = _texts(_drain(bob))
    assert texts.count("new") == 1
    assert "zombie" not in texts
    olds = [t for t in texts if t.startswith("old")]
    assert olds == sorted(set(olds), key=lambda t: int(t.split()[1]))  # once each, in the order sent


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_the_connection_taken_over_is_told_why_and_the_newer_keeps_the_session(broker: ServeInfo, clean: bool) -> None:
    """Two clients of one device (bob:laptop): the older connection gets a ``taken_over`` notice
    naming its client id on its own notice topic, then its close (its client stops instead of
    taking the session back a second later, docs/PROTOCOL.md §9); the newer one is not told, keeps
    the session and gets bob's DMs, and nothing of the notice is queued in the session."""
    old = _subscribed(broker, "bob", b"bob:laptop", T.user_filter("bob")) if clean else None
    if old is None:
        old = _connect(broker, "bob", b"bob:laptop", clean=False)
        old.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
        assert read_packets(old, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
    with old, _connect(broker, "bob", b"bob:laptop", clean=clean) as new:
        got, closed = read_packets(old, lambda p: False)
        assert closed
        told = [decode_as(payload, Notice) for topic, payload in _publishes(got) if topic == T.notice("bob")]
        assert [(n.code, n.topic) for n in told] == [("taken_over", "bob:laptop")], got
        if clean:  # a clean session starts without subscriptions
            new.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
            assert read_packets(new, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
        with _connect(broker, "alice", b"alice:dm") as alice:
            alice.sendall(publish_packet(T.dm("bob", "alice").encode(), chat("to the newer"), qos=1, packet_id=1))
            assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        got = _drain(new)
        if "to the newer" not in _texts(got):
            got += read_packets(new, lambda p: bool(_texts(p)))[0]
        assert _texts(got) == ["to the newer"]
        assert not [t for t, _ in _publishes(got) if t == T.notice("bob")]


def test_another_users_client_id_cannot_take_over_a_session(broker: ServeInfo) -> None:
    """mallory's CONNECT under alice's client id is refused; alice's connection stays and keeps
    its fast path: her next DM is delivered."""
    with _subscribed(broker, "bob", b"bob:steal", T.user_filter("bob")) as bob:
        with _connect(broker, "alice", b"alice:phone") as alice:
            with socket.create_connection((broker.address.host, broker.address.port), timeout=10) as mallory:
                mallory.sendall(connect_packet(b"alice:phone", b"mallory", password_of("mallory").encode()))
                got, _ = read_packets(mallory, lambda p: len(p) >= 1)
                assert not got or got[0][1][1] != 0
            alice.sendall(publish_packet(T.dm("bob", "alice").encode(), chat("still me"), qos=1, packet_id=1))
            acks, closed = read_packets(alice, lambda p: len(p) >= 1)
            assert not closed and acks == [(0x40, b"\x00\x01")]
        assert _texts(_drain(bob)) == ["still me"]


# ---------------------------------------------------------------- 3. retained records in slices


@pytest.fixture
def statuses(server: ServeInfo, users: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """alice's twelve retained statuses, which the embedded broker sends to a new subscription one
    per loop round (Mosquitto: all at once, before it reads the next packet). On either broker
    (brokers.BOTH, bound in "the same rules on Mosquitto" below), with mallory's account too."""
    users("alice", "mallory")
    monkeypatch.setattr(amqtt_adapter, "RETAINED_SLICE", 1)
    topics = [T.status("alice", f"d{i:02}") for i in range(12)]
    with _connect(server, "alice", b"alice:retainer") as alice:
        for i, topic in enumerate(topics, start=1):
            alice.sendall(packet(0x33, field(topic.encode()) + i.to_bytes(2, "big") + STATUS))
        got, _ = read_packets(alice, lambda p: len(p) >= len(topics))
        assert [f for f, _ in got] == [0x40] * len(topics)
    yield topics
    with _connect(server, "alice", b"alice:retainer") as alice:
        alice.sendall(b"".join(packet(0x31, field(t.encode())) for t in topics))  # cleared
        _drain(alice)


@pytest.fixture
def reader(broker_under_test: brokers.BrokerUnderTest) -> str:
    """A service account that may read statuses, as the presence worker: ``auditor`` on the embedded
    broker, ``presence`` on Mosquitto (deploy/mosquitto/aclfile)."""
    return broker_under_test.add_reader()


def _after(got: list[tuple[int, bytes]], first: int, nth: int = 1) -> list[tuple[int, bytes]]:
    """The packets after the ``nth`` of type ``first``."""
    seen = 0
    for i, (f, _) in enumerate(got):
        seen += f == first
        if seen == nth:
            return got[i + 1 :]
    raise AssertionError(f"no packet {first:#x} number {nth} in {got}")


def _quiet(sock: socket.socket, seconds: float = 0.5) -> list[tuple[int, bytes]]:
    """What ``sock`` gets up to the PINGRESP of a PINGREQ sent now, and for ``seconds`` more (late slices)."""
    sock.sendall(PINGREQ)
    buf, got = bytearray(), []
    deadline: float | None = None
    while (left := 10.0 if deadline is None else deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
        while (header := decode_length(buf, 1)) is not None and len(buf) >= header[1] + header[0]:
            length, i = header
            got.append((buf[0], bytes(buf[i : i + length])))
            del buf[: i + length]
        if deadline is None and any(first == PINGRESP for first, _ in got):
            deadline = time.monotonic() + seconds
    sock.settimeout(10)
    return got


def test_no_retained_record_arrives_after_the_unsubscribe(server: ServeInfo, statuses: list[str], reader: str) -> None:
    """SUBSCRIBE then UNSUBSCRIBE in one write: the slices stop at the UNSUBACK (MQTT-3.10.4-2:
    no new messages for that subscription), at most one slice already on its way after it."""
    status_filter = b"im/status/alice/+"
    with _connect(server, reader, f"{reader}:unsub".encode()) as auditor:
        auditor.sendall(
            packet(0x82, b"\x00\x01" + field(status_filter) + b"\x01")
            + packet(0xA2, b"\x00\x02" + field(status_filter))
        )
        got = _quiet(auditor)
    assert (0xB0, b"\x00\x02") in got
    late = _publishes(_after(got, 0xB0))
    assert len(late) <= 1, f"{len(late)} retained records after the UNSUBACK"


def test_a_resubscription_mid_slices_gets_each_record_once_more(
    server: ServeInfo, statuses: list[str], reader: str
) -> None:
    """SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE in one write: after the second SUBACK each record comes
    once (MQTT-3.8.4-3 sends them again), not once per subscription ever made."""
    status_filter = b"im/status/alice/+"
    subscribe = packet(0x82, b"\x00\x01" + field(status_filter) + b"\x01")
    with _connect(server, reader, f"{reader}:resub".encode()) as auditor:
        auditor.sendall(subscribe + packet(0xA2, b"\x00\x02" + field(status_filter)) + subscribe)
        got = _quiet(auditor)
    late = [t for t, _ in _publishes(_after(got, 0x90, 2))]
    assert set(late) == set(statuses)  # every record, after the new subscription
    assert len(late) <= len(statuses) + 1, f"{len(late) - len(statuses)} duplicates"


def test_retained_records_in_slices_reach_only_whom_the_acl_lets_read_them(
    server: ServeInfo, statuses: list[str]
) -> None:
    """mallory subscribes to alice's statuses in every form a filter allows (only the workers
    may read statuses): whatever filter the broker grants, each record of each slice is checked
    as it goes, and none of alice's reaches her."""
    filters = [b"im/status/alice/+", b"im/status/+/+", b"im/+/alice/+", b"im/#", b"#", b"+/+/+/+"]
    with _connect(server, "mallory", b"mallory:slices") as mallory:
        mallory.sendall(packet(0x82, b"\x00\x01" + b"".join(field(f) + b"\x01" for f in filters)))
        got = _quiet(mallory)
    assert [t for t, _ in _publishes(got) if t.startswith("im/status/")] == []


# ---------------------------------------------------------------- 4. rate notices


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInfo]:
    """A broker with a chat rate of one message a second (a burst of two)."""
    settings = BrokerSettings(
        data_dir=tmp_path_factory.mktemp("slow") / "data", port=0, limits=Limits(publish_rate=1.0, publish_burst=2)
    )
    with BackgroundServer(settings, workers=False) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob", "mallory"):
            store.add(name, password_of(name))
        yield info


def _notices(got: list[tuple[int, bytes]]) -> list[Notice]:
    return [decode_as(payload, Notice) for topic, payload in _publishes(got) if topic.endswith("/notice")]


def test_a_request_flood_on_anothers_topics_is_told_to_the_flooder_alone_and_bounded(slow: ServeInfo) -> None:
    """mallory floods requests under bob's name (``im/request/bob/<id>``), under her own, and with
    correlation ids no notice may carry (10,000 characters): bob and alice hear nothing; mallory's
    notices are few (one a second, ten more about requests, one aggregated a second), each names
    only ids she sent, at most ``MAX_NOTICE_REQUESTS``, and none carries the long ids."""
    bobs = [f"b{i:05}" for i in range(600)]
    hers = [f"m{i:05}" for i in range(600)]
    long_ids = ["x" * 10_000 + str(i) for i in range(20)]
    bob = _subscribed(slow, "bob", b"bob:flood", T.user_filter("bob"))
    alice = _subscribed(slow, "alice", b"alice:flood", T.user_filter("alice"))
    mallory = _subscribed(slow, "mallory", b"mallory:flood", T.user_filter("mallory"))
    with bob, alice, mallory:
        flood = b"".join(publish_packet(f"im/request/bob/{c}".encode(), b"{}", qos=0) for c in bobs)
        flood += b"".join(publish_packet(f"im/request/mallory/{c}".encode(), b"{}", qos=0) for c in hers)
        flood += b"".join(publish_packet(f"im/request/mallory/{c}".encode(), b"{}", qos=0) for c in long_ids)
        mallory.sendall(flood)
        got = _quiet(mallory, 2.5)  # the aggregated notice comes a second after the first request held
        others = _publishes(_quiet(bob, 0)) + _publishes(_quiet(alice, 0))
    assert others == []
    notices = _notices(got)
    assert 1 <= len(notices) <= 2 * (1 + REQUEST_NOTICES + 1)
    named = [c for n in notices for c in (n.requests or [])]
    assert any(n.requests for n in notices), "the requests held beyond the notices were not named"
    assert all(len(n.requests or []) <= MAX_NOTICE_REQUESTS for n in notices)
    assert set(named) <= set(bobs) | set(hers)
    assert sum(len(p) for f, p in got if f >> 4 == 3) < 200_000  # bounded whatever the flood's size


# ---------------------------------------------------------------- the same rules on Mosquitto
# ``server`` and ``users`` (brokers.BOTH) run a test on the embedded broker and on Mosquitto: the
# tests below, and above the retained slices (``statuses``), every takeover, and a resumed session's
# copies (DUP, SUBSCRIBE answered meanwhile). The rest of this file is about the embedded broker's
# own reader and notices.

broker_kind, broker_under_test, server, users = brokers.BOTH


def test_a_publish_after_disconnect_is_dropped_on_either_broker(server: ServeInfo, users: Callable[..., None]) -> None:
    users("alice", "bob")
    with _subscribed(server, "bob", b"bob:bye", T.user_filter("bob")) as bob:
        with _connect(server, "alice", b"alice:bye") as alice:
            alice.sendall(
                publish_packet(T.dm("bob", "alice").encode(), chat("sent"), qos=1, packet_id=1)
                + DISCONNECT
                + publish_packet(T.dm("bob", "alice").encode(), chat("after disconnect"), qos=1, packet_id=2)
            )
            _, closed = read_packets(alice, lambda p: False)
            assert closed
        assert _texts(_drain(bob)) == ["sent"]


def test_a_takeover_closes_the_old_connection_on_either_broker(server: ServeInfo, users: Callable[..., None]) -> None:
    """MQTT-3.1.4-2, clean session both times: the old connection is closed, and what it sends
    after the takeover is not delivered."""
    users("alice", "bob")
    with _subscribed(server, "bob", b"bob:kick", T.user_filter("bob")) as bob:
        with _connect(server, "alice", b"alice:kick") as old, _connect(server, "alice", b"alice:kick") as new:
            _, old_closed = read_packets(old, lambda p: False)
            assert old_closed
            with contextlib.suppress(OSError):
                old.sendall(publish_packet(T.dm("bob", "alice").encode(), chat("zombie"), qos=0))
            new.sendall(publish_packet(T.dm("bob", "alice").encode(), chat("new"), qos=1, packet_id=1))
            acks, _ = read_packets(new, lambda p: len(p) >= 1)
            assert acks == [(0x40, b"\x00\x01")]
        assert _texts(_drain(bob)) == ["new"]


def test_a_publisher_held_back_by_its_own_output_keeps_order_and_identity(broker: ServeInfo) -> None:
    """mallory publishes QoS 0 and 1 to a room she is subscribed to and does not read: her own
    copies fill her output until the broker stops reading her (output.ReadGate), so what she
    sent waits in the reader's buffer (``_held``) and the fast and queued paths alternate. bob,
    who reads, gets every message once, in order; mallory her PUBACKs in order; forged lines
    as bob among them reach nobody."""
    import threading

    room = "im/room/held"
    n, big = 1200, "y" * 3000
    data = bytearray()
    acks = []
    for i in range(1, n + 1):
        if i % 100 == 50:
            data += publish_packet(f"{room}/bob".encode(), chat(f"forged {i}"), qos=1, packet_id=i)
            acks.append(i)
            continue
        data += publish_packet(f"{room}/mallory".encode(), chat(f"held {i} {big}"), qos=i % 2, packet_id=i)
        acks += [i] if i % 2 else []
    assert broker.broker is not None
    output = broker.broker.output
    readable, paused = output.readable, []

    def counted(writer: Any) -> bool:
        ok: bool = readable(writer)
        paused.extend([] if ok else [1])
        return ok

    bob = _subscribed(broker, "bob", b"bob:held", f"{room}/+")
    output.readable = counted  # type: ignore[method-assign]  # mallory's reader asks through it
    try:
        mallory = _subscribed(broker, "mallory", b"mallory:held", f"{room}/+", window=4096)
    finally:
        del output.readable
    with bob, mallory:
        sender = threading.Thread(target=mallory.sendall, args=(bytes(data),))
        sender.start()
        time.sleep(1.0)  # mallory reads nothing meanwhile
        heard, got = _quiet(bob, 0.1), []
        while len(_texts(heard)) < n - n // 100:
            more = _quiet(bob, 0.1)
            if not more[:-1]:  # only the barrier's PINGRESP: nothing more came
                mine = _quiet(mallory, 0.1)  # read her side so the broker reads her again
                got += mine
                if not mine[:-1]:
                    break
            heard += more
        sender.join(30)
        got += _quiet(mallory, 1.0)
    texts = [t.split()[0] + " " + t.split()[1] for t in _texts(heard)]
    want = [f"held {i}" for i in range(1, n + 1) if i % 100 != 50]
    assert texts == want
    assert [int.from_bytes(b, "big") for f, b in got if f == 0x40] == acks
    assert paused, "the broker never stopped reading mallory: the held path was not taken"


def test_a_record_cleared_between_slices_is_not_sent_after_its_clearing(
    server: ServeInfo, statuses: list[str], reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slices of a new subscription go 50 ms apart; alice clears half her statuses meanwhile.
    In the subscriber's stream, once a record's clearing has come, no retained copy of it follows
    (each slice takes the table as it is when it goes)."""

    async def slowly(topics: list[str], size: int, send: Callable[[list[str]], None], going: Any) -> None:
        for start in range(0, len(topics), size):
            await asyncio.sleep(0.05)
            if not going():
                return
            send(topics[start : start + size])

    monkeypatch.setattr(amqtt_adapter, "send_in_slices", slowly)
    cleared = statuses[6:]
    with _connect(server, reader, f"{reader}:cleared".encode()) as auditor:
        auditor.sendall(packet(0x82, b"\x00\x01" + field(b"im/status/alice/+") + b"\x01"))
        with _connect(server, "alice", b"alice:clearer") as alice:
            alice.sendall(b"".join(packet(0x33, field(t.encode()) + b"\x00\x01") for t in cleared))
            acks, _ = read_packets(alice, lambda p: len(p) >= len(cleared))
            assert len(acks) == len(cleared)
        got = _quiet(auditor, 1.0)
    stream = [
        (first, *topic_payload)
        for (first, _), topic_payload in zip([g for g in got if g[0] >> 4 == 3], _publishes(got), strict=True)
    ]
    for topic in cleared:
        cleared_at = next((i for i, (_, t, p) in enumerate(stream) if t == topic and not p), None)
        assert cleared_at is not None, f"the clearing of {topic} never came"
        stale = [i for i, (first, t, p) in enumerate(stream) if t == topic and first & 0x01 and i > cleared_at]
        assert not stale, f"{topic} sent retained after it was cleared"


# ---------------------------------------------------------------- any mix, any segmentation

mixes = st.lists(st.one_of(st.integers(0, 1), st.sampled_from(sorted(BAD))), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixes, st.lists(st.integers(1, 400), max_size=8))
def test_any_mix_in_any_segments_delivers_exactly_what_came_before_the_first_malformed_packet(
    broker: ServeInfo, mix: list[int | str], cuts: list[int]
) -> None:
    """mallory's DMs (QoS 0 or 1) and malformed PUBLISHes in any order, written in segments cut
    anywhere: bob gets the DMs before the first malformed one, in order, and none after it; the
    connection is closed if there was one. The same verdict whatever the reads see of it."""
    data, expected, bad = bytearray(), [], False
    for n, item in enumerate(mix):
        if isinstance(item, str):
            data += BAD[item]
            bad = True
            continue
        data += publish_packet(DM, chat(f"mix {n}"), qos=item, packet_id=n + 1)
        if not bad:
            expected.append(f"mix {n}")
    data += PINGREQ
    with _subscribed(broker, "bob", b"bob:mix", T.user_filter("bob")) as bob:
        with _connect(broker, "mallory", b"mallory:mix") as mallory:
            start = 0
            for cut in [*sorted({c for c in cuts if c < len(data)}), len(data)]:
                try:
                    mallory.sendall(data[start:cut])
                except OSError:  # closed already: the verdict came
                    break
                start = cut
                time.sleep(0.001)
            _, closed = read_packets(mallory, lambda p: not bad and any(f == PINGRESP for f, _ in p))
        texts = _texts(_drain(bob))
    assert closed == bad
    assert texts == expected


@pytest.mark.parametrize("modes", ["ppp", "cp", "pcp"])
def test_every_takeover_closes_the_connection_before_it_and_the_last_one_lives_on(
    server: ServeInfo, users: Callable[..., None], modes: str
) -> None:
    """Connections one after another under one client id, clean (c) or persistent (p): each new
    one closes the one before (a resumed session's end marked the session disconnected, so a
    third CONNECT let the second live on beside it, and the sweep of ended clean sessions forgot
    a clean one a persistent CONNECT had resumed, closing the new connection). The last one stays,
    past a sweep, and gets its DMs."""
    users("mallory", "bob")
    conns: list[socket.socket] = []
    try:
        for mode in modes:
            conns.append(_connect(server, "mallory", b"mallory:many", clean=mode == "c"))
            for old in conns[:-1]:
                old.settimeout(5)
                _, closed = read_packets(old, lambda p: False)
                assert closed, "an earlier connection lives on beside the new one"
        last = conns[-1]
        last.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("mallory").encode()) + b"\x01"))
        got, closed = read_packets(last, lambda p: len(p) >= 1)
        assert got == [(0x90, b"\x00\x01\x01")]
        time.sleep(1.5)  # past a round of the ended sessions' sweep (session_sweep.EndedSessions)
        with _connect(server, "bob", b"bob:many") as bob:
            bob.sendall(publish_packet(T.dm("mallory", "bob").encode(), chat("still here"), qos=1, packet_id=1))
            assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        got, closed = read_packets(last, lambda p: len(p) >= 1)
        assert not closed
        assert _texts(got) == ["still here"]
    finally:
        for sock in conns:
            sock.close()


# ---------------------------------------------------------------- a resumed session's unacknowledged copies


def _unacknowledged_dm(server: ServeInfo, client_id: bytes, text: str) -> int:
    """bob (persistent ``client_id``) subscribed; mallory DMs him ``text``; bob reads the copy and
    drops his connection without its PUBACK. The copy's packet id."""
    bob = _connect(server, "bob", client_id, clean=False)
    with bob:
        bob.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
        with _connect(server, "mallory", client_id.replace(b"bob", b"mallory")) as mallory:
            mallory.sendall(publish_packet(T.dm("bob", "mallory").encode(), chat(text), qos=1, packet_id=1))
            assert read_packets(mallory, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        got, _ = read_packets(bob, lambda p: bool(_texts(p)))
        assert _texts(got) == [text]
        first, body = got[-1]
        assert first & 0x06 == 0x02 and not first & 0x08  # QoS 1, not DUP
        n = int.from_bytes(body[:2], "big")
        return int.from_bytes(body[2 + n : 4 + n], "big")


def _resume(
    server: ServeInfo, client_id: bytes, then: bytes = PINGREQ
) -> tuple[socket.socket, list[tuple[int, bytes]]]:
    """bob's persistent ``client_id`` resumed, ``then`` in the same write; everything he gets up
    to the answer to ``then`` (a PINGRESP or a SUBACK; whatever came with the CONNACK included)."""
    sock = socket.create_connection((server.address.host, server.address.port), timeout=4)
    body = connect_packet(client_id, b"bob", password_of("bob").encode(), keepalive=0)
    body = body[:9] + bytes([body[9] & ~0x02]) + body[10:]  # the connect flags: no clean session
    sock.sendall(body + then)
    answer = PINGRESP if then == PINGREQ else 0x90
    got, closed = read_packets(sock, lambda p: any(first == answer for first, _ in p))
    assert not closed and got[0] == (0x20, b"\x01\x00"), got  # session present
    return sock, got


def test_a_copy_left_unacknowledged_comes_again_when_the_session_resumes(
    server: ServeInfo, users: Callable[..., None]
) -> None:
    """MQTT-4.4.0-1: a QoS 1 copy written to a persistent session's connection that ended before
    its PUBACK (a phone losing its network) is sent again, same packet id, DUP set, when the session
    resumes; once acknowledged, never again. The broker forgot it with the connection before."""
    users("bob", "mallory")
    packet_id = _unacknowledged_dm(server, b"bob:resume", "are you there")
    bob, got = _resume(server, b"bob:resume")
    with bob:
        got += _drain(bob)  # the PINGREQ may be answered before the session's copies go again
        assert _texts(got) == ["are you there"]
        first, body = next((first, body) for first, body in got if first >> 4 == 3)
        n = int.from_bytes(body[:2], "big")
        assert first & 0x08, "sent again without DUP"
        assert int.from_bytes(body[2 + n : 4 + n], "big") == packet_id
        bob.sendall(b"\x40\x02" + packet_id.to_bytes(2, "big"))
        assert _texts(_drain(bob)) == []
    bob, got = _resume(server, b"bob:resume")  # acknowledged: not again
    with bob:
        assert _texts(got + _drain(bob)) == []


def test_a_resumed_session_answers_a_subscribe_while_its_old_copy_waits(
    server: ServeInfo, users: Callable[..., None]
) -> None:
    """The copy sent again on resume is not waited for before the connection's SUBSCRIBEs are
    answered: amqtt waited up to 5 s for its PUBACK while the reader waited for the SUBACK before
    reading that PUBACK (every imcli command subscribes at once: CI saw a session that changed hands
    again meanwhile never answered). The client here never acknowledges the copy; the SUBACK comes
    (well before amqtt's 5 s: the socket's 4 s bound) and the copy stays unacknowledged for later."""
    users("bob", "mallory")
    _unacknowledged_dm(server, b"bob:busy", "still waiting")
    subscribe = packet(0x82, b"\x00\x07" + field(T.user_filter("bob").encode()) + b"\x01")
    bob, got = _resume(server, b"bob:busy", then=subscribe)
    with bob:
        assert (0x90, b"\x00\x07\x01") in got
        assert _texts(got) == ["still waiting"]
    bob, got = _resume(server, b"bob:busy")  # never acknowledged: comes again
    with bob:
        assert _texts(got + _drain(bob)) == ["still waiting"]


def test_pubacks_alone_in_a_read_settle_their_copies_and_a_packet_id_0_still_closes(broker: ServeInfo) -> None:
    """PUBACKs that come alone in a read while bob's reader waits are settled where the transport
    hands them over (``PacketReader._arrived``, issue 21), with the reader's own rules: three copies
    acknowledged in one segment (with one more PUBACK, for no copy at all), the last thing bob sends
    before his connection drops, never come again when the session resumes; a PUBACK of packet id 0
    (MQTT-2.3.1-1) alone in its read closes the connection."""
    bob = _connect(broker, "bob", b"bob:acks", clean=False)
    with bob:
        bob.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
        with _connect(broker, "mallory", b"mallory:acks") as mallory:
            for i in (1, 2, 3):
                mallory.sendall(publish_packet(T.dm("bob", "mallory").encode(), chat(f"dm {i}"), qos=1, packet_id=i))
            assert len(read_packets(mallory, lambda p: len(p) >= 3)[0]) == 3
        got, _ = read_packets(bob, lambda p: len(_texts(p)) >= 3)
        assert _texts(got) == ["dm 1", "dm 2", "dm 3"]
        ids = []
        for first, body in got:
            if first >> 4 == 3:
                n = int.from_bytes(body[:2], "big")
                ids.append(body[2 + n : 4 + n])
        bob.sendall(b"".join(b"\x40\x02" + i for i in [*ids, b"\xff\xf0"]))
    bob, got = _resume(broker, b"bob:acks")
    with bob:
        assert _texts(got + _drain(bob)) == []
        bob.sendall(b"\x40\x02\x00\x00")
        assert read_packets(bob, lambda p: False)[1]
