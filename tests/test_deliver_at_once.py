"""A message read while nothing its sender sent before waits is handled by the connection's
reader itself, in the callback that read it (``AckAfterJournal.may_deliver_now``, issue 21: DM
latency); the rest go through the connection's message loop as before. Through raw sockets:
what one client sends keeps its order across both paths, a QoS 1 message is in the archive
before its PUBACK on both, and a message that ends the connection ends it before what follows.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imcli.broker import reader
from imcli.broker.client_loop import FAIR_SHARE
from imcli.core.wire import Topics
from imcli.serve.host import ServeInfo
from tests.brokers import bare_broker, loop_held
from tests.rawmqtt import (
    chat,
    connect_packet,
    field,
    packet,
    password_of,
    publish_packet,
    read_packets,
    signed_in,
    wait_until,
)

T = Topics()
PINGREQ = b"\xc0\x00"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    with bare_broker(tmp_path / "data", "alice", "bob") as info:
        yield info


class Paths:
    """Counts the messages each path handled: the reader's (``deliver_now``, or ``deliver_line`` for
    a QoS 1 chat line: ``lines`` of them), the message loop's."""

    def __init__(self, broker: Any) -> None:
        self.at_once = self.queued = self.lines = 0
        deliver_now, deliver_line, delivery = broker.deliver_now, broker.deliver_line, broker._handle_message_delivery

        async def counted_now(*args: Any) -> bool:
            self.at_once += 1
            result: bool = await deliver_now(*args)
            return result

        async def counted_line(*args: Any) -> bool:
            self.at_once += 1
            self.lines += 1
            result: bool = await deliver_line(*args)
            return result

        broker.deliver_line = counted_line

        async def counted_queued(*args: Any) -> bool:
            self.queued += 1
            result: bool = await delivery(*args)
            return result

        broker.deliver_now, broker._handle_message_delivery = counted_now, counted_queued


def _connect(info: ServeInfo, name: str, client_id: bytes) -> socket.socket:
    sock = signed_in(info.address, name, client_id)
    # until the connection's message loop waits: only then may the reader handle a message at once, and
    # on uvloop the first packets after the CONNACK may be read before it does (libuv reads the sockets
    # before the callbacks the round before made ready, asyncio after them: tests/test_uvloop.py)
    assert wait_until(lambda: _handler_of(info, client_id.decode()).loop_idle)
    return sock


def _bob(info: ServeInfo) -> socket.socket:
    sock = _connect(info, "bob", b"bob:raw")
    sock.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
    got, _ = read_packets(sock, lambda p: len(p) >= 1)
    assert got == [(0x90, b"\x00\x01\x01")]
    return sock


@contextlib.contextmanager
def _alice_to_bob(
    info: ServeInfo,
) -> Iterator[tuple[Paths, bytes, socket.socket, socket.socket, sqlite3.Connection]]:
    """The paths counted, the topic of alice's DMs to bob, bob subscribed, alice connected and the
    archive open (both sockets closed after)."""
    assert info.broker is not None
    paths = Paths(info.broker)
    topic = T.dm("bob", "alice").encode()
    bob = _bob(info)
    archive = sqlite3.connect(info.data_dir / "archive.sqlite3")
    with bob, _connect(info, "alice", b"alice:raw") as alice, archive:
        yield paths, topic, bob, alice, archive


def _texts(got: list[tuple[int, bytes]]) -> list[str]:
    """The chat texts of the PUBLISHes in ``got``, in order (payloads made by ``rawmqtt.chat``)."""
    texts = []
    for first, body in got:
        if first >> 4 == 3:
            start = 2 + int.from_bytes(body[:2], "big") + (2 if first & 0x06 else 0)
            texts.append(body[start:].decode().split('"text":"')[1].split('"')[0])
    return texts


def _handler_of(info: ServeInfo, client_id: str) -> Any:
    assert info.broker is not None
    [handler] = [h for _, h in info.broker._sessions.values() if h.session.client_id == client_id]
    return handler


