"""A Last Will is a publish that happens later (issue 15, item 1): when it fires it passes the
checks an ordinary PUBLISH of it would pass at that moment, not only the topic check made at
CONNECT: the ACL with friends-only DMs and group membership, the payload size, the account's
publish rate, and the journal (a delivered chat Will is in the archive). (A Will on a group
topic is refused at CONNECT already: the gate checks Wills without group records.)

Embedded broker only: whether a Will was refused is proven by ordering. The test waits until
the broker has ended the killed connection (the Will, if any, is then in the broadcast queue)
and sends a barrier after it; the observer gets the barrier only after anything queued before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.client import services
from imcli.client.identity import Identity
from imcli.client.services import Conversation
from imcli.core.mqtt import Credentials
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Raw, password_of, wait_until
from tests.rawmqtt import barrier, chat, connect_raw

RawFactory = Callable[..., Raw]


def ident(server: ServeInfo, name: str) -> Identity:
    return Identity(server.address, Credentials(name, password_of(name)), "test")


def ended(server: ServeInfo, client_id: str) -> None:
    """Wait until the broker has ended ``client_id``'s connection (its Will fired or was dropped by then)."""
    assert server.broker is not None
    table = server.broker.session_table()

    def gone() -> bool:
        entry = table.get(client_id)
        return entry is None or entry[0].transitions.state != "connected"

    assert wait_until(gone, 20), f"{client_id} still connected"


def fire(server: ServeInfo, raw: RawFactory, name: str, client_id: str, topic: str, payload: bytes) -> None:
    """Connect with a Last Will, drop the connection without DISCONNECT, wait until the broker noticed."""
    conn = raw(name, client_id=client_id, will=(topic, payload, False))
    assert conn.rc == 0
    conn.kill()
    ended(server, client_id)


def wills(seen: list[paho.MQTTMessage], topic: str) -> list[bytes]:
    return [bytes(m.payload) for m in seen if m.topic == topic]


@pytest.fixture
def bob(users: Callable[..., None], raw: RawFactory) -> Raw:
    users("alice", "bob", "carol")
    observer = raw("bob", client_id="bob:phone")
    assert observer.subscribe("im/room/+/+") == 1
    assert observer.subscribe("im/user/bob/#") == 1
    assert observer.subscribe("im/group/+/msg/+") == 1
    return observer


def test_dm_will_is_dropped_once_the_recipient_takes_friends_only(server: ServeInfo, raw: RawFactory, bob: Raw) -> None:
    topic = "im/user/bob/dm/alice"
    allowed = chat("alice is gone (allowed)")
    fire(server, raw, "alice", "alice:a", topic, allowed)
    assert wills(barrier(bob, bob)[0], topic) == [allowed]  # while bob takes DMs from anyone

    alice = raw("alice", client_id="alice:b", will=(topic, chat("alice is gone (refused)"), False))
    assert alice.rc == 0  # the Will's topic was fine at CONNECT
    services.friend_request(ident(server, "bob"), "policy", policy="friends")
    alice.kill()
    ended(server, "alice:b")
    assert wills(barrier(bob, bob)[0], topic) == []


def test_oversized_will_is_not_delivered(server: ServeInfo, raw: RawFactory, bob: Raw) -> None:
    topic = "im/room/lobby/alice"
    fire(server, raw, "alice", "alice:big", topic, b"x" * 60_000)  # the limit is 16 KiB
    small = chat("alice is gone")
    fire(server, raw, "alice", "alice:small", topic, small)
    assert wills(barrier(bob, bob)[0], topic) == [small]


def test_a_delivered_chat_will_is_in_the_archive(server: ServeInfo, raw: RawFactory, bob: Raw) -> None:
    topic = "im/room/lobby/alice"
    fire(server, raw, "alice", "alice:a", topic, chat("alice dropped off"))
    bob.expect(topic)  # the journal writes a Will before it is broadcast
    kept = services.history(ident(server, "bob"), Conversation.parse("lobby"))
    assert [(m.sender, m.text) for m in kept.messages] == [("alice", "alice dropped off")]


# ---------------------------------------------------------------- the rate limit


BURST = 3


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[ServeInfo]:
    """A broker whose accounts may publish BURST messages and then (practically) nothing more."""
    limits = Limits(publish_rate=0.001, publish_burst=BURST)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, limits=limits)) as info:
        yield info


def test_a_reconnect_loop_of_wills_is_rate_limited_like_publishing(slow_server: ServeInfo) -> None:
    store = AccountStore(slow_server.data_dir)
    for name in ("alice", "bob"):
        store.add(name, password_of(name))
    opened: list[Raw] = []

    def raw(name: str, client_id: str = "", **options: object) -> Raw:
        a = slow_server.address
        r = connect_raw(a.host, a.port, name, client_id, **options)  # type: ignore[arg-type]
        opened.append(r)
        return r

    try:
        bob = raw("bob", client_id="bob:phone")
        assert bob.subscribe("im/room/+/+") == 1
        topic = "im/room/lobby/alice"
        fired = [chat(f"will {i}") for i in range(4 * BURST)]
        for payload in fired:  # one client reconnecting in a loop, each connection leaving a Will
            fire(slow_server, raw, "alice", "alice:loop", topic, payload)
        alice = raw("alice", client_id="alice:laptop")
        alice.publish(topic, chat("and an ordinary message"))  # the same account's bucket
        got = wills(barrier(bob, bob)[0], topic)
        assert got == fired[:BURST]  # at most burst + rate * elapsed: 0.001/s adds none within the test
    finally:
        for r in opened:
            r.close()


def test_will_of_a_resumed_session_is_the_latest_connections(server: ServeInfo, raw: RawFactory, bob: Raw) -> None:
    """A persistent session's Will is the one its current connection's CONNECT gave."""
    topic = "im/room/lobby/alice"
    first = raw("alice", client_id="alice:p", clean=False, will=(topic, chat("first"), False))
    assert first.rc == 0
    first.close()  # DISCONNECT: no Will
    ended(server, "alice:p")
    second = raw("alice", client_id="alice:p", clean=False, will=(topic, chat("second"), False))
    assert second.rc == 0
    second.kill()
    ended(server, "alice:p")
    assert [json.loads(p)["text"] for p in wills(barrier(bob, bob)[0], topic)] == ["second"]
