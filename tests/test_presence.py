"""Presence on a real broker: online/offline, devices, Last Will, rename races, worker restarts.

Every test using ``server`` runs on the embedded broker, on Mosquitto with ``imcli workers
--dynsec`` beside it, and on a three-node NATS cluster with alice on node 1 and bob on node 3
(tests/brokers.py, tests/natsbroker.py)."""

from __future__ import annotations

import json
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.server import BrokerSettings
from imcli.cli.app import app
from imcli.client import services
from imcli.client.listener import Listener
from imcli.core.errors import NameTaken, NotFound, RequestTimeout
from imcli.core.mqtt import SUBSCRIBE_TRIES, Credentials
from imcli.core.service import PasswordFileDirectory
from imcli.core.wire import DeviceStatus, Presence, encode
from imcli.groups.worker import GroupWorker
from imcli.presence.roster import MAX_STATUSES, Effects, PresenceRoster
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import BackgroundServer, ServeInfo
from imcli.serve.workers import StoreDirectory
from tests import brokers
from tests.conftest import Cli, Proc, Raw, ident, password_of, wait_until
from tests.rawmqtt import WAIT, connect_raw

RawFactory = Callable[..., Raw]
# the embedded broker and Mosquitto only (said why above each use)
NOT_NATS = pytest.mark.parametrize("broker_kind", ["amqtt", "mosquitto"], indirect=True)

broker_kind, broker_under_test, server, users = brokers.ALL  # every test using `server` on the three brokers


class PresenceWatch:
    """A raw subscriber to every presence record and event (what any signed-in user may read)."""

    def __init__(self, raw: Raw) -> None:
        for topic in ("im/presence/+", "im/events"):
            # asked again when refused, as imcli's clients do (SUBSCRIBE_TRIES): a loaded NATS cluster
            # refuses a QoS 1 SUBSCRIBE whose JetStream consumer is not made within 4 s
            granted = [raw.subscribe(topic)]
            while granted[-1] != 1 and len(granted) < SUBSCRIBE_TRIES:
                time.sleep(len(granted))
                granted.append(raw.subscribe(topic))
            assert granted[-1] == 1, granted
        self.raw = raw
        self.records: dict[str, dict[str, object]] = {}
        self.events: list[dict[str, object]] = []
        self.duplicates = 0  # events received again (QoS 1 is at-least-once: clients drop them by id)

    def _drain(self, timeout: float) -> None:
        try:
            msg = self.raw.messages.get(timeout=timeout)
        except queue.Empty:
            return
        if not msg.payload:
            return
        data = json.loads(msg.payload)
        if msg.topic == "im/events":
            # a QoS 1 publish may arrive twice: on NATS a node that cannot store the worker's event in
            # JetStream within 4 s closes the worker's connection unacknowledged, and paho sends it again
            # (the Listener drops such a copy by its id, RecentIds); two events with two ids still fail
            if any(e["id"] == data["id"] for e in self.events):
                self.duplicates += 1
            else:
                self.events.append(data)
        else:
            self.records[data["account"]] = data

    def wait_events(self, count: int, timeout: float = WAIT) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            self._drain(0.05)
        self._drain(0.2)  # and nothing more than expected
        return self.events

    def wait(self, account: str, timeout: float = WAIT, **expected: object) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.records.get(account)
            if record is not None and all(record.get(k) == v for k, v in expected.items()):
                return record
            self._drain(0.05)
        raise AssertionError(f"{account}: wanted {expected}, last record {self.records.get(account)}")


@pytest.fixture
def watch(users: Callable[..., None], raw: RawFactory) -> PresenceWatch:
    users("alice", "bob", "carol", "watcher")
    return PresenceWatch(raw("watcher", client_id="watcher:w"))


# ---------------------------------------------------------------- online / offline


def test_listener_is_online_while_it_runs_and_offline_after_clean_exit(server: ServeInfo, watch: PresenceWatch) -> None:
    with Listener(ident(server, "alice")):
        watch.wait("alice", state="online", devices=1)
        users = services.who(ident(server, "bob"))
        assert [(u.account, u.state, u.devices) for u in users] == [("alice", "online", 1)]
    watch.wait("alice", state="offline", devices=0)
    assert services.who(ident(server, "bob")) == []
    everyone = {u.account: u for u in services.who(ident(server, "bob"), include_offline=True)}
    assert everyone["alice"].state == "offline" and everyone["alice"].since > 0
    # who --all lists every account, also those never seen online (since 0: never)
    assert everyone["carol"].state == "offline" and everyone["carol"].since == 0
    assert [(e["event"], e["account"]) for e in watch.wait_events(2)] == [("join", "alice"), ("leave", "alice")]


