"""Second-round attacks on issue 15's client-side fixes, with clients this project did not write:
how others' text reaches a terminal (the CLI's lines and the broker's own log), the packet
grammar at the edges MQTT 3.1.1 names, and ``imcli listen`` catching up from the archive.
Each test failed before the change it comes with."""

from __future__ import annotations

import re
import socket
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imcli.broker.accounts import AccountStore
from imcli.broker.packets import check_packet
from imcli.broker.server import BrokerSettings
from imcli.cli.chat_state import SEEN_KEPT
from imcli.cli.common import print_error
from imcli.cli.render import MAX_MARKS, received_line, safe
from imcli.client import services
from imcli.client.listener import Listener, RecentIds
from imcli.client.services import Conversation
from imcli.core.errors import ImcliError, NotFound
from imcli.core.mqtt import BrokerAddress
from imcli.core.wire import ChatMessage, ErrorReply, HistoryReply, Received, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import test_frames, test_fuzz
from tests.conftest import Proc, ident
from tests.rawmqtt import connect_raw, field, login, packet, password_of, publish_packet, read_packets, wait_until
from tests.test_frames import PINGREQ, PINGRESP, Net, connect_body
from tests.test_fuzz import Fuzz

net = test_frames.net  # a broker of this module's own, with a bystander pair and a watcher
fuzz = test_fuzz.fuzz  # one with a WebSocket listener

# ---------------------------------------------------------------- rendering: what draws nothing or over others

MARKS = ("Mn", "Mc", "Me")
ZALGO = "\u0301\u0336\u0489\u20dd\u0345\u034f\ufe0f\U000e0100"  # accents, overlays, enclosing, CGJ, selectors
BLANKS = "\u3164\u115f\u1160\uffa0"  # Hangul fillers: letters that draw nothing
NONCHARACTERS = "\uffff\ufffe\ufdd0\U0001ffff\U0010ffff\u0378"  # and one unassigned


def test_hangul_fillers_and_noncharacters_are_shown_as_escapes() -> None:
    for ch in BLANKS + NONCHARACTERS:
        assert ch not in safe(f"a{ch}b"), repr(ch)
        assert safe(f"a{ch}b").startswith("a\\") and safe(f"a{ch}b").endswith("b")


def test_a_combining_mark_cannot_stack_on_the_sender_or_pile_over_other_lines() -> None:
    zalgo = "\u0301" * 60
    item = Received(kind="room", sender="alice", room="lobby", id="1", ts=0, text=zalgo + "hi" + zalgo)
    line = received_line(item, me="bob").plain
    shown = line.split(": ", 1)[1]
    assert unicodedata.category(shown[0]) not in MARKS  # nothing to land on the ": " (or the name) before it
    assert shown.count("\u0301") == MAX_MARKS  # on "i", the only base: the rest are escapes
    # nicknames are ASCII by rule, but a renderer does not rely on it
    nick = Received(kind="dm", sender="alice", nick="\u0301" * 9 + "\u3164", to="bob", id="1", ts=0, text="x")
    assert "\u0301" not in received_line(nick, me="bob").plain


def test_written_languages_and_emoji_keep_their_marks() -> None:
    for text in ("tiếng Việt", "नमस्ते हिंदी", "e\u0301\u0302", "❤️ 👍🏽", "ঐ ক্ষ", "שָׁלוֹם", "ka\u0301 dŭ"):
        assert safe(text) == text, text


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(ZALGO + BLANKS + NONCHARACTERS) | st.text(max_size=4), max_size=12).map("".join))
def test_no_run_of_marks_and_nothing_blank(text: str) -> None:
    out = safe(text)
    assert not out or unicodedata.category(out[0]) not in MARKS, repr(out)  # a mark needs its base in the field
    run = 0
    for ch in out:
        category = unicodedata.category(ch)
        assert category not in ("Cc", "Cf", "Cs", "Cn", "Zl", "Zp") and ch not in BLANKS, repr(out)
        run = run + 1 if category in MARKS else 0
        assert run <= MAX_MARKS, repr(out)


