"""Raw paho clients for tests: what an attacker or a bot would use, against any broker.

Absence is proven with a barrier: after a forbidden publish, a legitimate one follows on
the same connection; everything an observer received before the barrier is kept
(``until`` returns it, ``expect`` keeps it for ``silent``), so a forged message that
arrived first cannot go unnoticed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes
_CONNACK_V311 = {0: 0, 133: 2, 134: 4, 135: 5}


def password_of(name: str) -> str:
    return f"correct-horse-{name}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclass
class Raw:
    client: paho.Client
    username: str | None = None
    rc: int | None = None  # the MQTT 3.1.1 CONNACK code
    messages: queue.Queue[paho.MQTTMessage] = field(default_factory=queue.Queue)
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    skipped: list[paho.MQTTMessage] = field(default_factory=list)  # passed over by expect(topic)

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the granted QoS, or 128 when refused."""
        _, mid = self.client.subscribe(topic_filter, qos)
        assert wait_until(lambda: mid in self.subacks), "no SUBACK"
        return self.subacks[mid][0]

    def subscribe_all(self, *filters: str) -> list[int]:
        return [self.subscribe(f) for f in filters]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def expect(self, topic: str | None = None, timeout: float = 5.0) -> paho.MQTTMessage:
        """The next message on ``topic``; others that arrive first are kept for ``silent``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if topic is None or msg.topic == topic:
                return msg
            self.skipped.append(msg)
        raise AssertionError(f"no message on {topic or 'any topic'} within {timeout}s")

    def until(self, topic: str, payload: bytes | None = None, timeout: float = 5.0) -> list[paho.MQTTMessage]:
        """Every message up to and including the first on ``topic`` (with ``payload``)."""
        got: list[paho.MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            got.append(msg)
            if msg.topic == topic and (payload is None or msg.payload == payload):
                return got
        raise AssertionError(f"nothing on {topic} within {timeout}s; got {[m.topic for m in got]}")

    def silent(self, seconds: float = 1.0, topic_prefix: str = "") -> list[paho.MQTTMessage]:
        """What ``expect`` passed over, and what arrives within ``seconds``: proof of absence."""
        got = [m for m in self.skipped if m.topic.startswith(topic_prefix)]
        self.skipped.clear()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if msg.topic.startswith(topic_prefix):
                got.append(msg)
        return got

    def close(self) -> None:
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


def _close_wakeup_pair(client: paho.Client) -> None:
    # paho wakes its loop through a pair of loopback TCP sockets that only Client.__del__
    # closes; clients still referenced at interpreter exit are finalised in no set order,
    # and pytest (warnings as errors) then fails the run on an "unclosed socket"
    client._reset_sockets(sockpair_only=True)


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
) -> Raw:
    """A connected client, or a refused one (closed at once: paho would keep retrying).

    ``transport="websockets"`` speaks MQTT over WebSocket; ``ca`` turns TLS on, trusting that CA file.
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        transport=transport,  # type: ignore[arg-type]
    )
    if ca is not None:
        client.tls_set(ca_certs=ca)
    r = Raw(client, username)
    if username is not None:
        client.username_pw_set(username, password if password is not None else password_of(username))
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=will[2])

    def on_connect(_c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        if r.rc is None:
            r.rc = _CONNACK_V311.get(rc.value, rc.value)  # type: ignore[attr-defined]
        r.connected.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_a: r.disconnected.set()
    client.on_message = lambda _c, _u, m: r.messages.put(m)
    client.on_subscribe = lambda _c, _u, mid, codes, _p: r.subacks.__setitem__(mid, [c.value for c in codes])
    client.connect(host, port, keepalive=30)
    client.loop_start()
    assert r.connected.wait(10), "no CONNACK"
    if r.rc != 0:
        r.close()
    return r
