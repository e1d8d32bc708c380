"""The files worker (issue 16): takes files in chunks, keeps them by content, hands them out.

An ordinary MQTT client with a service account, like the archive worker. A sender offers a
file (``file_offer``: name, size, sha256, conversation) and gets an unguessable upload id;
it publishes the bytes in chunks on ``<prefix>/upload/<me>/<upload>`` (the broker lets only
``<me>`` write there) and the worker answers with ``file_progress`` every few chunks and a
``file_ready`` once the sha256 matches and the file is stored. A receiver asks ``file_get``
and acknowledges what it has on ``<prefix>/fetch/<me>/<stream>``; the worker sends the bytes
a window ahead on ``<prefix>/user/<me>/file/<stream>``, which only ``<me>`` may read.

Who may fetch a file is decided here from the requester's account (the request topic's
sender, checked by the broker) and the conversation the file was sent to: a room, every
signed-in user; a direct conversation, its two people; a group, its current members (as the
group worker's retained records say), for files sent since the group was made; the images of
someone's moments, that author and the author's current friends (as the group worker's retained
friends records say, the moments worker's rule ``moment_visible``). Ids are unguessable, and an
unknown id answers exactly like one the requester may not fetch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from imcli.core.bulk import lower_this_thread
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.rules import group_history_start, missing_group, moment_visible
from imcli.core.service import ServiceWorker
from imcli.core.text import human_size, is_plain
from imcli.core.topics import DEFAULT_MAX_PAYLOAD, chunk, chunk_size, unchunk
from imcli.core.wire import (
    FILE_ID,
    RESERVED_NAMES,
    ErrorReply,
    FileAck,
    FileDelete,
    FileDeleted,
    FileGet,
    FileInfo,
    FileListing,
    FileListRequest,
    FileOffer,
    FileProgress,
    FileReady,
    FileUpload,
    Friends,
    GroupInfo,
    MalformedPayload,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    decode_as,
    encode,
    is_name,
)
from imcli.files.images import examine
from imcli.files.store import (
    FileStore,
    StoredFile,
    UploadRow,
    dm_conversation,
    group_conversation,
    moments_conversation,
    room_conversation,
)

log = logging.getLogger(__name__)

ErrorCode = Literal["not_found", "invalid", "denied", "taken", "internal"]

# bytes a sender or the worker may have on the way beyond the other side's last word; the other
# side speaks every half window (every fifth chunk of 262,136 bytes): each such message is a PUBLISH
# through the broker's loop as dear as a chunk's, and at 1 MiB and 256 KiB they were a third of a
# transfer's publishes (issue 16: chat latency during a transfer, docs/PERFORMANCE.md)
WINDOW = 2 << 20
PROGRESS_EVERY = 1 << 20  # bytes between two progress messages of an upload
IN_FLIGHT = 600.0  # seconds: an unfinished upload touched this recently counts against max_uploads
# seconds between two records of an upload's activity: each is a synced SQLite write (about a
# millisecond on paho's thread, where the next chunk waits), and IN_FLIGHT and ABANDONED are far longer
TOUCH_EVERY = 10.0
ABANDONED = 86400.0  # seconds: an unfinished upload untouched this long is removed
ACTIVE = 30.0  # seconds: an upload that had a chunk this recently shares the in-flight budget
STREAM_IDLE = 120.0  # seconds: a download nobody acknowledges this long is closed
STREAMS_PER_USER = 8
DISK_MARGIN = 64 << 20  # bytes kept free on the worker's disk


def unguessable_id(nbytes: int) -> str:
    """``nbytes`` random bytes, URL-safe, never starting with '-': people paste ids on command
    lines (``imcli get ID``), where a leading '-' reads as an option."""
    while (value := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return value


@dataclass(frozen=True)
class FileLimits:
    """imcli serve's (or imcli workers') limits on files, each explained to the sender."""

    max_file: int = 100 << 20
    quota: int = 1 << 30
    max_uploads: int = 4
    max_payload: int = DEFAULT_MAX_PAYLOAD  # the broker's: a listing fits in it
    # the broker's limit on upload topics (the embedded broker's Limits.max_chunk): a chunk and its
    # header fit in it; None: max_payload (a broker with one limit for all, as Mosquitto's message_size_limit)
    max_chunk: int | None = None
    # bytes of all uploads together that may be on their way to the worker (granted, not yet
    # received): the embedded broker closes a connection holding more than its output bound
    # (Limits.output_close, 8 MiB), the worker's too, so imcli serve gives half of it
    in_flight: int = 4 << 20


@dataclass
class _Upload:
    row: UploadRow
    out: BinaryIO
    digest: hashlib._Hash
    offset: int
    told: int = 0  # the offset of the last progress message
    touched: float = 0.0  # the worker's clock when the upload's row was last touched
    every: int = PROGRESS_EVERY  # bytes between two progress messages: at most half its window
    seen: float = field(default_factory=time.monotonic)  # when it last had a chunk (or an offer)


@dataclass
class _Stream:
    owner: str
    file: StoredFile
    source: BinaryIO
    sent: int
    acked: int
    touched: float = field(default_factory=time.monotonic)


class FilesWorker(ServiceWorker):
    requests = (FileOffer, FileGet, FileListRequest, FileDelete)

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        data_dir: Path,
        topics: Topics | None = None,
        device: str = "worker",
        clock: Callable[[], float] = time.time,
        limits: FileLimits | None = None,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock)
        self.client.max_inflight = 256  # a download's window of chunks in flight to each reader at once
        self.limits = limits or FileLimits()
        self.chunk = chunk_size(self.limits.max_chunk or self.limits.max_payload)
        self.store = FileStore(data_dir)
        self._groups: dict[str, GroupInfo] = {}
        self._friends: dict[str, frozenset[str]] = {}  # account -> its friends (moments' images)
        self._uploads: dict[str, _Upload] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._sweeper = threading.Thread(target=self._sweep_loop, name="files-sweep", daemon=True)

    # ---------------------------------------------------------------- lifecycle

    def state_filters(self) -> list[str]:
        t = self.topics
        return [t.group_info_filter(), t.friends_filter(), t.upload_filter(), t.fetch_filter()]

    def recoverable_filters(self) -> list[str]:
        # the group worker's retained records: a change while away comes back with the renewed subscription,
        # and a record cleared meanwhile is missed at QoS 1 as well (a clean session: its consumers go with
        # it). The chunks and acknowledgements are a transfer, not state: they stay at QoS 1
        return [self.topics.group_info_filter(), self.topics.friends_filter()]

    def started(self) -> None:
        self.sweep()
        self._sweeper.start()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._sweeper.is_alive():
            self._sweeper.join(5)
        with self.lock:
            for upload in self._uploads.values():
                upload.out.close()
            for stream in self._streams.values():
                stream.source.close()
            self._uploads.clear()
            self._streams.clear()
        self.store.close()

    def _sweep_loop(self) -> None:
        while not self.stopping.wait(30):
            self.sweep()

    def sweep(self) -> None:
        """Remove uploads abandoned for a day, stray partial files and idle downloads."""
        with self.lock:
            for upload in self.store.abandoned(self.clock() - ABANDONED):
                active = self._uploads.pop(upload, None)
                if active is not None:
                    active.out.close()
                self.store.drop_upload(upload)
                log.info("files: an upload abandoned for a day was removed")
            for path in self.store.stray_partials():
                path.unlink(missing_ok=True)
            idle = time.monotonic() - STREAM_IDLE
            for key, stream in list(self._streams.items()):
                if stream.touched < idle:
                    stream.source.close()
                    del self._streams[key]

    # ---------------------------------------------------------------- state and chunks (paho's thread)

    def on_state(self, topic: Topic, payload: bytes) -> None:
        if topic.kind is TopicKind.GROUP_INFO and topic.name:
            if not payload:
                self._groups.pop(topic.name, None)
                return
            info = decode_as(payload, GroupInfo)
            if info.name == topic.name:
                self._groups[info.name] = info
        elif topic.kind is TopicKind.FRIENDS and topic.owner:
            record = decode_as(payload, Friends) if payload else None
            if record is None:
                self._friends.pop(topic.owner, None)
            elif record.account == topic.owner:
                self._friends[record.account] = frozenset(record.friends)
        elif topic.kind is TopicKind.UPLOAD and topic.sender and topic.key:
            lower_this_thread()  # paho's thread moves files' bytes from now on (imcli.core.bulk): chat goes first
            self._on_chunk(topic.sender, topic.key, payload)
        elif topic.kind is TopicKind.FETCH and topic.sender and topic.key:
            lower_this_thread()
            self._on_ack(topic.sender, topic.key, payload)

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if isinstance(request, FileOffer):
            return self._offer(sender, request)
        if isinstance(request, FileGet):
            return self._get(sender, request)
        if isinstance(request, FileListRequest):
            return self._list(sender, request)
        if isinstance(request, FileDelete):
            return self._delete(sender, request)
        return None

    # ---------------------------------------------------------------- uploads

    def _offer(self, sender: str, r: FileOffer) -> WireModel:
        conv = self._conversation(sender, r.id, r.room, r.user, r.group, r.moments, sending=True)
        if isinstance(conv, ErrorReply):
            return conv
        if "/" in r.name or "\\" in r.name or not is_plain(r.name) or r.name in (".", ".."):
            return ErrorReply(
                id=r.id,
                code="invalid",
                text=f"invalid file name {r.name!r}",
                hint="name it without control characters, '/' or '\\' (imcli send does that itself)",
            )
        if r.size > self.limits.max_file:
            return ErrorReply(
                id=r.id,
                code="denied",
                text=f"{r.name} is {human_size(r.size)}: the largest file this server takes is "
                f"{human_size(self.limits.max_file)}",
            )
        done = self.store.sent_before(sender, r.sha256, conv, r.name)
        if done is not None:  # the same send again (its chat message may not have gone out)
            return FileReady(id=r.id, file=self._info(done, sender))
        row = self.store.pending(sender, r.sha256, r.size, conv)
        if row is None:
            refusal = self._admission(sender, r)
            if refusal is not None:
                return refusal
            now = self.clock()
            row = UploadRow(unguessable_id(24), sender, r.sha256, r.size, r.name, conv, now, now)
            try:
                self.store.begin(row)
            except (OSError, sqlite3.Error) as exc:
                log.warning("files: cannot begin an upload: %s", exc)
                return ErrorReply(id=r.id, code="internal", text="the files worker cannot store anything now")
        elif row.name != r.name:
            self.store.rename_upload(row.upload, r.name)
            row = UploadRow(row.upload, row.sender, row.sha256, row.size, r.name, row.conv, row.started, row.touched)
        active = self._active(row)
        if active is None:
            return ErrorReply(id=r.id, code="internal", text="the files worker cannot read its copy of this upload")
        active.touched = self.clock()
        self.store.touch(row.upload, active.touched)
        active.told = active.offset
        window = self._window()
        active.every = max(1, min(PROGRESS_EVERY, window // 2))
        active.seen = time.monotonic()
        return FileUpload(id=r.id, upload=row.upload, offset=active.offset, chunk=self.chunk, window=window)

    def _window(self) -> int:
        """An upload's window: ``WINDOW``, or its share of ``FileLimits.in_flight`` among the uploads
        going on (one chunk at least), so that many at once do not pass the broker's output bound."""
        recent = time.monotonic() - ACTIVE
        going = 1 + sum(1 for u in self._uploads.values() if u.seen >= recent)
        return max(self.chunk, min(WINDOW, self.limits.in_flight // going))

    def _admission(self, sender: str, r: FileOffer) -> ErrorReply | None:
        """Why a new upload is refused, in words for the sender, if it is."""
        recent = self.clock() - IN_FLIGHT
        going = [u for u in self.store.uploads_of(sender) if u.touched >= recent]
        if len(going) >= self.limits.max_uploads:
            return ErrorReply(
                id=r.id,
                code="denied",
                text=f"you have {len(going)} uploads in flight, the most this server allows at once: "
                "wait for one to finish (or send one of them again to finish it)",
            )
        used = self.store.used(sender)
        if used + r.size > self.limits.quota and not self.store.holds(sender, r.sha256):
            return ErrorReply(
                id=r.id,
                code="denied",
                text=f"storing {r.name} ({human_size(r.size)}) would pass your quota of "
                f"{human_size(self.limits.quota)} ({human_size(used)} used)",
            )
        try:
            free = shutil.disk_usage(self.store.root).free
        except OSError:
            free = 0
        if free < r.size + DISK_MARGIN:
            return ErrorReply(id=r.id, code="internal", text="the server's disk is full")
        return None

    def _active(self, row: UploadRow) -> _Upload | None:
        """The open state of an upload, read back from its partial file after a restart."""
        active = self._uploads.get(row.upload)
        if active is not None:
            return active
        path = self.store.partial_path(row.upload)
        try:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            offset = path.stat().st_size
            out = path.open("ab") if offset <= row.size else None
        except OSError as exc:
            log.warning("files: dropping upload with an unusable partial file: %s", exc)
            out = None
        if out is None:
            self.store.drop_upload(row.upload)
            return None
        active = self._uploads[row.upload] = _Upload(row, out, digest, offset, offset)
        return active

    def _on_chunk(self, sender: str, upload: str, payload: bytes) -> None:
        active = self._uploads.get(upload)
        if active is None:
            row = self.store.upload(upload)
            if row is None or row.sender != sender:
                return  # not an upload of this sender: nothing to say to anyone
            active = self._active(row)
            if active is None:
                return
        if active.row.sender != sender:
            return
        try:
            offset, data = unchunk(payload)
        except ValueError:
            return
        if offset != active.offset:
            if offset > active.offset:  # a gap: say where to go on from
                self._progress(active)
            return  # else a duplicate (QoS 1), or chunks sent before a resume
        if not data or active.offset + len(data) > active.row.size:
            self._abort(active, "invalid", "more bytes than the file's size were sent: send it again")
            return
        try:
            active.out.write(data)
        except OSError as exc:
            self._stall(active, exc)
            return
        active.digest.update(data)
        active.offset += len(data)
        active.seen = time.monotonic()
        if active.offset == active.row.size:
            self._complete(active)
        elif active.offset - active.told >= active.every:
            self._progress(active)

    def _progress(self, active: _Upload) -> None:
        active.told = active.offset
        now = self.clock()
        if now - active.touched >= TOUCH_EVERY:
            active.touched = now
            self.store.touch(active.row.upload, now)
        reply = FileProgress(upload=active.row.upload, offset=active.offset)
        self.publish(self.topics.reply(active.row.sender, active.row.upload), encode(reply))

    def _tell_error(self, row: UploadRow, code: ErrorCode, text: str) -> None:
        reply = ErrorReply(id=row.upload, code=code, text=text)
        self.publish(self.topics.reply(row.sender, row.upload), encode(reply))

    def _abort(self, active: _Upload, code: ErrorCode, text: str) -> None:
        active.out.close()
        self._uploads.pop(active.row.upload, None)
        self.store.drop_upload(active.row.upload)
        self._tell_error(active.row, code, text)

    def _stall(self, active: _Upload, exc: OSError) -> None:
        """Writing failed (a full disk): keep what is stored, so that the sender can resume later."""
        log.warning("files: cannot write an upload: %s", exc)
        self._uploads.pop(active.row.upload, None)
        with contextlib.suppress(OSError):
            active.out.close()
        with contextlib.suppress(OSError):
            os.truncate(self.store.partial_path(active.row.upload), active.offset)
        self._tell_error(active.row, "internal", "the server's disk is full")

    def _complete(self, active: _Upload) -> None:
        row = active.row
        try:
            active.out.flush()
            os.fsync(active.out.fileno())
        except OSError as exc:
            self._stall(active, exc)
            return
        active.out.close()
        self._uploads.pop(row.upload, None)
        if active.digest.hexdigest() != row.sha256:
            self.store.drop_upload(row.upload)
            self._tell_error(row, "invalid", f"the bytes received do not match the sha256 of {row.name}: send it again")
            return
        try:
            facts = examine(self.store.partial_path(row.upload))
            stored = StoredFile(
                unguessable_id(18), row.sha256, row.size, row.name, facts.mime, row.sender, row.conv,
                self.clock(), facts.width, facts.height, facts.thumb,
            )  # fmt: skip
            self.store.finish(row, stored)
        except (OSError, sqlite3.Error) as exc:
            log.warning("files: cannot store a finished upload: %s", exc)
            self._tell_error(row, "internal", "the server's disk is full")
            return
        log.info("files: stored %s bytes from %s", row.size, row.sender)
        ready = FileReady(id=row.upload, file=self._info(stored, row.sender))
        self.publish(self.topics.reply(row.sender, row.upload), encode(ready))

    # ---------------------------------------------------------------- downloads

    def _get(self, sender: str, r: FileGet) -> WireModel:
        stored = self.store.file(r.file) if FILE_ID.fullmatch(r.file) else None
        if stored is None or not self._may_read(sender, stored):
            return ErrorReply(id=r.id, code="not_found", text=f"no file {r.file} (or you may not fetch it)")
        if r.offset > stored.size:
            return ErrorReply(id=r.id, code="invalid", text=f"offset {r.offset} is past the end of the file")
        try:
            source = self.store.blob_path(stored.sha256).open("rb")
        except OSError as exc:
            log.warning("files: cannot read a stored file: %s", exc)
            return ErrorReply(id=r.id, code="internal", text="the files worker cannot read that file now")
        mine = sorted((s.touched, k) for k, s in self._streams.items() if s.owner == sender)
        for _, key in mine[: max(0, len(mine) - STREAMS_PER_USER + 1)]:
            self._streams.pop(key).source.close()
        old = self._streams.pop((sender, r.stream), None)
        if old is not None:
            old.source.close()
        self._streams[sender, r.stream] = _Stream(sender, stored, source, r.offset, r.offset)
        return FileReady(id=r.id, file=self._info(stored, sender))

    def _on_ack(self, sender: str, key: str, payload: bytes) -> None:
        stream = self._streams.get((sender, key))
        if stream is None:
            return
        try:
            ack = decode_as(payload, FileAck)
        except MalformedPayload:
            return
        if not self._may_read(sender, stream.file):  # removed from the group meanwhile
            self._streams.pop((sender, key)).source.close()
            return
        stream.touched = time.monotonic()
        size = stream.file.size
        # a receiver resuming from its .part says so with its first acknowledgement: it skips bytes, nothing more
        stream.acked = max(stream.acked, min(ack.offset, size))
        stream.sent = max(stream.sent, stream.acked)
        topic = self.topics.file_data(sender, key)
        stream.source.seek(stream.sent)
        while stream.sent < size and stream.sent - stream.acked < WINDOW:
            data = stream.source.read(min(self.chunk, size - stream.sent))
            if not data:
                break
            self.publish(topic, chunk(stream.sent, data))
            stream.sent += len(data)
        if stream.acked >= size:
            self._streams.pop((sender, key)).source.close()

    def _delete(self, sender: str, r: FileDelete) -> WireModel:
        """Only the file's sender deletes it; an id of anyone else's answers as an unknown one. Downloads
        already going on finish (they hold the blob open)."""
        stored = self.store.file(r.file) if FILE_ID.fullmatch(r.file) else None
        if stored is None or stored.sender != sender:
            return ErrorReply(id=r.id, code="not_found", text=f"no file {r.file} of yours")
        try:
            content = self.store.delete(stored.id)
        except (OSError, sqlite3.Error) as exc:
            log.warning("files: cannot delete a file: %s", exc)
            return ErrorReply(id=r.id, code="internal", text="the files worker cannot delete anything now")
        log.info("files: %s deleted a file (%s)", sender, "content removed" if content else "content kept")
        return FileDeleted(id=r.id, file=stored.id, name=stored.name, content=content)

    # ---------------------------------------------------------------- listing

    def _list(self, sender: str, r: FileListRequest) -> WireModel:
        targets = [t for t in (r.room, r.user, r.group, r.moments) if t is not None]
        if not targets:
            mine = {g.name: g for g in self._groups.values() if sender in g.members}
            files = self.store.listing([group_conversation(g) for g in mine], r.limit, rooms=True, party=sender)
        else:
            conv = self._conversation(sender, r.id, r.room, r.user, r.group, r.moments, sending=False)
            if isinstance(conv, ErrorReply):
                return conv
            files = self.store.listing([conv], r.limit)
        shown = [self._info(f, sender).model_copy(update={"thumb": None}) for f in files if self._may_read(sender, f)]
        listing = FileListing(id=r.id, files=shown, more=len(files) >= r.limit)
        while len(encode(listing)) > self.limits.max_payload and listing.files:  # newest kept
            cut = max(1, len(listing.files) // 4)
            listing = FileListing(id=r.id, files=listing.files[cut:], more=True)
        return listing

    # ---------------------------------------------------------------- rules

    def _conversation(
        self,
        sender: str,
        rid: str,
        room: str | None,
        user: str | None,
        group: str | None,
        moments: str | None,
        *,
        sending: bool,
    ) -> str | ErrorReply:
        targets = [t for t in (room, user, group, moments) if t is not None]
        if len(targets) != 1:
            return ErrorReply(id=rid, code="invalid", text="name one room, person, group or moments")
        if not is_name(targets[0]):
            return ErrorReply(id=rid, code="invalid", text=f"invalid name {targets[0]!r}")
        if moments is not None:
            if sending and moments != sender:
                return ErrorReply(id=rid, code="denied", text="you can add images to your own moments only")
            if not self._sees_moments(moments, sender):
                return ErrorReply(
                    id=rid,
                    code="denied",
                    text=f"you can see the moments of your friends only, and {moments} is not one",
                )
            return moments_conversation(moments)
        if room is not None:
            return room_conversation(room)
        if user is not None:
            if user in RESERVED_NAMES:
                return ErrorReply(id=rid, code="not_found", text=f"unknown user {user!r}")
            return dm_conversation(sender, user)
        assert group is not None
        info = self._groups.get(group)
        if info is None or (sender not in info.members and info.private):
            return ErrorReply(id=rid, code="not_found", text=missing_group(group))
        if sender not in info.members:
            verb = "send files to" if sending else "see the files of"
            return ErrorReply(id=rid, code="denied", text=f"you are not a member of #{group}: you cannot {verb} it")
        return group_conversation(group)

    def _may_read(self, user: str, f: StoredFile) -> bool:
        kind, _, place = f.conv.partition(":")
        if kind == "room":
            return True
        if kind == "dm":
            return user in place.split("|")
        if kind == "moments":
            return self._sees_moments(place, user)
        info = self._groups.get(place)
        return info is not None and user in info.members and f.at >= group_history_start(info.created)

    def _sees_moments(self, author: str, viewer: str) -> bool:
        """The moments worker's rule for posts, on the same retained friends records."""
        return moment_visible(author, viewer, self._friends.get(author, ()))

    def _info(self, f: StoredFile, viewer: str) -> FileInfo:
        kind, _, place = f.conv.partition(":")
        if kind == "dm":
            a, _, b = place.partition("|")
            shown = "@" + (b if a == viewer else a)
        elif kind == "moments":
            shown = f"moments of {place}"
        else:
            shown = ("#" if kind == "group" else "") + place
        return FileInfo(
            id=f.id, name=f.name, size=f.size, mime=f.mime, sha256=f.sha256, sender=f.sender, place=shown,
            ts=f.at, width=f.width, height=f.height, thumb=f.thumb,
        )  # fmt: skip
