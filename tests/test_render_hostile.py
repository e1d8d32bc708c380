"""Every terminal renderer of others' text, fed hostile text as the wire could carry it (issue: "an
attack stands for its class"): terminal escapes (CSI cursor moves and screen clears, OSC 0 title,
OSC 8 link, OSC 52 clipboard), C0 and C1 controls, bidi overrides and isolates, zero-width characters,
Rich markup (``[bold]``, ``[link=…]``), HTML, ``../`` and line breaks, in every free text field of
every record a command prints: ``who``, ``friend list``, ``group list``/``members``, ``profile show``,
``moments``, ``files``, ``history``, ``devices``.

The records are the wire models, validated as a client decodes them, with every string field the
model lets through filled with hostile text: what a worker with a bug, or another broker's path,
could hand over. The commands run in this process (Typer's runner) on a forced colour terminal, so
Rich writes its own SGR sequences; after those are taken out, no ESC, no control and no bidi or
zero-width character may be left, each markup tag must show as typed, and every record's hostile
text must have been printed (escaped), not dropped. tests/test_render.py covers chat lines.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from imcli.cli.app import app
from imcli.client import devices, files, moments, services
from imcli.client.services import Whois
from imcli.core.wire import (
    DeviceInfo,
    FileInfo,
    Friends,
    GroupInfo,
    GroupList,
    GroupReply,
    HistoryReply,
    Moment,
    MomentComment,
    MomentReply,
    Presence,
    Profile,
    Received,
)

# each piece is one hostile input; "H" marks where it sits, so the test can find it in the output
PIECES = [
    "\x1b[2J\x1b[H",  # clear the screen, cursor home
    "\x1b[1A\x1b[2K",  # up a line, erase it: rewrite what was printed before
    "\x1b]0;pwned\x07",  # window title
    "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: write the clipboard
    "\x9b31m\x9d0;t\x9c",  # C1 CSI, OSC, ST
    "\x00\x07\x08\r\x0b\x0c\x7f",
    "\u202egnp.exe",
    "\u2066iso\u2069\u2067rtl\u2069",
    "a\u200bb\u200dc\ufeff",
    "[bold]BOLD[/bold]",
    "[link=https://evil.example/]here[/link]",
    "[/]",
    "<img src=x onerror=alert(1)></script>javascript:alert(1)",
    "../../etc/passwd",
    "two\nlines\u2028and\u2029more\x85",
]
HOSTILE = "H" + "".join(PIECES) + "H"
SHORT = "H\x1b[2J\x1b]52;c;eA==\x07[bold]BOLD[/bold]\u202e\u2066\u200b\x9b\nH"  # for fields with a length limit
MARKUP = ["[bold]BOLD[/bold]", "[link=https://evil.example/]here[/link]", "<img src=x onerror=alert(1)>"]
SGR = re.compile(r"\x1b\[[0-9;]*m")  # Rich's own styles (colour on a forced terminal)
LEAK = {"Cc", "Cf", "Zl", "Zp"}  # controls, format (bidi, zero-width), line and paragraph separators

NOW = time.time()
ME = "alice"
M = TypeVar("M", bound=BaseModel)


def build(model: type[M], fields: dict[str, Any]) -> M:
    """``model`` as a client decodes it from ``fields``: a string the model refuses as too long is
    given the short hostile text; one it refuses for what it holds, a plain word (the model's own
    check keeps that text from every renderer)."""
    for _ in range(20):
        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            for error in exc.errors():
                where: Any = fields
                for key in error["loc"][:-1]:
                    where = where[key]
                where[error["loc"][-1]] = SHORT if error["type"] == "string_too_long" else "plain"
    raise AssertionError(f"{model.__name__} refuses {fields}")


def presence(account: str, **extra: Any) -> Presence:
    fields = {"account": account, "nick": HOSTILE, "state": "online", "since": NOW - 60, "devices": 2,
              "device_names": [HOSTILE, "phone"]}  # fmt: skip
    return build(Presence, fields | extra)


def profile(account: str) -> Profile:
    return build(
        Profile,
        {"account": account, "name": HOSTILE, "signature": HOSTILE, "about": HOSTILE + "\n" + HOSTILE, "updated": NOW},
    )


def group(name: str) -> GroupInfo:
    return build(
        GroupInfo,
        {
            "name": HOSTILE + name,
            "owner": HOSTILE,
            "admins": [HOSTILE],
            "members": [HOSTILE, "bob"],
            "private": False,
            "created": NOW,
            "removed": [HOSTILE],
        },
    )


def file_info() -> FileInfo:
    return build(
        FileInfo,
        {
            "id": "f" * 24,
            "name": HOSTILE,
            "size": 10,
            "mime": HOSTILE[:100],
            "sha256": "0" * 64,
            "sender": HOSTILE,
            "place": HOSTILE,
            "ts": NOW,
        },
    )


def moment() -> Moment:
    comment = build(MomentComment, {"id": "c1", "author": HOSTILE, "ts": NOW, "text": HOSTILE})
    return build(
        Moment,
        {
            "id": "m1",
            "author": HOSTILE,
            "ts": NOW,
            "text": HOSTILE,
            "likes": [HOSTILE, "bob"],
            "comments": [comment.model_dump()],
        },
    )


def received(kind: str) -> Received:
    return Received(
        kind=kind,
        sender=HOSTILE,
        nick=HOSTILE,
        to=ME,
        room=HOSTILE,
        group=HOSTILE,
        id="1",
        ts=NOW,
        text=HOSTILE,
    )


@pytest.fixture
def hostile_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service call the rendering commands make answers with hostile records; nobody signs in."""
    import imcli.cli.app
    import imcli.cli.chat
    import imcli.cli.common
    import imcli.cli.files
    import imcli.cli.moments
    import imcli.cli.profile
    import imcli.cli.social
    import imcli.client.identity

    for module in (imcli.client.identity, imcli.cli.common, imcli.cli.chat, imcli.cli.files, imcli.cli.moments,
                   imcli.cli.profile, imcli.cli.social, imcli.cli.app):  # fmt: skip
        if hasattr(module, "signed_in"):
            monkeypatch.setattr(module, "signed_in", lambda *_a, **_k: type("I", (), {"account": ME, "device": "d"})())
    monkeypatch.setattr(services, "who", lambda *_a, **_k: [presence("bob"), presence("carol", state="offline")])
    monkeypatch.setattr(services, "profiles_of", lambda _i, accounts: {a: profile(a) for a in accounts})
    monkeypatch.setattr(services, "whois", lambda *_a, **_k: Whois(profile("bob"), presence("bob")))
    friends = Friends(account=ME, friends=["bob"], incoming=["carol"], outgoing=["dave"])
    monkeypatch.setattr(services, "friend_request", lambda *_a, **_k: friends)

    def group_request(_identity: object, op: str, *_a: object, **_k: object) -> object:
        if op == "list":
            return GroupList(id="1", mine=[group("a")], public=[group("b")])
        return GroupReply(id="1", group=group("c"))

    monkeypatch.setattr(services, "group_request", group_request)
    monkeypatch.setattr(
        services,
        "history",
        lambda *_a, **_k: HistoryReply(id="1", messages=[received(k) for k in ("room", "dm", "group")], more=False),
    )
    monkeypatch.setattr(moments, "feed", lambda *_a, **_k: (MomentReply(id="1", moments=[moment()]), {}))

    class Connection:
        def __init__(self, *_a: object) -> None:
            pass

        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *_a: object) -> None:
            pass

        def listing(self, *_a: object) -> tuple[list[FileInfo], bool]:
            return [file_info()], False

    monkeypatch.setattr(files, "FileConnection", Connection)
    device = build(DeviceInfo, {"name": HOSTILE, "kind": "device", "created": NOW, "online": True})
    token = device.model_copy(update={"kind": "token"})
    monkeypatch.setattr(devices, "list_devices", lambda *_a: [device, token])


