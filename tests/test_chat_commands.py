"""``imcli chat`` does what the CLI does (issue 22): its slash commands, the prompt's unread
counts, a line typed while the broker is down, and a catch-up that counts what it shows."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.cli.app import app
from imcli.cli.chat_commands import COMMANDS, Note
from imcli.cli.chat_session import QUEUED, ChatSession, Output
from imcli.cli.chat_state import ChatState, load_chat_state, save_state
from imcli.client import services
from imcli.client.listener import Listener, RecentIds
from imcli.client.services import Conversation
from imcli.core.request_reply import rate_limited
from imcli.core.wire import ChatMessage, Received, Topics, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, Proc, ident, password_of, wait_until
from tests.rawmqtt import connect_raw
from tests.test_chat import Terminal

T = Topics()


@pytest.fixture
def roomy(tmp_path: Path) -> BrokerSettings:
    return BrokerSettings(data_dir=tmp_path / "data", port=0, limits=Limits(publish_rate=200, publish_burst=500))


@pytest.fixture
def chats() -> Iterator[Callable[[ServeInfo, str], ChatSession]]:
    """``chats(info, "bob")``: bob's chat session (connected, caught up), closed at the end."""
    opened: list[Listener] = []

    def start(info: ServeInfo, name: str, state: ChatState | None = None) -> ChatSession:
        state = state or ChatState()
        listener = Listener(ident(info, name, "laptop"), session="laptop", seen=RecentIds(initial=state.seen))
        listener.__enter__()
        opened.append(listener)
        session = ChatSession(ident(info, name, "laptop"), state, listener)
        session.catch_up(list(listener.pending()))
        return session

    yield start
    for listener in opened:
        listener.close()


def texts(outputs: list[Output]) -> str:
    return "\n".join(o.text for o in outputs)


def ok(session: ChatSession, line: str) -> str:
    """Run a line; it must not fail; its output as text."""
    out = session.handle(line)
    errors = [o.text for o in out if isinstance(o, Note) and o.style == "error"]
    assert not errors, f"{line}: {errors}"
    return texts(out)


def test_every_cli_command_of_groups_and_friends_has_a_slash_command() -> None:
    """The CLI's nouns, walked: each subcommand of ``group``, ``friend`` and ``config`` and each
    talking command has its chat counterpart (a new CLI command must say what chat does)."""
    in_chat = {
        "group create": "/create",
        "group join": "/join",
        "group leave": "/leave",
        "group invite": "/invite",
        "group kick": "/kick",
        "group promote": "/promote",
        "group list": "/groups",
        "group members": "/members",
        "group say": "/group",
        "friend add": "/friend",
        "friend accept": "/friend",
        "friend decline": "/friend",
        "friend remove": "/friend",
        "friend list": "/friends",
        "config set": "/policy",
        "say": "/room",
        "dm": "/dm",
        "who": "/who",
        "rename": "/nick",
        "history": "/history",
    }
    click_app = typer.main.get_command(app)
    assert isinstance(click_app, typer.core.TyperGroup)
    cli: set[str] = set()
    for name, cmd in click_app.commands.items():
        if name in ("group", "friend", "config"):
            cli.update(f"{name} {sub}" for sub in cmd.commands)  # type: ignore[attr-defined]
        elif name in ("say", "dm", "who", "rename", "history"):
            cli.add(name)
    assert cli <= set(in_chat), f"no slash command for: {sorted(cli - set(in_chat))}"
    assert set(in_chat.values()) <= set(COMMANDS)


