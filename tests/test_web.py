"""The web client in a real browser (issue 19): Debian's Chromium driven by Playwright against
`imcli serve --ws-port`, with `imcli` (the CLI) as the third person in every conversation.

Each browser user is its own context (storage, device); the page is just another MQTT client,
so what the CLI sends the page shows and the other way round, through the same broker rules.
Set IMCLI_SCREENSHOTS=docs/screenshots to write the README's screenshots from
``test_screenshots``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.core.wire import ChatMessage, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.brokers import NOT_INSTALLED, mosquitto_available, running_mosquitto, running_workers
from tests.browser import TIMEOUT_MS, WebUser, chromium, new_user, require_chromium
from tests.conftest import Cli, password_of
from tests.rawmqtt import chat, connect_raw, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import FilePayload, WebSocketRoute

pytestmark = pytest.mark.slow

HOSTILE = [
    "<img src=x onerror=\"window.__pwned=1;alert('xss')\">",
    '<script>window.__pwned=2</script><a href="javascript:window.__pwned=3">click me</a>',
    "javascript:window.__pwned=4",
    "evil \u202etxt.exe\u202c and <b>bold</b> &amp; &lt;",
]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[ServeInfo]:
    require_chromium()
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0)) as info:
        store = AccountStore(info.data_dir)
        for name in ("bob", "carol", "dave"):
            store.add(name, password_of(name))
        yield info


def url(info: ServeInfo) -> str:
    return f"http://127.0.0.1:{info.ws_port}/"


def cli(info: ServeInfo, tmp_path: Path, name: str) -> Cli:
    """``name`` on the command line, logged in (its own config directory)."""
    person = Cli(CliRunner(), info, tmp_path / f"config-{name}")
    person.login(name)
    return person


def ok(person: Cli, *args: str) -> str:
    result = person(*args)
    assert result.exit_code == 0, result.output
    return result.output


def history(person: Cli, where: str) -> list[str]:
    return [json.loads(line)["text"] for line in ok(person, "history", where, "--json").splitlines() if line]


def archived(person: Cli, where: str, texts: list[str]) -> None:
    """Wait until ``history`` answers ``texts``, exactly. A page shows its own line at once, before the
    broker has it (its PUBACK, which comes once the line is archived, is mqtt.js's business): a ``history``
    asked right after ``say`` could reach the archive before the page's PUBLISH reaches the broker."""
    got: list[str] = []

    def answered() -> bool:
        got[:] = history(person, where)
        return got == texts

    assert wait_until(answered, 15), got


def no_errors(*users: WebUser) -> None:
    for user in users:
        assert user.errors == [], (user.name, user.errors)


def wait_conv(user: WebUser, key: str, unread: int | None = None) -> None:
    """Wait until the sidebar lists conversation ``key`` (with that unread count)."""
    user.p.wait_for_function(
        """([key, unread]) => { const li = document.querySelector(`li[data-key="${key}"]`);
             if (!li) return false; const b = li.querySelector('.badge');
             return unread === null || (b ? Number(b.textContent) : 0) === unread; }""",
        arg=[key, unread],
        timeout=TIMEOUT_MS,
    )


def test_two_browsers_and_the_cli_chat_in_a_room_a_dm_and_a_group(web: ServeInfo, tmp_path: Path) -> None:
    carol = cli(web, tmp_path, "carol")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)  # a new account, made from the page
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))

        # a room: both pages and the terminal
        alice.say("hello lobby")
        bob.see("hello lobby", sender="alice")
        bob.say("hi alice")
        alice.see("hi alice", sender="bob")
        ok(carol, "say", "hello from the terminal")
        alice.see("hello from the terminal", sender="carol")
        bob.see("hello from the terminal", sender="carol")
        assert history(carol, "lobby") == ["hello lobby", "hi alice", "hello from the terminal"]

        # direct messages: page to page, terminal to page, page to terminal
        bob.open_dm("alice")
        bob.say("psst alice")
        wait_conv(alice, "dm:bob", unread=1)
        alice.open_conv("dm:bob")
        alice.see("psst alice", sender="bob")
        wait_conv(alice, "dm:bob", unread=0)
        ok(carol, "dm", "alice", "a dm from the terminal")
        wait_conv(alice, "dm:carol", unread=1)
        alice.open_conv("dm:carol")
        alice.see("a dm from the terminal", sender="carol")
        alice.say("back to you, carol")
        archived(carol, "@alice", ["a dm from the terminal", "back to you, carol"])
        assert "psst alice" not in alice.texts()  # each conversation shows its own messages

        # a group: alice creates it from the page and adds bob and carol
        alice.p.fill("#group-input", "team")
        alice.p.click("#group-create")
        alice.wait_title("#team")
        alice.group_action("#invite-button", "bob")
        alice.group_action("#invite-button", "carol")
        alice.p.wait_for_function("() => document.getElementById('group-members').textContent.includes('carol')")
        wait_conv(bob, "group:team")
        bob.open_conv("group:team")
        ok(carol, "group", "say", "team", "standup from the terminal")
        alice.see("standup from the terminal", sender="carol")
        bob.see("standup from the terminal", sender="carol")
        bob.say("on my way")
        alice.see("on my way", sender="bob")
        assert history(carol, "#team") == ["standup from the terminal", "on my way"]

        # alice removes carol: the broker stops her at once
        alice.group_action("#kick-button", "carol")
        assert carol("group", "say", "team", "still here?").exit_code == 1
        no_errors(alice, bob)


