"""The journal's rows are written by a thread of their own, a transaction per batch, and nothing the
broker answers a client goes out before every row recorded until then is committed
(imcli/broker/journal.py, issue 21). Through raw sockets, with the writer's commit held: the copies
are delivered, the sender's PUBACKs (and a PINGRESP after them) wait for the commit and then come in
order; rows that come while a commit runs share the next one; a batch that fails acknowledges none
of its messages. A ``kill -9`` after the PUBACKs: tests/test_durability.py.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from amqtt.session import ApplicationMessage

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.journal import Journal
from imcli.core.wire import Received, Topics
from imcli.serve.host import ServeInfo
from tests.brokers import bare_broker
from tests.rawmqtt import (
    chat,
    field,
    login,
    packet,
    password_of,
    publish_packet,
    read_packets,
    signed_in,
    wait_until,
)

T = Topics()
PINGREQ = b"\xc0\x00"
WAIT = 30.0  # seconds a held commit waits at most (the test releases it long before)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    with bare_broker(tmp_path / "data", "alice", "bob") as info:
        yield info


class HeldWriter:
    """The journal's ``add_many`` with each batch recorded, held until ``release`` (the writer's thread
    waits in it, as in a slow commit), and failing once if ``fail`` is set."""

    def __init__(self, info: ServeInfo) -> None:
        assert info.broker is not None
        store: Any = info.broker._journal.store
        self.batches: list[int] = []
        self.entered = threading.Event()  # the writer has a batch in hand
        self.released = threading.Event()
        self.fail = False
        add_many = store.add_many

        def held(items: Sequence[tuple[Received, float]]) -> None:
            self.batches.append(len(items))
            self.entered.set()
            assert self.released.wait(WAIT)
            if self.fail:
                self.fail = False
                raise sqlite3.OperationalError("database or disk is full")
            add_many(items)

        store.add_many = held

    def release(self) -> None:
        self.released.set()


def _connect(info: ServeInfo, name: str, client_id: bytes) -> socket.socket:
    return signed_in(info.address, name, client_id)


def _bob(info: ServeInfo) -> socket.socket:
    sock = _connect(info, "bob", b"bob:raw")
    sock.sendall(packet(0x82, b"\x00\x01" + field(T.user_filter("bob").encode()) + b"\x01"))
    got, _ = read_packets(sock, lambda p: len(p) >= 1)
    assert got == [(0x90, b"\x00\x01\x01")]
    return sock


def _texts(got: list[tuple[int, bytes]]) -> list[str]:
    texts = []
    for first, body in got:
        if first >> 4 == 3:
            start = 2 + int.from_bytes(body[:2], "big") + (2 if first & 0x06 else 0)
            texts.append(body[start:].decode().split('"text":"')[1].split('"')[0])
    return texts


def _kept(info: ServeInfo) -> list[str]:
    with sqlite3.connect(info.data_dir / "archive.sqlite3") as archive:
        return [text for (text,) in archive.execute("SELECT text FROM messages ORDER BY seq")]


def _nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def test_pubacks_and_a_later_answer_wait_for_the_commit_of_their_rows(broker: ServeInfo) -> None:
    """Two DMs and a PINGREQ in one write while the writer's commit is held: bob has both DMs, the
    broker answers bob's own PINGREQ, and alice has nothing yet (before this rule her PUBACKs went out
    with the DMs' copies) and the archive neither; once the commit goes, alice gets PUBACK 1, PUBACK 2,
    then the PINGRESP, and both rows are there."""
    writer = HeldWriter(broker)
    topic = T.dm("bob", "alice").encode()
    with _bob(broker) as bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(
            publish_packet(topic, chat("one"), qos=1, packet_id=1)
            + publish_packet(topic, chat("two"), qos=1, packet_id=2)
            + PINGREQ
        )
        heard, _ = read_packets(bob, lambda p: len(p) >= 2)
        assert _texts(heard) == ["one", "two"]  # delivered: the copies do not wait for the journal
        assert writer.entered.wait(WAIT)
        bob.sendall(PINGREQ)  # the broker's loop has gone on meanwhile
        pong, _ = read_packets(bob, lambda p: len(p) >= 1)
        assert pong == [(0xD0, b"")]
        assert _nothing_to_read(alice)
        assert _kept(broker) == []
        writer.release()
        got, _ = read_packets(alice, lambda p: len(p) >= 3)
    assert got == [(0x40, b"\x00\x01"), (0x40, b"\x00\x02"), (0xD0, b"")]
    assert _kept(broker) == ["one", "two"]
    assert sum(writer.batches) == 2


def test_a_ping_alone_in_its_read_waits_for_the_pubacks_before_it(broker: ServeInfo) -> None:
    """Two DMs handled, their PUBACKs waiting for the held commit, then a PINGREQ alone in a later
    read: it is not answered at once in the transport's callback (``PacketReader._arrived``) ahead of
    the PUBACKs; once the commit goes, PUBACK 1, PUBACK 2, then the PINGRESP."""
    writer = HeldWriter(broker)
    topic = T.dm("bob", "alice").encode()
    with _bob(broker) as bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(
            publish_packet(topic, chat("one"), qos=1, packet_id=1)
            + publish_packet(topic, chat("two"), qos=1, packet_id=2)
        )
        heard, _ = read_packets(bob, lambda p: len(p) >= 2)
        assert _texts(heard) == ["one", "two"]  # alice's reader has handled both
        assert writer.entered.wait(WAIT)
        alice.sendall(PINGREQ)  # alone in its read, the reader waiting for bytes
        bob.sendall(PINGREQ)  # read in the same poll as alice's, or after it
        assert read_packets(bob, lambda p: len(p) >= 1)[0] == [(0xD0, b"")]
        assert _nothing_to_read(alice)
        writer.release()
        got, _ = read_packets(alice, lambda p: len(p) >= 3)
    assert got == [(0x40, b"\x00\x01"), (0x40, b"\x00\x02"), (0xD0, b"")]


def test_a_websocket_clients_pingresp_and_suback_wait_for_its_pubacks(tmp_path: Path) -> None:
    """amqtt's WebSocket loop handles each packet in a task of its own: with the DM's PUBACK waiting
    for the held commit, the PINGREQ and SUBSCRIBE read after it were answered first (CI:
    test_attacks_client.py::test_half_packets_in_websocket_frames under load). Now they wait for
    the connection's QoS 1 PUBLISHes (AckAfterJournal._after_publishes)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with bare_broker(tmp_path / "data", "alice", "bob", ws=True) as info:
        writer = HeldWriter(info)
        subscribe = packet(0x82, b"\x00\x05" + field(T.user_filter("alice").encode()) + b"\x01")
        dm = publish_packet(T.dm("bob", "alice").encode(), chat("over the web"), qos=1, packet_id=1)
        with connect(f"ws://127.0.0.1:{info.ws_port}/", subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
            ws.send(login("alice"))
            assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"
            ws.send(dm + PINGREQ + subscribe)
            assert writer.entered.wait(WAIT)
            with pytest.raises(TimeoutError):  # nothing answered while the DM's row is not committed
                ws.recv(timeout=0.5)
            writer.release()
            stream = b""
            try:
                while len(stream) < 4 + 2 + 5:
                    stream += ws.recv(timeout=10)  # type: ignore[operator]
            except (TimeoutError, ConnectionClosed):
                pass
    assert stream[:4] == b"\x40\x02\x00\x01", stream  # the PUBACK first
    assert sorted([stream[4:6], stream[6:]]) == sorted([b"\xd0\x00", b"\x90\x03\x00\x05\x01"]), stream


def test_what_is_not_kept_is_acknowledged_without_waiting_for_others_rows(broker: ServeInfo) -> None:
    """While alice's DM waits for its commit, bob's QoS 1 request (not chat: the journal keeps nothing
    of it) is acknowledged at once, and so is his PINGREQ: only a connection's own kept lines hold its
    answers (a file's chunks and the workers' publishes do not wait for others' chat to be kept)."""
    writer = HeldWriter(broker)
    topic = T.dm("bob", "alice").encode()
    with _bob(broker) as bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(publish_packet(topic, chat("held"), qos=1, packet_id=1))
        heard, _ = read_packets(bob, lambda p: len(p) >= 1)
        assert _texts(heard) == ["held"]
        assert writer.entered.wait(WAIT)
        bob.sendall(publish_packet(T.request("bob", "c0ffee01").encode(), b"{}", qos=1, packet_id=7) + PINGREQ)
        got, _ = read_packets(bob, lambda p: len(p) >= 2)
        assert got == [(0x40, b"\x00\x07"), (0xD0, b"")]
        assert _nothing_to_read(alice)
        writer.release()
        acks, _ = read_packets(alice, lambda p: len(p) >= 1)
    assert acks == [(0x40, b"\x00\x01")]
    assert _kept(broker) == ["held"]


def test_rows_recorded_while_a_commit_runs_share_the_next_one(broker: ServeInfo) -> None:
    """Twenty DMs, one write each, while the first commit is held: they are all delivered, their rows
    wait for that commit and then go in one more transaction, and alice's twenty PUBACKs come in order."""
    writer = HeldWriter(broker)
    assert broker.broker is not None
    journal = broker.broker._journal
    topic = T.dm("bob", "alice").encode()
    with _bob(broker) as bob, _connect(broker, "alice", b"alice:raw") as alice:
        alice.sendall(publish_packet(topic, chat("line 1"), qos=1, packet_id=1))
        assert writer.entered.wait(WAIT)
        for i in range(2, 21):
            alice.sendall(publish_packet(topic, chat(f"line {i}"), qos=1, packet_id=i))
        heard, _ = read_packets(bob, lambda p: len(p) >= 20)
        assert _texts(heard) == [f"line {i}" for i in range(1, 21)]
        assert wait_until(lambda: journal.recorded == 20)  # a row is recorded just after its copy is written
        assert _nothing_to_read(alice)
        writer.release()
        acks, _ = read_packets(alice, lambda p: len(p) >= 20)
    assert acks == [(0x40, i.to_bytes(2, "big")) for i in range(1, 21)]
    assert writer.batches == [1, 19]
    assert _kept(broker) == [f"line {i}" for i in range(1, 21)]


def test_a_batch_that_fails_acknowledges_none_of_its_messages(broker: ServeInfo) -> None:
    """The writer's transaction raises (a full disk): alice's DM was delivered but is not acknowledged,
    her connection is closed, nothing is kept; sent again from a new connection, it is kept and
    acknowledged (the journal goes on)."""
    writer = HeldWriter(broker)
    writer.fail = True
    topic = T.dm("bob", "alice").encode()
    with _bob(broker) as bob:
        with _connect(broker, "alice", b"alice:raw") as alice:
            alice.sendall(publish_packet(topic, chat("lost?"), qos=1, packet_id=1))
            heard, _ = read_packets(bob, lambda p: len(p) >= 1)
            assert _texts(heard) == ["lost?"]
            writer.release()
            got, closed = read_packets(alice, lambda p: False)
        assert (got, closed) == ([], True)
        assert _kept(broker) == []
        with _connect(broker, "alice", b"alice:raw") as alice:
            alice.sendall(publish_packet(topic, chat("lost?"), qos=1, packet_id=1))
            acks, _ = read_packets(alice, lambda p: len(p) >= 1)
    assert acks == [(0x40, b"\x00\x01")]
    assert _kept(broker) == ["lost?"]


def test_a_request_reaches_the_workers_only_once_the_rows_before_it_are_committed(tmp_path: Path) -> None:
    """A line's copies go out before its row is committed, so bob may see a line and ask for the
    history at once: the archive must not get his request before that row is in the archive it reads
    (tests/test_wills.py::test_a_delivered_chat_will_is_in_the_archive failed so under load). With the
    writer's commit held, the request waits in the broker; it reaches the worker once the commit goes."""
    with bare_broker(tmp_path / "data", "alice", "bob") as info:
        AccountStore(info.data_dir).add("archive", password_of("archive"), Role.SERVICE, allow_reserved=True)
        writer = HeldWriter(info)
        with (
            _bob(info) as bob,
            _connect(info, "alice", b"alice:raw") as alice,
            _connect(info, "archive", b"archive:raw") as archive,
        ):
            archive.sendall(packet(0x82, b"\x00\x01" + field(T.request_filter().encode()) + b"\x00"))
            got, _ = read_packets(archive, lambda p: len(p) >= 1)
            assert got == [(0x90, b"\x00\x01\x00")]
            alice.sendall(publish_packet(T.dm("bob", "alice").encode(), chat("seen"), qos=0))
            got, _ = read_packets(bob, lambda p: len(p) >= 1)
            assert _texts(got) == ["seen"]
            assert writer.entered.wait(WAIT)
            request = T.request("bob", "c0ffee").encode()
            bob.sendall(publish_packet(request, b"{}", qos=0))
            wait_until(lambda: not _nothing_to_read(archive), 1.0)  # before the rule: at once
            assert _nothing_to_read(archive) and _kept(info) == []
            writer.release()
            got, _ = read_packets(archive, lambda p: len(p) >= 1)
            assert [first >> 4 for first, _ in got] == [3] and request in got[0][1]
            assert _kept(info) == ["seen"]


class _Store:
    """An ``ArchiveWriter`` that notes its batches (the writer's thread calls ``add_many``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.batches: list[list[str]] = []
        self.closed = False

    def add(self, item: Received, at: float) -> bool:
        raise AssertionError("the journal writes batches")

    def add_many(self, items: Sequence[tuple[Received, float]]) -> None:
        self.batches.append([item.text for item, _ in items])

    def defer_checkpoints(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _journal(tmp_path: Path) -> tuple[Journal, _Store]:
    sqlite3.connect(tmp_path / "archive.sqlite3").close()  # the Checkpointer's
    store = _Store(tmp_path / "archive.sqlite3")
    return Journal(store, T, lambda _user, _topic: True), store


def _line(text: str) -> ApplicationMessage:
    return ApplicationMessage(1, T.room("lobby", "alice"), 1, bytearray(chat(text)), False)


def test_a_row_reaches_the_writer_only_after_the_loop_round_that_recorded_it(tmp_path: Path) -> None:
    """The writer's thread must not run (and take the interpreter's lock) while the callback that
    recorded a row is still delivering the line (issue 16, eighth session: the chat line's own
    delivery waited for its own row). Within the recording callback, with the lock let go for a
    while (as a copy's ``send`` does), the writer has nothing; after the round it writes both rows
    of that round in one batch, and what waits for the commit is told."""
    journal, store = _journal(tmp_path)

    async def main() -> bool:
        journal.record("alice", _line("one"))
        journal.record("alice", _line("two"))
        assert journal.recorded == 2
        time.sleep(0.2)  # the lock is free: a writer woken by ``record`` would write the rows now
        assert store.batches == []
        return await asyncio.wait_for(journal.committed(), WAIT)

    try:
        assert asyncio.run(main())
        assert store.batches == [["one", "two"]]
    finally:
        journal.close()


def test_rows_of_a_round_that_never_ended_are_written_at_close(tmp_path: Path) -> None:
    """A row recorded in the callback that then closes the journal (the broker's shutdown) is still
    written: ``close`` hands the round's rows over before the writer's last item."""
    journal, store = _journal(tmp_path)

    async def main() -> None:
        journal.record("alice", _line("last"))
        journal.close()

    asyncio.run(main())
    assert store.batches == [["last"]]
    assert store.closed
