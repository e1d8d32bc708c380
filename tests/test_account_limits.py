"""Per-account quotas (issue 15, missing limits): persistent sessions, retained statuses and
groups, each tried with a raw MQTT client as the attacks did, and each explained to the sender."""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.admission import refuse_new_session
from imcli.broker.limits import Limits
from imcli.broker.retained import status_refusal
from imcli.broker.server import BrokerSettings
from imcli.broker.session_upkeep import sessions_to_drop
from imcli.cli.app import app
from imcli.core.errors import AuthenticationFailed
from imcli.core.mqtt import Credentials, MqttClient
from imcli.core.rules import GROUP_CREATION_WINDOW, group_creation_refusal
from imcli.core.wire import DeviceStatus, GroupRequest, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli
from tests.rawmqtt import Raw, chat, connect_raw, field, packet, password_of, read_packets, wait_until

LIMITS = Limits(max_sessions=3, max_retained=3, max_status=256, max_groups=2, group_rate=3)
STATUS = encode(DeviceStatus(interval=30))

Connect = Callable[..., Raw]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ServeInfo]:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "limited", port=0, limits=LIMITS)) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        store.add("auditor", password_of("auditor"), Role.SERVICE)  # may read statuses, as the presence worker
        yield info


@pytest.fixture
def connect(limited: ServeInfo) -> Iterator[Connect]:
    opened: list[Raw] = []

    def make(name: str, client_id: str, **options: object) -> Raw:
        r = connect_raw(limited.address.host, limited.address.port, name, client_id, **options)  # type: ignore[arg-type]
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.close()


def notice(raw: Raw) -> dict[str, str]:
    got: dict[str, str] = json.loads(raw.expect(f"im/user/{raw.username}/notice").payload)
    return got


def sessions_of(info: ServeInfo, account: str) -> set[str]:
    assert info.broker is not None
    return {cid for cid in info.broker.persistent_sessions() if cid.startswith(f"{account}:")}


def connected(info: ServeInfo, client_id: str) -> bool:
    assert info.broker is not None
    session = info.broker.session_table().get(client_id, (None, None))[0]
    return session is not None and session.transitions.is_connected()


def away(info: ServeInfo, client_id: str) -> bool:
    return not connected(info, client_id)


# ---------------------------------------------------------------- persistent sessions


def test_past_the_session_limit_the_longest_idle_session_is_dropped_and_the_account_told(
    connect: Connect, limited: ServeInfo
) -> None:
    bob = connect("bob", "bob:old", clean=False)
    bob.close()  # another account's idle session: never counted against alice
    watch = connect("alice", "alice:watch")  # a clean session: not counted either
    assert watch.subscribe("im/user/alice/notice") == 1
    for n in (1, 2, 3):
        device = connect("alice", f"alice:{n}", clean=False)
        assert device.subscribe("im/room/lobby/+") == 1
        device.close()
        assert wait_until(functools.partial(away, limited, f"alice:{n}"))  # away in this order
    assert sessions_of(limited, "alice") == {"alice:1", "alice:2", "alice:3"}

    fourth = connect("alice", "alice:4", clean=False)
    assert fourth.rc == 0
    told = notice(watch)
    assert told["code"] == "limit" and "alice:1" in told["text"] and "at most 3" in told["text"]
    assert sessions_of(limited, "alice") == {"alice:2", "alice:3", "alice:4"}
    assert sessions_of(limited, "bob") == {"bob:old"}

    again = connect("alice", "alice:2", clean=False)  # resuming one it holds is never refused, nor drops one
    assert again.rc == 0
    assert sessions_of(limited, "alice") == {"alice:2", "alice:3", "alice:4"}


def test_a_new_persistent_session_is_refused_when_every_one_is_connected(connect: Connect, limited: ServeInfo) -> None:
    devices = [connect("alice", f"alice:{n}", clean=False) for n in (1, 2, 3)]
    assert [d.rc for d in devices] == [0, 0, 0]
    assert devices[0].subscribe("im/user/alice/notice") == 1

    refused = connect("alice", "alice:4", clean=False)
    assert refused.rc == 5  # not authorized, before any session is touched
    told = notice(devices[0])
    assert told["code"] == "limit" and "alice:4" in told["text"] and "all connected" in told["text"]
    assert sessions_of(limited, "alice") == {"alice:1", "alice:2", "alice:3"}
    assert all(connected(limited, f"alice:{n}") for n in (1, 2, 3))
    assert not any(d.disconnected.is_set() for d in devices)

    credentials = Credentials("alice", password_of("alice"))
    with pytest.raises(AuthenticationFailed) as failed:  # what imcli chat or listen print
        MqttClient(limited.address, credentials, "alice:5", clean_session=False).__enter__()
    assert "not authorized (code 5) (check the password; imcli serve also refuses" in str(failed.value)
    assert "persistent sessions per account, and tells its connected clients why" in str(failed.value)
    assert "alice:5" in notice(devices[0])["text"]

    assert connect("alice", "alice:oneshot").rc == 0  # a clean session is not a persistent one
    assert connect("alice", "alice:3", clean=False).rc == 0  # the same client id replaces its own
    assert connect("bob", "bob:1", clean=False).rc == 0  # others are not affected


