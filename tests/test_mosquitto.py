"""deploy/mosquitto against a real Mosquitto 2: what only Mosquitto has or lacks.

The rules both brokers enforce run on both in tests/test_security.py (and test_groups,
test_history, test_friends, test_presence, test_cli) through tests/brokers.py. Here, what
has no twin on the embedded broker: a session taken over under another account's client id
(the embedded broker refuses that CONNECT), a forged Last Will dropped only when it fires, the
rights deploy/mosquitto/aclfile gives the service accounts, the real ``imcli workers``
command, Mosquitto's own offline queue and persistence over a restart, and a bridged pair.

Each test starts ``mosquitto -c <conf>`` on a free loopback port, with a config derived from
deploy/mosquitto/mosquitto.conf (only the port, the file paths and ``user`` replaced) and the
unchanged deploy/mosquitto/aclfile, then connects raw paho clients (conftest's ``raw``, here
on Mosquitto): what an attacker or a bot would use. Absence is proven with
``tests.rawmqtt.barrier``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner, Result

from imcli.cli.app import app
from imcli.core.mqtt import Credentials
from imcli.core.service import PasswordFileDirectory, ServiceWorker
from imcli.core.wire import DeviceStatus, encode
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import ServeInfo
from tests.brokers import ACCOUNTS, Mosquitto, mosquitto_available, running_mosquitto, running_workers
from tests.brokers import NOT_INSTALLED as _NOT_INSTALLED
from tests.conftest import Cli, Proc
from tests.rawmqtt import Raw, barrier, chat, connect_raw, password_of, v5_properties, wait_until
from tests.test_chat import (
    assert_once_in_order,
    away_while_alice_sends_fifty,
    chat_start,
    listen_after_a_break,
    make_team,
)
from tests.test_cli import start_listener, wait_listening

pytestmark = [pytest.mark.slow]
if not mosquitto_available():
    pytestmark.append(pytest.mark.skip(reason=_NOT_INSTALLED))

RawFactory = Callable[..., Raw]


def status(interval: float = 30.0) -> bytes:
    return encode(DeviceStatus(interval=interval))


def topics(seen: list[list[paho.MQTTMessage]]) -> list[list[str]]:
    return [[m.topic for m in messages] for messages in seen]


# ---------------------------------------------------------------- the broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def server(broker: Mosquitto) -> ServeInfo:
    """conftest's ``server``, so that its ``raw`` connects to this Mosquitto (no workers)."""
    return broker.info()


# ---------------------------------------------------------------- client ids and Last Wills


def test_hijacked_session_leaks_nothing(raw: RawFactory) -> None:
    """carol takes over bob's persistent session (no binding): she gets bob's subscriptions, but
    Mosquitto re-checks read rights for her on queued messages and on every delivery."""
    bob = raw("bob", client_id="bob:phone", clean=False)
    assert bob.subscribe_all("im/user/bob/#", "im/room/+/+") == [1, 1]
    bob.close()
    alice = raw("alice", client_id="alice:laptop")
    alice.publish("im/user/bob/dm/alice", chat("queued for bob"))

    carol = raw("carol", client_id="bob:phone", clean=False)
    assert carol.rc == 0
    alice.publish("im/user/bob/dm/alice", chat("sent while carol holds the session"))
    [seen] = topics(barrier(alice, carol))
    assert [t for t in seen if not t.startswith("im/room/")] == []


@pytest.mark.parametrize("topic", ["im/room/lobby/bob", "im/user/bob/dm/carol", "im/presence/alice"])
def test_forged_last_will_is_never_delivered(raw: RawFactory, topic: str) -> None:
    bob = raw("bob", client_id="bob:phone")
    spy = raw("presence", client_id="presence:spy")
    assert bob.subscribe_all("im/room/+/+", "im/user/bob/#", "im/presence/+") == [1, 1, 1]
    assert spy.subscribe_all("#") == [1]
    alice = raw("alice", client_id="alice:x", will=(topic, b"gone", False))
    alice.kill()
    carol = raw("carol", client_id="carol:x")
    # alice's lost connection and carol's barrier come on two sockets: a longer silence after it
    assert topics(barrier(carol, bob, spy, quiet=0.5)) == [[], []]


