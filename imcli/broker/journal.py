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

**The rows are written by a thread of their own, a transaction per batch** (issue 21: a
chat line's CPU in the broker's loop). ``record`` decides in the loop whether a message is
kept and hands its row to the journal's thread, which commits whatever has come meanwhile
in one transaction (``ArchiveStore.add_many``; SQLite releases the GIL while it works):
the insert and its commit, 45 to 58 us of the loop's CPU per row when each was its own
transaction in the loop, are no longer in the loop, and under load rows share commits.
**A row is handed to the writer once the loop's round is over** (issue 16, eighth session): ``record``
runs in the middle of a PUBLISH's handling, before its copies are written, and a row put on the
writer's queue there woke the writer at once, which then took the interpreter's lock whenever the
loop let go of it (the copy's ``send``) and held it for its Python while the loop waited to finish
the handling: the chat line's own delivery waited for its own row. ``record`` now keeps the rows of
a round and one ``call_soon`` hands them over after the round's callbacks, when the loop's copies
are out (what waits for the commit, the PUBACKs, waits as before: ``_added`` counts them at once).
The rule that makes the guarantee: **nothing the broker answers a client (a PUBACK, and
every answer after it) is written before every row recorded until then is committed**
(``after_commit``, ``committed``): the reader of a connection (imcli/broker/reader.py)
hands its PUBACKs to ``after_commit`` and writes them when the batch holding their rows is
committed, in the order they were read, and waits for ``committed`` before it handles a
packet with an answer of its own (PINGREQ, SUBSCRIBE, ...), which therefore never
overtakes them. A killed process loses no acknowledged row; a batch that fails (a full
disk) acknowledges none of the messages that waited for it: their connections are closed
without their PUBACKs, as an insert that raised in the loop ended its connection before,
and their senders send them again. Copies to the recipients do not wait: as before, they
are written before the row (a line is delivered, then kept, then acknowledged). A request to
the workers does wait (``ImBroker.deliver``): it is delivered once every row recorded before it is
committed, so a history asked for on seeing a line holds that line.

What cost 10 to 20 ms every few seconds (measured under the DM benchmark) was SQLite's automatic
WAL checkpoint, run by whichever commit crosses 1,000 pages. The journal's
connection turns it off and ``Checkpointer`` runs a PASSIVE checkpoint once a second from
a thread of its own on its own connection. The guarantee is unchanged: a committed row is
in the WAL file before the PUBACK leaves, whether or not it has been checkpointed yet, and
survives a kill of the process (synchronous=NORMAL: only a power loss can lose the last
commits; docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from amqtt.session import ApplicationMessage

from imcli.core.wire import MalformedPayload, Received, TopicKind, Topics, chat_received

log = logging.getLogger(__name__)

KEPT = frozenset({TopicKind.ROOM, TopicKind.DM, TopicKind.GROUP_MSG})  # the only topics journalled (record_line)


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

    def add_many(self, items: Sequence[tuple[Received, float]]) -> None: ...

    def defer_checkpoints(self) -> None: ...

    def close(self) -> None: ...


_CLOSE = None  # the writer's last item: everything before it is written, then it returns


class Journal:
    """Decides in the event loop which messages are kept; a thread of its own writes them."""

    def __init__(self, store: ArchiveWriter, topics: Topics, may_publish: Callable[[str | None, str], bool]) -> None:
        self.store = store
        self.store.defer_checkpoints()  # to the Checkpointer's thread: not in the event loop
        self._checkpointer = Checkpointer(store.path)
        self._topics = topics
        self._may_publish = may_publish
        self._loop: asyncio.AbstractEventLoop | None = None  # the broker's, known at the first row
        # rows for the writer: (item, at), or _CLOSE; SimpleQueue: a put is cheap, and wakes the writer
        self._rows: queue.SimpleQueue[tuple[Received, float] | None] = queue.SimpleQueue()
        # loop side only (the writer tells the loop with call_soon_threadsafe):
        self._added = 0  # rows handed to the writer
        self._committed = 0  # rows the writer has finished with (committed, or failed)
        self._failed_through = 0  # ``_committed`` after the last batch that failed
        # (rows to be committed first, ``_committed`` when it was asked, callback), oldest first
        self._waiting: deque[tuple[int, int, Callable[[bool], None]]] = deque()
        self._pending: list[tuple[Received, float]] = []  # this round's rows, for the writer after it
        self._writer = threading.Thread(target=self._write, name="journal-writer", daemon=True)
        self._writer.start()

    def record(self, username: str | None, message: ApplicationMessage) -> None:
        """Keep ``message`` if it is chat the broker will deliver (the caller checked the limits):
        its row is committed before anything answered from now on (``after_commit``)."""
        if not message.retain:
            self.record_line(username, message.topic, bytes(message.data or b""))

    def record_line(self, username: str | None, topic: str, data: bytes) -> None:
        """``record`` of a message not retained, on ``topic`` with payload ``data``."""
        parsed = self._topics.parse(topic)
        if parsed is None or parsed.kind not in KEPT:
            return
        if not self._may_publish(username, topic):
            return
        try:
            item = chat_received(parsed, data)
        except MalformedPayload:
            return  # delivered as it is, shown as malformed; nothing to keep
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._added += 1
        if not self._pending:
            self._loop.call_soon(self._hand_over)
        self._pending.append((item, time.time()))

    def _hand_over(self) -> None:
        """The round's rows to the writer (in the loop, after the round that recorded them)."""
        rows, self._pending = self._pending, []
        for row in rows:
            self._rows.put(row)

    @property
    def recorded(self) -> int:
        """How many rows have been recorded so far (a mark for ``after_commit`` and ``committed``)."""
        return self._added

    def is_kept(self, upto: int) -> bool:
        """Whether the first ``upto`` rows recorded are committed."""
        return self._committed >= upto

    def after_commit(self, callback: Callable[[bool], None], upto: int | None = None) -> None:
        """``callback(True)`` once the first ``upto`` rows recorded (all so far, by default) are
        committed, at once if they are; callbacks that wait run in the order they were given (a
        connection's marks only grow: its answers keep their order). ``callback(False)`` if a batch
        that may hold one of those rows failed: what waited for it must not be acknowledged."""
        upto = self._added if upto is None else upto
        if self._committed >= upto:
            callback(True)
        else:
            self._waiting.append((upto, self._committed, callback))

    async def committed(self, upto: int | None = None) -> bool:
        """``after_commit``, awaited: whether the first ``upto`` rows (all so far) are committed."""
        upto = self._added if upto is None else upto
        if self._committed >= upto:
            return True
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def tell(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        self.after_commit(tell, upto)
        return await done

    def _written(self, rows: int, ok: bool) -> None:
        """In the loop: the writer is done with ``rows`` more rows (committed, or failed)."""
        self._committed += rows
        if not ok:
            self._failed_through = self._committed
        while self._waiting and self._waiting[0][0] <= self._committed:
            _, asked_at, callback = self._waiting.popleft()
            try:
                callback(self._failed_through <= asked_at)
            except Exception:  # one connection's answer must not keep the others waiting
                log.exception("a journal callback failed")

    def _write(self) -> None:
        """The writer's thread: every row that has come, in one transaction, until ``_CLOSE``."""
        rows = self._rows
        while True:
            first = rows.get()
            batch = [] if first is _CLOSE else [first]
            closing = first is _CLOSE
            while not closing:
                try:
                    more = rows.get_nowait()
                except queue.Empty:
                    break
                if more is _CLOSE:
                    closing = True
                else:
                    batch.append(more)
            if batch:
                ok = True
                try:
                    self.store.add_many(batch)
                except Exception:  # a full disk, a database locked for longer than its timeout
                    log.exception("the journal could not keep %d messages", len(batch))
                    ok = False
                loop = self._loop
                try:
                    if loop is not None:
                        loop.call_soon_threadsafe(self._written, len(batch), ok)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
            if closing:
                return

    def close(self) -> None:
        """Write what is left, then close the store."""
        self._hand_over()  # rows of a round the loop did not finish
        self._rows.put(_CLOSE)
        self._writer.join(30)
        self._checkpointer.close()
        self.store.close()
