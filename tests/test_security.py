"""Attacks through raw MQTT clients, on the embedded broker and on Mosquitto: each must fail.

Every test runs against both brokers (tests/brokers.py). What Mosquitto cannot enforce is
marked ``broker_xfail("mosquitto", reason=...)`` and still runs there as a strict xfail.

Absence is proven with a barrier: after the forbidden publish, a legitimate one is sent on
the same connection; once the victim has that one, the forbidden one would have arrived
before it (one connection's messages are delivered in order).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.server import BrokerSettings
from imcli.core.topics import DEFAULT_MAX_CHUNK
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, DeviceStatus, Notice, WhoRequest, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import brokers
from tests.brokers import NO_CLIENT_ID_BINDING, NO_NOTICES, NO_REGISTRATION, SUBSCRIBE_GRANTED
from tests.conftest import Raw, password_of
from tests.rawmqtt import barrier, chat

RawFactory = Callable[..., Raw]

broker_kind, broker_under_test, server, users = brokers.BOTH  # every test on both brokers


@pytest.fixture
def spy(broker_under_test: brokers.BrokerUnderTest, raw: RawFactory) -> Raw:
    """A service account's connection subscribed to ``#``: what it never gets, nobody got."""
    name = broker_under_test.add_reader()
    reader = raw(name, client_id=f"{name}:spy")
    assert reader.subscribe("im/#") == 1
    reader.subscribe("#")  # Mosquitto grants it; the embedded broker has nothing to read outside im/
    return reader


def payloads(messages: list[list[paho.MQTTMessage]]) -> set[bytes]:
    return {bytes(m.payload) for seen in messages for m in seen}


@pytest.fixture
def alice_bob(users: Callable[..., None], raw: RawFactory) -> tuple[Raw, Raw]:
    users("alice", "bob", "carol")
    alice = raw("alice", client_id="alice:laptop")
    bob = raw("bob", client_id="bob:phone")
    assert alice.rc == 0 and bob.rc == 0
    assert bob.subscribe("im/room/+/+") == 1
    assert bob.subscribe("im/user/bob/#") == 1
    assert alice.subscribe("im/user/alice/notice") == 1
    return alice, bob


# ---------------------------------------------------------------- connecting


def test_anonymous_connect_is_refused(server: object, raw: RawFactory) -> None:
    assert raw(None, client_id="anon").rc == 5


def test_wrong_password_and_unknown_account_are_refused(
    users: Callable[..., None], raw: RawFactory, broker_kind: str
) -> None:
    users("alice")
    code = {"amqtt": 4, "mosquitto": 5}[broker_kind]  # Mosquitto 2.0 answers "not authorized"
    assert raw("alice", "not-her-password", "alice:x").rc == code
    assert raw("mallory", "whatever-password", "mallory:x").rc == code


@pytest.mark.broker_xfail("mosquitto", reason=NO_CLIENT_ID_BINDING)
@pytest.mark.parametrize("client_id", ["bob", "bob:phone", "bob:", "carol:x"])
def test_client_id_of_another_account_is_refused(users: Callable[..., None], raw: RawFactory, client_id: str) -> None:
    users("alice", "bob")
    assert raw("alice", client_id=client_id).rc == 2


def test_empty_client_id_gets_one_bound_to_the_account(users: Callable[..., None], raw: RawFactory) -> None:
    users("alice")
    assert raw("alice", client_id="").rc == 0


@pytest.mark.broker_xfail(
    "mosquitto", reason="Mosquitto 2.0 accepts any Last Will at CONNECT and drops a forbidden one only when it fires"
)
@pytest.mark.parametrize(
    ("topic", "retain"),
    [
        ("im/room/lobby/bob", False),
        ("im/user/bob/dm/carol", False),
        ("im/status/bob/phone", True),
        ("im/presence/alice", True),
        ("im/room/lobby/alice", True),
    ],
)
def test_last_will_cannot_speak_as_another_or_outside_the_rules(
    users: Callable[..., None], raw: RawFactory, topic: str, retain: bool
) -> None:
    users("alice", "bob")
    assert raw("alice", client_id="alice:x", will=(topic, b"gone", retain)).rc == 5