def _topics_taken(broker: Any, method: str) -> list[str]:
    """The topics ``broker``'s direct path ``method`` (``deliver_file``, ``deliver_line``) is called
    with from now on, in order; each call still does what it did."""
    taken: list[str] = []
    deliver = getattr(broker, method)

    async def counted(session: Any, topic: str, payload: bytes) -> bool:
        taken.append(topic)
        result: bool = await deliver(session, topic, payload)
        return result

    setattr(broker, method, counted)
    return taken


def test_what_one_client_sends_keeps_its_order_across_both_paths(broker: ServeInfo) -> None:
    """One write of more PUBLISHes than a read may handle itself (``FAIR_SHARE``): the first go out
    from the reader, the rest wait for the message loop; then more, one write each. bob gets every
    DM in the order alice sent them, and alice every PUBACK in that order."""
    assert broker.broker is not None
    paths = Paths(broker.broker)
    topic = T.dm("bob", "alice").encode()
    bob = _bob(broker)
    with bob, _connect(broker, "alice", b"alice:raw") as alice:
        burst = 3 * FAIR_SHARE
        lines = [f"line {i}" for i in range(1, burst + 21)]
        alice.sendall(
            b"".join(publish_packet(topic, chat(lines[i - 1]), qos=1, packet_id=i) for i in range(1, burst + 1))
        )
        for i in range(burst + 1, len(lines) + 1):
            alice.sendall(publish_packet(topic, chat(lines[i - 1]), qos=1, packet_id=i))
        acks, _ = read_packets(alice, lambda p: len(p) >= len(lines))
        got, closed = read_packets(bob, lambda p: len(p) >= len(lines))
    assert not closed
    assert acks == [(0x40, i.to_bytes(2, "big")) for i in range(1, len(lines) + 1)]
    assert _texts(got) == lines
    assert paths.at_once >= FAIR_SHARE  # both paths were taken
    assert paths.queued > 0


def test_a_dm_handled_at_once_is_in_the_archive_before_its_puback(broker: ServeInfo) -> None:
    """The reader writes the DM's copies, then journals it, then writes the PUBACK: when alice has
    her PUBACK the archive has the DM (imcli/broker/journal.py), on this path as on the other."""
    with _alice_to_bob(broker) as (paths, topic, bob, alice, archive):
        for i in range(1, 21):
            alice.sendall(publish_packet(topic, chat(f"kept {i}"), qos=1, packet_id=i))
            acks, _ = read_packets(alice, lambda p: len(p) >= 1)
            assert acks == [(0x40, i.to_bytes(2, "big"))]
            rows = archive.execute("SELECT text FROM messages WHERE text = ?", (f"kept {i}",)).fetchall()
            assert rows == [(f"kept {i}",)]
        got, _ = read_packets(bob, lambda p: len(p) >= 20)
    assert _texts(got) == [f"kept {i}" for i in range(1, 21)]
    assert paths.at_once == 20  # alone each time: every one went out from the reader
    assert paths.queued == 0


def test_a_message_that_ends_the_connection_ends_it_before_what_follows(broker: ServeInfo) -> None:
    """A PUBLISH on a ``$`` topic ends its connection (MQTT-4.7.2-1): handled by the reader, the
    DM before it is delivered, and the DM after it, in the same write, never is."""
    topic = T.dm("bob", "alice").encode()
    bob = _bob(broker)
    with bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(
            publish_packet(topic, chat("before"), qos=1, packet_id=1)
            + publish_packet(b"$SYS/broker/x", b"x", qos=1, packet_id=2)
            + publish_packet(topic, chat("after"), qos=1, packet_id=3)
        )
        _, closed = read_packets(alice, lambda p: False)
        assert closed
        bob.sendall(PINGREQ)
        got, _ = read_packets(bob, lambda p: any(first == 0xD0 for first, _ in p))
    assert _texts(got) == ["before"]