def test_presence_joins_leaves_and_renames_show_live(web: ServeInfo, tmp_path: Path) -> None:
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))
        online = "li.person.online[data-account='bob']"
        alice.p.wait_for_selector(online)
        alice.see_line("bob is online")  # the join also shows as a line in the open room

        bob.p.fill("#rename-input", "Bobby")
        bob.p.press("#rename-input", "Enter")
        alice.p.wait_for_function(
            "() => document.querySelector(\"li.person[data-account='bob'] bdi\").textContent === 'Bobby'"
        )
        alice.see_line("bob is now Bobby")
        bob.say("new name, same me")
        alice.p.wait_for_function(  # messages name the sender by nickname
            "() => [...document.querySelectorAll('#messages li.message')].some(li => "
            "li.dataset.from === 'bob' && li.querySelector('.from').textContent === 'Bobby')"
        )

        # the command line sees the page as online, then bob closes his tab: the Will clears it
        carol = cli(web, tmp_path, "carol")
        assert "Bobby" in ok(carol, "who")
        bob.p.context.close()
        alice.p.wait_for_selector("li.person:not(.online)[data-account='bob']")
        alice.see_line("Bobby (bob) went offline")
        no_errors(alice)


def test_friend_requests_and_dm_policy(web: ServeInfo, tmp_path: Path) -> None:
    carol = cli(web, tmp_path, "carol")
    ok(carol, "config", "set", "dm-policy", "friends")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))

        # carol takes DMs from friends only: the page asks first and sends nothing (as imcli dm)
        alice.open_dm("carol")
        alice.p.fill("#text", "may I?")
        alice.p.press("#text", "Enter")
        alice.p.wait_for_function("() => document.getElementById('status').textContent.includes('friends only')")
        assert alice.texts() == []
        assert history(carol, "@alice") == []

        # alice asks bob from the page; bob sees the request and accepts it
        alice.p.fill("#friend-input", "bob")
        alice.p.press("#friend-input", "Enter")
        alice.p.wait_for_selector("#friends li.friend:has-text('bob (asked)')")
        bob.p.wait_for_selector("#incoming li.request:has-text('alice wants to be your friend')")
        bob.p.click("#incoming li.request button:has-text('accept')")
        bob.p.wait_for_selector("#friends li.friend:has-text('alice')")
        alice.p.wait_for_function(
            "() => [...document.querySelectorAll('#friends li.friend')].some(li => li.textContent === 'bob')"
        )
        # and a request from the terminal is accepted on the page, after which carol's policy lets alice in
        ok(carol, "friend", "add", "alice")
        alice.p.click("#incoming li.request button:has-text('accept')")
        alice.p.wait_for_function(
            "() => [...document.querySelectorAll('#friends li.friend')].some(li => li.textContent === 'carol')"
        )
        alice.say("now may I?")
        archived(carol, "@alice", ["now may I?"])
        no_errors(alice, bob)


def test_an_image_sent_from_the_page_shows_inline_for_the_others(web: ServeInfo, tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "sunset.png"
    Image.new("RGB", (300, 200), (230, 120, 40)).save(picture, "PNG")
    hostile = tmp_path / "<img src=x onerror=window.__pwned=5>.png"
    Image.new("RGB", (40, 30), (20, 20, 200)).save(hostile, "PNG")
    carol = cli(web, tmp_path, "carol")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))

        alice.p.set_input_files("#file-input", str(picture))  # the page's upload, with its progress bar
        alice.p.wait_for_selector("#messages li[data-from='alice'] .file .name:text-is('sunset.png')")
        # bob's page shows the worker's thumbnail inline, then the full image on a click
        thumb = "#messages li[data-from='alice'] .file img.thumb"
        bob.p.wait_for_selector(thumb)
        assert (bob.p.get_attribute(thumb, "src") or "").startswith("data:image/jpeg;base64,")
        bob.p.click("#messages li[data-from='alice'] .file button:has-text('Show full image')")
        full = "#messages li[data-from='alice'] .file img.full"
        bob.p.wait_for_function(f'() => document.querySelector("{full}")?.naturalWidth === 300')
        assert (bob.p.get_attribute(full, "src") or "").startswith("blob:")
        assert bob.p.get_attribute("#messages .file a.save", "download") == "sunset.png"

        # the terminal gets the same bytes, and sends one with a hostile name: it stays a name
        listed = json.loads(ok(carol, "files", "--json"))
        (sunset,) = [f for f in listed if f["name"] == "sunset.png"]
        ok(carol, "get", sunset["id"], "-o", str(tmp_path / "got.png"))
        assert (tmp_path / "got.png").read_bytes() == picture.read_bytes()
        ok(carol, "send", "--room", "lobby", str(hostile))
        alice.p.wait_for_selector(f"#messages li[data-from='carol'] .file .name:text-is('{hostile.name}')")
        alice.p.click("#messages li[data-from='carol'] .file button")
        alice.p.wait_for_selector("#messages li[data-from='carol'] .file img.full")
        assert alice.p.evaluate("() => window.__pwned") is None
        assert alice.p.locator("#messages img:not(.thumb):not(.full)").count() == 0
        no_errors(alice, bob)


