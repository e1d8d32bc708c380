"""Retained state that must survive a broker restart, in ``<data_dir>/retained.sqlite3``.

amqtt keeps retained messages in memory only. The workers keep their state in retained
records (presence, groups, friends); without this, restarting ``imcli serve`` would lose
every group and friendship. Device statuses are not kept: devices announce themselves
again when they reconnect, and a stale status would only make a ghost.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

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
