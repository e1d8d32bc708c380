"""Property tests (hypothesis) for the parts every message goes through: the wire models, the
topic parser and the ACL. tests/test_units.py covers names, room/DM round trips, chat payloads
and filter_within; these fill the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, get_args

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket
from hypothesis import assume, given
from hypothesis import strategies as st

from imcli.broker.accounts import Role
from imcli.broker.acl import Access, TopicAcl, topic_matches
from imcli.broker.packets import PUBLISH, MalformedPacket, check_packet, check_publish_head, publish_head_size
from imcli.broker.reader import PacketReader
from imcli.core.wire import (
    ChatMessage,
    GroupInfo,
    MalformedPayload,
    Notice,
    Payload,
    Presence,
    TopicKind,
    Topics,
    decode,
    decode_as,
    encode,
)

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
devices = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
T = Topics()
ACL = TopicAcl()
TYPES = sorted(m.model_fields["type"].default for m in get_args(get_args(Payload)[0]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# ---------------------------------------------------------------- wire models


@given(st.binary(max_size=300))
def test_decode_raises_only_malformed_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(MalformedPayload):  # anything else escapes and fails the test
        decode(data)


@given(st.sampled_from(TYPES), st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_decode_raises_only_malformed_on_any_object_of_a_known_type(kind: str, fields: dict[str, Any]) -> None:
    """A payload that names one of our types but has arbitrary fields never crashes a decoder."""
    data = json.dumps({**fields, "type": kind}).encode()
    try:
        model = decode(data)
    except MalformedPayload:
        return
    assert model.type == kind
    assert decode(encode(model)) == model  # whatever decodes, re-encodes to itself


@given(st.text(min_size=1, max_size=200).filter(str.strip), st.text(max_size=30), st.none() | st.text(max_size=30))
def test_notice_round_trips(text: str, code: str, topic: str | None) -> None:
    notice = Notice(code=code, text=text, topic=topic)
    assert decode_as(encode(notice), Notice) == notice


@given(st.text(min_size=1, max_size=200).filter(str.strip))
def test_decode_as_refuses_another_model(text: str) -> None:
    chat = encode(ChatMessage(text=text))
    for other in (Notice, Presence, GroupInfo):
        try:
            decode_as(chat, other)
        except MalformedPayload:
            continue
        raise AssertionError(f"a chat message decoded as {other.__name__}")


# ---------------------------------------------------------------- topic parser

BUILDERS = {
    TopicKind.DM: lambda a, b, i, d: (T.dm(a, b), {"owner": a, "sender": b}),
    TopicKind.REPLY: lambda a, b, i, d: (T.reply(a, i), {"owner": a, "key": i}),
    TopicKind.NOTICE: lambda a, b, i, d: (T.notice(a), {"owner": a}),
    TopicKind.FRIENDS: lambda a, b, i, d: (T.friends(a), {"owner": a}),
    TopicKind.REQUEST: lambda a, b, i, d: (T.request(a, i), {"sender": a, "key": i}),
    TopicKind.STATUS: lambda a, b, i, d: (T.status(a, d), {"sender": a, "key": d}),
    TopicKind.PRESENCE: lambda a, b, i, d: (T.presence(a), {"owner": a}),
    TopicKind.GROUP_MSG: lambda a, b, i, d: (T.group_msg(a, b), {"name": a, "sender": b}),
    TopicKind.GROUP_INFO: lambda a, b, i, d: (T.group_info(a), {"name": a}),
    TopicKind.ROOM: lambda a, b, i, d: (T.room(a, b), {"name": a, "sender": b}),
}


@given(st.sampled_from(list(BUILDERS)), names, names, ids, devices)
def test_every_builder_round_trips_through_the_parser(kind: TopicKind, a: str, b: str, i: str, d: str) -> None:
    topic, expected = BUILDERS[kind](a, b, i, d)
    parsed = T.parse(topic)
    assert parsed is not None
    assert parsed.kind is kind
    for attr, value in expected.items():
        assert getattr(parsed, attr) == value
    assert Topics("acme/chat").parse(topic) is None  # another prefix never claims it


JUNK = st.sampled_from(["+", "#", "", "a b", " ", "\0", "é"])  # never a valid name, id, device or fixed word


@given(st.sampled_from(list(BUILDERS)), names, names, ids, devices, JUNK)
def test_a_damaged_level_is_never_parsed(kind: TopicKind, a: str, b: str, i: str, d: str, junk: str) -> None:
    topic, _ = BUILDERS[kind](a, b, i, d)
    levels = topic.split("/")
    for k in range(1, len(levels)):  # every level after the prefix
        damaged = "/".join([*levels[:k], junk, *levels[k + 1 :]])
        parsed = T.parse(damaged)
        if parsed is not None:  # only a fixed word replaced by itself could parse; junk never is one
            raise AssertionError(f"{damaged!r} parsed as {parsed}")
    assert T.parse(topic + "/extra") is None


# ---------------------------------------------------------------- ACL

topic_texts = st.lists(
    st.sampled_from(["im", "room", "user", "dm", "group", "msg", "info", "status", "presence", "request",
                     "reply", "notice", "friends", "events", "alice", "bob", "lobby", "+", "#", "", "x1"]),
    min_size=1, max_size=6,
).map("/".join)  # fmt: skip


@given(topic_texts | st.text(max_size=60), st.sampled_from(list(Access)))
def test_acl_never_crashes(topic: str, access: Access) -> None:
    for role in (Role.USER, Role.SERVICE, None):
        assert ACL.allows("alice", role, topic, access) in (True, False)


@given(topic_texts | st.text(max_size=60))
def test_a_user_publishes_only_as_itself(topic: str) -> None:
    """Whatever the topic, a PUBLISH alice is allowed is a contract topic whose sender level is alice."""
    if not ACL.allows("alice", Role.USER, topic, Access.PUBLISH):
        return
    parsed = T.parse(topic)
    assert parsed is not None, topic
    assert parsed.sender == "alice", topic
    assert parsed.kind in (TopicKind.ROOM, TopicKind.DM, TopicKind.STATUS, TopicKind.REQUEST), topic


@given(topic_texts | st.text(max_size=60))
def test_a_user_subscribes_to_nothing_private_of_another(topic_filter: str) -> None:
    """No filter alice is granted matches a topic in bob's private subtree or a worker's request topic."""
    if not ACL.allows("alice", Role.USER, topic_filter, Access.SUBSCRIBE):
        return
    for private in (T.dm("bob", "alice"), T.notice("bob"), T.reply("bob", "0" * 32), T.friends("bob"),
                    T.request("bob", "0" * 32), T.status("bob", "laptop")):  # fmt: skip
        assert not topic_matches(private, topic_filter), (topic_filter, private)


@given(names, names, names)
def test_receive_follows_the_owner(owner: str, sender: str, reader: str) -> None:
    assume(reader != owner)
    dm = T.dm(owner, sender)
    assert ACL.allows(owner, Role.USER, dm, Access.RECEIVE)
    assert not ACL.allows(reader, Role.USER, dm, Access.RECEIVE)
    assert not ACL.allows(reader, Role.USER, T.reply(owner, "0" * 32), Access.RECEIVE)


publish_bodies = st.one_of(
    st.binary(min_size=2, max_size=40),
    st.builds(
        lambda topic, packet_id, payload: len(topic).to_bytes(2, "big") + topic + packet_id + payload,
        st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates: ill-formed
        st.binary(max_size=2),
        st.binary(max_size=30),
    ),
)


@given(st.integers(0, 15), publish_bodies)
def test_the_readers_publish_check_decides_and_decodes_as_check_packet_and_amqtt(flags: int, body: bytes) -> None:
    """The reader checks a PUBLISH's head apart from its payload (imcli/broker/reader.py, issue 16):
    it refuses exactly what ``check_packet`` refuses, and reads what amqtt's decoding reads."""
    first = 0x30 | flags
    head = body[: publish_head_size(first, body[:2])]
    try:
        check_packet(first, body, connected=True, max_client_id=23)
    except MalformedPacket:
        with pytest.raises(MalformedPacket):
            check_publish_head(first, head)
        return
    topic, packet_id = check_publish_head(first, head)
    header = MQTTFixedHeader(PUBLISH, flags, len(body))
    amqtts = asyncio.run(PublishPacket.from_stream(BufferReader(body), fixed_header=header))
    assert (topic, packet_id) == (amqtts.variable_header.topic_name, amqtts.variable_header.packet_id)
    assert body[len(head) :] == amqtts.payload.data


