"""Retained state that must survive a broker restart, in ``<data_dir>/retained.sqlite3``.

amqtt keeps retained messages in memory only. The workers keep their state in retained
records (presence, groups, friends); without this, restarting ``imcli serve`` would lose
every group and friendship. Device statuses are not kept: devices announce themselves
again when they reconnect, and a stale status would only make a ghost.

``RetainedState`` is what the broker does with every retained message beside amqtt's own
table: index it (imcli/broker/fanout.py), feed the ACL's group and friend caches
(imcli/broker/topic_access.py) and keep the durable ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from imcli.broker.fanout import RetainedIndex
from imcli.broker.topic_access import TopicAccess
from imcli.core.errors import ImcliError
from imcli.core.wire import TopicKind

DURABLE = frozenset({TopicKind.PRESENCE, TopicKind.GROUP_INFO, TopicKind.FRIENDS})


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
    def __init__(self, data_dir: Path, access: TopicAccess) -> None:
        self.durable = RetainedStore(data_dir)
        self.index = RetainedIndex()
        self._access = access

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
        if self._access.learn(topic, payload) in DURABLE:
            self.durable.put(topic, payload, qos)

    def matching(
        self,
        subscription: tuple[str, int],
        table: Mapping[str, Any],
        matches: Callable[[str, str], bool],
        receives: Callable[[str], bool],
    ) -> list[tuple[str, bytes, int]]:
        """What a new subscription gets of amqtt's retained ``table``: (topic, payload, QoS) of
        each message under its filter that its subscriber may receive."""
        topic_filter, qos = subscription
        return [
            (retained.topic, retained.data, min(qos, retained.qos or qos))
            for topic in self.index.under(topic_filter, table)
            if (retained := table.get(topic)) is not None and matches(topic, topic_filter) and receives(topic)
        ]

    def close(self) -> None:
        self.durable.close()
