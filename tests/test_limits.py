"""Limits of the embedded broker: publish rate, subscriptions, connections. Each tells why."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits, PublishRate
from imcli.broker.server import BrokerSettings
from imcli.client import services
from imcli.client.listener import Listener
from imcli.client.services import verify_login
from imcli.core.errors import AuthenticationFailed, ImcliError, RateLimited
from imcli.core.mqtt import Credentials, Message
from imcli.core.request_reply import RequestClient
from imcli.core.wire import ChatMessage, Notice, Topics, WhoRequest, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, ident
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


# ---------------------------------------------------------------- a request beyond the rate


@pytest.fixture
def starved(tmp_path: Path) -> Iterator[ServeInfo]:
    """A broker whose accounts get a few messages and then (nearly) none: 0.001 a second."""
    limits = Limits(publish_rate=0.001, publish_burst=5)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "starved", port=0, limits=limits)) as info:
        AccountStore(info.data_dir).add("alice", password_of("alice"))
        yield info


def spend_the_rate(info: ServeInfo, name: str) -> None:
    """Publish as ``name`` until the broker says ``rate``: its bucket is empty."""
    r = connect_raw(info.address.host, info.address.port, name, f"{name}:spender")
    try:
        assert r.subscribe(f"im/user/{name}/notice") == 1
        for i in range(10):
            r.publish(f"im/room/lobby/{name}", encode(ChatMessage(text=f"m{i}")))
        assert json.loads(r.expect(f"im/user/{name}/notice").payload)["code"] == "rate"
    finally:
        r.close()


def test_a_request_beyond_the_rate_fails_at_once_through_the_cli(
    starved: ServeInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "no worker answered within 5s": the broker's rate notice names the request, and the
    command says the account's rate limit was hit and when to retry (the timeout is an hour:
    waiting it out would fail the test's own timeout)."""
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", "3600")
    cli = Cli(CliRunner(), starved, tmp_path / "config-alice")
    cli.login("alice")
    spend_the_rate(starved, "alice")
    result = cli("who")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert re.fullmatch(
        r"Error: the broker dropped the request: account alice hit its rate limit \(messages sent too fast\) "
        r"\(try again in \d+s, and send less often\)",
        lines[0],
    ), lines[0]
    assert "Traceback" not in result.output


def test_a_request_beyond_the_rate_fails_at_once_through_the_services(
    starved: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", "3600")
    spend_the_rate(starved, "alice")
    alice = ident(starved, "alice")
    with pytest.raises(RateLimited, match=r"try again in (\d+)s") as raised:
        services.who(alice)
    waited = re.search(r"try again in (\d+)s", raised.value.hint)
    assert waited is not None and 900 <= int(waited.group(1)) <= 1000  # one token at 0.001 a second
    with Listener(alice) as listener, pytest.raises(RateLimited, match="rate limit"):  # imcli chat's connection
        listener.ask(WhoRequest())


def test_a_rate_notice_fails_only_the_request_it_names() -> None:
    """The pure part: a ``rate`` notice about another topic, or another account's request, leaves
    the request waiting; the one naming it ends it with ``RateLimited``."""
    topics = Topics()
    sent: list[str] = []
    client = RequestClient(topics, "alice", lambda topic, _payload: sent.append(topic), timeout=3600)
    outcome: list[ImcliError] = []

    def ask() -> None:
        try:
            client.ask(WhoRequest())
        except ImcliError as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    assert wait_until(lambda: bool(sent))

    def tell(topic: str) -> bool:
        notice = Notice(code="rate", text="slow down", topic=topic, retry=2.5)
        return client.deliver(Message(topics.notice("alice"), encode(notice), 0, False))

    corr = sent[0].rsplit("/", 1)[1]
    assert not tell("im/room/lobby/alice")
    assert not tell(f"im/request/bob/{corr}")
    assert not client.deliver(Message(topics.notice("alice"), b'{"type":"rate"', 0, False))  # malformed: ignored
    asker.join(0.2)
    assert asker.is_alive() and not outcome
    assert not tell(sent[0])  # not a reply: a Listener shows the notice too
    asker.join(10)
    assert [type(e) for e in outcome] == [RateLimited]
    assert outcome[0].hint == "try again in 3s, and send less often"