def test_the_message_loop_is_idle_again_after_a_message_handled_at_once(broker: ServeInfo) -> None:
    """After a DM handled by the reader, alice's message loop waits idle again (nothing was queued
    for it), and a SUBSCRIBE after the DM is still answered in order."""
    topic = T.dm("bob", "alice").encode()
    bob = _bob(broker)
    with bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(
            publish_packet(topic, chat("hello"), qos=1, packet_id=1)
            + packet(0x82, b"\x00\x02" + field(T.user_filter("alice").encode()) + b"\x01")
            + PINGREQ
        )
        got, _ = read_packets(alice, lambda p: any(first == 0xD0 for first, _ in p))
        assert got == [(0x40, b"\x00\x01"), (0x90, b"\x00\x02\x01"), (0xD0, b"")]
        handler = _handler_of(broker, "alice:raw")
        assert wait_until(lambda: handler.loop_idle)  # its SUBACK's retained messages may still be on their way
        assert not handler.delivering and not handler.refused
        heard, _ = read_packets(bob, lambda p: len(p) >= 1)
    assert _texts(heard) == ["hello"]


def test_a_qos0_dm_is_handled_at_once_and_journalled_as_it_is_delivered(broker: ServeInfo) -> None:
    """QoS 0 takes the same path: delivered from the reader, journalled on delivery (no PUBACK)."""
    with _alice_to_bob(broker) as (paths, topic, bob, alice, archive):
        alice.sendall(publish_packet(topic, chat("quick"), qos=0) + PINGREQ)
        got, _ = read_packets(alice, lambda p: len(p) >= 1)
        assert got == [(0xD0, b"")]
        heard, _ = read_packets(bob, lambda p: len(p) >= 1)
        rows = archive.execute("SELECT text FROM messages WHERE text = 'quick'").fetchall()
    assert _texts(heard) == ["quick"]
    assert rows == [("quick",)]
    assert (paths.at_once, paths.queued) == (1, 0)


def _handled_in_order(info: ServeInfo) -> list[str]:
    """The topics of the messages the broker's readers handle themselves, in the order handled."""
    assert info.broker is not None
    order: list[str] = []
    deliver_now = info.broker.deliver_now

    async def recorded(session: Any, message: Any, acknowledged: bool) -> bool:
        order.append(message.topic)
        result: bool = await deliver_now(session, message, acknowledged)
        return result

    deliver_file = info.broker.deliver_file

    async def recorded_file(session: Any, topic: str, payload: bytes) -> bool:  # a file's chunk (its own path)
        order.append(topic)
        result: bool = await deliver_file(session, topic, payload)
        return result

    deliver_line = info.broker.deliver_line

    async def recorded_line(session: Any, topic: str, payload: bytes) -> bool:  # a QoS 1 chat line (its own path)
        order.append(topic)
        result: bool = await deliver_line(session, topic, payload)
        return result

    info.broker.deliver_now = recorded  # type: ignore[method-assign]
    info.broker.deliver_file = recorded_file
    info.broker.deliver_line = recorded_line
    return order


@pytest.mark.parametrize("bulk", [True, False])
def test_a_chat_message_read_with_a_file_chunk_goes_before_it(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch, bulk: bool
) -> None:
    """A file's chunk and a chat line that the broker's loop finds readable in the same round: the
    chunk's reader lets the chat line's go first (``reader.BULK``, issue 16: chat latency during a
    transfer). alice's chunk is written first, bob's line after it, both while the loop is held, so
    that its next look finds both sockets readable. ``BULK`` is lowered to the test's chunk (the
    sockets' buffers must take it while the loop is held); with it out of reach (``bulk`` false) the
    chunk, read first, is handled first: the order the test asserts is the change's, not chance's."""
    assert broker.broker is not None
    monkeypatch.setattr(reader, "BULK", 4096 if bulk else 1 << 40)
    order = _handled_in_order(broker)
    upload, line = T.upload("alice", "u" * 32), T.room("lobby", "bob")
    with _connect(broker, "alice", b"alice:raw") as alice, _connect(broker, "bob", b"bob:raw") as bob:
        with loop_held(broker):
            alice.sendall(publish_packet(upload.encode(), bytes(8) + bytes(8000), qos=1, packet_id=1))
            bob.sendall(publish_packet(line.encode(), chat("hello"), qos=1, packet_id=1))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
    assert order == ([line, upload] if bulk else [upload, line])


