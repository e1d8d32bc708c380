"""Group membership and dm-policy for Mosquitto 2, through its dynamic-security plugin.

Mosquitto's ``acl_file`` is static: it cannot follow who is in which group. The group worker,
given a ``DynsecMirror`` (``imcli workers --dynsec``), turns its records into Mosquitto's
own ACLs by publishing commands on ``$CONTROL/dynamic-security/v1`` (Mosquitto's control
API, not imcli's wire protocol: hence these models live here and not in ``imcli.core.wire``).

Each user who is in a group or takes DMs from friends only gets one dynsec *client* of the
same name, without a password (so the password file still authenticates it), holding one
role, ``imcli-user-<name>``. The role's ACLs are exactly that user's group and dm-policy
rights; the plugin is checked before ``acl_file`` and defers to it when no ACL matches
(``defaultACLAccess`` all false), so every other right still comes from the aclfile.

Two facts of Mosquitto 2.0.11 shape this (``plugins/dynamic-security/*.c``):

- ``addClientRole``, ``removeClientRole``, ``addRoleACL``, ``removeRoleACL`` and
  ``deleteRole`` disconnect every connection of the users concerned ("Enforce any
  changes"); ``createRole``, ``createClient`` and ``modifyRole`` do not. So a user's role
  and client are created once, and every later change replaces the role's whole ACL list
  with ``modifyRole``: nobody is kicked when they join or leave a group.
- ACL topics have no ``%u``: each role names its user's topics literally.

Mosquitto drops a DM refused by dm-policy at delivery, not at publish, so a service account
that reads every DM (the archive) would still get it. Each such *reader* gets one role,
``imcli-reader-<account>``, with every friends-only user's refusals.

Order: Mosquitto handles one client's PUBLISHes in order and runs a ``$CONTROL`` command
before it reads the next packet (``handle__publish`` → ``control__process``), so commands
the worker sends before a group record and its reply are in force when those arrive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ValidationError

from imcli.core.rules import dm_senders
from imcli.core.wire import Friends, GroupInfo, Topics

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
ROLE_PREFIX = "imcli-user-"
READER_PREFIX = "imcli-reader-"
PROBE = "imcli-probe"
LIST_ROLES = "imcli-list-roles"

AclType = Literal["publishClientSend", "publishClientReceive"]


class Acl(BaseModel):
    acltype: AclType
    topic: str
    priority: int = 0
    allow: bool = True


class RoleRef(BaseModel):
    rolename: str


class Command(BaseModel):
    command: str
    rolename: str | None = None
    username: str | None = None
    acls: list[Acl] | None = None
    roles: list[RoleRef] | None = None
    correlationData: str | None = None  # noqa: N815 - Mosquitto's field name


class Commands(BaseModel):
    commands: list[Command]


class Response(BaseModel):
    command: str
    error: str | None = None
    correlationData: str | None = None  # noqa: N815 - Mosquitto's field name
    data: dict[str, object] | None = None


class Responses(BaseModel):
    responses: list[Response]


def role_of(user: str) -> str:
    return ROLE_PREFIX + user


def reader_role_of(account: str) -> str:
    return READER_PREFIX + account


class DynsecMirror:
    """The group worker's records, as one dynsec role per user. Not thread-safe: the worker's lock."""

    def __init__(self, topics: Topics, dm_readers: Iterable[str] = ()) -> None:
        self.topics = topics
        # service accounts whose aclfile section reads every DM (the archive): on Mosquitto a DM
        # refused by dm-policy is dropped at delivery, so each reader gets the recipients' refusals too
        self.dm_readers = tuple(sorted(set(dm_readers)))
        self._reader_acls: list[Acl] | None = None  # what the readers' roles last got
        self._members: dict[str, frozenset[str]] = {}  # group -> members
        self._member_of: dict[str, set[str]] = {}  # user -> groups
        self._dm_senders: dict[str, frozenset[str]] = {}  # user with dm-policy friends -> whom it takes DMs from
        self._created: set[str] = set()  # users whose role and client this worker has created (or found)

    # ---------------------------------------------------------------- state in

    def group_changed(self, name: str, info: GroupInfo | None) -> set[str]:
        """Record a group's new members; the users whose rights changed."""
        before = self._members.pop(name, frozenset())
        after = frozenset(info.members) if info is not None else frozenset()
        if after:
            self._members[name] = after
        for user in before - after:
            self._member_of.get(user, set()).discard(name)
        for user in after - before:
            self._member_of.setdefault(user, set()).add(name)
        return set(before ^ after)

    def friends_changed(self, record: Friends) -> set[str]:
        before = self._dm_senders.get(record.account)
        after = dm_senders(record.account, record.dm_policy, record.friends)
        if after is None:
            self._dm_senders.pop(record.account, None)
        else:
            self._dm_senders[record.account] = after
        return {record.account} if before != after else set()

    def users(self) -> set[str]:
        return {u for u, groups in self._member_of.items() if groups} | set(self._dm_senders)

    # ---------------------------------------------------------------- rights out

    def acls(self, user: str) -> list[Acl]:
        t = self.topics
        acls: list[Acl] = []
        for group in sorted(self._member_of.get(user, ())):
            acls.append(Acl(acltype="publishClientSend", topic=t.group_msg(group, user), priority=1))
            acls.append(Acl(acltype="publishClientReceive", topic=t.group_msg_filter(group), priority=1))
            acls.append(Acl(acltype="publishClientReceive", topic=t.group_info(group), priority=1))
        return acls + self._dm_policy(user)

    def _dm_policy(self, user: str) -> list[Acl]:
        """Who may reach ``user`` by DM, if only friends may: receive rights on ``user``'s DM topics."""
        t = self.topics
        senders = self._dm_senders.get(user)
        if senders is None:
            return []
        # checked in priority order: friends (and oneself) first, then everyone else's DMs refused
        acls = [Acl(acltype="publishClientReceive", topic=t.dm(user, s), priority=1) for s in sorted(senders)]
        acls.append(Acl(acltype="publishClientReceive", topic=t.dm_filter(user), priority=0, allow=False))
        return acls

    def reader_acls(self) -> list[Acl]:
        """A DM reader's role: every friends-only user's refusals, so a dropped DM is not archived either."""
        return [acl for user in sorted(self._dm_senders) for acl in self._dm_policy(user)]

    def commands(self, users: Iterable[str]) -> bytes | None:
        """The commands giving ``users`` their current rights, or ``None`` if there are none."""
        commands: list[Command] = []
        for user in sorted(users):
            role, acls = role_of(user), self.acls(user)
            if user not in self._created:
                # both fail harmlessly ("already exists") after a worker restart
                commands.append(Command(command="createRole", rolename=role, acls=acls))
                commands.append(Command(command="createClient", username=user, roles=[RoleRef(rolename=role)]))
                self._created.add(user)
            commands.append(Command(command="modifyRole", rolename=role, acls=acls))
        commands.extend(self._reader_commands())
        return _encode(commands) if commands else None

    def _reader_commands(self) -> list[Command]:
        acls = self.reader_acls()
        if acls == self._reader_acls:
            return []
        commands: list[Command] = []
        for reader in self.dm_readers:
            role = reader_role_of(reader)
            if self._reader_acls is None:  # first time: both fail harmlessly ("already exists") after a restart
                commands.append(Command(command="createRole", rolename=role, acls=acls))
                commands.append(Command(command="createClient", username=reader, roles=[RoleRef(rolename=role)]))
            commands.append(Command(command="modifyRole", rolename=role, acls=acls))
        self._reader_acls = acls
        return commands

    def probe(self) -> bytes:
        """Asks for the role list: the answer proves the plugin runs and lets ``stale`` clear old roles."""
        return _encode([Command(command="listRoles", correlationData=LIST_ROLES)])

    def stale(self, roles: Iterable[str]) -> bytes | None:
        """Empty the roles of users this worker no longer knows in any group (state lost meanwhile)."""
        current = self.users()
        gone = [r for r in roles if r.startswith(ROLE_PREFIX) and r.removeprefix(ROLE_PREFIX) not in current]
        cleared = [Command(command="modifyRole", rolename=r, acls=[]) for r in sorted(gone)]
        return _encode(cleared) if cleared else None


def decode_responses(payload: bytes) -> list[Response]:
    try:
        return Responses.model_validate_json(payload).responses
    except ValidationError:
        log.warning("unreadable answer from the dynamic-security plugin: %r", payload[:200])
        return []


def role_names(response: Response) -> list[str]:
    """The role names in a ``listRoles`` answer."""
    roles = (response.data or {}).get("roles")
    return [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []


def _encode(commands: list[Command]) -> bytes:
    return Commands(commands=commands).model_dump_json(exclude_none=True).encode()
