"""Limits of the embedded broker: publish rate, subscriptions, connections. Each tells why."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

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
    one_error_line(
        cli("who"),
        r"Error: the broker dropped the request: account alice hit its rate limit \(messages sent too fast\) "
        r"\(try again in \d+s, and send less often\)",
    )


def one_error_line(result: Result, pattern: str) -> re.Match[str]:
    """The command failed with exactly one line, matching ``pattern`` (no traceback)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    matched = re.fullmatch(pattern, lines[0])
    assert matched is not None, lines[0]
    return matched


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


def asking_alice(topics: Topics) -> tuple[RequestClient, threading.Thread, list[str], list[BaseException]]:
    """alice's request client, a thread asking it a ``who`` (an hour's timeout) whose request is
    sent, the topics it published and what the ask raised (anything: an ``ImcliError`` is expected)."""
    sent: list[str] = []
    client = RequestClient(topics, "alice", lambda topic, _payload: sent.append(topic), timeout=3600)
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            client.ask(WhoRequest())
        except BaseException as exc:  # anything but an ImcliError is a failure the tests look for
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    assert wait_until(lambda: bool(sent))
    return client, asker, sent, outcome


def test_a_rate_notice_fails_only_the_request_it_names() -> None:
    """The pure part: a ``rate`` notice about another topic, or another account's request, leaves
    the request waiting; the one naming it ends it with ``RateLimited``."""
    topics = Topics()
    client, asker, sent, outcome = asking_alice(topics)

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
    [error] = outcome
    assert isinstance(error, RateLimited)
    assert error.hint == "try again in 3s, and send less often"


def test_a_hostile_rate_notice_never_breaks_the_asker() -> None:
    """Notices come only from the broker and the workers (tests/test_security.py), but the
    client reads them defensively: an absurd retry, a negative one, NaN, non-JSON, a topic or
    text with control characters, ids that are no ids: each is ignored (the request keeps
    waiting) or ends it with one clean line that quotes nothing of the notice but its retry."""
    topics = Topics()
    client, asker, sent, outcome = asking_alice(topics)
    request, corr = sent[0], sent[0].rsplit("/", 1)[1]
    base = {"type": "notice", "v": 1, "code": "rate", "text": "slow down", "topic": request}
    hostile = [
        json.dumps(base | {"retry": 1e308}).encode(),
        json.dumps(base | {"retry": -1}).encode(),
        json.dumps(base | {"retry": float("nan")}).encode(),
        json.dumps(base | {"retry": float("inf")}).encode(),
        json.dumps(base | {"retry": "soon"}).encode(),
        b"\x1b[2J not json at all \xff",
        b'{"type":"notice","code":"rate"',
        json.dumps(base | {"topic": request + "\x1b[31m"}).encode(),
        json.dumps(base | {"topic": "im/request/alice/\u202e" + corr}).encode(),
        json.dumps(base | {"topic": None, "requests": [corr + "\n"]}).encode(),
        json.dumps(base | {"topic": None, "requests": [corr] * 401}).encode(),  # more than a notice may name
        json.dumps(base | {"topic": None, "requests": corr}).encode(),
        json.dumps(base | {"extra": "field"}).encode(),
    ]
    for payload in hostile:
        assert not client.deliver(Message(topics.notice("alice"), payload, 0, False))
    asker.join(0.2)
    assert asker.is_alive() and not outcome  # each one ignored
    evil = json.dumps(base | {"text": "\x1b]0;pwned\x07\x1b[2J\r\nError: forged", "retry": 86400}).encode()
    assert not client.deliver(Message(topics.notice("alice"), evil, 0, False))
    asker.join(10)
    [error] = outcome
    assert isinstance(error, RateLimited)
    line = str(error)
    assert line.isprintable() and "pwned" not in line and "forged" not in line
    assert line.endswith("(try again in 86400s, and send less often)")