def test_slash_commands_for_groups_and_friends(
    server: ServeInfo, users: Callable[..., None], chats: Callable[..., ChatSession]
) -> None:
    users("alice", "bob", "carol")
    bob, alice = chats(server, "bob"), chats(server, "alice")

    assert "created #team (private)" in ok(bob, "/create team private")
    assert str(bob.here) == "#team"
    assert "added carol to #team" in ok(bob, "/invite carol")  # the group the prompt is in
    assert "carol is now an admin of #team" in ok(bob, "/promote @carol #team")
    members = ok(bob, "/members")
    assert "#team  private, 2 members, owner bob" in members and "carol  (admin)" in members
    assert "removed carol from #team" in ok(bob, "/kick carol")
    assert "#team  private, 1 member" in ok(bob, "/groups")
    assert "left #team" in ok(bob, "/leave")
    assert str(bob.here) == "lobby"

    ok(alice, "/create open")
    assert "#open  public" in ok(bob, "/groups")
    assert "joined #open" in ok(bob, "/join #open")
    assert str(bob.here) == "#open"
    assert "bob" in services.group_request(ident(server, "alice"), "members", "open").group.members  # type: ignore[union-attr]

    assert "asked alice to be your friend" in ok(bob, "/friend add alice")
    request = wait_for(alice, lambda o: "wants to be your friend" in o.text)
    assert request.text == "bob wants to be your friend (/friend accept bob)"  # the in-chat command
    assert "bob wants to be your friend (/friend accept bob)" in ok(alice, "/friends")
    assert "you and bob are friends" in ok(alice, "/friend accept bob")
    assert "friends: alice" in ok(bob, "/friends")
    assert "dm-policy is now friends" in ok(bob, "/policy friends")
    assert "removed alice from your friends" in ok(bob, "/friend remove alice")
    assert "no friends yet" in ok(bob, "/friends")

    for line, error in [
        ("/friend hug alice", "Error: unknown friend action 'hug' (usage: /friend add|accept|decline|remove USER)"),
        ("/invite carol", "which group? (name it: /invite USER GROUP, or go to the group first: /group NAME)"),
        ("/create x y", "unknown option 'y' (usage: /create GROUP [private])"),
        ("/join", "missing argument (usage: /join GROUP)"),
        ("/who now", "too many arguments: now (usage: /who)"),
    ]:
        bob.go(Conversation("room", "lobby"))
        (out,) = bob.handle(line)
        assert isinstance(out, Note) and out.style == "error"
        assert out.text == error.removeprefix("Error: ")


def wait_for(session: ChatSession, match: Callable[[Received], bool], timeout: float = 10) -> Received:
    got: list[Received] = []

    def arrived() -> bool:
        got.extend(m for m in session.listener.pending() if session.shows(m))
        return any(match(m) for m in got)

    assert wait_until(arrived, timeout), [m.text for m in got]
    return next(m for m in got if match(m))


def test_help_lists_every_command(
    server: ServeInfo, users: Callable[..., None], chats: Callable[..., ChatSession]
) -> None:
    users("bob")
    listed = ok(chats(server, "bob"), "/help")
    for command in COMMANDS.values():
        assert command.usage in listed
    assert ok(chats(server, "bob"), "/help invite").startswith("/invite USER [GROUP]")


def test_the_prompt_counts_unread_lines_of_other_conversations(
    server: ServeInfo, users: Callable[..., None], chats: Callable[..., ChatSession]
) -> None:
    users("alice", "bob")
    bob = chats(server, "bob")
    assert bob.prompt() == "lobby> "
    services.group_request(ident(server, "alice"), "create", "team")
    services.group_request(ident(server, "alice"), "invite", "team", user="bob")
    for text in ("one", "two"):
        services.send_dm(ident(server, "alice"), "bob", ChatMessage(text=text))
    services.group_say(ident(server, "alice"), "team", ChatMessage(text="three"))
    services.say(ident(server, "alice"), "lobby", ChatMessage(text="here"))  # the prompt's: not unread
    wait_for(bob, lambda m: m.text == "here")
    assert bob.prompt() == "lobby [@alice 2, #team 1]> "
    bob.handle("/dm alice")
    assert bob.prompt() == "@alice [#team 1]> "
    bob.handle("/group team")
    assert bob.prompt() == "#team> "


def test_a_line_typed_while_the_broker_is_down_is_sent_when_reconnected(
    roomy: BrokerSettings, chats: Callable[..., ChatSession]
) -> None:
    with BackgroundServer(roomy) as info:
        AccountStore(info.data_dir).add("bob", password_of("bob"))
        bob = chats(info, "bob")
        port = info.address.port
    assert wait_until(lambda: not bob.listener.connected, 30)
    assert bob.handle("while you were down") == [Note(QUEUED, "dim")]
    with BackgroundServer(dataclasses.replace(roomy, port=port)) as info:
        # sent on reconnecting (paho retries every 1 to 4 s), and back to us through the room
        wait_for(bob, lambda m: m.text == "while you were down", timeout=60)
        assert bob.handle("and now") == []


