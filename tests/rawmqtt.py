"""Raw paho clients for tests: what an attacker or a bot would use, against any broker.

Absence is proven with a barrier: after a forbidden publish, a legitimate one follows on
the same connection; everything an observer received before the barrier is kept
(``until`` returns it, ``expect`` keeps it for ``silent``), so a forged message that
arrived first cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from imcli.core.framing import decode_length, encode_length
from imcli.core.mqtt import BrokerAddress
from imcli.core.wire import ChatMessage, encode

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes
_CONNACK_V311 = {0: 0, 133: 2, 136: 3, 134: 4, 135: 5}


def password_of(name: str) -> str:
    return f"correct-horse-{name}"


def chat(text: str) -> bytes:
    """A chat message's payload, with a fresh id: each one is unique, so an observer can tell it apart."""
    return encode(ChatMessage(text=text))


# how long a test waits for what must come: on CI's two cores, loaded by the suite's other worker and
# its brokers and browsers, 5 s was one slow moment from a failure. A wait, not a sleep: what comes
# ends it at once; only a test that is failing waits it out.
WAIT = 15.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclasses.dataclass
class Raw:
    client: paho.Client
    username: str | None = None
    rc: int | None = None  # the MQTT 3.1.1 CONNACK code
    session_present: bool = False  # the CONNACK's flag: the broker had a persistent session for the client id
    messages: queue.Queue[paho.MQTTMessage] = dataclasses.field(default_factory=queue.Queue)
    connected: threading.Event = dataclasses.field(default_factory=threading.Event)
    disconnected: threading.Event = dataclasses.field(default_factory=threading.Event)
    subacks: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    skipped: list[paho.MQTTMessage] = dataclasses.field(default_factory=list)  # passed over by expect(topic)
    clean: bool = True  # a clean session: close() unsubscribes first, as imcli's MqttClient does
    filters: list[str] = dataclasses.field(default_factory=list)  # subscribed (granted or not)

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the granted QoS, or 128 when refused."""
        _, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None, "not connected"
        self.filters.append(topic_filter)
        assert wait_until(lambda: mid in self.subacks), "no SUBACK"
        return self.subacks[mid][0]

    def subscribe_all(self, *filters: str) -> list[int]:
        return [self.subscribe(f) for f in filters]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def arrivals(self, seconds: float) -> Iterator[paho.MQTTMessage]:
        """Each message as it arrives, until ``seconds`` have passed since the call."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                yield self.messages.get(timeout=left)
            except queue.Empty:
                return

    def expect(self, topic: str | None = None, timeout: float = WAIT) -> paho.MQTTMessage:
        """The next message on ``topic``; others that arrive first are kept for ``silent``."""
        for msg in self.arrivals(timeout):
            if topic is None or msg.topic == topic:
                return msg
            self.skipped.append(msg)
        raise AssertionError(f"no message on {topic or 'any topic'} within {timeout}s")

    def until(self, topic: str, payload: bytes | None = None, timeout: float = WAIT) -> list[paho.MQTTMessage]:
        """Every message up to and including the first on ``topic`` (with ``payload``)."""
        got: list[paho.MQTTMessage] = []
        for msg in self.arrivals(timeout):
            got.append(msg)
            if msg.topic == topic and (payload is None or msg.payload == payload):
                return got
        raise AssertionError(f"nothing on {topic} within {timeout}s; got {[m.topic for m in got]}")

    def silent(self, seconds: float = 1.0, topic_prefix: str = "") -> list[paho.MQTTMessage]:
        """What ``expect`` passed over, and what arrives within ``seconds``: proof of absence."""
        got = [m for m in self.skipped if m.topic.startswith(topic_prefix)]
        self.skipped.clear()
        got += [m for m in self.arrivals(seconds) if m.topic.startswith(topic_prefix)]
        return got

    def close(self) -> None:
        if self.clean and self.filters and self.client.is_connected():
            # nats-server 2.9 deletes a closing clean session's consumers under its lock, stalling the
            # cluster's routes for seconds (imcli/core/mqtt.py, MqttClient.close): unsubscribe first
            self.client.unsubscribe(list(dict.fromkeys(self.filters)))
        self.client.disconnect()
        self.client.loop_stop()
        _close_wakeup_pair(self.client)

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT (the Last Will fires)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            sock.close()
        _close_wakeup_pair(self.client)


def barrier(sender: Raw, *observers: Raw, quiet: float = 0.2) -> list[list[paho.MQTTMessage]]:
    """A legitimate room message from ``sender``; what each observer got before it (and what
    ``expect`` passed over), then within ``quiet`` seconds after it; the barrier itself left out."""
    topic = f"im/room/lobby/{sender.username}"
    payload = chat("barrier")
    sender.publish(topic, payload)
    return [o.until(topic, payload)[:-1] + o.silent(quiet) for o in observers]


def _close_wakeup_pair(client: paho.Client) -> None:
    # paho wakes its loop through a pair of loopback TCP sockets that only Client.__del__
    # closes; clients still referenced at interpreter exit are finalised in no set order,
    # and pytest (warnings as errors) then fails the run on an "unclosed socket"
    client._reset_sockets(sockpair_only=True)