def test_one_shot_commands_never_make_a_user_flap(server: ServeInfo, watch: PresenceWatch) -> None:
    services.say(ident(server, "alice"), "lobby", services.prepare_text("hello"))
    services.who(ident(server, "alice"))
    with Listener(ident(server, "bob")):
        watch.wait("bob", state="online")
    assert "alice" not in watch.records
    assert all(e["account"] != "alice" for e in watch.events)


def test_two_devices_of_one_user(server: ServeInfo, watch: PresenceWatch) -> None:
    laptop = Listener(ident(server, "alice", "laptop")).__enter__()
    phone = Listener(ident(server, "alice", "phone")).__enter__()
    try:
        watch.wait("alice", state="online", devices=2)
        laptop.close()
        watch.wait("alice", state="online", devices=1)
    finally:
        phone.close()
    watch.wait("alice", state="offline", devices=0)
    # a device that comes or goes while another stays online is an event too (issue 17)
    events = watch.wait_events(4)
    assert [(e["event"], e.get("device")) for e in events] == [
        ("join", None),
        ("device_join", "phone"),
        ("device_leave", "laptop"),
        ("leave", None),
    ]


def bob_listening(cli_as: Callable[[str], Cli], procs: Callable[..., Proc], watch: PresenceWatch) -> Proc:
    """`imcli listen --json` as bob, in its own process, once the worker says he is online."""
    bob = cli_as("bob")
    bob.login("bob")
    p = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(bob.config_dir)})
    watch.wait("bob", state="online", timeout=Proc.START)  # a fresh interpreter's start
    return p


def test_killed_client_goes_offline_by_its_last_will(
    server: ServeInfo, watch: PresenceWatch, cli_as: Callable[[str], Cli], procs: Callable[..., Proc]
) -> None:
    p = bob_listening(cli_as, procs, watch)
    p.popen.send_signal(signal.SIGKILL)
    p.popen.wait(10)
    watch.wait("bob", state="offline", timeout=30)  # far sooner than the 75 s heartbeat expiry


def test_sigterm_makes_listen_say_offline(
    server: ServeInfo, watch: PresenceWatch, cli_as: Callable[[str], Cli], procs: Callable[..., Proc]
) -> None:
    p = bob_listening(cli_as, procs, watch)
    assert p.stop() == 0
    watch.wait("bob", state="offline")


def test_device_without_last_will_expires(server: ServeInfo, watch: PresenceWatch, raw: RawFactory) -> None:
    """A device that stops its heartbeat and left no Last Will (a crash the broker never saw)."""
    ghost = raw("carol", client_id="carol:ghost")
    ghost.publish("im/status/carol/ghost", encode(DeviceStatus(interval=1)), retain=True)
    watch.wait("carol", state="online")
    ghost.close()  # a clean DISCONNECT: no Last Will, the retained status stays
    # 2.5 of its 1 s intervals and the worker's 1 s sweep; the default 30 s heartbeat would
    # take 75 s, so a worker that ignored the device's interval fails this wait
    watch.wait("carol", state="offline", timeout=30)


