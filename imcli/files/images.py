"""What a stored file is, by its content, and the thumbnail of an image (Pillow), made once.

The type comes from the first bytes (magic numbers), never from the name. Only PNG, JPEG,
GIF and WebP count as images; Pillow opens them with its decompression-bomb guard, and a
file it cannot read stays an ordinary file without a thumbnail.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from imcli.core.wire import THUMB_MAX

log = logging.getLogger(__name__)

THUMB_SIDE = 160  # pixels, the longer side of a thumbnail
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff(head: bytes) -> str | None:
    """The image type of a file starting with ``head`` (16 bytes are enough), or ``None``."""
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class ImageFacts:
    mime: str
    width: int | None = None
    height: int | None = None
    thumb: str | None = None  # base64 JPEG, at most THUMB_MAX characters


def examine(path: Path) -> ImageFacts:
    """The type of the file at ``path`` and, for an image, its size and thumbnail."""
    with path.open("rb") as f:
        mime = sniff(f.read(16))
    if mime is None:
        return ImageFacts("application/octet-stream")
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))  # JPEG: decode at a fraction of the size
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            small = image.convert("RGB")
    except Exception as exc:
        log.info("no thumbnail for %s: %s", path.name, exc)
        return ImageFacts(mime)
    for quality in (80, 60, 40, 25):
        out = io.BytesIO()
        small.save(out, "JPEG", quality=quality, optimize=True)
        thumb = base64.b64encode(out.getvalue()).decode()
        if len(thumb) <= THUMB_MAX:
            return ImageFacts(mime, width, height, thumb)
    return ImageFacts(mime, width, height)
