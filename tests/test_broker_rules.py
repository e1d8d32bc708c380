"""The embedded broker's decisions as plain functions and small classes, without a broker:
the publish checks, the connection gate's, admission's and session upkeep's rules, the
output bound, pending connections, keep-alive and Last Wills (imcli/broker/server.py's
docstring says which module holds which rule). The broker-level tests (test_security.py,
test_account_limits.py, test_wills.py, …) show the same rules end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from amqtt.session import ApplicationMessage, Session

from imcli.broker.accounts import Role
from imcli.broker.acl import Access, TopicAcl
from imcli.broker.admission import over_connection_limit, over_subscription_limit, refuse_new_session
from imcli.broker.connection_gate import bound_client_id, shown_username, will_allowed
from imcli.broker.limits import REQUEST_NOTICES, Limits, PublishRate
from imcli.broker.listeners import peer_host
from imcli.broker.output import HELD_COPY, OutputBound, Verdict
from imcli.broker.pending import PendingConnections
from imcli.broker.publish_checks import Decision, PublishChecks, decide_publish
from imcli.broker.reader import only_pubacks
from imcli.broker.session_upkeep import expired, session_revoked, sessions_to_drop
from imcli.broker.sessions import read_timeout, start_session
from imcli.broker.topic_access import TopicAccess
from imcli.broker.wills import LastWills, Will, will_of
from imcli.core.wire import Topics

T = Topics()
ROLES = {"alice": Role.USER, "bob": Role.USER, "presence": Role.SERVICE}


def access() -> TopicAccess:
    return TopicAccess(T, ROLES.get)  # None for an unknown account


# ---------------------------------------------------------------- publish checks


def decide(sender: str, topic: str, size: int = 10, **options: Any) -> Decision:
    settings: dict[str, Any] = {"retain": False, "rate_ok": True, "trusted": False, "max_payload": 100, "rate": 5.0}
    return decide_publish(access(), sender, topic, size, **(settings | options))


def test_a_publish_within_every_check_is_delivered() -> None:
    assert decide("alice", "im/room/lobby/alice") == Decision(deliver=True)


def test_an_empty_topic_closes_the_connection_before_any_other_check() -> None:
    assert decide("alice", "", rate_ok=False, size=1000).close


def test_the_checks_come_in_order_rate_size_retain_wildcard_acl() -> None:
    over_everything = decide("alice", "im/room/#", size=1000, rate_ok=False, retain=True)
    assert over_everything.telling is not None
    assert over_everything.telling.code == "rate"
    too_large = decide("alice", "im/room/#", size=1000, retain=True)
    assert too_large.telling is not None
    assert too_large.telling.code == "too_large"
    retained_chat = decide("alice", "im/room/#", retain=True)
    assert retained_chat.telling is not None
    assert retained_chat.telling.code == "denied"
    assert decide("alice", "im/room/#").close


def test_only_a_files_chunks_may_fill_max_chunk() -> None:
    assert decide("alice", "im/upload/alice/u1", size=1000, max_chunk=1000).deliver
    chunk_over = decide("alice", "im/upload/alice/u1", size=1001, max_chunk=1000)
    assert (
        chunk_over.telling is not None and chunk_over.telling.code == "too_large" and "1000" in chunk_over.telling.text
    )
    for topic in ("im/room/lobby/alice", "im/fetch/alice/s1", "im/room/upload/alice"):  # chat, acks: max_payload
        refused = decide("alice", topic, size=101, max_chunk=1000)
        assert refused.telling is not None and refused.telling.code == "too_large", topic
    assert decide("alice", "im/upload/alice/u1", size=101).telling is not None  # no max_chunk: max_payload


@pytest.mark.parametrize("topic", ["im/room/+/alice", "im/room/#", "$SYS/broker"])
def test_a_wildcard_or_dollar_topic_closes_the_connection(topic: str) -> None:
    assert decide("alice", topic) == Decision(deliver=False, close=True)


def test_a_topic_the_acl_refuses_is_dropped_with_a_notice() -> None:
    decision = decide("alice", "im/room/lobby/bob")  # writing as someone else
    assert not decision.deliver
    assert not decision.close
    assert decision.telling is not None
    assert decision.telling.code == "denied"
    assert decision.telling.topic == "im/room/lobby/bob"


def test_a_trusted_worker_has_no_size_limit_but_keeps_its_acl() -> None:
    assert decide("presence", "im/presence/alice", size=10_000, trusted=True).deliver
    assert not decide("presence", "im/room/lobby/alice", trusted=True).deliver


def test_state_records_may_be_retained_and_chat_may_not() -> None:
    assert decide("alice", "im/status/alice/laptop", retain=True).deliver
    assert not decide("alice", "im/room/lobby/alice", retain=True).deliver


def test_judge_asks_the_status_quota_after_the_other_checks_and_not_for_workers() -> None:
    asked: list[tuple[str, int, bool]] = []

    def quota(topic: str, size: int, retain: bool) -> Any:
        asked.append((topic, size, retain))
        return decide("alice", "im/room/lobby/bob").telling  # any refusal

    checks = PublishChecks(access(), Limits(), 100, statuses=quota)
    assert not checks.judge("alice", "im/status/alice/laptop", 10, retain=True).deliver
    assert asked == [("im/status/alice/laptop", 10, True)]
    assert not checks.judge("alice", "im/room/lobby/bob", 10, retain=False).deliver  # refused before the quota
    assert checks.judge("presence", "im/status/alice/laptop", 10, retain=True).deliver
    assert len(asked) == 1


def test_a_qos1_publish_is_charged_once_before_its_puback() -> None:
    checks = PublishChecks(access(), Limits(publish_rate=1.0, publish_burst=1), 100)
    message = ApplicationMessage(1, "im/room/lobby/alice", 1, b"hi", False)
    assert checks.charge("alice", message, 2)  # the token is taken here
    assert checks.take_charge(message) == (True, True)
    assert checks.take_charge(message) == (False, None)  # once only
    assert not checks.charge("alice", ApplicationMessage(2, "im/room/lobby/alice", 1, b"hi", False), 2)  # no token


def test_one_rate_notice_a_second_at_most() -> None:
    checks = PublishChecks(access(), Limits(publish_rate=1.0, publish_burst=1), 100)
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).deliver  # the one token
    first = checks.judge("alice", "im/room/lobby/alice", 1, retain=False)
    again = checks.judge("alice", "im/room/lobby/alice", 1, retain=False)
    assert first.telling is not None
    assert first.telling.code == "rate"
    assert again == Decision(deliver=False)
    assert checks.judge("presence", "im/presence/alice", 1, retain=False).deliver  # workers have no rate


def test_dropped_requests_are_told_beyond_one_notice_a_second() -> None:
    """One rate notice a second about anything, and up to ``REQUEST_NOTICES`` more about dropped
    requests (each has an asker waiting), each naming its topic and when to retry."""
    rate = PublishRate(rate=2, burst=1)
    assert rate.allow("alice", 0.0)
    assert not rate.allow("alice", 0.0)
    assert rate.retry_after("alice", 0.0) == 0.5
    assert rate.retry_after("alice", 0.25) == 0.25
    assert rate.should_warn("alice", 0.0)
    assert not rate.should_warn("alice", 0.1)
    assert [rate.should_warn("alice", 0.1, request=True) for _ in range(REQUEST_NOTICES + 1)] == [True] * (
        REQUEST_NOTICES
    ) + [False]
    assert rate.should_warn("alice", 1.2, request=True)  # a second later: again

    checks = PublishChecks(access(), Limits(publish_rate=1.0, publish_burst=1), 100)
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).deliver  # the one token
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).telling is not None  # the notice a second
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).telling is None
    told = checks.judge("alice", "im/request/alice/" + "a" * 32, 1, retain=False).telling
    assert told is not None and told.code == "rate" and told.topic == "im/request/alice/" + "a" * 32
    assert told.retry is not None and 0 < told.retry <= 1.0


def test_a_rate_notice_names_the_limit_that_dropped_the_message() -> None:
    """A file's chunk dropped on the file-transfer rate is told as such, with that bucket's own
    retry time; a chat message or a request dropped on the chat rate keeps the chat rate's words."""
    limits = Limits(publish_rate=1.0, publish_burst=1, file_rate=4.0, file_burst=1)
    checks = PublishChecks(access(), limits, 100)
    upload = "im/upload/alice/" + "u" * 32
    assert checks.judge("alice", upload, 1, retain=False).deliver  # the file bucket's one token
    told = checks.judge("alice", upload, 1, retain=False).telling
    assert told is not None and told.code == "rate" and told.topic == upload
    assert told.text == "slow down: file transfer messages (chunks, acknowledgements) beyond 4 a second are dropped"
    assert told.retry is not None and 0 < told.retry <= 0.25  # 4 a second: the file bucket's, not the chat's 1 s
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).deliver  # the chat bucket is its own
    chat = PublishChecks(access(), limits, 100)
    assert chat.judge("alice", "im/room/lobby/alice", 1, retain=False).deliver
    told = chat.judge("alice", "im/room/lobby/alice", 1, retain=False).telling
    assert told is not None and told.text == "slow down: messages beyond 1 a second are dropped"
    assert told.retry is not None and 0.25 < told.retry <= 1.0