def test_mqtt5_features_reach_nothing_private(raw: RawFactory) -> None:
    """Mosquitto speaks MQTT 5 (the embedded broker and NATS 2.9 refuse it: tests/test_attacks_client.py,
    tests/test_nats.py). carol, with a v5 client: shared subscriptions over bob's DMs, everyone's
    requests and replies and the archive's DMs (``$share/<group>/...``, granted like any SUBSCRIBE in
    2.0, and filtered per delivery) get nothing; a topic alias first set with a PUBLISH to bob's room
    topic (refused), then used alone, delivers nothing; a Will with a delay interval on bob's topic
    never comes; an alias on her own topic still works (the barrier), and bob gets his DM."""
    bob = raw("bob", client_id="bob:phone")
    spy = raw("presence", client_id="presence:spy")  # reads everything: where it sees nothing, nobody did
    assert bob.subscribe_all("im/room/+/+", "im/user/bob/#") == [1, 1]
    assert spy.subscribe_all("#") == [1]
    carol = raw("carol", client_id="carol:v5", v5=True)
    assert carol.rc == 0
    shared = ["$share/x/im/user/bob/#", "$share/x/#", "$share/x/im/request/+/+", "$share/x/im/user/+/reply/+",
              "$share/archive/im/user/+/dm/+", "$share/x/$SYS/#", "$share/x/$CONTROL/#"]  # fmt: skip
    carol.subscribe_all(*shared)
    alice = raw("alice", client_id="alice:x")
    alice.publish("im/user/bob/dm/alice", chat("for bob"))
    alice.publish("im/request/alice/" + "a" * 32, b'{"type": "who", "v": 1}')
    for alias, topic, text in ((2, "im/room/lobby/bob", "alias set"), (2, "", "alias alone")):
        carol.client.publish(topic, chat(text), qos=1, properties=_alias(alias)).wait_for_publish(5)
    carol.client.publish("im/room/lobby/carol", chat("own alias"), qos=1, properties=_alias(3)).wait_for_publish(5)
    carol.client.publish("", chat("own alias alone"), qos=1, properties=_alias(3)).wait_for_publish(5)
    will = raw(
        "carol", client_id="carol:will", v5=True, will_delay=1, will=("im/room/lobby/bob", chat("forged"), False)
    )
    assert will.rc == 0
    will.kill()
    time.sleep(2)  # past the Will's delay
    to_bob, to_spy, to_carol = topics(barrier(alice, bob, spy, carol, quiet=0.5))
    assert to_bob == ["im/user/bob/dm/alice", "im/room/lobby/carol", "im/room/lobby/carol"]
    assert "im/room/lobby/bob" not in to_spy and to_spy.count("im/room/lobby/carol") == 2
    assert to_carol.count("im/room/lobby/carol") == 2  # her shared subscriptions deliver what she may read
    assert [t for t in to_carol if not t.startswith(("im/room/", "im/user/carol/"))] == []


def _alias(number: int) -> Properties:
    return v5_properties(PacketTypes.PUBLISH, TopicAlias=number)


# ---------------------------------------------------------------- the service accounts (deploy/mosquitto/aclfile)


