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
