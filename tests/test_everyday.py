"""Everyday use (issue 22): the text limit in the text's terms, rooms that are not groups, and
``imcli serve`` ready when it says so."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.server import BrokerSettings
from imcli.client.services import prepare_text
from imcli.core.errors import InvalidInput
from imcli.core.mqtt import Credentials, MqttClient
from imcli.core.wire import DEFAULT_MAX_PAYLOAD
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli, Proc, password_of


def test_the_text_limit_says_how_much_text_fits() -> None:
    with pytest.raises(InvalidInput) as refused:
        prepare_text("x" * 16_384)
    message = refused.value.message
    assert message.startswith("message too long: 16,384 bytes of text, ") and message.endswith(" fit in one message")
    fits = int(message.split(", ")[-1].split(" fit")[0].replace(",", ""))
    assert DEFAULT_MAX_PAYLOAD - 200 < fits < DEFAULT_MAX_PAYLOAD
    assert prepare_text("x" * fits).text == "x" * fits  # exactly what it said fits
    with pytest.raises(InvalidInput):
        prepare_text("x" * (fits + 10))


def test_say_says_how_much_text_fits(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]
) -> None:
    users("alice")
    alice = cli_as("alice")
    alice.login("alice")
    result = alice("say", "x" * 16_384)
    assert result.exit_code == 1
    first, _, rest = result.stderr.strip().partition(", ")
    assert first == "Error: message too long: 16,384 bytes of text"
    fits = int(rest.split(" fit")[0].replace(",", ""))
    assert alice("say", "x" * fits).exit_code == 0
    assert alice("say", "x" * (fits + 10)).exit_code == 1


def test_an_empty_room_is_refused(server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]) -> None:
    users("alice")
    alice = cli_as("alice")
    alice.login("alice")
    for args in (["say", "hi", "--room", ""], ["say", "hi", "--room="], ["say", "hi", "-r", ""]):
        result = alice(*args)
        assert result.exit_code == 1, args
        assert result.stderr.startswith("Error: invalid room name ''"), result.stderr


def test_saying_in_a_room_named_like_a_group_says_so(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]
) -> None:
    users("alice")
    alice = cli_as("alice")
    alice.login("alice")
    assert alice("group", "create", "team").exit_code == 0
    result = alice("say", "--room", "team", "hello")
    assert result.exit_code == 0
    assert result.stdout.strip() == "sent to team"
    assert result.stderr.strip() == "note: team is a room; #team is a group: imcli group say team TEXT"
    plain = alice("say", "--room", "dev", "hello")
    assert (plain.exit_code, plain.stderr) == (0, "")


def test_a_client_is_let_in_when_the_workers_are(tmp_path: Path) -> None:
    """``imcli serve`` opens its port before its workers are in (they connect through it): a
    client that comes then waits for its CONNACK until they are, instead of being let in to ask
    workers not yet there (``imcli who`` failed with "no worker answered")."""
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0), workers=False) as info:
        assert info.broker is not None
        AccountStore(info.data_dir).add("alice", password_of("alice"))
        info.broker.admission.hold_clients()  # as serve_forever does while its workers start
        connected = threading.Event()

        def connect() -> None:
            with MqttClient(info.address, Credentials("alice", password_of("alice")), "alice:early"):
                connected.set()

        early = threading.Thread(target=connect, daemon=True)
        early.start()
        assert not connected.wait(2), "let in before the workers were ready"
        info.broker.admission.workers_ready()
        assert connected.wait(10)
        early.join(10)


def test_serve_verbose_logs_this_projects_events_not_amqtts(
    tmp_path: Path, procs: Callable[..., Proc], cli_as: Callable[[str], Cli]
) -> None:
    serve = procs("serve", "--verbose", "--port", "0", "--data-dir", str(tmp_path / "data"), env={})
    match = re.fullmatch(r"imcli serve: listening on 127\.0\.0\.1:(\d+)", serve.line(timeout=60))
    assert match
    port = match.group(1)
    alice = cli_as("alice")
    registered = alice("register", "alice", "--port", port, "--password-stdin", input=password_of("alice") + "\n")
    assert registered.exit_code == 0, registered.output
    serve.wait_stderr("alice:", timeout=20)  # its connection, as imcli logs it
    assert serve.stop() == 0
    logged = "\n".join(serve.err_lines)
    assert "imcli.broker" in logged
    assert "transitions" not in logged, logged  # amqtt's state machine
    assert "amqtt.broker Listener" not in logged and "amqtt.broker Connection from" not in logged, logged


def test_a_list_without_what_the_presence_worker_adds_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """``who`` and ``friend list`` still show their list when the presence worker does not answer a
    question they ask it (profiles; presence), but say what is missing: it looked as if nobody had a
    signature, and every friend's state was "unknown" without a word why."""
    from typer.testing import CliRunner

    from imcli.cli import app as app_module
    from imcli.cli import social
    from imcli.cli.app import app
    from imcli.client import services
    from imcli.core.errors import RequestTimeout
    from imcli.core.wire import Friends, Presence

    def timeout(*_: object, **__: object) -> None:
        raise RequestTimeout("no worker answered within 5s", "is it running?")

    monkeypatch.setattr(app_module, "signed_in", lambda *_: object())
    monkeypatch.setattr(social, "signed_in", lambda *_: object())
    bob = Presence(account="bob", nick="bob", state="online", since=1.0, devices=1)
    monkeypatch.setattr(services, "who", lambda *_, **__: [bob])
    monkeypatch.setattr(services, "friend_request", lambda *_: Friends(account="alice", friends=["bob"]))
    monkeypatch.setattr(services, "profiles_of", lambda *_: None)
    runner = CliRunner()
    for args in (["who"], ["who", "--json"], ["friend", "list"], ["friend", "list", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "bob" in result.stdout, (args, result.stdout)
        assert result.stderr.strip() == "(signatures not shown: the presence worker did not answer)", args
    monkeypatch.setattr(services, "who", timeout)
    result = runner.invoke(app, ["friend", "list"])
    assert result.exit_code == 0 and "bob" in result.stdout, result.output
    assert result.stderr.strip() == "(states, names and signatures not shown: the presence worker did not answer)"