def test_service_account_writes_worker_topics(raw: RawFactory) -> None:
    alice = raw("alice", client_id="alice:laptop")
    assert alice.subscribe_all("im/presence/+", "im/events", "im/user/alice/#") == [1, 1, 1]
    worker = raw("presence", client_id="presence:test")
    record = b'{"type":"presence","v":1,"account":"bob","nick":"bob","state":"online","since":1.0,"devices":1}'
    worker.publish("im/presence/bob", record, retain=True)
    worker.publish("im/events", b'{"type":"event","v":1,"event":"join","account":"bob","nick":"bob"}')
    worker.publish("im/user/alice/reply/c1", b'{"type":"roster","v":1,"id":"c1","users":[]}')
    worker.publish("im/user/alice/notice", b'{"type":"notice","v":1,"code":"denied","text":"x"}')
    got = alice.until("im/user/alice/notice")
    assert [m.topic for m in got] == ["im/presence/bob", "im/events", "im/user/alice/reply/c1", "im/user/alice/notice"]
    late = raw("carol", client_id="carol:late")  # the record is retained state
    assert late.subscribe_all("im/presence/+") == [1]
    assert late.until("im/presence/bob")[-1].payload == record


def test_service_account_clears_a_vanished_device_status(raw: RawFactory) -> None:
    alice = raw("alice", client_id="alice:cron")
    alice.publish("im/status/alice/cron", status(), retain=True)
    worker = raw("presence", client_id="presence:test")
    assert worker.subscribe_all("im/status/+/+") == [1]
    assert worker.until("im/status/alice/cron")[-1].retain is True
    worker.publish("im/status/alice/cron", b"", retain=True)
    restarted = raw("presence", client_id="presence:restarted")
    assert restarted.subscribe_all("im/status/+/+") == [1]
    assert restarted.silent(0.3) == []


@pytest.mark.parametrize("topic", ["im/room/lobby/presence", "im/user/bob/dm/presence"])
def test_service_account_cannot_chat_as_itself(raw: RawFactory, topic: str) -> None:
    bob = raw("bob", client_id="bob:phone")
    assert bob.subscribe_all("im/room/+/+", "im/user/bob/#") == [1, 1]
    worker = raw("presence", client_id="presence:test")
    worker.publish(topic, chat("hello from a worker"))
    carol = raw("carol", client_id="carol:x")
    assert topics(barrier(carol, bob)) == [[]]


def test_request_and_reply_round_trip(raw: RawFactory) -> None:
    worker = raw("presence", client_id="presence:test")
    assert worker.subscribe_all("im/request/+/+") == [1]
    alice = raw("alice", client_id="alice:laptop")
    assert alice.subscribe_all("im/user/alice/reply/+") == [1]
    alice.publish("im/request/alice/c1", b'{"type":"who","v":1,"id":"r1","all":false}')
    assert worker.until("im/request/alice/c1")[-1].payload
    worker.publish("im/user/alice/reply/c1", b'{"type":"roster","v":1,"id":"r1","users":[]}')
    assert json.loads(alice.until("im/user/alice/reply/c1")[-1].payload)["type"] == "roster"


# ---------------------------------------------------------------- the archive's account


def test_archive_account_reads_chat_and_requests_and_answers(raw: RawFactory) -> None:
    archive = raw("archive", client_id="archive:test")
    assert archive.subscribe_all("im/room/+/+", "im/user/+/dm/+", "im/request/+/+") == [1, 1, 1]
    alice = raw("alice", client_id="alice:laptop")
    assert alice.subscribe_all("im/user/alice/reply/+") == [1]
    alice.publish("im/room/lobby/alice", chat("in the lobby"))
    alice.publish("im/user/bob/dm/alice", chat("to bob"))
    alice.publish("im/request/alice/c1", b'{"type":"history","v":1,"id":"r1","user":"bob"}')
    got = archive.until("im/request/alice/c1")
    assert [m.topic for m in got] == ["im/room/lobby/alice", "im/user/bob/dm/alice", "im/request/alice/c1"]
    archive.publish("im/user/alice/reply/c1", b'{"type":"history_reply","v":1,"id":"r1","messages":[]}')
    assert alice.until("im/user/alice/reply/c1")[-1].payload.startswith(b'{"type":"history_reply"')


