"""What every worker shares: connect with a service account, read retained state back,
then answer requests.

A worker subscribes to its state topics and to its own notice topic, publishes a
``SyncMarker`` there and waits for it: the broker delivers the retained messages of a
subscription before later messages, so once the marker is back the state has been read.
Only then does it subscribe to requests. Several workers share ``<prefix>/request/+/+``:
each answers only the request types it owns (``handle`` returns ``None`` for the others), and
refuses with ``invalid`` a request of one of its types (``requests``) that does not validate, so
the asker hears why at once instead of waiting for its timeout. The
same request again (same sender and correlation id: a client resends a QoS 1 PUBLISH it had no
PUBACK for) gets the reply sent the first time, for a minute, and is not done twice.

Requests are heard and answered at QoS 1, except on NATS (``at_most_once``, set by
``imcli workers --nats-users``; deploy/nats/README.md, "Requests and replies at QoS 0"). There a
QoS 1 subscription is a JetStream consumer, made while the node's read loop of the worker waits
(seconds on a loaded cluster), that delivers a request only once the cluster has stored it; and a
QoS 1 PUBLISH is stored in JetStream while that read loop waits (up to 4 s; past that the node
closes the publisher's connection). A QoS 0 subscription is a plain NATS one that gets the request
as the node reads it (before the asker's QoS 1 copy is stored), and a QoS 0 reply reaches the asker's
subscription of either QoS at once, without a store. What QoS 0 gives up there: a request or reply
sent while its reader is away is lost instead of queued, which a clean session loses at QoS 1 too
(its consumers go with it); the persistent archive, or a ``chat``'s persistent session, would have
had it when they came back. The embedded broker and Mosquitto keep QoS 1: the embedded broker
drops QoS 0 copies to a connection with more than ``Limits.output_drop`` (1 MiB) waiting, where
QoS 1 copies still wait (up to ``output_close``), so a files worker behind on its upload chunks, or
a listener behind on a flood, would lose requests or replies without a word.

On NATS the state a worker rebuilds from retained messages is heard at QoS 0 too, with its own
notice topic and the sync markers on it: each worker names those of its ``state_filters`` in
``recoverable_filters``, and says there why each is safe. Such a topic's every message that
matters is retained, so one missed while the connection was down comes back with the renewed
subscription (nats-server sends a subscription's retained messages from its own map at the
SUBSCRIBE, whatever its QoS, before it reads the marker published next); and on a clean session
a QoS 1 copy sent while the worker is away is lost too, its consumers going with the session.
What stays at QoS 1 on NATS: the archive's chat (not retained: its persistent session queues what
is said while it is away, which is the history) and its group records (a group cleared while it is
away leaves no retained message, only the copy its session queued), and the files worker's chunks
and acknowledgements (a transfer, not state).
"""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

from imcli.core.errors import InvalidInput, RequestTimeout
from imcli.core.mqtt import BrokerAddress, Credentials, Message, MqttClient
from imcli.core.text import quoted, safe
from imcli.core.topics import is_id
from imcli.core.wire import (
    RESERVED_NAMES,
    ErrorReply,
    MalformedPayload,
    SyncMarker,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    build_schemas,
    decode,
    decode_as,
    device_client_id,
    encode,
    is_name,
)

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 30.0
# a request's reply is kept this long (at most this many, encoded, of at most so many bytes each and
# in all) for the same request sent again; a longer reply (a roster, a listing: a read that may be done
# again) is not kept: 1,000 `who` replies at 10,000 users held 100 MB of the workers' memory
REPLY_KEPT_FOR = 60.0
REPLIES_KEPT = 1000
REPLY_KEPT_BYTES = 16 * 1024
REPLIES_KEPT_BYTES = 2 * 1024 * 1024


class AccountDirectory(Protocol):
    """Which user accounts exist: the embedded broker's store, or (``None``) whatever a worker sees."""

    def is_user(self, name: str) -> bool: ...

    def user_names(self) -> frozenset[str]:
        """Every user account (``who --all`` lists those never seen online too)."""
        ...


