"""Devices and credentials (issue 17): the password traded once for a device credential, the
devices listed and revoked, several accounts on one machine, tokens for bots, passwd.

The embedded broker issues and checks device credentials itself (imcli/broker/devices.py);
Mosquitto cannot (deploy/mosquitto/README.md): there a login keeps the password, a strict
``broker_xfail`` in tests/test_cli.py."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from imcli.broker.accounts import AccountStore
from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, Proc, Raw, password_of, wait_until
from tests.rawmqtt import connect_raw
from tests.test_cli import wait_listening

CliFactory = Callable[[str], Cli]
RawFactory = Callable[..., Raw]


def port_args(server: ServeInfo) -> list[str]:
    return ["--host", server.address.host, "--port", str(server.address.port)]


def login(cli: Cli, name: str) -> dict[str, object]:
    cli.login(name)
    return stored(cli, name)


def stored(cli: Cli, name: str) -> dict[str, object]:
    doc = json.loads((cli.config_dir / "profile.json").read_text())
    entry: dict[str, object] = doc["logins"][name]
    return entry


def credential(entry: dict[str, object]) -> str:
    value = entry["credential"]
    assert isinstance(value, str)
    return value


def device_ids(cli: Cli) -> list[str]:
    result = cli("devices", "--json")
    assert result.exit_code == 0, result.output
    return [d["name"] for d in json.loads(result.stdout)]


# ---------------------------------------------------------------- no password on disk


def test_device_credential_is_bound_to_its_client_ids(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    users("alice", "bob")
    entry = login(cli_as("alice"), "alice")
    secret, device = credential(entry), entry["device"]
    assert raw("alice", secret, f"alice:{device}").rc == 0
    assert raw("alice", secret, f"alice:{device}.bot1", clean=False).rc == 0
    assert raw("alice", secret, "").rc == 0  # an empty client id gets one of the device's
    assert raw("alice", secret, "alice:otherdevice").rc == 2  # another device's client id
    assert raw("alice", secret, f"alice:{device}x").rc == 2
    assert raw("bob", secret, f"bob:{device}").rc == 4  # another account
    assert raw("alice", secret[:-2] + "zz", f"alice:{device}").rc == 4  # a wrong secret
    assert raw("alice", f"dc1:nodevice:{secret.rsplit(':', 1)[1]}", "alice:nodevice").rc == 4  # unknown device


def test_wrong_credentials_do_not_lock_out_the_device(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    """An attacker's wrong passwords and wrong credentials from the device's own address: the
    password logins of the account back off (CONNACK 3), the real device is let in at once."""
    users("alice")
    entry = login(cli_as("alice"), "alice")
    for _ in range(30):
        assert raw("alice", "dc1:laptop:guessed-secret", "alice:laptop").rc == 4  # never throttled: 4, not 3
    codes = []
    while 3 not in codes:  # the password guesses back off (CONNACK 3 while they wait)
        codes.append(raw("alice", "wrong-password-guess", "alice:x").rc)
    assert codes[0] == 4
    assert raw("alice", credential(entry), f"alice:{entry['device']}").rc == 0


def test_device_records_survive_a_restart(tmp_path: Path, cli_as: CliFactory) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0)
    AccountStore(settings.data_dir).add("alice", password_of("alice"))
    with BackgroundServer(settings) as info:
        cli = cli_as("alice")
        cli.server = info
        entry = login(cli, "alice")
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0)
    with BackgroundServer(settings) as info:
        r = connect_raw(info.address.host, info.address.port, "alice", f"alice:{entry['device']}", credential(entry))
        try:
            assert r.rc == 0
        finally:
            r.close()
    assert "digest" in (tmp_path / "data" / "devices.json").read_text()
    assert stat.S_IMODE((tmp_path / "data" / "device.key").stat().st_mode) == 0o600


def test_an_old_profile_with_a_password_is_removed(cli_as: CliFactory) -> None:
    cli = cli_as("old")
    cli.config_dir.mkdir(parents=True)
    old = {"account": "alice", "password": "secret-pw-1", "host": "127.0.0.1", "port": 1883, "device": "d-1"}
    (cli.config_dir / "profile.json").write_text(json.dumps(old))
    result = cli("whoami")
    assert result.exit_code == 1
    assert "held your password in plain text: it is removed" in result.stderr
    assert not (cli.config_dir / "profile.json").exists()
    assert cli("whoami").stderr.strip() == "Error: not logged in (run 'imcli login NAME' or 'imcli register NAME')"


def test_a_password_may_not_look_like_a_credential(server: ServeInfo, cli_as: CliFactory) -> None:
    result = cli_as("x")("register", "mallory", *port_args(server), env={"IMCLI_PASSWORD": "dc1:laptop:whatever"})
    assert result.exit_code == 1
    assert "a password may not start with 'dc1:'" in result.stderr


# ---------------------------------------------------------------- devices: list, revoke


def test_devices_lists_each_login(
    server: ServeInfo, users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    users("alice")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    first, second = login(laptop, "alice"), login(phone, "alice")
    assert server.broker is not None
    sessions = server.broker.session_table()
    # the phone's login has disconnected, and its end takes the broker a few loop rounds: the laptop's
    # request could come first (it did on uvloop, 1 run in 5: docs/PERFORMANCE.md, 'The broker on uvloop')
    assert wait_until(
        lambda: (
            not any(
                session.username == "alice" and str(second["device"]) in cid and session.transitions.is_connected()
                for cid, (session, _) in list(sessions.items())
            )
        )
    )
    listed = json.loads(laptop("devices", "--json").stdout)
    assert [d["name"] for d in listed] == [first["device"], second["device"]]
    assert all(d["kind"] == "device" and d["created"] > 0 for d in listed)
    assert [d["online"] for d in listed] == [True, False]  # the laptop asks: it is online
    online = raw("alice", credential(second), f"alice:{second['device']}")
    assert online.rc == 0
    listed = json.loads(laptop("devices", "--json").stdout)
    assert [d["online"] for d in listed] == [True, True]
    assert listed[1]["last_seen"] is not None
    table = laptop("devices")
    assert str(first["device"]) + " (this one)" in table.stdout and "yes" in table.stdout


def test_revoked_device_cannot_reconnect_nor_resume(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    users("alice", "bob")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    login(laptop, "alice")
    entry = login(phone, "alice")
    device, secret = str(entry["device"]), credential(entry)
    # the phone's persistent session, with a DM queued while it is away
    away = raw("alice", secret, f"alice:{device}", clean=False)
    assert away.subscribe("im/user/alice/#") == 1
    away.close()
    connected = raw("alice", secret, f"alice:{device}.listen")
    assert connected.rc == 0
    bob = raw("bob", None, "bob:x")
    bob.publish("im/user/alice/dm/bob", b"while you were away")
    result = laptop("devices", "revoke", device)
    assert result.exit_code == 0, result.output
    assert connected.disconnected.wait(5)  # its connection closed at once
    assert device not in device_ids(laptop)
    assert raw("alice", secret, f"alice:{device}", clean=False).rc == 4
    # even the account password cannot resume what the device's session held: it is gone
    resumed = raw("alice", None, f"alice:{device}", clean=False)
    assert resumed.rc == 0 and not resumed.session_present
    assert resumed.silent(0.5) == []
    again = laptop("devices", "revoke", device)
    assert again.exit_code == 1  # one hint, the broker's (not a second, generic one after it)
    assert again.stderr == f"Error: alice has no device or token named '{device}' (see 'imcli devices')\n"


def test_logout_revokes_and_a_stolen_profile_is_useless(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory, tmp_path: Path
) -> None:
    users("alice")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    login(laptop, "alice")
    entry = login(phone, "alice")
    stolen = tmp_path / "stolen.json"
    shutil.copy(phone.config_dir / "profile.json", stolen)
    result = phone("logout")
    assert result.exit_code == 0 and result.stdout.strip() == "logged out alice"
    assert entry["device"] not in device_ids(laptop)
    thief = json.loads(stolen.read_text())["logins"]["alice"]
    assert raw("alice", thief["credential"], f"alice:{thief['device']}").rc == 4
    shutil.copy(stolen, phone.config_dir / "profile.json")
    who = phone("who")
    assert who.exit_code == 1
    assert who.stderr.strip() == (
        "Error: the broker refused this device's credential: the device was logged out or revoked (code 4) "
        "(log in again with 'imcli login alice')"
    )


def test_logout_stops_a_running_listen(
    users: Callable[..., None], cli_as: CliFactory, procs: Callable[..., Proc]
) -> None:
    users("alice")
    laptop = cli_as("laptop")
    login(laptop, "alice")
    p = procs("listen", env={"IMCLI_CONFIG_DIR": str(laptop.config_dir)})
    p.wait_stderr("listening as alice")
    assert laptop("logout").exit_code == 0
    assert wait_until(lambda: p.popen.poll() is not None, 15), p.err_lines
    assert p.popen.returncode == 1
    assert any("was logged out: its credential was revoked" in line for line in p.err_lines), p.err_lines


# ---------------------------------------------------------------- several accounts, one machine


def test_several_accounts_on_one_machine(users: Callable[..., None], cli_as: CliFactory) -> None:
    users("alice", "bob")
    cli = cli_as("shared")
    login(cli, "alice")
    login(cli, "bob")
    me = json.loads(cli("whoami", "--json").stdout)
    assert me["account"] == "bob" and me["others"] == ["alice"]
    assert json.loads(cli("--account", "alice", "whoami", "--json").stdout)["account"] == "alice"
    assert cli("--account", "alice", "dm", "bob", "hi from alice").exit_code == 0
    assert cli("switch", "alice").stdout.strip().startswith("now alice on")
    assert json.loads(cli("whoami", "--json").stdout)["account"] == "alice"
    missing = cli("switch", "carol")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        "Error: not logged in as 'carol' (logged in: alice, bob) (run 'imcli login carol')"
    )
    assert cli("logout", "bob").stdout.strip() == "logged out bob"
    assert json.loads(cli("whoami", "--json").stdout) | {"host": None, "port": None} == {
        "account": "alice",
        "host": None,
        "port": None,
        "device": stored(cli, "alice")["device"],
        "others": [],
    }


# ---------------------------------------------------------------- tokens for bots, passwd


def test_token_for_a_bot(users: Callable[..., None], cli_as: CliFactory, raw: RawFactory) -> None:
    users("alice")
    cli = cli_as("alice")
    login(cli, "alice")
    made = cli("token", "create", "ci-bot", "--password-stdin", input=password_of("alice") + "\n")
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("dc1:ci-bot:")
    bot = raw("alice", token, "alice:ci-bot")  # mosquitto_pub -u alice -P TOKEN -i alice:ci-bot
    assert bot.rc == 0
    bot.publish("im/room/lobby/alice", b"build passed")
    assert raw("alice", token, "alice:laptop").rc == 2
    listed = json.loads(cli("token", "list", "--json").stdout)
    assert [(t["name"], t["kind"], t["online"]) for t in listed] == [("ci-bot", "token", True)]
    assert "ci-bot" not in device_ids(cli)
    twice = cli("token", "create", "ci-bot", "--password-stdin", input=password_of("alice") + "\n")
    assert twice.exit_code == 1 and "has a device or token named 'ci-bot'" in twice.stderr
    assert cli("token", "revoke", "ci-bot").exit_code == 0
    assert bot.disconnected.wait(5)
    assert raw("alice", token, "alice:ci-bot").rc == 4


def test_a_device_credential_cannot_make_credentials(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    """A stolen device credential cannot make itself a spare that survives its revocation."""
    users("alice")
    entry = login(cli_as("alice"), "alice")
    r = raw("alice", credential(entry), f"alice:{entry['device']}")
    assert r.subscribe("im/user/alice/reply/+") == 1
    r.publish("im/request/alice/c1", json.dumps({"type": "device_request", "op": "token", "name": "spare"}))
    reply = json.loads(r.expect("im/user/alice/reply/c1").payload)
    assert reply["type"] == "error" and reply["code"] == "denied"
    r.publish("im/request/alice/c2", json.dumps({"type": "device_request", "op": "passwd", "password": "x" * 12}))
    assert json.loads(r.expect("im/user/alice/reply/c2").payload)["code"] == "denied"


def test_passwd_changes_the_password_and_may_revoke_the_others(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    users("alice")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    first = login(laptop, "alice")
    second = login(phone, "alice")
    wrong = laptop("passwd", "--password-stdin", "--keep-others", input="not-the-password\nnew-password-1\n")
    assert wrong.exit_code == 1 and "wrong account name or password" in wrong.stderr
    kept = laptop("passwd", "--password-stdin", "--keep-others", input=f"{password_of('alice')}\nnew-password-1\n")
    assert kept.exit_code == 0, kept.output
    assert raw("alice", password_of("alice"), "alice:p1").rc == 4
    assert raw("alice", "new-password-1", "alice:p2").rc == 0
    assert raw("alice", credential(second), f"alice:{second['device']}").rc == 0  # devices keep working
    out = laptop("passwd", "--password-stdin", "--revoke-others", input="new-password-1\nnew-password-2\n")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[-1] == f"revoked: {second['device']}"
    assert raw("alice", credential(second), f"alice:{second['device']}").rc == 4
    assert raw("alice", credential(first), f"alice:{first['device']}").rc == 0


# ---------------------------------------------------------------- every device sees the conversation


def listen_lines(p: Proc, until: Callable[[dict[str, object]], bool], timeout: float = 10.0) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []
    while not lines or not until(lines[-1]):
        lines.append(json.loads(p.line(timeout)))
    return lines


def test_a_dm_from_one_device_arrives_on_the_other_once(
    users: Callable[..., None], cli_as: CliFactory, procs: Callable[..., Proc]
) -> None:
    users("alice", "bob")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    login(laptop, "alice")
    login(phone, "alice")
    p = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(phone.config_dir)})
    wait_listening(laptop, p)
    assert laptop("dm", "bob", "from my laptop").exit_code == 0
    assert laptop("say", "--room", "end", "marker").exit_code == 0
    lines = listen_lines(p, lambda line: line.get("room") == "end")
    dms = [line for line in lines if line["kind"] == "dm"]
    assert [(d["from"], d["to"], d["text"]) for d in dms] == [("alice", "bob", "from my laptop")]
    assert lines[-1]["from"] == "alice"  # my own room line, from the other device, too


def test_a_dm_sent_while_a_device_was_away_reaches_it_when_it_returns(
    users: Callable[..., None], cli_as: CliFactory, procs: Callable[..., Proc]
) -> None:
    users("alice", "bob")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    login(laptop, "alice")
    login(phone, "alice")
    env = {"IMCLI_CONFIG_DIR": str(phone.config_dir)}
    first = procs("listen", "--json", env=env)
    wait_listening(laptop, first)
    assert first.stop() == 0  # the device's persistent session keeps what arrives
    assert laptop("dm", "bob", "sent while the phone was off").exit_code == 0
    again = procs("listen", "--json", env=env)
    line = json.loads(again.line())
    assert (line["kind"], line["from"], line["to"], line["text"], line["missed"]) == (
        "dm",
        "alice",
        "bob",
        "sent while the phone was off",
        True,
    )


def test_only_the_broker_writes_a_sent_copy(users: Callable[..., None], raw: RawFactory) -> None:
    users("alice", "bob")
    alice = raw("alice", None, "alice:a")
    assert alice.subscribe("im/user/alice/#") == 1
    mallory = raw("bob", None, "bob:b")
    mallory.publish("im/user/alice/sent/carol", b"forged: alice never sent this")
    mallory.publish("im/user/bob/sent/alice", b"forged into my own subtree")
    assert alice.silent(0.5, "im/user/alice/sent/") == []
    alice.publish("im/user/bob/dm/alice", b"hello bob")
    assert alice.expect("im/user/alice/sent/bob").payload == b"hello bob"


def test_who_lists_devices_by_name_and_a_device_leaving_is_an_event(
    users: Callable[..., None], cli_as: CliFactory, raw: RawFactory
) -> None:
    users("alice", "bob")
    laptop, phone = cli_as("laptop"), cli_as("phone")
    first, second = login(laptop, "alice"), login(phone, "alice")
    bob = raw("bob", None, "bob:watch")
    assert bob.subscribe("im/events") == 1
    status = json.dumps({"type": "status", "v": 1, "interval": 60}).encode()
    one = raw("alice", credential(first), f"alice:{first['device']}")
    one.publish(f"im/status/alice/{first['device']}", status, retain=True)
    assert json.loads(bob.expect("im/events").payload)["event"] == "join"
    topic = f"im/status/alice/{second['device']}.listen"
    two = raw("alice", credential(second), f"alice:{second['device']}.listen", will=(topic, b"", True))
    two.publish(topic, status, retain=True)
    joined = json.loads(bob.expect("im/events").payload)
    assert (joined["event"], joined["device"]) == ("device_join", second["device"])
    cli = cli_as("bob")
    cli.login("bob")
    (alice,) = [u for u in json.loads(cli("who", "--json").stdout) if u["account"] == "alice"]
    assert alice["device_names"] == sorted([str(first["device"]), str(second["device"])])
    assert str(second["device"]) in cli("who").stdout
    shown = json.loads(cli("profile", "show", "alice", "--json").stdout)
    assert shown["devices"] == alice["device_names"]
    assert f"on {', '.join(alice['device_names'])}" in cli("profile", "show", "alice").stdout
    two.kill()  # its Last Will clears the status
    left = json.loads(bob.expect("im/events").payload)
    assert (left["event"], left["device"], left["account"]) == ("device_leave", second["device"], "alice")


def test_the_first_chat_shows_what_was_waiting_once(server: ServeInfo, users: Callable[..., None]) -> None:
    """A new user's (or a new device's) first ``imcli chat`` has no persistent session and no
    last run: what the archive kept for it is shown, once."""
    from imcli.cli.chat_session import ChatSession
    from imcli.cli.chat_state import ChatState
    from imcli.client.listener import Listener, RecentIds
    from tests.conftest import ident

    users("alice", "bob")
    bob = connect_raw(server.address.host, server.address.port, "bob", "bob:x")
    try:
        bob.publish("im/user/alice/dm/bob", b"welcome, alice")
    finally:
        bob.close()
    alice = ident(server, "alice", "newphone")

    def start(state: ChatState) -> tuple[list[str], ChatState]:
        with Listener(alice, session="newphone", seen=RecentIds(initial=state.seen)) as listener:
            session = ChatSession(alice, state, listener)
            report = session.catch_up(list(listener.pending()))
            # not live events: the presence worker's "alice is online" for this very connection
            # may already be in (the broker relays it within milliseconds), and is not what waited
            shown = [m for m in report.shown if m.kind != "event"]
            return [f"{m.kind}:{m.sender}:{m.text}:{m.missed}" for m in shown], session.remember()

    first, state = start(ChatState())
    assert first == ["dm:bob:welcome, alice:True"]
    again, _ = start(state)
    assert again == []
