"""How things look in a terminal (Rich). Text from the wire is never parsed as markup and
its control characters are made visible, so a message cannot restyle or clear a terminal."""

from __future__ import annotations

import time
import unicodedata
import zlib

from rich.text import Text

from imcli.wire import Received

_PALETTE = (
    "cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
    "bright_magenta", "bright_green", "bright_blue", "orange3", "turquoise2",
)  # fmt: skip


def name_style(name: str) -> str:
    """A colour per name, stable across runs and machines."""
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def safe(text: str) -> str:
    """Control characters (ESC, BEL, CR, …) shown as ``\\xNN`` instead of acted upon."""
    return "".join(
        ch
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf")
        else f"\\x{ord(ch):02x}"
        if ord(ch) < 0x100
        else f"\\u{ord(ch):04x}"
        for ch in text
    )


def received_line(item: Received, me: str) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(item.ts))
    line = Text(stamp + " ", style="dim")
    if item.kind == "notice":
        line.append("! " + safe(item.text), style="yellow")
        return line
    if item.kind == "malformed":
        line.append("(malformed message on " + safe(item.text) + ")", style="dim italic")
        return line
    sender = item.sender or "?"
    if item.kind == "dm":
        line.append("[dm] ", style="bold red")
        line.append(sender, style="bold " + name_style(sender))
        line.append(" → " + ("you" if item.to == me else (item.to or "?")), style="dim")
    else:
        line.append(f"#{item.room} ", style="dim")
        line.append(sender, style="bold " + name_style(sender))
    line.append(": ")
    line.append(safe(item.text), style="bold" if item.kind == "dm" else "")
    return line
