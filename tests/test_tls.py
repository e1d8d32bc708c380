"""TLS and WebSocket listeners of `imcli serve`, with a throw-away CA made by trustme.

Shown here: the CLI registers, logs in, says and listens over TLS (the profile remembers
--tls/--ca); a client that does not trust the CA is refused with one line; a plain-TCP
client gets nothing from the TLS port; MQTT over WebSocket (wss) carries chat with the
same ACL; the workers inside `imcli serve` keep working (they use a loopback listener).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.server import BrokerSettings
from imcli.cli.app import app
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, Proc, password_of
from tests.rawmqtt import connect_raw
from tests.test_cli import start_listener, wait_listening


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and a CA nobody used."""
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": where / "ca.pem", "cert": where / "server.pem", "key": where / "server.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    other = where / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    files["other"] = other
    return files


@pytest.fixture
def tls_server(tmp_path: Path, pki: dict[str, Path]) -> Iterator[ServeInfo]:
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, tls_cert=pki["cert"], tls_key=pki["key"], ws_port=0)
    with BackgroundServer(settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        yield info


def tls_cli(server: ServeInfo, tmp_path: Path, name: str) -> Cli:
    return Cli(CliRunner(), server, tmp_path / f"config-{name}")


def address_args(server: ServeInfo) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(server.address.port)]


