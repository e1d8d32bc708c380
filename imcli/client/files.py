"""Files (issue 16) from the client's side: send one to a conversation, fetch one, list them.

Everything streams: a file is read and written a chunk at a time, hashed as it goes, and
never held in memory whole. An upload offers the file (name, size, sha256) to the files
worker, publishes the chunks at most a window ahead of the worker's last ``file_progress``,
and ends with its ``file_ready``; then the file message goes to the conversation like any
chat message. Sending the same file again to the same place resumes an upload that stopped
(the worker kept what it had), and a download resumes from its ``.part`` file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imcli.client.identity import Identity, max_payload_bytes
from imcli.client.services import Connection, Conversation, check_can_dm, check_member, expect, resolve
from imcli.core.bulk import lower_this_thread, run_lowered
from imcli.core.errors import ImcliError, InvalidInput, NameTaken, NotAllowed, NotFound, RateLimited, RequestTimeout
from imcli.core.mqtt import Message
from imcli.core.request_reply import dropped, rate_limited, rate_notice
from imcli.core.text import human_size, plain_file_name, quoted
from imcli.core.topics import chunk, is_id, unchunk
from imcli.core.wire import (
    ChatMessage,
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
    MalformedPayload,
    Notice,
    Payload,
    TopicKind,
    decode,
    encode,
    new_id,
)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)

STALL = 15.0  # seconds without a word from the files worker before an upload asks again where it stands
RETRIES = 3  # times an upload asks again before it gives up (the next run resumes)
ACK_EVERY = 1 << 20  # bytes between two acknowledgements of a download: half the worker's window (2 MiB)
BLOCK = 1 << 20
INFLIGHT = 128  # chunks unacknowledged by the broker: a window (1 MiB) of 16 KiB chunks is 64
LARGEST_CHUNK = 4 << 20  # bytes: the most a chunk the files worker asks for may hold (a bound on memory)
# the embedded broker's file-transfer rate dropped a chunk or an acknowledgement (its rate notice):
# a transfer waits as the notice says and goes on, this many times at most and only for waits this short;
# else it fails at once with the notice's retry time (the same command resumes)
RATE_PAUSES = 30
RATE_PAUSE_MAX = 5.0  # seconds

_ERRORS: dict[str, type[ImcliError]] = {"not_found": NotFound, "taken": NameTaken, "invalid": InvalidInput}


def _refused(reply: ErrorReply) -> ImcliError:
    if reply.code == "denied":
        return NotAllowed(reply.text, "see the limits of this server with its operator, or send something smaller")
    if reply.code == "internal":
        return ImcliError(reply.text, "nothing stored was lost; try again later")
    return _ERRORS.get(reply.code, ImcliError)(reply.text, "see your files with 'imcli files'")


def check_file(path: Path) -> int:
    """The size of a file that can be sent; ``InvalidInput`` (one line) for anything else."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInput(f"no file {quoted(str(path))}", "check the path") from None
    except OSError as exc:
        raise InvalidInput(
            f"cannot read {quoted(str(path))}: {exc.strerror}", "check the path and its permissions"
        ) from exc
    if path.is_dir():
        raise InvalidInput(
            f"{quoted(str(path))} is a directory", "send the files in it one by one, or an archive of it"
        )
    if not path.is_file():
        raise InvalidInput(f"{quoted(str(path))} is not a regular file", "send a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"cannot read {quoted(str(path))}: permission denied", "check its permissions")
    if st.st_size == 0:
        raise InvalidInput(f"{quoted(str(path))} is empty", "there is nothing to send")
    return st.st_size


def sha256_of(path: Path, limit: int | None = None) -> hashlib._Hash:
    """The sha256 of a file (of its first ``limit`` bytes), read a block at a time."""
    digest = hashlib.sha256()
    left = limit
    with path.open("rb") as f:
        while left is None or left > 0:
            block = f.read(BLOCK if left is None else min(BLOCK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest


def describe(info: FileInfo) -> str:
    """A file in words, for the ``text`` of its message and for people."""
    extra = f", {info.width}x{info.height}" if info.width and info.height else ""
    return f"sent a file: {info.name} ({human_size(info.size)}, {info.mime}{extra}) - imcli get {info.id}"


def file_message(info: FileInfo, max_payload: int) -> ChatMessage:
    """The chat message of a stored file, its thumbnail left out if the message would be too large."""
    carried = info.model_copy(update={"sender": None, "place": None, "ts": None})
    message = ChatMessage(text=describe(info), file=carried)
    if len(encode(message)) > max_payload:
        message = ChatMessage(text=describe(info), file=carried.model_copy(update={"thumb": None}))
    return message


@dataclass(frozen=True)
class Fetched:
    file: FileInfo
    path: Path


def check_file_id(file_id: str) -> None:
    """A file id as the files worker makes them (letters, digits, ``-`` and ``_``), before it is asked:
    an empty or mistyped one is told as such, not as a file that does not exist."""
    if not is_id(file_id):
        raise InvalidInput(
            f"invalid file id {quoted(file_id)}", "'imcli files' lists the ids of the files you may read"
        )


class FileConnection(Connection):
    """One connection for file work: requests (``services.Connection``), an upload's progress and a
    download's chunks, each routed to the box of its upload id or stream."""

    def __init__(self, identity: Identity, purpose: str = "file") -> None:
        super().__init__(identity, purpose)
        self.identity = identity
        self.topics = identity.topics
        self.me = identity.account
        # upload id or stream -> what arrives for it (and the broker's rate notice about it)
        self._boxes: dict[str, queue.Queue[Message | Notice]] = {}
        self._lock = threading.Lock()
        self._client.max_inflight = INFLIGHT

    def __enter__(self) -> FileConnection:
        super().__enter__()
        return self

    def _filters(self) -> list[str]:
        return [self.topics.reply_filter(self.me), self.topics.file_data_filter(self.me)]

    def _route(self, message: Message) -> None:  # paho's thread
        notice = rate_notice(message.payload) if message.topic == self.requests.notice_topic else None
        if notice is not None:  # a chunk or an acknowledgement dropped: its transfer hears it
            keys = dropped(self.topics, self.me, notice, TopicKind.UPLOAD, TopicKind.FETCH)
            with self._lock:
                boxes = [box for key in keys if (box := self._boxes.get(key)) is not None]
            for box in boxes:
                box.put(notice)
        parsed = self.topics.parse(message.topic)
        if parsed is not None and parsed.key and parsed.kind in (TopicKind.REPLY, TopicKind.FILE_DATA):
            with self._lock:
                box = self._boxes.get(parsed.key)
            if box is not None:
                lower_this_thread()  # this thread moves a file's bytes (imcli.core.bulk): chat goes first
                box.put(message)
                return
        self.requests.deliver(message)

    def _box(self, key: str) -> queue.Queue[Message | Notice]:
        box: queue.Queue[Message | Notice] = queue.Queue()
        with self._lock:
            self._boxes[key] = box
        return box

    def _drop_box(self, key: str) -> None:
        with self._lock:
            self._boxes.pop(key, None)

    # ---------------------------------------------------------------- sending

    def target(self, where: Conversation) -> dict[str, str]:
        """The offer's target, checked as ``dm`` and ``group say`` check (the broker drops silently)."""
        if where.kind == "dm":
            to = resolve(self, where.name)
            check_can_dm(self, to)
            return {"user": to}
        if where.kind == "group":
            check_member(self, where.name, self.me)
            return {"group": where.name}
        return {"room": where.name}

    def upload(self, path: Path, target: dict[str, str], progress: Progress | None = None) -> FileInfo:
        """Store ``path`` with the files worker (resuming an earlier attempt); the stored file.

        The hashing and the chunks run in a thread at bulk priority (``imcli.core.bulk``)."""
        return run_lowered(lambda: self._upload(path, target, progress))

    def _upload(self, path: Path, target: dict[str, str], progress: Progress | None) -> FileInfo:
        size = check_file(path)
        sha = sha256_of(path).hexdigest()
        offer = FileOffer(name=plain_file_name(path.name), size=size, sha256=sha, **target)
        answered = False
        attempt = pauses = 0
        while attempt <= RETRIES:
            try:
                reply = self.ask(offer)
            except RequestTimeout:
                if not answered and attempt >= 1:
                    raise  # no worker answered twice: there is none (or it is down)
                attempt += 1
                continue  # asked again: the worker may be reconnecting (the broker closed it: others' uploads)
            answered = True
            if isinstance(reply, FileReady):
                if progress:
                    progress(size, size)
                return reply.file
            if isinstance(reply, ErrorReply):
                raise _refused(reply)
            start = expect(reply, FileUpload)
            try:
                done = self._send_chunks(path, size, start, progress)
            except RateLimited as exc:  # the broker dropped chunks: offer again, from the worker's copy
                pauses = _pause(exc, pauses)
                continue
            if done is not None:
                return done
            attempt += 1
        raise RequestTimeout(
            "the files worker stopped answering during the upload",
            "run the same command again: it goes on where the worker's copy stopped",
        )

    def _send_chunks(self, path: Path, size: int, start: FileUpload, progress: Progress | None) -> FileInfo | None:
        """Chunks from ``start.offset`` until the worker's ``file_ready``; ``None`` if it went quiet."""
        box = self._box(start.upload)
        topic = self.topics.upload(self.me, start.upload)
        step = max(1, min(start.chunk, LARGEST_CHUNK))  # the broker's limit on upload topics, as the worker knows it
        sent = acked = start.offset
        try:
            with path.open("rb") as f:
                f.seek(sent)
                while True:
                    while sent < size and sent - acked < start.window:
                        data = f.read(min(step, size - sent))
                        if not data:
                            raise InvalidInput(f"{path} became shorter while it was sent", "send it again")
                        self._client.publish_nowait(topic, chunk(sent, data), qos=1)
                        sent += len(data)
                    reply = self._upload_news(box)
                    if reply is None:
                        return None
                    if isinstance(reply, FileProgress):
                        if reply.offset < acked:
                            return None  # the worker lost chunks (it restarted): offer again, from its copy
                        acked = reply.offset
                        if progress:
                            progress(acked, size)
                    elif isinstance(reply, FileReady):
                        if progress:
                            progress(size, size)
                        return reply.file
                    elif isinstance(reply, ErrorReply):
                        raise _refused(reply)
        finally:
            self._drop_box(start.upload)

    def _upload_news(self, box: queue.Queue[Message | Notice]) -> Payload | None:
        """What the files worker said next about an upload (a malformed message is skipped);
        ``None`` after ``STALL`` seconds of silence; ``RateLimited`` if the broker dropped chunks
        for the file-transfer rate (its notice)."""
        while True:
            try:
                message = box.get(timeout=STALL)
            except queue.Empty:
                return None
            if isinstance(message, Notice):
                raise rate_limited(self.me, message.retry, transfer=True)
            with contextlib.suppress(MalformedPayload):
                return decode(message.payload)

    def post(self, where: Conversation, target: dict[str, str], info: FileInfo) -> None:
        """The file's message, to the conversation: it travels, is archived and queued like chat."""
        t, me = self.topics, self.me
        topic = t.dm(target["user"], me) if "user" in target else t.group_msg(where.name, me)
        if where.kind == "room":
            topic = t.room(where.name, me)
        self.publish(topic, encode(file_message(info, max_payload_bytes())))

    # ---------------------------------------------------------------- fetching

    def download(self, file_id: str, output: Path | None, *, force: bool, progress: Progress | None = None) -> Fetched:
        """Fetch a file to ``output`` (a file, or a directory), resuming a ``.part`` left before; the
        writing and hashing run in a thread at bulk priority (``imcli.core.bulk``)."""
        check_file_id(file_id)
        return run_lowered(lambda: self._download(file_id, output, force, progress))

    def _download(self, file_id: str, output: Path | None, force: bool, progress: Progress | None) -> Fetched:
        stream = new_id()
        box = self._box(stream)
        try:
            head = self.ask(FileGet(file=file_id, stream=stream, offset=0))
            if isinstance(head, ErrorReply):
                raise _refused(head)
            info = expect(head, FileReady).file
            dest = _destination(output, info)
            _check_overwrite(dest, force)
            part = dest.with_name(f".{dest.name}.{info.id}.part")
            have = part.stat().st_size if part.exists() else 0
            if have > info.size:
                part.unlink()
                have = 0
            digest = sha256_of(part, have) if have else hashlib.sha256()
            self._receive(stream, box, part, have, digest, info, progress)
            if digest.hexdigest() != info.sha256:
                part.unlink(missing_ok=True)
                raise ImcliError(f"{info.name} arrived damaged (its sha256 does not match)", "run the command again")
            _check_overwrite(dest, force)
            os.replace(part, dest)
            return Fetched(info, dest)
        finally:
            self._drop_box(stream)

    def _receive(
        self,
        stream: str,
        box: queue.Queue[Message | Notice],
        part: Path,
        have: int,
        digest: hashlib._Hash,
        info: FileInfo,
        progress: Progress | None,
    ) -> None:
        ack_topic = self.topics.fetch(self.me, stream)
        if progress:
            progress(have, info.size)
        try:
            out = part.open("ab")
        except OSError as exc:
            raise InvalidInput(f"cannot write {part.parent}: {exc.strerror}", "give -o a writable place") from exc
        with out:
            self._client.publish_nowait(ack_topic, encode(FileAck(offset=have)), qos=1)
            told = have
            pauses = 0
            while have < info.size:
                try:
                    message = box.get(timeout=STALL)
                except queue.Empty:
                    raise RequestTimeout(
                        "the download stopped", "run the same command again: it goes on where it stopped"
                    ) from None
                if isinstance(message, Notice):  # an acknowledgement was dropped: wait, and send it again
                    pauses = _pause(rate_limited(self.me, message.retry, transfer=True), pauses)
                    self._client.publish_nowait(ack_topic, encode(FileAck(offset=have)), qos=1)
                    continue
                with contextlib.suppress(ValueError):
                    offset, data = unchunk(message.payload)
                    if offset != have or not data or have + len(data) > info.size:
                        continue  # a duplicate (QoS 1)
                    try:
                        out.write(data)
                    except OSError as exc:
                        raise ImcliError(
                            f"cannot write {part}: {exc.strerror}", "free some space and run it again"
                        ) from exc
                    digest.update(data)
                    have += len(data)
                    if have - told >= ACK_EVERY or have == info.size:
                        self._client.publish_nowait(ack_topic, encode(FileAck(offset=have)), qos=1)
                        told = have
                        if progress:
                            progress(have, info.size)
            out.flush()
            os.fsync(out.fileno())

    def delete(self, file_id: str) -> FileDeleted:
        """Delete a file I sent (``NotFound`` for any other id)."""
        check_file_id(file_id)
        reply = self.ask(FileDelete(file=file_id))
        if isinstance(reply, ErrorReply):
            raise _refused(reply)
        return expect(reply, FileDeleted)

    # ---------------------------------------------------------------- listing

    def listing(self, where: Conversation | None, limit: int = 100) -> tuple[list[FileInfo], bool]:
        """The files I may fetch, oldest first, and whether older ones were left out."""
        target: dict[str, str] = {}
        if where is not None:
            target = {"user": resolve(self, where.name)} if where.kind == "dm" else {where.kind: where.name}
        reply = self.ask(FileListRequest(limit=limit, **target))
        if isinstance(reply, ErrorReply):
            raise _refused(reply)
        listing = expect(reply, FileListing)
        return listing.files, listing.more


def _pause(dropped_for: RateLimited, pauses: int) -> int:
    """Wait as the broker's file-transfer rate notice says, and count it; raise ``dropped_for``
    (the error naming the file transfer rate) past ``RATE_PAUSES``, or when the wait is long.

    At least a second: the broker sends an account one such notice a second at most, so a
    transfer that went on sooner could have its next chunks dropped untold (and wait ``STALL``)."""
    wait = dropped_for.retry if dropped_for.retry is not None else 1.0
    if pauses >= RATE_PAUSES or wait > RATE_PAUSE_MAX:
        raise dropped_for
    time.sleep(max(wait, 1.0))
    return pauses + 1


def _check_overwrite(dest: Path, force: bool) -> None:
    """Whether a download may be named ``dest``: nothing there, or (``force``) a regular file or a
    link, which ``os.replace`` replaces without following. Anything else stays as it is, ``--force``
    or not: ``-o /dev/null --force`` run as root put a regular file where the device was."""
    try:
        mode = dest.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InvalidInput(f"cannot write {dest}: {exc.strerror}", "give -o a writable place") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise InvalidInput(f"{dest} is not a regular file", "give -o a file or a directory")
    if not force:
        raise InvalidInput(f"{dest} exists", "give --force to overwrite it, or -o another path")


def local_name(info: FileInfo) -> str:
    """The name a fetched file gets on this disk: ``plain_file_name`` of the one it was sent under. The
    files worker refuses any other name, but a file message is anyone's payload (``/open`` takes its name
    from one): ``..``, ``../x``, a control, an escape sequence or a bidi override never reach a path, and
    never a name that ``ls`` or a shell prompt would print raw."""
    return plain_file_name(info.name)


def _destination(output: Path | None, info: FileInfo) -> Path:
    """Where a download goes, as the user gave it (``imcli get`` says it so): the file's name here
    (relative, as ``-o .`` says it), in the directory ``output``, or ``output`` itself."""
    name = local_name(info)
    if output is None:
        return Path(name)
    output = output.expanduser()
    return output / name if output.is_dir() else output
