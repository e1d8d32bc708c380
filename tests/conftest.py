"""Fixtures: a real embedded broker on an ephemeral loopback port, isolated config dirs,
raw paho clients for attack tests, and CLI runners (in-process and as subprocesses)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from broker.accounts import AccountStore
from broker.server import BrokerSettings
from imcli.cli import app
from imcli.embedded import BackgroundServer, ServeInfo

PASSWORD = "correct-horse-{}"


def password_of(name: str) -> str:
    return PASSWORD.format(name)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("IMCLI_HOST", "IMCLI_PORT", "IMCLI_PASSWORD", "IMCLI_DATA_DIR", "IMCLI_MAX_PAYLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMCLI_CONFIG_DIR", str(tmp_path / "config-default"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeInfo]:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0)) as info:
        yield info


@pytest.fixture
def users(server: ServeInfo) -> Callable[..., None]:
    """``users("alice", "bob")`` creates accounts with password ``password_of(name)``."""
    store = AccountStore(server.data_dir)

    def add(*names: str) -> None:
        for name in names:
            store.add(name, password_of(name))

    return add


# ---------------------------------------------------------------- raw MQTT


@dataclass
class Raw:
    """A raw paho client: what an attacker or a bot would use."""

    client: paho.Client
    rc: int | None = None
    messages: queue.Queue[paho.MQTTMessage] = field(default_factory=queue.Queue)
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    skipped: list[paho.MQTTMessage] = field(default_factory=list)  # passed over by expect(topic)

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the granted QoS, or 128 when refused."""
        _, mid = self.client.subscribe(topic, qos)
        assert wait_until(lambda: mid in self.subacks), "no SUBACK"
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def expect(self, topic: str | None = None, timeout: float = 5.0) -> paho.MQTTMessage:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if topic is None or msg.topic == topic:
                return msg
            self.skipped.append(msg)  # kept: silent() reports it, so a barrier cannot hide it
        raise AssertionError(f"no message on {topic or 'any topic'} within {timeout}s")

    def silent(self, seconds: float = 1.0, topic_prefix: str = "") -> list[paho.MQTTMessage]:
        """Messages that arrived within ``seconds`` (after a barrier elsewhere, used to prove absence)."""
        end = time.monotonic() + seconds
        got = [m for m in self.skipped if m.topic.startswith(topic_prefix)]
        self.skipped.clear()
        while (left := end - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if msg.topic.startswith(topic_prefix):
                got.append(msg)
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT (the Last Will fires)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def raw(server: ServeInfo) -> Iterator[Callable[..., Raw]]:
    """``raw(username, password, client_id, clean=True, will=None)`` → connected or refused ``Raw``."""
    opened: list[Raw] = []

    def connect(
        username: str | None,
        password: str | None = None,
        client_id: str = "",
        *,
        clean: bool = True,
        will: tuple[str, bytes, bool] | None = None,
    ) -> Raw:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        r = Raw(client)
        if username is not None:
            client.username_pw_set(username, password if password is not None else password_of(username))
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])

        def on_connect(_c: object, _u: object, _f: object, rc: object, _p: object) -> None:
            r.rc = {0: 0, 133: 2, 134: 4, 135: 5}.get(rc.value, rc.value)  # type: ignore[attr-defined]
            r.connected.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *_a: r.disconnected.set()
        client.on_message = lambda _c, _u, m: r.messages.put(m)
        client.on_subscribe = lambda _c, _u, mid, codes, _p: r.subacks.__setitem__(mid, [c.value for c in codes])
        client.connect(server.address.host, server.address.port, keepalive=30)
        client.loop_start()
        assert r.connected.wait(10), "no CONNACK"
        opened.append(r)
        return r

    yield connect
    for r in opened:
        r.close()


# ---------------------------------------------------------------- CLI


@dataclass
class Cli:
    """Runs imcli in-process as a given user (own config dir), against the test broker."""

    runner: CliRunner
    server: ServeInfo
    config_dir: Path

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None):
        full_env = {"IMCLI_CONFIG_DIR": str(self.config_dir), **(env or {})}
        return self.runner.invoke(app, list(args), input=input, env=full_env)

    def login(self, name: str) -> None:
        result = self(
            "login",
            name,
            "--host",
            self.server.address.host,
            "--port",
            str(self.server.address.port),
            "--password-stdin",
            input=password_of(name) + "\n",
        )
        assert result.exit_code == 0, result.output


@pytest.fixture
def cli_as(server: ServeInfo, tmp_path: Path) -> Callable[[str], Cli]:
    """``cli_as("alice")`` is a CLI with its own config directory (not yet logged in)."""

    def make(name: str) -> Cli:
        return Cli(CliRunner(), server, tmp_path / f"config-{name}")

    return make


class Proc:
    """``python -m imcli …`` as a subprocess, with its stdout lines readable with a timeout."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "imcli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err_lines: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.lines.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err_lines.append), daemon=True),
        ]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(stream: object, sink: Callable[[str], None]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s; stderr: {self.err_lines}") from None

    def wait_stderr(self, text: str, timeout: float = 10.0) -> None:
        assert wait_until(lambda: any(text in line for line in self.err_lines), timeout), self.err_lines

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            code = self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(10)
        for t in self._pumps:
            t.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(*args: str, env: dict[str, str]) -> Proc:
        p = Proc(list(args), env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
