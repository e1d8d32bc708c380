"""The archive's SQLite store: every room, direct and group message, once.

Pure storage: who may read what is decided by the worker, which builds the query from
the requester's account (a conversation key always contains it, or names a group the
worker has checked). Times are the archive's own clock (``at``), so ``since`` means the
same thing for every sender whatever their clock says; ``ts`` is the sender's.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imcli.core.errors import ImcliError
from imcli.core.wire import MAX_TIMESTAMP, Received, encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    conv TEXT NOT NULL,          -- room:<r> | dm:<a>|<b> (sorted) | group:<g>
    kind TEXT NOT NULL,          -- room | dm | group
    sender TEXT NOT NULL,
    recipient TEXT,              -- dm only
    id TEXT NOT NULL,
    ts REAL NOT NULL,
    at REAL NOT NULL,
    text TEXT NOT NULL,
    format TEXT NOT NULL,
    file TEXT,                   -- a file message's FileInfo (JSON), issue 16
    UNIQUE (conv, sender, id)    -- QoS 1 redelivery; ids are the sender's, so scoped by sender
);
CREATE INDEX IF NOT EXISTS messages_conv ON messages (conv, seq);
CREATE INDEX IF NOT EXISTS messages_at ON messages (at);
"""


_INSERT = (
    "INSERT OR IGNORE INTO messages (conv, kind, sender, recipient, id, ts, at, text, format, file)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

Row = tuple[object, ...]


def _row(item: Received, at: float) -> Row:
    # without its thumbnail: a page of history must fit the broker's payload limit (Mosquitto's holds for
    # the workers too); the live message carried it, and `imcli get` fetches the file itself
    attached = encode(item.file.model_copy(update={"thumb": None})).decode() if item.file is not None else None
    return (
        conversation(item), item.kind, item.sender, item.to, item.id, item.ts, at, item.text, item.format, attached,
    )  # fmt: skip


def conversation(item: Received) -> str:
    if item.kind == "room" and item.room:
        return room_conversation(item.room)
    if item.kind == "group" and item.group:
        return group_conversation(item.group)
    if item.kind == "dm" and item.sender and item.to:
        return dm_conversation(item.sender, item.to)
    raise ValueError(f"not an archived kind: {item.kind}")


def room_conversation(room: str) -> str:
    return f"room:{room}"


def group_conversation(group: str) -> str:
    return f"group:{group}"


def dm_conversation(a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"dm:{first}|{second}"


ARCHIVE_FILE = "archive.sqlite3"


@dataclass(frozen=True)
class Page:
    messages: list[Received]
    more: bool


class ArchiveStore:
    """``<data_dir>/archive.sqlite3``; safe to share between paho's thread and others."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # the embedded broker's journal and the archive worker share the file: wait for each other
            self._db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            # before WAL is on: sqlite gives the -wal and -shm files (recent messages, DMs among
            # them) the database file's mode at the time it creates them
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed message
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
            if "file" not in columns:  # an archive made before issue 16
                self._db.execute("ALTER TABLE messages ADD COLUMN file TEXT")
        except sqlite3.DatabaseError as exc:
            raise ImcliError(f"cannot open the message archive {path}: {exc}", "move the damaged file away") from exc
        self._lock = threading.Lock()
        (last,) = self._db.execute("SELECT max(at) FROM messages").fetchone()
        self._last_at = float(last) if last is not None else 0.0

    def _rising(self, at: float) -> float:
        """``at``, or the next time after the last one stored (the lock held): each row's ``at`` is its own
        and rises with the row, so a page asked ``before`` the oldest ``at`` of the one after it neither
        skips a row that shares it nor repeats one (two rows in one tick, a clock set back)."""
        at = max(at, math.nextafter(self._last_at, math.inf))
        self._last_at = at
        return at

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def defer_checkpoints(self) -> None:
        """No automatic WAL checkpoint on this connection's commits: the caller runs them elsewhere."""
        with self._lock:
            self._db.execute("PRAGMA wal_autocheckpoint=0")

    def add(self, item: Received, at: float) -> bool:
        """Store one message; ``False`` if it was already there (a QoS 1 duplicate)."""
        with self._lock:
            return self._db.execute(_INSERT, _row(item, self._rising(at))).rowcount == 1

    def add_many(self, items: Sequence[tuple[Received, float]]) -> None:
        """Store messages (each with its ``at``) in one transaction: all of them once this returns
        (a duplicate is kept once, as by ``add``), none if it raises. The embedded broker's journal
        writes a batch so (imcli/broker/journal.py): a commit per row was most of a row's cost."""
        with self._lock:
            rows = [_row(item, self._rising(at)) for item, at in items]
            if len(rows) == 1:  # one statement, its own transaction: two statements fewer
                self._db.execute(_INSERT, rows[0])
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def conversation_page(self, conv: str, limit: int, since: float | None = None, before: float | None = None) -> Page:
        return self._page("conv = ?", [conv], limit, since, before)

    def catch_up(
        self, account: str, groups: Mapping[str, float], limit: int, since: float | None, before: float | None = None
    ) -> Page:
        """What ``account`` may read: every room, its direct messages, the groups it is in
        (``groups``: each group's name and where its history starts, ``group_history_start``)."""
        readable = ["kind = 'room'", "(kind = 'dm' AND (sender = ? OR recipient = ?))"]
        args: list[object] = [account, account]
        for name, start in groups.items():
            readable.append("(conv = ? AND at >= ?)")
            args += [group_conversation(name), start]
        return self._page(f"({' OR '.join(readable)})", args, limit, since, before)

    def prune(self, before: float) -> int:
        """Forget messages that arrived before ``before``; how many went."""
        with self._lock:
            return self._db.execute("DELETE FROM messages WHERE at < ?", (before,)).rowcount

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM messages").fetchone()
        return int(n)

    def _page(self, where: str, args: list[object], limit: int, since: float | None, before: float | None) -> Page:
        if since is not None:
            where += " AND at >= ?"
            args.append(since)
        if before is not None:
            where += " AND at < ?"
            args.append(before)
        columns = "kind, sender, recipient, conv, id, ts, text, format, file, at"
        # ``where`` is made of fixed fragments only; every value is bound
        sql = f"SELECT {columns} FROM messages WHERE {where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        with self._lock:
            rows = self._db.execute(sql, [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        return Page([_received(row) for row in reversed(rows[:limit])], more)


def _received(row: tuple[str, str, str | None, str, str, float, str, str, str | None, float]) -> Received:
    kind, sender, recipient, conv, id_, ts, text, fmt, attached, at = row
    if not 0 <= ts <= MAX_TIMESTAMP:  # kept before times were bounded (1e308, inf): no reader could show it
        ts = at
    place = conv.split(":", 1)[1]
    return Received.model_validate(
        {
            "kind": kind,
            "from": sender,
            "to": recipient,
            "room": place if kind == "room" else None,
            "group": place if kind == "group" else None,
            "id": id_,
            "ts": ts,
            "text": text,
            "format": fmt,
            "at": at,
            "file": json.loads(attached) if attached else None,
        }
    )
