"""The web page's renderers, probed as an attacker would (the class of "one attack, one bad input"):
one set of hostile payloads, applied to every field the page shows of what came off the wire.

mallory, a user with a raw paho client (no page, no CLI), puts each payload in every field he can
reach: a room line, a DM, a group line, a bot's raw non-JSON line, a file message's name, size
fields and thumbnail, his display name, signature, about text and avatar thumbnail, a moment and a
comment. ``rogue``, a service account, plays a worker with a bug: it hands alice's page presence
records, events, notices and profiles whose every text field is a payload (what no worker should
send, and what the page must still show as text). alice's page (Debian's Chromium) must run nothing
(no ``window.__pwned``, no dialog, no page error, no CSP or Trusted Types violation), hold no element
or URL the payload brought, show each accepted payload as itself (one leaf text node in a ``<bdi>``),
draw no image bigger than a thumbnail, and still work afterwards (a plain line arrives and shows).

A field is one row of FIELDS (where mallory puts a value, where the page shows it); a payload is one
entry of PAYLOADS: a new field or a new attack is one more row. A payload a checker refuses (a worker's
``invalid``, the broker's size limit) must then be absent from the page.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets import Subprotocol

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.browser import TIMEOUT_MS, WebUser, chromium, new_user, require_chromium
from tests.rawmqtt import Raw, connect_raw, password_of

pytestmark = pytest.mark.slow

PWN = "window.__pwned"
PAYLOADS: dict[str, str] = {
    "script": f"<script>{PWN}='script'</script>",
    "img-onerror": f"<img src=x onerror=\"{PWN}='img';alert(1)\">",
    "svg-script": f"<svg onload=\"{PWN}='svg'\"><script>{PWN}='svg2'</script></svg>",
    "javascript-url": f"javascript:{PWN}='js';alert(1)//",
    "a-href": f'<a href="javascript:{PWN}=\'a\'">click</a><iframe srcdoc="<script>parent.{PWN}=1</script>">',
    "attr-break": f"\" onmouseover=\"{PWN}='attr'\" autofocus onfocus=\"{PWN}='focus'\" x=\"'><x '",
    "css": '</style><style>*{display:none!important}</style><div style="position:fixed;inset:0;background:red">',
    "css-url": "x;background:url(javascript:alert(1));} body{display:none} @import url(//evil.example/x.css);",
    "rtl": "abc\u202egnp.exe\u202c \u2067isolated\u2069 \u200f\u061c end",
    "path-quotes": "../../etc/passwd ..\\..\\boot.ini \"quoted\" 'single' `tick` C:\\x",
    "entities": "&lt;script&gt; &amp; &#x3c;img src=x&#x3e; %3Cscript%3E",
    "template": f"${{{PWN}='tpl'}} {{{{constructor.constructor('{PWN}=1')()}}}}",
    "lone-surrogates": "a\ud800b\udfffc",
    "controls": "line1\nline2\r\nline3\u2028sep\u2029para \x1b[31mred\x1b[0m\x1b]0;title\x07 bell\x08 tab\tend",
    "long-fits": "<b>" + "x" * 12_000,
    "long-100k": "<script>" + "y" * 100_000,
}


ODD = f"<img src=x onerror=\"{PWN}='odd'\"> odd topic"
ODD_TOPICS = [
    "im/room/lobby/mallory/x", "im/room//mallory", "im/room/lobby", "im/room/lobby/alice",
    "im/room/Lobby/mallory", "im/room/lobby/mallory/", "im/user/alice/dm/mallory/x", "im/user/alice/sent/mallory",
    "im/user/alice/notice", "im/user/alice/friends", "im/user/alice/reply/abc", "im/presence/mallory",
    "im/profile/mallory", "im/events", "im/group/den/info", "im/group/den/msg/alice", "im/status/alice/web",
    "im//room/lobby/mallory", "/im/room/lobby/mallory", "im/room/lobby/mallory\u2028", "im/room/\u202elobby/mallory",
]  # fmt: skip


def image(kind: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L" if kind == "JPEG" else "1", size, 0).save(out, kind, optimize=True)
    return out.getvalue()


def lying_jpeg() -> bytes:
    """A 16 x 16 JPEG with a second frame header, 7000 x 7000, ahead of its own: a decoder may take either."""
    small = image("JPEG", (16, 16))
    sof = small.index(b"\xff\xc0")
    big = bytearray(small[sof : sof + 2 + int.from_bytes(small[sof + 2 : sof + 4], "big")])
    big[5:9] = (7000).to_bytes(2, "big") * 2
    return small[:sof] + bytes(big) + small[sof:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SVG = f"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"{PWN}='svgimg'\"><script>{PWN}='svgimg2'</script></svg>"
THUMBS: dict[str, str] = {  # a thumbnail is a URL's body: each must be refused but the last
    "svg": b64(SVG.encode()),
    "png-7000": b64(image("PNG", (7000, 7000))),
    "jpeg-400-wide": b64(image("JPEG", (400, 10))),
    "jpeg-two-frames": b64(lying_jpeg()),
    "gif": b64(image("GIF", (8, 8))),
    "attr-break": f'" onerror="{PWN}=\'thumb\'" x="',
    "data-url": f"data:text/html,<script>{PWN}=1</script>",
    "jpeg-16": b64(image("JPEG", (16, 16))),  # a real thumbnail: drawn
}


@pytest.fixture
def web(tmp_path: Path) -> Iterator[ServeInfo]:
    require_chromium()
    limits = Limits(publish_rate=1000.0, publish_burst=5000)  # mallory sends hundreds of payloads at once
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0, limits=limits)
    with BackgroundServer(settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "mallory"):
            store.add(name, password_of(name))
        store.add("rogue", password_of("rogue"), Role.SERVICE)
        yield info


class Person:
    """A raw client that asks the workers as the CLI would (request/reply, §10)."""

    def __init__(self, info: ServeInfo, name: str) -> None:
        self.name = name
        self.raw: Raw = connect_raw("127.0.0.1", info.address.port, name, f"{name}:raw")
        assert self.raw.rc == 0
        self.raw.subscribe(f"im/user/{name}/reply/+")

    def ask(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The worker's reply, or None when the request is over the broker's size limit (dropped)."""
        corr = secrets.token_hex(8)
        data = json.dumps({"v": 1, "id": secrets.token_hex(16), **payload}).encode()
        self.raw.publish(f"im/request/{self.name}/{corr}", data)
        if len(data) > 16_384:
            return None
        reply: dict[str, Any] = json.loads(self.raw.expect(f"im/user/{self.name}/reply/{corr}", 10).payload)
        return reply

    def publish(self, topic: str, body: dict[str, Any] | bytes, retain: bool = False) -> None:
        self.raw.publish(topic, body if isinstance(body, bytes) else json.dumps(body).encode(), retain=retain)

    def online(self) -> None:
        """A status record, as ``imcli listen`` keeps one: the presence worker lists mallory."""
        status = {"type": "status", "v": 1, "state": "online", "interval": 3600, "ts": time.time()}
        self.publish(f"im/status/{self.name}/raw", status, retain=True)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "chat", "v": 1, "id": secrets.token_hex(16), "ts": time.time(), "text": text, **extra}


