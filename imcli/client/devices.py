"""Device credentials, seen from the client (issue 17): the password traded once at login,
the devices and tokens listed and revoked, the password changed.

The broker answers these requests itself (imcli/broker/device_service.py, docs/PROTOCOL.md);
on a broker that cannot (Mosquitto, NATS: the presence worker answers ``unsupported``) a
login keeps the password instead, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from imcli.client.identity import Identity
from imcli.client.services import Connection, expect, verify_login
from imcli.core.errors import ImcliError, NotAllowed, RequestTimeout
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.wire import DeviceInfo, DeviceReply, DeviceRequest, ErrorReply


class Unsupported(ImcliError):
    """The broker issues no device credentials."""


@dataclass(frozen=True)
class Traded:
    credential: str  # the device credential, or the password where the broker has none
    password_kept: bool


def _ask(identity: Identity, request: DeviceRequest) -> DeviceReply:
    """The broker's answer; a timeout stays an error (a login never falls back to keeping the
    password because a busy broker was slow: only an explicit ``unsupported`` does that)."""
    try:
        with Connection(identity, "device") as connection:
            reply = connection.ask(request)
    except RequestTimeout as exc:
        raise RequestTimeout(
            "nobody answered the device request",
            "imcli serve answers it; beside Mosquitto or NATS the presence worker must run ('imcli workers')",
        ) from exc
    if isinstance(reply, ErrorReply) and reply.code == "unsupported":
        raise Unsupported(reply.text, "see deploy/mosquitto/README.md")
    return expect(reply, DeviceReply)


def trade_password(address: BrokerAddress, account: str, password: str, device: str) -> Traded:
    """Check the password, then trade it for a credential of ``device`` (or keep it, on a
    broker without device credentials)."""
    credentials = Credentials(account, password)
    verify_login(address, credentials, device)
    try:
        reply = _ask(Identity(address, credentials, device), DeviceRequest(op="issue", name=device))
    except Unsupported:
        return Traded(password, password_kept=True)
    if reply.credential is None:
        raise ImcliError("the broker issued no credential", "try again; the broker's log says why")
    return Traded(reply.credential, password_kept=False)


def create_token(address: BrokerAddress, account: str, password: str, label: str) -> str:
    """A bot's credential for the client id ``<account>:<label>``."""
    credentials = Credentials(account, password)
    verify_login(address, credentials, label)
    reply = _ask(Identity(address, credentials, label), DeviceRequest(op="token", name=label))
    if reply.credential is None:
        raise ImcliError("the broker issued no credential", "try again; the broker's log says why")
    return reply.credential


def list_devices(identity: Identity) -> list[DeviceInfo]:
    return _ask(identity, DeviceRequest(op="list")).devices


def revoke(identity: Identity, name: str) -> list[str]:
    return _ask(identity, DeviceRequest(op="revoke", name=name)).revoked


def change_password(identity: Identity, old: str, new: str, *, revoke_others: bool) -> list[str]:
    """A new account password (asked over a login with the old one); the devices revoked."""
    list_devices(identity)  # a broker without device credentials says so before the password travels
    credentials = Credentials(identity.account, old)
    verify_login(identity.address, credentials, identity.device)
    request = DeviceRequest(op="passwd", name=identity.device, password=new, revoke_others=revoke_others)
    return _ask(Identity(identity.address, credentials, identity.device), request).revoked


def end_device(identity: Identity) -> bool:
    """Revoke this device's own credential (``imcli logout``); ``False`` if the broker was not reachable."""
    try:
        revoke(identity, identity.device)
    except (Unsupported, NotAllowed):
        return True
    except ImcliError:
        return False
    return True