def test_own_status_will_is_allowed_and_reaches_the_presence_worker(
    users: Callable[..., None], raw: RawFactory, spy: Raw
) -> None:
    users("alice")
    alice = raw("alice", client_id="alice:laptop", will=("im/status/alice/laptop", b"", True))
    assert alice.rc == 0
    alice.publish("im/status/alice/laptop", encode(DeviceStatus(interval=30)), retain=True)
    assert spy.until("im/status/alice/laptop")[-1].payload != b""
    alice.kill()
    assert spy.until("im/status/alice/laptop")[-1].payload == b""


# ---------------------------------------------------------------- session takeover


def _queued_for_bob(users: Callable[..., None], raw: RawFactory) -> None:
    users("alice", "bob")
    bob = raw("bob", client_id="bob:phone", clean=False)
    assert bob.subscribe("im/user/bob/#") == 1
    bob.close()  # persistent session stays on the broker, offline
    alice = raw("alice", client_id="alice:laptop")
    alice.publish("im/user/bob/dm/alice", chat("queued while you were away"))


def _bob_gets_his_queue(raw: RawFactory) -> None:
    bob_again = raw("bob", client_id="bob:phone", clean=False)
    assert bob_again.rc == 0
    msg = bob_again.expect("im/user/bob/dm/alice")
    assert json.loads(msg.payload)["text"] == "queued while you were away"
    assert msg.retain is False  # amqtt would have flagged a queued message as retained


def test_failed_login_with_victims_client_id_leaves_session_and_queue_intact(
    users: Callable[..., None], raw: RawFactory
) -> None:
    _queued_for_bob(users, raw)
    # wrong password with bob's client id, clean and persistent
    assert raw("bob", "wrong-password", "bob:phone", clean=True).rc != 0
    assert raw("bob", "wrong-password", "bob:phone", clean=False).rc != 0
    assert raw("register:newbie", "whatever-password", "bob:phone").rc != 0
    _bob_gets_his_queue(raw)


@pytest.mark.broker_xfail("mosquitto", reason=NO_CLIENT_ID_BINDING + "; the takeover discards the queue")
def test_another_account_with_victims_client_id_leaves_session_and_queue_intact(
    users: Callable[..., None], raw: RawFactory
) -> None:
    _queued_for_bob(users, raw)
    assert raw("alice", client_id="bob:phone", clean=True).rc == 2
    _bob_gets_his_queue(raw)


def test_failed_login_does_not_kick_a_connected_victim(alice_bob: tuple[Raw, Raw], raw: RawFactory) -> None:
    alice, bob = alice_bob
    assert raw("bob", "wrong-password", "bob:phone").rc != 0
    alice.publish("im/user/bob/dm/alice", chat("still there?"))
    assert json.loads(bob.expect("im/user/bob/dm/alice").payload)["text"] == "still there?"
    assert not bob.disconnected.is_set()


@pytest.mark.broker_xfail("mosquitto", reason=NO_CLIENT_ID_BINDING + ", and it kicks the victim")
def test_another_account_with_victims_client_id_does_not_kick_a_connected_victim(
    alice_bob: tuple[Raw, Raw], raw: RawFactory
) -> None:
    _alice, bob = alice_bob
    assert raw("alice", client_id="bob:phone").rc == 2
    assert not bob.disconnected.wait(0.5)


# ---------------------------------------------------------------- publishing as another


@pytest.mark.parametrize(
    "topic",
    [
        "im/room/lobby/bob",
        "im/user/bob/dm/carol",
        "im/user/bob/notice",
        "im/user/alice/notice",
        "im/user/bob/reply/abc",
        "im/user/alice/reply/abc",
        "im/events",
        "im/presence/bob",
        "im/presence/alice",
        "im/status/bob/phone",
        "im/request/bob/abc",
        "im/user/bob/dm/alice/x",
        "im/group/team/info",
        "im/group/team/msg/alice",
        *(
            pytest.param(
                topic,
                marks=pytest.mark.broker_xfail(
                    "mosquitto",
                    reason="acl_file's + matches any level: it cannot check that a level is a valid name or id",
                ),
            )
            for topic in ("im/room/Lobby/alice", "im/request/alice/not.an.id")
        ),
        "elsewhere/topic",
    ],
)
def test_publish_outside_own_topics_never_reaches_anyone(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, spy: Raw, topic: str
) -> None:
    alice, _bob = alice_bob
    victim = raw("bob", client_id="bob:tablet")
    assert victim.subscribe_all("im/room/#", "im/user/bob/#", "im/presence/+", "im/events") == [1, 1, 1, 1]
    forged, retained = chat("forged"), chat("forged and retained")
    alice.publish(topic, forged)
    alice.publish(topic, retained, retain=True)
    assert not {forged, retained} & payloads(barrier(alice, victim, spy))
    late = raw(spy.username, client_id=f"{spy.username}:late")  # nothing retained either
    assert late.subscribe_all("im/#", "#")[0] == 1
    assert retained not in {bytes(m.payload) for m in late.silent(0.3)}


