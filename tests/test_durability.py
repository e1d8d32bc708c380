"""``kill -9`` of ``imcli serve`` while messages flow: every direct message whose PUBACK
reached its sender is there after a restart, once; the workers' state is never corrupted."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from imcli.broker.accounts import AccountStore
from imcli.cli.chat_session import ChatSession
from imcli.cli.chat_state import ChatState
from imcli.client import services
from imcli.client.listener import Listener
from imcli.client.services import Conversation
from imcli.core.mqtt import BrokerAddress
from imcli.core.wire import ChatMessage, GroupReply, Topics, encode
from tests.conftest import ident, password_of, wait_until

T = Topics()


class Serve:
    """``imcli serve`` as a process on an ephemeral port."""

    def __init__(self, data_dir: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "imcli", "serve", "--port", "0", "--data-dir", str(data_dir), "--max-rate", "5000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if found := re.search(r"listening on [\d.]+:(\d+)", line):
                self.address = BrokerAddress("127.0.0.1", int(found.group(1)))
                break
        else:
            raise AssertionError(f"imcli serve did not start (exit {self.popen.wait()})")
        self._drain = threading.Thread(target=lambda: self.popen.stdout and self.popen.stdout.read(), daemon=True)
        self._drain.start()

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._drain.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, list[Serve]]]:
    data = tmp_path / "data"
    store = AccountStore(data)
    for name in ("alice", "bob"):
        store.add(name, password_of(name))
    started: list[Serve] = []
    yield data, started
    for s in started:
        s.stop()


class Flood:
    """alice sends direct messages to bob at QoS 1 as fast as PUBACKs come back."""

    def __init__(self, address: BrokerAddress, count: int) -> None:
        self._sent: list[tuple[paho.MQTTMessageInfo, str]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:flood")
        self.client.username_pw_set("alice", password_of("alice"))
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert connected.wait(10), "alice could not connect"
        self._thread = threading.Thread(target=self._send, args=(count,), daemon=True)
        self._thread.start()

    def _send(self, count: int) -> None:
        for i in range(count):
            message = ChatMessage(text=f"dm {i}")
            info = self.client.publish(T.dm("bob", "alice"), encode(message), qos=1)
            self._sent.append((info, message.id))
            if not self.client.is_connected():
                return

    @property
    def acked(self) -> list[str]:
        """The ids whose PUBACK alice received."""
        return [message_id for info, message_id in list(self._sent) if info.is_published()]

    def stop(self) -> list[str]:
        self.client.loop_stop()
        self.client.disconnect()
        self._thread.join(10)
        return self.acked


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.parametrize("kill_after", [50, 150, 400])
def test_kill_9_loses_no_acknowledged_message(serve: tuple[Path, list[Serve]], kill_after: int) -> None:
    data, started = serve
    started.append(first := Serve(data))
    alice = ident(first.address, "alice", "laptop")
    services.group_request(alice, "create", "team", private=True)
    services.group_request(alice, "invite", "team", user="bob")
    with Listener(ident(first.address, "bob", "laptop"), session="laptop"):
        pass  # bob has been here: his persistent session exists, then the broker dies with its queue
    begin = time.time()
    flood = Flood(first.address, 900)  # within one history page
    services.group_request(alice, "kick", "team", user="bob")  # worker state changing while messages flow
    assert wait_until(lambda: len(flood.acked) >= kill_after, 60), len(flood.acked)
    first.kill9()
    acked = flood.stop()
    assert len(acked) >= kill_after

    for name in ("retained.sqlite3", "archive.sqlite3"):
        assert integrity(data / name) == "ok"
    started.append(second := Serve(data))
    bob = ident(second.address, "bob", "laptop")
    kept = services.history(bob, Conversation.parse("@alice"), limit=1000)
    kept_ids = [m.id for m in kept.messages]
    assert len(kept_ids) == len(set(kept_ids)), "an archived message twice"
    assert set(acked) <= set(kept_ids), f"{len(set(acked) - set(kept_ids))} acknowledged messages lost"

    # what bob's imcli chat shows on its next start: each acknowledged message once
    listener = Listener(bob, session="laptop")
    with listener:
        shown = ChatSession(bob, ChatState(last_seen=begin), listener).catch_up(list(listener.pending())).shown
    shown_ids = [m.id for m in shown if m.sender == "alice"]
    assert len(shown_ids) == len(set(shown_ids)) and set(acked) <= set(shown_ids)

    # the group record is whole: bob was either still in or already out, never half-written
    team = services.group_request(ident(second.address, "alice", "laptop"), "members", "team")
    assert isinstance(team, GroupReply) and team.group is not None
    assert team.group.owner == "alice" and "alice" in team.group.members