def _publishes(stream: bytes) -> list[tuple[str, int]]:
    """(topic, payload bytes) of each PUBLISH in a client's MQTT 3.1.1 byte stream."""
    found, at = [], 0
    while at < len(stream):
        first, size, shift = stream[at], 0, 0
        at += 1
        while True:  # the remaining length: 7 bits a byte, low first
            size |= (stream[at] & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not stream[at - 1] & 0x80:
                break
        if first >> 4 == 3:  # PUBLISH: topic, packet id at QoS 1 and 2, payload
            topic_len = int.from_bytes(stream[at : at + 2], "big")
            header = 2 + topic_len + (2 if (first >> 1) & 3 else 0)
            found.append((stream[at + 2 : at + 2 + topic_len].decode(), size - header))
        at += size
    return found


def _frame_bytes(frame: str | bytes) -> bytes:
    return frame if isinstance(frame, bytes) else frame.encode()


def test_a_file_from_the_page_goes_in_chunks_of_the_upload_limit(web: ServeInfo, tmp_path: Path) -> None:
    """The page uploads in the chunks the files worker names (the broker's limit on upload topics,
    256 KiB), as ``imcli send`` does, not in chat's 16 KiB; the bytes arrive whole."""
    data = tmp_path / "notes.bin"
    data.write_bytes(os.urandom(600 << 10))
    carol = cli(web, tmp_path, "carol")
    sent: list[bytes] = []
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.p.on(
            "websocket",
            lambda ws: ws.on(
                "framesent", lambda frame: sent.append(bytes(frame, "latin-1") if isinstance(frame, str) else frame)
            ),
        )
        alice.sign_in(password_of("alice"), register=True)
        alice.p.set_input_files("#file-input", str(data))
        alice.p.wait_for_selector("#messages li[data-from='alice'] .file .name:text-is('notes.bin')")
        no_errors(alice)
    chunks = [size for topic, size in _publishes(b"".join(sent)) if "/upload/alice/" in topic]
    # imcli serve's limit on upload topics is 256 KiB: a chunk is 8 bytes of offset and 262,136 of the file
    assert chunks == [262144, 262144, 8 + (600 << 10) - 2 * 262136]
    (notes,) = [f for f in json.loads(ok(carol, "files", "--json")) if f["name"] == "notes.bin"]
    ok(carol, "get", notes["id"], "-o", str(tmp_path / "got.bin"))
    assert (tmp_path / "got.bin").read_bytes() == data.read_bytes()


def test_a_file_of_any_name_from_the_page_is_sent_under_a_plain_one(web: ServeInfo, tmp_path: Path) -> None:
    """A browser file named with a bidi override and a backslash is sent, as ``imcli send`` sends it
    (imcli.core.text.plain_file_name), not refused by the files worker."""
    carol = cli(web, tmp_path, "carol")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        weird: FilePayload = {"name": "rtl\u202egnp.exe back\\slash.txt", "mimeType": "text/plain", "buffer": b"x"}
        alice.p.set_input_files("#file-input", files=[weird])
        alice.p.wait_for_selector("#messages li[data-from='alice'] .file .name:text-is('rtl_gnp.exe back_slash.txt')")
        no_errors(alice)
    names = [f["name"] for f in json.loads(ok(carol, "files", "--json"))]
    assert names == ["rtl_gnp.exe back_slash.txt"]


def test_public_groups_are_joined_from_the_list_and_left(web: ServeInfo, tmp_path: Path) -> None:
    carol = cli(web, tmp_path, "carol")
    ok(carol, "group", "create", "open-house")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        alice.p.click("#public-groups li:has-text('#open-house') button:has-text('join')")
        alice.wait_title("#open-house")
        alice.p.wait_for_function("() => document.getElementById('group-members').textContent.includes('alice')")
        alice.say("hi house")
        archived(carol, "#open-house", ["hi house"])
        alice.p.click("#leave-button")
        alice.wait_title("lobby")
        assert alice.p.locator("li[data-key='group:open-house']").count() == 0
        assert "alice" not in ok(carol, "group", "members", "open-house")
        no_errors(alice)


def test_profiles_and_display_names_in_any_script(web: ServeInfo, tmp_path: Path) -> None:
    carol = cli(web, tmp_path, "carol")
    about = "line one\n<script>window.__pwned=6</script>\n<a href='javascript:window.__pwned=7'>me</a>"
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))

        bob.p.fill("#rename-input", "张三")
        bob.p.press("#rename-input", "Enter")
        alice.p.wait_for_selector("li.person[data-account='bob'] bdi:text-is('张三')")
        bob.p.click("#my-profile summary")
        bob.p.fill("#signature-input", HOSTILE[0])
        bob.p.fill("#about-input", about)
        bob.p.click("#profile-form button")
        bob.p.wait_for_function("() => document.getElementById('status').textContent === 'profile saved'")

        alice.p.click("li.person[data-account='bob']")
        alice.p.wait_for_function("s => document.getElementById('card-signature').textContent === s", arg=HOSTILE[0])
        assert alice.p.text_content("#card-name") == "张三"
        assert alice.p.text_content("#card-about") == about
        assert alice.p.locator("#profile-card img:not([hidden]), #profile-card script, #profile-card a").count() == 0
        assert "张三" in ok(carol, "profile", "show", "bob")

        # an avatar from the page: stored by the files worker, its thumbnail in the profile
        face = tmp_path / "face.png"
        whiteboard(face)
        bob.p.set_input_files("#avatar-input", str(face))
        bob.p.wait_for_function("() => document.getElementById('status').textContent === 'avatar saved'")
        alice.p.wait_for_selector("li.person[data-account='bob'] img.face")
        alice.p.wait_for_selector("#card-avatar:not([hidden])")
        assert (alice.p.get_attribute("#card-avatar", "src") or "").startswith("data:image/jpeg;base64,")
        assert "avatar" in ok(carol, "profile", "show", "bob").lower()

        # a change made from the terminal shows live, as an event line too
        ok(carol, "rename", "Carol")  # (a record, so that carol is among the people)
        alice.p.wait_for_selector("li.person[data-account='carol']")
        ok(carol, "profile", "set", "--signature", "from the terminal")
        alice.p.wait_for_selector("li.person[data-account='carol'] .sig:text-is('from the terminal')")
        alice.see_line("Carol (@carol) changed their profile: signature “from the terminal”")
        assert alice.p.evaluate("() => window.__pwned") is None
        no_errors(alice, bob)


