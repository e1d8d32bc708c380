"""The system's decisions, each made once: who may DM whom, who may see a group, which
accounts are the workers', how a login asks for an account.

The worker that answers a request, the broker that enforces the same rule on a publish
and the client that checks before sending (the broker drops a refused publish silently,
DESIGN.md) all call these functions, so they cannot disagree. Everything here is pure
and uses the standard library alone: :mod:`imcli.core.topics` builds ``RESERVED_NAMES``
from ``SERVICE_ACCOUNTS`` and ``imcli say`` imports both on its fast path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal

# --------------------------------------------------------------------------- service accounts

PRESENCE_ACCOUNT: Final = "presence"
GROUPS_ACCOUNT: Final = "groups"
ARCHIVE_ACCOUNT: Final = "archive"
FILES_ACCOUNT: Final = "files"
# the workers that `imcli serve` runs, and the default accounts of `imcli workers`: no person may take these names
SERVICE_ACCOUNTS: Final = (PRESENCE_ACCOUNT, GROUPS_ACCOUNT, ARCHIVE_ACCOUNT, FILES_ACCOUNT)

# --------------------------------------------------------------------------- registration

REGISTER_PREFIX: Final = "register:"  # a CONNECT with username "register:<name>" asks to create <name>

# --------------------------------------------------------------------------- device credentials

# A device credential (issue 17) is the MQTT password of one device or bot token:
# ``dc1:<device>:<secret>``. The device name says which record the broker checks the secret
# against (with a fast keyed hash: the secret has 256 bits, so no argon2 is needed); ':' is in
# no device name nor in a secret, and no account password may start with the prefix.
DEVICE_CREDENTIAL_PREFIX: Final = "dc1:"
DEVICE_SUFFIX_SEPARATOR: Final = "."  # <account>:<device>.<anything>: the device's other sessions


def device_credential(device: str, secret: str) -> str:
    return f"{DEVICE_CREDENTIAL_PREFIX}{device}:{secret}"


def parse_device_credential(password: str) -> tuple[str, str] | None:
    """``(device, secret)`` of a device credential; ``None`` if ``password`` is not shaped like one."""
    if not password.startswith(DEVICE_CREDENTIAL_PREFIX):
        return None
    device, sep, secret = password.removeprefix(DEVICE_CREDENTIAL_PREFIX).partition(":")
    if not sep or not device or not secret:
        return None
    return device, secret


def device_of_client_id(account: str, client_id: str) -> str | None:
    """The device a client id of ``account`` belongs to: ``<account>:<device>`` or
    ``<account>:<device>.<session>`` (device names hold no '.'); ``None`` for another account's."""
    head = account + ":"
    if not client_id.startswith(head):
        return None
    rest = client_id[len(head) :]
    device = rest.split(DEVICE_SUFFIX_SEPARATOR, 1)[0]
    return device or None


def client_id_of_device(account: str, device: str, client_id: str) -> bool:
    """Whether a device credential of ``account``'s ``device`` may connect with ``client_id``."""
    return device_of_client_id(account, client_id) == device


# --------------------------------------------------------------------------- direct messages

DmPolicy = Literal["anyone", "friends"]
DM_POLICIES: Final[tuple[DmPolicy, ...]] = ("anyone", "friends")


def dm_senders(recipient: str, policy: DmPolicy, friends: Iterable[str]) -> frozenset[str] | None:
    """Whom ``recipient`` takes direct messages from: ``None`` for anyone, else its friends and itself.

    The group worker answers ``can_dm`` with it, the embedded broker keeps it per user to
    refuse a DM at publish, and the dynamic-security mirror turns it into Mosquitto's
    receive rights: the same set everywhere.
    """
    if policy == "anyone":
        return None
    return frozenset(friends) | {recipient}


def may_dm(sender: str, senders: frozenset[str] | None) -> bool:
    """Whether ``sender`` may DM a user who takes direct messages from ``senders`` (see ``dm_senders``)."""
    return senders is None or sender in senders


def dm_refusal(recipient: str) -> str:
    """What a sender is told when ``recipient``'s policy refuses its DM (by the broker, or the client first)."""
    return f"{recipient} accepts direct messages from friends only"


def invitation_refusal(guest: str) -> str:
    """What an inviter is told when ``guest``'s dm-policy refuses the invite (a group is a way to write to them)."""
    return f"{guest} accepts direct messages and group invitations from friends only"


# --------------------------------------------------------------------------- groups


def group_visible(*, private: bool, member: bool) -> bool:
    """Whether a user may know that a group exists: its members always, others if it is public.

    A group that is not visible answers exactly like one that does not exist
    (``missing_group``), so asking cannot reveal a private group's name.
    """
    return member or not private


def group_history_start(created: float, since: float | None = None) -> float:
    """Where a group's readable history starts: at the group's creation, or later if asked.

    History belongs to the group that wrote it, not to its name: a group deleted when its
    last member left, and made again under the same name by someone else, must not hand
    the new owner the old group's messages. A message's ``at`` (when the broker's journal,
    or the archive worker, received it: never the sender's own timestamp) is compared
    with the record's ``created``, both read off the clock of the machine running
    ``imcli serve`` or ``imcli workers``.
    """
    return created if since is None else max(created, since)


def missing_group(group: str) -> str:
    """The one answer for a group that does not exist and for one the asker may not see."""
    return f"no group #{group} (or it is private)"


GROUP_CREATION_WINDOW: Final = 60.0  # seconds: ``per_minute`` creations are counted over this window


def group_creation_refusal(
    owned: int, recent: Sequence[float], now: float, *, max_owned: int, per_minute: int
) -> str | None:
    """Why a user may not create one more group, if it may not (issue 15: one account made 150 in 10 s).

    ``owned`` is how many groups it owns now, ``recent`` when it created groups lately (the
    group worker's clock). The words are what the CLI prints after ``Error:``.
    """
    if owned >= max_owned:
        groups = "group" if owned == 1 else "groups"
        hint = "leaving one passes it to its next admin, or ends it, and makes room"
        return f"you own {owned} {groups}, the most allowed ({hint})"
    if sum(1 for at in recent if now - at < GROUP_CREATION_WINDOW) >= per_minute:
        return f"too many new groups: at most {per_minute} a minute (try again in a minute)"
    return None


# --------------------------------------------------------------------------- moments


def moment_visible(author: str, viewer: str, author_friends: Iterable[str]) -> bool:
    """Whether ``viewer`` may see ``author``'s moments, their likes and comments: the author and
    the author's friends, now (removing a friend removes their view). The moments worker
    answers nothing else; the broker carries moments only on each reader's own reply and
    notice topics, which nobody else may read."""
    return viewer == author or viewer in set(author_friends)


def missing_moment(post: str) -> str:
    """The one answer for a moment that does not exist and for one the asker may not see."""
    return f"no moment {post} (or it is not yours to see)"
