"""MQTT frames built by hand against the embedded broker: a packet is consumed exactly as its
remaining length says, and one that is not well-formed MQTT 3.1.1 closes its connection.

mallory attacks over raw sockets. After each case the broker must still be up, a bystander
pair (alice to bob) must still chat, a watcher (carol, subscribed wherever she may read) must
have received nothing the ACL would refuse, and mallory's connection must be in step (a
PINGREQ gets one PINGRESP, after the answers to what came before) or closed.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import Raw, connect_raw, field, login, packet, password_of, publish_packet, read_packets

DEADLINE = 1.0  # the broker's CONNECT / unfinished-packet deadline
ACCEPTED = b"\x20\x02\x00\x00"
PINGREQ, PINGRESP = b"\xc0\x00", 0xD0
MARK = b"smuggled"
ROOM = "im/room/frames"
MAY_WRITE = (f"{ROOM}/mallory", "im/user/carol/dm/mallory")  # where mallory's payloads may end up
MAY_NOT_WRITE = (f"{ROOM}/alice", "im/user/carol/dm/alice", "im/user/carol/notice", "im/events", "im/presence/mallory")


@dataclass
class Net:
    info: ServeInfo
    alice: Raw
    bob: Raw
    carol: Raw  # the watcher

    @property
    def port(self) -> int:
        return self.info.address.port

    def attack(self, data: bytes, *, signed_in: bool = True) -> tuple[list[tuple[int, bytes]], bool]:
        """Send ``data`` (after mallory's CONNECT if ``signed_in``) and a PINGREQ; return the packets
        the broker sent up to its PINGRESP, and whether it closed the connection instead."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE + 9) as sock:
            if signed_in:
                sock.sendall(login("mallory"))
                assert sock.recv(4) == ACCEPTED
            sock.sendall(data + PINGREQ)
            got, closed = read_packets(sock, lambda got: any(first == PINGRESP for first, _ in got))
        assert closed or got[-1][0] == PINGRESP
        for first, body in got:  # nothing mallory may not read reached her
            if first >> 4 == 3:
                topic = body[2 : 2 + int.from_bytes(body[:2], "big")].decode()
                assert not topic.startswith(("im/user/carol/", "im/user/alice/", "im/user/bob/")), topic
        return got, closed

    def unharmed(self) -> None:
        """alice still reaches bob; carol, by the same barrier, got nothing of mallory's where she may not write."""
        barrier = f"barrier {secrets.token_hex(4)}".encode()
        self.alice.publish(f"{ROOM}/alice", barrier)
        assert self.bob.until(f"{ROOM}/alice", barrier, timeout=10)[-1].payload == barrier
        seen = self.carol.until(f"{ROOM}/alice", barrier, timeout=10) + self.carol.silent(0)
        forged = [(m.topic, m.payload) for m in seen if MARK in m.payload and m.topic not in MAY_WRITE]
        assert forged == [], f"delivered where the ACL refuses mallory: {forged}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    broker_settings = BrokerSettings(
        data_dir=tmp_path_factory.mktemp("frames") / "data",
        port=0,
        packet_timeout=DEADLINE,
        # the fuzzed CONNECTs' wrong passwords would otherwise throttle mallory's logins (tests/test_logins.py)
        limits=Limits(
            publish_rate=10_000.0,
            publish_burst=10_000,
            max_connections=1000,
            login_failures=1_000_000,
            address_failures=1_000_000,
        ),
    )
    with BackgroundServer(broker_settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob", "carol", "mallory"):
            store.add(name, password_of(name))
        port = info.address.port
        alice = connect_raw("127.0.0.1", port, "alice", "alice:frames")
        bob = connect_raw("127.0.0.1", port, "bob", "bob:frames")
        carol = connect_raw("127.0.0.1", port, "carol", "carol:frames")
        assert bob.subscribe(f"{ROOM}/+") == 1
        assert carol.subscribe_all("im/room/+/+", "im/user/carol/#", "im/events", "im/presence/+") == [1, 1, 1, 1]
        try:
            yield Net(info, alice, bob, carol)
        finally:
            for client in (alice, bob, carol):
                client.close()


def connect_body(
    client_id: bytes,
    *,
    flags: int = 0xC2,
    will: tuple[bytes, bytes] | None = None,
    username: bytes = b"mallory",
    password: bytes = password_of("mallory").encode(),
) -> bytes:
    body = field(b"MQTT") + bytes([4, flags]) + b"\x00\x1e" + field(client_id)
    if will is not None:
        body += field(will[0]) + field(will[1])
    return body + (field(username) if flags & 0x80 else b"") + (field(password) if flags & 0x40 else b"")


def smuggled(topic: str = f"{ROOM}/alice") -> bytes:
    """A whole QoS 1 PUBLISH, as hidden inside another packet's bytes."""
    return publish_packet(topic.encode(), MARK + b" " + topic.encode(), qos=1, packet_id=77)


# ---------------------------------------------------------------- packet smuggling (issue 15, item 2)

SMUGGLERS = {
    # amqtt decodes the bad topic as "b'...'", longer than its bytes: it takes the payload to be
    # shorter, and parses the payload's tail as the next packets
    "PUBLISH topic not UTF-8": packet(0x32, field(b"im/room/frames/mallory\xff\xfe\xfd\xfc") + b"\x00\x05"
                                      + b"\x00" * 40 + smuggled() + PINGREQ),
    "PUBLISH topic with a wildcard": packet(0x32, field(b"im/room/frames/+") + b"\x00\x05" + smuggled()),
    "PINGREQ with a body": packet(0xC0, smuggled()),
    "DISCONNECT with a body": packet(0xE0, smuggled()),
    "PUBACK with a body": packet(0x40, b"\x00\x05" + smuggled()),
    "PUBREL with a body": packet(0x62, b"\x00\x05" + smuggled()),
    "SUBSCRIBE filter not UTF-8": packet(0x82, b"\x00\x05" + field(b"im/room/\xff\xfe\xfd/+") + b"\x01" + smuggled()),
    "UNSUBSCRIBE filter not UTF-8": packet(0xA2, b"\x00\x05" + field(b"im/\xe0\x80\x80/x") + smuggled()),
    "SUBSCRIBE with a surrogate": packet(0x82, b"\x00\x05" + field(b"im/room/\xed\xa0\x80/+") + b"\x01"),
    "PUBLISH topic with U+0000": publish_packet(b"im/room/frames/mallory\x00", MARK, qos=1),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SMUGGLERS))
