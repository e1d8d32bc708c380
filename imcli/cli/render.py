"""How things look in a terminal (Rich). Text from the wire is never parsed as markup and goes
through ``safe``: one message is one line, which no text in it can break, restyle or reorder."""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING

from rich.text import Text

from imcli.core.names import label
from imcli.core.text import MAX_MARKS, safe
from imcli.core.wire import Received

__all__ = ["MAX_MARKS", "safe"]  # one sanitiser for every renderer: imcli.core.text

if TYPE_CHECKING:
    from rich.console import Console

_PALETTE = (
    "cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
    "bright_magenta", "bright_green", "bright_blue", "orange3", "turquoise2",
)  # fmt: skip


def name_style(name: str) -> str:
    """A colour per name, stable across runs and machines."""
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


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
        line.append(" → " + ("you" if item.to == me else safe(label(item.to or "?", item.to_nick))), style="dim")
    elif item.kind == "group":
        line.append("#" + safe(item.group or "?") + " ", style="bold blue")
        _append_sender(line, sender, item.nick)
    else:
        line.append(safe(item.room or "?") + " ", style="dim")
        _append_sender(line, sender, item.nick)
    line.append(": ")
    line.append(safe(item.text), style="bold" if item.kind == "dm" else "")
    return line


def _append_sender(line: Text, account: str, nick: str | None) -> None:
    line.append(safe(nick or account), style="bold " + name_style(account))
    if nick and nick != account:
        line.append(f" (@{safe(account)})", style="dim")


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


def shown(text: str) -> str:
    """``safe`` text for a Rich markup string (``console.print(f"... {shown(name)}")``): not markup either."""
    from rich.markup import escape

    return escape(safe(text))


HANG = "  "  # where the rows a long message wraps to start: never column 0, where time stamps are


def print_line(console: Console, line: Text) -> None:
    """Print one message. On a terminal, a message longer than a row is wrapped here, its further
    rows indented: text padded to the terminal's width cannot start a row of its own that looks
    like another message (the terminal itself would wrap to column 0)."""
    width = console.width - len(HANG)
    if not console.is_terminal or line.cell_len <= console.width or width < 10:
        console.print(line)
        return
    rows = line.wrap(console, width, overflow="fold")
    out = Text("\n" + HANG).join(rows)
    console.print(out, soft_wrap=True)