def test_moments_between_friends(web: ServeInfo) -> None:
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))
        alice.p.fill("#friend-input", "bob")
        alice.p.press("#friend-input", "Enter")
        bob.p.click("#incoming li.request button:has-text('accept')")
        alice.p.wait_for_function(
            "() => [...document.querySelectorAll('#friends li.friend')].some(li => li.textContent === 'bob')"
        )

        alice.p.click("#moments-open")
        alice.p.fill("#moment-text", HOSTILE[1])
        alice.p.click("#moment-form button")
        alice.p.wait_for_selector("#feed li.moment[data-author='alice']")
        bob.p.click("#moments-open")  # bob, a friend, sees it
        moment = "#feed li.moment[data-author='alice']"
        bob.p.wait_for_selector(moment)
        assert bob.p.text_content(f"{moment} > bdi.text") == HOSTILE[1]
        bob.p.click(f"{moment} button.like")
        bob.p.wait_for_selector(f"{moment} .likes")
        bob.p.fill(f"{moment} form input", "好看")
        bob.p.click(f"{moment} form button")
        bob.p.wait_for_selector(f"{moment} .comment bdi.text:text-is('好看')")
        # alice's open feed refreshes on the worker's notices
        alice.p.wait_for_selector("#feed li.moment .comment bdi.text:text-is('好看')")
        assert alice.p.text_content("#feed li.moment .likes") == "♥ bob"
        assert alice.p.evaluate("() => window.__pwned") is None
        assert bob.p.locator("#feed a, #feed script").count() == 0
        no_errors(alice, bob)


def test_a_moment_deleted_from_the_page_takes_its_image_with_it(web: ServeInfo, tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "moment.png"
    Image.new("RGB", (40, 30), (200, 60, 10)).save(picture, "PNG")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        terminal = cli(web, tmp_path, "alice")  # the same account on the command line
        ok(terminal, "moments", "post", "with a picture", "--image", str(picture))
        (moment,) = json.loads(ok(terminal, "moments", "--json"))["moments"]
        file_id = moment["images"][0]["file"]
        ok(terminal, "get", file_id, "-o", str(tmp_path / "before.png"))
        alice.p.click("#moments-open")
        mine = "#feed li.moment[data-author='alice']"
        alice.p.wait_for_selector(mine)
        alice.p.click(f"{mine} button:has-text('Delete')")
        alice.p.wait_for_selector(mine, state="detached")
        alice.p.wait_for_function(
            "() => document.getElementById('status').textContent === 'moment deleted, and its 1 image'"
        )
        no_errors(alice)
    gone = terminal("get", file_id, "-o", str(tmp_path / "after.png"))
    assert gone.exit_code == 1 and f"no file {file_id}" in gone.output


def test_hostile_text_stays_text(web: ServeInfo, tmp_path: Path) -> None:
    carol = cli(web, tmp_path, "carol")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))
        for text in HOSTILE:
            ok(carol, "say", text)  # from the terminal into the room
        bob.open_dm("alice")
        for text in HOSTILE:
            bob.say(text)  # from a page: typed into the composer, into a DM
        for text in HOSTILE:
            alice.see(text, sender="carol")
        alice.open_conv("dm:bob")
        for text in HOSTILE:
            alice.see(text, sender="bob")
        for user in (alice, bob):
            page = user.p
            assert page.evaluate("() => window.__pwned") is None
            assert page.locator("#messages img, #messages script, #messages a, #messages b").count() == 0
            # each text is one bidi-isolated node: the U+202E inside cannot reorder what follows it
            assert page.evaluate(
                "() => [...document.querySelectorAll('#messages .text')]"
                ".every(e => e.tagName === 'BDI' && e.children.length === 0)"
            )
        assert "evil \u202etxt.exe\u202c and <b>bold</b> &amp; &lt;" in alice.texts()
        no_errors(alice, bob)


FORGED_FILE_NAME = "../../x\n<img src=x onerror=window.__pwned=8>\u202egnp.exe\x1b]8;;javascript:alert(1)\x1b\\[link=x]"


def test_a_forged_file_message_and_terminal_escapes_stay_text(web: ServeInfo, tmp_path: Path) -> None:
    """mallory, with a raw client, puts what no page or terminal wrote into the room: a file message
    whose name holds a path, HTML, a bidi override, an OSC 8 link and markup, whose size fields are
    HTML and whose thumbnail is not base64 (a data URL's escape attempt), a forged ``from``, and a line
    of terminal escapes. The page shows the name as text in a bidi isolate, draws no thumbnail, runs
    nothing, and names mallory as the sender."""
    AccountStore(web.data_dir).add("mallory", password_of("mallory"))
    mallory = connect_raw("127.0.0.1", web.address.port, "mallory", "mallory:raw")
    forged = {
        "type": "chat", "v": 1, "id": "forged1", "ts": 1, "text": "a file", "from": "bob",
        "file": {"type": "file", "v": 1, "id": "f" * 24, "name": FORGED_FILE_NAME, "size": 10, "mime": "image/png",
                 "sha256": "0" * 64, "width": "<img src=x onerror=window.__pwned=9>", "height": 2,
                 "thumb": '" onerror="window.__pwned=10" x="'},
    }  # fmt: skip
    escapes = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;eA==\x07\x9b31m\u2066x\u2069 [bold]B[/bold]"
    from PIL import Image

    huge = io.BytesIO()
    Image.new("1", (7000, 7000), 0).save(huge, "PNG", optimize=True)  # 8,032 characters of base64
    wide = io.BytesIO()
    Image.new("L", (400, 10), 0).save(wide, "JPEG")
    bombs = [
        {**forged, "id": f"bomb{i}", "file": {**forged["file"], "name": f"bomb{i}", "width": 1, "thumb": thumb}}  # type: ignore[dict-item]
        for i, thumb in enumerate(base64.b64encode(b.getvalue()).decode() for b in (huge, wide))
    ]
    try:
        with chromium() as browser:
            alice = new_user(browser, url(web), "alice")
            alice.sign_in(password_of("alice"), register=True)
            # sign_in returns once the page's own presence record is back, which its status (sent on the
            # SUBACK) brought: the page is subscribed, each line is published once
            for message in (forged, *bombs):
                mallory.publish("im/room/lobby/mallory", json.dumps(message).encode())
            mallory.publish("im/room/lobby/mallory", chat(escapes))
            alice.see(escapes, sender="mallory")
            name = "#messages li[data-from='mallory'] .file .name"
            alice.p.wait_for_selector(name)
            assert alice.p.eval_on_selector(name, "e => [e.tagName, e.textContent, e.children.length]") == [
                "BDI",
                FORGED_FILE_NAME,
                0,
            ]
            assert alice.p.locator("#messages li[data-from='bob']").count() == 0
            alice.p.wait_for_selector("#messages li[data-from='mallory'] .file .name:text-is('bomb1')")
            # no thumbnail: not base64, a PNG of 7000 x 7000 pixels, a JPEG wider than a worker's
            assert alice.p.locator("#messages img, #messages script, #messages a").count() == 0
            assert alice.p.evaluate("() => window.__pwned") is None
            assert alice.p.title() in ("imcli", "(1) imcli")
            no_errors(alice)
    finally:
        mallory.close()