def test_requests_dropped_beyond_the_notices_are_held_for_one_notice_a_second() -> None:
    """Past the one notice a second and ``REQUEST_NOTICES`` about requests, a dropped request is
    not told at once but named in the account's next aggregated notice (``unheard``); a bot's
    malformed correlation id is not (a notice cannot carry it: the ACL refuses it anyway)."""
    checks = PublishChecks(access(), Limits(publish_rate=0.001, publish_burst=1), 100)
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False).deliver
    ids = [f"{i:032x}" for i in range(REQUEST_NOTICES + 4)]
    decisions = [checks.judge("alice", f"im/request/alice/{c}", 1, retain=False) for c in ids]
    told = [d.telling.topic for d in decisions if d.telling is not None]
    assert told == [f"im/request/alice/{c}" for c in ids[: REQUEST_NOTICES + 1]]  # the one a second, then ten
    assert [d.unheard for d in decisions[REQUEST_NOTICES + 1 :]] == ids[REQUEST_NOTICES + 1 :]
    assert checks.judge("alice", "im/request/alice/not.an.id", 1, retain=False) == Decision(deliver=False)
    assert checks.judge("alice", f"im/request/bob/{ids[0]}", 1, retain=False) == Decision(deliver=False)  # not hers
    assert checks.judge("alice", "im/room/lobby/alice", 1, retain=False) == Decision(deliver=False)


