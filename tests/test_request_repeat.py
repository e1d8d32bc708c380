"""A request sent again with the same correlation id is done once and answered each time.

paho sends a QoS 1 PUBLISH again (DUP) after a reconnect when it had no PUBACK for it, and a NATS
node closes a publisher whose message JetStream did not store within 4 s, after the workers' QoS 0
subscriptions already had it (deploy/nats/README.md, "Requests and replies at QoS 0"): a worker
then sees the request twice. A group created twice would answer the second copy "taken" to the
client that created it; the worker keeps its replies a minute (``ServiceWorker._answered``)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest

from imcli.client import services
from imcli.core import request_reply, service
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.service import ServiceWorker
from imcli.core.wire import (
    ErrorReply,
    GroupReply,
    GroupRequest,
    Roster,
    Topics,
    WhoRequest,
    WireModel,
    decode,
    encode,
)
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import Raw, ident

T = Topics()

broker_kind, broker_under_test, server, users = brokers.ALL  # every test on the three brokers


def test_a_request_sent_twice_is_done_once_and_answered_twice(
    users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    """(A fresh group, correlation id and client id per attempt: on NATS a rerun shares the module's
    cluster. A reply not there in 10 s is asked for again, as the CLI does (request_reply.RESEND_AFTER):
    a group change reloads every NATS node, and nats-server 2.9.10 can lose a reply then, issue 20.)"""
    tag = secrets.token_hex(3)
    users("alice")
    alice = raw("alice", client_id=f"alice:twice{tag}")
    assert alice.rc == 0
    alice.subscribe(T.reply_filter("alice"))
    request = encode(GroupRequest(op="create", group=f"twice{tag}"))

    def ask(corr: str) -> WireModel:
        for attempt in range(3):
            alice.publish(T.request("alice", corr), request)
            try:
                return decode(bytes(alice.expect(T.reply("alice", corr), timeout=10).payload))
            except AssertionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    replies = [ask(f"{tag}01"), ask(f"{tag}01")]
    assert not [r for r in replies if isinstance(r, ErrorReply)], replies
    assert [type(r) for r in replies] == [GroupReply, GroupReply]
    reply = ask(f"{tag}02")  # a new request (another correlation id) is done again: the name is taken now
    assert isinstance(reply, ErrorReply) and reply.code == "taken", reply


def test_only_short_replies_are_kept_and_their_bytes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long reply (a roster at 10,000 users) is not kept for a repeat: 1,000 of them held 100 MB of the
    workers' memory; the short ones kept are bounded in bytes too, oldest first out. A repeat of a long
    one is done again (a read); of a short one, answered from what was kept."""
    done: list[str] = []
    sent: list[bytes] = []

    class Echo(ServiceWorker):
        def handle(self, sender: str, request: WireModel) -> WireModel | None:
            assert isinstance(request, WhoRequest)
            done.append(request.id)
            return ErrorReply(id=request.id, code="invalid", text="y" * (int(request.id) * 1000))

    worker = Echo(BrokerAddress("127.0.0.1", 1), Credentials("presence", "unused"))
    monkeypatch.setattr(
        worker.client, "publish_nowait", lambda topic, payload, qos=1, retain=False: sent.append(payload)
    )
    monkeypatch.setattr(service, "REPLIES_KEPT_BYTES", 40_000)
    for size in ("1", "40", "1", "40"):  # 1 kB kept; 40 kB over REPLY_KEPT_BYTES: done again
        worker._on_request("alice", f"c{size}", encode(WhoRequest(id=size)))
    assert done == ["1", "40", "40"] and sent[0] == sent[2] and len(sent) == 4
    for i in range(2, 12):  # 10 to 11 kB each: only the newest few fit in 40,000 bytes
        worker._on_request("alice", f"k{i}", encode(WhoRequest(id=str(10 + i % 2))))
    assert worker._answered_bytes == sum(len(p) for _, p in worker._answered.values()) <= 40_000
    assert ("alice", "c1") not in worker._answered and ("alice", "k11") in worker._answered


def test_a_command_whose_request_was_lost_sends_it_again_and_gets_the_reply(
    monkeypatch: pytest.MonkeyPatch, users: Callable[..., None], server: ServeInfo
) -> None:
    """A command's connection sends a request still unanswered after ``RESEND_AFTER`` again, with its reply's
    own topic subscribed first: on NATS 2.9 a node reloading its users file can lose the request or the word
    that this connection reads its replies (docs/SCALING.md, issue 20 eighth session). Here the first send
    is dropped before it leaves; the second, through the real broker, is answered, and every broker grants
    the reply topic's own subscription. Without the resend the ask would time out."""
    monkeypatch.setattr(request_reply, "RESEND_AFTER", (0.5, 1.0))
    users("alice")
    sent: list[str] = []
    with services.Connection(ident(server, "alice"), "lost", timeout=20) as connection:
        publish = connection.publish

        def lose_the_first(topic: str, payload: bytes) -> None:
            sent.append(topic)
            if len(sent) > 1:
                publish(topic, payload)

        connection.requests._publish = lose_the_first
        roster = connection.ask(WhoRequest(all=True))
        assert isinstance(roster, Roster)
        assert len(sent) == 2 and sent[0] == sent[1], sent  # the same request, the same correlation id
        corr = sent[0].rsplit("/", 1)[1]
        assert T.reply("alice", corr) in connection._client._subscribed  # granted, on every broker