def test_cli_chats_over_tls(
    tls_server: ServeInfo, tmp_path: Path, pki: dict[str, Path], procs: Callable[..., Proc]
) -> None:
    assert tls_server.address.tls
    carol = tls_cli(tls_server, tmp_path, "carol")
    result = carol(
        "register", "carol", *address_args(tls_server), "--ca", str(pki["ca"]), "--password-stdin",
        input="a-long-password-carol\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(TLS)" in result.output
    profile = json.loads((carol.config_dir / "profile.json").read_text())["logins"]["carol"]
    assert profile["tls"] is True
    assert profile["ca"] == str(pki["ca"].resolve())

    bob = tls_cli(tls_server, tmp_path, "bob")
    result = bob("login", "bob", *address_args(tls_server), "--password-stdin", input=password_of("bob") + "\n",
                 env={"IMCLI_TLS": "1", "IMCLI_CA": str(pki["ca"])})  # fmt: skip
    assert result.exit_code == 0, result.output
    listener = start_listener(procs, bob)  # later commands take TLS from the profile alone
    wait_listening(bob, listener)

    result = carol("say", "hello over tls")
    assert result.exit_code == 0, result.output
    line = json.loads(listener.line())
    assert (line["from"], line["text"]) == ("carol", "hello over tls")
    result = carol("dm", "bob", "private over tls")
    assert result.exit_code == 0, result.output
    line = json.loads(listener.line())
    assert (line["from"], line["text"]) == ("carol", "private over tls")
    result = carol("who", "--json")  # the presence worker answers: the workers are connected
    assert result.exit_code == 0, result.output
    assert "bob" in {u["account"] for u in json.loads(result.output)}


@pytest.mark.parametrize("trust", ["system", "other"])
def test_untrusted_certificate_is_one_line(
    tls_server: ServeInfo, tmp_path: Path, pki: dict[str, Path], trust: str
) -> None:
    alice = tls_cli(tls_server, tmp_path, "alice")
    ca = ["--tls"] if trust == "system" else ["--ca", str(pki["other"])]
    result = alice("login", "alice", *address_args(tls_server), *ca, "--password-stdin",
                   input=password_of("alice") + "\n")  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: the certificate of 127.0.0.1:")
    assert "not trusted" in lines[0]
    assert "--ca" in lines[0]
    assert "Traceback" not in result.output
    assert not (alice.config_dir / "profile.json").exists()


def test_host_name_must_match_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A certificate from the trusted CA, but for another name than the one connected to."""
    ca = trustme.CA()
    cert = ca.issue_cert("chat.example.org")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, tls_cert=tmp_path / "cert.pem",
                              tls_key=tmp_path / "key.pem")  # fmt: skip
    with BackgroundServer(settings, workers=False) as info:
        AccountStore(info.data_dir).add("alice", password_of("alice"))
        alice = tls_cli(info, tmp_path, "alice")
        result = alice("login", "alice", *address_args(info), "--ca", str(tmp_path / "ca.pem"), "--password-stdin",
                       input=password_of("alice") + "\n")  # fmt: skip
    assert result.exit_code == 1
    assert result.output.startswith("Error: the certificate of 127.0.0.1:"), result.output
    assert "IP address mismatch" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_plain_client_gets_nothing_from_tls_port(tls_server: ServeInfo, tmp_path: Path) -> None:
    alice = tls_cli(tls_server, tmp_path, "alice")
    result = alice("login", "alice", *address_args(tls_server), "--no-tls", "--password-stdin",
                   input=password_of("alice") + "\n")  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "closed the connection without answering" in lines[0]
    assert "--tls" in lines[0]

    raw = connect_raw_no_wait(tls_server.address.port)
    assert raw == b"", "a plain CONNECT to the TLS port must get no CONNACK"


def connect_raw_no_wait(port: int) -> bytes:
    """Send a well-formed plain MQTT CONNECT for alice; return what came back before the close."""
    user, password = b"alice", password_of("alice").encode()
    variable = b"\x00\x04MQTT\x04\xc2\x00\x1e"
    payload = b"".join(len(x).to_bytes(2, "big") + x for x in (b"alice", user, password))
    body = variable + payload
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def test_tls_client_on_plain_port_is_one_line(server: ServeInfo, users: Callable[..., None], tmp_path: Path,
                                              pki: dict[str, Path]) -> None:  # fmt: skip
    users("alice")
    alice = Cli(CliRunner(), server, tmp_path / "config-alice")
    result = alice("login", "alice", "--host", "127.0.0.1", "--port", str(server.address.port), "--ca",
                   str(pki["ca"]), "--password-stdin", input=password_of("alice") + "\n")  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    # the packet guard cuts the ClientHello (it parses as a short CONNECT) at once; a broker that
    # waits for the rest instead gives "no TLS handshake with …" after paho's connect timeout
    assert lines[0].startswith("Error: TLS handshake with 127.0.0.1:"), lines
    assert "does that port speak TLS?" in lines[0]
    assert "Traceback" not in result.output


def test_websocket_listener_carries_chat_with_the_acl(tls_server: ServeInfo, pki: dict[str, Path]) -> None:
    assert tls_server.ws_port is not None
    ws = {"transport": "websockets", "ca": str(pki["ca"])}
    bob = connect_raw("127.0.0.1", tls_server.ws_port, "bob", "bob:ws", **ws)  # type: ignore[arg-type]
    alice = connect_raw("127.0.0.1", tls_server.ws_port, "alice", "alice:ws", **ws)  # type: ignore[arg-type]
    try:
        assert (alice.rc, bob.rc) == (0, 0)
        assert bob.subscribe("im/room/+/+") == 1
        assert bob.subscribe("im/user/alice/#") == 0x80  # the same ACL on every listener
        alice.publish("im/room/lobby/bob", b"forged")  # dropped: alice may not speak as bob
        alice.publish("im/room/lobby/alice", b"hello over wss")
        got = bob.expect("im/room/lobby/alice")
        assert got.payload == b"hello over wss"
        assert not [m for m in bob.skipped if m.topic == "im/room/lobby/bob"]
    finally:
        alice.close()
        bob.close()
    wrong = connect_raw("127.0.0.1", tls_server.ws_port, "bob", "bob:ws2", "wrong-password", **ws)  # type: ignore[arg-type]
    assert wrong.rc == 4  # bad user name or password


def test_serve_refuses_a_bad_certificate_with_one_line(tmp_path: Path, pki: dict[str, Path]) -> None:
    runner = CliRunner()
    cases = [
        (["--tls-cert", str(pki["cert"])], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(pki["cert"]), "--tls-key", str(tmp_path / "missing.key")], "no such file"),
        (["--tls-cert", str(pki["ca"]), "--tls-key", str(pki["key"])], "unusable TLS certificate"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["serve", "--port", "0", "--data-dir", str(tmp_path / "d"), *args])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: "), result.output
        assert expected in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_remote_bind_needs_allow_remote_only_without_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    runner = CliRunner()
    plain = runner.invoke(app, ["serve", "--bind", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d")])
    assert plain.exit_code == 1
    assert "passwords would travel unencrypted" in plain.output
    assert "--tls-cert" in plain.output
    # with TLS the same bind passes the check and gets as far as the socket: 192.0.2.1 (TEST-NET-1,
    # never assigned here) cannot be bound, so nothing listens beyond loopback and no packet is sent
    secure = runner.invoke(app, ["serve", "--bind", "192.0.2.1", "--port", "0", "--data-dir", str(tmp_path / "d"),
                                 "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])])  # fmt: skip
    assert secure.exit_code == 1
    assert secure.output.startswith("Error: cannot listen on 192.0.2.1:0"), secure.output


def test_tls_context_refuses_plaintext_downgrade(tls_server: ServeInfo, pki: dict[str, Path]) -> None:
    """The TLS port negotiates TLS 1.2 or later only (amqtt's default server context)."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    with socket.create_connection(("127.0.0.1", tls_server.address.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:  # fmt: skip
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