@pytest.mark.parametrize(
    "topic",
    [
        "im/room/lobby/archive",
        "im/user/bob/dm/archive",
        "im/request/archive/c1",
        "im/status/archive/test",
        "im/status/bob/phone",
        "im/presence/bob",
        "im/events",
        "im/group/team/info",
        "im/user/bob/friends",
        "im/user/bob/notice",
    ],
)
def test_archive_account_writes_nothing_but_replies(raw: RawFactory, topic: str) -> None:
    """Least privilege: unlike presence and groups, the archive cannot chat, announce or keep records."""
    bob = raw("bob", client_id="bob:phone")
    assert bob.subscribe_all("im/room/+/+", "im/user/bob/#", "im/presence/+", "im/events") == [1, 1, 1, 1]
    worker = raw("presence", client_id="presence:spy")  # reads every topic
    assert worker.subscribe_all("#") == [1]
    raw("archive", client_id="archive:test").publish(topic, chat("from the archive"))
    carol = raw("carol", client_id="carol:x")
    assert topics(barrier(carol, bob, worker)) == [[], []]


# ---------------------------------------------------------------- the CLI and workers, unchanged


def _lines_until(proc: Proc, predicate: Callable[[dict[str, object]], bool], timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    seen: list[dict[str, object]] = []
    while (left := deadline - time.monotonic()) > 0:
        item: dict[str, object] = json.loads(proc.line(timeout=left))
        seen.append(item)
        if predicate(item):
            return item
    raise AssertionError(f"no such line within {timeout}s: {seen}")


def test_cli_and_workers_run_unchanged(
    broker: Mosquitto, raw: RawFactory, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """``imcli workers --dynsec`` beside deploy/mosquitto, and the CLI as on the embedded broker."""
    workers = procs(
        "workers", "--host", "127.0.0.1", "--port", str(broker.port), "--dynsec", "--accounts-file", str(broker.passwd),
        "--archive-dir", str(tmp_path / "archive"),
        env={"IMCLI_PRESENCE_PASSWORD": password_of("presence"), "IMCLI_GROUPS_PASSWORD": password_of("groups"),
             "IMCLI_ARCHIVE_PASSWORD": password_of("archive"), "IMCLI_FILES_PASSWORD": password_of("files"),
             "IMCLI_CONFIG_DIR": str(tmp_path / "workers")},
    )  # fmt: skip
    assert "workers running as presence, groups, archive, files" in workers.line(timeout=30), workers.err_lines

    runner = CliRunner()

    def cli(name: str, *args: str, stdin: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=stdin, env={"IMCLI_CONFIG_DIR": str(tmp_path / name)})

    where = ["--host", "127.0.0.1", "--port", str(broker.port)]
    for name in ("alice", "bob", "carol"):
        logged = cli(name, "login", name, *where, "--password-stdin", stdin=password_of(name) + "\n")
        assert logged.exit_code == 0, logged.output
    refused = cli("newbie", "register", "newbie", *where, "--password-stdin", stdin="newbie-password\n")
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1  # mosquitto_passwd makes accounts

    listen = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(tmp_path / "bob")})
    _lines_until(listen, lambda line: line["kind"] == "event" and line["from"] == "bob")  # his own join
    who = json.loads(cli("alice", "who", "--json").stdout)
    assert [u["account"] for u in who] == ["bob"]

    # groups: private, enforced by the broker through dynamic security
    assert cli("alice", "group", "create", "team", "--private").exit_code == 0
    assert cli("alice", "group", "invite", "team", "bob").exit_code == 0
    assert cli("alice", "group", "say", "team", "hello team").stdout.strip() == "sent to #team"
    line = _lines_until(listen, lambda line: line["kind"] == "group")
    assert (line["group"], line["from"], line["text"]) == ("team", "alice", "hello team")
    outsider = cli("carol", "group", "say", "team", "let me in")
    assert outsider.exit_code == 1 and outsider.stderr.startswith("Error: no group #team (or it is private)")
    invite_zed = cli("alice", "group", "invite", "team", "zed")  # --accounts-file: every account is known
    assert invite_zed.exit_code == 1 and invite_zed.stderr.startswith("Error: unknown user 'zed'")

    # dm-policy friends: the CLI asks first; a raw client is dropped at delivery by bob's dynsec role
    assert cli("bob", "config", "set", "dm-policy", "friends").exit_code == 0
    assert cli("alice", "friend", "add", "bob").exit_code == 0
    assert cli("bob", "friend", "accept", "alice").exit_code == 0
    stranger = cli("carol", "dm", "bob", "hi stranger")
    assert stranger.exit_code == 1 and "accepts direct messages from friends only" in stranger.stderr
    raw("carol", client_id="carol:raw").publish("im/user/bob/dm/carol", chat("sneaky"))
    assert cli("alice", "dm", "bob", "hi friend").stdout.strip() == "sent to bob"
    line = _lines_until(listen, lambda line: line["kind"] == "dm")
    assert (line["from"], line["text"]) == ("alice", "hi friend")  # carol's came first, and never arrived

    # the archive: history as on the embedded broker; carol's dropped DM was not archived either
    # (the reader role the group worker gives the archive): it reached the archive before alice's
    assert wait_until(lambda: "hi friend" in cli("bob", "history", "@alice").stdout, 10)
    assert cli("bob", "history", "@carol").stdout.strip() == "no messages in @carol"
    assert "hello team" in cli("bob", "history", "#team").stdout
    assert (tmp_path / "archive" / "archive.sqlite3").is_file()

    assert listen.stop() == 0
    assert workers.stop() == 0, workers.err_lines
    assert not [e for e in workers.err_lines if "Traceback" in e]