def test_the_fullest_aggregated_rate_notice_fits_the_payload_limit() -> None:
    from imcli.broker.limits import UNHEARD_REQUESTS
    from imcli.broker.notices import requests_dropped
    from imcli.core.wire import DEFAULT_MAX_PAYLOAD, Notice, encode, new_id

    telling = requests_dropped([new_id() for _ in range(UNHEARD_REQUESTS)], 1e6, 86400.0)
    notice = Notice(code=telling.code, text=telling.text, retry=telling.retry, requests=list(telling.requests))
    assert len(encode(notice)) <= DEFAULT_MAX_PAYLOAD


# ---------------------------------------------------------------- connection gate


def test_shown_username_cuts_an_invite_code_off() -> None:
    assert shown_username("register:carol:SECRET") == "register:carol:…"
    assert shown_username("register:carol") == "register:carol"
    assert shown_username("alice") == "alice"
    assert shown_username(None) is None


def test_a_client_id_is_bound_to_its_account() -> None:
    assert bound_client_id("alice", "alice", True) == "alice"
    assert bound_client_id("alice", "alice:laptop", False) == "alice:laptop"
    assert bound_client_id("alice", "bob:laptop", True) is None
    assert bound_client_id("alice", "alicex:laptop", True) is None


def test_an_empty_or_amqtt_random_client_id_gets_one_of_the_account() -> None:
    for sent in (None, "", "amqtt/12345"):
        given = bound_client_id("alice", sent, True)
        assert given is not None
        assert given.startswith("alice:")
        assert len(given) > len("alice:")
    assert bound_client_id("alice", "amqtt/12345", False) is None  # a persistent session must name itself