def test_a_flood_of_retained_statuses_is_bounded_on_every_broker(
    server: ServeInfo,
    watch: PresenceWatch,
    raw: RawFactory,
    broker_kind: str,
    broker_under_test: brokers.BrokerUnderTest,
) -> None:
    """carol's raw client retains 60 statuses more than ``MAX_STATUSES``. The embedded broker keeps 20
    (``--max-statuses``); Mosquitto and NATS keep every one, and each used to become a device name in her
    presence record and in every ``who`` (261 here), towards the payload limit past which ``who`` would
    fail for everyone. Now the presence worker counts ``MAX_STATUSES`` at most and clears the rest: her
    record says so, ``who`` answers, and what stays retained is bounded alike."""
    bound = 20 if broker_kind == "amqtt" else MAX_STATUSES
    flood = raw("carol", client_id="carol:flood")
    status = encode(DeviceStatus(interval=3600))
    for i in range(MAX_STATUSES + 60):
        flood.client.publish(f"im/status/carol/d{i:03d}", status, qos=0, retain=True)
    flood.publish("im/status/carol/last", status, retain=True)
    watch.wait("carol", timeout=60, state="online", devices=bound)
    assert [p.devices for p in services.who(ident(server, "bob")) if p.account == "carol"] == [bound]
    reader = broker_under_test.add_reader()

    def retained() -> int:  # what a new subscriber gets now
        look = raw(reader, client_id=f"{reader}:statuses{time.monotonic_ns()}")
        assert look.subscribe("im/status/carol/+", qos=0) == 0
        held = {m.topic for m in look.silent(1) if m.payload}
        look.close()
        return len(held)

    assert wait_until(lambda: retained() <= bound, 60)  # the worker clears the rest as it reads them
    for i in range(MAX_STATUSES + 60):
        flood.client.publish(f"im/status/carol/d{i:03d}", b"", qos=0, retain=True)
    flood.publish("im/status/carol/last", b"", retain=True)


# ---------------------------------------------------------------- nicknames


def test_rename_shows_in_presence_who_dm_and_listen(
    server: ServeInfo, watch: PresenceWatch, cli_as: Callable[[str], Cli], procs: Callable[..., Proc]
) -> None:
    alice, bob = cli_as("alice"), cli_as("bob")
    alice.login("alice")
    bob.login("bob")
    listener = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(bob.config_dir)})
    watch.wait("bob", state="online", timeout=Proc.START)  # a fresh interpreter's start

    renamed = alice("rename", "Ally")
    assert renamed.exit_code == 0 and renamed.stdout.strip() == "you are now known as Ally"
    watch.wait("alice", nick="Ally")
    listed = json.loads(alice("who", "--all", "--json").stdout)
    assert {u["account"]: u["nick"] for u in listed}["alice"] == "Ally"

    sent = alice("dm", "bob", "hi")
    assert sent.exit_code == 0
    by_nick = bob("dm", "ally", "hi Ally")  # nicknames resolve case-insensitively
    assert by_nick.exit_code == 0 and by_nick.stdout.strip() == "sent to Ally (@alice)"

    lines: list[dict[str, str]] = []  # bob's own join, the rename and the DM, in any order (on the cluster
    # the event and the DM come through different nodes' streams), and perhaps other presence events there

    def seen() -> bool:
        return any(line["kind"] == "dm" for line in lines) and any("known as" in line.get("text", "") for line in lines)

    while not seen():
        assert len(lines) < 12, lines
        lines.append(json.loads(listener.line()))
    rename_event = next(line for line in lines if line["kind"] == "event" and "known as" in line["text"])
    assert rename_event["text"] == "alice is now known as Ally"
    dm = next(line for line in lines if line["kind"] == "dm")
    assert (dm["from"], dm["nick"]) == ("alice", "Ally")


@pytest.mark.parametrize(
    ("nick", "error"),
    [
        ("bob", "Error: the name 'bob' is taken"),
        ("BOB", "Error: the name 'BOB' is taken"),
        ("b\u043eb", "Error: the name 'b\u043eb' is taken"),  # a Cyrillic o: looks like bob
        ("\uff42\uff4f\uff42", "Error: the name '\uff42\uff4f\uff42' is taken"),  # full width: NFKC makes it bob
        ("presence", "Error: the name 'presence' is taken"),
        ("pr\u0435sence", "Error: the name"),  # a Cyrillic e in a reserved name
        ("two  spaces", "Error: invalid display name 'two  spaces'"),
        ("evil\u202eeman", "Error: invalid display name"),  # a bidi override never is a name
    ],
)
# the refusals are the presence worker's, the same on every broker: on NATS (slow to set up, about 15 s
# a test) the rename tests around this one cover the worker's answers
@NOT_NATS
def test_rename_refusals(watch: PresenceWatch, cli_as: Callable[[str], Cli], nick: str, error: str) -> None:
    alice = cli_as("alice")
    alice.login("alice")
    result = alice("rename", nick)
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr


def test_a_taken_nickname_is_compared_case_insensitively(server: ServeInfo, watch: PresenceWatch) -> None:
    assert services.rename(ident(server, "alice"), "Zed") == "Zed"
    with pytest.raises(NameTaken):
        services.rename(ident(server, "bob"), "zED")
    assert services.rename(ident(server, "alice"), "alice") == "alice"  # back to the account name
    assert services.rename(ident(server, "bob"), "zed") == "zed"  # now free


def test_concurrent_renames_have_exactly_one_winner(server: ServeInfo, users: Callable[..., None]) -> None:
    racers = [f"racer{i}" for i in range(8)]
    users(*racers)
    barrier = threading.Barrier(len(racers))
    results: dict[str, str] = {}

    def race(name: str) -> None:
        racer = ident(server, name)
        barrier.wait()
        try:
            results[name] = services.rename(racer, "Winner")
        except NameTaken:
            results[name] = "taken"

    threads = [threading.Thread(target=race, args=(n,)) for n in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == ["Winner"] + ["taken"] * 7
    winner = next(n for n, r in results.items() if r == "Winner")
    everyone = services.who(ident(server, racers[0]), include_offline=True)
    assert [u.account for u in everyone if u.nick.casefold() == "winner"] == [winner]


def test_dm_to_unknown_name(server: ServeInfo, watch: PresenceWatch) -> None:
    with pytest.raises(NotFound):
        services.send_dm(ident(server, "alice"), "nobody-here", services.prepare_text("hi"))


# ---------------------------------------------------------------- the worker itself


# The tests of the worker itself start and stop their own presence worker: on the embedded broker and
# Mosquitto (bare_broker); the shared NATS cluster always runs its workers (tests/natsbroker.py).


@dataclass
class Bare:
    """A broker whose presence worker the test starts and stops itself."""

    info: ServeInfo
    make_worker: Callable[[], PresenceWorker]
    password: str  # the presence service account's
    accounts: list[str]  # how `imcli presence` learns every account on this broker


@pytest.fixture
def bare_broker(broker_kind: str, tmp_path: Path) -> Iterator[Bare]:
    """A broker without a presence worker, and a way to start presence workers against it. The group
    worker runs (dm asks it whether the recipient accepts the message), as under imcli serve or workers."""
    if broker_kind == "amqtt":
        with BackgroundServer(BrokerSettings(data_dir=tmp_path / "bare", port=0), workers=False) as info:
            store = AccountStore(info.data_dir)
            store.ensure_service("presence", "service-password")
            store.ensure_service("groups", "service-password")
            for name in ("alice", "bob", "watcher"):
                store.add(name, password_of(name))

            def worker() -> PresenceWorker:
                return PresenceWorker(
                    info.address, Credentials("presence", "service-password"), StoreDirectory(store), device="t"
                )

            with GroupWorker(info.address, Credentials("groups", "service-password"), StoreDirectory(store)):
                yield Bare(info, worker, "service-password", ["--data-dir", str(info.data_dir)])
        return
    # Mosquitto, as `imcli workers --dynsec --accounts-file` would run beside it, minus presence
    with brokers.running_mosquitto(tmp_path / "bare", (*brokers.ACCOUNTS, "watcher")) as mosquitto:
        directory = PasswordFileDirectory(mosquitto.passwd)

        def mosquitto_worker() -> PresenceWorker:
            creds = Credentials("presence", password_of("presence"))
            return PresenceWorker(mosquitto.address, creds, directory, device="t")

        groups = Credentials("groups", password_of("groups"))
        with GroupWorker(mosquitto.address, groups, directory, device="t", dynsec=True):
            yield Bare(
                mosquitto.info(), mosquitto_worker, password_of("presence"), ["--accounts-file", str(mosquitto.passwd)]
            )


@NOT_NATS
def test_no_worker_means_a_clear_timeout(bare_broker: Bare, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", "0.5")  # the default 5 s: test_units' test_request_timeout
    with pytest.raises(RequestTimeout, match=r"no worker answered within 0\.5s"):
        services.who(ident(bare_broker.info, "alice"))


@NOT_NATS
def test_restarted_worker_rebuilds_the_roster_unnoticed(bare_broker: Bare) -> None:
    info, make_worker = bare_broker.info, bare_broker.make_worker
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    events: list[dict[str, object]] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher:w")
    watcher.username_pw_set("watcher", password_of("watcher"))
    watcher.on_message = lambda _c, _u, m: events.append(json.loads(m.payload)) if m.topic == "im/events" else None
    watcher.connect(info.address.host, info.address.port)
    watcher.loop_start()
    watcher.subscribe("im/events", 1)
    try:
        first = make_worker().__enter__()
        alice = Listener(ident(info, "alice", "laptop")).__enter__()
        bob = Listener(ident(info, "bob", "phone")).__enter__()
        assert services.rename(ident(info, "alice"), "Ally") == "Ally"
        assert wait_until(lambda: len(events) == 3)  # join, join, rename
        first.__exit__(None, None, None)  # the worker dies...

        bob.close()  # ...and bob leaves while nobody is watching
        second = make_worker().__enter__()
        try:
            who = {u.account: u for u in services.who(ident(info, "alice"), include_offline=True)}
            assert (who["alice"].state, who["alice"].nick, who["alice"].devices) == ("online", "Ally", 1)
            assert who["bob"].state == "offline"
            assert wait_until(lambda: len(events) == 4)
            assert (events[3]["event"], events[3]["account"]) == ("leave", "bob")  # and no second join for alice
            time.sleep(0.3)
            assert len(events) == 4
            assert services.send_dm(ident(info, "bob"), "ally", services.prepare_text("hi")).account == "alice"
        finally:
            alice.close()
            second.__exit__(None, None, None)
    finally:
        watcher.disconnect()
        watcher.loop_stop()


@NOT_NATS  # the cluster's workers are shared by every test (tests/natsbroker.py): not this one's to break
def test_a_device_that_leaves_while_the_worker_reconnects_is_gone_at_once(bare_broker: Bare) -> None:
    """The worker's connection drops (on NATS 2.9 a node that cannot store the worker's QoS 1 publish in
    JetStream within 4 s closes it; CI) and bob leaves meanwhile: his status is cleared while the worker
    (a clean session) does not hear it. Reconnected, the worker reads the retained statuses again and
    says bob left at once, not after the 75 s heartbeat expiry."""
    info = bare_broker.info
    watcher = connect_raw(info.address.host, info.address.port, "watcher", "watcher:w", password_of("watcher"))
    assert watcher.subscribe("im/events") == 1
    worker = bare_broker.make_worker().__enter__()
    try:
        bob = Listener(ident(info, "bob", "phone")).__enter__()
        assert [u.account for u in services.who(ident(info, "alice"))] == ["bob"]
        sock = worker.client._paho.socket() if worker.client._paho is not None else None
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the worker's connection drops; paho reconnects 1 s later
        assert wait_until(lambda: not worker.client.connected)
        bob.close()
        assert not worker.client.connected  # bob left in the gap
        told = [json.loads(watcher.expect("im/events", timeout=10).payload) for _ in range(2)]
        assert [(e["event"], e["account"]) for e in told] == [("join", "bob"), ("leave", "bob")]
        assert services.who(ident(info, "alice")) == []
    finally:
        worker.__exit__(None, None, None)
        watcher.close()


# ---------------------------------------------------------------- the roster, pure


class Users:
    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def is_user(self, name: str) -> bool:
        return name in self.names

    def user_names(self) -> frozenset[str]:
        return frozenset(self.names)


def test_roster_sync_emits_only_real_changes() -> None:
    roster = PresenceRoster(Users("alice", "bob"))
    roster.load_presence(Presence(account="alice", nick="Ally", state="online", since=1.0, devices=1))
    roster.load_presence(Presence(account="bob", nick="bob", state="online", since=1.0, devices=1))
    roster.device_seen("alice", "laptop", DeviceStatus(), now=5.0)
    effects = roster.finish_sync(now=10.0)
    assert [(e.event, e.account) for e in effects.events] == [("leave", "bob")]
    # alice's record is written again only because it gains her devices' names (issue 17)
    assert [(p.account, p.state, p.device_names) for p in effects.presence] == [
        ("alice", "online", ["laptop"]),
        ("bob", "offline", []),
    ]
    roster = PresenceRoster(Users("alice"))
    roster.load_presence(
        Presence(account="alice", nick="Ally", state="online", since=1.0, devices=1, device_names=["laptop"])
    )
    roster.device_seen("alice", "laptop", DeviceStatus(), now=5.0)
    assert roster.finish_sync(now=10.0) == Effects()  # a record with the names: nothing to say
    assert roster.resolve("ALLY") == "alice"


def test_roster_expiry_clears_the_ghost() -> None:
    roster = PresenceRoster()
    roster.finish_sync(0.0)
    roster.device_seen("carol", "d1", DeviceStatus(interval=10), now=0.0)
    assert roster.expire(now=24.0).presence == []
    effects = roster.expire(now=26.0)
    assert effects.clear_status == [("carol", "d1")]
    assert [e.event for e in effects.events] == ["leave"]


def test_roster_records_loaded_with_clashing_nicks_keep_one_owner() -> None:
    roster = PresenceRoster(Users("alice", "bob"))
    roster.load_presence(Presence(account="alice", nick="Sam", state="offline", since=1.0))
    roster.load_presence(Presence(account="bob", nick="sam", state="offline", since=1.0))
    assert roster.resolve("sam") == "alice"
    assert roster.nick_of("bob") == "bob"


@NOT_NATS
def test_standalone_worker_command(bare_broker: Bare, procs: Callable[..., Proc], tmp_path: Path) -> None:
    info = bare_broker.info
    worker = procs(
        "presence", "--host", info.address.host, "--port", str(info.address.port), *bare_broker.accounts,
        env={"IMCLI_PASSWORD": bare_broker.password},
    )  # fmt: skip
    assert worker.line(timeout=30) == f"presence worker running as presence on {info.address} (Ctrl-C to stop)"
    with Listener(ident(info, "alice", "laptop")):
        alice = Cli(CliRunner(), info, tmp_path / "alice-config")
        alice.login("alice")
        assert wait_until(lambda: "alice" in alice("who").stdout, 10)
        table = alice("who").stdout.splitlines()
        assert table[0].split() == ["nick", "account", "since", "devices"]
        assert table[1].split() == ["alice", "alice", "just", "now", "laptop"]  # devices by name (issue 17)
        assert alice("dm", "bob", "hi").exit_code == 0  # resolves through the standalone worker
    assert worker.stop() == 0


@NOT_NATS
def test_standalone_worker_with_wrong_password_fails_clearly(bare_broker: Bare, procs: Callable[..., Proc]) -> None:
    info = bare_broker.info
    worker = procs("presence", "--port", str(info.address.port), env={"IMCLI_PASSWORD": "wrong-password"})
    assert worker.popen.wait(30) == 1
    worker.stop()
    assert worker.err_lines[0].startswith("Error: the broker refused the connection"), worker.err_lines


def test_an_account_name_wins_over_an_earlier_nickname() -> None:
    known = Users("alice")
    roster = PresenceRoster(known)
    roster.finish_sync(0.0)
    reply, _ = roster.rename("alice", "dave", "r1", now=1.0)  # dave has no account yet
    assert reply.type == "renamed"
    known.names.add("dave")  # dave registers later
    assert roster.resolve("dave") == "dave"  # dm dave reaches dave, not alice
    effects = roster.device_seen("dave", "d1", DeviceStatus(), now=2.0)
    assert roster.nick_of("alice") == "alice" and roster.nick_of("dave") == "dave"
    assert [(e.event, e.account) for e in effects.events] == [("rename", "alice"), ("join", "dave")]


def test_renaming_before_ever_being_online_has_a_real_since() -> None:
    roster = PresenceRoster(Users("alice"))
    roster.finish_sync(0.0)
    _, effects = roster.rename("alice", "Ally", "r1", now=123.0)
    assert effects.presence[0].since == 123.0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--data-dir", "d", "--accounts-file", "p"], "Error: --data-dir and --accounts-file both name the accounts"),
        (["--accounts-file", "missing"], "Error: cannot read the password file missing"),
    ],
)
def test_standalone_worker_refuses_bad_account_sources(args: list[str], error: str) -> None:
    # no broker needed: the accounts are checked before connecting
    result = CliRunner().invoke(app, ["presence", "--port", "1", *args], env={"IMCLI_PASSWORD": "service-password"})
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