def test_nothing_is_smuggled_inside_a_packet(net: Net, case: str) -> None:
    got, closed = net.attack(SMUGGLERS[case])
    assert closed, f"a malformed packet left the connection open: {got}"
    assert [first for first, _ in got if first == PINGRESP] == [], "a PINGREQ hidden in a packet was answered"
    assert [body for first, body in got if first >> 4 == 4 and body == b"\x00\x4d"] == [], "a hidden PUBLISH was acked"
    net.unharmed()


CONNECT_SMUGGLERS = {
    "bytes left over after the CONNECT": packet(0x10, connect_body(b"mallory:a") + smuggled()),
    "client id not UTF-8": packet(0x10, connect_body(b"mallory:\xff")),
    "user name with U+0000": packet(0x10, connect_body(b"mallory:b", username=b"mallory\x00")),
    "password not UTF-8": packet(0x10, connect_body(b"mallory:c", password=b"\xc3\x28")),
    "Will topic not UTF-8": packet(0x10, connect_body(b"mallory:d", flags=0xC6, will=(b"im/room/\xff/mallory", b"x"))),
    "Will topic with a wildcard": packet(0x10, connect_body(b"mallory:e", flags=0xC6, will=(b"im/room/#", b"x"))),
    "user name length past the packet": packet(0x10, connect_body(b"mallory:f")[:-20]),
    # MQTT-3.1.2-3, -13, -14, -15
    "reserved flag": packet(0x10, connect_body(b"mallory:g", flags=0xC3)),
    "Will QoS without the Will flag": packet(0x10, connect_body(b"mallory:h", flags=0xCA)),
    "Will Retain without the Will flag": packet(0x10, connect_body(b"mallory:i", flags=0xE2)),
    "Will QoS 3": packet(0x10, connect_body(b"mallory:j", flags=0xDE, will=(b"im/room/frames/mallory", b"x"))),
    "CONNECT flags in the fixed header": packet(0x12, connect_body(b"mallory:k")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONNECT_SMUGGLERS))