def test_a_will_is_allowed_where_its_sender_may_publish_and_retained_only_on_state() -> None:
    acl = TopicAcl(T)
    assert will_allowed(acl, "alice", Role.USER, "im/status/alice/laptop", retain=True)
    assert will_allowed(acl, "alice", Role.USER, "im/room/lobby/alice", retain=False)
    assert not will_allowed(acl, "alice", Role.USER, "im/room/lobby/alice", retain=True)
    assert not will_allowed(acl, "alice", Role.USER, "im/status/bob/laptop", retain=False)
    assert not will_allowed(acl, "alice", Role.USER, "im/room/#", retain=False)


# ---------------------------------------------------------------- admission


def test_the_connection_limit_counts_a_reconnect_of_the_same_client_as_a_replacement() -> None:
    assert not over_connection_limit(1, replaces_own=False, limit=2)
    assert over_connection_limit(2, replaces_own=False, limit=2)
    assert not over_connection_limit(2, replaces_own=True, limit=2)


def test_a_new_persistent_session_is_refused_only_when_none_is_idle() -> None:
    assert not refuse_new_session({}, "a:1", 1)
    assert not refuse_new_session({"a:1": True}, "a:2", 2)
    assert refuse_new_session({"a:1": True}, "a:2", 1)
    assert not refuse_new_session({"a:1": False}, "a:2", 1)  # the idle one makes room


def test_subscribing_again_to_a_held_filter_is_never_refused() -> None:
    assert not over_subscription_limit(1, already_held=False, limit=2)
    assert over_subscription_limit(2, already_held=False, limit=2)
    assert not over_subscription_limit(2, already_held=True, limit=2)


# ---------------------------------------------------------------- session upkeep


def test_sessions_away_for_the_expiry_or_longer_expire() -> None:
    assert expired({"a:1": 0.0, "a:2": 50.0, "a:3": 40.0}, now=100.0, expiry=60.0) == ["a:1", "a:3"]
    assert expired({}, now=100.0, expiry=60.0) == []


def test_sessions_to_drop_are_the_longest_idle_and_only_as_many_as_needed() -> None:
    assert sessions_to_drop({"a:1": 3.0, "a:2": 1.0}, held=3, limit=2) == ["a:2"]
    assert sessions_to_drop({"a:1": 3.0}, held=4, limit=2) == ["a:1"]  # not enough idle: what there is
    assert sessions_to_drop({"a:1": 3.0}, held=2, limit=2) == []


def test_a_session_is_revoked_when_its_account_is_gone_or_replaced() -> None:
    current = {"alice": "k1", "bob": "k2"}
    assert not session_revoked("alice", current, set())
    assert session_revoked("carol", current, set())
    assert session_revoked("bob", current, {"bob"})
    assert not session_revoked("register:carol", current, set())  # a registration login has none yet
    assert not session_revoked(None, current, set())


# ---------------------------------------------------------------- keep-alive, Last Wills, peers


def test_the_read_timeout_is_one_and_a_half_keep_alives_and_at_least_the_delay_more() -> None:
    assert read_timeout(60, 2) == 90
    assert read_timeout(2, 2) == 4
    assert read_timeout(0, 2) == 0  # no keep-alive: never
    assert read_timeout(10, None) == 10  # amqtt's delay not an int: as the client asked


def test_a_clean_session_replaces_its_client_ids_and_a_persistent_one_resumes() -> None:
    deleted: list[str] = []

    async def delete(client_id: str) -> None:
        deleted.append(client_id)

    def connect(client_id: str, *, clean: bool, keep_alive: int = 60) -> Session:
        session = Session()
        session.client_id, session.clean_session, session.username = client_id, clean, "alice"
        session.keep_alive, session.will_flag, session.will_topic = keep_alive, True, "im/status/alice/d"
        return session

    kept = connect("alice:laptop", clean=False, keep_alive=10)
    table: dict[str, tuple[Session, Any]] = {"alice:laptop": (kept, None)}

    async def run() -> None:
        clean = connect("alice:phone", clean=True)
        assert await start_session(clean, table, delete, 2) is clean
        assert deleted == ["alice:phone"]
        assert (clean.parent, clean.keep_alive) == (0, 90)
        resumed = await start_session(connect("alice:laptop", clean=False, keep_alive=20), table, delete, 2)
        assert resumed is kept
        assert (kept.parent, kept.keep_alive, kept.will_topic) == (1, 30, "im/status/alice/d")
        new = connect("alice:tablet", clean=False)
        assert await start_session(new, table, delete, 2) is new
        assert new.parent == 0
        assert deleted == ["alice:phone"]

    asyncio.run(run())


