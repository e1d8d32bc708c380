"""Who may publish, subscribe to and receive which topic: the contract of DESIGN.md as code.

The rules are Mosquitto-style patterns (``%u`` is the authenticated username) so that
``deploy/mosquitto`` can state the same rules in Mosquitto's own ACL language. Everything
here is pure: no broker, no I/O, easy to test exhaustively.

A publish must also name a topic the wire parser accepts (so ``+`` levels hold valid
names), and a subscription filter is allowed only if *every* topic it can match is
readable (``#`` alone is not within ``im/room/#``).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from imcli.broker.accounts import Role
from imcli.core.rules import ARCHIVE_ACCOUNT, FILES_ACCOUNT, dm_refusal, group_visible
from imcli.core.wire import TopicKind, Topics, is_name


class Access(enum.StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


# retained messages are state; chat is not: a retained chat line would replay forever
RETAINABLE = frozenset(
    {TopicKind.STATUS, TopicKind.PRESENCE, TopicKind.GROUP_INFO, TopicKind.FRIENDS, TopicKind.PROFILE}
)

USER_WRITE = ("room/+/%u", "user/+/dm/%u", "status/%u/+", "request/%u/+", "upload/%u/+", "fetch/%u/+")
USER_READ = ("room/#", "user/%u/#", "presence/#", "events", "profile/#")
SERVICE_WRITE = (
    "user/+/reply/+",
    "user/+/notice",
    "presence/+",
    "profile/+",  # the presence worker writes each profile for its owner (a user never writes one)
    "events",
    "group/+/info",
    "user/+/friends",
    "status/+/+",  # the presence worker clears statuses of devices that vanished without a Last Will
    "user/+/file/+",  # the files worker's downloads (issue 16)
)
# least privilege for the archive and files workers' accounts, as deploy/mosquitto/aclfile's `user
# archive` and `user files` and NATS's imcli/groups/natsauth.py ``SERVICE_RIGHTS``: replies (the files
# worker's downloads too) and their own notice topic, never another user's notice (a client trusts a
# ``rate`` notice there: the request it names fails at once)
SERVICE_WRITE_OF: dict[str, tuple[str, ...]] = {
    ARCHIVE_ACCOUNT: ("user/+/reply/+", "user/%u/notice"),
    FILES_ACCOUNT: ("user/+/reply/+", "user/+/file/+", "user/%u/notice"),
}
# a file's chunks and a download's acknowledgements: many small messages to the files worker alone,
# counted against their own rate (Limits.file_rate), not the chat rate
FILE_TRANSFER = frozenset({TopicKind.UPLOAD, TopicKind.FETCH})
SERVICE_READ = ("#",)
# and their reads, as the aclfile's `user archive` and `user files` with its `pattern read` lines
# (which apply to every account there) and NATS's ``SERVICE_RIGHTS`` with the account's own topics:
# what each worker subscribes to, and nothing of another service's (presence and groups read ``#``)
SERVICE_READ_OF: dict[str, tuple[str, ...]] = {
    ARCHIVE_ACCOUNT: (
        *("room/#", "user/+/dm/+", "group/+/info", "group/+/msg/+", "request/+/+"),
        *("presence/#", "events", "profile/#", "user/%u/#"),
    ),
    FILES_ACCOUNT: (
        *("upload/+/+", "fetch/+/+", "group/+/info", "user/+/friends", "request/+/+"),
        *("room/#", "presence/#", "events", "profile/#", "user/%u/#"),
    ),
}


class GroupView(Protocol):
    """Group membership as the broker last read it from ``<prefix>/group/<g>/info``."""

    def is_member(self, group: str, user: str) -> bool: ...

    def is_public(self, group: str) -> bool: ...


class FriendView(Protocol):
    """Who accepts direct messages from whom, as the broker last read it."""

    def dm_allowed(self, to: str, sender: str) -> bool: ...


class Everyone:
    def dm_allowed(self, to: str, sender: str) -> bool:
        return True


class NoGroups:
    def is_member(self, group: str, user: str) -> bool:
        return False

    def is_public(self, group: str) -> bool:
        return False


def topic_matches(topic: str, pattern: str) -> bool:
    """MQTT matching of a concrete topic against a filter/pattern."""
    return _matches(tuple(topic.split("/")), tuple(pattern.split("/")))


def _matches(levels: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    for i, p in enumerate(pattern):
        if p == "#":
            return True
        if i >= len(levels) or (p != "+" and p != levels[i]):
            return False
    return len(levels) == len(pattern)


def filter_within(filt: str, pattern: str) -> bool:
    """Whether every topic matched by subscription filter ``filt`` is matched by ``pattern``."""
    f, p = filt.split("/"), pattern.split("/")
    for i, pl in enumerate(p):
        if pl == "#":
            return True
        if i >= len(f):
            return False
        fl = f[i]
        if fl == "#":
            return False  # filter reaches deeper/wider than a pattern without '#'
        if pl == "+":
            continue
        if fl != pl:  # a literal pattern level admits only the same literal
            return False
    return len(f) == len(p)


@dataclass(frozen=True)
class TopicAcl:
    """The access rules for one topic prefix."""

    topics: Topics = field(default_factory=Topics)
    groups: GroupView = field(default_factory=NoGroups)
    friends: FriendView = field(default_factory=Everyone)

    def allows(self, username: str | None, role: Role | None, topic: str, access: Access) -> bool:
        if username is None or role is None or not is_name(username):
            return False
        if role is Role.USER and topic.startswith(self._group_head):
            return self._group_rule(username, topic, access)
        if access is Access.SUBSCRIBE:
            return any(filter_within(topic, p) for p in self._patterns(username, role, write=False))
        if "+" in topic or "#" in topic:
            return False
        if access is Access.PUBLISH:
            parsed = self.topics.parse(topic)
            if parsed is None:
                return False
            if (
                parsed.kind is TopicKind.DM
                and role is Role.USER
                and parsed.owner
                and not self.friends.dm_allowed(parsed.owner, username)
            ):
                return False
        levels = tuple(topic.split("/"))
        return any(
            _matches(levels, p) for p in _expand_levels(self.topics.prefix, username, role, access is Access.PUBLISH)
        )

    @property
    def _group_head(self) -> str:
        return f"{self.topics.prefix}/group/"

    def _group_rule(self, user: str, topic: str, access: Access) -> bool:
        """Group topics for users: messages for members only, info for members or if public."""
        levels = topic[len(self._group_head) :].split("/")
        group, rest = levels[0], levels[1:]
        if access is Access.SUBSCRIBE:
            if group == "+":  # all my groups: every delivery is checked (RECEIVE) below
                return rest in (["msg", "+"], ["info"])
            if not is_name(group):
                return False
            if rest == ["info"]:
                return self._info_visible(group, user)
            is_msg_filter = len(rest) == 2 and rest[0] == "msg" and (rest[1] == "+" or is_name(rest[1]))
            return (is_msg_filter or rest == ["#"]) and self.groups.is_member(group, user)
        if not is_name(group) or "+" in topic or "#" in topic:
            return False
        if rest == ["info"]:
            return access is Access.RECEIVE and self._info_visible(group, user)
        if len(rest) != 2 or rest[0] != "msg" or not is_name(rest[1]):
            return False
        if access is Access.PUBLISH and rest[1] != user:
            return False
        return self.groups.is_member(group, user)

    def _info_visible(self, group: str, user: str) -> bool:
        return group_visible(private=not self.groups.is_public(group), member=self.groups.is_member(group, user))

    def receive_check(self, topic: str) -> Callable[[str | None, Role | None], bool]:
        """``allows(user, role, topic, RECEIVE)`` for one message and many recipients.

        The topic is split once, not once per recipient, and the rules without ``%u``
        (``room/#`` for every user) are decided once per role; group topics (whose rule
        reads membership) take ``allows`` itself.
        """
        if topic.startswith(self._group_head) or "+" in topic or "#" in topic:
            return lambda username, role: self.allows(username, role, topic, Access.RECEIVE)
        levels = tuple(topic.split("/"))
        prefix = self.topics.prefix
        for_everyone: dict[Role, bool] = {}

        def check(username: str | None, role: Role | None) -> bool:
            if username is None or role is None or not is_name(username):
                return False
            everyone = for_everyone.get(role)
            if everyone is None:
                everyone = for_everyone[role] = any(_matches(levels, p) for p in _generic_levels(prefix, role))
            return everyone or any(_matches(levels, p) for p in _expand_levels(prefix, username, role, False))

        return check

    def refusal(self, username: str | None, topic: str) -> str:
        """Why a publish was refused, in words for the sender's notice."""
        parsed = self.topics.parse(topic)
        if (
            username
            and parsed is not None
            and parsed.kind is TopicKind.DM
            and parsed.sender == username
            and parsed.owner
            and not self.friends.dm_allowed(parsed.owner, username)
        ):
            return dm_refusal(parsed.owner)
        return f"you may not publish to {topic}"

    def may_retain(self, topic: str) -> bool:
        parsed = self.topics.parse(topic)
        return parsed is not None and parsed.kind in RETAINABLE

    def _patterns(self, username: str, role: Role, *, write: bool) -> tuple[str, ...]:
        return _expand(self.topics.prefix, username, role, write)