def test_a_malformed_connect_is_refused(net: Net, case: str) -> None:
    got, closed = net.attack(CONNECT_SMUGGLERS[case], signed_in=False)
    assert closed, f"a malformed CONNECT left the connection open: {got}"
    assert (0x20, b"\x00\x00") not in got, "a malformed CONNECT was accepted"
    net.unharmed()


def test_a_qos1_publish_with_packet_id_0_is_refused(net: Net) -> None:
    got, closed = net.attack(publish_packet(f"{ROOM}/mallory".encode(), MARK + b" id 0", qos=1, packet_id=0))
    assert closed and got == [], f"MQTT-2.3.1-1: {got}"
    net.unharmed()
    assert [m for m in net.bob.silent(0) if m.payload == MARK + b" id 0"] == []


def test_well_formed_packets_keep_the_connection_in_step(net: Net) -> None:
    """The guard refuses nothing a correct client sends: each packet gets its answer, in order."""
    data = (
        publish_packet(f"{ROOM}/mallory".encode(), "héllo wörld ✓".encode(), qos=1, packet_id=9)
        + packet(0x82, b"\x00\x0a" + field(b"im/room/+/+") + b"\x01" + field(b"im/user/mallory/#") + b"\x00")
        + packet(0xA2, b"\x00\x0b" + field(b"im/room/+/+"))
        + publish_packet(f"{ROOM}/mallory".encode(), b"", qos=0)
    )
    got, closed = net.attack(data)
    assert not closed
    assert got == [(0x40, b"\x00\x09"), (0x90, b"\x00\x0a\x01\x00"), (0xB0, b"\x00\x0b"), (PINGRESP, b"")]
    net.unharmed()


# ---------------------------------------------------------------- client ids (Missing limits)


def test_a_client_id_past_the_limit_is_rejected(net: Net) -> None:
    with socket.create_connection(("127.0.0.1", net.port), timeout=DEADLINE + 9) as sock:
        sock.sendall(login("mallory", b"mallory:" + b"x" * 10_000))
        got, closed = read_packets(sock, lambda _: False)  # until it hangs up
    assert got == [(0x20, b"\x00\x02")] and closed, f"expected CONNACK 2 (identifier rejected), got {got}"
    with socket.create_connection(("127.0.0.1", net.port), timeout=DEADLINE + 9) as sock:
        sock.sendall(login("mallory", b"mallory:" + b"\xc3\xa9" * 120))  # 128 characters (248 bytes): allowed
        assert sock.recv(4) == ACCEPTED
    net.unharmed()


# ---------------------------------------------------------------- the frame fuzzer (issue 15, "Done when")
#
# A grammar of the four packets a client talks with, each field drawn well-formed or broken:
# strings in ill-formed UTF-8 (a stray byte, an overlong form, an encoded surrogate, a cut
# sequence, U+0000), misplaced wildcards, QoS 3, packet id 0, wrong flags, bytes left over, no
# filter at all; and lies: a string length or a remaining length off by a few bytes. A case
# whose every packet is well-formed must leave the connection in step; one with a broken
# packet must close it; a lie may do either (the client chose its own framing), but never
# gets past the ACL.

GOOD, BAD, ANY = "good", "bad", "any"
TOPICS = [*MAY_WRITE, *MAY_NOT_WRITE, "im/room/x/carol", "im/user/bob/dm/mallory", "é/ü/✓", "a", " "]
FILTERS = ["im/room/+/+", "im/user/carol/#", "im/user/mallory/#", "#", "+/+/+/+", "im/events", "im/user/+/dm/#"]
BROKEN_FILTERS = ["im/room#", "im/+x/y", "#/im", "im/#/x", ""]
ILL_FORMED = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80", b"\x00"]


def worst(*verdicts: str) -> str:
    return BAD if BAD in verdicts else ANY if ANY in verdicts else GOOD