def test_a_connection_past_the_limit_is_refused_and_the_account_told(connect: Connect) -> None:
    first = connect("alice", "alice:0")
    assert first.subscribe("im/user/alice/notice") == 1
    assert [connect("alice", f"alice:{n}").rc for n in range(1, LIMITS.max_connections)] == [0] * 9
    assert connect("alice", "alice:extra").rc == 5
    told = notice(first)
    assert told["code"] == "limit" and "alice:extra" in told["text"] and "at most 10 connections" in told["text"]


# ---------------------------------------------------------------- retained statuses


def retained_statuses(connect: Connect, account: str) -> dict[str, bytes]:
    """What a new subscriber of the account's statuses gets (as the presence worker would)."""
    auditor = connect("auditor", f"auditor:{len(account)}-{id(connect)}")
    assert auditor.subscribe(f"im/status/{account}/+") == 1
    got = {m.topic: bytes(m.payload) for m in auditor.silent(0.5)}
    auditor.close()
    return got


def test_retained_statuses_per_account_are_limited_and_the_sender_told(connect: Connect) -> None:
    alice = connect("alice", "alice:x")
    assert alice.subscribe("im/user/alice/notice") == 1
    for device in ("d1", "d2", "d3"):
        alice.publish(f"im/status/alice/{device}", STATUS, retain=True)
    alice.publish("im/status/alice/junk", STATUS, retain=True)  # a fourth device name
    told = notice(alice)
    assert told["code"] == "limit" and told["topic"] == "im/status/alice/junk" and "at most 3" in told["text"]

    alice.publish("im/status/alice/d1", encode(DeviceStatus(interval=60)), retain=True)  # an update: allowed
    alice.publish("im/status/alice/d2", b"", retain=True)  # clearing: always allowed
    alice.publish("im/status/alice/d4", STATUS, retain=True)  # room again
    statuses = retained_statuses(connect, "alice")
    assert set(statuses) == {"im/status/alice/d1", "im/status/alice/d3", "im/status/alice/d4"}
    assert json.loads(statuses["im/status/alice/d1"])["interval"] == 60
    assert alice.silent(0.3, "im/user/alice/notice") == []  # none of those was refused


def test_a_large_status_is_dropped_and_the_sender_told(connect: Connect) -> None:
    alice = connect("alice", "alice:x")
    assert alice.subscribe("im/user/alice/notice") == 1
    alice.publish("im/status/alice/d1", STATUS, retain=True)
    alice.publish("im/status/alice/d1", b"x" * 2000, retain=True)  # under the payload limit, over a status's
    told = notice(alice)
    assert told["code"] == "too_large" and "at most 256 bytes" in told["text"]
    assert retained_statuses(connect, "alice") == {"im/status/alice/d1": STATUS}


def test_a_last_will_cannot_add_a_status_past_the_limit(connect: Connect, limited: ServeInfo) -> None:
    alice = connect("alice", "alice:x")
    for device in ("d1", "d2", "d3"):
        alice.publish(f"im/status/alice/{device}", STATUS, retain=True)
    ghost = connect("alice", "alice:ghost", will=("im/status/alice/ghost", STATUS, True))
    clearing = connect("alice", "alice:d3", will=("im/status/alice/d3", b"", True))  # what a device's Will says
    for willing, client_id in ((ghost, "alice:ghost"), (clearing, "alice:d3")):
        willing.kill()  # the Will fires, held to the limits an ordinary publish of it is
        assert wait_until(functools.partial(away, limited, client_id))
    assert set(retained_statuses(connect, "alice")) == {"im/status/alice/d1", "im/status/alice/d2"}


# ---------------------------------------------------------------- groups


def ask(raw: Raw, request: GroupRequest) -> dict[str, object]:
    raw.publish(f"im/request/{raw.username}/{request.id}", encode(request))
    reply: dict[str, object] = json.loads(raw.expect(f"im/user/{raw.username}/reply/{request.id}").payload)
    return reply