def file_message(name: str = "f.txt", width: Any = None, thumb: str | None = None) -> dict[str, Any]:
    f = {"type": "file", "v": 1, "id": secrets.token_hex(12), "name": name, "size": 10, "mime": "image/jpeg",
         "sha256": "0" * 64, "width": width, "height": 2 if width is not None else None, "thumb": thumb}  # fmt: skip
    return chat("a file", file=f)


# ------------------------------------------------------------------ the page's side
LEAVES = """([sel, within]) => [...document.querySelectorAll(sel)]
    .filter(e => !within || e.closest(within))
    .map(e => [e.textContent, e.tagName, e.children.length])"""


def shown(alice: WebUser, selector: str) -> list[tuple[str, str, int]]:
    return [tuple(x) for x in alice.p.evaluate(LEAVES, [selector, None])]


def expect_shown(alice: WebUser, selector: str, text: str, what: str) -> None:
    """``text`` shows as itself, as one leaf <bdi>, under ``selector``."""
    try:
        alice.p.wait_for_function(
            "([sel, t]) => [...document.querySelectorAll(sel)].some(e => e.textContent === t)",
            arg=[selector, text],
            timeout=TIMEOUT_MS,
        )
    except Exception as exc:  # playwright's TimeoutError: say which row
        raise AssertionError(f"{what}: not shown literally under {selector}: {shown(alice, selector)!r:.300}") from exc
    nodes = [n for n in shown(alice, selector) if n[0] == text]
    assert all(tag == "BDI" and children == 0 for _, tag, children in nodes), (what, nodes[:1])


