"""amqtt plugins: account authentication and the topic ACL.

Each plugin is an amqtt plugin (nested ``Config`` dataclass, keyword-only async hooks)
whose decisions come from pure code (``AccountStore``, ``TopicAcl``). ``ImBroker`` calls
their synchronous parts directly on its hot paths; see ``imcli/broker/server.py`` for why.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.acl import Access, TopicAcl
from imcli.core.errors import ImcliError
from imcli.core.wire import (
    DEFAULT_PREFIX,
    Friends,
    GroupInfo,
    MalformedPayload,
    Topics,
    WireModel,
    client_id_account,
    decode_as,
)

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=WireModel)

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)
CONNECTION_ACCEPTED = 0
IDENTIFIER_REJECTED = 2
BAD_USERNAME_PASSWORD = 4
NOT_AUTHORIZED = 5

REGISTER_PREFIX = "register:"  # username "register:<name>" asks to create account <name>
AMQTT_RANDOM_ID = "amqtt/"  # amqtt.utils.gen_client_id's prefix for CONNECTs with an empty client id

_stores: dict[Path, AccountStore] = {}
_stores_lock = threading.Lock()


def shared_store(data_dir: str | Path) -> AccountStore:
    """One ``AccountStore`` per data directory and process, shared by both plugins."""
    path = Path(data_dir).resolve()
    with _stores_lock:
        if path not in _stores:
            _stores[path] = AccountStore(path)
        return _stores[path]


def forget_store(data_dir: str | Path) -> None:
    with _stores_lock:
        _stores.pop(Path(data_dir).resolve(), None)


class AccountAuthPlugin(BaseAuthPlugin):
    """Accounts from ``<data_dir>/accounts.json``; anonymous refused; client ids bound.

    A CONNECT is accepted when the password verifies, the client id is ``<account>`` or
    ``<account>:<device>`` (or empty, then one is assigned), and a Last Will, if any, is on
    a topic the account may publish to. With open registration, username
    ``register:<name>`` creates the account ``<name>`` with the given password.
    """

    @dataclass
    class Config:
        data_dir: str = "."
        prefix: str = DEFAULT_PREFIX
        registration: str = "open"  # "open" or "closed" (admin-only)

    def __init__(self, context: object) -> None:
        super().__init__(context)
        self.store = shared_store(self.config.data_dir)
        self.acl = TopicAcl(Topics(self.config.prefix))
        if self.config.registration not in ("open", "closed"):
            raise ValueError(f"registration must be 'open' or 'closed', not {self.config.registration!r}")

    async def authenticate(self, *, session: Session) -> bool:
        return await self.check_connect(session) == CONNECTION_ACCEPTED

    async def check_connect(self, session: Session) -> int:
        """The CONNACK return code this CONNECT deserves (0 means accepted)."""
        username, password = session.username, session.password
        if not username or password is None:
            return NOT_AUTHORIZED  # anonymous
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return BAD_USERNAME_PASSWORD
        if username.startswith(REGISTER_PREFIX):
            return await self._register(session, username.removeprefix(REGISTER_PREFIX), password)

        # a login verified before is recalled in the event loop; anything else costs argon2 in a thread
        account = self.store.recall(username, password)
        if account is None:
            account = await asyncio.to_thread(self.store.verify, username, password)
        if account is None:
            log.info("login refused for %r: unknown account or wrong password", username)
            return BAD_USERNAME_PASSWORD
        if not session.client_id or (session.clean_session and session.client_id.startswith(AMQTT_RANDOM_ID)):
            # an empty client id (amqtt's decoder already replaced it with a random one)
            session.client_id = f"{username}:{secrets.token_hex(6)}"
        elif client_id_account(session.client_id) != username:
            log.warning("login refused for %r: client id %r is not bound to it", username, session.client_id)
            return IDENTIFIER_REJECTED
        if session.will_flag and not self._will_allowed(username, account.role, session):
            log.warning("login refused for %r: Last Will on %r not allowed", username, session.will_topic)
            return NOT_AUTHORIZED
        return CONNECTION_ACCEPTED

    def _will_allowed(self, username: str, role: Role, session: Session) -> bool:
        topic = session.will_topic or ""
        if not self.acl.allows(username, role, topic, Access.PUBLISH):
            return False
        return not session.will_retain or self.acl.may_retain(topic)

    async def _register(self, session: Session, name: str, password: str) -> int:
        if self.config.registration != "open":
            log.info("registration of %r refused: registration is closed", name)
            return NOT_AUTHORIZED
        if session.client_id != REGISTER_PREFIX + name or session.will_flag:
            return IDENTIFIER_REJECTED
        try:
            await asyncio.to_thread(self.store.add, name, password)
        except ImcliError as exc:
            log.info("registration of %r refused: %s", name, exc)
            return BAD_USERNAME_PASSWORD
        return CONNECTION_ACCEPTED


class GroupCache:
    """Membership of every group, from the retained ``<prefix>/group/<g>/info`` records.

    Only service accounts may publish those (the ACL), so what is here is the group
    worker's word. Updated in the broker's event loop; read on every group delivery.
    """

    def __init__(self) -> None:
        self._members: dict[str, frozenset[str]] = {}
        self._public: set[str] = set()

    def is_member(self, group: str, user: str) -> bool:
        return user in self._members.get(group, ())

    def is_public(self, group: str) -> bool:
        return group in self._public

    def update(self, group: str, payload: bytes) -> None:
        info = _record(payload, GroupInfo, lambda r: r.name == group, f"group {group}") if payload else None
        if payload and info is None:
            return  # unusable: keep the last good record
        self._public.discard(group)
        self._members.pop(group, None)
        if info is not None:  # else the group was deleted
            self._members[group] = frozenset(info.members)
            if not info.private:
                self._public.add(group)


class FriendCache:
    """Friends and DM policy of every user, from the retained ``<prefix>/user/<u>/friends``."""

    def __init__(self) -> None:
        self._friends_only: dict[str, frozenset[str]] = {}  # users with dm_policy "friends"

    def dm_allowed(self, to: str, sender: str) -> bool:
        allowed = self._friends_only.get(to)
        return allowed is None or sender in allowed or sender == to

    def update(self, user: str, payload: bytes) -> None:
        record = _record(payload, Friends, lambda r: r.account == user, f"friends of {user}") if payload else None
        if payload and record is None:
            return  # unusable: keep the last good record
        self._friends_only.pop(user, None)
        if record is not None and record.dm_policy == "friends":
            self._friends_only[user] = frozenset(record.friends)


def _record(payload: bytes, kind: type[_R], belongs: Callable[[_R], bool], what: str) -> _R | None:
    """A worker's retained record, or ``None`` (logged) if it is malformed or names someone else."""
    try:
        record = decode_as(payload, kind)
    except MalformedPayload as exc:
        log.warning("record for %s ignored, keeping the last good one: %s", what, exc)
        return None
    if not belongs(record):
        log.warning("record for %s names someone else: ignored", what)
        return None
    return record


class TopicAclPlugin(BaseTopicPlugin):
    """The topic contract of DESIGN.md, enforced on publish, subscribe and delivery."""

    @dataclass
    class Config:
        data_dir: str = "."
        prefix: str = DEFAULT_PREFIX
        max_payload: int = field(default=16 * 1024)

    def __init__(self, context: object) -> None:
        super().__init__(context)
        self.store = shared_store(self.config.data_dir)
        self.groups = GroupCache()
        self.friends = FriendCache()
        self.acl = TopicAcl(Topics(self.config.prefix), groups=self.groups, friends=self.friends)

    def check(self, username: str | None, topic: str, access: Access) -> bool:
        if username is None:
            return False
        return self.acl.allows(username, self.store.cached_role(username), topic, access)

    def receive_check(self, topic: str) -> Callable[[str | None], bool]:
        """``check(username, topic, RECEIVE)`` for one message and many recipients (fan-out)."""
        allowed, role_of = self.acl.receive_check(topic), self.store.cached_role
        return lambda username: username is not None and allowed(username, role_of(username))

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        return self.check(session.username, topic, Access(action.value))
