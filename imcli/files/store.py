"""The files worker's storage: content-addressed blobs, unfinished uploads and one SQLite file.

Under ``<data-dir>/files/``:

* ``blobs/<ab>/<sha256>``: each distinct content once, whoever sent it and however often;
* ``partial/<upload>``: the bytes of an unfinished upload so far (resumable);
* ``files.sqlite3`` (WAL, synchronous FULL): the ``files`` (what was sent where) and the
  ``uploads`` in progress.

A file is *confirmed* only when its blob has been written, synced and renamed into place and
its row committed: a ``kill -9`` at any moment leaves either the finished file or an
unfinished upload that the same sender can resume. Pure storage: who may read what is
decided by the worker.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from imcli.core.errors import ImcliError

FILES_DIR = "files"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,          -- unguessable (secrets.token_urlsafe)
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    sender TEXT NOT NULL,
    conv TEXT NOT NULL,           -- room:<r> | dm:<a>|<b> (sorted) | group:<g> | moments:<author>
    at REAL NOT NULL,             -- the worker's clock when it was stored
    width INTEGER,
    height INTEGER,
    thumb TEXT
);
CREATE INDEX IF NOT EXISTS files_conv ON files (conv, at);
CREATE INDEX IF NOT EXISTS files_sender ON files (sender, sha256);
CREATE TABLE IF NOT EXISTS uploads (
    upload TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    name TEXT NOT NULL,
    conv TEXT NOT NULL,
    started REAL NOT NULL,
    touched REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_sender ON uploads (sender);
"""


def room_conversation(room: str) -> str:
    return f"room:{room}"


def group_conversation(group: str) -> str:
    return f"group:{group}"


def moments_conversation(author: str) -> str:
    """The images of ``author``'s moments: the author's and the author's friends' to fetch."""
    return f"moments:{author}"


