"""Profiles (display name, signature, about, avatar), without any MQTT: run by the presence worker.

Each profile is retained on ``<prefix>/profile/<user>``, which only workers may write (the
broker's ACL), and the worker writes a user's profile only when that user asks (the sender
of a ``profile_set`` request is the request topic's ``<from>`` level, checked by the broker):
so a profile is written by its owner only. The display name is the presence roster's (its
uniqueness is decided there); this book keeps the rest and follows renames.
"""

from __future__ import annotations

from imcli.core.text import is_plain
from imcli.core.wire import ABOUT_MAX, SIGNATURE_MAX, ErrorReply, Profile, ProfileSet


class ProfileBook:
    def __init__(self) -> None:
        self._profiles: dict[str, Profile] = {}

    def load(self, record: Profile) -> None:
        self._profiles[record.account] = record

    def records(self) -> list[Profile]:
        return list(self._profiles.values())

    def get(self, account: str, name: str) -> Profile:
        """``account``'s profile, under its current display name ``name`` (an empty one if never set)."""
        profile = self._profiles.get(account)
        if profile is None:
            return Profile(account=account, name=name)
        return profile if profile.name == name else profile.model_copy(update={"name": name})

    def check(self, request: ProfileSet) -> ErrorReply | None:
        """Why a ``profile_set`` is refused, before anything changes (the name is the roster's to judge)."""
        if request.signature is not None and not _one_line(request.signature, SIGNATURE_MAX):
            text = f"invalid signature: one line of at most {SIGNATURE_MAX} characters, no control characters"
            return ErrorReply(id=request.id, code="invalid", text=text)
        if request.about is not None and not all(_one_line(line, ABOUT_MAX) for line in request.about.split("\n")):
            text = f"invalid about text: at most {ABOUT_MAX} characters, no control characters but line feeds"
            return ErrorReply(id=request.id, code="invalid", text=text)
        if request.about is not None and len(request.about) > ABOUT_MAX:
            return ErrorReply(id=request.id, code="invalid", text=f"about text longer than {ABOUT_MAX} characters")
        return None

    def apply(self, account: str, name: str, request: ProfileSet, now: float) -> Profile:
        """The profile after ``request`` (checked with ``check``), kept; ``name`` is the display name now."""
        update: dict[str, object] = {"name": name, "updated": now}
        if request.signature is not None:
            update["signature"] = request.signature.strip()
        if request.about is not None:
            update["about"] = request.about.strip()
        if request.avatar is not None:
            update["avatar"] = request.avatar
        elif request.clear_avatar:
            update["avatar"] = None
        profile = self.get(account, name).model_copy(update=update)
        self._profiles[account] = profile
        return profile

    def renamed(self, account: str, name: str, now: float) -> Profile | None:
        """The profile to publish again after a rename, if ``account`` has one."""
        profile = self._profiles.get(account)
        if profile is None or profile.name == name:
            return None
        profile = profile.model_copy(update={"name": name, "updated": now})
        self._profiles[account] = profile
        return profile


def _one_line(text: str, limit: int) -> bool:
    return len(text) <= limit and is_plain(text)
