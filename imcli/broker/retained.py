"""Retained state that must survive a broker restart, in ``<data_dir>/retained.sqlite3``.

amqtt keeps retained messages in memory only. The workers keep their state in retained
records (presence, groups, friends); without this, restarting ``imcli serve`` would lose
every group and friendship. Device statuses are not kept: devices announce themselves
again when they reconnect, and a stale status would only make a ghost.

``RetainedState`` is what the broker does with every retained message beside amqtt's own
table: index it (imcli/broker/fanout.py), feed the ACL's group and friend caches
(imcli/broker/topic_access.py), keep the durable ones, and count each account's status
records.

Status records are the only retained messages a user may write (one per device, cleared by
the device's Last Will or by the presence worker when its heartbeat stops). Without a bound,
one account filled the broker's memory with 1,000 junk 16 KB statuses under invented device
names (issue 15): ``status_refusal`` caps a status's size (``Limits.max_status``) and the
retained statuses an account holds (``Limits.max_retained``). Updating a status it holds,
and clearing one (an empty payload), are always allowed. ``PublishChecks.judge`` asks it,
so a Last Will on a status topic is held to the same bounds when it fires.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from imcli.broker.fanout import RetainedIndex
from imcli.broker.limits import Limits
from imcli.broker.notices import Telling, status_too_large, too_many_statuses
from imcli.broker.topic_access import TopicAccess
from imcli.core.errors import ImcliError
from imcli.core.wire import TopicKind

log = logging.getLogger(__name__)

# retained topics a new subscription is sent per round of the event loop: 500 until the ninth session, when
# the capacity run's traces at 10,000 users found a slice of 500 presence records (a watcher subscribing to
# ``im/presence/+`` at the end of the join) using 8.5 to 33.5 ms of the loop's CPU, the join phase's longest
# rounds after the broker's start-up (issue 21, docs/PERFORMANCE.md); a fifth of that is 100
RETAINED_SLICE = 100

DURABLE = frozenset({TopicKind.PRESENCE, TopicKind.GROUP_INFO, TopicKind.FRIENDS, TopicKind.PROFILE})


def status_refusal(topic: str, size: int, *, retain: bool, held: Collection[str], limits: Limits) -> Telling | None:
    """Why a status message of ``size`` bytes on ``topic`` is dropped, if it is; ``held`` are
    the status topics its account has retained now. Clearing (empty) is always allowed, and so
    is updating a status it holds; a new one is refused when it holds ``max_retained``."""
    if size == 0:
        return None
    if size > limits.max_status:
        return status_too_large(size, limits.max_status, topic)
    if retain and topic not in held and len(held) >= limits.max_retained:
        return too_many_statuses(limits.max_retained, topic)
    return None


class RetainedStore:
    FILE_NAME = "retained.sqlite3"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.FILE_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the process
            self._db.execute("CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB, qos INTEGER)")
        except (sqlite3.Error, OSError) as exc:
            self._db.close()
            raise ImcliError(
                f"the saved state {self.path} cannot be used: {exc}",
                "move it aside to start without saved groups, friends and nicknames",
            ) from exc

    def put(self, topic: str, payload: bytes, qos: int) -> None:
        if payload:
            self._db.execute("INSERT OR REPLACE INTO retained VALUES (?, ?, ?)", (topic, payload, qos))
        else:
            self._db.execute("DELETE FROM retained WHERE topic = ?", (topic,))

    def all(self) -> Iterator[tuple[str, bytes, int]]:
        yield from self._db.execute("SELECT topic, payload, qos FROM retained ORDER BY topic")

    def close(self) -> None:
        self._db.close()


class RetainedState:
    def __init__(self, data_dir: Path, access: TopicAccess, limits: Limits | None = None) -> None:
        self.durable = RetainedStore(data_dir)
        self.index = RetainedIndex()
        self._access = access
        self.limits = limits or Limits()
        self._statuses: defaultdict[str, set[str]] = defaultdict(set)  # account -> its retained status topics

    def status_refusal(self, topic: str, size: int, retain: bool) -> Telling | None:
        """``status_refusal`` for a user's publish (or Last Will) on ``topic``; ``None`` for other topics."""
        parsed = self._access.topics.parse(topic)
        if parsed is None or parsed.kind is not TopicKind.STATUS or not parsed.sender:
            return None
        held = self._statuses.get(parsed.sender, set())
        return status_refusal(topic, size, retain=retain, held=held, limits=self.limits)

    def restore(self) -> Iterator[tuple[str, bytes, int]]:
        """The durable records, each indexed and learnt as it is handed back to amqtt's table."""
        for topic, payload, qos in self.durable.all():
            self.index.add(topic)
            self._access.learn(topic, payload)
            yield topic, payload, qos

    def changed(self, topic: str, payload: bytes, qos: int, *, kept: bool) -> None:
        """A retained message was set (``kept``) or cleared on ``topic``."""
        if kept:
            self.index.add(topic)
        else:
            self.index.discard(topic)
        kind = self._access.learn(topic, payload)
        if kind in DURABLE:
            self.durable.put(topic, payload, qos)
        elif kind is TopicKind.STATUS:
            self._count_status(topic, kept=kept)

    def _count_status(self, topic: str, *, kept: bool) -> None:
        parsed = self._access.topics.parse(topic)
        account = parsed.sender if parsed is not None else None
        if not account:
            return
        if kept:
            self._statuses[account].add(topic)
        elif (held := self._statuses.get(account)) is not None:
            held.discard(topic)
            if not held:
                del self._statuses[account]

    def matching(
        self,
        subscription: tuple[str, int],
        table: Mapping[str, Any],
        matches: Callable[[str, str], bool],
        receives: Callable[[str], bool],
        topics: list[str] | None = None,
    ) -> list[tuple[str, bytes, int]]:
        """What a new subscription gets of amqtt's retained ``table``: (topic, payload, QoS) of
        each message under its filter that its subscriber may receive (of ``topics`` only, if given:
        a slice of ``index.under``'s, each taken as it is in the table now)."""
        topic_filter, qos = subscription
        return [
            (retained.topic, retained.data, min(qos, retained.qos or qos))
            for topic in (self.index.under(topic_filter, table) if topics is None else topics)
            if (retained := table.get(topic)) is not None and matches(topic, topic_filter) and receives(topic)
        ]

    def close(self) -> None:
        self.durable.close()


async def send_in_slices(
    topics: list[str], size: int, send: Callable[[list[str]], None], going: Callable[[], bool]
) -> None:
    """``send`` ``topics`` a slice of ``size`` per round of the event loop, while ``going()`` (the
    subscriber's connection is still the one that asked)."""
    try:
        for start in range(0, len(topics), size):
            await asyncio.sleep(0)
            if not going():
                return
            send(topics[start : start + size])
    except Exception:  # nobody awaits this task: say it here
        log.exception("retained messages for a new subscription not all sent")
