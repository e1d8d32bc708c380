"""Who is online, under which display name: the presence worker's state, without any MQTT.

Display names (``nick`` on the wire) are in any script and unique among display names and
account names under ``imcli.core.names.name_keys`` (NFKC, case folding, TR39 skeletons):
``\\u0430lice`` (with a Cyrillic a) is refused to anyone but the account ``alice``.

Inputs are what the worker reads (retained presence records, device status, requests)
and the current time; outputs are ``Effects`` the worker publishes (retained presence
records, events, retained statuses to clear). Not thread-safe: the worker serialises
calls, which is also what makes concurrent renames have exactly one winner.

Restart: while ``synced`` is false the roster only records what it reads (retained
records and statuses); ``finish_sync`` then reconciles the two and emits only real
changes, so a restarted worker is invisible to users.

Reconnect: a worker whose connection dropped missed what was published meanwhile (a device that
cleared its status and left). ``begin_resync`` at the reconnect, then ``finish_resync`` once the
retained statuses have been read again: a device neither retained nor heard since is gone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

from imcli.core.names import clean_display_name, name_keys
from imcli.core.service import AccountDirectory
from imcli.core.wire import (
    RESERVED_NAMES,
    DeviceStatus,
    ErrorReply,
    Event,
    Presence,
    Renamed,
    device_of_status,
    is_name,
    is_nick,
)

GRACE_INTERVALS = 2.5  # a device not heard for this many heartbeat intervals is gone
# Statuses (a device, or a device's session) one account may hold. The embedded broker refuses those past
# its --max-statuses (20); Mosquitto and NATS bound none, so a raw client retained thousands (2,001 on
# NATS here), and each became a name in the account's presence record and in every `who` reply, towards
# the payload limit Mosquitto applies to the workers too (256 KiB: about 25,000 names), past which `who`
# would fail for everyone.
# The roster counts at most this many and clears the rest: every broker then holds the same bound.
MAX_STATUSES = 200


@dataclass(slots=True)  # one per signed-in device: no __dict__ (issue 21, the workers' memory)
class _Device:
    last_heard: float
    interval: float


@dataclass(slots=True)  # one per account
class _User:
    account: str
    nick: str
    state: Literal["online", "offline"] = "offline"
    since: float = 0.0
    devices: dict[str, _Device] = field(default_factory=dict)
    published: bool = False  # has a retained record on the broker
    published_devices: int = -1  # the device count in that record
    published_names: tuple[str, ...] = ()  # the device names in that record

    def names(self) -> tuple[str, ...]:
        """The devices by name: a status level is ``<device>`` or ``<device>~<session>`` (issue 17)."""
        return tuple(sorted({device_of_status(key) for key in self.devices}))

    def record(self) -> Presence:
        return Presence(
            account=self.account,
            nick=self.nick,
            state=self.state,
            since=self.since,
            devices=len(self.devices),
            device_names=list(self.names()),
        )


@dataclass
class Effects:
    presence: list[Presence] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    clear_status: list[tuple[str, str]] = field(default_factory=list)

    def __iadd__(self, other: Effects) -> Effects:
        self.presence += other.presence
        self.events += other.events
        self.clear_status += other.clear_status
        return self


class PresenceRoster:
    def __init__(self, directory: AccountDirectory | None = None) -> None:
        self._directory = directory
        self._users: dict[str, _User] = {}
        self._nicks: dict[str, str] = {}  # each key of a display name (names.name_keys) -> its account
        self._accounts: tuple[frozenset[str], dict[str, str]] = (frozenset(), {})  # names, key -> account
        self._pending = Effects()  # changes to other users caused by the current call
        self.synced = False
        self._resync_seen: set[tuple[str, str]] | None = None  # (account, status level) since begin_resync

    # ---------------------------------------------------------------- reading state

    def load_presence(self, record: Presence) -> None:
        """A retained record, read while syncing (or echoed back later: then ignored)."""
        if self.synced or not is_name(record.account) or record.account in self._users:
            return
        nick = record.nick if self._nick_free(record.nick, record.account) else record.account
        user = _User(record.account, nick, record.state, record.since, published=True)
        user.published_devices = record.devices
        user.published_names = tuple(record.device_names)
        self._users[record.account] = user
        self._take_name(nick, record.account)

    def device_seen(self, account: str, device: str, status: DeviceStatus, now: float) -> Effects:
        if status.state == "offline":
            return self.device_gone(account, device, now)
        user = self._user(account, now)
        known = device in user.devices
        if not known and len(user.devices) >= MAX_STATUSES:
            effects = self._take_pending()
            effects.clear_status.append((account, device))
            return effects
        user.devices[device] = _Device(now, status.interval)
        if self._resync_seen is not None:
            self._resync_seen.add((account, device))
        effects = self._take_pending()
        if self.synced and not known:
            effects += self._changed(user, now)
        return effects

    def device_gone(self, account: str, device: str, now: float) -> Effects:
        user = self._users.get(account)
        if user is None or user.devices.pop(device, None) is None or not self.synced:
            return Effects()
        return self._changed(user, now)

    def finish_sync(self, now: float) -> Effects:
        """Reconcile retained records with retained statuses; from now on, emit changes."""
        self.synced = True
        effects = Effects()
        for user in self._users.values():
            effects += self._changed(user, now, device_events=False)  # a restarted worker is invisible
        return effects

    def begin_resync(self) -> None:
        """The worker reconnected and reads the retained statuses again: note the devices heard from now."""
        self._resync_seen = set()

    def finish_resync(self, now: float) -> Effects:
        """The retained statuses have been read again: the devices neither retained nor heard since
        ``begin_resync`` cleared their status while the worker was away."""
        seen, self._resync_seen = self._resync_seen, None
        effects = Effects()
        if seen is None or not self.synced:
            return effects
        for user in list(self._users.values()):
            for device in [d for d in user.devices if (user.account, d) not in seen]:
                effects += self.device_gone(user.account, device, now)
        return effects

    def expire(self, now: float) -> Effects:
        """Devices that stopped their heartbeat without a Last Will (crash, lost broker)."""
        effects = Effects()
        for user in list(self._users.values()):
            for device, info in list(user.devices.items()):
                if now - info.last_heard > GRACE_INTERVALS * info.interval:
                    effects += self.device_gone(user.account, device, now)
                    effects.clear_status.append((user.account, device))
        return effects

    # ---------------------------------------------------------------- requests

    def rename(self, account: str, nick: str, request_id: str, now: float) -> tuple[Renamed | ErrorReply, Effects]:
        nick = clean_display_name(nick)
        if not is_nick(nick):
            return ErrorReply(id=request_id, code="invalid", text=f"invalid display name {nick!r}"), Effects()
        if not self._nick_free(nick, account):
            text = f"the name {nick!r} is taken (or looks like one that is)"
            return ErrorReply(id=request_id, code="taken", text=text), Effects()
        user = self._user(account, now)
        old = user.nick
        if old == nick:
            return Renamed(id=request_id, nick=nick), Effects()
        self._drop_name(old, account)
        self._take_name(nick, account)
        user.nick = nick
        user.published, user.published_devices, user.published_names = True, len(user.devices), user.names()
        effects = self._take_pending()
        effects.presence.append(user.record())
        effects.events.append(Event(event="rename", account=account, nick=nick, old_nick=old, ts=now))
        return Renamed(id=request_id, nick=nick), effects

    def resolve(self, name: str) -> str | None:
        """The account for an account name or a current display name: the same name under
        ``name_keys`` (so case, width and look-alike letters do not matter)."""
        lowered = name.lower()
        if is_name(lowered) and (lowered in self._users or self._is_user(lowered)):
            return lowered  # an account name always means that account, never someone's display name
        keys = name_keys(name)
        for key in sorted(keys):
            if (account := self._nicks.get(key)) is not None:
                return account
        accounts = self._account_index()
        return next((accounts[key] for key in sorted(keys) if key in accounts), None)

    def who(self, include_offline: bool = False) -> list[Presence]:
        """Who is online; with ``include_offline``, every account, those never seen online too."""
        records = [u.record() for u in self._users.values() if include_offline or u.state == "online"]
        if include_offline and self._directory is not None:
            never = self._directory.user_names() - self._users.keys()
            records += [Presence(account=a, nick=a, state="offline", since=0.0) for a in never]
        return sorted(records, key=lambda r: (r.nick.casefold(), r.account))

    def records(self) -> list[Presence]:
        return [u.record() for u in self._users.values() if u.published]

    def known(self, account: str) -> bool:
        """Whether ``account`` is a user: on this roster, or in the directory."""
        return account in self._users or (is_name(account) and account not in RESERVED_NAMES and self._is_user(account))

    def nick_of(self, account: str) -> str:
        user = self._users.get(account)
        return user.nick if user else account

    # ---------------------------------------------------------------- internals

    def _user(self, account: str, now: float) -> _User:
        user = self._users.get(account)
        if user is None:
            for holder in {self._nicks.get(key) for key in name_keys(account)} - {None, account}:
                # the name was taken before this account existed: account names win
                self._reset_nick(self._users[holder or ""], now)
            user = _User(account, account, since=now)
            self._users[account] = user
            self._take_name(account, account)
        return user

    def _take_name(self, nick: str, account: str) -> None:
        for key in name_keys(nick):
            self._nicks[key] = account

    def _drop_name(self, nick: str, account: str) -> None:
        for key in name_keys(nick):
            if self._nicks.get(key) == account:
                del self._nicks[key]

    def _reset_nick(self, user: _User, now: float) -> None:
        old, user.nick = user.nick, user.account
        self._drop_name(old, user.account)
        self._take_name(user.account, user.account)
        user.published_devices, user.published_names = len(user.devices), user.names()
        self._pending.presence.append(user.record())
        self._pending.events.append(Event(event="rename", account=user.account, nick=user.nick, old_nick=old, ts=now))

    def _take_pending(self) -> Effects:
        pending, self._pending = self._pending, Effects()
        return pending

    def _nick_free(self, nick: str, account: str) -> bool:
        keys = name_keys(nick)
        if any(self._nicks.get(key, account) != account for key in keys):
            return False
        if keys.isdisjoint(name_keys(account)) and not keys.isdisjoint(_reserved_keys()):
            return False  # a name like a reserved one (admin with a Cyrillic a), unless it is one's own account name
        # another account's name is never someone else's display name
        accounts = self._account_index()
        return all(accounts.get(key, account) == account for key in keys)

    def _account_index(self) -> dict[str, str]:
        """Each key of every account name: seen by this roster, or (with a directory) every account."""
        names = frozenset(self._users) | (self._directory.user_names() if self._directory is not None else frozenset())
        if names != self._accounts[0]:
            index: dict[str, str] = {}
            for name in sorted(names):
                for key in name_keys(name):
                    index.setdefault(key, name)
            self._accounts = (names, index)
        return self._accounts[1]

    def _is_user(self, name: str) -> bool:
        return self._directory is not None and self._directory.is_user(name)

    def _changed(self, user: _User, now: float, *, device_events: bool = True) -> Effects:
        """Publish the user's record if it differs from what the broker holds."""
        state: Literal["online", "offline"] = "online" if user.devices else "offline"
        effects = Effects()
        names = user.names()
        if state != user.state:
            user.state, user.since = state, now
            event: Literal["join", "leave"] = "join" if state == "online" else "leave"
            effects.events.append(Event(event=event, account=user.account, nick=user.nick, ts=now))
        elif state == "online" and user.published and device_events:  # a device came or went, others stay
            for device in sorted(set(names) - set(user.published_names)):
                effects.events.append(
                    Event(event="device_join", account=user.account, nick=user.nick, device=device, ts=now)
                )
            for device in sorted(set(user.published_names) - set(names)):
                effects.events.append(
                    Event(event="device_leave", account=user.account, nick=user.nick, device=device, ts=now)
                )
        changed = user.published_devices != len(user.devices) or user.published_names != names
        if not user.published or effects.events or changed:
            user.published, user.published_devices, user.published_names = True, len(user.devices), names
            effects.presence.append(user.record())
        return effects


@functools.cache
def _reserved_keys() -> frozenset[str]:
    return frozenset().union(*(name_keys(name) for name in RESERVED_NAMES))