# ---------------------------------------------------------------- the broker's log is a terminal too


def test_the_broker_log_quotes_a_client_id_as_escapes(procs: Callable[..., Proc], tmp_path: Path) -> None:
    """A client id is the client's to choose: ``x\\x1b]52;c;…\\x07`` writes the operator's clipboard
    (OSC 52), ``x\\n12:00:01 …`` forges a log line, when ``imcli serve --verbose`` logs it."""
    data = tmp_path / "data"
    AccountStore(data).add("mallory", password_of("mallory"))
    serve: Proc = procs("serve", "--verbose", "--port", "0", "--data-dir", str(data), env={})
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", serve.line(timeout=30))
    assert match, serve.err_lines
    port = int(match.group(1))
    hostile = "mallory:\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J\u202e\n12:00:01 amqtt.broker forged"
    body = field(b"MQTT") + bytes([4, 0xC2]) + b"\x00\x01" + field(hostile.encode())  # keep-alive 1 s
    body += field(b"mallory") + field(password_of("mallory").encode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet(0x10, body))
        assert read_packets(sock, bool)[0] == [(0x20, b"\x00\x00")]
        # silent past its keep-alive: the broker closes it and logs its client id (imcli.broker.sessions)
        assert wait_until(lambda: any("nothing heard" in line for line in serve.err_lines), 30), serve.err_lines
    assert serve.stop() == 0
    logged = "\n".join(serve.err_lines)
    assert not any(ch in logged for ch in "\x1b\x07\u202e"), [line for line in serve.err_lines if "mallory" in line]
    assert not any(line.startswith("12:00:01") for line in serve.err_lines)


# ---------------------------------------------------------------- imcli listen catching up from the archive


def _until(listener: Listener, text: str) -> list[Received]:
    """What ``listener`` shows up to and with ``text``."""
    got: list[Received] = []

    def arrived() -> bool:
        got.extend(listener.pending())
        return any(m.text == text for m in got)

    assert wait_until(arrived, 20), [m.text for m in got]
    return got


def test_a_bots_line_shown_just_before_a_broker_restart_is_not_shown_again(tmp_path: Path) -> None:
    """``mosquitto_pub -m 'deploy done'`` has no id: the listener made one up when it showed it,
    the archive another when it stored it. After a restart that lost the session, the catch-up
    (from a little before the last contact) must match the archive's copy to the line shown."""
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0)
    with BackgroundServer(settings) as info:
        AccountStore(info.data_dir).add("alice", password_of("alice"))
        AccountStore(info.data_dir).add("bob", password_of("bob"))
        with Listener(ident(info, "bob", "laptop"), session="laptop") as listener:
            bot = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
            try:
                bot.publish("im/room/lobby/alice", b"deploy done")
                bot.publish("im/room/lobby/alice", b"deploy done")  # twice: two lines, each shown once
                bot.publish("im/room/lobby/alice", encode(ChatMessage(text="marker")))
                first = _until(listener, "marker")
            finally:
                bot.close()
            assert [m.text for m in first if m.sender == "alice"] == ["deploy done", "deploy done", "marker"]
            seen, last = listener.seen.newest(SEEN_KEPT), listener.last_contact
    with BackgroundServer(settings) as info:  # the broker's sessions are gone; the archive is not
        bot = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
        try:
            bot.publish("im/room/lobby/alice", b"deploy done")  # a third, while bob is away
            bot.publish("im/user/bob/dm/alice", encode(ChatMessage(text="while away")))
        finally:
            bot.close()
        bob = ident(info, "bob", "probe")
        assert wait_until(lambda: "while away" in {m.text for m in services.history(bob, None).messages}, 15)
        with Listener(
            ident(info, "bob", "laptop"), session="laptop", seen=RecentIds(initial=seen), since=last
        ) as again:
            shown = _until(again, "while away")  # the catch-up's newest: what it brings comes before
        assert [m.text for m in shown if m.sender == "alice"] == ["deploy done", "while away"]
        assert all(m.missed for m in shown if m.sender == "alice")


# ---------------------------------------------------------------- packets at the edges of MQTT 3.1.1's grammar