def in_order(*verdicts: str) -> str:
    """The verdict of a packet's variable fields, in the order the broker reads them: after a field
    whose length lies (ANY), the broker reads the later fields at other offsets, so their own
    verdicts say nothing (a lying topic length can turn a packet id of 0 into a valid one)."""
    for at, verdict in enumerate(verdicts):
        if verdict == ANY:
            return worst(*verdicts[: at + 1])
    return worst(*verdicts)


@st.composite
def utf8_field(draw: st.DrawFn, choices: list[str], broken: list[str] | None = None) -> tuple[bytes, str]:
    """A length-prefixed string: one of ``choices``, or broken (ill-formed, a wrong choice, a lying length)."""
    data = draw(st.sampled_from(choices)).encode()
    how = draw(st.sampled_from(["as is"] * 12 + ["ill-formed", "lying length"] + (["broken"] if broken else [])))
    if how == "ill-formed":
        at = draw(st.integers(0, len(data)))
        return field(data[:at] + draw(st.sampled_from(ILL_FORMED)) + data[at:]), BAD
    if how == "broken" and broken:
        return field(draw(st.sampled_from(broken)).encode()), BAD
    if how == "lying length":
        return field(data, max(0, len(data) + draw(st.sampled_from([-3, -1, 1, 2, 40])))), ANY
    return field(data), GOOD


@st.composite
def packet_id(draw: st.DrawFn) -> tuple[bytes, str]:
    value = draw(st.sampled_from([0, 1, 2, 77, 65535]))
    return value.to_bytes(2, "big"), BAD if value == 0 else GOOD


@st.composite
def publish_frame(draw: st.DrawFn) -> tuple[bytes, str]:
    qos, dup, retain = draw(st.integers(0, 3)), draw(st.booleans()), draw(st.booleans())
    topic, verdict = draw(utf8_field(TOPICS, ["im/room/+/mallory", "im/#", ""]))
    pid, pid_verdict = draw(packet_id()) if qos else (b"", GOOD)
    payload = MARK + b" " + draw(st.sampled_from([b"", b"x", smuggled(), PINGREQ, b"\x00" * 8]))
    flags = qos << 1 | (8 if dup else 0) | (1 if retain else 0)
    header_verdict = BAD if qos == 3 or (dup and qos == 0) else GOOD
    return packet(0x30 | flags, topic + pid + payload), worst(header_verdict, in_order(verdict, pid_verdict))


@st.composite
def subscribe_frame(draw: st.DrawFn, unsubscribe: bool) -> tuple[bytes, str]:
    pid, verdict = draw(packet_id())
    body, verdicts = pid, [verdict]
    for _ in range(draw(st.integers(0, 3))):
        topic_filter, verdict = draw(utf8_field(FILTERS, BROKEN_FILTERS))
        body += topic_filter
        verdicts.append(verdict)
        if not unsubscribe:
            qos = draw(st.sampled_from([0, 1, 2, 3, 0x81]))
            body += bytes([qos])
            verdicts.append(BAD if qos > 2 else GOOD)
    if body == pid:
        verdicts.append(BAD)  # no filter (MQTT-3.8.3-3, MQTT-3.10.3-2)
    flags = draw(st.sampled_from([2] * 5 + [0, 3]))
    return packet((0xA0 if unsubscribe else 0x80) | flags, body), worst(
        GOOD if flags == 2 else BAD, in_order(*verdicts)
    )


@st.composite
def other_frame(draw: st.DrawFn) -> tuple[bytes, str]:
    """An acknowledgement, a PINGREQ or a CONNACK (never a client's), right or with bytes left over."""
    first, length = draw(st.sampled_from([(0x40, 2), (0x50, 2), (0x62, 2), (0x70, 2), (0xC0, 0), (0x20, 2)]))
    # a well-formed PINGREQ here would be answered before the probe's: only broken ones
    extra = draw(st.sampled_from(([] if first == 0xC0 else [b""] * 3) + [b"\x00", smuggled()]))
    body = b"\x00\x05"[:length] + extra
    return packet(first, body), GOOD if not extra and first != 0x20 else BAD