def expect_absent(alice: WebUser, selector: str, text: str, what: str) -> None:
    found = any(text[:200] in shown_text for shown_text, _, _ in shown(alice, selector))
    assert not found, f"{what}: refused, yet on the page"


SAFE_PAGE = """() => {
  const bad = [...document.body.querySelectorAll(
    'script, iframe, object, embed, svg, style, link, meta, base, frame, b, x, div[style], [style], [srcdoc],' +
    '[onerror], [onload], [onmouseover], [onfocus], [autofocus]')].map(e => e.outerHTML.slice(0, 120));
  for (const a of document.querySelectorAll('a[href]'))
    if (!a.href.startsWith('blob:' + location.origin + '/')) bad.push('a ' + a.href.slice(0, 80));
  for (const i of document.querySelectorAll('img[src]')) {
    if (!/^(data:image\\/(png|jpeg);base64,|blob:)/.test(i.getAttribute('src'))) bad.push('img ' + i.src.slice(0, 80));
    const w = i.naturalWidth, h = i.naturalHeight;
    if (i.complete && (w > 320 || h > 320)) bad.push(`img ${w}x${h}`);
  }
  let hidden = getComputedStyle(document.getElementById('messages')).display === 'none';
  return {pwned: window.__pwned ?? null, bad, hidden, title: document.title};
}"""


def assert_safe(alice: WebUser, where: str) -> None:
    state = alice.p.evaluate(SAFE_PAGE)
    assert state == {"pwned": None, "bad": [], "hidden": False, "title": state["title"]}, (where, state)
    assert state["title"] in ("imcli",) or state["title"].endswith(") imcli"), (where, state["title"])
    assert alice.errors == [], (where, alice.errors)


def still_works(alice: WebUser, mallory: Person, key: str, topic: str) -> None:
    """After the payloads, a plain line still arrives and shows (and is visible)."""
    line = f"plain line {secrets.token_hex(4)}"
    mallory.publish(topic, chat(line))
    alice.open_conv(key)
    alice.see(line, sender="mallory")
    assert alice.p.locator(f"#messages .text:text-is('{line}')").is_visible()


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Field:
    """One place mallory can put text and the page shows it: ``put`` sends it (False: refused)."""

    name: str
    put: Callable[[Person, str], bool]
    selector: str  # where the page shows it
    key: str | None = None  # the conversation to open first


def published(topic: str, body: Callable[[str], dict[str, Any] | bytes]) -> Callable[[Person, str], bool]:
    def put(mallory: Person, text: str) -> bool:
        data = body(text)
        payload = data if isinstance(data, bytes) else json.dumps(data).encode()
        mallory.publish(topic, payload)
        # a lone surrogate: not UTF-8 as a bot's bytes, refused by the Python side's JSON parser as a
        # chat's "\\ud800": malformed either way, as the CLI says (and the archive keeps none)
        return len(payload) <= 16_384 and _utf8(text)

    return put


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def raw_line(text: str) -> bytes:
    """A bot's line: not JSON, just the text (a lone surrogate as the bytes a careless encoder writes)."""
    return text.encode("utf-8", "surrogatepass")


MESSAGES = "#messages li[data-from='mallory']"
CHAT_FIELDS = [
    Field("room line", published("im/room/lobby/mallory", chat), f"{MESSAGES} .text", "room:lobby"),
    Field("bot's raw line", published("im/room/bots/mallory", raw_line), f"{MESSAGES} .text", "room:bots"),
    Field("dm", published("im/user/alice/dm/mallory", chat), f"{MESSAGES} .text", "dm:mallory"),
    Field("group line", published("im/group/den/msg/mallory", chat), f"{MESSAGES} .text", "group:den"),
    Field("file name", published("im/room/lobby/mallory", lambda t: file_message(name=t)), f"{MESSAGES} .file .name",
          "room:lobby"),
]  # fmt: skip


