"""A request sent again with the same correlation id is done once and answered each time.

paho sends a QoS 1 PUBLISH again (DUP) after a reconnect when it had no PUBACK for it, and a NATS
node closes a publisher whose message JetStream did not store within 4 s, after the workers' QoS 0
subscriptions already had it (deploy/nats/README.md, "Requests and replies at QoS 0"): a worker
then sees the request twice. A group created twice would answer the second copy "taken" to the
client that created it; the worker keeps its replies a minute (``ServiceWorker._answered``)."""

from __future__ import annotations

from collections.abc import Callable

from imcli.core.wire import ErrorReply, GroupReply, GroupRequest, Topics, decode, encode
from tests import brokers
from tests.conftest import Raw

T = Topics()

broker_kind, broker_under_test, server, users = brokers.ALL  # every test on the three brokers


def test_a_request_sent_twice_is_done_once_and_answered_twice(
    users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    users("alice")
    alice = raw("alice", client_id="alice:twice")
    assert alice.rc == 0
    alice.subscribe(T.reply_filter("alice"))
    request = encode(GroupRequest(op="create", group="twice"))
    replies = []
    for _ in range(2):
        alice.publish(T.request("alice", "c0ffee01"), request)
        replies.append(decode(bytes(alice.expect(T.reply("alice", "c0ffee01"), timeout=30).payload)))
    assert not [r for r in replies if isinstance(r, ErrorReply)], replies
    assert [type(r) for r in replies] == [GroupReply, GroupReply]
    again = "c0ffee02"  # a new request (another correlation id) is done again: the name is taken now
    alice.publish(T.request("alice", again), request)
    reply = decode(bytes(alice.expect(T.reply("alice", again), timeout=30).payload))
    assert isinstance(reply, ErrorReply) and reply.code == "taken", reply
