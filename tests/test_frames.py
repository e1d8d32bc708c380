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
        limits=Limits(publish_rate=10_000.0, publish_burst=10_000, max_connections=1000),
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