def test_mentions_count_as_unread_and_notify(web: ServeInfo, tmp_path: Path) -> None:
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        origin = url(web).rstrip("/")
        alice.p.context.grant_permissions(["notifications"], origin=origin)
        # count the notifications the page raises (the headless browser shows none)
        alice.p.add_init_script(
            "window.__notes = []; window.Notification = class {"
            " constructor(t, o) { window.__notes.push([t, o.body]); }"
            " static get permission() { return 'granted'; }"
            " static requestPermission() { return Promise.resolve('granted'); } };"
        )
        alice.p.reload()
        alice.sign_in(password_of("alice"), register=True)
        alice.open_room("elsewhere")
        carol = cli(web, tmp_path, "carol")
        ok(carol, "say", "no mention here")
        ok(carol, "say", "@alice can you look?")
        wait_conv(alice, "room:lobby", unread=2)
        assert alice.p.locator("li[data-key='room:lobby'] .badge.mention").count() == 1
        alice.p.wait_for_function("() => window.__notes.length === 1")
        assert alice.p.evaluate("() => window.__notes") == [["carol in lobby", "@alice can you look?"]]
        alice.open_conv("room:lobby")
        wait_conv(alice, "room:lobby", unread=0)
        assert alice.p.locator("#messages li.message.mention").count() == 1
        no_errors(alice)


def test_a_line_shows_sending_until_the_broker_has_it(web: ServeInfo, tmp_path: Path) -> None:
    """The page showed its own line as sent at once, even when its PUBLISH had not reached the broker
    (held here: Playwright stands between the page and the broker's WebSocket). Now it says "sending…"
    until the PUBACK, and the line is archived once that comes."""
    held: list[str | bytes] = []
    servers: list[WebSocketRoute] = []
    holding = [False]

    def relay(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        servers.append(server)

        def to_server(message: str | bytes) -> None:
            if holding[0]:
                held.append(message)
            else:
                server.send(message)

        ws.on_message(to_server)
        server.on_message(ws.send)

    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.p.route_web_socket(re.compile(".*"), relay)
        alice.p.goto(url(web))  # again, routed: the page opens its socket on sign-in
        alice.sign_in(password_of("alice"), register=True)
        alice.open_room("slow")
        holding[0] = True
        alice.p.fill("#text", "wait for it")
        alice.p.press("#text", "Enter")
        line = alice.p.locator("#messages li.message", has_text="wait for it")
        line.locator(".state").wait_for()
        assert line.get_attribute("class") == "message pending"
        assert line.locator(".state").text_content() == "sending…"
        assert line.locator(".text").text_content() == "wait for it"
        assert held, "the PUBLISH was not held"
        holding[0] = False
        for message in held:  # the held PUBLISH goes on: the broker's PUBACK clears the state
            servers[-1].send(message)
        alice.p.wait_for_function(
            "() => [...document.querySelectorAll('#messages li.message')].some(li => "
            "li.querySelector('.text')?.textContent === 'wait for it' && !li.querySelector('.state'))"
        )
        assert alice.p.locator("#messages li.pending, #messages li.failed").count() == 0
        archived(cli(web, tmp_path, "bob"), "slow", ["wait for it"])
        no_errors(alice)


def test_history_scrolls_back(web: ServeInfo, tmp_path: Path) -> None:
    """Past a line whose ``ts`` a raw client set to 0: the older page is asked before the archive's own
    time of the oldest line it sent (``at``), not the oldest ``ts`` shown, which made it come back empty."""
    carol = cli(web, tmp_path, "carol")
    for i in range(60):
        ok(carol, "say", "--room", "old", f"line {i}")
    raw = connect_raw("127.0.0.1", web.address.port, "carol", "carol:raw", password_of("carol"))
    try:
        raw.publish("im/room/old/carol", encode(ChatMessage(text="from 1970", ts=0)))
    finally:
        raw.close()
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        alice.open_room("old")
        alice.see("line 59")
        alice.p.wait_for_selector("#older:not([hidden])")
        assert "line 0" not in alice.texts()
        alice.p.click("#older")
        alice.see("line 0")
        assert alice.texts() == ["from 1970", *(f"line {i}" for i in range(60))]  # shown by its ts
        no_errors(alice)


def test_wrong_password_and_taken_name_are_one_line(web: ServeInfo) -> None:
    with chromium() as browser:
        bob = new_user(browser, url(web), "bob")
        bob.p.fill("#account", "bob")
        bob.p.fill("#password", "not-the-password")
        bob.p.click("#signin-button")
        bob.p.wait_for_function("() => document.getElementById('signin-error').textContent !== ''")
        assert bob.p.text_content("#signin-error") == "wrong account name or password"
        bob.p.click("#register-button")  # bob exists
        bob.p.wait_for_function("() => document.getElementById('signin-error').textContent.includes('taken')")
        assert bob.p.is_hidden("#app")


def test_a_request_the_broker_drops_for_the_rate_fails_at_once(tmp_path: Path) -> None:
    """The page reads the embedded broker's ``rate`` notice as the CLI does: a request it names
    fails at once with the broker's reason, not with "no worker answered" after 5 s."""
    require_chromium()
    limits = Limits(publish_rate=0.001, publish_burst=60)  # what signing in takes, then (nearly) nothing
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0, limits=limits)) as info:
        store = AccountStore(info.data_dir)
        for name in ("bob", "carol"):
            store.add(name, password_of(name))
        with chromium() as browser:
            bob = new_user(browser, url(info), "bob")
            bob.sign_in(password_of("bob"))
            spender = connect_raw(info.address.host, info.address.port, "bob", "bob:spender")
            try:  # the account's rate spent from another connection of bob's
                assert spender.subscribe("im/user/bob/notice") == 1
                for i in range(70):
                    spender.publish("im/room/lobby/bob", chat(f"m{i}"))
                assert json.loads(spender.expect("im/user/bob/notice").payload)["code"] == "rate"
            finally:
                spender.close()
            bob.p.fill("#dm-input", "carol")
            bob.p.press("#dm-input", "Enter")  # resolves carol: a request
            bob.p.wait_for_function(
                "() => document.getElementById('status').textContent.includes('dropped the request')",
                timeout=TIMEOUT_MS,
            )
            status = bob.p.text_content("#status") or ""
            assert "messages sent too fast (try again in" in status and "no worker answered" not in status
            no_errors(bob)