FRAMES_ROOM = "im/room/frames/mallory"


def test_a_password_without_a_user_name_closes_the_connection(net: Net) -> None:
    """MQTT-3.1.2-22: with the User Name Flag 0 the Password Flag must be 0 (it got CONNACK 4)."""
    got, closed = net.attack(packet(0x10, connect_body(b"mallory:nouser", flags=0x42)), signed_in=False)
    assert closed and got == [], got
    net.unharmed()


def _other_protocol(name: bytes, level: int, client_id: bytes = b"mallory:old") -> bytes:
    body = field(name) + bytes([level, 0xC2]) + b"\x00\x1e" + field(client_id)
    return packet(0x10, body + field(b"mallory") + field(password_of("mallory").encode()))


NOT_LET_IN = {
    # well-formed (MQTT 3.1.1 allows it), but an account without its password is not let in
    "a user name without a password": packet(0x10, connect_body(b"mallory:nopass", flags=0x82)),
    "MQIsdp, level 3 (MQTT 3.1)": _other_protocol(b"MQIsdp", 3),
    "MQIsdp with a client id not UTF-8": _other_protocol(b"MQIsdp", 3, b"mallory:\xff") + PINGREQ,
    "MQTT, level 3": _other_protocol(b"MQTT", 3),
    "MQTT, level 5": _other_protocol(b"MQTT", 5),
}


@pytest.mark.parametrize("case", list(NOT_LET_IN))
def test_a_connect_of_another_protocol_or_without_a_password_is_not_let_in(net: Net, case: str) -> None:
    assert check_packet(0x10, NOT_LET_IN[case][2:], connected=False, max_client_id=128) == 0  # not malformed
    got, closed = net.attack(NOT_LET_IN[case], signed_in=False)
    assert closed and all(first == 0x20 and body != b"\x00\x00" for first, body in got), got
    net.unharmed()


EDGES_CLOSED = {
    "a remaining length of 5 bytes": b"\x30\xff\xff\xff\xff\x01",
    "a QoS 0 PUBLISH with an empty topic": publish_packet(b"", b"x"),
    "a SUBSCRIBE with reserved bits in its QoS byte": packet(0x82, b"\x00\x05" + field(b"im/room/+/+") + b"\x41"),
    "a SUBSCRIBE with requested QoS 3": packet(0x82, b"\x00\x05" + field(b"im/room/+/+") + b"\x03"),
}


@pytest.mark.parametrize("case", list(EDGES_CLOSED))
def test_edges_of_the_grammar_close_the_connection(net: Net, case: str) -> None:
    got, closed = net.attack(EDGES_CLOSED[case])
    assert closed and got == [], got
    net.unharmed()


_NONMINIMAL = field(FRAMES_ROOM.encode()) + b"\x00\x05" + b"long form"
_BOM, _NONCHARACTER = ("\ufeff" + FRAMES_ROOM).encode(), (FRAMES_ROOM + "\uffff").encode()
EDGES_IN_STEP = {
    # MQTT 3.1.1 does not ask for the shortest remaining-length form (MQTT 5 does): read it as its value
    "a PUBLISH whose remaining length has a needless second byte": (
        b"\x32" + bytes([0x80 | len(_NONMINIMAL), 0x00]) + _NONMINIMAL,
        [(0x40, b"\x00\x05")],
    ),
    "acknowledgements of ids nobody sent": (
        packet(0x62, b"\x00\x07") + packet(0x70, b"\x00\x08") + packet(0x50, b"\x00\x09") + packet(0x40, b"\x00\x0a"),
        [],
    ),
    # U+FEFF is a character, not to be skipped (MQTT-1.5.3-3), and noncharacters are well-formed:
    # the ACL refuses the topic
    "a topic with a BOM": (publish_packet(_BOM, b"bom", qos=1), [(0x40, b"\x00\x01")]),
    "a topic with a noncharacter": (publish_packet(_NONCHARACTER, b"nc", qos=1), [(0x40, b"\x00\x01")]),
    "a QoS 2 PUBLISH and its PUBREL": (
        publish_packet(FRAMES_ROOM.encode(), b"q2", qos=2, packet_id=4) + packet(0x62, b"\x00\x04"),
        [(0x50, b"\x00\x04"), (0x70, b"\x00\x04")],
    ),
}