@pytest.mark.parametrize("look", [True, False])
def test_a_chat_message_arriving_as_a_file_chunks_wait_ends_goes_before_it(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch, look: bool
) -> None:
    """A chat line whose bytes arrive while a file's chunk waits its turn (``reader.BULK``): the
    chunk's wakeup comes at the head of a loop round, before the sockets that round reads, so the
    line would be read after the chunk's handling and handled after it; the reader looks whether
    chat is waiting when its wait ends (``chatfirst.ChatFirst``) and, if so, waits once more (issue
    16). The line is sent from the broker's own loop at the chunk's look, and the look waits until
    its socket is readable: it arrives exactly then. With the look answering no (``look`` false),
    the chunk is handled first: the order asserted is the change's."""
    from imcli.broker import chatfirst

    assert broker.broker is not None
    monkeypatch.setattr(reader, "BULK", 4096)
    order = _handled_in_order(broker)
    upload, line = T.upload("alice", "u" * 32), T.room("lobby", "bob")
    real = chatfirst.ChatFirst.chat_waiting
    with _connect(broker, "alice", b"alice:raw") as alice, _connect(broker, "bob", b"bob:raw") as bob:
        sent: list[bool] = []

        def arriving(self: chatfirst.ChatFirst) -> bool:
            if order or sent:  # the chunk's look only
                return real(self)
            sent.append(True)
            bob.sendall(publish_packet(line.encode(), chat("hello"), qos=1, packet_id=1))
            assert wait_until(lambda: real(self))
            return look and real(self)

        monkeypatch.setattr(chatfirst.ChatFirst, "chat_waiting", arriving)
        alice.sendall(publish_packet(upload.encode(), bytes(8) + bytes(8000), qos=1, packet_id=1))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
    assert sent == [True]
    assert order == ([line, upload] if look else [upload, line])


def test_packets_sent_with_the_connect_are_read(broker: ServeInfo) -> None:
    """A SUBSCRIBE and a PINGREQ in the same write as the CONNECT wait in the connection's stream once
    amqtt has read the CONNECT: the reader, which takes the transport's bytes itself from then on,
    takes them from the stream first (``reader.take_buffered``), and answers both, in order."""
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    subscribe = packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01")
    with sock:
        sock.sendall(
            connect_packet(b"bob:raw", b"bob", password_of("bob").encode(), keepalive=0) + subscribe + b"\xc0\x00"
        )
        got, ended = read_packets(sock, lambda p: len(p) >= 3)
    assert got == [(0x20, b"\x00\x00"), (0x90, b"\x00\x01\x01"), (0xD0, b"")]
    assert not ended


def test_a_publish_whose_last_bytes_look_like_pubacks_is_one_publish(broker: ServeInfo) -> None:
    """The last read of a PUBLISH is its payload's tail, whatever it looks like: eight bytes that
    would be two PUBACKs (``40 02 00 01``) arriving while the reader waits for the rest of the packet
    are the rest of the packet, not acknowledgements (``PacketReader._arrived``)."""
    tail = b"\x40\x02\x00\x01\x40\x02\x00\x02"
    payload = b"plain text, then " + tail
    whole = publish_packet(T.room("lobby", "alice").encode(), payload)
    with _connect(broker, "bob", b"bob:raw") as bob, _connect(broker, "alice", b"alice:raw") as alice:
        bob.sendall(packet(0x82, b"\x00\x01" + field(T.room_filter("lobby").encode()) + b"\x00"))
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x00")]
        alice.sendall(whole[: -len(tail)])
        bob.sendall(b"\xc0\x00")  # a round trip through the broker's loop: alice's first bytes are read by then
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0xD0, b"")]
        alice.sendall(tail)
        got, _ = read_packets(bob, lambda p: len(p) >= 1)
        alice.sendall(b"\xc0\x00")
        assert read_packets(alice, lambda p: len(p) >= 1) == ([(0xD0, b"")], False)
    [(first, body)] = got
    assert first == 0x30 and body.endswith(payload)