def profile_field(key: str) -> Callable[[Person, str], bool]:
    def put(mallory: Person, text: str) -> bool:
        reply = mallory.ask({"type": "profile_set", key: text, "clear_avatar": False})
        return reply is not None and reply["type"] == "profile_list"

    return put


def rename(mallory: Person, text: str) -> bool:
    reply = mallory.ask({"type": "rename", "nick": text})
    return reply is not None and reply["type"] == "renamed"


PERSON = "#people li[data-account='mallory']"
PROFILE_FIELDS = [
    Field("display name", rename, f"{PERSON} bdi, #card-name"),
    Field("signature", profile_field("signature"), f"{PERSON} .sig, #card-signature > bdi"),
    Field("about", profile_field("about"), "#card-about > bdi"),
]


def test_every_renderer_shows_every_payload_as_text(web: ServeInfo) -> None:
    mallory = Person(web, "mallory")
    helper = Person(web, "alice")  # alice's own raw client: accepts the friend request
    try:
        with chromium() as browser:
            alice = new_user(browser, f"http://127.0.0.1:{web.ws_port}/", "alice")
            alice.sign_in(password_of("alice"))
            # the Trusted Types policy is in force: a string cannot become HTML on this page
            assert alice.p.evaluate("() => { try { document.body.innerHTML = '<i>x</i>'; return 'parsed'; }"
                                    " catch (e) { return e.name; } }") == "TypeError"  # fmt: skip
            alice.errors.clear()  # the refusal above is logged as a violation
            mallory.online()
            assert mallory.ask({"type": "friend_request", "op": "add", "user": "alice"})["type"] == "friend_reply"  # type: ignore[index]
            assert helper.ask({"type": "friend_request", "op": "accept", "user": "mallory"})["type"] == "friend_reply"  # type: ignore[index]
            for op, extra in (("create", {}), ("invite", {"user": "alice"})):
                reply = mallory.ask({"type": "group_request", "op": op, "group": "den", "private": False, **extra})
                assert reply is not None and reply["type"] == "group_reply", reply
            alice.p.wait_for_selector(PERSON)
            # retained and live, on topics with odd levels or where mallory may not write: nothing shows
            for topic in ODD_TOPICS:
                for body in (chat(ODD), ODD.encode(), presence(ODD), profile(signature=ODD), notice(ODD)):
                    mallory.publish(topic, body, retain=True)
                    mallory.publish(topic, body)

            # chat fields: everything at once, then each conversation is read
            accepted = {(f.name, p): f.put(mallory, text) for f in CHAT_FIELDS for p, text in PAYLOADS.items()}
            for key, topic in (("room:lobby", "im/room/lobby/mallory"), ("room:bots", "im/room/bots/mallory"),
                               ("dm:mallory", "im/user/alice/dm/mallory"),
                               ("group:den", "im/group/den/msg/mallory")):  # fmt: skip
                alice.p.wait_for_selector(f'li[data-key="{key}"]')
                still_works(alice, mallory, key, topic)
                for field in (f for f in CHAT_FIELDS if f.key == key):
                    for p, text in PAYLOADS.items():
                        what = f"{field.name} x {p}"
                        if accepted[(field.name, p)]:
                            expect_shown(alice, field.selector, text, what)
                        else:
                            expect_absent(alice, field.selector, text, what)
                assert_safe(alice, key)
                assert "odd topic" not in alice.p.evaluate("() => document.body.textContent"), key

            # file messages' size fields and thumbnails
            for p, text in PAYLOADS.items():
                if len(text) < 10_000 and _utf8(text):  # a lone surrogate makes the whole line malformed
                    mallory.publish("im/room/lobby/mallory", file_message(name=f"dims-{p}", width=text))
            for p, thumb in THUMBS.items():
                mallory.publish("im/room/lobby/mallory", file_message(name=f"thumb-{p}", thumb=thumb))
            still_works(alice, mallory, "room:lobby", "im/room/lobby/mallory")
            for p, text in PAYLOADS.items():
                if len(text) < 10_000 and _utf8(text):
                    alice.p.wait_for_function(
                        "([n, t]) => [...document.querySelectorAll('#messages .file')].some(b =>"
                        " b.querySelector('.name').textContent === n"
                        " && b.querySelector('.meta').textContent.endsWith(`· ${t}\\u00d72`))",
                        arg=[f"dims-{p}", text],
                    )
            drawn = alice.p.evaluate(
                "() => [...document.querySelectorAll('#messages .file')].filter(b => b.querySelector('img'))"
                ".map(b => b.querySelector('.name').textContent)"
            )
            assert drawn == ["thumb-jpeg-16"], drawn
            assert_safe(alice, "file fields")

            # profile fields: one value at a time, each waited for (or refused by the presence worker)
            alice.p.click(PERSON)
            alice.p.wait_for_selector("#profile-card:not([hidden])")
            refused: dict[str, list[str]] = {}
            for field in PROFILE_FIELDS:
                for p, text in PAYLOADS.items():
                    if field.put(mallory, text):
                        expect_shown(alice, field.selector, text, f"{field.name} x {p}")
                    else:
                        refused.setdefault(field.name, []).append(p)
                        expect_absent(alice, field.selector, text, f"{field.name} x {p}")
                assert_safe(alice, field.name)
            # the presence worker's rules (is_plain, display names' letters) refuse these, not the page
            assert "rtl" in refused["signature"] and "script" in refused["display name"], refused

            # an avatar whose thumbnail is each hostile image: never drawn unless it is a small PNG or JPEG
            for p, thumb in THUMBS.items():
                avatar = {"file": secrets.token_hex(12), "media_type": "image/jpeg", "thumbnail": thumb}
                reply = mallory.ask({"type": "profile_set", "avatar": avatar, "clear_avatar": False})
                assert reply is not None
                if reply["type"] == "profile_list":  # the page shows the new profile: drawn only if a thumbnail
                    alice.p.wait_for_function(
                        "([t, draw]) => { const a = document.getElementById('card-avatar');"
                        " return (a.getAttribute('src') || '').endsWith(t) === draw && a.hidden === !draw; }",
                        arg=[thumb if p == "jpeg-16" else "\x00", p == "jpeg-16"],
                    )
                assert_safe(alice, f"avatar x {p}")

            # moments and comments: mallory is alice's friend, his moments are in her feed
            posted = {}
            for p, text in PAYLOADS.items():
                reply = mallory.ask({"type": "moment_request", "op": "post", "text": text, "images": [], "limit": 20})
                posted[p] = reply is not None and reply["type"] == "moment_reply"
                if posted[p] and reply is not None:
                    post = reply["moments"][0]["id"]
            commented = {}
            for p, text in PAYLOADS.items():
                ask = {"type": "moment_request", "op": "comment", "post": post, "text": text, "images": [], "limit": 20}
                reply = mallory.ask(ask)
                commented[p] = reply is not None and reply["type"] == "moment_reply"
            alice.p.click("#moments-open")
            alice.p.wait_for_selector("#feed li.moment[data-author='mallory']")
            for p, text in PAYLOADS.items():
                if posted[p]:
                    expect_shown(alice, "#feed li.moment > .text", text, f"moment x {p}")
                if commented[p]:
                    expect_shown(alice, "#feed .comment .text", text, f"comment x {p}")
            assert_safe(alice, "moments")
            # the page still works: back to the room, a plain line arrives
            still_works(alice, mallory, "room:lobby", "im/room/lobby/mallory")
            assert_safe(alice, "after")
    finally:
        mallory.raw.close()
        helper.raw.close()


