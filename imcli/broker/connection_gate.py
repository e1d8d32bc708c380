"""The connection gate: who a CONNECT is, decided before any session is touched.

amqtt 0.12.1 deletes (clean session) or merges into (persistent session) the existing
session of a CONNECT's client id, and takes over a connected one, *before* it
authenticates: a wrong password with a victim's client id would wipe or kick the victim.
The adapter (imcli/broker/amqtt_adapter.py) therefore asks ``ConnectionGate.check`` right
after reading the CONNECT, and refuses with its CONNACK code before any of that happens.

A CONNECT is accepted when the password verifies, the client id is ``<account>`` or
``<account>:<device>`` (or empty, then one is assigned), and a Last Will, if any, is on a
topic the account may publish to. With open registration, username ``register:<name>``
creates the account ``<name>`` with the given password.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from amqtt.session import Session

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.acl import Access, TopicAcl
from imcli.core.errors import ImcliError
from imcli.core.rules import REGISTER_PREFIX
from imcli.core.wire import client_id_account

log = logging.getLogger(__name__)

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)
CONNECTION_ACCEPTED = 0
IDENTIFIER_REJECTED = 2
BAD_USERNAME_PASSWORD = 4
NOT_AUTHORIZED = 5

AMQTT_RANDOM_ID = "amqtt/"  # amqtt.utils.gen_client_id's prefix for CONNECTs with an empty client id
REGISTRATION_MODES = ("open", "closed")  # "closed": accounts are made by the operator only


def bound_client_id(username: str, client_id: str | None, clean_session: bool | None) -> str | None:
    """The client id a login of ``username`` gets: its own if bound to the account, a fresh
    ``<username>:<random>`` if it sent none, ``None`` (refused) if it belongs to someone else."""
    if not client_id or (clean_session and client_id.startswith(AMQTT_RANDOM_ID)):
        # an empty client id (amqtt's decoder already replaced it with a random one)
        return f"{username}:{secrets.token_hex(6)}"
    if client_id_account(client_id) != username:
        return None
    return client_id


def will_allowed(acl: TopicAcl, username: str, role: Role, topic: str, retain: bool) -> bool:
    """Whether a Last Will may be registered at CONNECT (issue 15: it is not checked again when it fires)."""
    if not acl.allows(username, role, topic, Access.PUBLISH):
        return False
    return not retain or acl.may_retain(topic)


class ConnectionGate:
    """``acl`` checks a Last Will's topic at CONNECT (without group or friend records: issue 15)."""

    def __init__(self, store: AccountStore, acl: TopicAcl, registration: str) -> None:
        if registration not in REGISTRATION_MODES:
            raise ValueError(f"registration must be 'open' or 'closed', not {registration!r}")
        self.store = store
        self.acl = acl
        self.registration = registration

    async def check(self, connect: Session) -> int:
        """The CONNACK return code this CONNECT (amqtt's ``Session`` as its decoder filled it in)
        deserves, 0 meaning accepted; on acceptance ``connect.client_id`` is the bound one."""
        username, password = connect.username, connect.password
        if not username or password is None:
            return NOT_AUTHORIZED  # anonymous
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return BAD_USERNAME_PASSWORD
        if username.startswith(REGISTER_PREFIX):
            return await self._register(connect, username.removeprefix(REGISTER_PREFIX), password)

        # a login verified before is recalled in the event loop; anything else costs argon2 in a thread
        account = self.store.recall(username, password)
        if account is None:
            account = await asyncio.to_thread(self.store.verify, username, password)
        if account is None:
            log.info("login refused for %r: unknown account or wrong password", username)
            return BAD_USERNAME_PASSWORD
        client_id = bound_client_id(username, connect.client_id, connect.clean_session)
        if client_id is None:
            log.warning("login refused for %r: client id %r is not bound to it", username, connect.client_id)
            return IDENTIFIER_REJECTED
        connect.client_id = client_id
        will_topic, will_retain = connect.will_topic or "", bool(connect.will_retain)
        if connect.will_flag and not will_allowed(self.acl, username, account.role, will_topic, will_retain):
            log.warning("login refused for %r: Last Will on %r not allowed", username, connect.will_topic)
            return NOT_AUTHORIZED
        return CONNECTION_ACCEPTED

    async def _register(self, connect: Session, name: str, password: str) -> int:
        if self.registration != "open":
            log.info("registration of %r refused: registration is closed", name)
            return NOT_AUTHORIZED
        if connect.client_id != REGISTER_PREFIX + name or connect.will_flag:
            return IDENTIFIER_REJECTED
        try:
            await asyncio.to_thread(self.store.add, name, password)
        except ImcliError as exc:
            log.info("registration of %r refused: %s", name, exc)
            return BAD_USERNAME_PASSWORD
        return CONNECTION_ACCEPTED