def test_peer_host_is_the_address_of_a_peer_name() -> None:
    assert peer_host(("192.0.2.7", 1883)) == "192.0.2.7"
    assert peer_host(("2001:db8::1", 1883, 0, 0)) == "2001:db8::1"
    assert peer_host(None) is None
    assert peer_host(()) is None


def test_will_of_reads_the_will_of_a_connect() -> None:
    session = Session()
    assert will_of(session) is None
    session.will_flag, session.will_topic, session.will_message = True, "im/status/alice/laptop", b""
    session.will_qos, session.will_retain = 1, True
    assert will_of(session) == Will("im/status/alice/laptop", b"", 1, True)


def test_a_will_fires_checked_unless_its_connection_ended_with_disconnect() -> None:
    delivered: list[tuple[str, bool, bool, int]] = []

    async def deliver(session: Session, topic: str, payload: bytes, *, qos: int, retain: bool, journal: bool) -> None:
        delivered.append((topic, retain, journal, qos))  # qos: the Will's (kept if retained), not forced on copies

    wills = LastWills(PublishChecks(access(), Limits(), 100), deliver)
    session = Session()
    session.client_id, session.username = "alice:laptop", "alice"
    status = Will("im/status/alice/laptop", b"", 1, True)

    async def run() -> None:
        await wills.connection_ended(session, status, disconnected=True)
        await wills.connection_ended(session, None, disconnected=False)
        await wills.connection_ended(session, Will("im/status/bob/laptop", b"", 0, True), disconnected=False)
        await wills.connection_ended(session, Will("im/room/lobby/alice", b"x", 0, True), disconnected=False)
        await wills.connection_ended(session, status, disconnected=False)

    asyncio.run(run())
    assert delivered == [("im/status/alice/laptop", True, True, 1)]


# ---------------------------------------------------------------- output bound and pending connections


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


def test_output_past_the_drop_limit_drops_qos0_and_past_the_close_limit_closes() -> None:
    bound, transport = OutputBound(drop_at=100, close_at=1000, stuck_after=10.0), FakeTransport()
    bound.watch("w", transport)
    assert bound.admit("w", "alice:laptop", qos=0, size=50) is Verdict.WRITE
    transport.buffered = 200
    assert bound.admit("w", "alice:laptop", qos=0, size=50) is Verdict.DROP
    assert bound.admit("w", "alice:laptop", qos=1, size=50) is Verdict.WRITE
    assert bound.admit("w", "alice:laptop", qos=1, size=50, batched=800) is Verdict.CLOSED
    assert transport.aborted
    assert bound.closed == ["alice:laptop"]
    assert bound.admit("w", "alice:laptop", qos=0, size=1) is Verdict.CLOSED  # closing: nothing more
    assert bound.admit("unwatched", "x", qos=0, size=10**9) is Verdict.WRITE


def test_an_unacknowledged_copy_counts_until_its_task_is_done() -> None:
    async def run() -> None:
        bound = OutputBound(drop_at=10, close_at=10**6, stuck_after=10.0)
        bound.watch("w", FakeTransport())
        puback: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        bound.in_task("w", 100, puback)
        assert bound.waiting("w") == 100 + HELD_COPY
        puback.set_result(None)
        await asyncio.sleep(0)  # its done callback
        assert bound.waiting("w") == 0

    asyncio.run(run())


def test_a_connection_that_takes_nothing_for_stuck_after_is_closed() -> None:
    bound, transport = OutputBound(drop_at=100, close_at=1000, stuck_after=10.0), FakeTransport()
    bound.watch("w", transport)
    bound.check(0.0)  # nothing waiting: not stalled
    transport.buffered = 50
    bound.check(1.0)  # output waiting and none taken: stalled from now
    bound.check(10.9)
    assert not transport.aborted
    transport.buffered = 40  # some taken: stalled no more
    bound.check(11.0)
    bound.check(12.0)  # none taken since: stalled from now
    bound.check(21.9)
    assert not transport.aborted
    bound.check(22.0)
    assert transport.aborted
    assert bound.closed == ["a connection"]


