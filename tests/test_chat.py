"""``imcli chat`` in a real pseudo-terminal, and offline delivery: what was sent while a
user was away arrives once, in order, marked missed — from the broker's queue, or from
the archive when the broker was restarted in between."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.cli.app import app
from imcli.cli.chat_session import ChatSession
from imcli.cli.chat_state import ChatState
from imcli.cli.chat_ui import ChatCompleter
from imcli.client import services
from imcli.client.listener import Listener, RecentIds
from imcli.client.services import Conversation
from imcli.core.wire import ChatMessage, Received, Topics, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, Proc, Raw, ident, password_of, wait_until
from tests.rawmqtt import connect_raw

T = Topics()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


# ---------------------------------------------------------------- in a terminal


class Terminal:
    """``imcli chat`` under pexpect; ``expect`` matches the screen text without escape codes."""

    def __init__(self, config_dir: Path) -> None:
        env = {
            **os.environ,
            "IMCLI_CONFIG_DIR": str(config_dir),
            "TERM": "xterm",
            "NO_COLOR": "1",
            "PROMPT_TOOLKIT_NO_CPR": "1",  # pexpect does not answer cursor position requests
        }
        self.child = pexpect.spawn(
            sys.executable, ["-m", "imcli", "chat"], env=env, encoding="utf-8", timeout=Proc.START, dimensions=(40, 160)
        )
        self.seen = ""

    def expect(self, pattern: str) -> str:
        """Wait until ``pattern`` (a regex) appears in the plain text; return that text."""
        while (match := re.search(pattern, self.seen)) is None:
            try:
                self.seen += ANSI.sub("", self.child.read_nonblocking(4096, timeout=Proc.START))
            except pexpect.TIMEOUT:
                raise AssertionError(f"{pattern!r} did not appear; screen so far:\n{self.seen[-2000:]}") from None
        found, self.seen = self.seen[: match.end()], self.seen[match.end() :]
        return found

    def type(self, line: str) -> None:
        self.child.sendline(line)

    def exit_code(self) -> int:
        self.child.expect(pexpect.EOF, timeout=Proc.START)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminal(cli_as: Callable[[str], Cli]) -> Iterator[Callable[[str], Terminal]]:
    opened: list[Terminal] = []

    def start(name: str) -> Terminal:
        cli = cli_as(name)
        cli.login(name)
        t = Terminal(cli.config_dir)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def online(info: ServeInfo, name: str) -> bool:
    return any(u.account == name for u in services.who(ident(info, "carol", "probe")))


def test_chat_in_a_terminal(
    server: ServeInfo, users: Callable[..., None], terminal: Callable[[str], Terminal], cli_as: Callable[[str], Cli]
) -> None:
    users("alice", "bob", "carol")
    alice = cli_as("alice")
    alice.login("alice")
    bob = terminal("bob")
    bob.expect(r"lobby>")
    assert wait_until(lambda: online(server, "bob"), 10)

    assert alice("say", "hi everyone").exit_code == 0
    bob.expect(r"lobby alice: hi everyone")
    bob.type("hello from bob")
    bob.expect(r"lobby bob: hello from bob")
    assert "hello from bob" in [
        m.text for m in services.history(ident(server, "alice", "laptop"), Conversation.parse("lobby")).messages
    ]

    bob.type("/dm alice")
    bob.expect(r"now talking in @alice")
    bob.type("just for you")
    bob.expect(r"\[dm\] bob → alice: just for you")
    received = services.history(ident(server, "alice", "laptop"), Conversation.parse("@bob")).messages
    assert [(m.sender, m.to, m.text) for m in received] == [("bob", "alice", "just for you")]
    assert alice("dm", "bob", "back at you").exit_code == 0
    since_the_echo = bob.expect(r"\[dm\] alice → you: back at you")
    assert "just for you" not in since_the_echo  # the broker's copy for bob's devices is not shown again

    bob.type("/nick Bobby")
    bob.expect(r"you are now known as Bobby")
    bob.type("/who")
    bob.expect(r"online: .*Bobby \(bob\)")
    bob.type("/room dev")
    bob.expect(r"now talking in dev")
    bob.type("/history 5")
    bob.expect(r"no messages in dev yet")
    bob.type("/group nowhere")
    bob.expect(r"no group #nowhere")
    bob.type("/frobnicate")
    bob.expect(r"unknown command /frobnicate \(type /help for the list\)")
    bob.child.send("/he\t")  # Tab completes the command
    bob.expect(r"/help")
    bob.type("")
    bob.expect(r"/quit +leave")
    bob.type("/quit")
    bob.expect(r"left imcli chat: bob is offline here")
    assert bob.exit_code() == 0
    assert wait_until(lambda: not online(server, "bob"), 10)

    assert alice("dm", "bob", "while you were out").exit_code == 0
    again = terminal("bob")
    again.expect(r"while you were away: 1 in @alice")
    again.expect(r"\(missed\) \[dm\] alice → you: while you were out")
    again.expect(r"dev \[@alice 1\]>")  # back where it left off, with what is unread elsewhere
    again.child.sendcontrol("d")
    assert again.exit_code() == 0


@pytest.mark.parametrize("key", ["c", "d"], ids=["ctrl-c", "ctrl-d"])
def test_ctrl_c_and_ctrl_d_leave_cleanly(
    server: ServeInfo, users: Callable[..., None], terminal: Callable[[str], Terminal], key: str
) -> None:
    users("bob", "carol")
    bob = terminal("bob")
    bob.expect(r"lobby>")
    assert wait_until(lambda: online(server, "bob"), 10)
    bob.child.sendcontrol(key)
    text = bob.expect(r"left imcli chat: bob is offline here")
    assert "Traceback" not in text
    assert bob.exit_code() == 0
    assert wait_until(lambda: not online(server, "bob"), 10)


def test_a_mention_rings_the_bell(
    server: ServeInfo, users: Callable[..., None], terminal: Callable[[str], Terminal]
) -> None:
    users("alice", "bob")
    bob = terminal("bob")
    bob.expect(r"lobby>")
    services.say(ident(server, "alice", "laptop"), "lobby", ChatMessage(text="no names here"))
    services.say(ident(server, "alice", "laptop"), "lobby", ChatMessage(text="@bob look"))
    screen = ""  # unfiltered: the bell is a control character
    while "look" not in screen:
        try:
            screen += bob.child.read_nonblocking(4096, timeout=Proc.START)
        except pexpect.TIMEOUT:
            raise AssertionError(screen) from None
    before, _, mention = screen.partition("no names here")
    assert "\a" not in before.split("lobby>")[-1] and "\a" in mention


def test_tab_completes_online_names() -> None:
    class Online:
        def online(self) -> list[str]:
            return ["Ally", "alice", "bob"]

    completer = ChatCompleter(Online())  # type: ignore[arg-type]

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert complete("hi al") == ["Ally", "alice"]
    assert complete("ping @b") == ["@bob"]
    assert complete("/d") == ["/dm "]
    assert complete("/nosuch") == []


def test_chat_needs_a_terminal(server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]) -> None:
    users("bob")
    bob = cli_as("bob")
    bob.login("bob")
    result = bob("chat")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: imcli chat needs a terminal (in scripts use 'imcli listen' and 'imcli say')"


# ---------------------------------------------------------------- offline delivery


@pytest.fixture
def roomy(tmp_path: Path) -> BrokerSettings:
    """Settings whose rate limit lets alice send 50 messages at once."""
    return BrokerSettings(data_dir=tmp_path / "data", port=0, limits=Limits(publish_rate=200, publish_burst=500))


def add_users(info: ServeInfo, *names: str) -> None:
    store = AccountStore(info.data_dir)
    for name in names:
        store.add(name, password_of(name))


def send_fifty(info: ServeInfo, raw_alice: Raw) -> list[str]:
    """25 direct messages and 25 group messages from alice to bob, interleaved; their texts."""
    sent = []
    for i in range(25):
        for topic, text in ((T.dm("bob", "alice"), f"dm {i}"), (T.group_msg("team", "alice"), f"group {i}")):
            raw_alice.publish(topic, encode(ChatMessage(text=text)))
            sent.append(text)
    history_has(info, sent)
    return sent


def history_has(info: ServeInfo, texts: list[str]) -> None:
    bob = ident(info, "bob", "probe")
    assert wait_until(lambda: set(texts) <= {m.text for m in services.history(bob, None, limit=1000).messages}, 15), (
        "the archive did not get every message"
    )


def make_team(info: ServeInfo) -> None:
    alice = ident(info, "alice", "laptop")
    services.group_request(alice, "create", "team", private=True)
    services.group_request(alice, "invite", "team", user="bob")


def chat_start(
    info: ServeInfo, state: ChatState, seen: list[str] | None = None
) -> tuple[Listener, ChatSession, list[Received]]:
    """What ``imcli chat`` does on start, without the terminal: connect, then catch up."""
    listener = Listener(ident(info, "bob", "laptop"), session="laptop", seen=RecentIds(initial=state.seen))
    listener.__enter__()
    session = ChatSession(ident(info, "bob", "laptop"), state, listener)
    report = session.catch_up(list(listener.pending()))
    return listener, session, report.shown


def away_while_alice_sends_fifty(info: ServeInfo) -> tuple[ChatState, list[str]]:
    """bob runs ``imcli chat`` once (his session exists from then on) and leaves; alice sends
    fifty (send_fifty). Returns what bob's chat remembered and the texts sent."""
    listener, session, _ = chat_start(info, ChatState())
    listener.close()
    state = session.remember()
    alice = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
    try:
        return state, send_fifty(info, alice)
    finally:
        alice.close()


