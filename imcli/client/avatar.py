"""A profile picture through the files worker (issue 16): the image is stored as a file of the
default room (readable by every signed-in user, as profiles are), and its thumbnail, made by
the files worker, rides in the profile record."""

from __future__ import annotations

from pathlib import Path

from imcli.client.files import FileConnection, check_file
from imcli.client.identity import Identity
from imcli.core.errors import InvalidInput
from imcli.core.text import human_size
from imcli.core.wire import DEFAULT_ROOM, Avatar

AVATAR_MAX = 5 << 20  # bytes
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def image_type(path: Path) -> str | None:
    """The image type of ``path`` by its first bytes (PNG, JPEG, GIF, WebP), or ``None``."""
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def upload_avatar(identity: Identity, path: Path) -> Avatar:
    """Store ``path`` as an avatar: checked here first (an image, at most ``AVATAR_MAX`` bytes)."""
    size = check_file(path)
    if size > AVATAR_MAX:
        raise InvalidInput(
            f"the avatar {path.name} is {human_size(size)}, more than {human_size(AVATAR_MAX)}", "use a smaller image"
        )
    if image_type(path) is None:
        raise InvalidInput(f"{path.name} is not a PNG, JPEG, GIF or WebP image", "give an image file as --avatar")
    with FileConnection(identity, "avatar") as connection:
        info = connection.upload(path, {"room": DEFAULT_ROOM})
    if info.mime not in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        raise InvalidInput(f"the files worker did not take {path.name} as an image ({info.mime})", "give another image")
    return Avatar(file=info.id, media_type=info.mime, thumbnail=info.thumb or "")
