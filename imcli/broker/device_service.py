"""The broker's own answers about devices (issue 17): ``DeviceRequest`` on the request topic.

A client asks as it asks the workers (``<prefix>/request/<me>/<corr>``, imcli/core/request_reply.py)
and hears the reply on ``<prefix>/user/<me>/reply/<corr>``; the broker takes such a request
after the publish checks and before the fan-out, so that no worker sees it (a ``passwd``
request carries the new password) and the device records stay with the broker that checks
them. On a broker without this service (Mosquitto, NATS) the presence worker answers
``unsupported``.

Who may do what: any connection of the account may list and revoke; issuing a device or a
token credential and changing the password need a connection that logged in with the
account password (a stolen device credential cannot make itself a spare that survives its
revocation, nor change the password).

A revoked device: its record goes (its credential stops working at once), the account hears
a ``device_revoked`` notice naming it (a running ``imcli chat`` or ``listen`` of that device
stops and says why), every connection of its client ids is closed and their sessions are
deleted, so that nothing of it can be resumed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from amqtt.session import Session

from imcli.broker.accounts import AccountStore, check_password
from imcli.broker.devices import SEEN_FLUSH, DeviceStore
from imcli.core.errors import ImcliError, NameTaken, NotFound
from imcli.core.rules import device_of_client_id, parse_device_credential
from imcli.core.wire import (
    DeviceInfo,
    DeviceReply,
    DeviceRequest,
    ErrorReply,
    MalformedPayload,
    Notice,
    TopicKind,
    Topics,
    WireModel,
    decode,
    encode,
)

log = logging.getLogger(__name__)

Broadcast = Callable[[str, bytes, int], Awaitable[None]]
CLOSE_WAIT = 2.0  # seconds a revoked connection is given to end before its session is deleted anyway


class DeviceHost(Protocol):
    """What the service needs of the broker (``ImBroker``)."""

    def session_table(self) -> Mapping[str, tuple[Session, Any]]: ...

    async def delete_session(self, client_id: str) -> None: ...

    async def close_connection(self, handler: Any) -> None: ...


def logged_in_with_password(session: Session) -> bool:
    password = session.password
    if isinstance(password, bytes):
        password = password.decode("utf-8", "replace")
    return password is not None and parse_device_credential(password) is None


class DeviceService:
    def __init__(
        self, store: DeviceStore, accounts: AccountStore, topics: Topics, host: DeviceHost, broadcast: Broadcast
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.topics = topics
        self.host = host
        self.broadcast = broadcast

    async def keep_last_seen(self) -> None:
        """Write the devices' last-seen times now and then (imcli/broker/devices.py)."""
        while True:
            await asyncio.sleep(SEEN_FLUSH)
            try:
                self.store.flush()
            except OSError:
                log.exception("could not write the devices' last-seen times")

    async def intercept(self, session: Session, topic: str, data: bytes | bytearray) -> bool:
        """Whether this publish was a device request (answered here, not delivered further)."""
        if "/request/" not in topic or b"device_request" not in data:  # not a scan of every file chunk
            return False
        parsed = self.topics.parse(topic)
        account = session.username or ""
        if parsed is None or parsed.kind is not TopicKind.REQUEST or parsed.sender != account or not parsed.key:
            return False
        try:
            request = decode(bytes(data))
        except MalformedPayload:
            return False
        if not isinstance(request, DeviceRequest):
            return False
        try:
            reply: WireModel = await self.answer(session, account, request)
        except NameTaken as exc:
            reply = ErrorReply(id=request.id, code="taken", text=exc.message, hint=exc.hint or None)
        except NotFound as exc:
            reply = ErrorReply(id=request.id, code="not_found", text=exc.message, hint=exc.hint or None)
        except ImcliError as exc:
            reply = ErrorReply(id=request.id, code="invalid", text=exc.message, hint=exc.hint or None)
        await self.broadcast(self.topics.reply(account, parsed.key), encode(reply), 1)
        return True

    async def answer(self, session: Session, account: str, request: DeviceRequest) -> WireModel:
        if request.op == "list":
            return DeviceReply(id=request.id, devices=self.listed(account))
        if request.op == "revoke":
            if not request.name:
                return ErrorReply(id=request.id, code="invalid", text="name the device or token to revoke")
            await self.revoke(account, request.name, asker=session.client_id)
            return DeviceReply(id=request.id, revoked=[request.name], devices=self.listed(account))
        if not logged_in_with_password(session):
            return ErrorReply(
                id=request.id, code="denied", text=f"'{request.op}' needs a login with the account password"
            )
        if request.op in ("issue", "token"):
            if not request.name:
                return ErrorReply(id=request.id, code="invalid", text="name the device or token")
            credential = self.store.issue(account, request.name, "token" if request.op == "token" else "device")
            return DeviceReply(id=request.id, credential=credential)
        # passwd: argon2, in a thread
        new = check_password(request.password or "")
        await asyncio.to_thread(self.accounts.set_password, account, new)
        revoked = []
        if request.revoke_others:
            for record in self.store.of(account):
                if record.name != request.name:
                    await self.revoke(account, record.name)
                    revoked.append(record.name)
        return DeviceReply(id=request.id, revoked=revoked, devices=self.listed(account))

    def listed(self, account: str) -> list[DeviceInfo]:
        online = self.online_devices(account)
        return [
            DeviceInfo(
                name=r.name,
                kind="token" if r.kind == "token" else "device",
                created=r.created,
                last_seen=r.last_seen,
                online=r.name in online,
            )
            for r in self.store.of(account)
        ]

    def online_devices(self, account: str) -> set[str]:
        online = set()
        for client_id, (session, _) in self.host.session_table().items():
            if session.username == account and session.transitions.is_connected():
                device = device_of_client_id(account, client_id)
                if device is not None:
                    online.add(device)
        return online

    async def revoke(self, account: str, name: str, asker: str | None = None) -> None:
        """The device's record goes, its account is told, its connections close and its sessions go
        (but for the asker's own connection, which is to hear the reply: its client closes it)."""
        self.store.revoke(account, name)
        notice = Notice(code="device_revoked", text=f"the device {name} of {account} was logged out", topic=name)
        await self.broadcast(self.topics.notice(account), encode(notice), 1)
        await self.end_sessions(account, name, asker)

    async def end_sessions(self, account: str, name: str, asker: str | None = None) -> None:
        doomed = [
            (client_id, session, handler)
            for client_id, (session, handler) in list(self.host.session_table().items())
            if session.username == account and device_of_client_id(account, client_id) == name and client_id != asker
        ]
        for client_id, session, handler in doomed:
            if session.transitions.is_connected() and handler is not None:
                log.warning("closing %s: its device was revoked", client_id)
                await self.host.close_connection(handler)
        for client_id, session, _ in doomed:
            for _ in range(int(CLOSE_WAIT / 0.05)):
                if not session.transitions.is_connected():
                    break
                await asyncio.sleep(0.05)
            if self.host.session_table().get(client_id, (None, None))[0] is session:
                await self.host.delete_session(client_id)