def assert_once_in_order(shown: list[Received], sent: list[str]) -> None:
    mine = [m for m in shown if m.sender == "alice" and m.kind in ("dm", "group")]
    assert sorted(m.text for m in mine) == sorted(sent), "each message exactly once"
    for kind in ("dm", "group"):
        assert [m.text for m in mine if m.kind == kind] == [t for t in sent if t.startswith(kind)], "in order"
    assert all(m.missed for m in mine)


def test_offline_messages_arrive_once_in_order_from_the_queue(roomy: BrokerSettings, tmp_path: Path) -> None:
    with BackgroundServer(roomy) as info:
        add_users(info, "alice", "bob")
        make_team(info)
        state, sent = away_while_alice_sends_fifty(info)
        listener, _session, shown = chat_start(info, state)  # queued by the broker *and* in the archive
        listener.close()
        assert_once_in_order(shown, sent)


def test_a_bots_plain_lines_are_shown_once(roomy: BrokerSettings) -> None:
    """``mosquitto_pub -m 'deploy done'`` carries no id, so every reader makes one up: the
    queued copy and the archive's are matched by content, and a line shown live in the last
    run is not shown again by the catch-up's overlap."""
    with BackgroundServer(roomy) as info:
        add_users(info, "alice", "bob")
        listener, session, _ = chat_start(info, ChatState())
        bot = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
        try:
            bot.publish(T.dm("bob", "alice"), b"seen live")
            assert wait_until(lambda: any(m.text == "seen live" for m in listener.pending()))
            history_has(info, ["seen live"])
            listener.close()
            state = session.remember()
            lines = ["deploy done", "tests green", "deploy done"]  # a repeated line stays repeated
            for line in lines:
                bot.publish(T.dm("bob", "alice"), line.encode())
            history_has(info, lines)
        finally:
            bot.close()
        listener, session, shown = chat_start(info, state)  # queued by the broker *and* in the archive
        listener.close()
        assert [m.text for m in shown if m.sender == "alice"] == lines
        assert all(m.format == "text" and m.missed for m in shown if m.sender == "alice")


