"""Whether a thumbnail on the wire is one a worker could have made (standard library only).

The files worker makes one JPEG of at most 160 pixels a side per image (imcli/files/images.py);
it rides in file messages, profiles and moments, which are anyone's payload. 9,000 characters of
base64 hold a PNG of 7000 x 7000 one-bit pixels, 12 KiB one of 8000 x 8000: every client that
draws it decodes hundreds of megabytes. So every model that carries a thumbnail (imcli.core.wire)
takes one only if its header says PNG or JPEG of at most ``MAX_SIDE`` pixels a side; the web page
checks the same (``smallJpeg`` in imcli/web/static/app.js).
"""

from __future__ import annotations

import base64
import binascii

MAX_SIDE = 320  # pixels: twice the worker's THUMB_SIDE
_PNG = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers (the ones that carry the size): C0-CF but DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(``"png"`` or ``"jpeg"``, width, height) from a PNG's IHDR or a JPEG's frame header; ``None``
    for anything else or a header that does not say."""
    if data.startswith(_PNG) and data[12:16] == b"IHDR" and len(data) >= 24:
        return "png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    width = height = 0  # the largest frame header's: a JPEG may carry more than one, and a decoder may
    i = 2  # use any of them, so every one up to the scan's start counts
    while i + 3 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in (0xD9, 0xDA):  # the end, or the start of the scan: no frame header after this
            break
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            height = max(height, int.from_bytes(data[i + 5 : i + 7], "big"))
            width = max(width, int.from_bytes(data[i + 7 : i + 9], "big"))
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return ("jpeg", width, height) if width and height else None


def small_thumbnail(b64: str, kinds: tuple[str, ...] = ("jpeg",)) -> bool:
    """Whether ``b64`` is base64 of an image of one of ``kinds`` of at most ``MAX_SIDE`` pixels a side."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    size = image_size(data)
    return size is not None and size[0] in kinds and 0 < size[1] <= MAX_SIDE and 0 < size[2] <= MAX_SIDE
