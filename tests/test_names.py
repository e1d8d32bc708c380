"""One rule for everything people write (issue 18): display names, signatures, about texts,
moments, comments and file names accept letters of any script and emoji of every kind (ZWJ
sequences, skin tones, keycaps, flags) and refuse what would not draw as itself on one line
(bidi overrides and isolates, zero-width characters outside an emoji sequence, controls, line
and paragraph separators, unassigned code points). Probed with hypothesis: whatever is accepted
renders as itself on one line; whatever is refused is one error line, never an exception."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imcli.cli.render import received_line
from imcli.core.names import clean_display_name, is_display_name, label
from imcli.core.text import emoji_joins, is_plain, safe
from imcli.core.wire import ErrorReply, MomentReply, MomentRequest, ProfileSet, Received
from imcli.moments.book import MomentsBook
from imcli.moments.store import MomentStore
from imcli.presence.profiles import ProfileBook

EMOJI = [
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # 👩‍👩‍👧
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # 🏳️‍🌈
    "\U0001f44d\U0001f3fd",  # 👍🏽
    "1\ufe0f\u20e3",  # 1️⃣
    "\U0001f1ef\U0001f1f5",  # 🇯🇵
    "\U0001f468\U0001f3fd\u200d\U0001f4bb",  # 👨🏽‍💻
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # 🏴 Scotland (tags)
    "\u2764\ufe0f",  # ❤️
]
REFUSED = [
    "\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200f", "\u061c",  # bidi controls
    "\u200b", "\ufeff", "\u2060",  # zero-width
    "\x07", "\x1b[2J", "\x00", "\x85", "\t", "\r",  # controls
    "\u2028", "\u2029",  # line and paragraph separators
    "\U000e0041",  # a tag outside a flag
    "\U0010fffe", "\u0378",  # unassigned
]  # fmt: skip
LOOSE_JOINERS = [
    "a\u200db",
    "\u200d\U0001f469",
    "\U0001f469\u200d",
    "\U0001f469\u200d\u200d\U0001f469",
    "x\u200d\U0001f469",
]


def _moments(tmp_path: Path) -> MomentsBook:
    return MomentsBook(MomentStore(tmp_path))


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MomentsBook]:
    moments = _moments(tmp_path_factory.mktemp("moments"))
    yield moments
    moments.store.close()


def _post(book: MomentsBook, text: str) -> MomentReply | ErrorReply:
    return book.apply("alice", MomentRequest(op="post", text=text), 1.0).reply


@pytest.mark.parametrize("emoji", EMOJI)
def test_emoji_sequences_pass_every_field(emoji: str, tmp_path: Path) -> None:
    assert is_plain(emoji) and safe(emoji) == emoji
    for name in (emoji, f"Ann {emoji}", f"{emoji}Ann"):
        assert is_display_name(name), name
        assert safe(label("ann", name)) == f"{name} (@ann)"
    assert ProfileBook().check(ProfileSet(signature=f"hi {emoji}", about=f"line {emoji}\nand {emoji}")) is None
    book = _moments(tmp_path)
    posted = _post(book, f"family {emoji}\nsecond line {emoji}")
    assert isinstance(posted, MomentReply) and posted.moments[0].text == f"family {emoji}\nsecond line {emoji}"
    comment = book.apply("alice", MomentRequest(op="comment", post=posted.moments[0].id, text=emoji), 2.0).reply
    assert isinstance(comment, MomentReply) and comment.moments[0].comments[0].text == emoji


@pytest.mark.parametrize("bad", [*REFUSED, *LOOSE_JOINERS])
def test_what_does_not_draw_as_itself_is_refused_by_every_field(bad: str, tmp_path: Path) -> None:
    text = f"x{bad}y"
    assert not is_plain(text) and not is_plain(text, lines=True)
    assert not is_display_name(text)
    for request in (ProfileSet(signature=text), ProfileSet(about=f"ok\n{text}")):
        refusal = ProfileBook().check(request)
        assert isinstance(refusal, ErrorReply) and refusal.code == "invalid"
    refused = _post(_moments(tmp_path), text)
    assert isinstance(refused, ErrorReply) and refused.text.startswith("invalid moment text")


@pytest.mark.parametrize("name", ["Bob \u2192 you", "a \u21d2 b", "x \u2200 y", "\u2502 box", "\u25b6 play"])
def test_a_display_name_holds_emoji_but_no_arrows_or_signs(name: str) -> None:
    assert is_plain(name) and not is_display_name(name)


def test_a_line_feed_is_for_multi_line_fields_only() -> None:
    assert is_plain("a\nb", lines=True) and not is_plain("a\nb")
    assert not is_plain("a\r\nb", lines=True)


def _renders_as_itself(text: str) -> None:
    line = received_line(Received(kind="room", sender="alice", nick=None, room="lobby", id="1", ts=0, text=text), "bob")
    assert line.plain.endswith(": " + text)
    assert len(line.plain.splitlines()) == 1
    assert all(
        unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp", "Cn")
        and (unicodedata.category(ch) != "Cf" or i in emoji_joins(text))
        for i, ch in enumerate(text)
    )


PIECES = st.sampled_from([*EMOJI, *REFUSED, *LOOSE_JOINERS, "\u200d", "\ufe0f", "\U0001f3fd", "\u20e3", "\u0301"])
writing = st.lists(PIECES | st.text(max_size=4), max_size=8).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=writing)
def test_accepted_renders_as_itself_refused_is_one_error_line(text: str, book: MomentsBook) -> None:
    if is_plain(text):
        assert safe(text) == text
        _renders_as_itself(text)
    else:
        assert safe(text) != text
    for line in text.split("\n"):
        assert len(safe(line).splitlines()) <= 1
    outcome = ProfileBook().check(ProfileSet(signature=text))
    if outcome is not None:
        assert outcome.code == "invalid" and len(outcome.text.splitlines()) == 1
    else:
        assert len(text) <= 120 and is_plain(text)
    posted = _post(book, text)
    if isinstance(posted, ErrorReply):
        assert len(posted.text.splitlines()) == 1
    else:
        assert all(is_plain(line) for line in posted.moments[0].text.split("\n"))


@settings(max_examples=400, deadline=None)
@given(name=writing)
def test_an_accepted_display_name_draws_as_itself(name: str) -> None:
    name = clean_display_name(name)
    if is_display_name(name):
        assert safe(name) == name and "\n" not in name and name == name.strip()
        _renders_as_itself(name)
        assert safe(label("alice", name)) == label("alice", name)