# ------------------------------------------------------------------ a worker with a bug
def presence(nick: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "presence", "v": 1, "account": "mallory", "nick": nick, "state": "online", "since": 0.0,
            "devices": 1, **extra}  # fmt: skip


def profile(**fields: Any) -> dict[str, Any]:
    return {"type": "profile", "v": 1, "account": "mallory", "name": "mallory", "signature": "", "about": "", **fields}


def notice(text: Any) -> dict[str, Any]:
    return {"type": "notice", "v": 1, "id": secrets.token_hex(16), "ts": time.time(), "code": "info", "text": text}


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "event", "v": 1, "id": secrets.token_hex(16), "ts": time.time(), "account": "mallory", **fields}


@dataclass(frozen=True)
class Record:
    """A field of a worker's record: the topic, the record holding the payload, where and how it shows."""

    name: str
    topic: str
    body: Callable[[str], dict[str, Any]]
    selector: str
    shows: Callable[[str], str] = lambda text: text
    retain: bool = False


RECORDS = [
    Record("presence nick", "im/presence/mallory", presence, f"{PERSON} > bdi:not(.sig)", retain=True),
    Record("profile name", "im/profile/mallory", lambda t: profile(name=t), "#card-name", retain=True),
    Record("profile signature", "im/profile/mallory", lambda t: profile(signature=t), f"{PERSON} .sig", retain=True),
    Record("profile about", "im/profile/mallory", lambda t: profile(about=t), "#card-about > bdi", retain=True),
    Record("notice", "im/user/alice/notice", notice, "#status > bdi"),
    Record("event nick", "im/events", lambda t: event(event="rename", nick=t, old_nick="m"),
           "#messages li.system bdi", lambda t: f"m is now {t}"),
    Record("event device", "im/events", lambda t: event(event="device_join", nick="m", device=t),
           "#messages li.system bdi", lambda t: f"m (mallory) is online on {t} too"),
]  # fmt: skip

