"""Persistent sessions over time: kept while their client is away, but not forever, with a
bounded offline queue, at most ``Limits.max_sessions`` per account (the longest-idle one
is dropped to make room: imcli/broker/admission.py says why), and ended when their account
is removed or replaced.

amqtt 0.12.1 keeps a persistent session (its subscriptions and its offline queue) forever,
its queue unbounded, and goes on serving an account that ``imcli admin user remove`` took
away in another process. ``SessionUpkeep`` runs two loops in the broker's event loop; it
reaches amqtt's sessions only through the adapter (``SessionHost``, implemented by
``ImBroker`` in imcli/broker/amqtt_adapter.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from amqtt.session import Session

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.notices import Telling, session_dropped
from imcli.core.rules import REGISTER_PREFIX

log = logging.getLogger(__name__)

ACCOUNT_CHECK = 1.0  # seconds between looks at accounts.json for removed accounts
WALK_SLICE = 500  # sessions looked at per loop round when the accounts changed


class SessionHost(Protocol):
    """What the upkeep needs of the broker."""

    @property
    def accounts(self) -> AccountStore: ...

    def session_table(self) -> Mapping[str, tuple[Session, Any]]: ...

    async def delete_session(self, client_id: str) -> None: ...

    async def close_connection(self, handler: Any) -> None: ...


def expired(away: Mapping[str, float], now: float, expiry: float) -> list[str]:
    """Client ids whose persistent session has been away for ``expiry`` seconds or more."""
    return [client_id for client_id, since in away.items() if now - since >= expiry]


def sessions_to_drop(idle_since: Mapping[str, float], held: int, limit: int) -> list[str]:
    """Which idle persistent sessions (client id -> away since) an account holding ``held``
    drops to keep at most ``limit``: the longest away first (none if there are not enough idle)."""
    return sorted(idle_since, key=idle_since.__getitem__)[: max(0, held - limit)]


def session_revoked(username: str | None, current: Mapping[str, object], replaced: set[str]) -> bool:
    """Whether a session's account is gone or was made again (``replaced``; a registration login has
    none yet)."""
    name = username or ""
    if not name or name.startswith(REGISTER_PREFIX):
        return False
    return name not in current or name in replaced


class SessionUpkeep:
    def __init__(self, host: SessionHost, limits: Limits) -> None:
        self._host = host
        self.limits = limits
        self._away: dict[str, float] = {}  # persistent sessions whose client left -> since (monotonic)
        self._queue_drops: Counter[str] = Counter()  # per client id, to log a full queue once
        # account -> client ids of its persistent sessions: a superset, pruned against the table as read
        self._persistent: defaultdict[str, set[str]] = defaultdict(set)
        self.tell: Callable[[str | None, Telling], Awaitable[None]] | None = None  # the notice topic (notices.py)

    def connected(self, client_id: str) -> None:
        self._away.pop(client_id, None)

    def kept(self, account: str, client_id: str) -> None:
        """A persistent session of ``account`` is in the broker's table (new or resumed)."""
        self._persistent[account].add(client_id)

    def persistent_of(self, account: str) -> dict[str, bool]:
        """The persistent sessions ``account`` holds: client id -> whether its client is connected."""
        ids = self._persistent.get(account)
        if not ids:
            return {}
        table, held = self._host.session_table(), {}
        for client_id in list(ids):
            session = table.get(client_id, (None, None))[0]
            if session is None or session.clean_session or session.username != account:
                ids.discard(client_id)  # deleted, expired, or taken by a clean session since
            else:
                held[client_id] = session.transitions.is_connected()
        if not ids:
            del self._persistent[account]
        return held

    async def trim(self, account: str) -> list[str]:
        """Drop the longest-idle persistent sessions of ``account`` beyond ``max_sessions``
        (never a connected one); the client ids dropped. Counted again after each drop, so
        that two CONNECTs of one account at once drop no more than needed."""
        dropped: list[str] = []
        while True:
            held = self.persistent_of(account)
            idle = {cid: self._away.get(cid, 0.0) for cid, connected in held.items() if not connected}
            victims = sessions_to_drop(idle, len(held), self.limits.max_sessions)
            if not victims:
                return dropped
            victim = victims[0]
            self._away.pop(victim, None)
            self._queue_drops.pop(victim, None)
            await self._host.delete_session(victim)  # out of the table before its first await
            dropped.append(victim)
            log.info("persistent session %s dropped: %s holds %d", victim, account, self.limits.max_sessions)

    async def make_room_for(self, account: str, client_id: str) -> None:
        """A persistent session of ``account`` is in the table: past ``Limits.max_sessions``,
        its longest-idle ones are dropped (imcli/broker/admission.py says why), and it is told."""
        self.kept(account, client_id)
        try:
            dropped = await self.trim(account)
        except Exception:  # the new connection goes on; the next persistent CONNECT trims again
            log.exception("could not drop the idle sessions of %s", account)
            return
        for gone in dropped:
            if self.tell is not None:
                await self.tell(account, session_dropped(gone, self.limits.max_sessions))

    def left(self, client_id: str) -> None:
        self._away[client_id] = time.monotonic()

    def make_room(self, client_id: str | None, queue: asyncio.Queue[Any]) -> None:
        """Before one more message is queued for an offline session: keep the newest
        ``max_queued``; the archive still has the oldest for ``imcli history``."""
        if queue.qsize() >= self.limits.max_queued:
            queue.get_nowait()
            self._queue_drops[client_id or ""] += 1
            if self._queue_drops[client_id or ""] == 1:
                log.info("offline queue of %s is full: dropping its oldest", client_id)

    @staticmethod
    def take_queued(queue: asyncio.Queue[Any], receives: Callable[[str], bool]) -> list[tuple[str, bytes, int]]:
        """Empty an offline queue as its session comes back: (topic, payload, QoS) of each
        message its client may (still) receive."""
        taken = []
        while not queue.empty():
            queued = queue.get_nowait()
            if receives(queued.topic):
                taken.append((queued.topic, queued.data, queued.qos))
        return taken

    async def expire_sessions(self, also: Callable[[float], None] | None = None) -> None:
        """Drop a persistent session away for longer than ``session_expiry``; ``also(now)`` is
        called on each round (stale rate tokens)."""
        expiry = self.limits.session_expiry
        while True:
            await asyncio.sleep(min(expiry / 4, 600.0))
            now = time.monotonic()
            if also is not None:
                also(now)
            for client_id in expired(self._away, now, expiry):
                del self._away[client_id]
                session = self._host.session_table().get(client_id, (None, None))[0]
                if session is None or session.transitions.is_connected():
                    continue
                try:
                    await self._host.delete_session(client_id)
                except Exception:  # one bad session must not end the sweeping
                    log.exception("could not expire the session %s", client_id)
                self._queue_drops.pop(client_id, None)
                log.info("persistent session %s expired after %.0f s away", client_id, expiry)

    async def end_revoked_logins(self) -> None:
        """``imcli admin user remove`` edits accounts.json from another process. Once a second
        the file's stamp is looked at. The connections of an account that is gone, or was made
        again with another password, are closed (their Last Will fires) and its sessions are
        deleted, so that a new owner of the name cannot resume them.

        At 10,000 accounts a change of the file cost the loop 40 to 55 ms in one callback (issue 21):
        now the file is parsed, and the accounts gone found (``AccountStore.take_gone``), in a thread,
        and the sessions are walked ``WALK_SLICE`` at a time."""
        seen = -1
        doomed: set[str] = set()  # client ids to delete once their connection has ended
        accounts = self._host.accounts
        while True:
            await asyncio.sleep(ACCOUNT_CHECK)
            try:
                await accounts.refresh_off_loop()
                if accounts.generation != seen:
                    seen = accounts.generation
                    await self._close_revoked(accounts.snapshot(), accounts.take_gone(), doomed)
                for client_id in list(doomed):
                    session = self._host.session_table().get(client_id, (None, None))[0]
                    if session is None or not session.transitions.is_connected():
                        doomed.discard(client_id)
                        self._away.pop(client_id, None)
                        await self._host.delete_session(client_id)
            except Exception:  # a damaged accounts.json or one bad session must not end the watch
                log.exception("could not end the sessions of removed accounts")

    async def _close_revoked(self, current: Mapping[str, object], replaced: set[str], doomed: set[str]) -> None:
        table = self._host.session_table()
        client_ids = list(table)  # the keys alone: no tuple per session (session_sweep.py says why)
        for start in range(0, len(client_ids), WALK_SLICE):
            if start:
                await asyncio.sleep(0)
            for client_id in client_ids[start : start + WALK_SLICE]:
                session, handler = table.get(client_id, (None, None))
                if session is None or not session_revoked(session.username, current, replaced):
                    continue
                doomed.add(client_id)
                if session.transitions.is_connected():
                    log.warning("closing %s: its account was removed or replaced", client_id)
                    await self._host.close_connection(handler)
