"""Replies that come in pages: ``group list``, ``who``, ``profile_get`` and ``history`` (docs/PROTOCOL.md).

Others' doings grow these past any payload limit (the groups they put you in, everyone online,
friends' avatars), and the workers cut each reply to the broker's (``ServiceWorker.fit``), saying
``more``. These follow the pages to the end, so nobody sees part of a list as if it were all: a
page that says ``more`` but brings nothing new ends in an error instead.
"""

from __future__ import annotations

from collections.abc import Callable

from imcli.core.errors import ImcliError
from imcli.core.topics import new_id
from imcli.core.wire import (
    GroupInfo,
    GroupList,
    GroupRequest,
    HistoryReply,
    HistoryRequest,
    Payload,
    Presence,
    Profile,
    ProfileGet,
    ProfileList,
    Received,
    Roster,
    WhoRequest,
    WireModel,
)

Ask = Callable[[WireModel], Payload]
PROFILES_ASKED = 1000  # accounts in one profile_get (its bound)


def _stuck(what: str) -> ImcliError:
    return ImcliError(
        f"the {what} stopped in the middle: a page said more would follow but brought nothing new",
        "is the broker's imcli the same version?",
    )


def all_groups(ask: Ask) -> Payload:
    """Every page of ``group list`` as one ``GroupList`` (``more`` false); the first reply that is not
    a ``GroupList`` (a refusal) as it came."""
    mine: list[GroupInfo] = []
    public: list[GroupInfo] = []
    after: str | None = None
    while True:
        reply = ask(GroupRequest(op="list", after=after))
        if not isinstance(reply, GroupList):
            return reply
        mine += reply.mine
        public += reply.public
        names = [g.name for g in (*reply.mine, *reply.public)]
        if not reply.more:
            return GroupList(id=reply.id, mine=mine, public=public)
        if not names or (after is not None and max(names) <= after):
            raise _stuck("list of groups")
        after = max(names)


def all_users(ask: Ask, include_offline: bool) -> Payload:
    """Every page of ``who`` as one ``Roster``, sorted by display name as ``who`` shows it; the first
    reply that is not a ``Roster`` as it came."""
    users: list[Presence] = []
    after: str | None = None
    while True:
        reply = ask(WhoRequest(all=include_offline, after=after))
        if not isinstance(reply, Roster):
            return reply
        users += reply.users
        if not reply.more:
            users.sort(key=lambda u: (u.nick.casefold(), u.account))
            return Roster(id=reply.id, users=users)
        last = max((u.account for u in reply.users), default=None)
        if last is None or (after is not None and last <= after):
            raise _stuck("list of users")
        after = last


def all_profiles(ask: Ask, accounts: list[str]) -> Payload:
    """The profiles of ``accounts`` as one ``ProfileList`` (``more`` false), asked 1,000 at a time and
    again for those a page left out; the first reply that is not a ``ProfileList`` as it came."""
    wanted = list(dict.fromkeys(accounts))
    profiles: list[Profile] = []
    reply_id = ""
    while wanted:
        asked = wanted[:PROFILES_ASKED]
        reply = ask(ProfileGet(users=asked))
        if not isinstance(reply, ProfileList):
            return reply
        profiles += reply.profiles
        reply_id = reply.id
        if reply.more:
            if not reply.profiles or reply.profiles[-1].account not in asked:
                raise _stuck("list of profiles")
            asked = asked[: asked.index(reply.profiles[-1].account) + 1]
        wanted = wanted[len(asked) :]
    return ProfileList(id=reply_id, profiles=profiles)


def all_history(ask: Ask, request: HistoryRequest) -> Payload:
    """The newest ``request.limit`` messages as one ``HistoryReply``, oldest first, following the pages
    the archive cut to the broker's payload limit: the next is asked ``before`` the oldest ``at`` of the
    last (its own clock's; a sender's ``ts`` may be anything). ``more`` if older ones are left out at the
    limit. The first reply that is not a ``HistoryReply`` as it came."""
    messages: list[Received] = []
    while True:
        reply = ask(request)
        if not isinstance(reply, HistoryReply):
            return reply
        messages[:0] = reply.messages
        left = request.limit - len(messages)
        if not reply.more or left <= 0:
            return HistoryReply(id=reply.id, messages=messages, more=reply.more)
        oldest = min((m.at for m in reply.messages if m.at is not None), default=None)
        if oldest is None or (request.before is not None and oldest >= request.before):
            raise _stuck("history")
        request = request.model_copy(update={"id": new_id(), "limit": left, "before": oldest})