def dm_conversation(a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"dm:{first}|{second}"


@dataclass(frozen=True)
class StoredFile:
    id: str
    sha256: str
    size: int
    name: str
    mime: str
    sender: str
    conv: str
    at: float
    width: int | None = None
    height: int | None = None
    thumb: str | None = None


@dataclass(frozen=True)
class UploadRow:
    upload: str
    sender: str
    sha256: str
    size: int
    name: str
    conv: str
    started: float
    touched: float


_FILE_COLUMNS = "id, sha256, size, name, mime, sender, conv, at, width, height, thumb"
_UPLOAD_COLUMNS = "upload, sender, sha256, size, name, conv, started, touched"


class FileStore:
    """``<data_dir>/files/``; safe to share between paho's thread and the worker's timer."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / FILES_DIR
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        path = self.root / "files.sqlite3"
        try:
            for folder in (self.root, self.blobs, self.partial):
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a reply says "stored": the row is on disk
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise ImcliError(f"cannot open the file store {path}: {exc}", "check the data directory") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- paths

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def partial_path(self, upload: str) -> Path:
        return self.partial / upload

    # ---------------------------------------------------------------- files

    def file(self, file_id: str) -> StoredFile | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()  # noqa: S608
        return StoredFile(*row) if row else None

    def sent_before(self, sender: str, sha256: str, conv: str, name: str) -> StoredFile | None:
        """The same content, name and conversation from the same sender: a re-run of a finished ``send``."""
        sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE sender = ? AND sha256 = ? AND conv = ? AND name = ?"  # noqa: S608
        with self._lock:
            row = self._db.execute(sql, (sender, sha256, conv, name)).fetchone()
        return StoredFile(*row) if row else None

    def listing(
        self, convs: list[str], limit: int, *, rooms: bool = False, party: str | None = None
    ) -> list[StoredFile]:
        """The newest ``limit`` files of ``convs``, of every room if ``rooms``, and of every
        direct conversation of ``party``; oldest first."""
        where = ["conv = ?"] * len(convs)
        args: list[object] = list(convs)
        if rooms:
            where.append("conv GLOB 'room:*'")
        if party is not None:  # names never hold GLOB's * ? [
            where += ["conv GLOB ?", "conv GLOB ?"]
            args += [f"dm:{party}|*", f"dm:*|{party}"]
        sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE {' OR '.join(where) or '0'} ORDER BY at DESC LIMIT ?"  # noqa: S608
        with self._lock:
            rows = self._db.execute(sql, [*args, limit]).fetchall()
        return [StoredFile(*row) for row in reversed(rows)]

    def used(self, sender: str) -> int:
        """Bytes charged to ``sender``: each distinct content it sent, and its unfinished uploads."""
        with self._lock:
            (done,) = self._db.execute(
                "SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT sha256, size FROM files WHERE sender = ?)",
                (sender,),
            ).fetchone()
            (going,) = self._db.execute(
                "SELECT coalesce(sum(size), 0) FROM uploads WHERE sender = ?", (sender,)
            ).fetchone()
        return int(done) + int(going)

    def holds(self, sender: str, sha256: str) -> bool:
        """Whether ``sender`` has a file of this content already (another copy costs it nothing)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM files WHERE sender = ? AND sha256 = ?", (sender, sha256)).fetchone()
        return row is not None

    def finish(self, upload: UploadRow, stored: StoredFile) -> None:
        """Move a verified upload's bytes to its blob (unless that content is there already) and
        record the file, in that order: a crash in between leaves a blob without a row, never a row
        without its bytes."""
        blob = self.blob_path(stored.sha256)
        partial = self.partial_path(upload.upload)
        blob.parent.mkdir(exist_ok=True, mode=0o700)
        if blob.exists():
            partial.unlink(missing_ok=True)  # the same content is kept once
        else:
            os.replace(partial, blob)
            _sync_dir(blob.parent)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (stored.id, stored.sha256, stored.size, stored.name, stored.mime, stored.sender, stored.conv,
                 stored.at, stored.width, stored.height, stored.thumb),
            )  # fmt: skip
            self._db.execute("DELETE FROM uploads WHERE upload = ?", (upload.upload,))
            self._db.execute("COMMIT")

    def delete(self, file_id: str) -> bool:
        """Remove a file's row, then its blob if no other row has that content (in that order: a
        crash in between leaves a blob without a row, as ``finish`` may); whether the blob went."""
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
                others = self._db.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (row[0],)).fetchone()
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if others is not None:
            return False
        self.blob_path(row[0]).unlink(missing_ok=True)
        return True

    # ---------------------------------------------------------------- uploads

    def upload(self, upload: str) -> UploadRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE upload = ?", (upload,)).fetchone()  # noqa: S608
        return UploadRow(*row) if row else None

    def pending(self, sender: str, sha256: str, size: int, conv: str) -> UploadRow | None:
        sql = f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE sender = ? AND sha256 = ? AND size = ? AND conv = ?"  # noqa: S608
        with self._lock:
            row = self._db.execute(sql, (sender, sha256, size, conv)).fetchone()
        return UploadRow(*row) if row else None

    def uploads_of(self, sender: str) -> list[UploadRow]:
        sql = f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE sender = ?"  # noqa: S608
        with self._lock:
            return [UploadRow(*row) for row in self._db.execute(sql, (sender,)).fetchall()]

    def begin(self, row: UploadRow) -> None:
        self.partial_path(row.upload).touch(mode=0o600)
        with self._lock:
            self._db.execute(
                f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (row.upload, row.sender, row.sha256, row.size, row.name, row.conv, row.started, row.touched),
            )

    def touch(self, upload: str, at: float) -> None:
        with self._lock:
            self._db.execute("UPDATE uploads SET touched = ? WHERE upload = ?", (at, upload))

    def rename_upload(self, upload: str, name: str) -> None:
        with self._lock:
            self._db.execute("UPDATE uploads SET name = ? WHERE upload = ?", (name, upload))

    def drop_upload(self, upload: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM uploads WHERE upload = ?", (upload,))
        self.partial_path(upload).unlink(missing_ok=True)

    def abandoned(self, before: float) -> list[str]:
        """Uploads nobody touched since ``before``."""
        with self._lock:
            return [u for (u,) in self._db.execute("SELECT upload FROM uploads WHERE touched < ?", (before,))]

    def stray_partials(self) -> list[Path]:
        """Partial files with no upload row (a crash between the two): safe to remove."""
        with self._lock:
            known = {u for (u,) in self._db.execute("SELECT upload FROM uploads")}
        with contextlib.suppress(OSError):
            return [p for p in self.partial.iterdir() if p.name not in known]
        return []


def _sync_dir(path: Path) -> None:
    """A rename is durable once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