def test_nobody_forges_a_rate_notice_that_fails_anothers_request(alice_bob: tuple[Raw, Raw], raw: RawFactory) -> None:
    """A client trusts a ``rate`` notice on its notice topic (the request it names fails at once):
    only the broker and the workers may write there. bob forges one naming alice's next request,
    one naming it in ``requests``, at each QoS and retained: alice's request still gets its
    reply, and nothing reaches her notice topic, then or later."""
    alice, bob = alice_bob
    who = WhoRequest()
    request = f"im/request/alice/{who.id}"
    forged = [
        encode(Notice(code="rate", text="slow down", topic=request, retry=3600)),
        encode(Notice(code="rate", text="slow down", requests=[who.id], retry=3600)),
    ]
    for payload in forged:
        for qos in (0, 1, 2):
            bob.publish("im/user/alice/notice", payload, qos=qos)
        bob.publish("im/user/alice/notice", payload, retain=True)
    assert alice.subscribe_all("im/user/alice/reply/+", "im/room/+/+") == [1, 1]
    alice.publish(request, encode(who))
    assert alice.expect(f"im/user/alice/reply/{who.id}", timeout=15).payload
    [seen] = barrier(bob, alice)
    assert [m.topic for m in seen if m.topic.endswith("/notice")] == []
    late = raw("alice", client_id="alice:late")
    assert late.subscribe("im/user/alice/notice") == 1
    assert late.silent(0.3) == []  # nothing retained


@brokers.EMBEDDED_ONLY  # Mosquitto's twin: test_mosquitto.py::test_archive_account_writes_nothing_but_replies
@pytest.mark.parametrize("worker", ["archive", "files"])
def test_the_archive_and_files_accounts_forge_no_notice(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, server: ServeInfo, worker: str
) -> None:
    """Least privilege, as on Mosquitto and NATS: with the archive's or the files worker's key,
    a rate notice on a user's notice topic goes nowhere; their own notice topic and replies work."""
    alice, _bob = alice_bob
    AccountStore(server.data_dir).ensure_service(worker, password_of(worker))
    service = raw(worker, client_id=f"{worker}:test")
    assert service.rc == 0
    forged = encode(Notice(code="rate", text="slow down", topic="im/request/alice/" + "c" * 32, retry=3600))
    service.publish("im/user/alice/notice", forged)
    service.publish("im/user/alice/reply/" + "c" * 32, b"{}")  # a reply is theirs to send
    assert alice.subscribe("im/user/alice/reply/+") == 1
    service.publish("im/user/alice/reply/" + "d" * 32, b"{}")
    got = alice.until("im/user/alice/reply/" + "d" * 32)
    assert [m.topic for m in got if m.topic.endswith("/notice")] == []


@brokers.EMBEDDED_ONLY  # the rules on NATS and Mosquitto: test_units.py::test_the_archive_and_files_accounts_read_*
@pytest.mark.parametrize("worker", ["archive", "files"])
def test_the_archive_and_files_accounts_read_nothing_beyond_their_rights(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, server: ServeInfo, worker: str
) -> None:
    """Least privilege for reads, as on Mosquitto and NATS: with the archive's or the files
    worker's key, a raw client cannot subscribe to users' notices and replies, statuses or the
    other worker's topics, and a wide filter delivers none of them; its own topics work."""
    alice, bob = alice_bob
    AccountStore(server.data_dir).ensure_service(worker, password_of(worker))
    service = raw(worker, client_id=f"{worker}:test")
    assert service.rc == 0
    other = "im/upload/+/+" if worker == "archive" else "im/user/+/dm/+"
    for filt in ("#", "im/#", "im/user/+/notice", "im/user/+/reply/+", "im/status/+/+", other):
        assert service.subscribe(filt) == 0x80, filt
    assert service.subscribe("im/request/+/+") == 1
    assert service.subscribe(f"im/user/{worker}/notice") == 1
    alice.publish("im/status/alice/laptop", b'{"status": "online"}', retain=True)
    bob.publish("im/user/alice/dm/bob", b"{}")
    alice.publish("im/upload/alice/" + "s" * 16, b"x")
    alice.publish("im/request/alice/" + "c" * 32, b"{}")  # a request: theirs to read
    got = service.until("im/request/alice/" + "c" * 32)
    assert [m.topic for m in got] == ["im/request/alice/" + "c" * 32]
    marker = b"sync"
    service.publish(f"im/user/{worker}/notice", marker)
    assert [m.topic for m in service.until(f"im/user/{worker}/notice", marker)] == [f"im/user/{worker}/notice"]