@contextlib.contextmanager
def file_limited(tmp_path: Path, file_rate: float, file_burst: int) -> Iterator[tuple[ServeInfo, WebUser, Path]]:
    """A broker whose file-transfer rate is ``file_rate`` (chunks of 4 KiB), alice signed in on
    the page in the lobby, and a file of 40 chunks for her to send."""
    require_chromium()
    limits = Limits(file_rate=file_rate, file_burst=file_burst, max_chunk=4096)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0, limits=limits)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "carol"):
            store.add(name, password_of(name))
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(40 * 4088))
        with chromium() as browser:
            alice = new_user(browser, url(info), "alice")
            alice.sign_in(password_of("alice"))
            yield info, alice, source


def test_an_upload_waits_out_a_short_file_transfer_rate_notice_and_goes_on(tmp_path: Path) -> None:
    """Chunks dropped for a file-transfer rate that refills soon (4 chunks, then 40 a second): the
    page waits as the broker's notice says and goes on from the worker's copy, as ``imcli send``
    does; without the notice it would wait out 15 s of silence per 4 chunks and give up after 4."""
    with file_limited(tmp_path, file_rate=40.0, file_burst=4) as (info, alice, source):
        alice.p.set_input_files("#file-input", str(source))
        alice.p.wait_for_selector("#messages li[data-from='alice'] .file .name:text-is('big.bin')", timeout=120_000)
        assert "file transfer" in (alice.p.text_content("#messages") or "")  # the broker did drop chunks, and said so
        no_errors(alice)
        carol = cli(info, tmp_path, "carol")
        (big,) = [f for f in json.loads(ok(carol, "files", "--json")) if f["name"] == "big.bin"]
        ok(carol, "get", big["id"], "-o", str(tmp_path / "got.bin"))
    assert (tmp_path / "got.bin").read_bytes() == source.read_bytes()


def test_an_upload_fails_at_once_on_a_long_file_transfer_rate_notice(tmp_path: Path) -> None:
    """A file-transfer rate that refills in over 5 s: the upload fails with the CLI's line, naming
    the file transfer rate and its retry, not "the files worker stopped answering" a minute later."""
    with file_limited(tmp_path, file_rate=0.001, file_burst=3) as (_, alice, source):
        alice.p.set_input_files("#file-input", str(source))
        assert_rate_line(alice, r"big\.bin: ", timeout=120_000)
        no_errors(alice)


def assert_rate_line(user: WebUser, prefix: str, timeout: float) -> None:
    """The page's status line is, after ``prefix``, the CLI's line for a long file-transfer rate notice."""
    user.p.wait_for_function(
        "() => document.getElementById('status').textContent.includes('dropped part of the file transfer')",
        timeout=timeout,
    )
    status = user.p.text_content("#status") or ""
    assert re.fullmatch(
        prefix + r"the broker dropped part of the file transfer: account alice hit its file transfer rate "
        r"\(try again in (\d+)s: send it again, it goes on where it stopped\)",
        status,
    ), status