def _publish_body(body: bytes) -> tuple[str, bytes]:
    """A PUBLISH's topic and payload from its body (QoS 1: a packet id between them)."""
    size = int.from_bytes(body[:2], "big")
    return body[2 : 2 + size].decode(), body[4 + size :]


def test_a_files_chunk_takes_its_own_path_and_every_rule_holds_on_it(tmp_path: Path) -> None:
    """A file's chunk (a QoS 1 PUBLISH of ``reader.BULK`` bytes or more on an upload or file-data
    topic) is handled by ``ImBroker.deliver_file``, not amqtt's packet and message path (issue 16,
    seventh session), under the rules of every PUBLISH, through raw sockets: alice's own upload
    reaches the files worker; one on bob's upload topic, one on a download's topic (the files
    worker's alone to write: a user's payload limit there is every topic's) and one over the chunk
    limit are dropped with a notice; the files
    worker's download reaches bob. Each is acknowledged (PUBACK) in order; a chunk with RETAIN
    goes the general way and is refused there."""
    from imcli.broker.accounts import AccountStore
    from imcli.core.rules import FILES_ACCOUNT

    upload, stream = "u" * 32, "s" * 32
    chunk = bytes(8) + bytes(range(256)) * 400  # 102,408 bytes: over BULK, under the chunk limit
    with bare_broker(tmp_path / "data", "alice", "bob") as info:
        assert info.broker is not None
        AccountStore(info.data_dir).ensure_service(FILES_ACCOUNT, password_of(FILES_ACCOUNT))
        taken = _topics_taken(info.broker, "deliver_file")
        paths = Paths(info.broker)
        files = _connect(info, FILES_ACCOUNT, b"files:raw")
        bob = _bob(info)
        alice = _connect(info, "alice", b"alice:raw")
        with files, bob, alice:
            for sock, topic_filter in ((files, T.upload_filter()), (alice, T.notice("alice"))):
                sock.sendall(packet(0x82, b"\x00\x09" + field(topic_filter.encode()) + b"\x01"))
                assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x09\x01")]
            alice.sendall(
                publish_packet(T.upload("alice", upload).encode(), chunk, qos=1, packet_id=1)
                + publish_packet(T.upload("bob", upload).encode(), chunk, qos=1, packet_id=2)
                + publish_packet(T.file_data("bob", stream).encode(), chunk, qos=1, packet_id=3)
                + publish_packet(T.upload("alice", upload).encode(), bytes(262_145), qos=1, packet_id=4)
                + bytes((0x33,)) + publish_packet(T.upload("alice", upload).encode(), chunk, qos=1, packet_id=5)[1:]
            )  # fmt: skip
            got, _ = read_packets(alice, lambda p: sum(first == 0x40 for first, _ in p) >= 5 and len(p) >= 9)
            files.sendall(publish_packet(T.file_data("bob", stream).encode(), chunk, qos=1, packet_id=7) + PINGREQ)
            uploads, _ = read_packets(files, lambda p: any(first == 0xD0 for first, _ in p))
            heard, _ = read_packets(bob, lambda p: len(p) >= 1)
    acks = [body for first, body in got if first == 0x40]
    assert acks == [i.to_bytes(2, "big") for i in (1, 2, 3, 4, 5)]
    notices = [_publish_body(body)[1].decode() for first, body in got if first >> 4 == 3]
    assert len(notices) == 4
    assert "you may not publish to " + T.upload("bob", upload) in notices[0]
    assert '"too_large"' in notices[1] and "16384" in notices[1]  # a user's limit there: every payload's
    assert '"too_large"' in notices[2] and "262145" in notices[2]
    assert "retained messages are not allowed" in notices[3]
    assert [_publish_body(body) for first, body in uploads if first >> 4 == 3] == [(T.upload("alice", upload), chunk)]
    assert (0x40, b"\x00\x07") in uploads
    assert [_publish_body(body) for first, body in heard] == [(T.file_data("bob", stream), chunk)]
    # the four chunks without RETAIN and the files worker's took the new path; the retained one did not
    assert taken == [
        T.upload("alice", upload), T.upload("bob", upload), T.file_data("bob", stream), T.upload("alice", upload),
        T.file_data("bob", stream),
    ]  # fmt: skip
    assert paths.at_once == 1 and paths.queued == 0