def v5_properties(packet_type: int, **values: object) -> Properties:
    """MQTT 5 properties of a packet (``PacketTypes.PUBLISH``, ...): ``TopicAlias=2``, ..."""
    properties = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def connect_raw(
    host: str,
    port: int,
    username: str | None,
    client_id: str = "",
    password: str | None = None,
    *,
    clean: bool = True,
    will: tuple[str, bytes, bool] | None = None,
    transport: str = "tcp",
    ca: str | None = None,
    v5: bool = False,
    will_delay: int | None = None,
) -> Raw:
    """A connected client, or a refused one (closed at once: paho would keep retrying).

    ``transport="websockets"`` speaks MQTT over WebSocket; ``ca`` turns TLS on, trusting that CA file;
    ``v5`` speaks MQTT 5 (Mosquitto's), its Will sent ``will_delay`` seconds after the connection ends.
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else clean,
        transport=transport,  # type: ignore[arg-type]
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
    )
    if ca is not None:
        client.tls_set(ca_certs=ca)
    r = Raw(client, username, clean=clean)
    if username is not None:
        client.username_pw_set(username, password if password is not None else password_of(username))
    if will is not None:
        delay = v5_properties(PacketTypes.WILLMESSAGE, WillDelayInterval=will_delay) if will_delay else None
        client.will_set(will[0], will[1], qos=1, retain=will[2], properties=delay)

    def on_connect(_c: object, _u: object, flags: object, rc: object, _p: object) -> None:
        if r.rc is None:
            r.rc = _CONNACK_V311.get(rc.value, rc.value)  # type: ignore[attr-defined]
            r.session_present = bool(getattr(flags, "session_present", False))
        r.connected.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_a: r.disconnected.set()
    client.on_message = lambda _c, _u, m: r.messages.put(m)
    client.on_subscribe = lambda _c, _u, mid, codes, _p: r.subacks.__setitem__(mid, [c.value for c in codes])
    client.connect(host, port, keepalive=30, clean_start=clean if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY)
    client.loop_start()
    assert r.connected.wait(10), "no CONNACK"
    if r.rc != 0:
        r.close()
    return r


# ---------------------------------------------------------------- MQTT frames by hand (raw sockets)


def field(data: bytes, length: int | None = None) -> bytes:
    """An MQTT length-prefixed field; ``length`` lies about the size when given."""
    return (len(data) if length is None else length).to_bytes(2, "big") + data


def packet(first: int, body: bytes, length: int | None = None) -> bytes:
    """A packet: the fixed header's first byte, the remaining length (or a lie), the body."""
    return bytes([first]) + encode_length(len(body) if length is None else length) + body


def connect_packet(
    client_id: bytes, username: bytes | None = None, password: bytes | None = None, *, keepalive: int = 30
) -> bytes:
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = field(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + field(client_id)
    body += field(username) if username is not None else b""
    body += field(password) if password is not None else b""
    return packet(0x10, body)


def signed_in(
    address: BrokerAddress, name: str, client_id: bytes, *, clean: bool = True, window: int = 0
) -> socket.socket:
    """A socket signed in as ``name`` (password ``password_of``, no keep-alive, no Nagle), its
    CONNACK read; ``window``: a receive buffer that small (the broker's output then waits)."""
    sock = socket.socket()
    if window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.settimeout(10)
    sock.connect((address.host, address.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = connect_packet(client_id, name.encode(), password_of(name).encode(), keepalive=0)
    if not clean:
        body = body[:9] + bytes([body[9] & ~0x02]) + body[10:]  # the connect flags: no clean session
    sock.sendall(body)
    got, _ = read_packets(sock, lambda p: len(p) >= 1)
    assert got[:1] == [(0x20, b"\x00\x00")] or (not clean and got[:1] == [(0x20, b"\x01\x00")]), got
    return sock


def login(name: str, client_id: bytes | None = None) -> bytes:
    """mallory's CONNECT with the right password, under a fresh client id unless given."""
    cid = client_id if client_id is not None else f"{name}:fuzz{secrets.token_hex(3)}".encode()
    return connect_packet(cid, name.encode(), password_of(name).encode())


def publish_packet(
    topic: bytes, payload: bytes, qos: int = 0, topic_length: int | None = None, packet_id: int = 1
) -> bytes:
    body = field(topic, topic_length) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def read_packets(
    sock: socket.socket, until: Callable[[list[tuple[int, bytes]]], bool]
) -> tuple[list[tuple[int, bytes]], bool]:
    """The broker's packets as (first byte, body), read until ``until`` says so or the connection
    ends; also whether it ended (closed or reset). The socket's own timeout bounds each read."""
    buf = bytearray()
    got: list[tuple[int, bytes]] = []
    closed = False
    while not until(got):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            closed = True
            break
        buf += chunk
        while len(buf) >= 2:
            header = decode_length(buf, 1)
            if header is None:
                break
            length, i = header
            if len(buf) < i + length:
                break
            got.append((buf[0], bytes(buf[i : i + length])))
            del buf[: i + length]
    return got, closed


def ended(sock: socket.socket) -> bool:
    """Whether the broker closed this socket (it never sends anything before a CONNECT)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