@contextlib.contextmanager
def downloading(tmp_path: Path, limits: Limits) -> Iterator[tuple[WebUser, bytes]]:
    """carol sends a file of 2 MiB (twice the files worker's window) to the lobby from the CLI;
    then, on the same data directory, a broker with ``limits``: alice signs in on the page and
    presses the file's Download button. Her page and the file's bytes. (Sent first without the
    limits: carol's chunks go on the same file-transfer rate as alice's acknowledgements.)"""
    require_chromium()
    data, body = tmp_path / "data", os.urandom(2 << 20)
    (tmp_path / "report.bin").write_bytes(body)
    with BackgroundServer(BrokerSettings(data_dir=data, port=0, ws_port=0)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "carol"):
            store.add(name, password_of(name))
        ok(cli(info, tmp_path, "carol"), "send", "--room", "lobby", str(tmp_path / "report.bin"))
    strict = BrokerSettings(data_dir=data, port=0, ws_port=0, limits=limits)
    with BackgroundServer(strict) as info, chromium() as browser:
        alice = new_user(browser, url(info), "alice")
        alice.sign_in(password_of("alice"))
        alice.p.click("#messages li[data-from='carol'] .file button", timeout=60_000)
        yield alice, body


def test_a_download_waits_out_a_short_file_transfer_rate_notice_and_completes(tmp_path: Path) -> None:
    """alice's acknowledgements of a download go on the file-transfer rate (one, then one every
    2 s): the broker drops those in between and says so; the worker, a window ahead of the last
    acknowledgement it got, waits; the page sends it again after the notice's wait and completes,
    intact, as ``imcli get`` does (without the notice: 15 s of silence, then "the download stopped")."""
    with downloading(tmp_path, Limits(file_rate=0.5, file_burst=1)) as (alice, body):
        alice.p.wait_for_selector("#messages li[data-from='carol'] .file a.save", timeout=120_000)
        with alice.p.expect_download() as saving:
            alice.p.click("#messages li[data-from='carol'] .file a.save")
        assert Path(saving.value.path()).read_bytes() == body
        assert "file transfer" in (alice.p.text_content("#status") or "")  # the broker did drop some, and said so
        no_errors(alice)


def test_a_download_fails_at_once_on_a_long_file_transfer_rate_notice(tmp_path: Path) -> None:
    """A file-transfer rate that refills in over 5 s: the download fails with the CLI's line, naming
    the file transfer rate and its retry, not "the download stopped" 15 s later; the button comes back."""
    with downloading(tmp_path, Limits(file_rate=0.001, file_burst=1)) as (alice, _):
        assert_rate_line(alice, "", timeout=60_000)
        assert alice.p.is_enabled("#messages li[data-from='carol'] .file button")
        no_errors(alice)


def test_screenshots(web: ServeInfo, tmp_path: Path) -> None:
    """The README's pictures: desktop and phone sizes (IMCLI_SCREENSHOTS=docs/screenshots writes them there)."""
    out = Path(os.environ.get("IMCLI_SCREENSHOTS") or tmp_path / "shots")
    out.mkdir(parents=True, exist_ok=True)
    carol = cli(web, tmp_path, "carol")
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.p.screenshot(path=str(out / "signin.png"))
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, url(web), "bob", viewport=(390, 780))
        bob.sign_in(password_of("bob"))
        ok(carol, "rename", "Carol")
        ok(carol, "say", "morning all, the build is green")
        bob.say("nice! @alice lunch at noon?")
        alice.say("sure, see you there")
        ok(carol, "dm", "alice", "can you review my branch?")
        alice.p.fill("#group-input", "team")
        alice.p.click("#group-create")
        alice.wait_title("#team")
        alice.group_action("#invite-button", "bob")
        alice.say("standup in 5")
        picture = tmp_path / "whiteboard.png"
        whiteboard(picture)
        alice.p.set_input_files("#file-input", str(picture))
        alice.p.wait_for_selector("#messages li[data-from='alice'] .file img.thumb")
        alice.p.wait_for_selector("#upload", state="hidden")  # the progress bar goes once it is sent
        alice.p.screenshot(path=str(out / "group-image.png"))
        alice.open_conv("room:lobby")
        alice.see("nice! @alice lunch at noon?")
        alice.p.screenshot(path=str(out / "desktop.png"))
        bob.see("sure, see you there")
        bob.p.screenshot(path=str(out / "phone.png"))
        bob.p.click("#menu")
        bob.p.screenshot(path=str(out / "phone-menu.png"))
        no_errors(alice, bob)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "desktop.png",
        "group-image.png",
        "phone-menu.png",
        "phone.png",
        "signin.png",
    ]


def whiteboard(path: Path) -> None:
    """A picture for the screenshots: a few coloured boxes on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (480, 300), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate([(47, 111, 221), (42, 157, 75), (230, 160, 30)]):
        draw.rectangle((30 + 150 * i, 60, 150 + 150 * i, 240), fill=colour)
    image.save(path, "PNG")


def test_the_web_client_on_mosquittos_websocket_listener(tmp_path: Path) -> None:
    """deploy/mosquitto's WebSocket listener serves the same files (http_dir) and carries the
    page's MQTT; imcli workers run beside it, as in production."""
    require_chromium()
    if not mosquitto_available():
        pytest.skip(NOT_INSTALLED)
    with running_mosquitto(tmp_path / "mosquitto", ws=True) as broker, running_workers(broker):
        page = f"http://127.0.0.1:{broker.ws_port}/"
        carol = Cli(CliRunner(), broker.info(), tmp_path / "config-carol")
        carol.login("carol")
        with chromium() as browser:
            alice = new_user(browser, page, "alice")
            alice.sign_in(password_of("alice"))
            bob = new_user(browser, page, "bob")
            bob.sign_in(password_of("bob"))
            alice.p.wait_for_selector("li.person.online[data-account='bob']")
            alice.say("hello over mosquitto")
            bob.see("hello over mosquitto", sender="alice")
            ok(carol, "say", HOSTILE[0])
            bob.see(HOSTILE[0], sender="carol")
            bob.open_dm("alice")
            bob.say("a dm through mosquitto")
            wait_conv(alice, "dm:bob", unread=1)
            alice.open_conv("dm:bob")
            alice.see("a dm through mosquitto", sender="bob")
            assert bob.p.evaluate("() => window.__pwned") is None
            no_errors(alice, bob)