@given(st.integers(0, 15), publish_bodies, st.binary(max_size=8), st.binary(max_size=40))
def test_the_reader_builds_a_publish_from_its_own_bytes_only(
    flags: int, body: bytes, before: bytes, after: bytes
) -> None:
    """``PacketReader._publish`` on a buffer where the PUBLISH sits between other bytes (the packets
    before and after it in one read): the same verdict as ``check_packet`` on the PUBLISH alone, and
    a topic, packet id and payload taken from its own bytes, never from the next packet's."""
    first = 0x30 | flags
    buffer = bytearray(before + body + after)
    start, end = len(before), len(before) + len(body)
    try:
        check_packet(first, body, connected=True, max_client_id=23)
    except MalformedPacket:
        with pytest.raises(MalformedPacket):
            PacketReader._publish(first, buffer, start, end)
        return
    packet = PacketReader._publish(first, buffer, start, end)
    header = MQTTFixedHeader(PUBLISH, flags, len(body))
    amqtts = asyncio.run(PublishPacket.from_stream(BufferReader(body), fixed_header=header))
    assert (packet.variable_header.topic_name, packet.variable_header.packet_id) == (
        amqtts.variable_header.topic_name,
        amqtts.variable_header.packet_id,
    )
    assert packet.payload.data == amqtts.payload.data
    assert packet.fixed_header.remaining_length == len(body)
