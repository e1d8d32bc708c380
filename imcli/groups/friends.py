"""Friends, friend requests and DM policy, without any MQTT (run by the group worker).

Each user's record is retained on ``<prefix>/user/<me>/friends``: pending requests live
in it, so a request reaches someone who was offline when it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imcli.core.rules import dm_senders, may_dm
from imcli.core.service import AccountDirectory, names_a_user
from imcli.core.wire import ErrorReply, FriendReply, FriendRequest, Friends

# Bounds of one record, which is retained and sent whole in every friend reply: each ``add`` from
# another account grew ``incoming`` without bound, towards the payload limit Mosquitto applies to the
# workers too (256 KiB), past which the record and ``friend list`` would be dropped. 2,000 friends and
# 500 waiting each way, of 32-character names, are about 110 KB (Facebook's friends are 5,000).
MAX_FRIENDS = 2000
MAX_PENDING = 500


@dataclass
class FriendOutcome:
    reply: FriendReply | ErrorReply
    changed: list[Friends] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)


class FriendBook:
    def __init__(self, directory: AccountDirectory | None = None) -> None:
        self._records: dict[str, Friends] = {}
        self._directory = directory

    def load(self, record: Friends) -> None:
        self._records[record.account] = record

    def records(self) -> list[Friends]:
        return list(self._records.values())

    def record(self, user: str) -> Friends:
        return self._records.get(user) or Friends(account=user)

    def may_add(self, inviter: str, guest: str) -> bool:
        """Whether ``inviter`` may put ``guest`` into a group: whoever may write to them directly
        (``dm-policy``), since a group's members all write to each other."""
        theirs = self.record(guest)
        return may_dm(inviter, dm_senders(guest, theirs.dm_policy, theirs.friends))

    def apply(self, user: str, req: FriendRequest) -> FriendOutcome:
        if req.op == "list":
            return FriendOutcome(FriendReply(id=req.id, record=self.record(user)))
        if req.op == "policy":
            if req.dm_policy is None:
                return _error(req, "invalid", "no dm policy given")
            return self._save(req, user, [self.record(user).model_copy(update={"dm_policy": req.dm_policy})], [])
        other = (req.user or "").removeprefix("@").lower()
        if not names_a_user(self._directory, other):
            return _error(req, "not_found", f"unknown user {req.user!r}")
        if req.op == "can_dm":
            theirs = self.record(other)
            allowed = may_dm(user, dm_senders(other, theirs.dm_policy, theirs.friends))
            return FriendOutcome(FriendReply(id=req.id, record=self.record(user), allowed=allowed))
        if other == user:
            return _error(req, "invalid", "you cannot be your own friend")
        return self._between(req, self.record(user), self.record(other))

    def _between(self, req: FriendRequest, mine: Friends, theirs: Friends) -> FriendOutcome:
        user, other = mine.account, theirs.account
        match req.op:
            case "add":
                if other in mine.friends:
                    return _error(req, "invalid", f"{other} is already your friend")
                if other in mine.outgoing:
                    return _error(req, "invalid", f"you already asked {other}; waiting for an answer")
                if other in mine.incoming:  # they asked first: this is an acceptance
                    return self._befriend(req, mine, theirs)
                if len(mine.outgoing) >= MAX_PENDING:
                    return _error(req, "denied", f"{MAX_PENDING} of your friend requests wait for an answer already")
                if len(theirs.incoming) >= MAX_PENDING:
                    return _error(req, "denied", f"{other} has {MAX_PENDING} friend requests waiting already")
                return self._save(
                    req, user,
                    [_add(mine, "outgoing", other), _add(theirs, "incoming", user)],
                    [],  # the request waits in their retained record: listen shows it, even later
                )  # fmt: skip
            case "accept":
                if other not in mine.incoming:
                    return _error(req, "not_found", f"no friend request from {other}")
                return self._befriend(req, mine, theirs)
            case "decline":
                if other not in mine.incoming:
                    return _error(req, "not_found", f"no friend request from {other}")
                return self._save(req, user, [_drop(mine, "incoming", other), _drop(theirs, "outgoing", user)], [])
            case "remove":
                if other not in mine.friends:
                    return _error(req, "not_found", f"{other} is not your friend")
                return self._save(req, user, [_drop(mine, "friends", other), _drop(theirs, "friends", user)], [])
        return _error(req, "invalid", f"unknown friend operation {req.op!r}")

    def _befriend(self, req: FriendRequest, mine: Friends, theirs: Friends) -> FriendOutcome:
        me, other = mine.account, theirs.account
        for record in (mine, theirs):
            if len(record.friends) >= MAX_FRIENDS:
                who = "you have" if record is mine else f"{other} has"
                return _error(req, "denied", f"{who} {MAX_FRIENDS} friends already")
        mine = _add(_drop(_drop(mine, "incoming", other), "outgoing", other), "friends", other)
        theirs = _add(_drop(_drop(theirs, "outgoing", me), "incoming", me), "friends", me)
        return self._save(req, me, [mine, theirs], [(other, f"{me} accepted your friend request")])

    def _save(
        self, req: FriendRequest, user: str, records: list[Friends], notices: list[tuple[str, str]]
    ) -> FriendOutcome:
        for record in records:
            self._records[record.account] = record
        return FriendOutcome(FriendReply(id=req.id, record=self.record(user)), records, notices)


def _add(record: Friends, field_name: str, user: str) -> Friends:
    values: list[str] = getattr(record, field_name)
    return record if user in values else record.model_copy(update={field_name: sorted([*values, user])})


def _drop(record: Friends, field_name: str, user: str) -> Friends:
    values: list[str] = getattr(record, field_name)
    return record.model_copy(update={field_name: [v for v in values if v != user]})


def _error(req: FriendRequest, code: str, text: str) -> FriendOutcome:
    return FriendOutcome(ErrorReply(id=req.id, code=code, text=text))