def test_the_catch_up_counts_what_it_shows_and_leaves_out_what_listen_showed(
    roomy: BrokerSettings, tmp_path: Path, procs: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bob-config"
    monkeypatch.setenv("IMCLI_CONFIG_DIR", str(config))
    env = {"IMCLI_CONFIG_DIR": str(config)}
    with BackgroundServer(roomy) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        args = ["login", "bob", "--host", info.address.host, "--port", str(info.address.port), "--password-stdin"]
        assert CliRunner().invoke(app, args, input=password_of("bob") + "\n", env=env).exit_code == 0
        first = Listener(ident(info, "bob", "laptop"), session="laptop")  # an earlier imcli chat
        with first:
            session = ChatSession(ident(info, "bob", "laptop"), ChatState(), first)
        save_state("bob", session.remember())

        listen = procs("listen", env=env)
        listen.wait_stderr("listening as bob")
        services.send_dm(ident(info, "alice"), "bob", ChatMessage(text="seen in listen"))
        while "seen in listen" not in listen.line():
            pass
        assert listen.stop() == 0  # listen showed it live

        raw = connect_raw(info.address.host, info.address.port, "alice", "alice:bot")
        try:
            for i in range(25):
                raw.publish(T.room("lobby", "alice"), encode(ChatMessage(text=f"lobby {i}")))
            for i in range(3):
                raw.publish(T.room("dev", "alice"), encode(ChatMessage(text=f"dev {i}")))
            raw.publish(T.dm("bob", "alice"), encode(ChatMessage(text="missed dm")))
        finally:
            raw.close()
        bob = ident(info, "bob", "probe")
        assert wait_until(lambda: "missed dm" in {m.text for m in services.history(bob, None, 100).messages}, 15)

        state = load_chat_state("bob")
        listener = Listener(ident(info, "bob", "laptop"), session="laptop", seen=RecentIds(initial=state.seen))
        with listener:
            session = ChatSession(ident(info, "bob", "laptop"), state, listener)
            report = session.catch_up(list(listener.pending()))
    shown = [m.text for m in report.shown if m.sender == "alice"]
    assert "seen in listen" not in shown
    assert shown == [f"lobby {i}" for i in range(5, 25)] + ["missed dm"]
    assert dict(report.unread) == {"lobby": 20, "@alice": 1}  # what is shown, counted
    assert dict(report.hidden) == {"lobby": 5, "dev": 3}  # a busy room's last 20 only; a room not visited
    assert session.prompt() == "lobby [dev 3, @alice 1]> "


@pytest.fixture
def terminal(cli_as: Callable[[str], Cli]) -> Iterator[Callable[[str], Terminal]]:
    opened: list[Terminal] = []

    def start(name: str) -> Terminal:
        cli = cli_as(name)
        cli.login(name)
        opened.append(Terminal(cli.config_dir))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_in_a_terminal_who_is_online_requests_and_unread_counts(
    server: ServeInfo, users: Callable[..., None], terminal: Callable[[str], Terminal]
) -> None:
    users("alice", "bob")
    alice = ident(server, "alice", "laptop")
    services.friend_request(alice, "add", "bob")
    with Listener(alice, session="laptop"):  # alice is online
        assert wait_until(lambda: any(u.account == "alice" for u in services.who(alice)), 10)
        bob = terminal("bob")
        # on start, in one line. What comes before "online:" on that line of the stream is the prompt the
        # line was printed over: chat's welcome lines are printed through patch_stdout, which may write
        # them once the prompt is drawn (erased with cursor moves, which Terminal drops, then redrawn)
        online = re.search(r"online: ([^\r\n]*)[\r\n]", bob.expect(r"online: [^\r\n]*[\r\n]"))
        assert online is not None and online[1].strip() in ("alice, bob", "bob, alice"), online
        bob.expect(r"alice wants to be your friend \(/friend accept alice\)")
        bob.expect(r"lobby>")
        services.send_dm(alice, "bob", ChatMessage(text="psst"))
        bob.expect(r"alice → you: psst")
        bob.type("/friend accept alice")
        bob.expect(r"you and alice are friends")
        bob.expect(r"lobby \[@alice 1\]>")
        bob.type("/quit")
        assert bob.exit_code() == 0


def _dms(outputs: list[Output]) -> list[tuple[str | None, str]]:
    return [(o.to, o.text) for o in outputs if isinstance(o, Received) and o.kind == "dm"]


def test_a_display_name_with_spaces_in_every_command_that_takes_a_user(
    server: ServeInfo, users: Callable[..., None], chats: Callable[..., ChatSession]
) -> None:
    """``/dm "Mary Ann" hi``, ``/dm Mary Ann hi`` (the longest known name that starts the text),
    and the same for /whois, /friend, /invite, /promote and /kick; unknown names are the
    resolver's one error line."""
    users("alice", "bob", "mary")
    services.rename(ident(server, "alice"), "Mary Ann")
    bob = chats(server, "bob")

    assert _dms(bob.handle('/dm "Mary Ann" hi')) == [("alice", "hi")]
    assert _dms(bob.handle("/dm Mary Ann hello there")) == [("alice", "hello there")]
    assert _dms(bob.handle("/dm \u201cMary Ann\u201d curly quotes")) == [("alice", "curly quotes")]
    assert _dms(bob.handle("/dm @mary ann? no: the account mary")) == [("mary", "ann? no: the account mary")]
    assert _dms(bob.handle('/dm "mary" Ann')) == [("mary", "Ann")]  # quotes pick the shorter name
    bob.go(Conversation("room", "lobby"))
    assert "now talking in @alice" in ok(bob, "/dm Mary Ann")
    assert ok(bob, "/whois Mary Ann").startswith("Mary Ann (@alice)")
    assert "asked Mary Ann to be your friend" in ok(bob, "/friend add Mary Ann")
    ok(bob, "/create team")
    assert "added Mary Ann to #team" in ok(bob, "/invite Mary Ann")
    assert "Mary Ann is now an admin of #team" in ok(bob, '/promote "Mary Ann" team')
    assert "removed Mary Ann from #team" in ok(bob, "/kick Mary Ann #team")

    hint = "(check the name with 'imcli who --all')"
    for line, error in [
        ("/dm Nobody Here hi", f"unknown user 'Nobody' {hint}"),
        ("/whois Nobody Here", f"unknown user 'Nobody Here' {hint}"),
        ("/friend add Nobody Here", f"unknown user 'Nobody Here' {hint}"),
        (
            '/dm "Mary Ann hi',
            'a quote is not closed (usage: /dm NAME [TEXT], a name with spaces in quotes: "Mary Ann")',
        ),
        ('/dm "Mary Ann"hi', "text right after the quoted name: hi (usage: /dm NAME [TEXT])"),
        ('/dm "" hi', "empty user name (give an account or display name)"),
        ('/friend add "Mary Ann" now', "too many arguments: now (usage: /friend add|accept|decline|remove USER)"),
        ("/invite Nobody Here team", f"unknown user 'Nobody' {hint}"),
        ("/dm", "missing argument (usage: /dm NAME [TEXT])"),
    ]:
        (out,) = bob.handle(line)
        assert isinstance(out, Note) and out.style == "error", (line, out)
        assert out.text == error, line


def test_in_a_terminal_dm_takes_a_quoted_display_name(
    server: ServeInfo, users: Callable[..., None], terminal: Callable[[str], Terminal]
) -> None:
    users("alice", "bob")
    services.rename(ident(server, "alice"), "Mary Ann")
    bob = terminal("bob")
    bob.expect(r"lobby>")
    bob.type('/dm "Mary Ann" hi there')
    bob.expect(r"→ Mary Ann \(@alice\): hi there")
    bob.type("/dm Nobody Here hi")
    bob.expect(r"unknown user 'Nobody' \(check the name with 'imcli who --all'\)")
    bob.type("/quit")
    assert bob.exit_code() == 0


def test_a_catch_up_the_broker_rate_limits_goes_on_with_what_was_queued(
    roomy: BrokerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive request dropped by the account's rate (its notice: RateLimited) does not end
    chat: the catch-up shows what the broker queued and says why the archive was not heard."""

    def dropped(*_args: object, **_kwargs: object) -> None:
        raise rate_limited("bob", 2.0)

    with BackgroundServer(roomy) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        with Listener(ident(info, "bob", "laptop"), session="laptop") as first:  # bob's session exists
            ChatSession(ident(info, "bob", "laptop"), ChatState(), first)
        services.send_dm(ident(info, "alice"), "bob", ChatMessage(text="queued for bob"))
        monkeypatch.setattr(services, "ask_history", dropped)
        listener = Listener(ident(info, "bob", "laptop"), session="laptop")
        with listener:
            queued: list[Received] = []

            def arrived() -> bool:
                queued.extend(listener.pending())
                return any(m.text == "queued for bob" for m in queued)

            assert wait_until(arrived, 15)
            session = ChatSession(ident(info, "bob", "laptop"), ChatState(), listener)
            report = session.catch_up(queued)
    assert [m.text for m in report.shown if m.sender == "alice"] == ["queued for bob"]  # beside presence events
    assert not report.archive_answered
    assert report.archive_refused.startswith("the broker dropped the request: account bob hit its rate limit")


def test_a_missed_dm_shows_its_senders_display_name_as_a_live_one_does(
    server: ServeInfo, users: Callable[..., None]
) -> None:
    """A persistent session's queue comes before the SUBACK, the presence records (display names) after
    it: ``imcli listen`` showed a DM sent while away as ``alice``, history and chat as ``Mary Ann
    (@alice)``. The queued lines wait for their senders' records (at most ``Listener.SETTLE``)."""
    users("alice", "bob")
    services.rename(ident(server, "alice"), "Mary Ann")
    with Listener(ident(server, "bob", "laptop"), session="laptop"):
        pass  # bob's session exists from now: the broker queues his DMs while he is away
    services.send_dm(ident(server, "alice"), "bob", ChatMessage(text="while you were away"))
    with Listener(ident(server, "bob", "laptop"), session="laptop") as listener:
        item = next(m for m in listener if m.text == "while you were away")
    assert item.missed
    assert (item.sender, item.nick) == ("alice", "Mary Ann")
