"""Friends, friend requests (also to someone offline) and dm-policy enforced by the broker.

Every test runs on the embedded broker and on Mosquitto with ``imcli workers --dynsec``
beside it, and on a three-node NATS cluster (tests/brokers.py, tests/natsbroker.py); what Mosquitto
or NATS cannot do is a strict ``broker_xfail``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from imcli.core.rules import invitation_refusal
from imcli.core.topics import Topics
from imcli.core.wire import ChatMessage, ErrorReply, GroupRequest, decode, encode
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import Cli, Proc, Raw
from tests.rawmqtt import barrier

T = Topics()

CliFactory = Callable[[str], Cli]

broker_kind, broker_under_test, server, users = brokers.ALL  # every test on the three brokers


@pytest.fixture
def people(users: Callable[..., None], cli_as: CliFactory) -> dict[str, Cli]:
    users("alice", "bob", "carol")
    clis = {name: cli_as(name) for name in ("alice", "bob", "carol")}
    for name, cli in clis.items():
        cli.login(name)
    return clis


def test_friend_request_reaches_someone_offline_and_is_accepted(
    people: dict[str, Cli], procs: Callable[..., Proc]
) -> None:
    alice, bob = people["alice"], people["bob"]
    asked = alice("friend", "add", "bob")  # bob is not running anything
    assert asked.exit_code == 0 and asked.stdout.strip() == "asked bob to be your friend"

    listener = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(bob.config_dir)})
    lines = [json.loads(listener.line(timeout=20)) for _ in range(2)]  # his own join event, the request
    request = next(line for line in lines if line["kind"] == "notice")
    assert request["text"] == "alice wants to be your friend (imcli friend accept alice)"

    accepted = bob("friend", "accept", "alice")
    assert accepted.exit_code == 0 and accepted.stdout.strip() == "you and alice are friends"
    for cli, other in ((alice, "bob"), (bob, "alice")):
        listed = json.loads(cli("friend", "list", "--json").stdout)
        assert [f["account"] for f in listed["friends"]] == [other]
        assert listed["incoming"] == [] and listed["outgoing"] == []
    assert json.loads(alice("friend", "list", "--json").stdout)["friends"][0]["state"] == "online"  # bob listens

    assert alice("friend", "remove", "bob").exit_code == 0
    assert json.loads(bob("friend", "list", "--json").stdout)["friends"] == []


def test_asking_back_is_accepting(people: dict[str, Cli]) -> None:
    assert people["alice"]("friend", "add", "carol").exit_code == 0
    assert people["carol"]("friend", "add", "alice").exit_code == 0
    assert json.loads(people["alice"]("friend", "list", "--json").stdout)["friends"][0]["account"] == "carol"


def test_declined_request_disappears_on_both_sides(people: dict[str, Cli]) -> None:
    assert people["alice"]("friend", "add", "bob").exit_code == 0
    assert people["bob"]("friend", "decline", "alice").stdout.strip() == "declined alice's request"
    assert json.loads(people["alice"]("friend", "list", "--json").stdout)["outgoing"] == []
    assert json.loads(people["bob"]("friend", "list", "--json").stdout)["incoming"] == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["friend", "add", "alice"], "Error: you cannot be your own friend"),
        (["friend", "add", "zed"], "Error: unknown user 'zed'"),
        (["friend", "add", "Not Valid"], "Error: unknown user 'Not Valid'"),  # a display name nobody has
        (["friend", "add", "not\u202evalid"], "Error: invalid user name 'not\\u202evalid'"),
        (["friend", "accept", "bob"], "Error: no friend request from bob"),
        (["friend", "remove", "bob"], "Error: bob is not your friend"),
        (["config", "set", "dm-policy", "nobody"], "Error: invalid dm-policy 'nobody' (use 'anyone' or 'friends')"),
        (["config", "set", "colour", "red"], "Error: unknown setting 'colour'"),
    ],
)
# the refusals are the group worker's and the client's, the same on every broker: on NATS (about 15 s
# a test to set up; CI once saw one of its eight go unanswered within 15 s there, cause not found,
# issue 20's note) the other friend tests cover the worker's answers
@pytest.mark.parametrize("broker_kind", ["amqtt", "mosquitto"], indirect=True)
def test_friend_errors(people: dict[str, Cli], args: list[str], error: str) -> None:
    result = people["alice"](*args)
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_asking_twice_is_refused(people: dict[str, Cli]) -> None:
    assert people["alice"]("friend", "add", "bob").exit_code == 0
    again = people["alice"]("friend", "add", "bob")
    assert again.exit_code == 1 and again.stderr.startswith("Error: you already asked bob")


def test_dm_policy_friends_refuses_strangers_and_accepts_friends(
    people: dict[str, Cli], server: ServeInfo, raw: Callable[..., Raw]
) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    assert bob("config", "set", "dm-policy", "friends").stdout.strip() == "dm-policy is now friends"
    assert alice("friend", "add", "bob").exit_code == 0
    assert bob("friend", "accept", "alice").exit_code == 0

    refused = carol("dm", "bob", "hi stranger")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "Error: bob accepts direct messages from friends only (ask first: imcli friend add bob)"
    )
    assert alice("dm", "bob", "hi friend").stdout.strip() == "sent to bob"

    # a raw client skipping the CLI's check: the broker drops it
    victim = raw("bob", client_id="bob:raw")
    assert victim.subscribe("im/user/bob/dm/+") == 1
    assert victim.subscribe("im/room/lobby/carol") == 1
    stranger = raw("carol", client_id="carol:raw")
    stranger.publish("im/user/bob/dm/carol", encode(ChatMessage(text="sneaky")))
    barrier = encode(ChatMessage(text="barrier"))
    stranger.publish("im/room/lobby/carol", barrier)  # same connection: would arrive after "sneaky"
    got = victim.until("im/room/lobby/carol", barrier)
    assert [m.topic for m in got] == ["im/room/lobby/carol"]
    friend = raw("alice", client_id="alice:raw")
    friend.publish("im/user/bob/dm/alice", encode(ChatMessage(text="from a friend")))
    assert victim.expect().topic == "im/user/bob/dm/alice"
    assert victim.silent(0.3) == []

    assert bob("config", "set", "dm-policy", "anyone").exit_code == 0
    assert carol("dm", "bob", "now?").exit_code == 0


def test_dm_policy_friends_also_refuses_strangers_invites(people: dict[str, Cli], raw: Callable[..., Raw]) -> None:
    """In a group every member writes to every other, so a stranger's invite was a way round
    ``dm-policy friends``: carol made a group, put bob in it and wrote to him there. The group worker
    now refuses an invite whoever may not write to the guest directly, from any client."""
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    assert bob("config", "set", "dm-policy", "friends").exit_code == 0
    assert alice("friend", "add", "bob").exit_code == 0
    assert bob("friend", "accept", "alice").exit_code == 0
    assert carol("group", "create", "den", "--private").exit_code == 0
    refused = carol("group", "invite", "den", "bob")
    assert (refused.exit_code, refused.stderr.strip()) == (
        1,
        f"Error: {invitation_refusal('bob')} (become friends first: imcli friend add bob)",
    )
    # the same request from a raw client: the worker's refusal, not the CLI's
    stranger = raw("carol", client_id="carol:raw")
    assert stranger.subscribe("im/user/carol/reply/+") == 1
    request = GroupRequest(op="invite", group="den", user="bob")
    stranger.publish(T.request("carol", "c0ffee" + "0" * 26), encode(request))
    reply = decode(bytes(stranger.expect().payload))
    assert isinstance(reply, ErrorReply) and (reply.id, reply.code) == (request.id, "denied"), reply
    assert "den" not in bob("group", "list").stdout
    # a friend may; and once bob takes messages from anyone, so may carol
    assert alice("group", "create", "nook").exit_code == 0
    assert alice("group", "invite", "nook", "bob").exit_code == 0
    assert bob("config", "set", "dm-policy", "anyone").exit_code == 0
    assert carol("group", "invite", "den", "bob").exit_code == 0
    assert {"#den", "#nook"} <= set(bob("group", "list").stdout.split())


@pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_NOTICES)
@pytest.mark.broker_xfail("nats", reason=brokers.NATS_NO_NOTICES)
def test_a_stranger_skipping_the_dm_policy_check_is_told(people: dict[str, Cli], raw: Callable[..., Raw]) -> None:
    assert people["bob"]("config", "set", "dm-policy", "friends").exit_code == 0
    stranger = raw("carol", client_id="carol:raw")
    assert stranger.subscribe("im/user/carol/notice") == 1
    stranger.publish("im/user/bob/dm/carol", encode(ChatMessage(text="sneaky")))
    notice = json.loads(stranger.expect("im/user/carol/notice").payload)
    assert notice["text"] == "bob accepts direct messages from friends only"


def test_friend_records_are_private_and_worker_only(people: dict[str, Cli], raw: Callable[..., Raw]) -> None:
    assert people["alice"]("friend", "add", "bob").exit_code == 0  # bob's record now lists alice's request
    carol = raw("carol", client_id="carol:raw")
    carol.subscribe_all("im/user/bob/friends", "im/user/+/friends", "im/room/lobby/carol")
    forged = b'{"type":"friends","v":1,"account":"carol","friends":["bob"],"dm_policy":"anyone"}'
    carol.publish("im/user/carol/friends", forged, retain=True)
    assert barrier(carol, carol, quiet=0.3) == [[]]  # nothing of bob's record, whatever the SUBACK said
    fresh = raw("carol", client_id="carol:fresh")
    assert fresh.subscribe("im/user/carol/friends") == 1
    assert all(m.payload != forged for m in fresh.silent(0.3))  # the forged record was not retained
    assert json.loads(people["carol"]("friend", "list", "--json").stdout)["friends"] == []


@pytest.mark.broker_xfail("mosquitto", reason=brokers.SUBSCRIBE_GRANTED)
def test_subscribing_to_others_friend_records_is_refused(people: dict[str, Cli], raw: Callable[..., Raw]) -> None:
    carol = raw("carol", client_id="carol:raw")
    assert carol.subscribe("im/user/bob/friends") == 128
    assert carol.subscribe("im/user/+/friends") == 128


@pytest.mark.broker_xfail("mosquitto", reason=brokers.NO_NOTICES)
@pytest.mark.broker_xfail("nats", reason=brokers.NATS_NO_NOTICES)
def test_forging_a_friend_record_is_explained_by_a_notice(people: dict[str, Cli], raw: Callable[..., Raw]) -> None:
    carol = raw("carol", client_id="carol:raw")
    assert carol.subscribe("im/user/carol/notice") == 1
    forged = b'{"type":"friends","v":1,"account":"carol","friends":["bob"],"dm_policy":"anyone"}'
    carol.publish("im/user/carol/friends", forged, retain=True)
    assert json.loads(carol.expect("im/user/carol/notice").payload)["code"] == "denied"


@brokers.EMBEDDED_ONLY
def test_a_dm_policy_change_stops_the_next_dm_on_the_same_topic(
    people: dict[str, Cli], raw: Callable[..., Raw]
) -> None:
    """The broker keeps its ACL decisions (imcli/broker/topic_access.py, issue 21): a DM allowed a
    moment ago on the same connection and topic is dropped once the recipient takes friends only,
    and let through again once he takes anyone back."""
    victim = raw("bob", client_id="bob:raw")
    assert victim.subscribe("im/user/bob/dm/+") == 1
    assert victim.subscribe("im/room/lobby/carol") == 1
    stranger = raw("carol", client_id="carol:raw")
    stranger.publish("im/user/bob/dm/carol", encode(ChatMessage(text="allowed")))
    assert json.loads(victim.expect("im/user/bob/dm/carol").payload)["text"] == "allowed"

    assert people["bob"]("config", "set", "dm-policy", "friends").exit_code == 0
    stranger.publish("im/user/bob/dm/carol", encode(ChatMessage(text="sneaky")))
    marker = encode(ChatMessage(text="barrier"))
    stranger.publish("im/room/lobby/carol", marker)  # same connection: would arrive after "sneaky"
    assert [m.topic for m in victim.until("im/room/lobby/carol", marker)] == ["im/room/lobby/carol"]

    assert people["bob"]("config", "set", "dm-policy", "anyone").exit_code == 0
    stranger.publish("im/user/bob/dm/carol", encode(ChatMessage(text="allowed again")))
    assert json.loads(victim.expect("im/user/bob/dm/carol").payload)["text"] == "allowed again"