def test_pending_connections_past_a_limit_close_the_oldest_silent_one() -> None:
    now = [0.0]
    closed: list[str] = []
    pending = PendingConnections(per_address=2, total=3, grace=1.0, clock=lambda: now[0])

    def arrive(key: str, address: str) -> None:
        pending.arrived(key, address, lambda: closed.append(key))

    arrive("a1", "192.0.2.1")
    arrive("a2", "192.0.2.1")
    arrive("a3", "192.0.2.1")  # a burst within the grace: all kept
    assert closed == []
    now[0] = 2.0
    pending.enforce()
    assert closed == ["a1"]
    pending.done("a2")  # its CONNECT was read
    arrive("b1", "192.0.2.2")
    arrive("c1", "192.0.2.3")
    now[0] = 4.0
    pending.enforce()
    arrive("d1", "192.0.2.4")  # four in all: the oldest silent one goes
    assert closed == ["a1", "a3"]
    assert len(pending) == 3
    pending.done("nobody")  # idempotent


@pytest.mark.parametrize(
    ("data", "settled_at_once"),
    [
        (b"\x40\x02\x00\x01", True),
        (b"\x40\x02\x00\x01\x40\x02\xff\xff", True),
        (b"", False),
        (b"\x40\x02\x00\x00", False),  # packet id 0: the reader's task ends the connection
        (b"\x40\x02\x00\x01\x40\x02\x00\x00", False),
        (b"\x40\x02\x00", False),  # a PUBACK not yet whole
        (b"\x40\x02\x00\x01\xc0\x00", False),  # with a PINGREQ: the task, in order
        (b"\x40\x03\x00\x01\x00", False),
        (b"\x41\x02\x00\x01", False),  # reserved flags: malformed, the task says so
        (b"\x32\x02\x00\x01", False),
    ],
)
def test_only_whole_pubacks_are_settled_where_they_arrive(data: bytes, settled_at_once: bool) -> None:
    assert only_pubacks(data) is settled_at_once


class _Writer:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Handler:
    def __init__(self) -> None:
        self.writer = _Writer()


def test_a_dms_write_takes_its_own_connections_copies_and_leaves_a_rooms_others_for_the_round() -> None:
    """``Deliveries.flush(only)`` (``FanOut.publish`` for a message of a few copies, issue 21): the
    DM's connection gets its whole buffer at once, a room's copy queued before the DM first (nothing
    overtakes on a connection); the room's other connections wait for the end of the round."""
    from imcli.broker.fanout import Deliveries, EncodedPublish

    async def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        deliveries = Deliveries(loop)
        bob, carol = _Handler(), _Handler()
        session: Any = object()
        room, dm = EncodedPublish("im/room/r/alice", b"room"), EncodedPublish("im/user/bob/dm/alice", b"dm")
        for handler in (carol, bob):
            deliveries.add(handler, session, room, 0)
        deliveries.flush_soon()
        deliveries.recent.clear()
        deliveries.add(bob, session, dm, 0)
        deliveries.flush(deliveries.recent)
        at_once = (list(bob.writer.written), list(carol.writer.written))
        await asyncio.sleep(0)  # the end of the round
        return at_once[0], at_once[1], carol.writer.written

    bob_now, carol_now, carol_later = asyncio.run(run())
    room_copy, dm_copy = b"\x30\x15\x00\x0fim/room/r/aliceroom", b"\x30\x18\x00\x14im/user/bob/dm/alicedm"
    assert bob_now == [room_copy + dm_copy]
    assert carol_now == []
    assert carol_later == [room_copy]


