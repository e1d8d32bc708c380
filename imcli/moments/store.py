"""The moments worker's SQLite file (``<data_dir>/moments.sqlite3``): posts, likes, comments.

Moments are too many and too long-lived for retained messages, and none of them may ever be
on a topic someone other than the author's friends could read: they live here, and travel only
in replies and notices to one reader at a time.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from imcli.core.errors import ImcliError
from imcli.core.wire import ImageRef, Moment, MomentComment

_SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (id TEXT PRIMARY KEY, author TEXT NOT NULL, ts REAL NOT NULL,
                                  text TEXT NOT NULL, images TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS posts_by_author ON posts (author, ts);
CREATE TABLE IF NOT EXISTS likes (post TEXT NOT NULL, user TEXT NOT NULL, ts REAL NOT NULL,
                                  PRIMARY KEY (post, user));
CREATE TABLE IF NOT EXISTS comments (id TEXT PRIMARY KEY, post TEXT NOT NULL, author TEXT NOT NULL,
                                     ts REAL NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS comments_by_post ON comments (post, ts);
"""


class MomentStore:
    FILE_NAME = "moments.sqlite3"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.FILE_NAME
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ImcliError(f"the moments file {self.path} cannot be used: {exc}", "check its directory") from exc

    def close(self) -> None:
        self._db.close()

    def add_post(self, moment: Moment) -> None:
        images = json.dumps([i.model_dump() for i in moment.images])
        self._db.execute(
            "INSERT INTO posts VALUES (?, ?, ?, ?, ?)", (moment.id, moment.author, moment.ts, moment.text, images)
        )

    def delete_post(self, post: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            for table, column in (("likes", "post"), ("comments", "post"), ("posts", "id")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (post,))  # noqa: S608 (fixed names)

    def files_elsewhere(self, author: str, post: str) -> set[str]:
        """The image files ``author``'s moments other than ``post`` show (a file sent again is the same id)."""
        rows = self._db.execute("SELECT images FROM posts WHERE author = ? AND id != ?", (author, post))
        return {str(image["file"]) for (images,) in rows for image in json.loads(images)}

    def like(self, post: str, user: str, ts: float, *, liked: bool) -> None:
        if liked:
            self._db.execute("INSERT OR IGNORE INTO likes VALUES (?, ?, ?)", (post, user, ts))
        else:
            self._db.execute("DELETE FROM likes WHERE post = ? AND user = ?", (post, user))

    def comment(self, post: str, comment: MomentComment) -> None:
        self._db.execute(
            "INSERT INTO comments VALUES (?, ?, ?, ?, ?)", (comment.id, post, comment.author, comment.ts, comment.text)
        )

    def author_of(self, post: str) -> str | None:
        row = self._db.execute("SELECT author FROM posts WHERE id = ?", (post,)).fetchone()
        return str(row[0]) if row else None

    def get(self, post: str) -> Moment | None:
        row = self._db.execute("SELECT id, author, ts, text, images FROM posts WHERE id = ?", (post,)).fetchone()
        return self._moment(row) if row else None

    def page(self, authors: list[str], limit: int, before: float | None) -> tuple[list[Moment], bool]:
        """The newest ``limit`` posts of ``authors`` older than ``before``; whether there are more."""
        if not authors:
            return [], False
        marks = ",".join("?" * len(authors))
        rows = self._db.execute(
            f"SELECT id, author, ts, text, images FROM posts WHERE author IN ({marks}) AND ts < ? "  # noqa: S608
            "ORDER BY ts DESC, id LIMIT ?",
            (*authors, before if before is not None else float("inf"), limit + 1),
        ).fetchall()
        return [self._moment(r) for r in rows[:limit]], len(rows) > limit

    def _moment(self, row: tuple[str, str, float, str, str]) -> Moment:
        post = row[0]
        likes = [u for (u,) in self._db.execute("SELECT user FROM likes WHERE post = ? ORDER BY ts", (post,))]
        comments = [
            MomentComment(id=c, author=a, ts=t, text=x)
            for c, a, t, x in self._db.execute(
                "SELECT id, author, ts, text FROM comments WHERE post = ? ORDER BY ts", (post,)
            )
        ]
        images = [ImageRef.model_validate(i) for i in json.loads(row[4])]
        return Moment(id=post, author=row[1], ts=row[2], text=row[3], images=images, likes=likes, comments=comments)
