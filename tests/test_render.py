"""Others' text on a terminal and in ``--json``: one message is one line, which no text in it can
break, restyle or reorder, and whose sender prefix no text can forge (issue 15, item 5)."""

from __future__ import annotations

import io
import json
import secrets
import time
import unicodedata
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from imcli.cli.render import HANG, print_line, received_line, safe
from imcli.core.text import emoji_joins
from imcli.core.wire import Received
from imcli.serve.host import ServeInfo
from tests.conftest import Cli, Proc
from tests.rawmqtt import connect_raw, wait_until

LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
HOSTILE = [
    *LINE_BREAKS, "\x1b[2J", "\x1b]0;title\x07", "\x00", "\x7f", "\x9b", "\t", "\b",
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
    "\u200e", "\u200f", "\u061c", "\u200b", "\u200d", "\ufeff", "\u00ad", "\U000e0041", "\ud800",
    "\n12:00:01 lobby alice: ", "\u2028[dm] alice → you: ",
]  # fmt: skip
hostile_text = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=5), max_size=8).map("".join)


def hidden(text: str) -> list[str]:
    """The characters a terminal would act upon or hide, instead of show (a ZWJ or tag inside an
    emoji sequence, 👩‍👩‍👧, is part of one picture)."""
    joins = emoji_joins(text)
    return [
        ch
        for i, ch in enumerate(text)
        if ch in LINE_BREAKS or (unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and i not in joins)
    ]


@settings(max_examples=300, deadline=None)
@given(text=hostile_text, nick=st.none() | hostile_text, room=hostile_text)
def test_a_rendered_line_is_one_line_with_its_sender_intact(text: str, nick: str | None, room: str) -> None:
    for kind in ("room", "dm", "group"):
        item = Received(kind=kind, sender="alice", nick=nick, to="bob", room=room, group=room, id="1", ts=0, text=text)
        line = received_line(item, me="carol").plain
        assert hidden(line) == [], line
        assert len(line.splitlines()) == 1
        sender = safe(nick or "alice") + (" (@alice)" if nick and nick != "alice" else "")
        where = {"room": safe(room or "?") + " ", "dm": "[dm] ", "group": "#" + safe(room or "?") + " "}[kind]
        prefix = time.strftime("%H:%M:%S ", time.localtime(0)) + where + sender
        assert line.startswith(prefix), (prefix, line)
        assert line.endswith(": " + safe(text))


@settings(max_examples=300, deadline=None)
@given(text=hostile_text.map(lambda t: t.replace("\ud800", "")))  # JSON from the wire never has a lone surrogate
def test_a_json_line_is_one_ascii_line_with_the_exact_text(text: str) -> None:
    out = Received(kind="room", sender="alice", room="lobby", id="1", ts=0, text=text).to_json()
    assert all(" " <= ch <= "\x7f" for ch in out), out  # DEL is the one control JSON leaves as it is
    assert len(out.splitlines()) == 1
    assert json.loads(out)["text"] == text


@settings(max_examples=200, deadline=None)
@given(pad=st.text(st.sampled_from("x ✓日"), max_size=90), width=st.integers(20, 60))
def test_text_padded_to_the_terminal_width_starts_no_row_of_its_own(pad: str, width: int) -> None:
    """The terminal would wrap a long message to column 0, where "12:00:01 lobby alice: …" could start."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None, soft_wrap=True)
    item = Received(kind="room", sender="mallory", room="lobby", id="1", ts=0, text=pad + "12:00:01 lobby alice: hi")
    print_line(console, received_line(item, me="bob"))
    first, *rest = buf.getvalue().rstrip("\n").split("\n")
    assert first.startswith(time.strftime("%H:%M:%S ", time.localtime(0)))
    assert all(row.startswith(HANG) and console.measure(row).maximum <= width for row in rest), rest


def test_made_visible_not_deleted() -> None:
    assert safe("a\nb\r\x1b[2J\t\u2028\u202eZ") == "a\\x0ab\\x0d\\x1b[2J\\x09\\u2028\\u202eZ"
    assert safe("héllo wörld ✓ 😀 日本") == "héllo wörld ✓ 😀 日本"
    assert safe("\U0001f469\u200d\U0001f467 a\u200db") == "\U0001f469\u200d\U0001f467 a\\u200db"  # joins emoji only


def test_listen_shows_a_forged_line_as_part_of_one_message(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], procs: Callable[..., Proc]
) -> None:
    """mallory, with a raw client, puts a line feed, U+2028 and a fake prefix in a message: bob's
    `imcli listen` prints one line for it, and JSON consumers one ASCII line."""
    users("bob", "mallory")
    bob = cli_as("bob")
    bob.login("bob")
    env = {"IMCLI_CONFIG_DIR": str(bob.config_dir), "COLUMNS": "1000"}
    plain, as_json = procs("listen", env=env), procs("listen", "--json", env=env)
    mallory = connect_raw(server.address.host, server.address.port, "mallory", f"mallory:{secrets.token_hex(3)}")
    try:
        forged = "hi\n12:00:01 lobby alice: send me your password\u2028[dm] alice → you: now\u202e"
        lines: dict[Proc, list[str]] = {plain: [], as_json: []}

        def saw_it(p: Proc) -> bool:
            while not p.lines.empty():
                lines[p].append(p.lines.get())
            return any("mallory" in line for line in lines[p])

        for _ in range(20):  # listen subscribes in the background: repeat until both show it
            mallory.publish("im/room/lobby/mallory", forged)
            if wait_until(lambda: saw_it(plain) and saw_it(as_json), 1):
                break
        barrier = f"barrier {secrets.token_hex(3)}"  # whatever the forged message became arrived before it
        mallory.publish("im/room/lobby/mallory", barrier)
        assert wait_until(lambda: all(saw_it(p) and barrier in p_lines[-1] for p, p_lines in lines.items()), 20)
        lines = {p: [line for line in got if "barrier" not in line] for p, got in lines.items()}
        assert [line for line in lines[plain] if "alice" in line and "mallory" not in line] == [], lines[plain]
        assert all("mallory: hi\\x0a12:00:01 lobby alice: send me your password\\u2028[dm]" in line
                   for line in lines[plain] if "mallory" in line), lines[plain]  # fmt: skip
        assert all(line.isascii() for line in lines[as_json])
        assert {json.loads(line)["text"] for line in lines[as_json] if json.loads(line).get("from") == "mallory"} == {
            forged
        }
    finally:
        mallory.close()
