"""How things look in a terminal (Rich). Text from the wire is never parsed as markup and
its control characters are made visible, so a message cannot restyle or clear a terminal."""

from __future__ import annotations

import time
import unicodedata
import zlib

from rich.text import Text

from imcli.core.wire import Received

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
    if item.kind == "event":
        line.append("* " + safe(item.text), style="dim")
        return line
    if item.kind == "malformed":
        line.append("(malformed message on " + safe(item.text) + ")", style="dim italic")
        return line
    sender = item.sender or "?"
    if item.missed:
        line.append("(missed) ", style="italic yellow")
    if item.kind == "dm":
        line.append("[dm] ", style="bold red")
        _append_sender(line, sender, item.nick)
        line.append(" → " + ("you" if item.to == me else (item.to or "?")), style="dim")
    elif item.kind == "group":
        line.append(f"#{item.group} ", style="bold blue")
        _append_sender(line, sender, item.nick)
    else:
        line.append(f"{item.room} ", style="dim")
        _append_sender(line, sender, item.nick)
    line.append(": ")
    line.append(safe(item.text), style="bold" if item.kind == "dm" else "")
    return line


def _append_sender(line: Text, account: str, nick: str | None) -> None:
    line.append(safe(nick or account), style="bold " + name_style(account))
    if nick and nick != account:
        line.append(f" (@{account})", style="dim")


def ago(ts: float, now: float | None = None) -> str:
    """``just now``, ``5 min ago``, ``3 h ago``, or a date for older times."""
    seconds = (time.time() if now is None else now) - ts
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