def test_a_chat_line_takes_its_own_path_and_every_rule_holds_on_it(broker: ServeInfo) -> None:
    """A QoS 1 chat line (neither DUP nor RETAIN, on a room's, DM's or group's topic) read while
    ``may_deliver_now`` is handled by ``ImBroker.deliver_line``, not amqtt's packet and message path
    (issue 16, ninth session), under the rules of every PUBLISH, through raw sockets: alice's room
    line reaches bob, her DM reaches bob and her own other devices (the sent copy), a line under
    bob's name and a DM over the size limit are dropped with a notice; each is acknowledged in order,
    after its row is in the archive (the two delivered only); a retained line goes the general way
    and is refused there."""
    assert broker.broker is not None
    taken = _topics_taken(broker.broker, "deliver_line")
    room, forged, dm = T.room("lobby", "alice"), T.room("lobby", "bob"), T.dm("bob", "alice")
    bob = _bob(broker)
    archive = sqlite3.connect(broker.data_dir / "archive.sqlite3")
    with bob, _connect(broker, "alice", b"alice:raw") as alice, archive:
        for sock, topic_filter in ((bob, T.room_filter("lobby")), (alice, T.user_filter("alice"))):
            sock.sendall(packet(0x82, b"\x00\x09" + field(topic_filter.encode()) + b"\x01"))
            assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x09\x01")]
        alice.sendall(
            publish_packet(room.encode(), chat("to the room"), qos=1, packet_id=1)
            + publish_packet(dm.encode(), chat("to bob"), qos=1, packet_id=2)
            + publish_packet(forged.encode(), chat("as bob"), qos=1, packet_id=3)
            + publish_packet(dm.encode(), chat("x" * 16400), qos=1, packet_id=4)
            + bytes((0x33,)) + publish_packet(room.encode(), chat("kept forever"), qos=1, packet_id=5)[1:]
        )  # fmt: skip
        got, _ = read_packets(alice, lambda p: sum(first == 0x40 for first, _ in p) >= 5 and len(p) >= 9)
        rows = archive.execute("SELECT text FROM messages ORDER BY rowid").fetchall()
        heard, _ = read_packets(bob, lambda p: len(p) >= 2)
    acks = [body for first, body in got if first == 0x40]
    assert acks == [i.to_bytes(2, "big") for i in (1, 2, 3, 4, 5)]
    assert rows == [("to the room",), ("to bob",)]  # committed before the first PUBACK went
    published = [_publish_body(body) for first, body in got if first >> 4 == 3]
    assert [topic for topic, _ in published] == [T.sent("alice", "bob")] + [T.notice("alice")] * 3
    notices = [payload.decode() for _, payload in published[1:]]
    assert "you may not publish to " + forged in notices[0]
    assert '"too_large"' in notices[1] and "16384" in notices[1]
    assert "retained messages are not allowed" in notices[2]
    assert _texts(heard) == ["to the room", "to bob"]
    assert taken == [room, dm, forged, dm]  # the retained line did not take the new path


