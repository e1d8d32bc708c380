"""A node that closes the connection of a client whose QoS 1 PUBLISH it has not acknowledged.

nats-server 2.9.10 does this when it cannot store a QoS 1 message in JetStream within 4 s (its
``mqttJSAPITimeout``; deploy/nats/README.md, "A QoS 1 publish the node could not store"): no
PUBACK, the connection closed. imcli's client keeps the message: paho connects again and sends it
again with DUP set, the same packet id and payload, and the command waits for that PUBACK. A node
that never acknowledges ends the command with one ``Error:`` line, no traceback.

A small MQTT broker of this file's own (the test is about what the client does, and a real node
cannot be made to time out its store on cue): it accepts every CONNECT, closes the connection on
each of the first ``drops`` QoS 1 PUBLISHes to a chat topic without a PUBACK, and acknowledges
the later ones. It answers the requests ``imcli login`` and ``imcli dm`` make first (device, resolve,
can_dm) as the workers beside Mosquitto or NATS would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.cli.app import app
from imcli.core.wire import (
    ErrorReply,
    FriendReply,
    FriendRequest,
    Friends,
    Resolved,
    ResolveRequest,
    TopicKind,
    Topics,
    decode,
    encode,
)
from tests.rawmqtt import field as mqtt_field
from tests.rawmqtt import packet, read_packets

T = Topics()


@dataclass
class Published:
    topic: str
    payload: bytes
    packet_id: int
    dup: bool


@dataclass
class ClosingNode:
    """The broker: ``drops`` chat PUBLISHes closed without a PUBACK, then acknowledged (-1: never)."""

    drops: int
    port: int = 0
    chat: list[Published] = field(default_factory=list)
    _server: socket.socket = field(default_factory=socket.socket)
    _threads: list[threading.Thread] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> ClosingNode:
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self.port = self._server.getsockname()[1]
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return  # closed by __exit__
            with self._lock:
                self._sockets.append(sock)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        with sock, contextlib.suppress(OSError):  # closed by ``__exit__``, even between a read and its answer
            while True:
                got, closed = read_packets(sock, bool)
                for first, body in got:
                    if not self._answer(sock, first, body):
                        return
                if closed:
                    return

    def _answer(self, sock: socket.socket, first: int, body: bytes) -> bool:
        """Answer one packet; False once the connection is to end."""
        kind = first & 0xF0
        if kind == 0x10:  # CONNECT
            sock.sendall(b"\x20\x02\x00\x00")
        elif kind == 0x30:  # PUBLISH
            return self._publish(sock, first, body)
        elif kind == 0x80:  # SUBSCRIBE: every filter granted at the QoS asked
            sock.sendall(packet(0x90, body[:2] + self._granted(body[2:])))
        elif kind == 0xA0:  # UNSUBSCRIBE
            sock.sendall(packet(0xB0, body[:2]))
        elif kind == 0xC0:  # PINGREQ
            sock.sendall(b"\xd0\x00")
        elif kind == 0xE0:  # DISCONNECT
            return False
        return True

    @staticmethod
    def _granted(filters: bytes) -> bytes:
        codes = b""
        while filters:
            length = int.from_bytes(filters[:2], "big")
            codes += filters[2 + length : 3 + length]
            filters = filters[3 + length :]
        return codes

    def _publish(self, sock: socket.socket, first: int, body: bytes) -> bool:
        qos = (first >> 1) & 3
        length = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + length].decode()
        packet_id = int.from_bytes(body[2 + length : 4 + length], "big") if qos else 0
        payload = body[2 + length + (2 if qos else 0) :]
        parsed = T.parse(topic)
        if parsed is not None and parsed.kind is TopicKind.REQUEST and parsed.key:
            sock.sendall(self._reply(parsed.key, payload))
        elif qos and parsed is not None and parsed.kind in (TopicKind.ROOM, TopicKind.DM):
            with self._lock:
                self.chat.append(Published(topic, payload, packet_id, bool(first & 0x08)))
                dropped = self.drops < 0 or len(self.chat) <= self.drops
            if dropped:  # as nats-server after a store timeout: no PUBACK, and the connection closed
                sock.shutdown(socket.SHUT_RDWR)
                return False
        if qos:
            sock.sendall(packet(0x40, packet_id.to_bytes(2, "big")))
        return True

    @staticmethod
    def _reply(corr: str, payload: bytes) -> bytes:
        request = decode(payload)
        if isinstance(request, ResolveRequest):
            reply = encode(Resolved(id=request.id, account="bob"))
        elif isinstance(request, FriendRequest):
            reply = encode(FriendReply(id=request.id, record=Friends(account="alice"), allowed=True))
        else:  # ``imcli login``'s device request, as the presence worker answers it beside Mosquitto or NATS
            reply = encode(ErrorReply(id=getattr(request, "id", corr), code="unsupported", text="no devices here"))
        return packet(0x30, mqtt_field(T.reply("alice", corr).encode()) + reply)


def imcli(node: ClosingNode, tmp_path: Path, *args: str) -> tuple[int, str]:
    runner = CliRunner()
    env = {"IMCLI_CONFIG_DIR": str(tmp_path / "config"), "IMCLI_PASSWORD": "secret", "IMCLI_REQUEST_TIMEOUT": "5"}
    hosts = ["--host", "127.0.0.1", "--port", str(node.port)]
    logged_in = runner.invoke(app, ["login", "alice", *hosts], env=env)
    assert logged_in.exit_code == 0, logged_in.output
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


@pytest.mark.parametrize("command", [["say", "hello"], ["dm", "bob", "hello"]])
def test_a_publish_the_node_closed_on_is_sent_again_and_acknowledged(command: list[str], tmp_path: Path) -> None:
    with ClosingNode(drops=1) as node:
        code, output = imcli(node, tmp_path, *command)
    assert code == 0, output
    assert output.startswith("sent to ")
    first, again = node.chat
    assert (again.topic, again.payload, again.packet_id) == (first.topic, first.payload, first.packet_id)
    assert (first.dup, again.dup) == (False, True)
    assert decode(first.payload).text == "hello"  # type: ignore[union-attr]


@pytest.mark.parametrize("command", [["say", "hello"], ["dm", "bob", "hello"]])
def test_a_publish_the_node_never_acknowledges_ends_in_one_error_line(command: list[str], tmp_path: Path) -> None:
    with ClosingNode(drops=-1) as node:
        code, output = imcli(node, tmp_path, *command)
    assert code == 1
    assert output.startswith("Error: ") and output.count("\n") == 1, output
    assert "Traceback" not in output
    assert len(node.chat) >= 2 and all(p.dup for p in node.chat[1:])  # it was sent again meanwhile
