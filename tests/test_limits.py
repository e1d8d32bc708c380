"""Limits of the embedded broker: publish rate, subscriptions, connections. Each tells why."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits, PublishRate
from imcli.broker.server import BrokerSettings
from imcli.client.services import verify_login
from imcli.core.errors import AuthenticationFailed
from imcli.core.mqtt import Credentials
from imcli.core.wire import ChatMessage, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import Raw, connect_raw, password_of, wait_until

LIMITS = Limits(publish_rate=5, publish_burst=10, max_subscriptions=3, max_connections=2)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ServeInfo]:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "limited", port=0, limits=LIMITS)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        yield info


@pytest.fixture
def connect(limited: ServeInfo) -> Iterator[Callable[[str, str], Raw]]:
    opened: list[Raw] = []

    def make(name: str, client_id: str) -> Raw:
        r = connect_raw(limited.address.host, limited.address.port, name, client_id)
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.close()


def test_publish_rate_is_limited_and_the_sender_told(connect: Callable[[str, str], Raw]) -> None:
    bob = connect("bob", "bob:x")
    assert bob.subscribe("im/room/+/+") == 1
    alice = connect("alice", "alice:x")
    assert alice.subscribe("im/user/alice/notice") == 1
    for i in range(40):  # far beyond the burst of 10, in well under a second
        alice.publish("im/room/lobby/alice", encode(ChatMessage(text=f"m{i}")))
    notice = json.loads(alice.expect("im/user/alice/notice").payload)
    assert notice["code"] == "rate" and "slow down" in notice["text"]
    got = bob.silent(1.0)
    assert 10 <= len(got) < 40  # the burst, and a few more as tokens refill


def test_subscriptions_per_connection_are_limited(connect: Callable[[str, str], Raw]) -> None:
    alice = connect("alice", "alice:x")
    assert [alice.subscribe(f) for f in ("im/room/a/+", "im/room/b/+", "im/user/alice/#")] == [1, 1, 1]
    assert alice.subscribe("im/room/c/+") == 128
    assert json.loads(alice.expect("im/user/alice/notice").payload)["code"] == "limit"
    assert alice.subscribe("im/room/a/+") == 1  # renewing one it holds is fine


def test_connections_per_account_are_limited(connect: Callable[[str, str], Raw], limited: ServeInfo) -> None:
    first, second = connect("alice", "alice:one"), connect("alice", "alice:two")
    assert (first.rc, second.rc) == (0, 0)
    third = connect("alice", "alice:three")
    assert third.rc == 5  # not authorized
    with pytest.raises(AuthenticationFailed, match="the broker did not let alice in"):  # what login says
        verify_login(limited.address, Credentials("alice", password_of("alice")), "laptop")
    assert not first.disconnected.is_set()
    again = connect("alice", "alice:two")  # the same client id replaces its own connection
    assert again.rc == 0
    assert connect("bob", "bob:x").rc == 0  # others are not affected
    second.close()
    first.close()
    assert wait_until(lambda: connect("alice", "alice:four").rc == 0, 10)


def test_token_bucket_refills() -> None:
    rate = PublishRate(rate=2, burst=3)
    assert [rate.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow("a", 0.5)  # one token back after half a second at 2/s
    assert not rate.allow("a", 0.5)
    assert rate.allow("b", 0.5)  # per account