# records no worker's model lets through: each is dropped whole, and nothing breaks
MALFORMED = [
    ("im/presence/mallory", presence(5)),
    ("im/presence/mallory", presence(None)),
    ("im/presence/mallory", presence("m", state="<b>")),
    ("im/presence/mallory", presence("alice-the-admin", account="alice")),
    ("im/profile/mallory", profile(signature=["<b>x</b>"])),
    ("im/profile/mallory", profile(avatar="<img src=x>")),
    ("im/profile/mallory", profile(name={"toString": 1})),
    ("im/events", event(event="rename", nick={}, old_nick=[])),
    ("im/user/alice/notice", notice(5)),
    ("im/user/alice/notice", {"type": "notice", "code": "rate", "text": "x", "requests": "abc"}),
    ("im/user/alice/friends", {"type": "friends", "v": 1, "account": "alice", "friends": None, "incoming": "mallory"}),
    ("im/user/alice/friends", {"type": "friends", "v": 1, "account": "alice", "incoming": ["<img src=x>"]}),
    ("im/group/den/info", {"type": "group", "v": 1, "name": "den", "members": "alice", "private": "no"}),
]


def test_a_malformed_chat_line_is_said_as_the_cli_says_it(web: ServeInfo) -> None:
    """A chat line the Python side cannot read (a lone surrogate in its JSON, which JSON.parse would
    take; bytes that are not UTF-8; an invalid chat object) shows as one "malformed" line in the open
    conversation, as the CLI shows it, never as text that history would then lack, nor silently dropped."""
    mallory = Person(web, "mallory")
    try:
        with chromium() as browser:
            alice = new_user(browser, f"http://127.0.0.1:{web.ws_port}/", "alice")
            alice.sign_in(password_of("alice"))
            alice.open_conv("room:lobby")
            topic = "im/room/lobby/mallory"
            mallory.publish(topic, json.dumps(chat("lone \ud800 surrogate")).encode())  # "\\ud800" on the wire
            mallory.publish(topic, b"not utf-8 \xff\xfe")
            mallory.publish(topic, json.dumps({"type": "chat", "v": 1, "text": ""}).encode())
            alice.p.wait_for_function("() => document.querySelectorAll('#messages li.system.error').length >= 3")
            errors = alice.p.locator("#messages li.system.error")
            said = errors.all_text_contents()
            assert said == ["(a malformed message from @mallory)"] * 3, said
            expect_absent(alice, f"{MESSAGES} .text", "lone", "a lone surrogate's line")
            # the lines are kept with the conversation, not only on screen: a line that sorts earlier
            # redraws the list as a history reply does (kept in the DOM alone, they were wiped when the
            # history reply came after them), and so does leaving the conversation and coming back
            earlier = f"an earlier line {secrets.token_hex(4)}"
            mallory.publish(topic, chat(earlier, ts=time.time() - 3600))
            alice.see(earlier, sender="mallory")
            assert errors.all_text_contents() == said
            # one in a conversation that is not open is said there, when it is opened
            mallory.publish("im/room/elsewhere/mallory", b"\xc0\xaf")
            alice.open_conv("room:elsewhere")
            alice.wait_title("elsewhere")
            alice.p.wait_for_function("() => document.querySelectorAll('#messages li.system.error').length === 1")
            alice.open_conv("room:lobby")
            alice.wait_title("lobby")
            assert errors.all_text_contents() == said
            still_works(alice, mallory, "room:lobby", topic)
            assert_safe(alice, "malformed chat")
    finally:
        mallory.raw.close()