# ---------------------------------------------------------------- offline delivery: persistent sessions
# tests/test_chat.py's offline-delivery tests, on Mosquitto with the three workers beside it.


@pytest.fixture
def with_workers(broker: Mosquitto) -> Iterator[list[ServiceWorker]]:
    with running_workers(broker) as started:
        yield started


def test_listen_gets_what_mosquitto_queued_while_it_was_away(
    broker: Mosquitto, with_workers: list[ServiceWorker], procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """``imcli listen`` does not ask the archive: what it gets after a break, Mosquitto queued."""
    info = broker.info()
    make_team(info)
    listen_after_a_break(info, procs, tmp_path)


def test_an_offline_session_keeps_1000_messages(raw: RawFactory) -> None:
    """deploy/mosquitto/mosquitto.conf's max_queued_messages: 1000 in all, as the embedded broker
    (which keeps the newest; Mosquitto keeps the oldest)."""
    away = raw("bob", client_id="bob:away", clean=False)
    assert away.subscribe_all("im/user/bob/#") == [1]
    away.close()
    alice = raw("alice", client_id="alice:bot")
    for i in range(1100):
        alice.client.publish("im/user/bob/dm/alice", f"m{i}", qos=1)
    alice.publish("im/user/bob/dm/alice", "barrier")
    back = raw("bob", client_id="bob:away", clean=False)
    got = back.until("im/user/bob/dm/alice", b"m999", timeout=10) + back.silent(0.5)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(1000)]


def test_offline_messages_survive_a_mosquitto_restart_once_each(
    broker: Mosquitto, with_workers: list[ServiceWorker]
) -> None:
    """Mosquitto keeps the queue over a restart (persistence), and the archive has the same
    messages: ``imcli chat`` shows each once, in order, and none again on its next start."""
    info = broker.info()
    make_team(info)
    state, sent = away_while_alice_sends_fifty(info)
    broker.restart()
    assert wait_until(lambda: all(w.client.connected for w in with_workers), 15), broker.log
    listener, session, shown = chat_start(info, state)
    queued = [m for m in shown if m.sender == "alice"]
    listener.close()
    assert_once_in_order(shown, sent)
    state = session.remember()
    listener, session, shown_again = chat_start(info, state)
    listener.close()
    assert [m for m in shown_again if m.sender == "alice"] == [] and len(queued) == len(sent)