@pytest.mark.broker_xfail("mosquitto", reason=NO_NOTICES)
def test_refused_publish_is_explained_by_a_notice(alice_bob: tuple[Raw, Raw]) -> None:
    alice, _bob = alice_bob
    alice.publish("im/room/lobby/bob", chat("forged"))
    notice = json.loads(alice.expect("im/user/alice/notice").payload)
    assert notice["code"] == "denied" and notice["topic"] == "im/room/lobby/bob"


def test_nobody_grants_themself_rights_through_dynamic_security(alice_bob: tuple[Raw, Raw], raw: RawFactory) -> None:
    """On Mosquitto only the group worker may command the dynamic-security plugin."""
    _alice, bob = alice_bob
    forged = {
        "commands": [
            {"command": "createRole", "rolename": "mine", "acls": [{"acltype": "publishClientReceive", "topic": "#"}]},
            {"command": "createClient", "username": "alice", "roles": [{"rolename": "mine"}]},
            {"command": "modifyRole", "rolename": "imcli-user-alice", "acls": [
                {"acltype": "publishClientReceive", "topic": "#", "allow": True, "priority": 9}]},
        ]
    }  # fmt: skip
    # amqtt closes a client that publishes to a $ topic; Mosquitto acknowledges and drops it
    ctl = raw("alice", client_id="alice:ctl")
    ctl.client.publish("$CONTROL/dynamic-security/v1", json.dumps(forged).encode(), qos=1)
    eve = raw("alice", client_id="alice:eve")
    eve.subscribe("im/user/bob/#")  # granted or not: what matters is what arrives
    carol = raw("carol", client_id="carol:x")
    carol.publish("im/user/bob/dm/carol", chat("for bob only"))
    carol.publish("im/room/lobby/carol", chat("barrier"))
    assert bob.expect("im/user/bob/dm/carol").payload
    assert eve.silent(0.3) == []


def test_dm_reaches_only_its_recipient(alice_bob: tuple[Raw, Raw], raw: RawFactory) -> None:
    alice, bob = alice_bob
    carol = raw("carol", client_id="carol:x")
    assert carol.subscribe("im/user/carol/#") == 1
    assert carol.subscribe("im/room/+/+") == 1
    alice.publish("im/user/bob/dm/alice", chat("for bob only"))
    alice.publish("im/room/lobby/alice", chat("barrier"))
    assert bob.expect("im/user/bob/dm/alice").payload
    carol.expect("im/room/lobby/alice")
    assert [m.topic for m in carol.silent(0.2)] == []


# ---------------------------------------------------------------- reading others


PUBLIC = ("im/room/", "im/presence/", "im/events")  # what every user may read
WIDE_FILTERS = [
    "#",
    "im/#",
    "im/user/#",
    "im/user/bob/#",
    "im/user/bob/dm/+",
    "im/user/+/dm/+",
    "im/user/+/#",
    "im/request/+/+",
    "im/status/#",
    "+/user/bob/dm/+",
    "$SYS/#",
    "im/+/bob/#",
]


@pytest.mark.parametrize("topic_filter", WIDE_FILTERS)
@pytest.mark.broker_xfail("mosquitto", reason=SUBSCRIBE_GRANTED)
def test_subscribing_beyond_what_one_may_read_is_refused(
    users: Callable[..., None], raw: RawFactory, topic_filter: str
) -> None:
    users("alice", "bob")
    alice = raw("alice", client_id="alice:x")
    assert alice.subscribe(topic_filter) == 128