def test_worker_records_show_as_text_and_malformed_ones_are_dropped(web: ServeInfo) -> None:
    mallory = Person(web, "mallory")
    rogue = connect_raw("127.0.0.1", web.address.port, "rogue", "rogue:raw")
    try:
        with chromium() as browser:
            alice = new_user(browser, f"http://127.0.0.1:{web.ws_port}/", "alice")
            alice.sign_in(password_of("alice"))
            mallory.online()
            alice.p.wait_for_selector(PERSON)
            alice.p.click(PERSON)
            alice.p.wait_for_selector("#profile-card:not([hidden])")
            for rec in RECORDS:
                for p, text in PAYLOADS.items():
                    if len(text) > 12_000:
                        continue  # over the broker's limit for anyone
                    rogue.publish(rec.topic, json.dumps(rec.body(text)).encode(), retain=rec.retain)
                    expect_shown(alice, rec.selector, rec.shows(text), f"{rec.name} x {p}")
                assert_safe(alice, rec.name)
            # a valid record, then the malformed ones: the valid one stays, the page keeps working
            rogue.publish("im/presence/mallory", json.dumps(presence("Mallory")).encode(), retain=True)
            expect_shown(alice, f"{PERSON} > bdi:not(.sig)", "Mallory", "valid presence")
            for topic, body in MALFORMED:
                rogue.publish(topic, json.dumps(body).encode(), retain=topic.startswith(("im/presence", "im/profile")))
            still_works(alice, mallory, "room:lobby", "im/room/lobby/mallory")
            expect_shown(alice, f"{PERSON} > bdi:not(.sig)", "Mallory", "presence after malformed ones")
            assert alice.p.locator("#people li[data-account='alice'] bdi:text-is('alice-the-admin')").count() == 0
            assert alice.p.locator("#incoming li").count() == 0
            assert_safe(alice, "malformed records")
    finally:
        mallory.raw.close()
        rogue.close()


# ------------------------------------------------------------------ the WebSocket listener itself
@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeInfo]:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "mallory"):
            store.add(name, password_of(name))
        yield info