def names_a_user(directory: AccountDirectory | None, name: str) -> bool:
    """Whether a request may name ``name`` as a person (a friend, a guest): a valid name that is
    neither reserved nor a service account, and a user account if ``directory`` knows them all
    (without one, as ``imcli workers`` runs with no ``--accounts-file``, any such name may be)."""
    return is_name(name) and name not in RESERVED_NAMES and (directory is None or directory.is_user(name))


class PasswordFileDirectory:
    """The accounts of a Mosquitto password file (``name:hash`` lines), re-read when it changes.

    Only the names are read. Reserved names (the workers' service accounts) are not users.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._names: frozenset[str] = frozenset()
        self.names()  # an unreadable file fails at start, not at the first request

    def names(self) -> frozenset[str]:
        try:
            st = self.path.stat()
            if not stat.S_ISREG(st.st_mode):  # /dev/zero was read to a MemoryError, a FIFO waited forever
                raise InvalidInput(f"the password file {quoted(str(self.path))} is not a regular file", "give a file")
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                lines = self.path.read_text(encoding="utf-8").splitlines()
                self._names = frozenset(line.split(":", 1)[0] for line in lines if ":" in line)
                self._stamp = (st.st_mtime_ns, st.st_size)
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(
                f"cannot read the password file {self.path}: {exc}", "check the path and its mode"
            ) from exc
        return self._names

    def is_user(self, name: str) -> bool:
        return name in self.names() and name not in RESERVED_NAMES

    def user_names(self) -> frozenset[str]:
        return frozenset(n for n in self.names() if is_name(n) and n not in RESERVED_NAMES)


class ServiceWorker:
    """Base of the workers. Subclasses set ``state_filters`` and implement the hooks."""

    # the request types ``handle`` answers: one of them that does not validate is refused as ``invalid``
    requests: ClassVar[tuple[type[WireModel], ...]] = ()

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        topics: Topics | None = None,
        device: str = "worker",
        clock: Callable[[], float] = time.time,
        *,
        persistent: bool = False,
    ) -> None:
        self.topics = topics or Topics()
        self.account = credentials.username
        self.clock = clock
        self.lock = threading.Lock()  # paho's thread and any timer thread share the state
        self._sync_id = ""
        self._resync_id = ""  # the marker that ends the reading of the retained state after a reconnect
        self.synced = threading.Event()
        self.stopping = threading.Event()
        # NATS (``imcli workers --nats-users``) sets this before entering: requests, replies, sync markers
        # and ``recoverable_filters`` at QoS 0 there, with no JetStream consumer and no JetStream store
        # (module docstring)
        self.at_most_once = False
        # the broker's largest payload, which it applies to this worker's replies too (Mosquitto's
        # message_size_limit: ``imcli workers --max-payload``): a larger reply is ``fit``; None: no limit
        self.max_payload: int | None = None
        # (sender, corr) -> (when, reply), paho's thread only: a client that lost its connection before the
        # PUBACK sends the request again (paho sets DUP); it gets the same reply, not a second go at it
        self._answered: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()  # encoded replies
        self._answered_bytes = 0
        self.client = MqttClient(
            address,
            credentials,
            device_client_id(credentials.username, device),
            clean_session=not persistent,  # persistent: the broker queues what arrives while we are away
            reconnect=True,
            on_message=self._on_message,
            on_connection=self._on_connection,
            on_renewed=self._on_renewed,
        )

    # ---------------------------------------------------------------- for subclasses

    def state_filters(self) -> list[str]:
        return []

    def recoverable_filters(self) -> list[str]:
        """Those of ``state_filters`` heard at QoS 0 on NATS (``at_most_once``; module docstring): each
        one's messages that matter are retained, so a reconnect's renewed subscription brings back what
        was missed while away (a clean session misses it at QoS 1 too); the others stay at QoS 1."""
        return []

    def on_state(self, topic: Topic, payload: bytes) -> None:
        """A message on a state topic (under ``self.lock``); ``MalformedPayload`` is logged and ignored."""

    def on_synced(self) -> None:
        """The retained state has been read (under ``self.lock``)."""

    def on_reconnected(self) -> None:
        """The broker may have lost retained messages: republish ours (under ``self.lock``)."""

    def on_resynced(self) -> None:
        """After a reconnect, the retained state has been read again (under ``self.lock``): what changed
        while the connection was down and is not retained any more (a cleared device status) can be
        told from what came back. Not called if a renewed subscription stays refused."""

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        """Answer a request (under ``self.lock``); ``None`` if another worker owns this type."""
        return None

    def on_foreign(self, message: Message) -> None:
        """A message outside the topic contract (a broker's ``$CONTROL`` answer), in paho's thread."""

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> ServiceWorker:
        build_schemas()  # a worker lives long: its first request is not the one to build them (wire.py)
        self.client.connect()
        try:
            self._sync()
            self.started()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def started(self) -> None:
        """After sync, before serving: start timers here."""

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.client.close()

    def _sync(self) -> None:
        own = self.topics.sync(self.account)
        state = self.state_filters()
        if self.at_most_once:
            recoverable = set(self.recoverable_filters())
            durable = [f for f in state if f not in recoverable]
            self.client.subscribe(durable, at_most_once=[*(f for f in state if f in recoverable), own])
        else:
            self.client.subscribe([*state, own])
        marker = SyncMarker()
        self._sync_id = marker.id
        self.client.publish(own, encode(marker), qos=self._qos)
        if not self.synced.wait(SYNC_TIMEOUT):
            # on Mosquitto, also what a window too small for the retained state does: the marker is dropped
            # behind it (deploy/mosquitto/mosquitto.conf, max_inflight_bytes), at every start
            hint = "start the workers again; on Mosquitto, see 'Retained state' in deploy/mosquitto/README.md"
            raise RequestTimeout(f"{self.account} did not read its retained state within {SYNC_TIMEOUT:g}s", hint)
        with self.lock:
            self.on_synced()
        if self.at_most_once:
            self.client.subscribe([], at_most_once=[self.topics.request_filter()])
        else:
            self.client.subscribe([self.topics.request_filter()])
        log.info("%s ready on %s", self.account, self.client.address)

    # ---------------------------------------------------------------- MQTT in (paho's thread)

    def _on_message(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            self.on_foreign(message)
            return
        try:
            if parsed.kind is TopicKind.REQUEST and parsed.sender and parsed.key:
                self._on_request(parsed.sender, parsed.key, message.payload)
            elif parsed.kind is TopicKind.NOTICE and parsed.owner == self.account:
                self._on_marker(message.payload)
            else:
                with self.lock:
                    self.on_state(parsed, message.payload)
        except MalformedPayload as exc:
            log.info("%s ignored a malformed message on %s: %s", self.account, message.topic, exc)
        except Exception:  # one bad message must not stop the worker
            log.exception("%s failed on %s", self.account, message.topic)

    def _on_marker(self, payload: bytes) -> None:
        marker = decode_as(payload, SyncMarker).id
        if marker == self._sync_id:
            self.synced.set()
        elif marker == self._resync_id:
            self._resync_id = ""
            with self.lock:
                self.on_resynced()

    def _on_request(self, sender: str, corr: str, payload: bytes) -> None:
        now = time.monotonic()
        while self._answered and next(iter(self._answered.values()))[0] < now - REPLY_KEPT_FOR:
            self._answered_bytes -= len(self._answered.popitem(last=False)[1][1])
        if (sender, corr) in self._answered:  # a create done twice would answer "taken"
            self._publish_reply(sender, corr, self._answered[sender, corr][1])
            return
        reply: WireModel | None
        try:
            request = decode(payload)
        except MalformedPayload as exc:
            reply = self.refuse_malformed(corr, payload, exc)  # None: not ours (another worker's, or nobody's)
        else:
            try:
                with self.lock:
                    reply = self.handle(sender, request)
            except Exception:  # a bug in one handler must not leave the client waiting for its timeout
                log.exception("%s: request %s from %s failed", self.account, request.type, sender)
                request_id = getattr(request, "id", corr)
                text = f"the {self.account} worker failed on this request"
                reply = ErrorReply(id=request_id, code="internal", text=text)
        if reply is not None:
            payload = encode(reply)
            if self.max_payload is not None and len(payload) > self.max_payload:
                reply = self.fit(reply, self.max_payload)
                payload = encode(reply)
            if len(payload) <= REPLY_KEPT_BYTES:
                self._answered[sender, corr] = (now, payload)
                self._answered_bytes += len(payload)
                while len(self._answered) > REPLIES_KEPT or self._answered_bytes > REPLIES_KEPT_BYTES:
                    self._answered_bytes -= len(self._answered.popitem(last=False)[1][1])
            self.send_reply(sender, corr, reply, payload)

    def fit(self, reply: WireModel, limit: int) -> WireModel:
        """``reply`` cut to at most ``limit`` bytes encoded (``max_payload``): a broker that applies its
        payload limit to the workers too (Mosquitto) drops a larger one, and its asker waits in vain. A
        worker whose replies are pages overrides it (moments, archive): others' messages and comments can
        grow a page past any limit. As it is by default."""
        return reply

    def refuse_malformed(self, corr: str, payload: bytes, exc: MalformedPayload) -> ErrorReply | None:
        """The refusal of a request that names one of this worker's ``requests`` types but does not
        validate (a field of the wrong type, out of range, missing, unknown); None if it names no type
        of ours, or is no JSON object at all: another worker's, or nobody's (its asker times out).
        Its id is the request's own if it is a valid id, else the correlation id of its topic."""
        if not payload.startswith(b"{"):
            return None
        try:
            claimed = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return None
        kind = claimed.get("type") if isinstance(claimed, dict) else None
        if not isinstance(kind, str) or kind not in self._request_types():
            return None
        request_id = claimed.get("id")
        if not isinstance(request_id, str) or not is_id(request_id):
            request_id = corr
        text = f"a malformed {kind} request ({safe(str(exc))[:200]})"
        return ErrorReply(id=request_id, code="invalid", text=text)

    @classmethod
    def _request_types(cls) -> frozenset[str]:
        """The ``type`` of each of ``requests``."""
        return frozenset(str(model.model_fields["type"].default) for model in cls.requests)

    def send_reply(self, sender: str, corr: str, reply: WireModel, payload: bytes) -> None:
        """Send a request's reply (``payload``, ``reply`` encoded; paho's thread, right after ``handle``).
        A worker that must act once the reply is out overrides it: nothing published here leaves before
        this returns."""
        self._publish_reply(sender, corr, payload)

    def _publish_reply(self, sender: str, corr: str, payload: bytes) -> None:
        self.client.publish_nowait(self.topics.reply(sender, corr), payload, qos=self._qos)

    @property
    def _qos(self) -> int:
        """Of replies and sync markers: 0 on NATS, where a QoS 1 PUBLISH is a JetStream store in the
        node's read loop of the worker (module docstring)."""
        return 0 if self.at_most_once else 1

    def _on_connection(self, up: bool) -> None:
        if up and self.synced.is_set():
            with self.lock:
                self.on_reconnected()

    def _on_renewed(self) -> None:
        """Every subscription granted again after a reconnect (paho's thread): the broker has sent their
        retained messages; a marker on our own notice topic comes back after them (as in ``_sync``)."""
        if self.synced.is_set():
            marker = SyncMarker()
            self._resync_id = marker.id
            self.client.publish_nowait(self.topics.sync(self.account), encode(marker), qos=self._qos)

    # ---------------------------------------------------------------- MQTT out

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish_nowait(topic, payload, qos=1, retain=retain)