def test_offline_messages_survive_a_broker_restart(roomy: BrokerSettings) -> None:
    with BackgroundServer(roomy) as info:
        add_users(info, "alice", "bob")
        make_team(info)
        state, sent = away_while_alice_sends_fifty(info)
    with BackgroundServer(roomy) as info:  # the broker's queue is gone; the archive is not
        listener, session, shown = chat_start(info, state)
        listener.close()
        assert_once_in_order(shown, sent)
        state = session.remember()
        listener, session, shown_again = chat_start(info, state)  # and the next start shows none of them again
        listener.close()
        assert [m for m in shown_again if m.sender == "alice"] == []


def listen_once_then_fifty(info: ServeInfo, procs: Callable[..., Proc], env: dict[str, str]) -> list[str]:
    """bob logs in and runs ``imcli listen`` once (its persistent session exists from then on) and
    stops; alice sends fifty (send_fifty). Returns the texts sent."""
    args = ["login", "bob", "--host", info.address.host, "--port", str(info.address.port), "--password-stdin"]
    assert CliRunner().invoke(app, args, input=password_of("bob") + "\n", env=env).exit_code == 0
    first = procs("listen", env=env)
    first.wait_stderr("listening as bob")
    assert first.stop() == 0
    alice = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
    try:
        return send_fifty(info, alice)
    finally:
        alice.close()


def listen_again(procs: Callable[..., Proc], env: dict[str, str], sent: list[str], *args: str) -> Proc:
    """A second ``listen --json`` prints each of ``sent`` once, in order, marked missed; returns it."""
    again = procs("listen", "--json", *args, env=env)
    got: list[Received] = []
    while len([m for m in got if m.sender == "alice"]) < len(sent):
        got.append(Received.model_validate(json.loads(again.line())))
    assert_once_in_order(got, sent)
    return again


def listen_after_a_break(info: ServeInfo, procs: Callable[..., Proc], tmp_path: Path) -> tuple[Proc, list[str]]:
    """listen_once_then_fifty, then listen_again on the same broker."""
    env = {"IMCLI_CONFIG_DIR": str(tmp_path / "bob-config")}
    sent = listen_once_then_fifty(info, procs, env)
    return listen_again(procs, env, sent), sent


