"""Malformed MQTT against the embedded broker, over raw sockets: it must close the offending
connection, and stay up for everyone else.

After every case two signed-in clients that connected before it (alice and bob) still chat,
and a new client still gets in. The broker under test has a short CONNECT deadline (1 s),
so a peer that never completes its CONNECT is shown to be dropped quickly.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import Raw, connect_packet, connect_raw, field, login, packet, password_of, publish_packet

CONNECT_DEADLINE = 1.0
# what the fuzz broker accepts (the larger of a chat payload and a file's chunk, plus headers)
MAX_PACKET = BrokerSettings(data_dir=Path("unused"), port=0).max_packet
CLOSE_WITHIN = CONNECT_DEADLINE + 4.0  # the broker must have hung up on a bad peer by then

# ---------------------------------------------------------------- fixtures


@dataclass
class Fuzz:
    info: ServeInfo
    alice: Raw
    bob: Raw

    @property
    def port(self) -> int:
        return self.info.address.port

    def still_chatting(self) -> None:
        """A message from alice reaches bob, on connections older than the attack, and a newcomer gets in."""
        text = f"still here {secrets.token_hex(4)}".encode()
        self.alice.publish("im/room/fuzz/alice", text)
        got = self.bob.until("im/room/fuzz/alice", text, timeout=10)
        assert got[-1].payload == text
        newcomer = connect_raw("127.0.0.1", self.port, "carol", f"carol:{secrets.token_hex(3)}")
        try:
            assert newcomer.rc == 0
        finally:
            newcomer.close()

    def exchange(self, data: bytes, *, half_close: bool = False, after_login: str | None = None) -> bytes:
        """Send ``data`` (after a valid CONNECT as ``after_login``, if given); return everything the broker
        sent until it closed the connection, and fail if it did not close it within CLOSE_WITHIN."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_WITHIN) as sock:
            if after_login is not None:
                sock.sendall(login(after_login))
                assert sock.recv(4) == b"\x20\x02\x00\x00", "the valid CONNECT was not accepted"
            # the broker may cut us mid-write (an oversized header is refused before its body): read the cut below
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            received = bytearray()
            deadline = time.monotonic() + CLOSE_WITHIN
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return bytes(received)
                except TimeoutError:
                    break
                if not chunk:
                    return bytes(received)
                received += chunk
            raise AssertionError(f"the broker kept the connection open; it sent {bytes(received[:64])!r}")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    # alice says "still here" after every case, faster than the default 20/s once logins are
    # remembered: the rate limit (tested in test_limits.py) must not be what drops her line
    settings = BrokerSettings(
        data_dir=data,
        port=0,
        ws_port=0,
        packet_timeout=CONNECT_DEADLINE,
        limits=Limits(publish_rate=10_000.0, publish_burst=10_000),
    )
    with BackgroundServer(settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob", "carol", "mallory"):
            store.add(name, password_of(name))
        alice = connect_raw("127.0.0.1", info.address.port, "alice", "alice:fuzz")
        bob = connect_raw("127.0.0.1", info.address.port, "bob", "bob:fuzz")
        assert bob.subscribe("im/room/+/+") == 1
        try:
            yield Fuzz(info, alice, bob)
        finally:
            alice.close()
            bob.close()


# ---------------------------------------------------------------- before CONNECT

GOOD = connect_packet(b"mallory:x", b"mallory", password_of("mallory").encode())

BEFORE_CONNECT = {
    "nothing, then silence": b"",
    "truncated CONNECT": GOOD[: len(GOOD) // 2],
    "CONNECT header only": GOOD[:2],
    "remaining length of 5 bytes": b"\x10\xff\xff\xff\xff\x7f",
    "remaining length 256 MiB, 10 bytes sent": b"\x10\xff\xff\xff\x7f" + b"\x00" * 10,
    "protocol name length too long": packet(0x10, field(b"MQTT", 200) + b"\x04\x02\x00\x1e" + field(b"x")),
    "client id length beyond the packet": packet(0x10, field(b"MQTT") + b"\x04\x02\x00\x1e" + field(b"abc", 9000)),
    "username length beyond the packet": packet(
        0x10, field(b"MQTT") + b"\x04\xc2\x00\x1e" + field(b"mallory:x") + field(b"mallory", 4000) + field(b"pw")
    ),
    "invalid UTF-8 client id": connect_packet(b"mallory:\xff\xfe", b"mallory", password_of("mallory").encode()),
    "invalid UTF-8 username": connect_packet(b"mallory:x", b"mall\xc3\x28ory", b"pw"),
    "invalid UTF-8 protocol name": packet(0x10, field(b"MQ\xffT") + b"\x04\x02\x00\x1e" + field(b"x")),
    "NUL in username": connect_packet(b"mallory:x", b"mallory\x00", password_of("mallory").encode()),
    "will flag without will": packet(0x10, field(b"MQTT") + b"\x04\x06\x00\x1e" + field(b"mallory:x")),
    "reserved flag set": packet(0x10, field(b"MQTT") + b"\x04\x03\x00\x1e" + field(b"mallory:x")),
    "MQTT 5 CONNECT": packet(0x10, field(b"MQTT") + b"\x05\x02\x00\x1e\x00" + field(b"mallory:x")),
    "PUBLISH before CONNECT": publish_packet(b"im/room/fuzz/mallory", b"sneaky", qos=1),
    "SUBSCRIBE before CONNECT": packet(0x82, b"\x00\x01" + field(b"#") + b"\x01"),
    "PINGREQ before CONNECT": b"\xc0\x00",
    "reserved packet type 0": b"\x00\x00",
    "reserved packet type 15": b"\xf0\x00",
    "HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS ClientHello start": bytes.fromhex("16030100f5010000f10303") + b"\x00" * 32,
}


@pytest.mark.parametrize("case", list(BEFORE_CONNECT))
@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
def test_malformed_before_connect(fuzz: Fuzz, case: str, half_close: bool) -> None:
    received = fuzz.exchange(BEFORE_CONNECT[case], half_close=half_close)
    assert not received.startswith(b"\x20\x02\x00\x00"), "a malformed CONNECT was accepted"
    fuzz.still_chatting()


# ---------------------------------------------------------------- after CONNECT

AFTER_CONNECT = {  # framing errors: the broker must hang up
    "second CONNECT": login("mallory"),
    "PUBLISH topic length beyond the packet": publish_packet(b"im/room/fuzz/mallory", b"x", topic_length=5000),
    "PUBLISH remaining length 256 MiB, then silence": b"\x30\xff\xff\xff\x7f" + field(b"im/room/fuzz/mallory"),
    "SUBSCRIBE remaining length 256 MiB, then silence": b"\x82\xff\xff\xff\x7f\x00\x01" + field(b"im/room/+/+"),
    "PUBLISH larger than the packet limit": publish_packet(b"im/room/fuzz/mallory", b"x" * (MAX_PACKET + 1), qos=1),
    "PUBLISH started, never finished": publish_packet(b"im/room/fuzz/mallory", b"x" * 100)[:20],
    "reserved packet type 0": b"\x00\x00",
    "reserved packet type 15": b"\xf0\x00",
    "remaining length of 5 bytes": b"\x30\xff\xff\xff\xff\x7f",
    # spec violations amqtt used to answer; imcli/broker/packets.py closes the connection (MQTT 4.8)
    "SUBSCRIBE with no filter": packet(0x82, b"\x00\x01"),
    "SUBSCRIBE with QoS 3": packet(0x82, b"\x00\x01" + field(b"im/room/+/+") + b"\x03"),
    "PUBLISH with QoS 3": packet(0x36, field(b"im/room/fuzz/mallory") + b"\x00\x01x"),
}

TOLERATED = {  # well-formed packets that make no sense here: answered, or ignored, in step
    "PUBACK for nothing": b"\x40\x02\x12\x34",
    "UNSUBSCRIBE of nothing": packet(0xA2, b"\x00\x02" + field(b"im/nothing")),
}


@pytest.mark.parametrize("case", list(AFTER_CONNECT))
def test_malformed_after_connect_is_cut(fuzz: Fuzz, case: str) -> None:
    fuzz.exchange(AFTER_CONNECT[case], after_login="mallory", half_close=False)
    fuzz.still_chatting()


@pytest.mark.parametrize("case", list(TOLERATED))
def test_tolerated_protocol_errors_leave_the_connection_in_step(fuzz: Fuzz, case: str) -> None:
    """After the odd packet a PINGREQ still gets its PINGRESP (or the broker hung up): not out of step."""
    with socket.create_connection(("127.0.0.1", fuzz.port), timeout=CLOSE_WITHIN) as sock:
        sock.sendall(login("mallory"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(TOLERATED[case] + b"\xc0\x00")
        received = bytearray()
        while not received.endswith(b"\xd0\x00"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    fuzz.still_chatting()


BAD_TOPICS = {
    # MQTT-3.3.2-2: amqtt refuses these after reading the topic and would parse the rest of the packet
    # as further packets; the packet guard refuses the packet, and closes the connection, first
    "wildcard +": b"im/room/+/mallory",
    "wildcard #": b"im/room/#",
    "trailing +": b"im/room/fuzz/+",
    "trailing #": b"im/room/fuzz/mallory/#",
    "bare +": b"+",
    "bare #": b"#",
    # ill-formed UTF-8 (MQTT-1.5.3-1): amqtt would turn the bytes into the text "b'...'" and miscount
    # the payload (see tests/test_frames.py); U+0000 (MQTT-1.5.3-2): the guard closes the connection
    "invalid UTF-8 inside": b"im/room/fuzz/\xffmallory",
    "invalid UTF-8 at the end": b"im/room/fuzz/mallory\xff",
    "overlong UTF-8 sequence": b"im/room/\xc0\xafx/mallory",
    "NUL in a level": b"im/room/x/\x00",
}


@pytest.mark.parametrize("case", list(BAD_TOPICS))
def test_bad_publish_topics_reach_nobody(fuzz: Fuzz, case: str) -> None:
    """bob, subscribed to `im/room/+/+`, never gets a message published to a malformed topic name."""
    with socket.create_connection(("127.0.0.1", fuzz.port), timeout=2) as sock:
        sock.sendall(login("mallory"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(publish_packet(BAD_TOPICS[case], b"bad topic spam", qos=1))
        try:
            while sock.recv(4096):  # a PUBACK, if any, then maybe the broker hangs up
                pass
        except TimeoutError:
            pass  # still open: the message was dropped and the connection is usable
    barrier = f"barrier {secrets.token_hex(3)}".encode()
    fuzz.alice.publish("im/room/fuzz/alice", barrier)  # after the bad publish was handled
    seen = fuzz.bob.until("im/room/fuzz/alice", barrier, timeout=10)
    assert [m.topic for m in seen if m.payload == b"bad topic spam"] == []
    fuzz.still_chatting()


def test_subscribe_in_invalid_utf8_is_not_granted(fuzz: Fuzz) -> None:
    with socket.create_connection(("127.0.0.1", fuzz.port), timeout=CLOSE_WITHIN) as sock:
        sock.sendall(login("mallory"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(packet(0x82, b"\x00\x07" + field(b"im/room/\xff/+") + b"\x01"))
        answer = sock.recv(5)
        assert answer in (b"", b"\x90\x03\x00\x07\x80"), f"a filter in ill-formed UTF-8 was granted: {answer!r}"
    fuzz.still_chatting()


# ---------------------------------------------------------------- random bytes

FUZZ_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@FUZZ_SETTINGS
@given(garbage=st.binary(min_size=1, max_size=512))
def test_random_bytes_before_connect(fuzz: Fuzz, garbage: bytes) -> None:
    fuzz.exchange(garbage, half_close=True)
    fuzz.still_chatting()


def send_signed_in(fuzz: Fuzz, data: bytes) -> None:
    """Sign in as mallory, send ``data``, half-close, and wait until the broker closes (or a deadline)."""
    with socket.create_connection(("127.0.0.1", fuzz.port), timeout=CLOSE_WITHIN) as sock:
        sock.sendall(login("mallory"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + CLOSE_WITHIN
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break
            except (ConnectionResetError, TimeoutError):
                break


@FUZZ_SETTINGS
@given(garbage=st.binary(min_size=1, max_size=512))
def test_random_bytes_after_connect(fuzz: Fuzz, garbage: bytes) -> None:
    send_signed_in(fuzz, garbage)
    fuzz.still_chatting()


@FUZZ_SETTINGS
@given(
    header=st.sampled_from([0x30, 0x32, 0x82, 0xA2, 0x62, 0x40, 0xC0, 0xE0]),
    body=st.binary(max_size=200),
    lie=st.integers(min_value=-3, max_value=3),
)
def test_packets_with_lying_lengths_after_connect(fuzz: Fuzz, header: int, body: bytes, lie: int) -> None:
    data = packet(header, body, max(0, len(body) + lie))
    send_signed_in(fuzz, data)
    fuzz.still_chatting()


# ---------------------------------------------------------------- over WebSocket


@pytest.mark.parametrize(
    "case", ["PUBLISH topic length beyond the packet", "PUBLISH started, never finished", "second CONNECT"]
)
def test_websocket_connections_are_guarded_too(fuzz: Fuzz, case: str) -> None:
    """The same framing rules on the WebSocket listener (amqtt's ws reader has the same trust in lengths)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    assert fuzz.info.ws_port is not None
    uri = f"ws://127.0.0.1:{fuzz.info.ws_port}/"
    with connect(uri, subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(login("mallory"))
        assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"
        ws.send(AFTER_CONNECT[case])
        with pytest.raises(ConnectionClosed):  # a TimeoutError here: the broker kept the connection open
            _receive_until_closed(ws)
    fuzz.still_chatting()


def _receive_until_closed(ws: Any) -> None:
    """Whatever the broker sends first, then its close (ConnectionClosed); TimeoutError if it stays open."""
    deadline = time.monotonic() + CLOSE_WITHIN
    while time.monotonic() < deadline:
        ws.recv(timeout=CLOSE_WITHIN)
