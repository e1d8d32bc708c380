"""Files in ``imcli chat`` (issue 16): ``/send PATH``, ``/get N``, ``/open N``, the one line an
incoming file shows as, and the inline preview of an image's thumbnail.

Each file shown in the chat gets a number for ``/get`` and ``/open``. Transfers run on their own
connection (``imcli.client.files.FileConnection``) in a thread, so the prompt stays usable; what
they have to say arrives as notes through ``ChatFiles.emit``. The preview draws the thumbnail
that travelled in the message (never the file) with textual-image: Sixel or the Kitty graphics
protocol where the terminal answers for them, coloured half-blocks elsewhere.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imcli.cli.chat_commands import ChatSession, Note, Output, args, command
from imcli.cli.common import local_path
from imcli.client.config import config_dir
from imcli.core.errors import ImcliError, InvalidInput
from imcli.core.text import human_size
from imcli.core.thumbnail import MAX_SIDE

if TYPE_CHECKING:
    from imcli.core.wire import FileInfo, Received

PREVIEW_CELLS = 24  # columns of an inline preview
# the files worker's thumbnails are JPEGs of at most 160 pixels a side (imcli/files/images.py, THUMB_SIDE);
# a file message is anyone's payload, and 9,000 characters of base64 hold a PNG of 7000 x 7000 one-bit
# pixels, which drawing took 142 MB and 0.37 s of CPU for, in every chat that showed it: the wire model
# refuses such a thumbnail (imcli.core.thumbnail), and drawing checks again what Pillow read
PREVIEW_MAX_SIDE = MAX_SIDE


class ChatFiles:
    """The files one chat session has shown, by number, and the transfers it started."""

    def __init__(self) -> None:
        self.shown: list[FileInfo] = []
        self.emit: Callable[[list[Output]], None] = lambda _outputs: None  # set by the view
        self._lock = threading.Lock()

    def number(self, info: FileInfo) -> int:
        with self._lock:
            for i, known in enumerate(self.shown, 1):
                if known.id == info.id:
                    return i
            self.shown.append(info)
            return len(self.shown)

    def get(self, n: str) -> FileInfo:
        with self._lock:
            if not (n.isascii() and n.isdigit()) or not 1 <= int(n) <= len(self.shown):
                count = len(self.shown)
                raise InvalidInput(f"no file {n} here", f"files are numbered 1 to {count}" if count else "none yet")
            return self.shown[int(n) - 1]


def file_text(item: Received, n: int) -> str:
    """The one line of a file message: what, how big, for images the dimensions, its number."""
    info = item.file
    assert info is not None
    size = f"{info.width}x{info.height}, " if info.width and info.height else ""
    return f"sent {info.name} ({size}{human_size(info.size)}) · /get {n} · /open {n}"


def files_of(chat: ChatSession) -> ChatFiles:
    files: ChatFiles | None = getattr(chat, "files", None)
    if files is None:
        raise InvalidInput("files are not available here", "use imcli send and imcli get")
    return files


def _background(chat: ChatSession, work: Callable[[], list[Output]]) -> None:
    files = files_of(chat)

    def run() -> None:
        try:
            files.emit(work())
        except ImcliError as exc:
            files.emit([Note(str(exc), "error")])

    threading.Thread(target=run, name="imcli-chat-file", daemon=True).start()


@command("/send PATH", "send a file or image here (Tab completes the path)")
def _send(chat: ChatSession, rest: str) -> list[Output]:
    from imcli.client.files import FileConnection, check_file

    if not rest:
        raise InvalidInput("missing argument", "usage: /send PATH")
    path = local_path(rest)
    size = check_file(path)
    where = chat.here
    identity = getattr(chat, "identity")  # noqa: B009 - the session's, not in the command protocol

    def work() -> list[Output]:
        with FileConnection(identity, "send") as connection:
            target = connection.target(where)
            info = connection.upload(path, target)
            connection.post(where, target, info)
        return [Note(f"sent {path.name} ({human_size(info.size)}) to {where}", "dim")]

    _background(chat, work)
    return [Note(f"sending {path.name} ({human_size(size)}) to {where}…", "dim")]


@command("/get N [PATH]", "download file N (default: into this directory)")
def _get(chat: ChatSession, rest: str) -> list[Output]:
    words = args(rest, "/get N [PATH]", 1, 2)
    info = files_of(chat).get(words[0])
    output = local_path(words[1]) if len(words) > 1 else None
    _background(chat, lambda: [Note(f"saved {_fetch(chat, info, output, force=False)}", "dim")])
    return [Note(f"fetching {info.name} ({human_size(info.size)})…", "dim")]


@command("/open N", "download file N and open it with the desktop's viewer")
def _open(chat: ChatSession, rest: str) -> list[Output]:
    (n,) = args(rest, "/open N", 1, 1)
    info = files_of(chat).get(n)
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener) is None:
        raise InvalidInput(f"cannot open files here: no {opener}", f"use /get {n} and open it yourself")

    def work() -> list[Output]:
        from imcli.client.files import local_name

        cache = config_dir() / "files" / info.id
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = cache / local_name(info)
        if not path.exists():
            path = _fetch(chat, info, path, force=True)
        subprocess.Popen(  # noqa: S603 - a fixed program, the path as one argument
            [opener, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return [Note(f"opened {info.name}", "dim")]

    _background(chat, work)
    return []


def _fetch(chat: ChatSession, info: FileInfo, output: Path | None, *, force: bool) -> Path:
    from imcli.client.files import FileConnection

    with FileConnection(getattr(chat, "identity"), "get") as connection:  # noqa: B009
        return connection.download(info.id, output, force=force).path


# ---------------------------------------------------------------- inline preview


def load_previewer() -> Callable[[str], Any] | None:
    """How to draw a thumbnail (base64 JPEG) as a Rich renderable, or ``None`` (not a terminal,
    or ``IMCLI_PREVIEW=off``). textual-image asks the terminal what it can show when it is
    first imported (0.1 s per question), so this runs before the prompt owns the keyboard."""
    if os.environ.get("IMCLI_PREVIEW", "auto").lower() in ("off", "0", "no") or not (
        sys.__stdout__ and sys.__stdout__.isatty()
    ):
        return None
    try:
        from textual_image.renderable import Image
    except Exception:  # no preview is better than no chat
        return None

    def draw(thumb: str) -> Any:
        return Image(thumbnail_image(thumb), width=PREVIEW_CELLS, height="auto")

    return draw


def thumbnail_image(thumb: str) -> Any:
    """A file message's thumbnail as a Pillow image, not yet decoded; ValueError (or Pillow's own
    error) unless it is what the files worker makes: a JPEG of at most ``PREVIEW_MAX_SIDE`` pixels
    a side. Pillow reads only the header here: a forged one is refused before its pixels are."""
    from PIL import Image as PilImage

    picture = PilImage.open(io.BytesIO(base64.b64decode(thumb, validate=True)), formats=["JPEG"])
    if max(picture.size) > PREVIEW_MAX_SIDE:
        raise ValueError(f"a thumbnail of {picture.size[0]} x {picture.size[1]} pixels")
    return picture