def test_listen_survives_a_mosquitto_restart(
    broker: Mosquitto, with_workers: list[ServiceWorker], procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """tests/test_cli.py's restart of ``imcli serve`` under ``imcli listen``, with Mosquitto."""
    alice, bob = (Cli(CliRunner(), broker.info(), tmp_path / f"config-{name}") for name in ("alice", "bob"))
    alice.login("alice")
    bob.login("bob")
    listener = start_listener(procs, bob)
    wait_listening(bob, listener)

    broker.stop()
    listener.wait_stderr("connection lost")
    down = alice("say", "nobody home")
    assert down.exit_code == 1 and down.stderr.startswith(f"Error: cannot reach the broker at 127.0.0.1:{broker.port}")

    broker.restart()  # same port, same files
    listener.wait_stderr("reconnected")
    assert wait_until(lambda: all(w.client.connected for w in with_workers), 15), broker.log
    wait_listening(bob, listener)
    assert alice("say", "back again").exit_code == 0
    assert json.loads(listener.line())["text"] == "back again"
    assert alice("dm", "bob", "still there?").exit_code == 0  # the workers are back too: bob resolves
    assert json.loads(listener.line())["text"] == "still there?"
    assert listener.stop() == 0


# ---------------------------------------------------------------- federation: a bridged pair


def test_bridged_pair_carries_chat_and_presence(tmp_path: Path) -> None:
    """alice on broker A, bob on broker B, bridged by deploy/mosquitto/bridge.conf; workers on B only."""
    from imcli.client import services as im
    from imcli.client.identity import Identity
    from imcli.client.listener import Listener
    from imcli.core.mqtt import Credentials
    from tests.brokers import DEPLOY

    acl_b = tmp_path / "aclfile-b"
    acl_b.write_text((DEPLOY / "aclfile").read_text() + (DEPLOY / "bridge.aclfile").read_text())
    # one account namespace: B's password file (read by the workers) lists A's users too (bridge.conf)
    accounts_b = ("alice", "bob", "carol", "presence", "groups", "imcli-bridge")
    with running_mosquitto(tmp_path / "b", accounts_b, aclfile=acl_b) as b:
        bridge = (DEPLOY / "bridge.conf").read_text()
        bridge = bridge.replace("address 127.0.0.1:1884", f"address 127.0.0.1:{b.port}")
        bridge = bridge.replace("remote_password CHANGE-ME", f"remote_password {password_of('imcli-bridge')}")
        with (
            running_mosquitto(tmp_path / "a", ("alice",), extra=bridge) as a,
            running_workers(b, archive=False, files=False),
        ):
            bob_raw = connect_raw("127.0.0.1", b.port, "bob", "bob:raw")
            try:
                assert bob_raw.subscribe("im/room/+/+") == 1
                alice_raw = connect_raw("127.0.0.1", a.port, "alice", "alice:raw")
                try:  # the bridge connects in the background: A's messages reach B once it is up
                    probe = chat("is the bridge up?")
                    assert wait_until(lambda: _published_and_seen(alice_raw, bob_raw, probe), 15), a.log + b.log
                finally:
                    alice_raw.close()
            finally:
                bob_raw.close()

            alice = Identity(a.address, Credentials("alice", password_of("alice")), "laptop")
            bob = Identity(b.address, Credentials("bob", password_of("bob")), "phone")
            with Listener(alice) as alice_listens, Listener(bob) as bob_listens:
                alice_got: list[tuple[str, str | None, str]] = []
                bob_got: list[tuple[str, str | None, str]] = []
                for listening, sink in ((alice_listens, alice_got), (bob_listens, bob_got)):
                    threading.Thread(
                        target=lambda li=listening, s=sink: s.extend((i.kind, i.sender, i.text) for i in li),
                        daemon=True,
                    ).start()
                # presence: the worker on B sees alice's device through the bridge, and A sees its records
                assert wait_until(lambda: {u.account for u in im.who(alice)} == {"alice", "bob"}, 15)
                assert {u.account for u in im.who(bob)} == {"alice", "bob"}

                im.say(alice, "lobby", im.prepare_text("hello from A"))
                assert wait_until(lambda: ("room", "alice", "hello from A") in bob_got)
                assert im.send_dm(bob, "alice", im.prepare_text("hello from B")).account == "alice"
                assert wait_until(lambda: ("dm", "bob", "hello from B") in alice_got)
                assert im.send_dm(alice, "bob", im.prepare_text("and back")).account == "bob"
                assert wait_until(lambda: ("dm", "alice", "and back") in bob_got)
            # a forged sender is refused on A before it could cross the bridge
            carol_spy = connect_raw("127.0.0.1", b.port, "carol", "carol:spy")
            forger = connect_raw("127.0.0.1", a.port, "alice", "alice:forger")
            try:
                assert carol_spy.subscribe("im/room/+/+") == 1
                forger.publish("im/room/lobby/bob", chat("forged bob"))
                assert topics(barrier(forger, carol_spy)) == [[]]
            finally:
                forger.close()
                carol_spy.close()


def _published_and_seen(sender: Raw, observer: Raw, payload: bytes) -> bool:
    sender.publish(f"im/room/lobby/{sender.username}", payload)
    try:
        observer.until(f"im/room/lobby/{sender.username}", payload, timeout=0.3)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------- devices (issue 17)


@pytest.mark.xfail(
    strict=True,
    reason="only the embedded broker copies a DM to im/user/<from>/sent/<to> for the sender's other devices: "
    "Mosquitto has no plugin that publishes a second message (deploy/mosquitto/README.md)",
)
def test_a_dm_reaches_the_senders_other_devices(raw: RawFactory) -> None:
    other_device = raw("alice", None, "alice:phone")
    assert other_device.subscribe("im/user/alice/#") == 1
    raw("alice", None, "alice:laptop").publish("im/user/bob/dm/alice", chat("from the laptop"))
    assert other_device.expect("im/user/alice/sent/bob").payload == chat("from the laptop")


# ---------------------------------------------------------------- retained state past the in-flight window


def test_the_presence_worker_reads_more_retained_statuses_than_one_clients_window(tmp_path: Path) -> None:
    """Mosquitto 2.0 inserts a subscription's retained messages for the subscriber all at once, as it
    grants the SUBSCRIBE, and drops what does not fit in that client's window: ``max_inflight_messages``
    in flight plus ``max_queued_messages`` queued (src/database.c, db__message_insert). With 1000 and
    1000 a presence worker (re)starting under 2,400 statuses read 2,000 and dropped the rest and its own
    sync marker after them, so it never started ("did not read its retained state") and ``who`` of a
    team past 2,000 devices would be short. deploy/mosquitto/mosquitto.conf now bounds the in-flight
    window by bytes (max_inflight_messages 0, max_inflight_bytes), and offline queues stay at 1000."""
    names = tuple(f"u{i:02d}" for i in range(12))
    devices = 200  # the most statuses the presence worker counts for one account
    with running_mosquitto(tmp_path / "mosquitto", (*ACCOUNTS, *names)) as broker:
        for name in names:
            sender = connect_raw("127.0.0.1", broker.port, name, f"{name}:bot")
            sent = [
                sender.client.publish(f"im/status/{name}/d{d:03d}", status(3600), qos=1, retain=True)
                for d in range(devices)
            ]
            for info in sent:
                info.wait_for_publish(30)
            sender.close()
        creds = Credentials("presence", password_of("presence"))
        worker = PresenceWorker(broker.address, creds, PasswordFileDirectory(broker.passwd), device="test")
        with worker, worker.lock:  # started: it read its retained state, its sync marker last
            counted = {p.account: p.devices for p in worker.roster.who()}
        assert counted == dict.fromkeys(names, devices)
        assert "being dropped" not in broker.log