@pytest.mark.parametrize("case", list(EDGES_IN_STEP))
def test_edges_of_the_grammar_keep_the_connection_in_step(net: Net, case: str) -> None:
    data, answers = EDGES_IN_STEP[case]
    got, closed = net.attack(data)
    assert not closed
    assert got == [*answers, (PINGRESP, b"")], got
    net.unharmed()


def test_packets_byte_by_byte_and_pipelined_with_a_subscribe_mid_flood(net: Net) -> None:
    publishes = [publish_packet(FRAMES_ROOM.encode(), b"flood %d" % i, qos=1, packet_id=i + 1) for i in range(200)]
    subscribe = packet(0x82, b"\x01\x00" + field(b"im/room/frames/+") + b"\x01")
    with socket.create_connection(("127.0.0.1", net.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in login("mallory") + publishes[0]:  # one byte a segment
            sock.sendall(bytes([byte]))
        sock.sendall(b"".join(publishes[1:100]) + subscribe + b"".join(publishes[100:]) + PINGREQ)  # one burst

        # deliveries to oneself may follow the PINGRESP: read up to the last one as well
        def done(got: list[tuple[int, bytes]]) -> bool:
            return (PINGRESP, b"") in got and any(body.endswith(b"flood 199") for _, body in got)

        got, closed = read_packets(sock, done)
    assert not closed
    acks = [(first, body) for first, body in got if first >> 4 in (2, 4, 9, 13)]
    expected = [(0x20, b"\x00\x00"), *((0x40, i.to_bytes(2, "big")) for i in range(1, 101))]
    expected += [(0x90, b"\x01\x00\x01"), *((0x40, i.to_bytes(2, "big")) for i in range(101, 201)), (PINGRESP, b"")]
    assert acks == expected
    delivered = [body[2 + len(FRAMES_ROOM) + 2 :] for first, body in got if first >> 4 == 3]  # QoS 1: an id
    assert delivered == [b"flood %d" % i for i in range(100, 200)]  # those after the SUBACK, each once
    net.unharmed()


def test_half_packets_in_websocket_frames(fuzz: Fuzz) -> None:
    """A WebSocket binary frame is not a packet: halves and pairs of packets in frames are one stream."""
    from websockets.sync.client import connect

    assert fuzz.info.ws_port is not None
    hello = login("mallory")
    first = publish_packet(b"im/room/fuzz/mallory", b"split in three", qos=1, packet_id=1)
    second = publish_packet(b"im/room/fuzz/mallory", b"paired", qos=1, packet_id=2)
    uri = f"ws://127.0.0.1:{fuzz.info.ws_port}/"
    with connect(uri, subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(hello[:3])
        ws.send(hello[3:])
        assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"
        ws.send(first[:2])
        ws.send(first[2:9])
        ws.send(first[9:] + second + PINGREQ)
        stream = b""
        while not stream.endswith(b"\xd0\x00"):
            stream += ws.recv(timeout=10)  # type: ignore[operator]
    assert stream == b"\x40\x02\x00\x01\x40\x02\x00\x02\xd0\x00"
    assert [m.payload for m in fuzz.bob.until("im/room/fuzz/mallory", b"paired")][-2:] == [b"split in three", b"paired"]
    fuzz.still_chatting()


def test_an_error_line_quoting_others_words_is_one_line_of_escapes(capfd: pytest.CaptureFixture[str]) -> None:
    """``Error:`` lines quote a worker's or a broker's words (an ErrorReply's text, on a broker the user
    does not run), a server certificate's names, what was typed: OSC 52 or a line feed in them acted."""
    print_error(ImcliError("no group #x \x1b]52;c;cm0gLXJmIH4K\x07\u202e\n12:00:01 lobby alice: pay me", "hint"))
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "\u202e" not in err, repr(err)
    assert "\\x1b]52" in err and "\\x0a12:00:01" in err


# ---------------------------------------------------------------- a group's history and its members


def test_a_member_let_back_in_reads_the_group_as_any_new_member_does(
    server: ServeInfo, users: Callable[..., None]
) -> None:
    """The rule: a group's members read its history from the group's creation (not their own
    joining): an invitee sees what was said before; so does one kicked and invited back, what was
    said while out included (an admin let it in, as an invitee). While out, it reads none of it."""
    users("alice", "bob")
    alice, bob = ident(server, "alice"), ident(server, "bob")
    team = Conversation.parse("#team")
    services.group_request(alice, "create", "team", private=True)
    services.group_say(alice, "team", ChatMessage(text="before bob"))
    services.group_request(alice, "invite", "team", user="bob")
    services.group_request(alice, "kick", "team", user="bob")
    services.group_say(alice, "team", ChatMessage(text="while bob was out"))
    assert wait_until(lambda: "while bob was out" in {m.text for m in services.history(alice, team).messages}, 10)
    with pytest.raises(NotFound):
        services.history(bob, team)
    assert "while bob was out" not in {m.text for m in services.history(bob, None).messages}
    services.group_request(alice, "invite", "team", user="bob")

    def readable() -> list[str]:
        try:
            return [m.text for m in services.history(bob, team).messages]
        except NotFound:  # the archive has not seen the new record yet
            return []

    assert wait_until(lambda: readable() == ["before bob", "while bob was out"], 10), readable()


WS_FRAMES: dict[str, tuple[list[bytes], bytes | str]] = {
    # amqtt's WebSocket reader spun for ever (the whole broker frozen) when a peer closed after an
    # empty frame: (frames up to the CONNACK, the last frame before the close)
    "an empty binary frame, then the close": ([login("mallory")], b""),
    "empty frames around halves of a CONNECT": ([b"", login("mallory")[:4], b"", login("mallory")[4:], b""], b""),
    # MQTT-6.0.0-1: MQTT packets travel in binary frames; a text frame closes the connection
    "a text frame": ([login("mallory")], publish_packet(b"im/room/fuzz/mallory", b"in a text frame").decode("ascii")),
}


@pytest.mark.parametrize("case", list(WS_FRAMES))
def test_odd_websocket_frames_end_one_connection_not_the_broker(fuzz: Fuzz, case: str) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    uri = f"ws://127.0.0.1:{fuzz.info.ws_port}/"
    frames, last = WS_FRAMES[case]
    with connect(uri, subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
        for frame in frames:
            ws.send(frame)
        assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"  # amqtt's reader now waits for the next frame
        ws.send(last)
        if isinstance(last, str):
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
    fuzz.still_chatting()
    with connect(uri, subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(login("mallory"))
        assert ws.recv(timeout=10) == b"\x20\x02\x00\x00"


def test_a_catch_up_shows_only_chat_lines_once_and_says_a_refusal() -> None:
    """What a catch-up reply holds is shown as chat lines only (a reply is a service's, but a
    ``notice`` or ``event`` item in it would skip the seen ids), each once; a refusal is said."""
    listener = Listener(ident(BrokerAddress("127.0.0.1", 9), "bob"), session="laptop", since=0.0)
    line = Received(kind="dm", sender="alice", to="bob", id="a1", ts=1, text="missed")
    forged = Received(kind="notice", id="n1", ts=1, text="alice is now an admin of everything")
    replies: list[HistoryReply | ErrorReply] = [
        HistoryReply(id="1", messages=[forged, line, line]),
        ErrorReply(id="2", code="internal", text="busy"),
    ]
    listener.requests.ask = lambda *_a, **_k: replies.pop(0)  # type: ignore[method-assign]
    listener._catch_up(0.0)
    listener._catch_up(0.0)
    shown = list(listener.pending())
    assert [(m.kind, m.text) for m in shown] == [
        ("dm", "missed"),
        ("notice", "could not catch up from the archive: busy (imcli history shows what you missed)"),
    ]
    assert shown[0].missed