# ---------------------------------------------------------------- requests beyond the notices a second


def test_every_request_dropped_in_a_flood_is_named_in_a_notice(starved: ServeInfo) -> None:
    """Past the one notice a second and the ten about requests, the dropped requests are named
    together (their correlation ids) in one notice a second: each asker hears, none times out."""
    spend_the_rate(starved, "alice")
    alice = connect_raw(starved.address.host, starved.address.port, "alice", "alice:flood")
    try:
        assert alice.subscribe("im/user/alice/notice") == 1
        ids = [f"{i:032x}" for i in range(40)]
        for corr in ids:
            alice.publish(f"im/request/alice/{corr}", encode(WhoRequest()))
        named: list[str] = []
        notices: list[dict[str, object]] = []
        while not set(ids) <= set(named):
            notice = json.loads(alice.expect("im/user/alice/notice", timeout=10).payload)
            notices.append(notice)
            assert notice["code"] == "rate"
            if isinstance(notice.get("topic"), str):
                named.append(str(notice["topic"]).rsplit("/", 1)[1])
            named.extend(notice.get("requests") or [])
        assert sorted(named) == sorted(ids)  # each once
        aggregated = [n for n in notices if n.get("requests")]
        assert aggregated  # one a second: one, or more if the flood took over a second (a loaded machine)
        for notice in aggregated:
            assert notice.get("topic") is None
            assert re.fullmatch(
                r"slow down: \d+ more requests? dropped, beyond 0.001 messages a second", str(notice["text"])
            )
            assert isinstance(notice["retry"], float) and notice["retry"] > 0
    finally:
        alice.close()


