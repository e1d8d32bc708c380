"""Images through the files worker (issue 16): a profile picture, a moment's pictures. A profile
picture is stored as a file of the default room (any signed-in user holding its unguessable id
may fetch it, as anyone may read a profile); a moment's picture as a file of the author's
moments (only the author and the author's current friends may fetch it). The thumbnail the
files worker made rides in the profile or the moment."""

from __future__ import annotations

from pathlib import Path

from imcli.client.files import FileConnection, check_file
from imcli.client.identity import Identity
from imcli.core.errors import InvalidInput
from imcli.core.text import human_size
from imcli.core.wire import DEFAULT_ROOM, Avatar, FileInfo

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


def check_image(path: Path, what: str = "the avatar", option: str = "--avatar") -> int:
    """``path``'s size if it is an image of at most ``AVATAR_MAX`` bytes; else one ``Error:`` line."""
    size = check_file(path)
    if size > AVATAR_MAX:
        raise InvalidInput(
            f"{what} {path.name} is {human_size(size)}, more than {human_size(AVATAR_MAX)}", "use a smaller image"
        )
    if image_type(path) is None:
        raise InvalidInput(f"{path.name} is not a PNG, JPEG, GIF or WebP image", f"give an image file as {option}")
    return size


def upload_avatar(identity: Identity, path: Path) -> Avatar:
    """Store ``path`` as an avatar: checked here first (an image, at most ``AVATAR_MAX`` bytes)."""
    return upload_images(identity, [path])[0]


def upload_images(
    identity: Identity, paths: list[Path], option: str = "--avatar", *, moments: bool = False
) -> list[Avatar]:
    """Store images (each checked first, all before any upload) with the files worker: for
    everyone, or (``moments``) for the images of my moments, my friends' and mine to fetch."""
    for path in paths:
        check_image(path, "the image" if option != "--avatar" else "the avatar", option)
    with FileConnection(identity, "image") as connection:
        target = {"moments": connection.me} if moments else {"room": DEFAULT_ROOM}
        return [_stored(connection.upload(path, target), path) for path in paths]


def _stored(info: FileInfo, path: Path) -> Avatar:
    if info.mime not in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        raise InvalidInput(f"the files worker did not take {path.name} as an image ({info.mime})", "give another image")
    return Avatar(file=info.id, media_type=info.mime, thumbnail=info.thumb or "")
