"""One list of steps for a PUBLISH, whichever route it takes (``ImBroker.publish``, tenth session):
the message loop's queue, the reader's ``deliver_now`` (QoS 0, and QoS 1 that no direct path takes), and the
direct paths of a chat line (``deliver_line``) and of a file's chunk (``deliver_file``).

Through raw sockets: the same hostile publishes (a forged sender, another's DM, a group one is no
member of, over the size limit, retained, over the rate, a wildcard topic; a chunk on another's
upload, on a download's topic, over the chunk limit, over the file-transfer rate) and a valid one
of each kind, sent at QoS 0, at QoS 1 (a direct path), at QoS 1 with DUP, and at QoS 1 queued for
the message loop behind a burst, give the same outcome on every route: the connection closed or
not, the notices its sender is told, whether anything was fanned out, journalled or retained.
Each publish's route is recorded and checked, so that the comparison covers the routes it claims
to. ``test_a_route_that_skips_a_rule_is_caught`` shows that the comparison fails when one route
drifts (a ``deliver_line`` that no longer runs the checks), and ``Route`` refuses a route that
skips a step that can act on its topics.
"""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from imcli.broker import amqtt_adapter
from imcli.broker.accounts import AccountStore
from imcli.broker.amqtt_adapter import CHAT_LINES, CHUNK, GENERAL, LINE, STEP_KINDS, route
from imcli.broker.client_loop import FAIR_SHARE
from imcli.broker.journal import KEPT
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.topics import TopicKind
from imcli.core.wire import Topics
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import chat, field, packet, password_of, publish_packet, read_packets, signed_in, wait_until

T = Topics()
BURST = 2 * FAIR_SHARE + 8  # chat tokens of a fresh account: a queued publish's burst, and some
FILE_BURST = 5
CHUNK_BYTES = 100_000  # over reader.BULK, under the chunk limit
BARRIER_ID = 0x7777
_names = itertools.count(1)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInfo]:
    limits = Limits(publish_rate=0.001, publish_burst=BURST, file_rate=0.001, file_burst=FILE_BURST)
    settings = BrokerSettings(data_dir=tmp_path_factory.mktemp("routes") / "data", port=0, limits=limits)
    with BackgroundServer(settings, workers=False) as info:
        AccountStore(info.data_dir).add("bob", password_of("bob"))
        yield info


class Case(NamedTuple):
    topic: str  # "{me}" is the sender's name
    chunk: bool = False  # a file's chunk (CHUNK_BYTES, or ``size``), else a chat line
    size: int | None = None  # the payload's size (a chat line padded to it)
    retain: bool = False
    rate: bool = False  # sent with the account's bucket empty


CASES = {
    "valid line": Case("im/room/paths/{me}"),
    "forged sender": Case("im/room/paths/bob"),
    "another's DM": Case(T.dm("bob", "carol")),
    "group not a member of": Case("im/group/secret/msg/{me}"),
    "over the size limit": Case("im/room/paths/{me}", size=20_000),
    "retained": Case("im/room/paths/{me}", retain=True),
    "over the rate": Case("im/room/paths/{me}", rate=True),
    "wildcard topic": Case("im/room/+/{me}"),
    "valid chunk": Case("im/upload/{me}/" + "u" * 32, chunk=True),
    "chunk on another's upload": Case(T.upload("bob", "u" * 32), chunk=True),
    "chunk on a download's topic": Case(T.file_data("bob", "s" * 32), chunk=True),
    "chunk over the chunk limit": Case("im/upload/{me}/" + "u" * 32, chunk=True, size=262_145),
    "chunk over the file rate": Case("im/upload/{me}/" + "u" * 32, chunk=True, rate=True),
}
WAYS = ("QoS 0", "QoS 1", "QoS 1 DUP", "QoS 1 queued")


class Outcome(NamedTuple):
    closed: bool
    notices: tuple[str, ...]  # the codes its sender was told
    fanned_out: bool
    journalled: bool
    retained: bool