def test_concurrent_requests_beyond_the_rate_all_fail_at_once(
    starved: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty requests asked at once on one connection after the rate is spent: every one ends
    with ``RateLimited``, none with a timeout (an hour here)."""
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", "3600")
    spend_the_rate(starved, "alice")
    outcome: list[BaseException] = []
    with services.Connection(ident(starved, "alice"), "flood") as connection:

        def ask() -> None:
            try:
                connection.ask(WhoRequest())
            except ImcliError as exc:
                outcome.append(exc)

        askers = [threading.Thread(target=ask) for _ in range(30)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join(60)
    assert [type(e) for e in outcome] == [RateLimited] * 30


# ---------------------------------------------------------------- the file-transfer rate


@contextlib.contextmanager
def file_limited(tmp_path: Path, file_rate: float, file_burst: int) -> Iterator[tuple[ServeInfo, Cli, Path]]:
    """A broker whose file-transfer rate is ``file_rate`` (chunks of 4 KiB), alice logged in with
    the CLI, and a file of a dozen chunks (51,200 bytes) for her to send to bob."""
    limits = Limits(file_rate=file_rate, file_burst=file_burst, max_chunk=4096)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "files-limited", port=0, limits=limits)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        alice = Cli(CliRunner(), info, tmp_path / "config-alice")
        alice.login("alice")
        source = tmp_path / "big.bin"
        source.write_bytes(bytes(range(256)) * 200)
        yield info, alice, source


def test_a_file_transfer_beyond_its_rate_says_so(tmp_path: Path) -> None:
    """A chunk dropped for the file-transfer rate (not the chat rate): the command fails at once
    with one line naming the file transfer rate and its own retry time (the chat rate's would be
    a second: 20 a second)."""
    with file_limited(tmp_path, file_rate=0.001, file_burst=3) as (_, alice, source):
        result = alice("send", "bob", str(source))
    waited = one_error_line(
        result,
        r"Error: the broker dropped part of the file transfer: account alice hit its file transfer rate "
        r"\(try again in (\d+)s: the same command goes on where it stopped\)",
    )
    assert 900 <= int(waited.group(1)) <= 1000  # one token at 0.001 a second


def test_a_file_transfer_waits_out_a_short_rate_notice_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks dropped for a file-transfer rate that refills soon: the upload waits as the notice
    says and goes on from the worker's copy (not after a 15 s silence: the stall is an hour here),
    and the file arrives whole."""
    from imcli.client import files

    monkeypatch.setattr(files, "STALL", 3600.0)
    pauses: list[str] = []
    pause = files._pause

    def counted(dropped_for: RateLimited, paused: int) -> int:
        pauses.append(dropped_for.message)
        return pause(dropped_for, paused)

    monkeypatch.setattr(files, "_pause", counted)
    with file_limited(tmp_path, file_rate=40.0, file_burst=4) as (info, alice, source):
        sent = alice("send", "bob", str(source))
        assert sent.exit_code == 0, sent.output
        bob = Cli(CliRunner(), info, tmp_path / "config-bob")
        bob.login("bob")
        out = tmp_path / "got"
        out.mkdir()
        got = bob("get", sent.output.strip().rsplit(" ", 1)[1], "-o", str(out))
        assert got.exit_code == 0, got.output
    assert (out / "big.bin").read_bytes() == source.read_bytes()
    assert pauses and all("file transfer rate" in p for p in pauses)  # the broker did drop chunks, and said so


def test_a_download_whose_acknowledgement_is_dropped_sends_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pure part of a download's rate notice: the notice about this download's
    acknowledgement topic reaches its box (not another download's, nor one about another
    account's topic), the download waits, sends its acknowledgement again from where it is, and
    goes on; a long wait ends it with the file transfer rate's line."""
    import hashlib
    import time

    from imcli.client import files
    from imcli.client.files import FileConnection
    from imcli.client.identity import Identity
    from imcli.core.mqtt import BrokerAddress
    from imcli.core.topics import chunk
    from imcli.core.wire import FileInfo

    monkeypatch.setattr(files, "STALL", 3600.0)
    monkeypatch.setattr(time, "sleep", lambda _seconds: None)  # the wait itself is not the point
    identity = Identity(BrokerAddress.of("127.0.0.1:1"), Credentials("alice", "x"), "test")
    connection = FileConnection(identity)  # never connected: what it publishes is recorded
    acks: list[tuple[str, bytes]] = []
    monkeypatch.setattr(
        connection._client, "publish_nowait", lambda topic, payload, qos=1: acks.append((topic, payload))
    )
    topics = identity.topics
    data = b"x" * 3000
    info = FileInfo(id="f" * 32, name="a.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    stream, other = "s" * 32, "o" * 32
    box, elsewhere = connection._box(stream), connection._box(other)

    def notice(topic: str, retry: float) -> Message:
        return Message(
            topics.notice("alice"), encode(Notice(code="rate", text="slow down", topic=topic, retry=retry)), 0, False
        )

    connection._route(notice(topics.fetch("bob", stream), 0.5))  # bob's topic: not this download's
    connection._route(notice(topics.fetch("alice", stream), 0.5))
    assert box.qsize() == 1 and elsewhere.empty()
    for offset in (0, 1000, 2000):
        box.put(Message(topics.file_data("alice", stream), chunk(offset, data[offset : offset + 1000]), 1, False))
    digest = hashlib.sha256()
    connection._receive(stream, box, tmp_path / "a.part", 0, digest, info, None)
    assert digest.hexdigest() == info.sha256 and (tmp_path / "a.part").read_bytes() == data
    offsets = [json.loads(payload)["offset"] for topic, payload in acks if topic == topics.fetch("alice", stream)]
    assert offsets == [0, 0, 3000]  # the first, again after the notice, the last
    connection._route(notice(topics.fetch("alice", other), 60))  # a long wait: the other download fails
    with pytest.raises(RateLimited, match="file transfer rate") as failed:
        connection._receive(other, elsewhere, tmp_path / "b.part", 0, hashlib.sha256(), info, None)
    assert failed.value.hint == "try again in 60s: the same command goes on where it stopped"