def test_over_https_the_page_uses_wss(tmp_path: Path) -> None:
    """With TLS, the same port serves the page over https and MQTT over wss; the policy names the host."""
    require_chromium()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key, chain = tmp_path / "server.key", tmp_path / "server.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, tls_cert=chain, tls_key=key, ws_port=0)
    with BackgroundServer(settings) as info, chromium() as browser:
        AccountStore(info.data_dir).add("bob", password_of("bob"))
        page = f"https://127.0.0.1:{info.ws_port}/"
        alice = new_user(browser, page, "alice", trust_any_cert=True)
        sockets: list[str] = []
        alice.p.on("websocket", lambda ws: sockets.append(ws.url))
        alice.sign_in(password_of("alice"), register=True)
        bob = new_user(browser, page, "bob", trust_any_cert=True)
        bob.sign_in(password_of("bob"))
        alice.say("hello over wss")
        bob.see("hello over wss", sender="alice")
        assert sockets and all(u == f"wss://127.0.0.1:{info.ws_port}/mqtt" for u in sockets)
        no_errors(alice, bob)


def test_the_browser_is_a_device_and_a_revoked_one_is_signed_out(web: ServeInfo, tmp_path: Path) -> None:
    """Issue 17: the page trades the password once for a device credential, keeps only that,
    shows up in `imcli devices`, signs in with it on the next visit, and is signed out when
    the device is revoked from the terminal."""
    with chromium() as browser:
        bob = new_user(browser, url(web), "bob")
        bob.sign_in(password_of("bob"))
        bob.p.wait_for_function("() => localStorage.getItem('imcli.credential.bob') !== null")
        device = bob.p.evaluate("() => localStorage.getItem('imcli.credential.bob').split(':')[1]")
        assert device.startswith("web-")
        bob.p.wait_for_function(f"() => document.getElementById('me-device').textContent.includes('{device}')")
        stored = bob.p.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage}])")
        assert password_of("bob") not in stored

        bob_cli = cli(web, tmp_path, "bob")
        listed = json.loads(ok(bob_cli, "devices", "--json"))
        assert device in [d["name"] for d in listed]

        # the next visit needs no password
        bob.p.reload()
        bob.p.wait_for_selector("#app:not([hidden])")
        bob.p.wait_for_selector("#people li.online[data-account='bob']", state="attached")
        bob.say("back without a password")

        ok(bob_cli, "devices", "revoke", device)
        bob.p.wait_for_selector("#signin:not([hidden])")
        assert "signed out" in (bob.p.text_content("#signin-error") or "")
        assert bob.p.evaluate("() => localStorage.getItem('imcli.credential.bob')") is None
        bob.p.reload()  # and it stays signed out
        bob.p.wait_for_selector("#signin:not([hidden])")
        assert bob.p.is_hidden("#app")
        no_errors(bob)


def test_my_dm_from_another_device_shows_on_the_page(web: ServeInfo, tmp_path: Path) -> None:
    """Issue 17's sent copies: a DM alice sends from the terminal shows in her page's conversation."""
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.sign_in(password_of("alice"), register=True)
        alice_cli = cli(web, tmp_path, "alice")
        ok(alice_cli, "dm", "bob", "sent from my terminal")
        wait_conv(alice, "dm:bob")
        alice.open_conv("dm:bob")
        alice.see("sent from my terminal", sender="alice")
        no_errors(alice)


def test_the_page_gets_its_own_downloads_not_the_terminals(web: ServeInfo, tmp_path: Path) -> None:
    """The page subscribes what it reads of ``user/<me>/`` (its DMs, their sent copies, replies,
    notices, friends) and a download's own topic while it runs, not ``user/<me>/#``: a file the
    same user fetches from the terminal no longer reaches every open page of theirs, chunk by
    chunk (issue 16); the page's own download still arrives whole."""
    data = tmp_path / "report.bin"
    data.write_bytes(os.urandom(300 << 10))
    carol = cli(web, tmp_path, "carol")
    received: list[bytes] = []
    with chromium() as browser:
        alice = new_user(browser, url(web), "alice")
        alice.p.on(
            "websocket",
            lambda ws: ws.on(
                "framereceived",
                lambda frame: received.append(bytes(frame, "latin-1") if isinstance(frame, str) else frame),
            ),
        )
        alice.sign_in(password_of("alice"), register=True)
        ok(carol, "send", "--room", "lobby", str(data))
        box = "#messages li[data-from='carol'] .file"
        alice.p.wait_for_selector(f"{box} .name:text-is('report.bin')")
        alice_cli = cli(web, tmp_path, "alice")
        (report,) = [f for f in json.loads(ok(alice_cli, "files", "--json")) if f["name"] == "report.bin"]
        ok(alice_cli, "get", report["id"], "-o", str(tmp_path / "terminal.bin"))  # the terminal's download
        alice.p.click(f"{box} button:has-text('Download')")  # the page's own
        alice.p.wait_for_selector(f"{box} a.save")
        no_errors(alice)
    assert (tmp_path / "terminal.bin").read_bytes() == data.read_bytes()
    downloads: dict[str, int] = {}
    for topic, size in _publishes(b"".join(received)):
        if "/user/alice/file/" in topic:
            downloads[topic] = downloads.get(topic, 0) + size
    # one stream only, the page's: 300 KiB in two chunks of 8 bytes of offset each
    assert list(downloads.values()) == [(300 << 10) + 2 * 8]
