"""The embedded broker on the event loop it does not run on by default (imcli/serve/loops.py:
``imcli serve --loop``), so that both loops keep working.

The tests below are the other modules' own, collected here a second time with this module's
``broker`` and ``server`` fixtures, which start the broker on ``OTHER``: a room and DMs through the
reader's two paths, QoS 1 PUBACKs settled where they are read, DISCONNECTs waiting for the teardown
gate, take-overs, Last Wills, and raw-MQTT attacks on the ACL. ``IMCLI_LOOP=uvloop`` runs the
other modules' embedded brokers on uvloop too (``BackgroundServer`` reads it; tests/test_loop_timers.py
keeps asyncio, whose timer heap it reads).

On uvloop the connection's message loop may not have reached its first wait when the first packets
after the CONNACK are read (libuv reads the sockets before the callbacks the round before made ready,
asyncio after them): those messages then go through the message loop, in order all the same, not
the reader's fast path. The tests that count the paths wait for the loop first (their ``_connect``).
For the same reason a PINGREQ read after a burst larger than the reader's share may be answered
before the message loop has handled the rest of the burst (the reader answers a PINGREQ itself,
and on asyncio the loop's next step comes first): MQTT orders PUBACKs among themselves, not with a
PINGRESP, so test_attacks_fastpath's test of such a burst waits for every PUBACK and every copy
before its PINGRESP barrier.

The first test is this module's own: the reader's hook on ``data_received`` (imcli/broker/reader.py
``_hook``) must see the connection's reads on either loop, or the PUBACK and DISCONNECT fast
paths are silently bypassed (as they were under uvloop, whose transport keeps the bound method it
found when its protocol was set).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imcli.broker import reader
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.core.errors import InvalidInput
from imcli.serve import loops
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import (
    test_attacks_broker,
    test_attacks_fastpath,
    test_deliver_at_once,
    test_loop_timers,
    test_security,
    test_teardown,
    test_wills,
)
from tests.brokers import bare_broker
from tests.rawmqtt import (
    chat,
    field,
    packet,
    password_of,
    publish_packet,
    read_packets,
    signed_in,
    wait_until,
)

OTHER = next(loop for loop in loops.LOOPS if loop != loops.DEFAULT_LOOP)
NAMES = ("alice", "bob", "carol", "dave", "mallory")
DISCONNECT = b"\xe0\x00"


def _uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _uvloop_installed(), reason="uvloop not installed (pip install '.[test]')")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    """What the other modules' ``broker`` fixtures start (the union of their settings and accounts),
    on ``OTHER``."""
    settings = BrokerSettings(
        data_dir=tmp_path / "data",
        port=0,
        ws_port=0,
        packet_timeout=2.0,
        limits=Limits(publish_rate=1e6, publish_burst=10**6, max_connections=100),
    )
    with BackgroundServer(settings, workers=False, loop=OTHER) as info:
        store = AccountStore(info.data_dir)
        for name in NAMES:
            store.add(name, password_of(name))
        store.add("auditor", password_of("auditor"), Role.SERVICE)
        yield info


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeInfo]:
    """conftest's ``server`` (the broker and its workers), on ``OTHER``."""
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0), loop=OTHER) as info:
        yield info


def _connect(info: ServeInfo, name: str, client_id: bytes) -> socket.socket:
    return signed_in(info.address, name, client_id)


@pytest.mark.parametrize("loop", loops.LOOPS)
def test_the_readers_hook_sees_pubacks_and_a_disconnect_on_either_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """A room of three at QoS 1: each listener's PUBACK, alone in its read while its reader waits, is
    settled in the transport's callback (``_arrived``: ``only_pubacks``), and a DISCONNECT alone in
    its read goes through ``_park``; each copy is settled all the same (a second line comes after)."""
    fast: list[str] = []
    arrived, park = reader.PacketReader._arrived, reader.PacketReader._park

    def counted_arrived(self: reader.PacketReader, feed: Callable[[bytes], None], data: bytes) -> None:
        if self._waiting and reader.only_pubacks(data):
            fast.append("puback")
        arrived(self, feed, data)

    def counted_park(self: reader.PacketReader, feed: Callable[[bytes], None], data: bytes) -> None:
        fast.append("disconnect")
        park(self, feed, data)

    monkeypatch.setattr(reader.PacketReader, "_arrived", counted_arrived)
    monkeypatch.setattr(reader.PacketReader, "_park", counted_park)
    with bare_broker(tmp_path / "data", "alice", "bob", "carol", loop=loop) as info:
        assert info.broker is not None
        assert (type(info.broker._loop).__module__.split(".")[0]) == loop  # amqtt private: the broker's loop
        room = b"im/room/lobby/alice"
        listeners = []
        for name in ("bob", "carol"):
            sock = _connect(info, name, f"{name}:room".encode())
            sock.sendall(packet(0x82, b"\x00\x01" + field(b"im/room/+/+") + b"\x01"))
            assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x90, b"\x00\x01\x01")]
            listeners.append(sock)
        with _connect(info, "alice", b"alice:room") as alice:
            for i in (1, 2):
                alice.sendall(publish_packet(room, chat(f"line {i}"), qos=1, packet_id=i))
                assert read_packets(alice, lambda p: len(p) >= 1)[0] == [(0x40, bytes([0, i]))]
                for sock in listeners:
                    [(first, body)] = read_packets(sock, lambda p: len(p) >= 1)[0]
                    assert first & 0xF6 == 0x32 and f"line {i}".encode() in body
                    n = int.from_bytes(body[:2], "big")
                    sock.sendall(b"\x40\x02" + body[2 + n : 4 + n])
            assert wait_until(lambda: fast.count("puback") >= 4, 5), fast
            alice.sendall(DISCONNECT)
            assert read_packets(alice, lambda p: False)[1]  # closed by the broker
        for sock in listeners:
            sock.close()
    assert fast.count("puback") >= 4 and fast.count("disconnect") == 1, fast