@pytest.mark.parametrize("look", [True, False])
def test_a_chat_message_arriving_during_a_file_chunks_checks_goes_before_its_fan_out(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch, look: bool
) -> None:
    """A chat line whose bytes arrive while a file's chunk is being read and checked on its own path
    (``ImBroker.deliver_file``): before the chunk's fan-out the broker looks whether chat waits
    (``chatfirst.ChatFirst``) and, if so, lets it be read and fanned out first (issue 16, seventh
    session). The line is sent from the broker's own loop at that look, which waits until its
    socket is readable; with the look answering no (``look`` false), the chunk is fanned out first:
    the order asserted is the change's. Orders are those of ``FanOut.publish``."""
    from imcli.broker import chatfirst

    assert broker.broker is not None
    monkeypatch.setattr(reader, "BULK", 4096)
    fanned: list[str] = []
    publish = broker.broker.fan_out.publish

    async def recorded(broadcast: dict[str, Any]) -> None:
        fanned.append(broadcast["topic"])
        await publish(broadcast)

    monkeypatch.setattr(broker.broker.fan_out, "publish", recorded)
    upload, line = T.upload("alice", "u" * 32), T.room("lobby", "bob")
    real = chatfirst.ChatFirst.chat_waiting
    with _connect(broker, "alice", b"alice:raw") as alice, _connect(broker, "bob", b"bob:raw") as bob:
        looks: list[str] = []

        def arriving(self: chatfirst.ChatFirst) -> bool:
            looks.append("look")
            if len(looks) != 2:  # the reader's look when the chunk's wait ends; the writes' looks
                return real(self)
            bob.sendall(publish_packet(line.encode(), chat("hello"), qos=1, packet_id=1))
            assert wait_until(lambda: real(self))
            return look and real(self)

        monkeypatch.setattr(chatfirst.ChatFirst, "chat_waiting", arriving)
        alice.sendall(publish_packet(upload.encode(), bytes(8) + bytes(8000), qos=1, packet_id=1))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
    assert fanned == ([line, upload] if look else [upload, line])


def test_only_a_files_chunk_marks_a_connection_as_a_transfers(
    broker: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chatfirst.ChatFirst.bulk``: the sockets whose readable bytes are not chat. A big DM (or a
    ``who`` reply for many users) is chat all the same: neither its sender's nor its receiver's
    connection becomes a transfer's (their chat lines would wait behind chunks), whatever its size;
    a chunk on an upload topic marks its sender's. ``BULK`` and ``CHUNK`` are lowered so that the
    DM is over both."""
    from imcli.broker import chatfirst, fanout

    assert broker.broker is not None
    monkeypatch.setattr(reader, "BULK", 4096)
    monkeypatch.setattr(fanout, "CHUNK", 4096)
    look = chatfirst.for_loop(broker.broker._loop)  # amqtt private: the broker's loop
    with _connect(broker, "alice", b"alice:raw") as alice, _bob(broker) as bob:
        fds = {name: chatfirst.fileno(_handler_of(broker, f"{name}:raw").reader.transport) for name in ("alice", "bob")}
        big = chat("x" * 8000)
        alice.sendall(publish_packet(T.dm("bob", "alice").encode(), big, qos=1, packet_id=1))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x01")]
        got, _ = read_packets(bob, lambda p: len(p) >= 1)
        assert [kind & 0xF0 for kind, _ in got] == [0x30] and got[0][1].endswith(big)
        after_dm = look.bulk & set(fds.values())
        upload = T.upload("alice", "u" * 32).encode()
        alice.sendall(publish_packet(upload, bytes(8) + bytes(8000), qos=1, packet_id=2))
        assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, b"\x00\x02")]
        after_chunk = look.bulk & set(fds.values())
    assert after_dm == set()
    assert after_chunk == {fds["alice"]}
