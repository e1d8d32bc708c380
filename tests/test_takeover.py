"""Two clients of one device (one client id, the persistent session of ``imcli chat`` or ``listen``):
a copied profile, or two ``imcli`` sharing a device. Each CONNECT takes the session over (MQTT-3.1.4-2)
and paho reconnected the older a second later, taking it back: they took turns for ever, each
missing messages in turn, silently. Now one of them stops and says why (docs/PROTOCOL.md §9,
``taken_over``): on the embedded broker the older one, told by the broker's notice just before its
close; on Mosquitto and NATS, which cannot tell, the one whose connection is closed
``TAKEN_OVER_LOSSES`` times in a row right after coming back. The other keeps the session and gets
its messages. On all three brokers (brokers.ALL).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable

from imcli.client.listener import Listener
from imcli.core.errors import ImcliError, SessionTakenOver
from imcli.core.wire import ChatMessage, Received, Topics, encode
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import Cli, Proc, ident, wait_until
from tests.rawmqtt import connect_raw
from tests.test_chat import Terminal

broker_kind, broker_under_test, server, users = brokers.ALL

T = Topics()
STOPS = 40  # seconds: on Mosquitto and NATS three rounds of paho's 1 s reconnect each way, on a loaded machine


class Running:
    """A ``Listener`` of bob's device ``laptop`` iterated in a thread: what it showed and how it ended."""

    def __init__(self, server: ServeInfo) -> None:
        self.losses = 0
        self.listener = Listener(
            ident(server, "bob", "laptop"), session="laptop", on_connection=self._connection
        ).__enter__()
        self.items: list[Received] = []
        self.ended: ImcliError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connection(self, up: bool) -> None:
        self.losses += not up

    def _run(self) -> None:
        try:
            for item in self.listener:
                self.items.append(item)
        except ImcliError as exc:
            self.ended = exc

    def texts(self) -> list[str]:
        return [item.text for item in self.items]

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def dm_to_bob(server: ServeInfo, text: str) -> None:
    alice = connect_raw(server.address.host, server.address.port, "alice", "alice:raw")
    try:
        alice.publish(T.dm("bob", "alice"), encode(ChatMessage(text=text)))
    finally:
        alice.close()


def test_one_of_two_clients_of_a_device_stops_and_the_other_keeps_the_session(
    server: ServeInfo, users: Callable[..., None], broker_kind: str
) -> None:
    users("alice", "bob")
    older = Running(server)
    newer = Running(server)
    try:
        assert wait_until(lambda: older.ended is not None or newer.ended is not None, STOPS)
        stopped, kept = (older, newer) if older.ended is not None else (newer, older)
        assert isinstance(stopped.ended, SessionTakenOver), stopped.ended
        if broker_kind == "amqtt":  # told by the broker: the one taken over stops, at its first takeover
            # (usually the older; the newer when the older's notice subscription was not yet granted
            # at the takeover, so it came back a second later and took the session from the newer: CI)
            assert stopped.losses == 0
            assert str(stopped.ended).startswith(
                "this device's session was taken over by another imcli (device 'laptop'); stopped ("
            )
        else:  # nobody tells (Mosquitto, NATS): the one closed three times in a row right after reconnecting
            assert "another imcli probably uses this device ('laptop'); stopped" in str(stopped.ended)
        assert not stopped.listener.connected
        assert wait_until(lambda: kept.listener.connected, 10)
        losses = kept.losses
        dm_to_bob(server, "to the one that stayed")
        assert wait_until(lambda: "to the one that stayed" in kept.texts(), 10), kept.texts()
        assert kept.ended is None and kept.losses == losses and kept.listener.connected  # not taken again
        assert "to the one that stayed" not in stopped.texts()
    finally:
        older.close()
        newer.close()


def test_imcli_listen_of_a_copied_profile_stops_with_one_line(
    server: ServeInfo,
    users: Callable[..., None],
    cli_as: Callable[[str], Cli],
    procs: Callable[..., Proc],
    broker_kind: str,
) -> None:
    """A profile copied to a second machine shares its device, and so ``imcli listen``'s client id
    (the lock against two on one machine is in the profile's directory): one of the two exits 1
    with one line saying why, the other listens on."""
    users("bob")
    laptop = cli_as("laptop")
    laptop.login("bob")
    copy = laptop.config_dir.parent / "config-copied"
    shutil.copytree(laptop.config_dir, copy)
    first = procs("listen", env={"IMCLI_CONFIG_DIR": str(laptop.config_dir)})
    first.wait_stderr("listening as bob")
    second = procs("listen", env={"IMCLI_CONFIG_DIR": str(copy)})
    assert wait_until(lambda: first.popen.poll() is not None or second.popen.poll() is not None, STOPS)
    stopped, kept = (first, second) if first.popen.poll() is not None else (second, first)
    assert stopped.popen.wait(10) == 1
    errors = [line for line in stopped.err_lines if line.startswith("Error: ")]
    assert len(errors) == 1, stopped.err_lines
    assert "another imcli" in errors[0] and "stopped (" in errors[0] and "imcli login NAME" in errors[0]
    if broker_kind == "amqtt":  # the broker's notice: the older one stops
        device = json.loads((laptop.config_dir / "profile.json").read_text())["logins"]["bob"]["device"]
        assert stopped is first
        assert errors == [
            f"Error: this device's session was taken over by another imcli (device '{device}'); stopped "
            "(stop the other one; a profile copied to another machine shares its device: "
            "run 'imcli login NAME' there for a device of its own)"
        ]
    assert not any("Traceback" in line for line in stopped.err_lines)
    assert kept.popen.poll() is None


@brokers.EMBEDDED_ONLY  # its notice says which one stops (the older); on Mosquitto it is a matter of timing
def test_imcli_chat_taken_over_says_so_and_exits_1(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]
) -> None:
    users("bob")
    laptop = cli_as("laptop")
    laptop.login("bob")
    copy = laptop.config_dir.parent / "config-copied"
    shutil.copytree(laptop.config_dir, copy)
    first, second = Terminal(laptop.config_dir), None
    try:
        first.expect(r"imcli chat: bob on")
        second = Terminal(copy)
        second.expect(r"imcli chat: bob on")
        shown = first.expect(
            r"Error: this device's session was taken over by another imcli \(device '[^']+'\); stopped"
        )
        assert first.exit_code() == 1
        assert "connection lost" not in shown and "reconnected" not in shown
        second.type("/quit")
        second.expect(r"left imcli chat: bob is offline here")
        assert second.exit_code() == 0
    finally:
        first.close()
        if second is not None:
            second.close()