@pytest.mark.parametrize("topic_filter", WIDE_FILTERS)
def test_too_wide_subscription_receives_nothing_private(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, topic_filter: str
) -> None:
    alice, bob = alice_bob
    bob.publish("im/status/bob/phone", encode(DeviceStatus(interval=30)), retain=True)  # sent on subscribe if readable
    eve = raw("carol", client_id="carol:eve")
    eve.subscribe(topic_filter)  # refused by the embedded broker, granted by Mosquitto: what arrives matters
    assert eve.subscribe("im/room/+/+") == 1
    # bob's private traffic: a DM, a request and the presence worker's reply, a notice where there are notices
    alice.publish("im/user/bob/dm/alice", chat("private"))
    who = WhoRequest()
    bob.publish(f"im/request/bob/{who.id}", encode(who))
    bob.expect(f"im/user/bob/reply/{who.id}")
    bob.publish("im/user/alice/notice", chat("forged"))
    [seen] = barrier(alice, eve)
    assert [m.topic for m in seen if not m.topic.startswith(PUBLIC)] == []


# ---------------------------------------------------------------- limits


@pytest.mark.broker_xfail(
    "mosquitto",
    reason="message_size_limit is global and 256 KiB there, for the files' chunks: a raw client's chat "
    "payload of up to 256 KiB is delivered (imcli's own clients keep to 16 KiB)",
)
def test_oversized_payload_is_dropped(alice_bob: tuple[Raw, Raw]) -> None:
    alice, bob = alice_bob
    alice.publish("im/room/lobby/alice", b"x" * (DEFAULT_MAX_PAYLOAD + 1))
    alice.publish("im/room/lobby/alice", b"y" * DEFAULT_MAX_PAYLOAD)  # the limit itself passes
    [seen] = barrier(alice, bob)
    assert [len(m.payload) for m in seen] == [DEFAULT_MAX_PAYLOAD]
    assert not alice.disconnected.is_set()


def test_payload_over_the_brokers_limit_is_dropped(alice_bob: tuple[Raw, Raw], broker_kind: str) -> None:
    """Chat's limit: the embedded broker's 16 KiB, deploy/mosquitto's message_size_limit (256 KiB)."""
    alice, bob = alice_bob
    limit = DEFAULT_MAX_PAYLOAD if broker_kind == "amqtt" else brokers.LIMIT
    alice.publish("im/room/lobby/alice", b"x" * (limit + 1))
    alice.publish("im/room/lobby/alice", b"y" * limit)
    [seen] = barrier(alice, bob)
    assert [len(m.payload) for m in seen] == [limit]
    assert not alice.disconnected.is_set()


def test_a_files_chunks_have_their_own_larger_limit(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, broker_under_test: brokers.BrokerUnderTest
) -> None:
    """A chunk of a file (an upload topic) may fill DEFAULT_MAX_CHUNK, one byte more is dropped."""
    alice, _bob = alice_bob
    assert brokers.LIMIT == DEFAULT_MAX_CHUNK  # deploy/mosquitto's message_size_limit
    service = broker_under_test.add_reader()
    reader = raw(service, client_id=f"{service}:test")
    assert reader.subscribe("im/upload/#") == 1 and reader.subscribe("im/room/+/+") == 1
    alice.publish("im/upload/alice/someupload", b"x" * (DEFAULT_MAX_CHUNK + 1))
    alice.publish("im/upload/alice/someupload", b"y" * DEFAULT_MAX_CHUNK)
    [seen] = barrier(alice, reader)
    assert [len(m.payload) for m in seen if m.topic.startswith("im/upload/")] == [DEFAULT_MAX_CHUNK]
    assert not alice.disconnected.is_set()


@pytest.mark.broker_xfail(
    "mosquitto",
    reason="message_size_limit is global: Mosquitto has no per-account exemption, so a worker's "
    "reply over its 256 KiB is dropped as well",
)
def test_service_accounts_are_exempt_from_the_size_limit(
    alice_bob: tuple[Raw, Raw], raw: RawFactory, broker_under_test: brokers.BrokerUnderTest
) -> None:
    alice, _bob = alice_bob
    assert alice.subscribe("im/user/alice/reply/+") == 1
    service = broker_under_test.add_reader()
    worker = raw(service, client_id=f"{service}:test")
    big = max(DEFAULT_MAX_PAYLOAD, brokers.LIMIT) + 1  # past chat's limit on either broker
    worker.publish("im/user/alice/reply/big", b"x" * big)
    assert len(alice.expect("im/user/alice/reply/big").payload) == big


