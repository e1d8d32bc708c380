"""Acknowledged means kept: the embedded broker writes each chat message to the archive
before it sends the PUBACK.

amqtt acknowledges a QoS 1 PUBLISH as soon as it has queued it in memory, so a broker
killed a moment later loses a message its sender was told had arrived. ``AckAfterJournal``
(imcli/broker/amqtt_adapter.py) is amqtt's protocol handler with one hook before that
PUBACK; ``Journal`` writes the
message to ``<data-dir>/archive.sqlite3`` (WAL: a committed row survives the process
being killed) if the broker is going to deliver it — a chat topic the sender may publish
to, within the size limit, not retained. Whoever was offline then gets it from the
archive (``imcli chat`` catches up on start). QoS 0 messages are journalled on delivery.

The write happens in the event loop, before the PUBACK, and costs about 0.25 ms; what
cost 10 to 20 ms every few seconds (measured under the DM benchmark) was SQLite's automatic
WAL checkpoint, run by whichever commit crosses 1,000 pages, in the loop. The journal's
connection turns it off and ``Checkpointer`` runs a PASSIVE checkpoint once a second from
a thread of its own on its own connection (SQLite releases the GIL while it works). The
guarantee is unchanged: a committed row is in the WAL file before the PUBACK leaves,
whether or not it has been checkpointed yet, and survives a kill of the process
(synchronous=NORMAL: only a power loss can lose the last commits; docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from amqtt.session import ApplicationMessage

from imcli.core.wire import MalformedPayload, Received, TopicKind, Topics, chat_received

log = logging.getLogger(__name__)

_CHAT = (TopicKind.ROOM, TopicKind.DM, TopicKind.GROUP_MSG)


class Checkpointer:
    """Checkpoints the WAL of ``path`` every ``period`` seconds, in a thread, until ``close``."""

    def __init__(self, path: Path, period: float = 1.0) -> None:
        self._path = path
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, timeout=10, check_same_thread=False, isolation_level=None)
        try:
            while not self._stop.wait(self._period):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or locked: the next round tries again
                    log.debug("archive checkpoint skipped: %s", exc)
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("archive checkpoint failed: %s", exc)
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


class ArchiveWriter(Protocol):
    """Where the journal writes: the archive's SQLite store (``imcli.archive.store.ArchiveStore``),
    handed in by the serve host so that the broker does not import a worker's package."""

    path: Path

    def add(self, item: Received, at: float) -> bool: ...

    def defer_checkpoints(self) -> None: ...

    def close(self) -> None: ...


class Journal:
    def __init__(self, store: ArchiveWriter, topics: Topics, may_publish: Callable[[str | None, str], bool]) -> None:
        self.store = store
        self.store.defer_checkpoints()  # to the Checkpointer's thread: not in the event loop
        self._checkpointer = Checkpointer(store.path)
        self._topics = topics
        self._may_publish = may_publish

    def record(self, username: str | None, message: ApplicationMessage) -> None:
        """Keep ``message`` if it is chat the broker will deliver (the caller checked the limits)."""
        parsed = self._topics.parse(message.topic)
        if parsed is None or parsed.kind not in _CHAT or message.retain:
            return
        if not self._may_publish(username, message.topic):
            return
        try:
            item = chat_received(parsed, bytes(message.data or b""))
        except MalformedPayload:
            return  # delivered as it is, shown as malformed; nothing to keep
        self.store.add(item, time.time())

    def close(self) -> None:
        self._checkpointer.close()
        self.store.close()
