"""The CLI against a real broker: accounts, chat, listen, errors, serve.

The commands that talk to a broker run on the embedded broker and on Mosquitto with ``imcli
workers --dynsec`` beside it (tests/brokers.py): accounts there come from mosquitto_passwd, so
``imcli register`` is a strict ``broker_xfail``. Tests of ``imcli serve``, of the embedded
broker's own account store, and of checks made before any broker is reached are
``brokers.EMBEDDED_ONLY``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import brokers
from tests.conftest import Cli, Proc, Raw, password_of, wait_until

CliFactory = Callable[[str], Cli]

broker_kind, broker_under_test, server, users = brokers.BOTH  # every test using `server` on both brokers


def port_args(server: ServeInfo) -> list[str]:
    return ["--host", server.address.host, "--port", str(server.address.port)]


@pytest.fixture
def alice(users: Callable[..., None], cli_as: CliFactory) -> Cli:
    users("alice", "bob")
    cli = cli_as("alice")
    cli.login("alice")
    return cli


@pytest.fixture
def bob_listens(alice: Cli, cli_as: CliFactory, procs: Callable[..., Proc]) -> Proc:
    """bob logged in, running `imcli listen --json`, subscribed (alice is logged in too)."""
    bob = cli_as("bob")
    bob.login("bob")
    p = start_listener(procs, bob)
    wait_listening(bob, p)
    return p


def listen_env(cli: Cli) -> dict[str, str]:
    return {"IMCLI_CONFIG_DIR": str(cli.config_dir)}


def start_listener(procs: Callable[..., Proc], cli: Cli, *args: str) -> Proc:
    p = procs("listen", "--json", *args, env=listen_env(cli))
    # listen subscribes before it reads; a DM to itself proves the subscription is live
    assert wait_until(lambda: p.popen.poll() is None, 1)
    return p


def wait_listening(cli: Cli, p: Proc) -> None:
    """Say numbered pings until the listener prints one (its subscription is then active), then one
    last line, and read up to it: a ping the listener prints late (a loaded machine) is read here,
    not by the test, which would take it for the line it waits for."""

    def say(text: str) -> None:
        result = cli("say", "--room", "ping", text)
        assert result.exit_code == 0, result.output

    for i in range(40):
        say(f"ping {i}")
        try:
            line = json.loads(p.line(timeout=0.5))
        except AssertionError:
            continue
        if line.get("room") == "ping":
            break
    else:
        raise AssertionError(f"listener never got ready: {p.err_lines}")
    last = f"pinged {i}"  # each say waits for its PUBACK: the pings before it are ahead of it
    say(last)
    while (line := json.loads(p.line())).get("text") != last:
        pass


# ---------------------------------------------------------------- accounts


@pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_REGISTRATION)
def test_register_logs_in(server: ServeInfo, cli_as: CliFactory) -> None:
    cli = cli_as("dora")
    result = cli("register", "dora", *port_args(server), env={"IMCLI_PASSWORD": "dora-password"})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"registered dora on {server.address} and logged in"
    who = cli("whoami", "--json")
    assert json.loads(who.stdout)["account"] == "dora"


def test_login_keeps_a_private_profile_until_logout(
    users: Callable[..., None], server: ServeInfo, cli_as: CliFactory
) -> None:
    users("dora")
    cli = cli_as("dora")
    result = cli("login", "dora", *port_args(server), env={"IMCLI_PASSWORD": password_of("dora")})
    assert result.exit_code == 0, result.output
    profile = cli.config_dir / "profile.json"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    who = cli("whoami", "--json")
    assert json.loads(who.stdout)["account"] == "dora"
    assert json.loads(who.stdout)["port"] == server.address.port
    out = cli("logout")
    assert out.exit_code == 0 and out.stdout.strip() == "logged out dora"
    gone = cli("whoami")
    assert gone.exit_code == 1
    assert gone.stderr.strip() == "Error: not logged in (run 'imcli login NAME' or 'imcli register NAME')"


@pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_DEVICE_CREDENTIALS)
def test_login_keeps_no_password_on_disk(users: Callable[..., None], server: ServeInfo, cli_as: CliFactory) -> None:
    """Issue 17: the password is traded for a device credential; Mosquitto cannot issue one."""
    users("dora")
    cli = cli_as("dora")
    cli.login("dora")
    profile = (cli.config_dir / "profile.json").read_text()
    assert password_of("dora") not in profile
    entry = json.loads(profile)["logins"]["dora"]
    assert entry["credential"].startswith(f"dc1:{entry['device']}:")
    assert cli("who").exit_code == 0  # the credential is what the commands log in with


@pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_REGISTRATION)
def test_register_reads_password_from_stdin(server: ServeInfo, cli_as: CliFactory) -> None:
    cli = cli_as("erin")
    result = cli("register", "erin", *port_args(server), "--password-stdin", input="erin-password\n")
    assert result.exit_code == 0, result.output
    again = cli_as("erin2")("login", "erin", *port_args(server), "--password-stdin", input="erin-password\n")
    assert again.exit_code == 0, again.output


# Mosquitto answers a wrong password with CONNACK 5 (not authorized), not 4
MOSQUITTO_LOGIN_REFUSED = "Error: the broker did not let {name} in (not authorized) (check the name and password"


@pytest.mark.parametrize(
    ("args", "password", "error"),
    [
        (["register", "Bad Name"], "long-enough", "Error: invalid account name 'Bad Name' (1-32 characters"),
        (["register", "presence"], "long-enough", "Error: the name 'presence' is reserved"),
        pytest.param(
            ["register", "alice"],
            "long-enough",
            "Error: cannot register 'alice': the name is taken",
            marks=pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_REGISTRATION),
        ),
        (["register", "frank"], "short", "Error: password too short (choose one of at least 8 characters)"),
        (["login", "alice"], "wrong-password", "Error: wrong account name or password"),
        (["login", "nobody"], "wrong-password", "Error: wrong account name or password"),
    ],
)
def test_account_errors(
    users: Callable[..., None],
    server: ServeInfo,
    broker_kind: str,
    cli_as: CliFactory,
    args: list[str],
    password: str,
    error: str,
) -> None:
    users("alice")
    result = cli_as("x")(*args, *port_args(server), env={"IMCLI_PASSWORD": password})
    if broker_kind == "mosquitto" and args[0] == "login":
        error = MOSQUITTO_LOGIN_REFUSED.format(name=args[1])
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (cli_as("x").config_dir / "profile.json").exists()


def test_register_where_the_operator_makes_accounts(
    broker_kind: str, server: ServeInfo, cli_as: CliFactory, tmp_path: Path
) -> None:
    """Mosquitto, like ``imcli serve --registration closed``, refuses with 5: one line that
    names both ways an operator makes an account."""
    with contextlib.ExitStack() as stack:
        if broker_kind == "amqtt":
            settings = BrokerSettings(data_dir=tmp_path / "closed", port=0, registration="closed")
            server = stack.enter_context(BackgroundServer(settings))
        result = cli_as("x")("register", "newbie", *port_args(server), env={"IMCLI_PASSWORD": "newbie-password"})
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: registration is closed on this broker, or needs an invite code (code 5) (give --invite CODE if "
        "its operator gave you one, or ask them to make the account: "
        "'imcli admin user add NAME' for imcli serve, mosquitto_passwd for Mosquitto)"
    )
    assert not (cli_as("x").config_dir / "profile.json").exists()


# never reaches a broker: the password is asked for first
@brokers.EMBEDDED_ONLY
def test_password_required_without_terminal(server: ServeInfo, cli_as: CliFactory) -> None:
    result = cli_as("x")("login", "alice", *port_args(server))
    assert result.exit_code == 1
    assert "Error: no password given" in result.stderr


# no broker at all
@brokers.EMBEDDED_ONLY
def test_unreachable_broker_says_where_and_what_to_do(cli_as: CliFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    result = cli_as("x")("login", "alice", "--port", str(free_port), env={"IMCLI_PASSWORD": "whatever-pw"})
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot reach the broker at 127.0.0.1:{free_port}")
    assert "imcli serve" in result.stderr


def test_env_vars_give_the_broker_address(users: Callable[..., None], server: ServeInfo, cli_as: CliFactory) -> None:
    users("alice")
    env = {
        "IMCLI_HOST": server.address.host,
        "IMCLI_PORT": str(server.address.port),
        "IMCLI_PASSWORD": password_of("alice"),
    }
    assert cli_as("a")("login", "alice", env=env).exit_code == 0


# ---------------------------------------------------------------- chatting


def test_two_users_chat_through_the_cli(
    users: Callable[..., None], cli_as: CliFactory, procs: Callable[..., Proc]
) -> None:
    users("alice", "bob")
    alice, bob = cli_as("alice"), cli_as("bob")
    alice.login("alice")
    bob.login("bob")
    bob_listens = start_listener(procs, bob)
    wait_listening(bob, bob_listens)

    said = alice("say", "hello everyone")
    assert said.exit_code == 0 and said.stdout.strip() == "sent to lobby"
    line = json.loads(bob_listens.line())
    assert (line["kind"], line["from"], line["room"], line["text"]) == (
        "room",
        "alice",
        "lobby",
        "hello everyone",
    )

    sent = alice("dm", "bob", "just for you")
    assert sent.exit_code == 0 and sent.stdout.strip() == "sent to bob"
    line = json.loads(bob_listens.line())
    assert (line["kind"], line["from"], line["to"], line["text"]) == ("dm", "alice", "bob", "just for you")

    other_room = alice("say", "--room", "dev", "-", input="from a pipe\n")
    assert other_room.exit_code == 0 and other_room.stdout.strip() == "sent to dev"
    line = json.loads(bob_listens.line())
    assert (line["room"], line["text"]) == ("dev", "from a pipe")

    reply = bob("dm", "alice", "got it")
    assert reply.exit_code == 0


def test_listen_room_filter(alice: Cli, cli_as: CliFactory, procs: Callable[..., Proc]) -> None:
    bob = cli_as("bob")
    bob.login("bob")
    p = start_listener(procs, bob, "--room", "dev", "--room", "ping")
    wait_listening(bob, p)
    assert alice("say", "in lobby").exit_code == 0
    assert alice("say", "--room", "dev", "in dev").exit_code == 0
    assert json.loads(p.line())["text"] == "in dev"


def test_bot_plain_text_is_shown_as_a_message(
    bob_listens: Proc, raw: Callable[..., Raw], users: Callable[..., None]
) -> None:
    users("ci-bot")
    p = bob_listens
    bot = raw("ci-bot", client_id="ci-bot:cron")
    bot.publish("im/room/lobby/ci-bot", "build #42 passed ✓".encode())
    line = json.loads(p.line())
    assert (line["from"], line["text"], line["format"]) == ("ci-bot", "build #42 passed ✓", "text")


def test_human_listen_output(alice: Cli, cli_as: CliFactory, procs: Callable[..., Proc]) -> None:
    bob = cli_as("bob")
    bob.login("bob")
    p = procs("listen", env=listen_env(bob))
    p.wait_stderr("listening as bob")
    assert re.fullmatch(r"\d\d:\d\d:\d\d \* bob is online", p.line()), p.err_lines
    assert alice("dm", "bob", "hi \x1b[2J [red]bob[/red]").exit_code == 0
    line = p.line()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[dm\] alice → you: hi \\x1b\[2J \[red\]bob\[/red\]", line), line


def test_malformed_payloads_never_stop_listen(bob_listens: Proc, raw: Callable[..., Raw]) -> None:
    p = bob_listens
    attacker = raw("alice", client_id="alice:raw")
    for payload in (
        b"\xff\xfe",
        b'{"type": "chat"}',
        b'{"type": "notice", "code": 1}',
        b"   ",
        b'{"type":"chat","v":1,"text":""}',
    ):
        attacker.publish("im/room/lobby/alice", payload)
    attacker.publish("im/room/lobby/alice", b"still alive")
    kinds = [json.loads(p.line())["kind"] for _ in range(6)]
    assert kinds == ["malformed"] * 5 + ["room"]
    assert p.popen.poll() is None


def test_a_time_no_clock_can_show_is_malformed_not_the_end_of_listen(
    alice: Cli, cli_as: CliFactory, procs: Callable[..., Proc], raw: Callable[..., Raw]
) -> None:
    """A raw client's chat line with ``"ts": 1e308`` (or ``Infinity``) ended every reader's human
    ``imcli listen`` with an OverflowError traceback (time.localtime), in a room and in a DM: a time
    past year 9999 is malformed, shown as such, and listen goes on."""
    bob = cli_as("bob")
    bob.login("bob")
    p = procs("listen", env=listen_env(bob))
    p.wait_stderr("listening as bob")
    assert p.line().endswith("* bob is online")
    attacker = raw("alice", client_id="alice:raw")
    for ts in ("1e308", "Infinity", "-Infinity", "NaN", "253402300800"):
        for topic in ("im/room/lobby/alice", "im/user/bob/dm/alice"):
            attacker.publish(topic, f'{{"type":"chat","v":1,"id":"x","ts":{ts},"text":"boom"}}'.encode())
    attacker.publish("im/room/lobby/alice", b"still alive")
    lines = [p.line() for _ in range(11)]
    assert all("malformed" in line for line in lines[:10]), lines
    assert lines[10].endswith("lobby alice: still alive"), lines
    assert p.popen.poll() is None, p.err_lines


def test_json_nested_past_the_stack_is_text_not_the_end_of_listen_or_the_senders_connection(
    bob_listens: Proc, raw: Callable[..., Raw]
) -> None:
    """``{"type":"chat","text":[[[…]]]}`` nested 5,000 deep failed pydantic's parse and then ended
    in json.loads with a RecursionError: every reader's ``listen`` died with a traceback, and the
    embedded broker's journal ended the sender's connection with it. It is text, as any other
    payload that is not one of ours."""
    p = bob_listens
    attacker = raw("alice", client_id="alice:raw")
    deep = b'{"type":"chat","v":1,"text":' + b"[" * 5000 + b"]" * 5000 + b"}"
    attacker.publish("im/room/lobby/alice", deep)
    attacker.publish("im/room/lobby/alice", b"still alive")
    lines = [json.loads(p.line()) for _ in range(2)]
    assert [(line["format"], len(line["text"])) for line in lines] == [("text", len(deep)), ("text", 11)]
    assert p.popen.poll() is None, p.err_lines


def test_a_download_while_listen_is_away_is_not_queued_for_it(
    alice: Cli, cli_as: CliFactory, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """listen subscribed to all of ``im/user/<me>/#``, a download's bytes (``file/<stream>``)
    among them: every ``imcli get`` was copied to each listen and chat of the account, and queued
    in the session of each one away; a listen back after a 40 MB download was closed by the broker
    as a reader that does not read (76 MB waiting, seen by hand) and ended with an error. It
    subscribes to the conversations' topics only, and drops the whole-tree filter of a session
    from before."""
    bob = cli_as("bob")
    bob.login("bob")
    first = procs("listen", "--json", env=listen_env(bob))
    wait_listening(bob, first)
    first.stop()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024))
    sent = alice("send", "bob", str(big))
    assert sent.exit_code == 0, sent.output
    file_id = sent.output.strip().rsplit(": ", 1)[1]
    got = bob("get", file_id, "-o", str(tmp_path / "back.bin"))
    assert got.exit_code == 0, got.output
    again = procs("listen", "--json", env=listen_env(bob))
    wait_listening(bob, again)
    assert alice("dm", "bob", "after the download").exit_code == 0
    texts = []
    while "after the download" not in texts:
        texts.append(json.loads(again.line())["text"])
    assert again.popen.poll() is None, again.err_lines
    assert not any("reconnect" in line or "Error" in line for line in again.err_lines), again.err_lines


def test_duplicate_message_ids_are_shown_once(bob_listens: Proc, raw: Callable[..., Raw]) -> None:
    p = bob_listens
    sender = raw("alice", client_id="alice:raw")
    payload = b'{"type":"chat","v":1,"id":"same-id","ts":1,"text":"once"}'
    sender.publish("im/room/lobby/alice", payload)
    sender.publish("im/room/lobby/alice", payload)
    sender.publish("im/room/lobby/alice", b"after")
    assert [json.loads(p.line())["text"] for _ in range(2)] == ["once", "after"]


@pytest.mark.parametrize(
    ("args", "stdin", "error"),
    [
        (["say", ""], None, "Error: empty message (type some text, or pipe it in with '-')"),
        (["say", "-"], "\n", "Error: empty message"),
        (["say", "x" * 17000], None, "Error: message too long: "),
        (["say", "--room", "No Way", "hi"], None, "Error: invalid room name 'No Way'"),
        (["dm", "zed", "hi"], None, "Error: unknown user 'zed' (check the name with 'imcli who --all')"),
        (["dm", "bob", "   "], None, "Error: empty message"),
    ],
)
def test_chat_errors(alice: Cli, args: list[str], stdin: str | None, error: str) -> None:
    result = alice(*args, input=stdin)
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# never reaches a broker
@brokers.EMBEDDED_ONLY
def test_not_logged_in(cli_as: CliFactory) -> None:
    for args in (["say", "hi"], ["dm", "bob", "hi"], ["listen"], ["logout"]):
        result = cli_as("nobody")(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: not logged in"), (args, result.stderr)


# checked by the client before it publishes
@brokers.EMBEDDED_ONLY
def test_max_payload_is_configurable_on_the_client(alice: Cli) -> None:
    result = alice("say", "x" * 300, env={"IMCLI_MAX_PAYLOAD": "200"})
    assert result.exit_code == 1
    said = re.search(r"300 bytes of text, (\d+) fit in one message", result.stderr)
    assert said is not None, result.stderr
    fits = int(said[1])
    assert 0 < fits < 200
    assert alice("say", "x" * fits, env={"IMCLI_MAX_PAYLOAD": "200"}).exit_code == 0  # the figure is true


# ---------------------------------------------------------------- admin


# the embedded broker's account store (Mosquitto's is mosquitto_passwd)
@brokers.EMBEDDED_ONLY
def test_admin_user_lifecycle_with_closed_registration(tmp_path: Path, cli_as: CliFactory) -> None:
    admin = cli_as("admin")
    data = str(tmp_path / "admin-data")
    added = admin("admin", "user", "add", "gina", "--data-dir", data, "--password-stdin", input="gina-password\n")
    assert added.exit_code == 0 and added.stdout.strip() == "added user gina"
    dup = admin("admin", "user", "add", "gina", "--data-dir", data, "--password-stdin", input="gina-password\n")
    assert dup.exit_code == 1 and dup.stderr.startswith("Error: the name 'gina' is taken")
    listed = admin("admin", "user", "list", "--data-dir", data, "--json")
    assert [a["name"] for a in json.loads(listed.stdout)] == ["gina"]
    removed = admin("admin", "user", "remove", "gina", "--data-dir", data)
    assert removed.exit_code == 0
    missing = admin("admin", "user", "remove", "gina", "--data-dir", data)
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: no account named 'gina'")


# ---------------------------------------------------------------- serve


# about imcli serve itself
@brokers.EMBEDDED_ONLY
def test_serve_refuses_remote_bind_without_consent(cli_as: CliFactory, tmp_path: Path) -> None:
    result = cli_as("op")("serve", "--bind", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: refusing to listen on 0.0.0.0")


# about imcli serve itself
@brokers.EMBEDDED_ONLY
def test_serve_reports_an_unusable_data_dir(cli_as: CliFactory, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = cli_as("op")("serve", "--port", "0", "--data-dir", str(not_a_dir))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: cannot use the data directory {not_a_dir}: File exists "
        "(give a writable directory with --data-dir or IMCLI_DATA_DIR)"
    )
    listed = cli_as("op")("admin", "user", "list", "--data-dir", str(not_a_dir / "sub"))
    assert listed.exit_code == 1 and listed.stderr.startswith("Error: cannot use the data directory")


# about imcli serve itself
@brokers.EMBEDDED_ONLY
def test_serve_reports_damaged_saved_state(cli_as: CliFactory, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "retained.sqlite3").write_text("not a database")
    result = cli_as("op")("serve", "--port", "0", "--data-dir", str(data))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: the saved state {data / 'retained.sqlite3'} cannot be used")
    assert len(result.stderr.strip().splitlines()) == 1


# about imcli serve itself
@brokers.EMBEDDED_ONLY
def test_serve_reports_a_busy_port(server: ServeInfo, cli_as: CliFactory, tmp_path: Path) -> None:
    result = cli_as("op")("serve", "--port", str(server.address.port), "--data-dir", str(tmp_path / "d"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{server.address.port}")


def start_serve(procs: Callable[..., Proc], data_dir: Path, port: int = 0, *extra: str) -> tuple[Proc, int]:
    p = procs("serve", "--port", str(port), "--data-dir", str(data_dir), *extra, env={})
    first = p.line(timeout=30)
    match = re.fullmatch(r"imcli serve: listening on 127\.0\.0\.1:(\d+)", first)
    assert match, first
    return p, int(match.group(1))


# imcli serve (tests/test_mosquitto.py restarts Mosquitto under imcli listen)
@brokers.EMBEDDED_ONLY
@pytest.mark.slow
def test_serve_stops_cleanly_and_listen_survives_a_broker_restart(
    tmp_path: Path, procs: Callable[..., Proc], cli_as: CliFactory
) -> None:
    data = tmp_path / "serve-data"
    serve, port = start_serve(procs, data)
    alice, bob = cli_as("alice"), cli_as("bob")
    for cli, name in ((alice, "alice"), (bob, "bob")):
        r = cli("register", name, "--port", str(port), "--password-stdin", input=password_of(name) + "\n")
        assert r.exit_code == 0, r.output
    listener = start_listener(procs, bob)
    wait_listening(bob, listener)

    assert serve.stop() == 0  # SIGTERM: clean shutdown
    assert any("imcli serve: stopped" in line for line in [*iter_lines(serve)]), serve.err_lines
    listener.wait_stderr("connection lost")
    down = alice("say", "nobody home")
    assert down.exit_code == 1 and down.stderr.startswith(f"Error: cannot reach the broker at 127.0.0.1:{port}")

    serve2, port2 = start_serve(procs, data, port)  # same accounts, same port
    assert port2 == port
    listener.wait_stderr("reconnected")
    wait_listening(bob, listener)
    assert alice("say", "back again").exit_code == 0
    assert json.loads(listener.line())["text"] == "back again"
    serve2.stop()


def iter_lines(p: Proc) -> list[str]:
    out = []
    while True:
        try:
            out.append(p.line(timeout=1))
        except AssertionError:
            return out


def test_module_entry_point_prints_help() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "imcli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0
    for command in ("serve", "register", "login", "say", "dm", "listen", "admin"):
        assert command in result.stdout