@pytest.mark.broker_xfail("mosquitto", reason=NO_NOTICES)
def test_oversized_payload_sender_is_told(alice_bob: tuple[Raw, Raw]) -> None:
    alice, _bob = alice_bob
    alice.publish("im/room/lobby/alice", b"x" * (DEFAULT_MAX_PAYLOAD + 1))
    notice = json.loads(alice.expect("im/user/alice/notice").payload)
    assert notice["code"] == "too_large"


@pytest.mark.broker_xfail(
    "mosquitto",
    reason="Mosquitto has no per-topic retain rule (retain_available is all or nothing, and presence "
    "needs retained messages): a retained chat line is stored and replayed to every new subscriber",
)
@pytest.mark.parametrize("topic", ["im/room/lobby/alice", "im/user/bob/dm/alice"])
def test_retained_chat_is_not_stored(alice_bob: tuple[Raw, Raw], raw: RawFactory, topic: str) -> None:
    alice, _bob = alice_bob
    alice.publish(topic, chat("stuck forever?"), retain=True)
    late = raw("bob", client_id="bob:late")
    assert late.subscribe_all("im/room/+/+", "im/user/bob/#") == [1, 1]
    assert barrier(alice, late) == [[]]


@pytest.mark.broker_xfail("mosquitto", reason=NO_NOTICES)
def test_retained_chat_sender_is_told(alice_bob: tuple[Raw, Raw]) -> None:
    alice, _bob = alice_bob
    alice.publish("im/room/lobby/alice", chat("stuck forever?"), retain=True)
    assert json.loads(alice.expect("im/user/alice/notice").payload)["code"] == "denied"


# ---------------------------------------------------------------- registration


@pytest.mark.broker_xfail("mosquitto", reason=NO_REGISTRATION)
def test_registration_creates_an_account_with_no_rights_on_that_connection(server: object, raw: RawFactory) -> None:
    reg = raw("register:newbie", "newbie-password", "register:newbie")
    assert reg.rc == 0
    assert reg.subscribe("im/room/+/+") == 128
    assert raw("newbie", "newbie-password", "newbie:x").rc == 0
    assert raw("register:newbie", "other-password", "register:newbie").rc == 4  # taken


@pytest.mark.broker_xfail("mosquitto", reason=NO_REGISTRATION + "; it refuses every register:… login with 5")
@pytest.mark.parametrize("name", ["presence", "admin", "Bad", "a/b", "x" * 33])
def test_registration_refuses_reserved_and_invalid_names(server: object, raw: RawFactory, name: str) -> None:
    assert raw(f"register:{name}", "some-password", f"register:{name}").rc == 4


def test_closed_registration_refuses(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "closed", port=0, registration="closed")
    with BackgroundServer(settings) as info:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        codes: list[int] = []
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="register:newbie")
        client.username_pw_set("register:newbie", "newbie-password")
        client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
        client.connect(info.address.host, info.address.port)
        client.loop_start()
        try:
            from tests.conftest import wait_until

            assert wait_until(lambda: bool(codes))
            assert codes == [135]  # MQTT 3.1.1 code 5, not authorized
        finally:
            client.disconnect()
            client.loop_stop()


@pytest.mark.broker_xfail(
    "mosquitto", reason="mosquitto_passwd 2.0.11 stores PBKDF2-SHA512 with 101 iterations ($7$), not argon2id"
)
def test_password_is_never_in_the_account_file(users: Callable[..., None], server: object) -> None:
    users("alice")
    data_dir = server.data_dir  # type: ignore[attr-defined]
    account_file = data_dir / "accounts.json" if (data_dir / "accounts.json").exists() else data_dir / "passwd"
    text = account_file.read_text()
    assert "alice:" in text or '"alice"' in text
    assert password_of("alice") not in text
    assert "$argon2id$" in text


def test_a_new_connection_gets_no_retained_messages_it_did_not_subscribe_to(
    users: Callable[..., None], raw: RawFactory
) -> None:
    """amqtt 0.12.1 re-sends, on every CONNECT, the retained messages of every filter anyone
    subscribed to, unchecked: here the worker's im/status/+/+ would leak bob's device status."""
    users("alice", "bob")
    bob = raw("bob", client_id="bob:phone")
    bob.publish("im/status/bob/phone", b'{"type":"status","v":1,"state":"online","interval":30,"ts":1}', retain=True)
    alice = raw("alice", client_id="alice:x")  # subscribes to nothing
    assert alice.silent(0.5) == []
    assert alice.subscribe("im/room/+/+") == 1
    assert [m.topic for m in alice.silent(0.3)] == []
