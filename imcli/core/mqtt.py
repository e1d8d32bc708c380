"""The one module that imports paho: an MQTT 3.1.1 client as a context manager.

paho's callbacks are wired here and nowhere else; a paho message becomes our own
``Message`` at this edge, and paho/OS failures become ``imcli.core.errors`` exceptions
carrying the MQTT reason. Calls are synchronous and safe from any thread except
paho's own network thread (``on_message`` runs there: use ``publish_nowait`` in it).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from imcli.core.errors import AuthenticationFailed, BrokerUnreachable, InvalidInput, PublishFailed, SessionTakenOver
from imcli.core.rules import DEVICE_CREDENTIAL_PREFIX
from imcli.core.text import quoted

log = logging.getLogger(__name__)  # INFO only: a command configures no logging, and WARNING would reach its stderr

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map back for messages
_CONNACK_V311 = {128: 1, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
SERVER_UNAVAILABLE = 3  # the one refusal a reconnecting client waits out
# a subscription refused when renewed after a reconnect is tried again this often (1 s, 2 s, ... apart,
# about a minute in all) before it is fatal: a NATS 2.9 cluster refuses SUBSCRIBE for ~20 s after a node died,
# while JetStream elects new leaders for the MQTT sessions' streams
RENEW_TRIES = 10
# a first SUBSCRIBE of a client's own topics (always its to read) that the broker refuses is tried this
# often in all (1 s, then 2 s apart): a loaded NATS 2.9 cluster refuses a QoS 1 SUBSCRIBE when JetStream
# does not make its consumer within 4 s (the node logs "Unable to add JetStream consumer ... timeout")
SUBSCRIBE_TRIES = 3
# ... but only a refusal that took this long (seconds) to come: one that came sooner is the broker's
# decision (the embedded broker's ACL or subscription limit, Mosquitto's dynamic security, a NATS
# permission), which another try does not change; it fails at once instead of 3 s later. MQTT 3.1.1's
# SUBACK has one code, 0x80, for every refusal: how long it took is what tells them apart
FINAL_REFUSAL = 2.0
# a client that another connection with its client id takes over (MQTT-3.1.4-2) reconnects a second
# later and takes the session back: two of them take turns for ever. Where the broker cannot say so (the
# embedded one sends a ``taken_over`` notice: ``MqttClient.stop``), this many connections in a row, each
# closed within QUICK_LOSS seconds of its CONNACK, make ``quick_losses`` give up (docs/PROTOCOL.md §9)
TAKEN_OVER_LOSSES = 3
QUICK_LOSS = 5.0


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is: ``host:port``, and for a cluster the other nodes (``more``), tried in
    turn when one cannot be reached and when the connection to one is lost."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False  # verify the broker's certificate and host name, then speak MQTT inside TLS
    ca: str | None = None  # PEM file of the CA(s) to trust; None: the system's trust store
    more: tuple[tuple[str, int], ...] = ()  # the other nodes of a cluster, same TLS and CA

    @classmethod
    def of(cls, hosts: str, port: int = 1883, tls: bool = False, ca: str | None = None) -> BrokerAddress:
        """``host``, or ``a:1883,b:1883,c`` (a node without a port has ``port``)."""
        (host, first), *more = [_endpoint(part, port) for part in hosts.split(",")]
        return cls(host, first, tls, ca, tuple(more))

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), *self.more]

    @property
    def hosts(self) -> str:
        """What ``of`` reads back: ``host`` alone, or every node as ``host:port,...``."""
        if not self.more:
            return self.host
        return ",".join(_join(h, p) for h, p in self.endpoints)

    def __str__(self) -> str:
        return ",".join(_join(h, p) for h, p in self.endpoints) + (" (TLS)" if self.tls else "")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint(part: str, port: int) -> tuple[str, int]:
    text = part.strip()
    host, sep, digits = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not sep:
        host, digits = text, str(port)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not (digits.isascii() and digits.isdigit()) or not 0 < int(digits) < 65536:
        raise InvalidInput(
            f"invalid broker address {quoted(part)}", "give host or host:port, several separated by commas"
        )
    try:  # what the resolver is given (socket.getaddrinfo): else a UnicodeError, and a traceback, at connect
        host.encode("idna")
    except UnicodeError:
        shown = host if len(host) <= 64 else host[:61] + "..."
        raise InvalidInput(f"invalid host {quoted(shown)}", "give a host name or an IP address") from None
    return host, int(digits)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


ConnectionListener = Callable[[bool], None]


class MqttClient:
    """One MQTT connection. ``with MqttClient(...) as c:`` connects; leaving disconnects.

    With ``reconnect=True`` a lost connection is re-established in the background with
    backoff (1 to 4 s) and the subscriptions are renewed; ``on_connection`` hears
    ``False`` when it drops and ``True`` when it is back, ``on_renewed`` (paho's thread) once the
    broker has granted every renewed subscription (the retained messages of each were sent before).
    With several nodes in the address, connecting tries each in turn, and a lost connection is
    re-established with the next one
    (a cluster keeps the persistent session: the CONNACK's ``session_present`` says so).
    ``quick_losses``: stop reconnecting, ``fatal`` a ``SessionTakenOver``, when ``TAKEN_OVER_LOSSES``
    connections in a row were each lost within ``QUICK_LOSS`` seconds of their CONNACK (another
    client with this client id takes the session each time); ``stop`` ends it on the broker's word.
    """

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        client_id: str,
        *,
        clean_session: bool = True,
        will: Will | None = None,
        keepalive: int = 30,
        timeout: float = 10.0,
        reconnect: bool = False,
        on_message: Callable[[Message], None] | None = None,
        on_connection: ConnectionListener | None = None,
        on_renewed: Callable[[], None] | None = None,
        quick_losses: bool = False,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._credentials = credentials
        self._client_id = client_id
        self._clean_session = clean_session
        self._will = will
        self._keepalive = keepalive
        self._reconnect = reconnect
        self._on_message = on_message or self._enqueue
        self._on_connection = on_connection
        self._on_renewed = on_renewed
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | None = None
        self._suback_codes: dict[int, list[ReasonCode]] = {}
        self._suback_waiters: dict[int, threading.Event] = {}
        # mid -> (filters, attempt, connection): a renewal belongs to one connection (``_connections``)
        self._renewals: dict[int, tuple[list[tuple[str, int]], int, int]] = {}
        self._connections = 0  # CONNACKs accepted so far
        self._filters: dict[str, int] = {}
        self._subscribed: set[str] = set()  # granted and not unsubscribed, those of subscribe_each too
        self._was_connected = False
        self._closing = False
        self._quick_losses = quick_losses
        self._connected_at = 0.0  # monotonic time of the last CONNACK accepted
        self._lost_quickly = 0  # connections in a row lost within QUICK_LOSS seconds of their CONNACK
        self.fatal: Exception | None = None
        # the last CONNACK's flag: False after a reconnect means the broker no longer had our persistent
        # session (it restarted without keeping sessions): what it had queued for us is gone
        self.session_present = False
        self.max_inflight = 20  # QoS 1 messages sent and not yet acknowledged (paho's default); before connect()
        self._paho: paho.Client | None = None
        self._endpoints = address.endpoints
        self._at = 0  # the node connected to (or being tried)

    @property
    def node(self) -> tuple[str, int]:
        """The node this client is connected to, or tries next."""
        return self._endpoints[self._at]

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> MqttClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect to the first node that answers; the last node's failure if none does."""
        for i in range(len(self._endpoints)):
            self._at = i
            try:
                self._connect_node(*self._endpoints[i])
            except BrokerUnreachable:
                if i == len(self._endpoints) - 1:
                    raise
                self._closing = False
                self._connack.clear()
                self._connack_rc = None
            else:
                return

    def _connect_node(self, host: str, port: int) -> None:
        address = BrokerAddress(host, port, self.address.tls, self.address.ca)
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=self._clean_session,
            protocol=paho.MQTTv311,
        )
        client.username_pw_set(self._credentials.username, self._credentials.password)
        if address.tls:
            client.tls_set_context(_tls_context(address.ca))
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        client.reconnect_delay_set(min_delay=1, max_delay=4)
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_connect_fail = self._handle_connect_fail
        self._paho = client
        try:
            client.connect(host, port, keepalive=self._keepalive)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise _tls_failure(address, exc) from exc
        except TimeoutError as exc:
            if address.tls:  # a plain broker waits for the rest of the "CONNECT" a ClientHello looks like
                raise BrokerUnreachable(f"no TLS handshake with {address}", "does that port speak TLS?") from exc
            raise BrokerUnreachable(f"no answer from {address}", "is the broker there?") from exc
        except OSError as exc:
            raise BrokerUnreachable(
                f"cannot reach the broker at {address}: {exc.strerror or exc}",
                "start one with 'imcli serve', or point --host/--port (IMCLI_HOST/IMCLI_PORT) at yours",
            ) from exc
        client.loop_start()
        if not self._connack.wait(self.timeout):
            self.close()
            raise BrokerUnreachable(f"no answer from {address} within {self.timeout:g}s", "is it an MQTT broker?")
        if self._connack_rc is None:  # closed before any CONNACK: see _handle_disconnect
            self.close()
            hint = "is TLS on there? then log in with --tls" if not address.tls else "is it an MQTT broker?"
            raise BrokerUnreachable(f"{address} closed the connection without answering", hint)
        rc = self._connack_rc
        if rc is not None and rc.is_failure:
            self.close()
            raise _refusal(rc, self._credentials)

    def close(self) -> None:
        self._closing = True
        client, self._paho = self._paho, None
        if client is not None:
            if self._clean_session and self._subscribed and client.is_connected():
                # A clean session ends by UNSUBSCRIBE, then DISCONNECT (the broker reads them in order).
                # NATS 2.9 deletes a closed clean session's JetStream consumers (one per QoS 1
                # subscription) while holding the session's lock, waiting up to 4 s for each delete;
                # every message for that client meanwhile blocks the route or connection that carries
                # it, and JetStream's own traffic on that route with it: other clients' QoS 1 publishes
                # and subscriptions then time out (the node closes the publisher, refuses the SUBSCRIBE).
                # An UNSUBSCRIBE deletes the consumers without waiting and without that lock, leaving
                # none to the close (nats-server 2.10 releases the lock first). Elsewhere: one packet.
                client.unsubscribe(sorted(self._subscribed))
            client.disconnect()
            client.loop_stop()

    def stop(self, error: Exception) -> None:
        """Stop for good, without reconnecting: ``fatal`` becomes ``error``; ``on_connection`` hears
        nothing more. Safe in paho's thread (``on_message``: the broker's notice that this client was
        taken over, which comes just before its close); ``close`` still ends the client."""
        self.fatal = self.fatal or error
        self._closing = True
        client = self._paho
        if client is not None:
            client.disconnect()  # the state a lost connection does not reconnect from, while the socket is open
            client.loop_stop()  # and where it was lost already (paho would reconnect from that state)

    @property
    def connected(self) -> bool:
        return self._paho is not None and self._paho.is_connected()

    # ---------------------------------------------------------------- operations

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's acknowledgement (PUBACK at QoS 1)."""
        info = self._client().publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishFailed(f"publish to {topic} failed: {paho.error_string(info.rc)}", _AGAIN)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishFailed(f"publish to {topic} failed: {exc}", _AGAIN) from exc
        if not info.is_published():
            raise PublishFailed(f"the broker did not acknowledge the message within {self.timeout:g}s", "try again")

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish without waiting (safe inside ``on_message``)."""
        self._client().publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, filters: list[str], qos: int = 1, *, at_most_once: Sequence[str] = (), tries: int = 1) -> None:
        """Subscribe (``at_most_once`` at QoS 0, in the same SUBSCRIBE) and wait for SUBACK; the refused
        filters again, up to ``tries`` SUBSCRIBEs in all (``SUBSCRIBE_TRIES`` for one's own topics), if
        their refusal took ``FINAL_REFUSAL`` seconds or more to come; raise if the broker refused any
        filter in the end."""
        pairs = [(f, qos) for f in filters] + [(f, 0) for f in at_most_once]
        for f, q in pairs:
            self._filters[f] = q
        for attempt in range(1, tries + 1):
            asked = time.monotonic()
            codes = self._subscribe_and_wait(pairs)
            final = time.monotonic() - asked < FINAL_REFUSAL  # a refusal at once: another try changes nothing
            self._subscribed.update(f for (f, _), rc in zip(pairs, codes, strict=True) if not rc.is_failure)
            pairs = [pair for pair, rc in zip(pairs, codes, strict=True) if rc.is_failure]
            if not pairs or attempt == tries or final:
                break
            log.info(
                "%s: the broker refused %s after %.1fs (try %d)",
                self._client_id,
                pairs,
                time.monotonic() - asked,
                attempt,
            )
            time.sleep(attempt)
        refused = [f for f, _ in pairs]
        for f in refused:  # not renewed after a reconnect
            self._filters.pop(f, None)
        if refused:
            raise PublishFailed(
                f"the broker refused the subscription to {', '.join(refused)}", "is your account allowed to read there?"
            )

    def subscribe_each(self, filters: list[str], qos: int = 1) -> list[str]:
        """Subscribe and wait for SUBACK; the filters the broker refused. None of them is renewed after a
        reconnect (the caller subscribes again: ``imcli.client.groupfollow``)."""
        codes = self._subscribe_and_wait([(f, qos) for f in filters])
        refused = [f for f, rc in zip(filters, codes, strict=True) if rc.is_failure]
        self._subscribed.update(f for f in filters if f not in refused)
        return refused

    def unsubscribe(self, filters: list[str]) -> None:
        """Stop a subscription (without waiting for UNSUBACK) and stop renewing it."""
        for f in filters:
            self._filters.pop(f, None)
            self._subscribed.discard(f)
        rc, _mid = self._client().unsubscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishFailed(f"unsubscribe failed: {paho.error_string(rc)}", _AGAIN)

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message from the inbox (default ``on_message``), or ``None`` on timeout."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    # ---------------------------------------------------------------- internals

    def _client(self) -> paho.Client:
        if self._paho is None:
            raise PublishFailed("not connected", _AGAIN)
        return self._paho

    def _subscribe_and_wait(self, topics: list[tuple[str, int]]) -> list[ReasonCode]:
        rc, mid = self._client().subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise PublishFailed(f"subscribe failed: {paho.error_string(rc)}", _AGAIN)
        done = threading.Event()
        with self._lock:  # the SUBACK may have arrived already
            if mid in self._suback_codes:
                done.set()
            else:
                self._suback_waiters[mid] = done
        if not done.wait(self.timeout):
            raise PublishFailed(f"the broker did not acknowledge the subscription within {self.timeout:g}s", _AGAIN)
        with self._lock:
            self._suback_waiters.pop(mid, None)
            return self._suback_codes.pop(mid)

    def _enqueue(self, message: Message) -> None:
        self._inbox.put(message)

    def _handle_connect(
        self, client: paho.Client, _u: object, flags: paho.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        self.session_present = flags.session_present
        _no_delay(client)
        self._connack_rc = rc
        self._connack.set()
        if rc.is_failure:
            # a reconnect refused: credentials changed, account removed. Not 3 (server unavailable:
            # imcli serve's login throttle or too many password checks at once, say when a whole
            # team reconnects after a restart): paho tries again, with its backoff
            if self._was_connected and _CONNACK_V311.get(rc.value) != SERVER_UNAVAILABLE:
                self.fatal = _refusal(rc, self._credentials)
                client.disconnect()
            return
        reconnected = self._was_connected
        self._was_connected = True
        self._connections += 1
        self._connected_at = time.monotonic()
        if reconnected:
            host, port = self.node
            log.info("%s reconnected to %s:%d (session present: %s)", self._client_id, host, port, self.session_present)
        if reconnected and self._filters:
            self._renew(client, list(self._filters.items()), 1, self._connections)
        if reconnected and self._on_connection is not None:
            self._on_connection(True)

    def _renew(self, client: paho.Client, filters: list[tuple[str, int]], attempt: int, connection: int) -> None:
        with self._lock:  # held across the call: the SUBACK must find its mid
            rc, mid = client.subscribe(filters)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._renewals[mid] = (filters, attempt, connection)

    def _renew_later(self, filters: list[tuple[str, int]], attempt: int, connection: int) -> None:
        client = self._paho
        if client is not None and not self._closing and client.is_connected() and connection == self._connections:
            self._renew(client, filters, attempt, connection)  # else the next reconnect renews them all

    def _next_node(self, client: paho.Client) -> None:
        if len(self._endpoints) > 1 and not self._closing and self._was_connected:
            self._at = (self._at + 1) % len(self._endpoints)
            _point_at(client, *self._endpoints[self._at], self._keepalive)

    def _handle_connect_fail(self, client: paho.Client, _u: object) -> None:
        self._next_node(client)

    def _handle_disconnect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if self._was_connected and not self._closing:
            host, port = self.node
            log.info("%s lost the connection to %s:%d (%s)", self._client_id, host, port, rc)
            self._count_loss()
        self._next_node(client)
        if not self._connack.is_set():  # e.g. a plain CONNECT sent to a TLS port: fail now, not after the timeout
            self._connack.set()
        if not self._closing and self._was_connected and self._on_connection is not None:
            self._on_connection(False)
        if not self._reconnect and not self._closing:
            self.fatal = self.fatal or BrokerUnreachable(f"lost the connection to {self.address}", "try again")

    def _count_loss(self) -> None:
        """A connection lost (paho's thread): one lost within ``QUICK_LOSS`` of its CONNACK counts, one
        that lasted longer starts the count again; at ``TAKEN_OVER_LOSSES`` in a row, ``stop``. A broker
        restart or a network loss ends one connection, and the next lasts: reconnecting goes on as ever."""
        if not self._quick_losses or self._connected_at == 0.0:
            return
        quick = time.monotonic() - self._connected_at < QUICK_LOSS
        self._connected_at = 0.0  # counted once (paho may tell one loss twice)
        self._lost_quickly = self._lost_quickly + 1 if quick else 0
        if self._lost_quickly >= TAKEN_OVER_LOSSES:
            device = self._client_id.partition(":")[2].split(".")[0] or self._client_id
            log.info(
                "%s: %d connections in a row lost right after connecting: taken over",
                self._client_id,
                TAKEN_OVER_LOSSES,
            )
            self.stop(SessionTakenOver(device, probably=True))

    def _handle_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._on_message(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _handle_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        with self._lock:
            renewal = self._renewals.pop(mid, None)
            if renewal is None:
                self._suback_codes[mid] = list(codes)
            waiter = self._suback_waiters.get(mid)
        if waiter is not None:
            waiter.set()
        elif renewal is not None:
            filters, attempt, connection = renewal
            refused = [f for f, rc in zip(filters, codes, strict=False) if rc.is_failure]
            if connection != self._connections:
                pass  # an earlier connection's: this one renews everything itself
            elif refused and attempt >= RENEW_TRIES:
                self.fatal = PublishFailed(
                    "the broker refused a subscription after reconnecting", "start again; the broker's log says why"
                )
            elif refused:
                log.info("%s: the broker refused %s after reconnecting (try %d)", self._client_id, refused, attempt)
                timer = threading.Timer(attempt, self._renew_later, (refused, attempt + 1, connection))
                timer.daemon = True
                timer.start()
            elif self._on_renewed is not None:
                self._on_renewed()


def _no_delay(client: paho.Client) -> None:
    """Small packets (a PUBACK, a file's progress, a chat line) leave at once: paho leaves Nagle's
    algorithm on, which holds one back while earlier bytes are unacknowledged (asyncio, and so the
    embedded broker, turns it off; Mosquitto with ``set_tcp_nodelay``)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # TLS too (an SSLSocket is one)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _point_at(client: paho.Client, host: str, port: int, keepalive: int) -> None:
    """Where paho's reconnect goes next (in its disconnect and connect-failure callbacks, where the
    socket is already closed). paho 2 has one broker per client and its ``host`` setter refuses a
    change while the connection state is not closed; ``connect_async`` is the public way to name a
    new broker: it resets that state, and paho's loop then reconnects there with the same client
    id, clean-session flag, credentials and Will, so a persistent session is found again."""
    client.connect_async(host, port, keepalive=keepalive)


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho drops the socket of a failed handshake without closing it (a ResourceWarning per failure)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _tls_context(ca: str | None) -> ssl.SSLContext:
    """Certificate and host name verified by the handshake itself (paho's own host name check uses
    ``ssl.match_hostname``, deprecated and gone in Python 3.12), TLS 1.2 or later."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnreachable(f"cannot read the CA file {ca}: {exc}", "give a PEM file") from exc
    context.sslsocket_class = _ClosingSSLSocket
    return context


def _tls_failure(address: BrokerAddress, exc: ValueError | OSError) -> BrokerUnreachable:
    if isinstance(exc, ssl.SSLCertVerificationError | ssl.CertificateError):
        reason = getattr(exc, "verify_message", None) or str(exc)
        return BrokerUnreachable(
            f"the certificate of {address} is not trusted: {reason}",
            "give the CA that signed it with --ca FILE (IMCLI_CA), and connect by the name in the certificate",
        )
    reason = getattr(exc, "reason", None) or str(exc)
    return BrokerUnreachable(f"TLS handshake with {address} failed: {reason}", "does that port speak TLS?")


_AGAIN = "check that the broker runs, and try again"

# what a refused CONNECT most likely means, where the code alone does not say (MQTT 3.1.1 has no reason text)
_REFUSAL_HINTS = {
    5: "check the password; imcli serve also refuses an account past its connections or persistent sessions "
    "per account, and tells its connected clients why",
}


def _refusal(rc: ReasonCode, credentials: Credentials) -> AuthenticationFailed:
    code = _CONNACK_V311.get(rc.value, rc.value)
    if code == 4 and credentials.password.startswith(DEVICE_CREDENTIAL_PREFIX):
        return AuthenticationFailed(
            "the broker refused this device's credential: the device was logged out or revoked (code 4)",
            f"log in again with 'imcli login {credentials.username}'",
            code=4,
        )
    return AuthenticationFailed(
        f"the broker refused the connection: {str(rc).lower()} (code {code})",
        _REFUSAL_HINTS.get(code, "check the name, password and address"),
        code=code,
    )