def test_a_files_chunk_is_not_written_while_chat_waits_to_be_read_and_keeps_its_order() -> None:
    """``Deliveries`` with ``chat_waiting`` (imcli/broker/chatfirst.py, issue 16): a copy holding a
    file's chunk (``fanout.CHUNK`` bytes or more) is never written in the callback that made it (the
    chunk's handling: seventh session), and not while chat waits to be read; the connection's later
    copies join it, in order. With chat waiting at once, it goes out a timer and a round later, even
    if chat waits again then (held once at most); with nothing waiting, in the next callback, which
    looks again: chat arriving meanwhile holds it then. Small copies are written at once all the same."""
    from types import SimpleNamespace

    from imcli.broker.fanout import CHUNK, Deliveries, EncodedPublish

    async def run(looks: list[bool]) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        marked: list[Any] = []
        answers = iter(looks)
        look: Any = SimpleNamespace(chat_waiting=lambda: next(answers, True), mark_bulk=marked.append)
        deliveries = Deliveries(loop, chat_first=look)
        worker, bob = _Handler(), _Handler()
        session: Any = object()
        chunk, line = EncodedPublish("files/x", bytes(CHUNK)), EncodedPublish("im/room/r/alice", b"hi")
        deliveries.add(worker, session, chunk, 0)
        deliveries.flush([worker])
        deliveries.add(worker, session, line, 0)
        deliveries.add(bob, session, line, 0)
        deliveries.flush([worker, bob])
        at_once = list(worker.writer.written)
        await asyncio.sleep(0)  # the next callbacks
        next_round = list(worker.writer.written)
        for _ in range(3):  # the timer, then a round
            await asyncio.sleep(0.001)
        return (at_once, next_round, worker.writer.written, bob.writer.written,
                [chunk.qos0_head + chunk.data, line.qos0_head + line.data])  # fmt: skip

    # chat waiting at the first look: held a timer and a round (the second look is not asked)
    at_once, next_round, later, bob_got, (chunk_copy, line_copy) = asyncio.run(run([True]))
    assert (at_once, next_round, later, bob_got) == ([], [], [chunk_copy + line_copy], [line_copy])
    # nothing waiting: written in the next callback, with the copy that joined it
    at_once, next_round, later, bob_got, _ = asyncio.run(run([False, False]))
    both = chunk_copy + line_copy
    assert (at_once, next_round, later, bob_got) == ([], [both], [both], [line_copy])
    # chat arriving during the handling (waiting at the second look): held then, written a timer later
    at_once, next_round, later, bob_got, _ = asyncio.run(run([False, True]))
    assert (at_once, next_round, later, bob_got) == ([], [], [chunk_copy + line_copy], [line_copy])


def test_chat_first_sees_a_readable_socket_unless_it_has_sent_a_files_chunk() -> None:
    """``chatfirst.ChatFirst.chat_waiting``: a socket of the loop's with bytes to read counts, once
    its connection is marked as a transfer's (``mark_bulk``) it does not, and once forgotten (its
    connection ended) it counts again; the look takes nothing from the loop's own selector."""
    import selectors
    import socket
    from types import SimpleNamespace

    from imcli.broker import chatfirst

    async def run() -> tuple[bool, bool, bool, bool, bool]:
        loop = asyncio.get_running_loop()
        look = chatfirst.ChatFirst(loop)
        a, b = socket.socketpair()
        seen: list[bytes] = []
        loop.add_reader(a.fileno(), lambda: seen.append(a.recv(10)))
        try:
            before = look.chat_waiting()
            b.send(b"x")
            readable = look.chat_waiting()
            look.mark_bulk(SimpleNamespace(get_extra_info=lambda name: a if name == "socket" else None))
            bulk = look.chat_waiting()
            look.forget(a.fileno())
            again = look.chat_waiting()
            await asyncio.sleep(0.01)  # the loop's own select still finds it readable
            return before, readable, bulk, again, seen == [b"x"]
        finally:
            loop.remove_reader(a.fileno())
            a.close()
            b.close()

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.EpollSelector())) as runner:
        assert runner.run(run()) == (False, True, False, True, True)


# ---------------------------------------------------------------- kept decisions (issue 21)


