"""The presence worker: an ordinary MQTT client with a service account.

It reads device statuses (``<prefix>/status/<user>/<device>``), keeps one retained
``<prefix>/presence/<user>`` per user, announces join/leave/rename on ``<prefix>/events``,
and answers ``resolve``, ``who`` and ``rename`` requests. Its state lives in retained
messages: a restarted worker reads them back, waits for its own sync marker (which the
broker delivers after the retained messages it sent first), and only then answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from imcli.errors import RequestTimeout
from imcli.mqtt import BrokerAddress, Credentials, Message, MqttClient
from imcli.wire import (
    DeviceStatus,
    ErrorReply,
    MalformedPayload,
    Presence,
    RenameRequest,
    Resolved,
    ResolveRequest,
    Roster,
    SyncMarker,
    TopicKind,
    Topics,
    WhoRequest,
    WireModel,
    decode,
    encode,
)
from presence.roster import AccountDirectory, Effects, PresenceRoster

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 30.0


class PresenceWorker:
    """``with PresenceWorker(...):`` syncs from retained state, then serves until left."""

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        directory: AccountDirectory | None = None,
        topics: Topics | None = None,
        device: str = "worker",
        expiry_period: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics or Topics()
        self.account = credentials.username
        self.roster = PresenceRoster(directory)
        self._clock = clock
        self._expiry_period = expiry_period
        self._lock = threading.Lock()  # paho's thread and the expiry thread share the roster
        self._sync_id = ""
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._expiry = threading.Thread(target=self._expire_loop, name="presence-expiry", daemon=True)
        self._client = MqttClient(
            address,
            credentials,
            f"{credentials.username}:{device}",
            reconnect=True,
            on_message=self._on_message,
            on_connection=self._on_connection,
        )

    def __enter__(self) -> PresenceWorker:
        self._client.connect()
        try:
            self._sync()
        except BaseException:
            self._client.close()
            raise
        self._expiry.start()
        log.info("presence worker ready on %s", self._client.address)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._expiry.is_alive():
            self._expiry.join(5)
        self._client.close()

    def _sync(self) -> None:
        t = self.topics
        self._client.subscribe([t.presence_filter(), t.status_filter(), t.sync(self.account)])
        marker = SyncMarker()
        self._sync_id = marker.id
        self._client.publish(t.sync(self.account), encode(marker), qos=1)
        if not self._synced.wait(SYNC_TIMEOUT):
            raise RequestTimeout(f"the presence worker did not read its retained state within {SYNC_TIMEOUT:g}s")
        with self._lock:
            self._apply(self.roster.finish_sync(self._clock()))
        self._client.subscribe([t.request_filter()])

    # ---------------------------------------------------------------- MQTT in (paho's thread)

    def _on_message(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        try:
            if parsed.kind is TopicKind.STATUS and parsed.sender and parsed.key:
                self._on_status(parsed.sender, parsed.key, message.payload)
            elif parsed.kind is TopicKind.PRESENCE:
                self._on_presence(message.payload)
            elif parsed.kind is TopicKind.REQUEST and parsed.sender and parsed.key:
                self._on_request(parsed.sender, parsed.key, message.payload)
            elif parsed.kind is TopicKind.NOTICE and parsed.owner == self.account:
                self._on_sync(message.payload)
        except Exception:  # one bad message must not stop the worker
            log.exception("presence worker failed on %s", message.topic)

    def _on_status(self, user: str, device: str, payload: bytes) -> None:
        now = self._clock()
        with self._lock:
            if not payload:
                self._apply(self.roster.device_gone(user, device, now))
                return
            try:
                status = decode(payload)
            except MalformedPayload as exc:
                log.info("malformed status from %s/%s: %s", user, device, exc)
                return
            if isinstance(status, DeviceStatus):
                self._apply(self.roster.device_seen(user, device, status, now))

    def _on_presence(self, payload: bytes) -> None:
        if self._synced.is_set() or not payload:
            return  # after sync these are our own records coming back
        try:
            record = decode(payload)
        except MalformedPayload:
            return
        if isinstance(record, Presence):
            with self._lock:
                self.roster.load_presence(record)

    def _on_sync(self, payload: bytes) -> None:
        try:
            marker = decode(payload)
        except MalformedPayload:
            return
        if isinstance(marker, SyncMarker) and marker.id == self._sync_id:
            self._synced.set()

    def _on_request(self, sender: str, corr: str, payload: bytes) -> None:
        try:
            request = decode(payload)
        except MalformedPayload as exc:
            log.info("malformed request from %s: %s", sender, exc)
            self._reply(sender, corr, ErrorReply(id=corr, code="invalid", text=f"malformed request: {exc}"))
            return
        try:
            with self._lock:
                reply = self.handle(sender, request)
        except Exception:  # a bug in one handler must not leave the client waiting for its timeout
            log.exception("request %s from %s failed", request.type, sender)
            reply = ErrorReply(id=corr, code="internal", text="the presence worker failed on this request")
        self._reply(sender, corr, reply)

    def handle(self, sender: str, request: WireModel) -> WireModel:
        """Answer one request (the caller holds the roster lock)."""
        if isinstance(request, ResolveRequest):
            account = self.roster.resolve(request.name.strip().removeprefix("@"))
            if account is not None:
                return Resolved(id=request.id, account=account)
            return ErrorReply(id=request.id, code="not_found", text=f"unknown user {request.name!r}")
        if isinstance(request, WhoRequest):
            return Roster(id=request.id, users=self.roster.who(include_offline=request.all))
        if isinstance(request, RenameRequest):
            reply, effects = self.roster.rename(sender, request.nick, request.id, self._clock())
            self._apply(effects)
            return reply
        kind = getattr(request, "type", "?")
        return ErrorReply(id=getattr(request, "id", "-"), code="invalid", text=f"unsupported request {kind!r}")

    def _on_connection(self, up: bool) -> None:
        if up:  # the broker may have restarted without its retained messages: put ours back
            with self._lock:
                for record in self.roster.records():
                    self._client.publish_nowait(self.topics.presence(record.account), encode(record), retain=True)

    # ---------------------------------------------------------------- MQTT out

    def _apply(self, effects: Effects) -> None:
        t = self.topics
        for record in effects.presence:
            self._client.publish_nowait(t.presence(record.account), encode(record), qos=1, retain=True)
        for event in effects.events:
            self._client.publish_nowait(t.events(), encode(event), qos=1)
        for user, device in effects.clear_status:
            self._client.publish_nowait(t.status(user, device), b"", qos=1, retain=True)

    def _reply(self, sender: str, corr: str, reply: WireModel) -> None:
        self._client.publish_nowait(self.topics.reply(sender, corr), encode(reply), qos=1)

    def _expire_loop(self) -> None:
        while not self._stop.wait(self._expiry_period):
            with self._lock:
                effects = self.roster.expire(self._clock())
                if effects.presence or effects.clear_status:
                    self._apply(effects)