@st.composite
def frames_after_connect(draw: st.DrawFn) -> tuple[bytes, str]:
    kinds = st.one_of(publish_frame(), subscribe_frame(False), subscribe_frame(True), other_frame())
    parts = draw(st.lists(kinds, min_size=1, max_size=3))
    data, verdict = b"".join(p for p, _ in parts), worst(*(v for _, v in parts))
    if draw(st.integers(0, 5)) == 0:  # the last packet's remaining length lies
        lie = draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
        last = parts[-1][0]
        body_start = 2 if last[1] < 0x80 else 3
        body = last[body_start:]
        data = data[: len(data) - len(last)] + packet(last[0], body, max(0, len(body) + lie))
        verdict = BAD if verdict == BAD and lie > 0 else ANY
    return data, verdict


@st.composite
def connect_frame(draw: st.DrawFn) -> tuple[bytes, str]:
    """mallory's CONNECT, right or broken in one or more fields; GOOD means accepted."""
    will = draw(st.booleans())
    will_qos, will_retain = draw(st.sampled_from([0, 0, 0, 1, 2, 3])), draw(st.sampled_from([False] * 3 + [True]))
    reserved = draw(st.sampled_from([0] * 6 + [1]))
    flags = 0xC2 | will_retain << 5 | will_qos << 3 | will << 2 | reserved  # a clean session each time
    verdicts = [BAD if reserved or will_qos == 3 or (not will and (will_qos or will_retain)) else GOOD]
    client_id, verdict = draw(utf8_field([f"mallory:{secrets.token_hex(3)}", "mallory:" + "é" * 200]))
    verdicts.append("refused" if verdict == GOOD and len(client_id) > 130 else verdict)
    body = field(b"MQTT") + bytes([4, flags]) + b"\x00\x1e" + client_id
    if will:
        topic, verdict = draw(utf8_field([f"{ROOM}/mallory", f"{ROOM}/alice"], ["im/room/+/mallory", ""]))
        body += topic + field(MARK + b" will")
        # a Will where mallory may not write: the broker may refuse the CONNECT, and must never deliver it;
        # a retained Will on a chat topic, too (no retained chat)
        refusable = f"{ROOM}/alice".encode() in topic or will_retain
        verdicts.append(ANY if verdict == GOOD and refusable else verdict)
    user, verdict = draw(utf8_field(["mallory"]))
    body += user
    verdicts.append(verdict)
    password, verdict = draw(utf8_field([password_of("mallory")]))
    body += password
    verdicts.append(verdict)
    if draw(st.integers(0, 5)) == 0:
        body += smuggled()
        verdicts.append(BAD)
    verdict = worst(*verdicts)
    return packet(0x10, body), "refused" if verdict == GOOD and "refused" in verdicts else verdict


FRAMES = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def in_step(got: list[tuple[int, bytes]], closed: bool, verdict: str) -> None:
    answered = any(first == PINGRESP for first, _ in got)
    if verdict == GOOD:
        assert answered and not closed, f"a well-formed case put the connection out of step: {got}"
    elif verdict == BAD:
        assert closed and not answered, f"a malformed packet left the connection open: {got}"
    else:
        assert closed or answered


@FRAMES
@given(case=frames_after_connect())
def test_fuzzed_packets_after_connect(net: Net, case: tuple[bytes, str]) -> None:
    data, verdict = case
    event(verdict)
    got, closed = net.attack(data + PINGREQ * 2)
    in_step(got, closed, verdict)
    net.unharmed()


@FRAMES
@given(case=connect_frame())
def test_fuzzed_connects(net: Net, case: tuple[bytes, str]) -> None:
    data, verdict = case
    event(verdict)
    got, closed = net.attack(data + PINGREQ * 2, signed_in=False)
    accepted = bool(got) and got[0] == (0x20, b"\x00\x00")
    if verdict == "refused":
        assert not accepted and closed, got
    elif verdict == BAD:
        assert not accepted, f"a malformed CONNECT was accepted: {got}"
    in_step(got[1:] if accepted else got, closed, verdict if verdict != "refused" else ANY)
    net.unharmed()
