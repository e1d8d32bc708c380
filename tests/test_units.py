"""Pure parts without a broker: names, topics, payloads, the ACL, the account store."""

from __future__ import annotations

import gc
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imcli.broker import fanout
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.acl import Access, TopicAcl, filter_within, topic_matches
from imcli.broker.fanout import FilterIndex, RetainedIndex
from imcli.cli.render import safe
from imcli.client.listener import RecentIds, to_received
from imcli.client.services import prepare_text
from imcli.core.errors import InvalidInput, NameTaken, NotFound
from imcli.core.framing import MAX_REMAINING_LENGTH, MalformedLength, decode_length, encode_length
from imcli.core.mqtt import Message
from imcli.core.request_reply import RequestClient, request_timeout
from imcli.core.wire import (
    ChatMessage,
    MalformedPayload,
    Notice,
    Received,
    TopicKind,
    Topics,
    check_name,
    decode,
    decode_as,
    decode_chat,
    encode,
    is_name,
)
from tests.conftest import fast_hasher

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
T = Topics()
ACL = TopicAcl()

# ---------------------------------------------------------------- names and topics


@pytest.mark.parametrize("bad", ["", "Alice", "a b", "a/b", "a+b", "#", "-x", "_x", "x" * 33, "é", "a\0b", "a:b"])
def test_invalid_names(bad: str) -> None:
    assert not is_name(bad)
    with pytest.raises(InvalidInput):
        check_name(bad)


@given(names, names)
def test_room_topic_round_trips(room: str, sender: str) -> None:
    parsed = T.parse(T.room(room, sender))
    assert parsed is not None
    assert (parsed.kind, parsed.name, parsed.sender) == (TopicKind.ROOM, room, sender)


@given(names, names)
def test_dm_topic_round_trips(to: str, sender: str) -> None:
    parsed = T.parse(T.dm(to, sender))
    assert parsed is not None
    assert (parsed.kind, parsed.owner, parsed.sender) == (TopicKind.DM, to, sender)


@given(st.text(max_size=80))
def test_parser_never_crashes_and_accepts_only_valid_levels(topic: str) -> None:
    parsed = T.parse(topic)
    if parsed is not None:
        assert "+" not in topic and "#" not in topic
        for value in (parsed.sender, parsed.owner, parsed.name):
            assert value is None or is_name(value)


def test_custom_prefix() -> None:
    t = Topics("acme/chat")
    assert t.room("lobby", "alice") == "acme/chat/room/lobby/alice"
    assert t.parse("im/room/lobby/alice") is None
    with pytest.raises(InvalidInput):
        Topics("bad prefix/#")


# ---------------------------------------------------------------- payloads


@given(st.text(min_size=1).filter(lambda s: s.strip() != ""))
def test_chat_message_round_trips(text: str) -> None:
    message = ChatMessage(text=text)
    assert decode(encode(message)) == message


def test_plain_text_and_malformed_chat_payloads() -> None:
    msg, plain = decode_chat("hello ✓".encode())
    assert plain and msg.text == "hello ✓"
    msg, plain = decode_chat(b'{"not": "ours"}')  # JSON without a type is a bot's text
    assert plain and msg.text == '{"not": "ours"}'
    for bad in (
        b"\xff",
        b'{"type": "chat"}',
        b'{"type":"chat","v":2,"text":"x"}',
        b'{"type":"chat","v":1,"text":"x","id":"bad id"}',
        b"  \n",
        b'{"type":"notice","code":"x","text":"y"}',
    ):
        with pytest.raises(MalformedPayload):
            decode_chat(bad)


@given(st.binary(max_size=200))
def test_decode_chat_never_raises_anything_but_malformed(data: bytes) -> None:
    try:
        msg, _ = decode_chat(data)
    except MalformedPayload:
        return
    assert msg.text.strip()