def test_kept_acl_decisions_follow_friends_groups_and_accounts() -> None:
    """``TopicAccess.check`` keeps its decisions: each is forgotten when a friends or group record
    is taken, and an account whose role changes (or that is gone) is decided anew."""
    from imcli.core.wire import Friends, GroupInfo, encode

    roles: dict[str, Role] = dict(ROLES)
    acc = TopicAccess(T, roles.get)
    dm, group = "im/user/bob/dm/alice", "im/group/team/msg/alice"
    assert acc.check("alice", dm, Access.PUBLISH) and acc.check("alice", dm, Access.PUBLISH)
    acc.learn("im/user/bob/friends", encode(Friends(account="bob", dm_policy="friends")))
    assert not acc.check("alice", dm, Access.PUBLISH)
    acc.learn("im/user/bob/friends", encode(Friends(account="bob", friends=["alice"], dm_policy="friends")))
    assert acc.check("alice", dm, Access.PUBLISH)

    assert not acc.check("alice", group, Access.PUBLISH)
    info = GroupInfo(name="team", owner="alice", admins=["alice"], members=["alice"], private=True, created=1.0)
    acc.learn("im/group/team/info", encode(info))
    assert acc.check("alice", group, Access.PUBLISH) and acc.check("alice", group, Access.RECEIVE)
    acc.learn("im/group/team/info", b"")  # deleted
    assert not acc.check("alice", group, Access.PUBLISH) and not acc.check("alice", group, Access.RECEIVE)

    assert acc.check("alice", "im/room/lobby/alice", Access.PUBLISH)
    del roles["alice"]  # the account is gone
    assert not acc.check("alice", "im/room/lobby/alice", Access.PUBLISH)
    assert acc.receive_check(dm)("bob") and not acc.receive_check(dm)("carol")  # a DM: kept decisions too


def test_kept_decisions_and_parses_are_bounded() -> None:
    """A flood of made-up topics cannot grow the broker: long topics are neither parsed once for
    all nor their decisions kept, and the table of decisions is emptied when it is full."""
    from imcli.broker import topic_access
    from imcli.core.topics import PARSE_CACHED_UP_TO, _parse_cached

    acc = access()
    long_topic = "im/room/lobby/" + "x" * PARSE_CACHED_UP_TO
    before = _parse_cached.cache_info().currsize
    assert T.parse(long_topic) is None and _parse_cached.cache_info().currsize == before
    assert not acc.check("alice", long_topic, Access.PUBLISH) and not acc._decided
    for i in range(topic_access.DECISIONS + 5):
        acc.check("alice", f"im/room/r{i}/alice", Access.PUBLISH)
    assert len(acc._decided) <= topic_access.DECISIONS
    assert T.parse("im/room/lobby/alice") is T.parse("im/room/lobby/alice")  # one frozen Topic, shared


def test_only_a_copy_on_a_files_topic_marks_its_connection_as_a_transfers() -> None:
    """``Deliveries`` marks a connection as a transfer's (``ChatFirst.mark_bulk``) when it is given a
    file's chunk (a ``CHUNK``-sized copy on a topic ``file_topic`` says carries a file's bytes), not
    for a reply as big (``who`` for thousands of users): that connection's chat would wait behind
    chunks. Both copies are still written apart from the callback that made them."""
    from types import SimpleNamespace

    from imcli.broker.fanout import CHUNK, Deliveries, EncodedPublish

    async def run() -> tuple[list[Any], list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        marked: list[Any] = []
        look: Any = SimpleNamespace(chat_waiting=lambda: False, mark_bulk=marked.append)
        deliveries = Deliveries(loop, chat_first=look, file_topic=lambda topic: topic.startswith("im/user/bob/file/"))
        bob, carol = _Handler(), _Handler()
        bob.reader, carol.reader = SimpleNamespace(transport="bob's"), SimpleNamespace(transport="carol's")  # type: ignore[attr-defined]
        session: Any = object()
        deliveries.add(bob, session, EncodedPublish("im/user/bob/file/" + "s" * 32, bytes(CHUNK)), 0)
        deliveries.add(carol, session, EncodedPublish("im/user/carol/reply/" + "c" * 32, bytes(CHUNK)), 0)
        deliveries.flush([bob, carol])
        at_once = list(bob.writer.written) + list(carol.writer.written)
        await asyncio.sleep(0)
        return marked, at_once, bob.writer.written + carol.writer.written

    marked, at_once, later = asyncio.run(run())
    assert marked == ["bob's"]
    assert at_once == [] and len(later) == 2