def test_the_websocket_listener_refuses_what_is_not_its_own_mqtt(server: ServeInfo) -> None:
    """Over the page's socket, as a hostile program would use it: no or another subprotocol (400 before
    any MQTT), a wrong password (CONNACK 4), alice's own client id taken by mallory while alice is signed
    in (CONNACK 2, alice's connection untouched), a text frame (closed), a frame over 1 MiB (1009)."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from tests.rawmqtt import connect_packet, publish_packet

    uri = f"ws://127.0.0.1:{server.ws_port}/mqtt"

    def login(client_id: str, name: str, password: str | None = None) -> bytes:
        return connect_packet(client_id.encode(), name.encode(), (password or password_of(name)).encode())

    async def answer(ws: ClientConnection, *frames: bytes | str) -> list[bytes | int]:
        """What the broker sends back, and the close code at the end (or 0: still open after 2 s)."""
        for frame in frames:
            await ws.send(frame)
        got: list[bytes | int] = []
        try:
            while True:
                got.append(bytes(await asyncio.wait_for(ws.recv(), 2)))  # type: ignore[arg-type]
        except ConnectionClosed as closed:
            got.append(closed.rcvd.code if closed.rcvd else closed.sent.code if closed.sent else -1)
        except TimeoutError:
            got.append(0)
        return got

    async def probe() -> None:
        for offered in (None, ["chat"], ["mqttv3.1", "wamp"]):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(uri, subprotocols=offered, open_timeout=5):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == 400, offered
        mqtt = [Subprotocol("mqtt")]
        async with connect(uri, subprotocols=mqtt) as alice:
            assert await answer(alice, login("alice:web-aaaaaa.1234", "alice")) == [b" \x02\x00\x00", 0]
            async with connect(uri, subprotocols=mqtt) as ws:
                assert await answer(ws, login("alice:web-aaaaaa.1234", "mallory")) == [b" \x02\x00\x02", 1000]
            async with connect(uri, subprotocols=mqtt) as ws:
                wrong = login("alice:web-aaaaaa.1234", "alice", "not-her-password")
                assert await answer(ws, wrong) == [b" \x02\x00\x04", 1000]
            async with connect(uri, subprotocols=mqtt) as ws:
                assert (await answer(ws, login("mallory:ws", "mallory").decode("latin-1")))[-1] == 1000
            async with connect(uri, subprotocols=mqtt, max_size=None) as ws:
                big = publish_packet(b"im/room/lobby/mallory", b"x" * (2 << 20))
                assert (await answer(ws, login("mallory:ws", "mallory"), big))[-1] == 1009
            # alice's session went through all of it: a PINGREQ still gets its PINGRESP
            assert await answer(alice, b"\xc0\x00") == [b"\xd0\x00", 0]

    asyncio.run(probe())


def test_a_failed_websocket_handshake_is_one_line_in_the_log(
    server: ServeInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """Handshakes anyone can fail at will (no subprotocol, another one, not an upgrade at all, gone
    half-way) are one INFO line each naming the peer and why, never an ERROR with a traceback: such
    a client would otherwise fill the broker's log as fast as it can connect."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    uri = f"ws://127.0.0.1:{server.ws_port}/mqtt"

    async def fail_handshakes() -> None:
        for offered in (None, ["chat"]):
            with pytest.raises(InvalidStatus):
                async with connect(uri, subprotocols=offered, open_timeout=5):  # type: ignore[arg-type]
                    pass
        # an upgrade request cut off half-way
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.ws_port)
        writer.write(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.5)  # the broker's side of the cut-off one ends

    with caplog.at_level(logging.INFO, logger="websockets"):
        asyncio.run(fail_handshakes())
    ours = [r for r in caplog.records if r.name.startswith("websockets")]
    refused = [r for r in ours if r.getMessage().startswith("WebSocket handshake from")]
    assert len(refused) == 3, [r.getMessage() for r in ours]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refused)
    assert "NegotiationError" in refused[0].getMessage() and "127.0.0.1" in refused[0].getMessage()
    assert not [r for r in ours if r.levelno >= logging.WARNING or r.exc_info], [r.getMessage() for r in ours]


# ------------------------------------------------------------------ notifications

NOTIFICATIONS = (
    "window.__notes = []; window.Notification = class {"
    " constructor(t, o) { window.__notes.push([t, o.body]); }"
    " static get permission() { return 'granted'; }"
    " static requestPermission() { return Promise.resolve('granted'); } };"
)
# a body cut at 200: in UTF-16 units, String.slice cut this emoji in two (a lone surrogate)
CUT = "x" * 192 + "\U0001f600 after the cut"


def test_notifications_carry_every_payload_as_text(web: ServeInfo) -> None:
    """A mention raises a notification whose title and body are text the browser hands the system
    as is (a Notification has no markup): every payload that reaches the page becomes the body, cut
    at 200 characters and never inside one (no lone surrogate), and runs nothing on the page."""
    mallory = Person(web, "mallory")
    try:
        with chromium() as browser:
            origin = f"http://127.0.0.1:{web.ws_port}"
            alice = new_user(browser, origin + "/", "alice")
            alice.p.context.grant_permissions(["notifications"], origin=origin)
            alice.p.add_init_script(NOTIFICATIONS)
            alice.p.reload()
            alice.sign_in(password_of("alice"))
            alice.open_room("elsewhere")
            sent = []
            for payload in [*PAYLOADS.values(), CUT]:
                text = f"@alice {payload}"
                if published("im/room/lobby/mallory", chat)(mallory, text):
                    sent.append(text)
            alice.p.wait_for_function(f"() => window.__notes.length >= {len(sent)}", timeout=TIMEOUT_MS)
            notes = alice.p.evaluate("() => window.__notes.map(([t, b]) => [t, [...b].map((c) => c.codePointAt(0))])")
            assert [(t, "".join(map(chr, b))) for t, b in notes] == [("mallory in lobby", t[:200]) for t in sent]
            assert_safe(alice, "notifications")
    finally:
        mallory.raw.close()