def test_listen_gets_what_was_queued_while_it_was_away(
    roomy: BrokerSettings, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    with BackgroundServer(roomy) as info:
        add_users(info, "alice", "bob")
        make_team(info)
        again, sent = listen_after_a_break(info, procs, tmp_path)
        assert all(m.text not in sent for m in _lines_within(again, 1.0))  # and nothing twice


def test_listen_gets_what_was_queued_while_it_was_away_across_a_broker_restart(
    roomy: BrokerSettings, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    """The embedded broker keeps sessions in memory: after a restart ``imcli listen`` finds its
    session gone and asks the archive for what arrived since it last ran (issue 15, item 6)."""
    env = {"IMCLI_CONFIG_DIR": str(tmp_path / "bob-config")}
    with BackgroundServer(roomy) as info:
        add_users(info, "alice", "bob")
        make_team(info)
        sent = listen_once_then_fifty(info, procs, env)
    with BackgroundServer(roomy) as info:  # the broker's queue is gone; the archive is not
        again = listen_again(procs, env, sent, "--port", str(info.address.port))
        assert all(m.text not in sent for m in _lines_within(again, 1.0))  # and nothing twice


def test_listen_does_not_show_a_friend_request_accepted_while_it_was_away(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], procs: Callable[..., Proc]
) -> None:
    """The friends records queued in bob's session while he was away are old: the request in the first
    was accepted in the next, so ``listen`` must not offer 'alice wants to be your friend' on its return."""
    users("alice", "bob", "carol")
    alice, bob = cli_as("alice"), cli_as("bob")
    alice.login("alice")
    bob.login("bob")
    cli_as("carol").login("carol")
    env = {"IMCLI_CONFIG_DIR": str(bob.config_dir)}
    first = procs("listen", env=env)
    first.wait_stderr("listening as bob")
    assert first.stop() == 0
    assert alice("friend", "add", "bob").exit_code == 0
    assert bob("friend", "accept", "alice").exit_code == 0
    assert alice("dm", "bob", "queued after the accept").exit_code == 0
    again = procs("listen", "--json", env=env)
    shown = [json.loads(again.line())]
    while "queued after the accept" not in shown[-1]["text"]:
        shown.append(json.loads(again.line()))
    assert alice("dm", "bob", "live").exit_code == 0
    while shown[-1]["text"] != "live":
        shown.append(json.loads(again.line()))
    assert [line["text"] for line in shown if "friend" in line["text"]] == []
    assert again.stop() == 0

    assert cli_as("carol")("friend", "add", "bob").exit_code == 0  # one still waiting is shown
    third = procs("listen", "--json", env=env)
    while "wants to be your friend" not in (line := json.loads(third.line()))["text"]:
        pass
    assert line["text"] == "carol wants to be your friend (imcli friend accept carol)"


def _lines_within(proc: Proc, seconds: float) -> list[Received]:
    got = []
    with contextlib.suppress(AssertionError):
        while True:
            got.append(Received.model_validate(json.loads(proc.line(seconds))))
    return got


def test_a_persistent_session_away_too_long_is_dropped(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, limits=Limits(session_expiry=0.5))
    with BackgroundServer(settings) as info:
        broker = info.broker
        assert broker is not None
        add_users(info, "bob")
        away = connect_raw(info.address.host, info.address.port, "bob", "bob:laptop", clean=False)
        here = connect_raw(info.address.host, info.address.port, "bob", "bob:phone", clean=False)
        for r in (away, here):
            assert r.subscribe(T.user_filter("bob")) == 1
        away.close()
        assert {"bob:laptop", "bob:phone"} <= broker.persistent_sessions()
        assert wait_until(lambda: "bob:laptop" not in broker.persistent_sessions(), 10)
        assert "bob:phone" in broker.persistent_sessions()  # connected: kept however long
        here.close()


def test_logout_drops_the_devices_sessions(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]
) -> None:
    assert server.broker is not None
    users("bob")
    bob = cli_as("bob")
    bob.login("bob")
    device = json.loads(bob("whoami", "--json").stdout)["device"]
    with Listener(ident(server, "bob", device), session=device):
        pass
    assert f"bob:{device}" in server.broker.persistent_sessions()
    out = bob("logout")
    assert out.exit_code == 0 and out.stdout.strip() == "logged out bob" and out.stderr == ""
    assert not any(cid.startswith("bob:") for cid in server.broker.persistent_sessions())


def test_logout_without_a_broker_still_logs_out(cli_as: Callable[[str], Cli], tmp_path: Path) -> None:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "gone", port=0)) as info:
        add_users(info, "bob")
        bob = Cli(CliRunner(), info, tmp_path / "bob-gone")
        bob.login("bob")
    out = bob("logout")
    assert out.exit_code == 0 and out.stdout.strip() == "logged out bob"
    assert "the broker was not reachable" in out.stderr
