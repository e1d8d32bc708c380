"""The topic ACL as the embedded broker applies it: roles from the account store, group
membership and DM policies from the records the workers retain.

``TopicAcl`` (imcli/broker/acl.py) is the pure rule; this module feeds it the broker's
view of the world (and registration its view of display names). ``GroupCache``, ``FriendCache``
and ``DisplayNames`` are updated in the broker's event
loop whenever a worker retains a record (``TopicAccess.learn``), and read on every check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from imcli.broker.accounts import Role
from imcli.broker.acl import Access, TopicAcl
from imcli.core.rules import dm_senders, may_dm
from imcli.core.topics import PARSE_CACHED_UP_TO
from imcli.core.wire import (
    Friends,
    GroupInfo,
    MalformedPayload,
    Presence,
    TopicKind,
    Topics,
    WireModel,
    decode_as,
)

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=WireModel)

RoleOf = Callable[[str], Role | None]
# topics with few recipients, the same ones message after message (``TopicAccess.receive_check``): a DM and
# its sender's copy; a file's chunks, to the files worker or from it to their reader (issue 16)
PRIVATE = frozenset({TopicKind.DM, TopicKind.SENT, TopicKind.UPLOAD, TopicKind.FILE_DATA})
DECISIONS = 4096  # ``TopicAccess.check``'s decisions kept at most (then forgotten at once: about 0.1 ms)
DECIDED_UP_TO = PARSE_CACHED_UP_TO  # characters of a topic whose decision is kept (any of the contract's)


class GroupCache:
    """Membership of every group, from the retained ``<prefix>/group/<g>/info`` records.

    Only service accounts may publish those (the ACL), so what is here is the group
    worker's word. Updated in the broker's event loop; read on every group delivery.
    """

    def __init__(self) -> None:
        self._members: dict[str, frozenset[str]] = {}
        self._public: set[str] = set()
        self.version = 0  # changes with every record taken (TopicAccess's decisions are kept until it does)

    def is_member(self, group: str, user: str) -> bool:
        return user in self._members.get(group, ())

    def is_public(self, group: str) -> bool:
        return group in self._public

    def update(self, group: str, payload: bytes) -> None:
        info = _record(payload, GroupInfo, lambda r: r.name == group, f"group {group}") if payload else None
        if payload and info is None:
            return  # unusable: keep the last good record
        self.version += 1
        self._public.discard(group)
        self._members.pop(group, None)
        if info is not None:  # else the group was deleted
            self._members[group] = frozenset(info.members)
            if not info.private:
                self._public.add(group)


class FriendCache:
    """Friends and DM policy of every user, from the retained ``<prefix>/user/<u>/friends``."""

    def __init__(self) -> None:
        self._friends_only: dict[str, frozenset[str]] = {}  # users with dm_policy "friends" -> dm_senders()
        self.version = 0  # changes with every record taken (TopicAccess's decisions are kept until it does)

    def dm_allowed(self, to: str, sender: str) -> bool:
        return may_dm(sender, self._friends_only.get(to))

    def update(self, user: str, payload: bytes) -> None:
        record = _record(payload, Friends, lambda r: r.account == user, f"friends of {user}") if payload else None
        if payload and record is None:
            return  # unusable: keep the last good record
        senders = dm_senders(user, record.dm_policy, record.friends) if record is not None else None
        self.version += 1
        if senders is None:
            self._friends_only.pop(user, None)
        else:
            self._friends_only[user] = senders


class DisplayNames:
    """Every user's display name, from the presence worker's retained ``<prefix>/presence/<u>``:
    registration refuses an account name that looks like one of them (``ConnectionGate``)."""

    def __init__(self) -> None:
        self._nicks: dict[str, str] = {}  # account -> display name, where the two differ

    def in_use(self) -> dict[str, str]:
        """display name -> its account."""
        return {nick: account for account, nick in self._nicks.items()}

    def update(self, user: str, payload: bytes) -> None:
        record = _record(payload, Presence, lambda r: r.account == user, f"presence of {user}") if payload else None
        if payload and record is None:
            return  # unusable: keep the last good record
        if record is None or record.nick == user:
            self._nicks.pop(user, None)
        else:
            self._nicks[user] = record.nick


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


class TopicAccess:
    """The topic contract of DESIGN.md, enforced on publish, subscribe and delivery."""

    def __init__(self, topics: Topics, role_of: RoleOf) -> None:
        self.topics = topics
        self.role_of = role_of
        self.groups = GroupCache()
        self.friends = FriendCache()
        self.names = DisplayNames()
        self.acl = TopicAcl(topics, groups=self.groups, friends=self.friends)
        # ``check``'s decisions: a publish is checked by its judge and again by the journal, and a
        # conversation's topic line after line (issue 21). A decision is a pure function of the
        # account, its role (asked of the account store each time: a deleted or changed account
        # has another key), the topic, the access and the group and friends records, so the table
        # is emptied whenever either cache takes a record, and when it is full.
        self._decided: dict[tuple[str, Role | None, str, Access], bool] = {}
        self._versions = (0, 0)

    def check(self, username: str | None, topic: str, access: Access) -> bool:
        if username is None:
            return False
        role = self.role_of(username)
        if len(topic) > DECIDED_UP_TO:  # kept topics are short: a flood of long ones costs no memory
            return self.acl.allows(username, role, topic, access)
        key = (username, role, topic, access)
        versions = (self.groups.version, self.friends.version)
        if versions != self._versions or len(self._decided) >= DECISIONS:
            self._decided.clear()
            self._versions = versions
        decided = self._decided.get(key)
        if decided is None:
            decided = self._decided[key] = self.acl.allows(username, role, topic, access)
        return decided

    def may_publish(self, username: str | None, topic: str) -> bool:
        return self.check(username, topic, Access.PUBLISH)

    def receives(self, username: str | None) -> Callable[[str], bool]:
        """``check(username, topic, RECEIVE)`` for one recipient and many topics (its queue, retained state)."""
        return lambda topic: self.check(username, topic, Access.RECEIVE)

    def receive_check(self, topic: str) -> Callable[[str | None], bool]:
        """``check(username, topic, RECEIVE)`` for one message and many recipients (fan-out).

        A topic of one user's own (a DM, its sender's copy, a file's chunks) has few recipients, the
        same ones message after message (the user's devices, the workers): their decisions are
        ``check``'s, kept. A room's
        or group's has many, each decided here (a table of rooms' listeners would not stay small)."""
        parsed = self.topics.parse(topic)
        if parsed is not None and parsed.kind in PRIVATE:
            return lambda username: self.check(username, topic, Access.RECEIVE)
        allowed, role_of = self.acl.receive_check(topic), self.role_of
        return lambda username: username is not None and allowed(username, role_of(username))

    def is_service(self, username: str | None) -> bool:
        """Workers' service accounts are trusted: no limits apply to them."""
        return self.role_of(username or "") is Role.SERVICE

    def learn(self, topic: str, payload: bytes) -> TopicKind | None:
        """Feed the caches from a record a worker retained (or cleared); the topic's kind, if any."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            return None
        if parsed.kind is TopicKind.GROUP_INFO and parsed.name:
            self.groups.update(parsed.name, payload)
        elif parsed.kind is TopicKind.FRIENDS and parsed.owner:
            self.friends.update(parsed.owner, payload)
        elif parsed.kind is TopicKind.PRESENCE and parsed.owner:
            self.names.update(parsed.owner, payload)
        return parsed.kind
