"""A request that names a worker's type but does not validate is refused at once, by that worker only.

A raw MQTT client (a bot, another project's client) that gets one field wrong used to hear nothing
and wait for its own timeout: every worker dropped what did not validate, since several share the
request topic and none knew whose it was (``ServiceWorker.refuse_malformed``). Now the worker that
owns the type named in the payload answers ``invalid`` with the first validation error; a payload
that names no type of any worker, or is no JSON object, still gets no answer (nobody's to judge).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from imcli.archive.worker import ArchiveWorker
from imcli.core.wire import ErrorReply, Roster, Topics, WhoRequest, WireModel, decode, encode
from imcli.files.worker import FilesWorker
from imcli.groups.worker import GroupWorker
from imcli.moments.worker import MomentsWorker
from imcli.presence.worker import PresenceWorker
from tests import brokers
from tests.conftest import Raw

T = Topics()

broker_kind, broker_under_test, server, users = brokers.BOTH

OWNED: list[type[WireModel]] = [
    model
    for worker in (PresenceWorker, GroupWorker, ArchiveWorker, FilesWorker, MomentsWorker)
    for model in worker.requests
]


def kind_of(model: type[WireModel]) -> str:
    return str(model.model_fields["type"].default)


def test_every_request_type_has_exactly_one_owner() -> None:
    kinds = [kind_of(m) for m in OWNED]
    assert len(kinds) == len(set(kinds)), kinds


@pytest.fixture
def alice(users: Callable[..., None], raw: Callable[..., Raw]) -> Raw:
    users("alice")
    client = raw("alice", client_id="alice:malformed")
    assert client.rc == 0
    client.subscribe(T.reply_filter("alice"))
    return client


def test_each_workers_malformed_request_is_refused_once_by_its_owner(alice: Raw) -> None:
    """Every type of every worker, with a version no model accepts and a field none has: one
    ``invalid`` reply each, carrying the request's id, and no second reply from another worker."""
    for n, model in enumerate(OWNED):
        corr = f"bad{n}"
        payload = json.dumps({"type": kind_of(model), "v": 2, "id": f"req{n}", "nonsense": [1, {}]})
        alice.publish(T.request("alice", corr), payload.encode())
        reply = decode(bytes(alice.expect(T.reply("alice", corr), timeout=30).payload))
        assert isinstance(reply, ErrorReply), (model.__name__, reply)
        assert (reply.code, reply.id) == ("invalid", f"req{n}"), (model.__name__, reply)
        assert kind_of(model) in reply.text
    assert alice.silent(1.0, topic_prefix=T.reply_filter("alice").removesuffix("+")) == []


def test_a_malformed_id_is_answered_under_the_topics_correlation_id_and_text_is_made_safe(alice: Raw) -> None:
    payload = json.dumps({"type": "who", "v": 1, "id": "not an id\u202e\x1b[31m", "all": "\x1b[2J"})
    alice.publish(T.request("alice", "c0rr"), payload.encode())
    reply = decode(bytes(alice.expect(T.reply("alice", "c0rr"), timeout=30).payload))
    assert isinstance(reply, ErrorReply) and (reply.code, reply.id) == ("invalid", "c0rr"), reply
    assert "\x1b" not in reply.text and "\u202e" not in reply.text


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "no-such-request", "v": 1, "id": "x1"}',  # nobody's type
        b'{"type": ["who"], "v": 1, "id": "x2"}',  # a type that is no string
        b'["who"]',  # no object
        b"\xff\xfe not UTF-8",
        b'{"type": "who", "v": 1, "id": "x3", "all": ' + b"[" * 100_000,  # deeper than any parser goes
    ],
    ids=["unknown-type", "list-type", "array", "binary", "deep"],
)
def test_what_names_no_workers_type_gets_no_answer_and_harms_nothing(alice: Raw, payload: bytes) -> None:
    alice.publish(T.request("alice", "nobody"), payload)
    alice.publish(T.request("alice", "after"), encode(WhoRequest(id="w1")))
    reply = decode(bytes(alice.expect(T.reply("alice", "after"), timeout=30).payload))
    assert isinstance(reply, Roster) and reply.id == "w1"  # the workers go on answering
    assert alice.silent(0.5, topic_prefix=T.reply("alice", "nobody")) == []