class Routes:
    """The route each publish took, by topic (the broker's entry points, wrapped: each still does
    what it did), and whether anything was fanned out on a topic."""

    def __init__(self, broker: Any) -> None:
        self.taken: dict[str, list[str]] = {}
        self.fanned: list[str] = []
        for name in ("deliver_now", "deliver_line", "deliver_file"):
            self._wrap(broker, name, lambda args: args[1] if isinstance(args[1], str) else args[1].topic)
        self._wrap(broker, "_handle_message_delivery", lambda args: args[2].result().topic, "queued")
        publish = broker.fan_out.publish

        async def fanned(message: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.fanned.append(message["topic"])
            return await publish(message, *args, **kwargs)

        broker.fan_out.publish = fanned

    def _wrap(self, broker: Any, name: str, topic_of: Any, label: str | None = None) -> None:
        method = getattr(broker, name)

        async def counted(*args: Any) -> Any:
            self.taken.setdefault(topic_of(args), []).append(label or name)
            return await method(*args)

        setattr(broker, name, counted)


@pytest.fixture(scope="module")
def routes(broker: ServeInfo) -> Routes:
    assert broker.broker is not None
    return Routes(broker.broker)


def _handler_of(info: ServeInfo, client_id: str) -> Any:
    assert info.broker is not None
    [handler] = [h for _, h in info.broker._sessions.values() if h.session.client_id == client_id]
    return handler


def _user(info: ServeInfo) -> tuple[str, socket.socket]:
    """A fresh account (its own rate buckets), signed in, subscribed to its notices, its message
    loop idle (only then may the reader handle a publish itself)."""
    name = f"u{next(_names)}"
    AccountStore(info.data_dir).add(name, password_of(name))
    client_id = f"{name}:raw"
    sock = signed_in(info.address, name, client_id.encode())
    sock.sendall(packet(0x82, b"\x00\x01" + field(T.notice(name).encode()) + b"\x01"))
    got, _ = read_packets(sock, lambda p: len(p) >= 1)
    assert got == [(0x90, b"\x00\x01\x01")]
    assert wait_until(lambda: _handler_of(info, client_id).loop_idle)
    return name, sock


def _barrier(sock: socket.socket) -> tuple[list[tuple[int, bytes]], bool]:
    """Everything until a SUBACK (which the reader lets through only once what was read before it
    is handled, queued messages included, and their rows committed), or the connection's end."""
    sock.sendall(packet(0x82, BARRIER_ID.to_bytes(2, "big") + field(b"im/room/paths/barrier") + b"\x01"))
    return read_packets(sock, lambda p: any(first == 0x90 and body[:2] == b"\x77\x77" for first, body in p))


def _valid(name: str, i: int, chunk: bool) -> bytes:
    if chunk:  # a small piece of the account's own upload: the file-transfer bucket, the general path
        return publish_packet(T.upload(name, "d" * 32).encode(), b"x", qos=1, packet_id=1000 + i)
    return publish_packet(T.room("burst", name).encode(), chat(f"burst {i}"), qos=1, packet_id=1000 + i)


def _payload(case: Case, marker: str) -> bytes:
    if case.chunk:
        return marker.encode().ljust(case.size or CHUNK_BYTES, b".")
    line = chat(marker)
    return line if case.size is None else line[:-2] + b" " * (case.size - len(line)) + line[-2:]


def _notices(got: list[tuple[int, bytes]], name: str) -> tuple[str, ...]:
    codes = []
    for first, body in got:
        if first >> 4 == 3:
            size = int.from_bytes(body[:2], "big")
            topic, rest = body[2 : 2 + size].decode(), body[2 + size + (2 if first & 0x06 else 0) :]
            if topic == T.notice(name):
                codes.append(json.loads(rest)["code"])
    return tuple(codes)


def send(info: ServeInfo, routes: Routes, case: Case, way: str) -> tuple[Outcome, list[str], bool]:
    """``case`` published by a fresh account the ``way`` given: its outcome, the routes its topic
    took, and whether it was acknowledged (PUBACK)."""
    assert info.broker is not None
    name, sock = _user(info)
    with sock:
        topic = case.topic.format(me=name)
        marker = f"hostile {name}"
        queued = way == "QoS 1 queued"
        before = [_valid(name, i, chunk=False) for i in range(2 * FAIR_SHARE)] if queued else []
        if case.rate:  # the bucket emptied but for the burst sent with it (in one write)
            tokens = FILE_BURST if case.chunk else BURST - len(before)
            sock.sendall(b"".join(_valid(name, i, case.chunk) for i in range(tokens)))
            got, _ = read_packets(sock, lambda p: sum(first == 0x40 for first, _ in p) >= tokens)
        qos, first = (0, 0x30) if way == "QoS 0" else (1, 0x3A if way == "QoS 1 DUP" else 0x32)
        hostile = publish_packet(topic.encode(), _payload(case, marker), qos=qos, packet_id=7)
        hostile = bytes([first | (0x01 if case.retain else 0)]) + hostile[1:]
        routes.taken.pop(topic, None)
        fanned = len(routes.fanned)
        sock.sendall(b"".join(before) + hostile)
        got, closed = _barrier(sock)
    acked = (0x40, b"\x00\x07") in got
    with sqlite3.connect(info.data_dir / "archive.sqlite3") as archive:
        journalled = bool(archive.execute("SELECT 1 FROM messages WHERE text = ?", (marker,)).fetchall())
    outcome = Outcome(
        closed=closed,
        notices=_notices(got, name),
        fanned_out=topic in routes.fanned[fanned:],
        journalled=journalled,
        retained=topic in info.broker._retained_messages,
    )
    return outcome, routes.taken.get(topic, []), acked


def _expected_route(case: Case, way: str, info: ServeInfo) -> list[str]:
    """The route ``way`` is meant to take for ``case``: what the comparison covers."""
    assert info.broker is not None
    topic = case.topic.format(me="x")
    parsed = T.parse(topic)
    if way == "QoS 1 queued":
        return ["queued"]
    if way != "QoS 1" or case.retain:
        return ["deliver_now"]
    if parsed is not None and parsed.kind in CHAT_LINES:
        return ["deliver_line"]
    if case.chunk:
        return ["deliver_file"]
    return ["deliver_now"]


def _compare(info: ServeInfo, routes: Routes, name: str, ways: tuple[str, ...]) -> dict[str, Outcome]:
    case = CASES[name]
    outcomes = {}
    for way in ways:
        outcome, taken, acked = send(info, routes, case, way)
        if not (name == "wildcard topic" and outcome.closed and not taken):  # refused by the reader itself
            assert taken == _expected_route(case, way, info), (name, way, taken)
        assert acked == (way != "QoS 0" and not outcome.closed), (name, way, outcome)
        outcomes[way] = outcome
    return outcomes


def _ways(name: str) -> tuple[str, ...]:
    # a chunk behind a burst is read apart from it (its own read: a fresh share), so only lines are queued
    return WAYS if not CASES[name].chunk else WAYS[:3]


@pytest.mark.parametrize("name", list(CASES))
def test_every_route_gives_the_same_outcome(broker: ServeInfo, routes: Routes, name: str) -> None:
    outcomes = _compare(broker, routes, name, _ways(name))
    first = outcomes[WAYS[0]]
    assert all(outcome == first for outcome in outcomes.values()), outcomes
    case = CASES[name]
    if name.startswith("valid"):  # and the outcome is the right one
        assert first == Outcome(False, (), True, not case.chunk, False)
    elif name == "wildcard topic":
        assert first.closed and not first.fanned_out
    else:
        assert not first.closed and len(first.notices) == 1 and not first.fanned_out and not first.journalled
        assert not first.retained


def test_a_route_that_skips_a_rule_is_caught(broker: ServeInfo, routes: Routes) -> None:
    """The comparison above fails when one route drifts: a ``deliver_line`` that fans a line out
    without the checks (as a rule added to one path and not to the other would) lets a forged
    sender through at QoS 1 alone."""
    assert broker.broker is not None
    broker_ = broker.broker
    kept = broker_.deliver_line
    fan_out = broker_.fan_out

    async def drifted(session: Any, topic: str, payload: bytes) -> bool:
        await fan_out.publish({"session": session, "topic": topic, "data": payload})
        return True

    broker_.deliver_line = drifted
    try:
        outcomes = {way: send(broker, routes, CASES["forged sender"], way)[0] for way in WAYS[:2]}
    finally:
        broker_.deliver_line = kept
    assert outcomes["QoS 0"] != outcomes["QoS 1"]
    assert outcomes["QoS 1"].fanned_out and not outcomes["QoS 0"].fanned_out


# ---------------------------------------------------------------- the routes' skips, checked


def _one_of_each_kind() -> dict[TopicKind, str]:
    topics = {
        T.room("lobby", "alice"), T.dm("bob", "alice"), T.sent("alice", "bob"), T.reply("alice", "c" * 32),
        T.notice("alice"), T.friends("alice"), T.group_msg("g", "alice"), T.group_info("g"),
        T.status("alice", "laptop"), T.presence("alice"), T.request("alice", "c" * 32), T.events(),
        T.profile("alice"), T.upload("alice", "u" * 32), T.fetch("alice", "s" * 32), T.file_data("alice", "s" * 32),
    }  # fmt: skip
    kinds = {}
    for topic in topics:
        parsed = T.parse(topic)
        assert parsed is not None, topic
        kinds[parsed.kind] = topic
    assert set(kinds) == set(TopicKind)
    return kinds


def test_each_step_acts_only_on_the_topics_its_route_table_says(broker: ServeInfo) -> None:
    """``STEP_KINDS`` is what each skippable step's own test decides: a route that skips a step on
    the strength of the table skips nothing the step would have done."""
    assert broker.broker is not None
    b = broker.broker
    acts: dict[str, Callable[[str], object]] = {
        "device": b.is_request,  # DeviceService.intercept takes only a REQUEST (and its payload's kind)
        "held": b.is_request,
        "chat_first": b.carries_file_bytes,
        "sent": lambda topic: b.sent_copy(topic) is not None,
        "journal": lambda topic: (parsed := T.parse(topic)) is not None and parsed.kind in KEPT,
    }
    for kind, topic in _one_of_each_kind().items():
        for step, acting in acts.items():
            assert bool(acting(topic)) == (kind in STEP_KINDS[step]), (step, kind)


def test_a_route_may_not_skip_a_step_that_acts_on_its_topics() -> None:
    with pytest.raises(ValueError, match="cannot skip"):
        route("line", CHAT_LINES, "journal")
    with pytest.raises(ValueError, match="cannot skip"):
        route("any", None, "device")
    assert route("line", CHAT_LINES, "chat_first") == LINE._replace(device=True, held=True)
    assert amqtt_adapter.Route("general", None) == GENERAL
    assert not (CHUNK.journal or CHUNK.sent or CHUNK.device or CHUNK.held) and CHUNK.chat_first
    assert LINE.journal and LINE.sent and not (LINE.chat_first or LINE.device or LINE.held)


def test_the_direct_paths_take_only_their_routes_topics(broker: ServeInfo) -> None:
    """``is_line_topic`` and ``is_file_topic`` (the reader's choice of a direct path) say yes only to
    the kinds of ``LINE`` and ``CHUNK``, on which the steps those routes skip cannot act."""
    assert broker.broker is not None
    for kind, topic in _one_of_each_kind().items():
        assert broker.broker.is_line_topic(topic) == (LINE.kinds is not None and kind in LINE.kinds), kind
        assert broker.broker.is_file_topic(topic) == (CHUNK.kinds is not None and kind in CHUNK.kinds), kind


def test_amqtts_message_events_fire_on_every_route_while_a_plugin_listens(tmp_path: Path) -> None:
    """With a plugin listening to amqtt's message events, a QoS 1 chat line is not taken by its direct
    path (which builds no packet for ``PACKET_RECEIVED``), and every publish fires ``MESSAGE_RECEIVED``
    and, once let through, ``MESSAGE_BROADCAST`` with the same message, as amqtt's broker does; a
    refused one fires only the first."""
    from amqtt.events import BrokerEvents

    from tests.brokers import bare_broker

    with bare_broker(tmp_path / "data", "alice", "bob") as info:
        assert info.broker is not None
        routes = Routes(info.broker)
        events: list[tuple[str, str, int]] = []

        def listener(event: str) -> Any:
            async def heard(*, client_id: str, message: Any) -> None:
                events.append((event, message.topic, id(message)))

            return heard

        callbacks = info.broker.plugins_manager._event_plugin_callbacks
        for event in (BrokerEvents.MESSAGE_RECEIVED, BrokerEvents.MESSAGE_BROADCAST):
            callbacks[event] = [listener(event.value)]
        sock = signed_in(info.address, "alice", b"alice:events")
        with sock:
            assert wait_until(lambda: _handler_of(info, "alice:events").loop_idle)
            line, forged = T.dm("bob", "alice"), T.dm("bob", "carol")
            sock.sendall(
                publish_packet(line.encode(), chat("one"), qos=1, packet_id=1)
                + publish_packet(forged.encode(), chat("two"), qos=1, packet_id=2)
                + publish_packet(line.encode(), chat("three"), qos=0)
            )
            _barrier(sock)
        assert wait_until(lambda: len(events) >= 5)
    assert routes.taken[line] == ["deliver_now", "deliver_now"] and routes.taken[forged] == ["deliver_now"]
    assert [(event, topic) for event, topic, _ in events] == [
        ("broker_message_received", line), ("broker_message_broadcast", line),
        ("broker_message_received", forged),
        ("broker_message_received", line), ("broker_message_broadcast", line),
    ]  # fmt: skip
    assert events[0][2] == events[1][2] and events[3][2] == events[4][2]  # the same message, received and broadcast