@pytest.mark.parametrize(("args", "env"), [(["--loop", "tokio"], {}), ([], {"IMCLI_LOOP": "tokio"})])
def test_serve_refuses_an_unknown_loop_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "imcli", "serve", "--port", "0", "--data-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "Error: unknown event loop 'tokio' (use --loop asyncio or --loop uvloop, in IMCLI_LOOP too)"
    ]
    assert not (tmp_path / AccountStore.FILE_NAME).exists()  # nothing started


def test_uvloop_missing_is_one_line_and_asyncio_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # an import of it fails, as where it is not installed
    with pytest.raises(InvalidInput) as refused:
        loops.chosen_loop("uvloop")
    assert str(refused.value) == "uvloop is not installed (pip install uvloop, or use --loop asyncio)"
    assert loops.chosen_loop("asyncio") == "asyncio"


# a room and DMs through both of the reader's paths, QoS 1 PUBACKs where they are read
test_what_one_client_sends_keeps_its_order_across_both_paths = (
    test_deliver_at_once.test_what_one_client_sends_keeps_its_order_across_both_paths
)
test_a_dm_handled_at_once_is_in_the_archive_before_its_puback = (
    test_deliver_at_once.test_a_dm_handled_at_once_is_in_the_archive_before_its_puback
)
test_a_chat_message_read_with_a_file_chunk_goes_before_it = (
    test_deliver_at_once.test_a_chat_message_read_with_a_file_chunk_goes_before_it
)
test_many_publishes_in_one_segment_mixing_qos_and_a_forgery_keep_order_and_identity = (
    test_attacks_fastpath.test_many_publishes_in_one_segment_mixing_qos_and_a_forgery_keep_order_and_identity
)
test_pubacks_alone_in_a_read_settle_their_copies_and_a_packet_id_0_still_closes = (
    test_attacks_fastpath.test_pubacks_alone_in_a_read_settle_their_copies_and_a_packet_id_0_still_closes
)
# a lone PINGREQ answered in the transport's callback, and counted as heard
test_a_ping_alone_in_its_read_is_answered_without_waking_the_reader = (
    test_loop_timers.test_a_ping_alone_in_its_read_is_answered_without_waking_the_reader
)
test_a_client_that_only_pings_stays_connected_past_its_keep_alive = (
    test_loop_timers.test_a_client_that_only_pings_stays_connected_past_its_keep_alive
)
# DISCONNECTs and the teardown gate
test_a_ping_read_with_many_ends_is_answered_before_most_of_them = (
    test_teardown.test_a_ping_read_with_many_ends_is_answered_before_most_of_them
)
test_an_end_waiting_for_its_turn_keeps_its_session_and_a_takeover_ends_it_with_its_disconnect = (
    test_teardown.test_an_end_waiting_for_its_turn_keeps_its_session_and_a_takeover_ends_it_with_its_disconnect
)
test_a_publish_after_disconnect_in_the_same_segment_is_not_delivered = (
    test_attacks_fastpath.test_a_publish_after_disconnect_in_the_same_segment_is_not_delivered
)
test_a_publish_after_disconnect_over_websocket_is_not_delivered = (
    test_attacks_fastpath.test_a_publish_after_disconnect_over_websocket_is_not_delivered
)
# take-overs
test_the_connection_taken_over_is_told_why_and_the_newer_keeps_the_session = (
    test_attacks_fastpath.test_the_connection_taken_over_is_told_why_and_the_newer_keeps_the_session
)
test_a_persistent_sessions_unacknowledged_copies_outlive_an_end_waiting_for_its_turn = (
    test_teardown.test_a_persistent_sessions_unacknowledged_copies_outlive_an_end_waiting_for_its_turn
)
# Last Wills
test_a_will_fires_after_the_last_message_when_the_end_waits_for_its_turn = (
    test_teardown.test_a_will_fires_after_the_last_message_when_the_end_waits_for_its_turn
)
test_a_will_is_delivered_as_an_ordinary_publish_is = (
    test_attacks_broker.test_a_will_is_delivered_as_an_ordinary_publish_is
)
bob = test_wills.bob
test_a_delivered_chat_will_is_in_the_archive = test_wills.test_a_delivered_chat_will_is_in_the_archive
# raw-MQTT attacks on the ACL
alice_bob = test_security.alice_bob
test_subscribing_beyond_what_one_may_read_is_refused = (
    test_security.test_subscribing_beyond_what_one_may_read_is_refused
)
test_too_wide_subscription_receives_nothing_private = test_security.test_too_wide_subscription_receives_nothing_private
test_dm_reaches_only_its_recipient = test_security.test_dm_reaches_only_its_recipient
test_a_dm_forged_from_another_is_never_delivered = (
    test_attacks_fastpath.test_a_dm_forged_from_another_is_never_delivered
)