@lru_cache(maxsize=64)
def _generic_levels(prefix: str, role: Role) -> tuple[tuple[str, ...], ...]:
    """The read rules of ``role`` that name no user (the same for every account of that role); none
    for service accounts, whose reads depend on the account (``SERVICE_READ_OF``)."""
    rules = () if role is Role.SERVICE else USER_READ
    return tuple(tuple(f"{prefix}/{r}".split("/")) for r in rules if "%u" not in r)


@lru_cache(maxsize=65536)
def _expand_levels(prefix: str, username: str, role: Role, write: bool) -> tuple[tuple[str, ...], ...]:
    # one entry per signed-in account and direction: the levels are interned, so the prefix, the
    # fixed levels and the username are one string each, not one per pattern (issue 21: the cache
    # was 2.6 KB per signed-in user, 1.7 KB of them copies of the same few strings)
    return tuple(tuple(sys.intern(level) for level in p.split("/")) for p in _expand(prefix, username, role, write))


def _expand(prefix: str, username: str, role: Role, write: bool) -> tuple[str, ...]:
    # not cached: the levels above are, and a SUBSCRIBE's check (``_patterns``) makes these few strings
    table = {(Role.SERVICE, True): SERVICE_WRITE, (Role.SERVICE, False): SERVICE_READ,
             (Role.USER, True): USER_WRITE, (Role.USER, False): USER_READ}  # fmt: skip
    rules = table[role, write]
    if role is Role.SERVICE:
        rules = (SERVICE_WRITE_OF if write else SERVICE_READ_OF).get(username, rules)
    return tuple(f"{prefix}/{r}".replace("%u", username) for r in rules)