def _decode_chat_as_before(data: bytes) -> tuple[str, bool] | None:
    """``decode_chat`` as it was before its shortcut for payloads with no "type" (the ninth
    session): the text, whether plain; ``None`` for a malformed payload."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and "type" in obj:
            try:
                return decode_as(data, ChatMessage).text, False
            except MalformedPayload:
                return None
    return (text, True) if text.strip() else None


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "text", "sent", "t\\u0079pe"]) | st.text(max_size=6), inner, max_size=3
        )
    ),
    max_leaves=8,
)


@given(_JSON, st.sampled_from(["", " ", "\n"]))
def test_decode_chat_takes_what_it_took_before(value: object, lead: str) -> None:
    data = (lead + json.dumps(value, ensure_ascii=False)).encode()
    for payload in (data, data.replace(b"\\\\u0079", b"\\u0079")):  # "t\u0079pe" is "type" in JSON
        try:
            msg, plain = decode_chat(payload)
            got: tuple[str, bool] | None = (msg.text, plain)
        except MalformedPayload:
            got = None
        before = _decode_chat_as_before(payload)
        assert got == before


def test_a_bots_json_without_a_type_is_text_without_a_validation_or_a_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room ping's payload (``{"sent": ...}``, no "type"): taken as text at once; it went through
    ChatMessage's validation (which failed) and ``json.loads`` before (issue 16, ninth session)."""
    from imcli.core import wire

    def refused(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("not needed for a payload without a type")

    monkeypatch.setattr(wire.json, "loads", refused)
    monkeypatch.setattr(wire.ChatMessage, "model_validate_json", refused)
    for data in (b'{"sent": 1234.5}', b'{"not": "ours"}', b"hello", b' {"typ": 1}'):
        msg, plain = decode_chat(data)
        assert plain and msg.text == data.decode()
    with pytest.raises(AssertionError):  # with a "type" member (or an escape) it is decided as before
        decode_chat(b'{"type": "chat", "text": "hi"}')
    with pytest.raises(AssertionError):
        decode_chat(b'{"t\\u0079pe": "chat", "text": "hi"}')


def test_payload_from_is_ignored_the_topic_names_the_sender() -> None:
    r = to_received(T, Message("im/room/lobby/alice", b'{"type":"chat","v":1,"text":"hi","from":"bob"}', 1, False))
    assert r is not None and r.sender == "alice"
    assert "from" not in json.loads(encode(ChatMessage(text="x")))


def test_to_received_maps_topics() -> None:
    r = to_received(T, Message("im/user/bob/dm/alice", encode(ChatMessage(text="hi")), 1, False))
    assert r is not None and (r.kind, r.sender, r.to) == ("dm", "alice", "bob")
    n = to_received(T, Message("im/user/bob/notice", encode(Notice(code="denied", text="no")), 1, False))
    assert n is not None and (n.kind, n.text) == ("notice", "no")
    assert to_received(T, Message("im/user/bob/reply/abc", b"{}", 1, False)) is None
    bad = to_received(T, Message("im/room/lobby/alice", b"\xff", 1, False))
    assert bad is not None and bad.kind == "malformed" and bad.sender == "alice"


def test_received_json_uses_from() -> None:
    line = Received(kind="room", sender="alice", room="lobby", id="x", ts=1.0, text="hi").to_json()
    assert json.loads(line) == {
        "kind": "room",
        "from": "alice",
        "room": "lobby",
        "id": "x",
        "ts": 1.0,
        "text": "hi",
        "format": "json",
    }


def test_prepare_text_limits() -> None:
    assert prepare_text("hi\n").text == "hi"
    with pytest.raises(InvalidInput, match="empty message"):
        prepare_text(" \n")
    with pytest.raises(InvalidInput, match="message too long"):
        prepare_text("x" * 20000)
    # the limit counts the encoded payload, so JSON escaping is included
    with pytest.raises(InvalidInput):
        prepare_text('"' * 9000)


@pytest.mark.parametrize(("value", "seconds"), [(None, 5.0), ("0.25", 0.25), ("120", 120.0)])
def test_request_timeout(monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: float) -> None:
    """5 s unless IMCLI_REQUEST_TIMEOUT says otherwise, read when a client is made."""
    if value is not None:
        monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", value)
    assert request_timeout() == seconds
    assert RequestClient(T, "alice", lambda _topic, _payload: None).timeout == seconds


@pytest.mark.parametrize("value", ["0", "-1", "soon", "3601", "nan"])
def test_request_timeout_refuses_nonsense(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", value)
    with pytest.raises(InvalidInput, match="IMCLI_REQUEST_TIMEOUT"):
        request_timeout()


def test_recent_ids_forgets_the_oldest() -> None:
    ids = RecentIds(capacity=2)
    assert not ids.seen("a") and not ids.seen("b") and ids.seen("a")
    assert not ids.seen("c") and not ids.seen("a")  # "a" was evicted by "c"... then re-added


def test_safe_neutralises_terminal_controls() -> None:
    assert safe("a\x1b[2Jb\x07\r") == "a\\x1b[2Jb\\x07\\x0d"
    assert safe("line\nnext\ttab ✓") == "line\\x0anext\\x09tab ✓"  # one message, one line (tests/test_render.py)
    assert safe("\u202etxt") == "\\u202etxt"


# ---------------------------------------------------------------- ACL


@pytest.mark.parametrize(
    ("filt", "pattern", "within"),
    [
        ("im/room/+/+", "im/room/#", True),
        ("im/room/#", "im/room/#", True),
        ("im/room", "im/room/#", True),
        ("#", "im/room/#", False),
        ("im/#", "im/room/#", False),
        ("im/+/lobby/x", "im/room/#", False),
        ("im/user/alice/#", "im/user/alice/#", True),
        ("im/user/+/#", "im/user/alice/#", False),
        ("im/user/alice/dm/+", "im/user/alice/#", True),
        ("im/events", "im/events", True),
        ("im/events/#", "im/events", False),
        ("im/presence/+", "im/presence/#", True),
    ],
)
def test_filter_within(filt: str, pattern: str, within: bool) -> None:
    assert filter_within(filt, pattern) is within


@given(
    st.lists(st.sampled_from(["im", "room", "user", "alice", "bob", "+", "#", "x"]), min_size=1, max_size=5),
    st.lists(st.sampled_from(["im", "room", "user", "alice", "bob", "x", "y"]), min_size=1, max_size=5),
)
def test_filter_within_is_sound(filt_levels: list[str], topic_levels: list[str]) -> None:
    """If a filter is within a pattern, every topic the filter matches, the pattern matches."""
    if "#" in filt_levels[:-1]:
        return
    filt, topic = "/".join(filt_levels), "/".join(topic_levels)
    for pattern in ("im/room/#", "im/user/alice/#", "im/events", "im/room/+/alice"):
        if filter_within(filt, pattern) and topic_matches(topic, filt):
            assert topic_matches(topic, pattern), (filt, pattern, topic)


@pytest.mark.parametrize(
    ("user", "topic", "access", "allowed"),
    [
        ("alice", "im/room/lobby/alice", Access.PUBLISH, True),
        ("alice", "im/room/lobby/bob", Access.PUBLISH, False),
        ("alice", "im/user/bob/dm/alice", Access.PUBLISH, True),
        ("alice", "im/user/bob/dm/carol", Access.PUBLISH, False),
        ("alice", "im/user/alice/dm/alice", Access.PUBLISH, True),
        ("alice", "im/user/bob/notice", Access.PUBLISH, False),
        ("alice", "im/status/alice/laptop", Access.PUBLISH, True),
        ("alice", "im/status/bob/laptop", Access.PUBLISH, False),
        ("alice", "im/request/alice/c1", Access.PUBLISH, True),
        ("alice", "im/request/bob/c1", Access.PUBLISH, False),
        ("alice", "im/room/+/alice", Access.PUBLISH, False),
        ("alice", "im/room/Lobby/alice", Access.PUBLISH, False),
        ("alice", "im/user/alice/dm/bob", Access.RECEIVE, True),
        ("alice", "im/user/bob/dm/alice", Access.RECEIVE, False),
        ("alice", "im/room/lobby/bob", Access.RECEIVE, True),
        ("alice", "im/presence/bob", Access.RECEIVE, True),
        ("register:alice", "im/room/lobby/alice", Access.PUBLISH, False),
    ],
)
def test_user_rules(user: str, topic: str, access: Access, allowed: bool) -> None:
    assert ACL.allows(user, Role.USER, topic, access) is allowed


def test_service_rules() -> None:
    assert ACL.allows("presence", Role.SERVICE, "im/user/bob/reply/x1", Access.PUBLISH)
    assert ACL.allows("presence", Role.SERVICE, "im/presence/bob", Access.PUBLISH)
    assert ACL.allows("presence", Role.SERVICE, "im/request/+/+", Access.SUBSCRIBE)
    assert not ACL.allows("presence", Role.SERVICE, "im/room/lobby/bob", Access.PUBLISH)
    assert not ACL.allows("presence", None, "im/presence/bob", Access.PUBLISH)


def test_the_archive_and_files_accounts_write_no_one_elses_notice() -> None:
    """Least privilege on the embedded broker as on Mosquitto and NATS: the archive and files
    workers write replies (files: downloads too) and their own notice topic, and nobody else's
    notice (a client trusts a rate notice there); presence and groups tell every user."""
    from imcli.broker.acl import SERVICE_WRITE_OF
    from imcli.groups.natsauth import SERVICE_RIGHTS

    for worker in ("archive", "files"):
        assert SERVICE_WRITE_OF[worker] == SERVICE_RIGHTS[worker][0]  # the same rights on NATS
        assert ACL.allows(worker, Role.SERVICE, "im/user/bob/reply/x1", Access.PUBLISH)
        assert ACL.allows(worker, Role.SERVICE, f"im/user/{worker}/notice", Access.PUBLISH)
        for topic in ("im/user/bob/notice", "im/presence/bob", "im/events", "im/group/team/info"):
            assert not ACL.allows(worker, Role.SERVICE, topic, Access.PUBLISH), (worker, topic)
        assert ACL.allows(worker, Role.SERVICE, "im/request/+/+", Access.SUBSCRIBE)  # their requests
    assert ACL.allows("files", Role.SERVICE, "im/user/bob/file/s1", Access.PUBLISH)
    assert not ACL.allows("archive", Role.SERVICE, "im/user/bob/file/s1", Access.PUBLISH)
    for worker in ("presence", "groups"):
        assert ACL.allows(worker, Role.SERVICE, "im/user/bob/notice", Access.PUBLISH)


def test_the_archive_and_files_accounts_read_what_mosquitto_and_nats_let_them() -> None:
    """Least privilege for reads too: the embedded broker's table is NATS's ``SERVICE_RIGHTS`` reads
    plus the account's own topics (as natsauth.NatsPermissions.service adds them), so the three
    brokers agree; another service's or user's private topics are out of reach."""
    from imcli.broker.acl import SERVICE_READ_OF
    from imcli.groups.natsauth import SERVICE_RIGHTS

    for worker in ("archive", "files"):
        assert set(SERVICE_READ_OF[worker]) == {*SERVICE_RIGHTS[worker][1], "user/%u/#"}
        for topic in ("im/request/bob/c1", "im/room/lobby/bob", f"im/user/{worker}/notice", "im/events"):
            assert ACL.allows(worker, Role.SERVICE, topic, Access.RECEIVE), (worker, topic)
            assert ACL.receive_check(topic)(worker, Role.SERVICE), (worker, topic)
        for topic in ("im/user/bob/notice", "im/user/bob/reply/c1", "im/status/bob/phone", "im/user/bob/sent/x"):
            assert not ACL.allows(worker, Role.SERVICE, topic, Access.RECEIVE), (worker, topic)
            assert not ACL.receive_check(topic)(worker, Role.SERVICE), (worker, topic)
        for filt in ("#", "im/#", "im/user/+/notice", "im/user/+/#", "im/status/+/+"):
            assert not ACL.allows(worker, Role.SERVICE, filt, Access.SUBSCRIBE), (worker, filt)
    assert ACL.allows("archive", Role.SERVICE, "im/user/+/dm/+", Access.SUBSCRIBE)
    assert ACL.allows("archive", Role.SERVICE, "im/group/+/msg/+", Access.SUBSCRIBE)
    assert not ACL.allows("archive", Role.SERVICE, "im/upload/+/+", Access.SUBSCRIBE)  # the files worker's
    assert not ACL.allows("archive", Role.SERVICE, "im/upload/bob/s1", Access.RECEIVE)
    assert not ACL.allows("archive", Role.SERVICE, "im/user/bob/friends", Access.RECEIVE)
    assert ACL.allows("files", Role.SERVICE, "im/upload/+/+", Access.SUBSCRIBE)
    assert ACL.allows("files", Role.SERVICE, "im/user/+/friends", Access.SUBSCRIBE)
    for topic in ("im/user/bob/dm/alice", "im/group/team/msg/bob"):  # chat is the archive's, not the files worker's
        assert not ACL.allows("files", Role.SERVICE, topic, Access.RECEIVE), topic
        assert ACL.allows("archive", Role.SERVICE, topic, Access.RECEIVE), topic
    for worker in ("presence", "groups"):  # read everything, as `topic read #` on Mosquitto
        assert ACL.allows(worker, Role.SERVICE, "im/#", Access.SUBSCRIBE)
        assert ACL.receive_check("im/user/bob/notice")(worker, Role.SERVICE)


def test_retain_only_on_state_topics() -> None:
    assert ACL.may_retain("im/status/alice/x")
    assert not ACL.may_retain("im/room/lobby/alice")
    assert not ACL.may_retain("im/user/bob/dm/alice")


# ---------------------------------------------------------------- accounts

FAST = fast_hasher()


def test_account_store_lifecycle(tmp_path: Path) -> None:
    store = AccountStore(tmp_path, FAST)
    store.add("alice", "password-1")
    assert store.verify("alice", "password-1") is not None
    assert store.verify("alice", "password-2") is None
    assert store.verify("nobody", "password-1") is None
    with pytest.raises(NameTaken):
        store.add("alice", "password-3")
    with pytest.raises(InvalidInput, match="reserved"):
        store.add("presence", "password-1")
    with pytest.raises(InvalidInput, match="too short"):
        store.add("bob", "short")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    other = AccountStore(tmp_path, FAST)  # another process's view
    other.remove("alice")
    assert store.get("alice") is None  # noticed the changed file
    with pytest.raises(NotFound):
        store.remove("alice")
    assert "password" not in repr(other.list_accounts())


def test_service_account_cannot_take_a_user_name(tmp_path: Path) -> None:
    store = AccountStore(tmp_path, FAST)
    store.add("worker", "password-1")
    with pytest.raises(NameTaken):
        store.ensure_service("worker", "password-2")
    store.ensure_service("presence", "password-3")
    assert store.cached_role("presence") is Role.SERVICE


def test_a_service_account_just_keyed_logs_in_without_a_second_argon2(tmp_path: Path) -> None:
    """imcli serve re-keys its workers' accounts at each start and they log in at once: the
    password it has just hashed needs no argon2 check (five of them held a start on a loaded
    machine). Only that password: another one still takes the full check, and fails."""
    store = AccountStore(tmp_path, FAST)
    store.ensure_service("presence", "key-of-this-run")
    assert store.recall("presence", "key-of-this-run") is not None
    assert store.recall("presence", "key-of-the-last-run") is None
    assert store.verify("presence", "key-of-the-last-run") is None
    store.ensure_service("presence", "key-of-the-next-run")  # a restart: the old key is forgotten
    assert store.recall("presence", "key-of-this-run") is None
    assert store.recall("presence", "key-of-the-next-run") is not None
    assert AccountStore(tmp_path, FAST).recall("presence", "key-of-the-next-run") is None  # in memory only


def test_remembered_login_is_an_hmac_and_is_forgotten_when_the_account_changes(tmp_path: Path) -> None:
    store = AccountStore(tmp_path, FAST)
    store.add("alice", "password-1")
    store.add("bob", "password-2")
    assert store.recall("alice", "password-1") is None  # nothing remembered before a full verification
    assert store.verify("alice", "password-1") is not None
    assert store.recall("alice", "password-1") is not None
    assert store.recall("alice", "password-2") is None
    assert store.verify("bob", "wrong-password") is None
    assert store.recall("bob", "wrong-password") is None  # a failure is never remembered
    remembered = store._verified["alice"]
    assert len(remembered) == 32 and b"password-1" not in remembered

    other = AccountStore(tmp_path, FAST)  # the operator, in another process
    other.remove("alice")
    other.add("alice", "password-3", reuse=True)  # same name, new password
    assert store.recall("alice", "password-1") is None
    assert store.verify("alice", "password-1") is None
    assert store.verify("alice", "password-3") is not None
    other.remove("alice")
    assert store.recall("alice", "password-3") is None
    assert store.verify("alice", "password-3") is None
    assert "alice" not in store._verified


# ---------------------------------------------------------------- broker indexes (imcli/broker/fanout.py)

_LEVEL = st.sampled_from(["im", "room", "user", "alice", "bob", "lobby", "status", "$SYS", ""])
_FILTER_LEVEL = st.one_of(_LEVEL, st.just("+"))
_TOPICS = st.lists(st.lists(_LEVEL, min_size=1, max_size=5).map("/".join), min_size=1, max_size=8)


def _filters(min_size: int) -> st.SearchStrategy[list[str]]:
    """Lists of topic filters of the levels above, some ending in '#'."""
    return st.lists(
        st.tuples(st.lists(_FILTER_LEVEL, min_size=0, max_size=4), st.booleans()).map(
            lambda t: "/".join([*t[0], "#"] if t[1] or not t[0] else t[0])
        ),
        min_size=min_size,
        max_size=8,
    )


@given(_TOPICS, _filters(min_size=1))
def test_indexes_never_miss_a_matching_filter_or_retained_topic(topics: list[str], filters: list[str]) -> None:
    index, retained = FilterIndex(), RetainedIndex()
    for f in filters:
        index.add(f)
    for t in topics:
        retained.add(t)
    for t in topics:
        candidates = set(index.candidates(t))
        assert {f for f in filters if topic_matches(t, f)} <= candidates
    for f in filters:
        assert {t for t in topics if topic_matches(t, f)} <= set(retained.under(f, topics))
    for t in topics:
        retained.discard(t)
    for f in filters:
        index.discard(f)
        assert all(len(retained.under(g, [])) == 0 for g in filters)
    assert len(index) == 0


def test_the_filter_index_stays_tracked_by_the_collector_as_filters_come() -> None:
    """A dict CPython stops tracking (only strings and tuples of strings in it) is tracked again, young,
    by its next insert, and walked whole by the next full collection: the broker's collector, which
    freezes what survives each full collection, then walked every filter of 10,000 users again each
    second of a join (issue 21). A tracked one, once frozen, stays frozen."""
    index = FilterIndex()
    for name in ("alice", "bob"):
        index.add(f"im/user/{name}/#")
    gc.collect()
    assert gc.is_tracked(index._head) and gc.is_tracked(index._by_head)
    index.discard("im/user/bob/#")
    index.add("im/user/carol/#")
    assert set(index.candidates("im/user/carol/dm/alice")) == {"im/user/carol/#"}
    assert set(index.candidates("im/user/bob/dm/alice")) == set()


@given(_TOPICS, _filters(min_size=2))
def test_kept_matches_follow_the_filters_added_and_discarded(topics: list[str], filters: list[str]) -> None:
    """``FilterIndex.matching`` keeps each topic's matching filters (issue 21): what it answers is
    always what matching every filter in the index would answer, as filters come and go."""
    index = FilterIndex()
    present: set[str] = set()

    def check() -> None:
        for t in topics:
            assert set(index.matching(t, topic_matches)) == {f for f in present if topic_matches(t, f)}

    for f in filters:
        index.add(f)
        present.add(f)
        check()
    for f in filters[::2]:
        index.discard(f)
        present.discard(f)
        check()


def test_kept_matches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "MATCHES_KEPT", 10)
    index = FilterIndex()
    index.add("im/room/+/+")
    for i in range(25):
        assert index.matching(f"im/room/r{i}/alice", topic_matches) == ["im/room/+/+"]
        assert len(index._matching) <= 10
    long = "im/room/" + "r" * 500 + "/alice"
    assert index.matching(long, topic_matches) == ["im/room/+/+"]
    assert long not in index._matching


_TOPIC_LEVEL = st.sampled_from(["im", "room", "user", "alice", "bob", "dm", "presence", "events", "group", "info", "x"])


@given(
    st.lists(_TOPIC_LEVEL, min_size=1, max_size=5).map("/".join),
    st.sampled_from(["alice", "bob", "register:alice", "Bad", None]),
    st.sampled_from([Role.USER, Role.SERVICE, None]),
)
def test_receive_check_decides_as_allows(topic: str, user: str | None, role: Role | None) -> None:
    # the fan-out path decides RECEIVE once per message; it must agree with the rule itself
    assert ACL.receive_check(topic)(user, role) == ACL.allows(user, role, topic, Access.RECEIVE)


def test_workers_and_serve_keep_their_archives_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from imcli.client.config import default_data_dir, default_workers_dir

    monkeypatch.delenv("IMCLI_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    broker, workers = default_data_dir(), default_workers_dir()
    assert broker.parent == workers.parent == tmp_path / "imcli"
    assert broker != workers


# ---------------------------------------------------------------- the remaining length (imcli/core/framing.py)


@given(st.integers(0, MAX_REMAINING_LENGTH), st.binary(max_size=8))
def test_a_remaining_length_decodes_to_itself_and_says_where_the_body_starts(n: int, after: bytes) -> None:
    encoded = encode_length(n)
    assert len(encoded) == 1 + (n >= 128) + (n >= 128**2) + (n >= 128**3)
    assert decode_length(b"\x30" + encoded + after, 1) == (n, 1 + len(encoded))
    for cut in range(len(encoded)):  # not all of it has come: wait for more
        assert decode_length(b"\x30" + encoded[:cut], 1) is None


def test_a_remaining_length_of_five_bytes_is_refused_at_its_fourth() -> None:
    assert decode_length(b"\x30\xff\xff\xff\x7f", 1) == (MAX_REMAINING_LENGTH, 5)
    assert decode_length(b"\x30\x85\x00", 1) == (5, 3)  # a needless second byte is still a length
    with pytest.raises(MalformedLength, match="more than 4 bytes"):
        decode_length(b"\x30\xff\xff\xff\xff", 1)  # no fifth byte needed to know
    with pytest.raises(ValueError, match="0 to 268435455"):
        encode_length(MAX_REMAINING_LENGTH + 1)


def test_build_schemas_builds_every_payload_model_in_a_fresh_interpreter() -> None:
    """A command builds only the models it touches (defer_build); the broker and the workers call
    ``build_schemas`` at start so that no message of theirs waits for one to be built (issue 16)."""
    script = (
        "from imcli.core import wire\n"
        "def models(cls):\n"
        "    for sub in cls.__subclasses__():\n"
        "        yield sub\n"
        "        yield from models(sub)\n"
        "every = list(models(wire.WireModel))\n"
        "assert not wire._PAYLOAD.pydantic_complete and not any(m.__pydantic_complete__ for m in every)\n"
        "wire.build_schemas()\n"
        "assert wire._PAYLOAD.pydantic_complete\n"
        "print(sorted(m.__name__ for m in every if not m.__pydantic_complete__), len(every))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    missing, count = run.stdout.rsplit(" ", 1)
    assert missing == "[]"
    assert int(count) > 40  # ChatMessage, the file models, the requests and replies, ...


# ---------------------------------------------------------------- MqttClient against a broker of a few lines


def few_lines_broker(grants: list[int]) -> tuple[int, list[int], Callable[[], None]]:
    """A broker that accepts a CONNECT and answers the n-th SUBSCRIBE with ``grants[n]`` for each of its
    filters (1, or 0x80: refused); its port, the types of the packets it read, and a join for its end."""
    import socket
    import threading

    from tests.rawmqtt import read_packets

    server = socket.create_server(("127.0.0.1", 0))
    got: list[int] = []
    subscribes = iter(grants)

    def broker() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)

            def answer(packets: list[tuple[int, bytes]]) -> bool:  # read_packets calls it after each read
                for first, body in packets[len(got) :]:
                    got.append(first >> 4)
                    if first >> 4 == 1:  # CONNECT: accepted
                        conn.sendall(b"\x20\x02\x00\x00")
                    elif first >> 4 == 8:  # SUBSCRIBE: its packet id, then a topic filter and a QoS each
                        count, at = 0, 2
                        while at < len(body):
                            at += 2 + int.from_bytes(body[at : at + 2], "big") + 1
                            count += 1
                        conn.sendall(bytes([0x90, 2 + count]) + body[:2] + bytes([next(subscribes)] * count))
                return got[-1:] == [14]  # DISCONNECT

            read_packets(conn, answer)

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(10)
        server.close()

    return server.getsockname()[1], got, join


@pytest.mark.parametrize("clean", [True, False])
def test_a_clean_session_unsubscribes_before_it_disconnects(clean: bool) -> None:
    """What the client sends after its SUBSCRIBE: a clean session ends with UNSUBSCRIBE then DISCONNECT
    (nats-server 2.9 would otherwise delete its JetStream consumers while holding the session's lock,
    blocking the routes that carry its messages for up to 4 s each: imcli/core/mqtt.py); a persistent
    session keeps its subscriptions, and so sends no UNSUBSCRIBE."""
    from imcli.core.mqtt import BrokerAddress, Credentials, MqttClient

    port, got, join = few_lines_broker([1])
    client = MqttClient(BrokerAddress("127.0.0.1", port), Credentials("alice", "pw"), "alice:t", clean_session=clean)
    client.connect()
    client.subscribe(["im/events"])
    client.close()
    join()
    assert got == ([1, 8, 10, 14] if clean else [1, 8, 14])  # CONNECT, SUBSCRIBE, (UNSUBSCRIBE), DISCONNECT


def test_a_refused_subscribe_of_ones_own_topics_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded NATS 2.9 cluster refuses a QoS 1 SUBSCRIBE whose JetStream consumer is not made within
    4 s: a command's or a listener's own topics are asked for again (SUBSCRIBE_TRIES), and the last
    refusal is still an error. (This fake broker refuses at once, which counts as slow here: a refusal
    at once is final, tests/test_subscribe_tries.py.)"""
    from imcli.core import mqtt
    from imcli.core.errors import PublishFailed
    from imcli.core.mqtt import SUBSCRIBE_TRIES, BrokerAddress, Credentials, MqttClient

    monkeypatch.setattr(mqtt, "FINAL_REFUSAL", 0.0)

    port, got, join = few_lines_broker([0x80, 1])
    client = MqttClient(BrokerAddress("127.0.0.1", port), Credentials("alice", "pw"), "alice:t")
    client.connect()
    client.subscribe(["im/user/alice/reply/+"], tries=SUBSCRIBE_TRIES)  # refused, then granted
    client.close()
    join()
    assert got == [1, 8, 8, 10, 14]
    port, got, join = few_lines_broker([0x80] * SUBSCRIBE_TRIES)
    client = MqttClient(BrokerAddress("127.0.0.1", port), Credentials("alice", "pw"), "alice:t")
    client.connect()
    with pytest.raises(PublishFailed, match="refused the subscription to im/user/alice/reply/"):
        client.subscribe(["im/user/alice/reply/+"], tries=SUBSCRIBE_TRIES)
    client.close()
    join()
    assert got == [1] + [8] * SUBSCRIBE_TRIES + [14]  # nothing granted, nothing to unsubscribe