def test_groups_owned_and_created_per_account_are_limited(connect: Connect, limited: ServeInfo, tmp_path: Path) -> None:
    alice = connect("alice", "alice:x")
    assert alice.subscribe("im/user/alice/reply/+") == 1
    assert ask(alice, GroupRequest(op="create", group="g1"))["type"] == "group_reply"
    assert ask(alice, GroupRequest(op="create", group="g2"))["type"] == "group_reply"
    refused = ask(alice, GroupRequest(op="create", group="g3"))
    assert refused["type"] == "error" and refused["code"] == "denied"
    assert "you own 2 groups, the most allowed" in str(refused["text"])

    cli = Cli(CliRunner(), limited, tmp_path / "config-alice")  # what the CLI prints for it
    cli.login("alice")
    result = cli("group", "create", "g3")
    assert result.exit_code == 1
    assert "Error: you own 2 groups, the most allowed (leaving one passes it" in result.output

    assert ask(alice, GroupRequest(op="leave", group="g1"))["type"] == "group_reply"  # deleted: one owned
    assert ask(alice, GroupRequest(op="create", group="g3"))["type"] == "group_reply"  # the third this minute
    assert ask(alice, GroupRequest(op="leave", group="g3"))["type"] == "group_reply"
    too_fast = ask(alice, GroupRequest(op="create", group="g4"))  # owns 1, but 3 made within a minute
    assert too_fast["code"] == "denied" and "at most 3 a minute" in str(too_fast["text"])

    bob = connect("bob", "bob:x")  # others are not affected
    assert bob.subscribe("im/user/bob/reply/+") == 1
    assert ask(bob, GroupRequest(op="create", group="g4"))["type"] == "group_reply"


# ---------------------------------------------------------------- keep-alive


def test_a_client_silent_past_its_keep_alive_is_closed_and_its_will_fires(connect: Connect, limited: ServeInfo) -> None:
    """amqtt 0.12.1 ignores a read timeout: a client that went silent stayed connected for ever."""
    bob = connect("bob", "bob:x")
    assert bob.subscribe("im/room/lobby/+") == 1
    will = chat("gone")
    flags = 0x02 | 0x04 | 0x08 | 0x80 | 0x40  # clean, Will at QoS 1, username, password
    body = field(b"MQTT") + bytes([4, flags]) + (1).to_bytes(2, "big") + field(b"alice:silent")  # keep-alive 1 s
    body += field(b"im/room/lobby/alice") + field(will) + field(b"alice") + field(password_of("alice").encode())
    with socket.create_connection((limited.address.host, limited.address.port)) as sock:
        sock.settimeout(30)  # far beyond the 1.5 x 1 s (at least 2 s more) the broker waits
        sock.sendall(packet(0x10, body))
        got, closed = read_packets(sock, lambda got: len(got) > 1)  # the CONNACK, then nothing but the end
    assert got == [(0x20, b"\x00\x00")] and closed
    assert bob.expect("im/room/lobby/alice").payload == will


# ---------------------------------------------------------------- the decisions, and the options


def test_the_quota_decisions() -> None:
    assert not refuse_new_session({"a:1": True, "a:2": False}, "a:3", 2)  # an idle one makes room
    assert refuse_new_session({"a:1": True, "a:2": True}, "a:3", 2)
    assert not refuse_new_session({"a:1": True, "a:2": True}, "a:2", 2)  # resuming
    assert sessions_to_drop({"a:1": 5.0, "a:2": 1.0, "a:3": 3.0}, 5, 3) == ["a:2", "a:3"]
    assert sessions_to_drop({"a:1": 5.0}, 3, 3) == []
    limits = Limits(max_retained=2, max_status=100)
    held = {"im/status/a/1", "im/status/a/2"}
    assert status_refusal("im/status/a/3", 60, retain=True, held=held, limits=limits) is not None
    assert status_refusal("im/status/a/1", 60, retain=True, held=held, limits=limits) is None
    assert status_refusal("im/status/a/3", 0, retain=True, held=held, limits=limits) is None
    assert status_refusal("im/status/a/3", 60, retain=False, held=held, limits=limits) is None  # not kept
    assert status_refusal("im/status/a/1", 101, retain=True, held=held, limits=limits) is not None
    window = GROUP_CREATION_WINDOW
    assert group_creation_refusal(2, [], 0.0, max_owned=2, per_minute=5) is not None
    assert group_creation_refusal(0, [0.0, 1.0], 2.0, max_owned=9, per_minute=2) is not None
    assert group_creation_refusal(0, [0.0, 1.0], 1.0 + window, max_owned=9, per_minute=2) is None


@pytest.mark.parametrize(
    "option", ["--max-sessions=0", "--max-statuses=0", "--max-status-bytes=64", "--max-groups=0", "--group-rate=0"]
)
def test_serve_refuses_a_quota_too_small(option: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--data-dir", str(tmp_path / "d"), option])
    assert result.exit_code == 1
    assert "limits too small" in result.output
