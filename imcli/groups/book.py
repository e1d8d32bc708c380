"""Groups and their members, without any MQTT: the group worker's state and rules.

Every operation returns either an ``ErrorReply`` or the group's new record plus the
notices to send. The worker serialises calls, so two people racing for one group name
get exactly one winner. Private groups are invisible to non-members: asking about one
answers "no such group", exactly as for a group that does not exist.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from imcli.core.rules import (
    GROUP_CREATION_WINDOW,
    group_creation_refusal,
    group_visible,
    invitation_refusal,
    missing_group,
)
from imcli.core.service import AccountDirectory, names_a_user
from imcli.core.wire import (
    GROUPS_PAGE_MAX,
    RESERVED_NAMES,
    ErrorReply,
    GroupInfo,
    GroupList,
    GroupReply,
    GroupRequest,
    encode,
    is_name,
    most_that_fit,
)

DEFAULT_MAX_MEMBERS = 1000
DEFAULT_MAX_OWNED = 50  # groups one account owns (issue 15)
DEFAULT_CREATIONS_PER_MINUTE = 10  # groups one account creates per minute (issue 15)
MAX_REMOVED = 200  # removed members a group's record remembers (the oldest forgotten first): its size stays bounded
# Groups others may put one account into: an ``invite`` of someone already in this many groups is refused
# (their own ``join`` and ``create`` are not: what one does to oneself is one's own). An invite needs no
# consent, so before this carol alone could add bob to every group of hers and of her friends without
# bound, each record listed whole in his ``group list``. Telegram's cap on the groups one is in is 500.
MAX_MEMBERSHIPS = 500


@dataclass
class Outcome:
    reply: GroupReply | GroupList | ErrorReply
    changed: list[tuple[str, GroupInfo | None]] = field(default_factory=list)  # (group, record or deleted)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (user, text)


class GroupBook:
    def __init__(
        self,
        directory: AccountDirectory | None = None,
        max_members: int = DEFAULT_MAX_MEMBERS,
        *,
        max_owned: int = DEFAULT_MAX_OWNED,
        creations_per_minute: int = DEFAULT_CREATIONS_PER_MINUTE,
        max_memberships: int = MAX_MEMBERSHIPS,
        may_invite: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._groups: dict[str, GroupInfo] = {}
        # (inviter, guest): whether the guest takes invitations from the inviter (``FriendBook.may_add``).
        # In a group, every member may write to every other: an invite past ``dm-policy friends`` was a
        # way round it, for anyone who had made a group
        self._may_invite = may_invite or (lambda _inviter, _guest: True)
        self._directory = directory
        self.max_members = max_members
        self.max_owned = max_owned
        self.creations_per_minute = creations_per_minute
        self.max_memberships = max_memberships
        self._created: defaultdict[str, deque[float]] = defaultdict(deque)  # user -> its recent creations

    def load(self, info: GroupInfo) -> None:
        self._groups[info.name] = info

    def records(self) -> list[GroupInfo]:
        return list(self._groups.values())

    def apply(self, user: str, request: GroupRequest, now: float) -> Outcome:
        op = getattr(self, f"_{request.op}")
        outcome: Outcome = op(user, request, now)
        return outcome

    # ---------------------------------------------------------------- operations

    def _create(self, user: str, req: GroupRequest, now: float) -> Outcome:
        name = req.group
        if not is_name(name) or name in RESERVED_NAMES:
            return _error(req, "invalid", f"invalid group name {name!r}")
        if name in self._groups:
            return _error(req, "taken", f"the group name {name!r} is taken")
        recent = self._created[user]
        while recent and now - recent[0] >= GROUP_CREATION_WINDOW:
            recent.popleft()
        owned = sum(1 for g in self._groups.values() if g.owner == user)
        refusal = group_creation_refusal(
            owned, recent, now, max_owned=self.max_owned, per_minute=self.creations_per_minute
        )
        if refusal is not None:
            return _error(req, "denied", refusal)
        recent.append(now)
        info = GroupInfo(name=name, owner=user, admins=[user], members=[user], private=req.private, created=now)
        return self._store(req, info, [])

    def _join(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info = self._visible(user, req.group)
        if info is None:
            return _missing(req)
        if user in info.members:
            return Outcome(GroupReply(id=req.id, group=info))
        if user in (info.removed or ()):
            return _error(req, "denied", f"you were removed from #{info.name}")
        if len(info.members) >= self.max_members:
            return _error(req, "denied", f"#{info.name} is full ({self.max_members} members)")
        new = info.model_copy(update={"members": [*info.members, user]})
        return self._store(req, new, _tell(info.members, f"{user} joined #{info.name}"))

    def _leave(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info = self._visible(user, req.group)
        if info is None or user not in info.members:
            return _error(req, "not_found", f"you are not a member of #{req.group}")
        members = [m for m in info.members if m != user]
        if not members:
            del self._groups[info.name]
            return Outcome(GroupReply(id=req.id, group=None), changed=[(info.name, None)])
        admins = [a for a in info.admins if a != user]
        owner = info.owner
        if owner == user:  # ownership passes to the longest-standing admin, else member
            owner = admins[0] if admins else members[0]
        if owner not in admins:
            admins.insert(0, owner)
        new = info.model_copy(update={"members": members, "admins": admins, "owner": owner})
        return self._store(req, new, _tell(members, f"{user} left #{info.name}"))

    def _invite(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info, error = self._as_admin(user, req)
        if error is not None:
            return error
        assert info is not None
        guest = req.user or ""
        if not names_a_user(self._directory, guest):
            return _error(req, "not_found", f"unknown user {guest!r}")
        if guest in info.members:
            return _error(req, "invalid", f"{guest} is already a member of #{info.name}")
        if not self._may_invite(user, guest):
            return _error(req, "denied", invitation_refusal(guest), f"become friends first: imcli friend add {guest}")
        if sum(1 for g in self._groups.values() if guest in g.members) >= self.max_memberships:
            text = f"{guest} is in {self.max_memberships} groups already: ask them to join #{info.name} themselves"
            return _error(req, "denied", text)
        if len(info.members) >= self.max_members:
            return _error(req, "denied", f"#{info.name} is full ({self.max_members} members)")
        new = info.model_copy(update={"members": [*info.members, guest], "removed": _without(info.removed, guest)})
        notices = [*_tell(info.members, f"{user} invited {guest} to #{info.name}"),
                   (guest, f"{user} added you to #{info.name}")]  # fmt: skip
        return self._store(req, new, notices)

    def _kick(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info, error = self._as_admin(user, req)
        if error is not None:
            return error
        assert info is not None
        target = req.user or ""
        if target not in info.members:
            return _error(req, "not_found", f"{target!r} is not a member of #{info.name}")
        if target == info.owner or (target in info.admins and user != info.owner):
            return _error(req, "denied", "only the owner can remove an admin, and nobody the owner")
        members = [m for m in info.members if m != target]
        admins = [a for a in info.admins if a != target]
        removed = [*(_without(info.removed, target) or []), target][-MAX_REMOVED:]
        new = info.model_copy(update={"members": members, "admins": admins, "removed": removed})
        notices = [*_tell(members, f"{user} removed {target} from #{info.name}"),
                   (target, f"{user} removed you from #{info.name}")]  # fmt: skip
        return self._store(req, new, notices)

    def _promote(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info = self._visible(user, req.group)
        if info is None:
            return _missing(req)
        if user != info.owner:
            return _error(req, "denied", f"only the owner of #{info.name} can appoint admins")
        target = req.user or ""
        if target not in info.members:
            return _error(req, "not_found", f"{target!r} is not a member of #{info.name}")
        if target in info.admins:
            return _error(req, "invalid", f"{target} is already an admin of #{info.name}")
        new = info.model_copy(update={"admins": [*info.admins, target]})
        return self._store(req, new, _tell(info.members, f"{user} made {target} an admin of #{info.name}"))

    def _members(self, user: str, req: GroupRequest, now: float) -> Outcome:
        info = self._visible(user, req.group)
        return Outcome(GroupReply(id=req.id, group=info)) if info is not None else _missing(req)

    def _list(self, user: str, req: GroupRequest, now: float) -> Outcome:
        """A page: the first ``limit`` groups by name after ``after`` that ``user`` is in or may join."""
        after = req.after or ""
        shown = (g for g in self._groups.values() if group_visible(private=g.private, member=user in g.members))
        groups = sorted((g for g in shown if g.name > after), key=lambda g: g.name)
        page = groups[: req.limit or GROUPS_PAGE_MAX]
        return Outcome(split_groups(req.id, user, page, more=len(groups) > len(page)))

    # ---------------------------------------------------------------- helpers

    def _visible(self, user: str, name: str) -> GroupInfo | None:
        info = self._groups.get(name)
        if info is None or not group_visible(private=info.private, member=user in info.members):
            return None
        return info

    def _as_admin(self, user: str, req: GroupRequest) -> tuple[GroupInfo | None, Outcome | None]:
        info = self._visible(user, req.group)
        if info is None:
            return None, _missing(req)
        if user not in info.admins:
            return None, _error(req, "denied", f"only admins of #{info.name} can do that")
        return info, None

    def _store(self, req: GroupRequest, info: GroupInfo, notices: list[tuple[str, str]]) -> Outcome:
        self._groups[info.name] = info
        return Outcome(GroupReply(id=req.id, group=info), changed=[(info.name, info)], notices=notices)


def split_groups(request_id: str, user: str, page: list[GroupInfo], *, more: bool) -> GroupList:
    """A ``group_list`` of ``page`` (by name): those ``user`` is in, and the others."""
    mine = [g for g in page if user in g.members]
    return GroupList(id=request_id, mine=mine, public=[g for g in page if user not in g.members], more=more)


def fit_groups(reply: GroupList, limit: int) -> GroupList:
    """``reply`` cut to at most ``limit`` bytes encoded: its first groups by name, ``more`` saying the
    others wait for the next page; one group too large alone goes as it is (a record is at most 1,000
    members and 200 removed, about 40 KB: Mosquitto's 256 KiB holds it)."""
    mine = {g.name for g in reply.mine}
    page = sorted([*reply.mine, *reply.public], key=lambda g: g.name)

    def first(n: int) -> GroupList:
        kept = page[:n]
        return GroupList(
            id=reply.id,
            mine=[g for g in kept if g.name in mine],
            public=[g for g in kept if g.name not in mine],
            more=n < len(page) or reply.more,
        )

    return first(max(1, most_that_fit(len(page), lambda n: len(encode(first(n))) <= limit)) if page else 0)


def _error(req: GroupRequest, code: str, text: str, hint: str | None = None) -> Outcome:
    return Outcome(ErrorReply(id=req.id, code=code, text=text, hint=hint))


def _missing(req: GroupRequest) -> Outcome:
    return _error(req, "not_found", missing_group(req.group))


def _tell(users: list[str], text: str) -> list[tuple[str, str]]:
    return [(u, text) for u in users]


def _without(removed: list[str] | None, user: str) -> list[str] | None:
    """``removed`` without ``user``; ``None`` (not encoded) once nobody is left in it."""
    rest = [u for u in removed or () if u != user]
    return rest or None