COMMANDS = {
    "who": ["who"],
    "who --all": ["who", "--all"],
    "friend list": ["friend", "list"],
    "group list": ["group", "list"],
    "group members": ["group", "members", "team"],
    "profile show": ["profile", "show", "bob"],
    "moments": ["moments", "feed"],
    "files": ["files"],
    "history": ["history"],
    "devices": ["devices"],
    "tokens": ["token", "list"],
}


def leaks(text: str) -> list[str]:
    """What a terminal would act upon, hide or reorder, once Rich's own styles are taken out."""
    return sorted({repr(ch) for ch in SGR.sub("", text) if ch != "\n" and unicodedata.category(ch) in LEAK})


@pytest.mark.parametrize("command", list(COMMANDS))
def test_hostile_text_is_shown_not_acted_upon(hostile_services: None, command: str) -> None:
    runner = CliRunner()
    result = runner.invoke(app, COMMANDS[command], env={"FORCE_COLOR": "1", "COLUMNS": "4000", "TERM": "xterm"})
    out = result.output
    assert result.exit_code == 0, out
    assert leaks(out) == [], out
    assert "\x1b]" not in out and "\x1b" not in SGR.sub("", out), out  # no OSC (title, link, clipboard)
    for tag in MARKUP:
        assert tag in SGR.sub("", out), f"{tag!r} was taken as markup: {out!r}"
    assert "\\x1b[2J" in out, "the hostile text was dropped, not shown"
