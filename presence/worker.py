"""The presence worker: an ordinary MQTT client with a service account.

So far it answers ``resolve`` requests (is this name an account?) on
``<prefix>/request/<from>/<corr>`` with a reply on ``<prefix>/user/<from>/reply/<corr>``.
Online/offline, nicknames and ``who`` (issue 3) build on the same request loop.
"""

from __future__ import annotations

import logging
from typing import Protocol

from imcli.mqtt import BrokerAddress, Credentials, Message, MqttClient
from imcli.wire import (
    ErrorReply,
    MalformedPayload,
    Resolved,
    ResolveRequest,
    TopicKind,
    Topics,
    WireModel,
    decode,
    encode,
    is_name,
)

log = logging.getLogger(__name__)


class AccountDirectory(Protocol):
    """Which user accounts exist (the embedded broker's store, later Mosquitto's)."""

    def is_user(self, name: str) -> bool: ...


class PresenceWorker:
    """``with PresenceWorker(...):`` connects, serves requests in paho's thread, and leaves."""

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        directory: AccountDirectory,
        topics: Topics | None = None,
        device: str = "worker",
    ) -> None:
        self.topics = topics or Topics()
        self.directory = directory
        self._client = MqttClient(
            address,
            credentials,
            f"{credentials.username}:{device}",
            reconnect=True,
            on_message=self._on_message,
        )

    def __enter__(self) -> PresenceWorker:
        self._client.connect()
        self._client.subscribe([self.topics.request_filter()])
        log.info("presence worker connected to %s", self._client.address)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _on_message(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if (
            parsed is None
            or parsed.kind is not TopicKind.REQUEST
            or parsed.sender is None
            or parsed.key is None
        ):
            return
        sender, corr = parsed.sender, parsed.key
        try:
            request = decode(message.payload)
        except MalformedPayload as exc:
            log.info("malformed request from %s: %s", sender, exc)
            self._reply(sender, corr, ErrorReply(id=corr, code="invalid", text=f"malformed request: {exc}"))
            return
        try:
            reply = self.handle(sender, request)
        except Exception:  # a bug in one handler must not stop the worker
            log.exception("request %s from %s failed", request.type, sender)
            reply = ErrorReply(id=corr, code="internal", text="the worker failed on this request")
        self._reply(sender, corr, reply)

    def handle(self, sender: str, request: WireModel) -> WireModel:
        if isinstance(request, ResolveRequest):
            name = request.name.lower()
            if is_name(name) and self.directory.is_user(name):
                return Resolved(id=request.id, account=name)
            return ErrorReply(id=request.id, code="not_found", text=f"unknown user {request.name!r}")
        kind = getattr(request, "type", "?")
        return ErrorReply(
            id=getattr(request, "id", "-"), code="invalid", text=f"unsupported request {kind!r}"
        )

    def _reply(self, sender: str, corr: str, reply: WireModel) -> None:
        self._client.publish_nowait(self.topics.reply(sender, corr), encode(reply), qos=1)
