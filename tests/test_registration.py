"""Registration is limited per address, and the operator may require invite codes (issue 15,
missing limits: registration). Tried with hand-made CONNECTs on raw sockets from several
loopback addresses, and with ``imcli admin invite`` / ``imcli register --invite``."""

from __future__ import annotations

import json
import logging
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.broker.accounts import AccountStore
from imcli.broker.invites import InviteStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.cli.app import app
from imcli.client import services
from imcli.core.errors import InvalidInput, NameTaken
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import ident
from tests.rawmqtt import password_of
from tests.test_logins import THROTTLED, connack


def register(info: ServeInfo, name: str, code: str | None = None, source: str = "127.0.0.1") -> int:
    """``register:<name>`` (or ``register:<name>:<code>``) with client id ``register:<name>``."""
    username = f"register:{name}" + (f":{code}" if code is not None else "")
    return connack(info, username, f"{name}-password", client_id=f"register:{name}", source=source)


def serve(tmp_path: Path, registration: str = "open", **limits: float) -> BackgroundServer:
    settings = BrokerSettings(
        data_dir=tmp_path / "data",
        port=0,
        registration=registration,
        limits=Limits(**limits),  # type: ignore[arg-type]
    )
    return BackgroundServer(settings)


def cli(info: ServeInfo, tmp_path: Path, *args: str, password: str | None = None) -> tuple[int, str, str]:
    where = ("--host", info.address.host, "--port", str(info.address.port)) if args[0] == "register" else ()
    extra = ("--password-stdin",) if password is not None else ()
    result = CliRunner().invoke(
        app,
        [*args, *where, *extra],
        input=(password + "\n") if password is not None else None,
        env={"IMCLI_CONFIG_DIR": str(tmp_path / f"config-{args[1]}")},
    )
    return result.exit_code, result.stdout, result.stderr


def test_registrations_per_address_are_limited(tmp_path: Path) -> None:
    """The attack run scripted 200 accounts in a minute from one address."""
    with serve(tmp_path, registrations_per_hour=3) as info:
        for i in range(3):
            assert register(info, f"bot{i}") == 0
        assert register(info, "bot3") == THROTTLED
        assert register(info, "carol", source="127.0.0.2") == 0  # another address is not held back
        assert AccountStore(info.data_dir).get("bot3") is None


def test_failed_registrations_count_against_the_address(tmp_path: Path) -> None:
    with serve(tmp_path, address_failures=3, login_backoff=60.0) as info:
        AccountStore(info.data_dir).add("taken", "taken-password")
        for _ in range(4):
            assert register(info, "taken") == 4
        assert register(info, "fresh") == THROTTLED
        assert register(info, "fresh", source="127.0.0.2") == 0


def test_invite_registration_needs_a_valid_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # the refusal is logged by amqtt's logger, which an in-process `imcli serve` (test_cli) may have quietened
    caplog.set_level(logging.INFO, logger="amqtt")
    with serve(tmp_path, "invite") as info:
        assert register(info, "carol") == 5  # no code
        assert register(info, "carol", "not-a-code") == 5
        code, _ = InviteStore(info.data_dir).create(uses=2)
        assert register(info, "carol", code) == 0
        assert register(info, "dave", code) == 0
        assert register(info, "erin", code) == 5  # used up
        expired, _ = InviteStore(info.data_dir).create(uses=1, expires_in=1, now=time.time() - 10)
        assert register(info, "erin", expired) == 5
        # a code whose account could not be made (name taken) is not used up
        once, _ = InviteStore(info.data_dir).create(uses=1)
        assert register(info, "carol", once) == 4
        assert register(info, "erin", once) == 0
        store = AccountStore(info.data_dir)
        assert [a.name for a in store.list_accounts() if a.name in {"carol", "dave", "erin"}] == [
            "carol",
            "dave",
            "erin",
        ]
        # open-registration usernames are refused too: a code is needed
        assert register(info, "frank") == 5
    assert "register:carol" in caplog.text
    assert code not in caplog.text and once not in caplog.text  # codes are never logged


def test_wrong_invite_codes_count_against_the_address(tmp_path: Path) -> None:
    with serve(tmp_path, "invite", address_failures=3, login_backoff=60.0) as info:
        code, _ = InviteStore(info.data_dir).create(uses=5)
        for i in range(4):
            assert register(info, "carol", f"guess{i}") == 5
        assert register(info, "carol", code) == THROTTLED
        assert register(info, "carol", code, source="127.0.0.2") == 0


def test_closed_registration_ignores_codes(tmp_path: Path) -> None:
    with serve(tmp_path, "closed") as info:
        code, _ = InviteStore(info.data_dir).create(uses=1)
        assert register(info, "carol", code) == 5


def test_admin_invite_and_register_with_it(tmp_path: Path) -> None:
    with serve(tmp_path, "invite") as info:
        data = ("--data-dir", str(info.data_dir))
        code_, out, err = cli(info, tmp_path, "admin", "invite", "--uses", "1", "--expires", "2d", "--json", *data)
        assert code_ == 0, err
        made = json.loads(out)
        assert made["uses"] == 1 and made["expires"] > time.time() + 86400
        invites = info.data_dir / InviteStore.FILE_NAME
        assert stat.S_IMODE(invites.stat().st_mode) == 0o600
        assert made["code"] not in invites.read_text()  # kept hashed

        code_, out, err = cli(info, tmp_path, "register", "carol", password="carol-password")
        assert code_ == 1
        assert err.strip().startswith("Error: registration is closed on this broker, or needs an invite code (code 5)")

        code_, out, err = cli(info, tmp_path, "register", "carol", "--invite", made["code"], password="carol-password")
        assert code_ == 0, err
        assert out.strip().startswith("registered carol on")

        code_, out, err = cli(info, tmp_path, "register", "dave", "--invite", made["code"], password="dave-password")
        assert code_ == 1
        assert err.strip().startswith("Error: the invite code is wrong, used up or expired"), err

        code_, out, err = cli(info, tmp_path, "admin", "invite", "--list", *data)
        assert code_ == 0 and out.strip() == "no invites", out
        code_, out, err = cli(info, tmp_path, "admin", "invite", "--expires", "soon", *data)
        assert code_ == 1 and err.startswith("Error: invalid duration 'soon'"), err


def test_register_prints_one_line_when_throttled(tmp_path: Path) -> None:
    with serve(tmp_path, registrations_per_hour=1) as info:
        assert register(info, "bot0") == 0
        code_, _, err = cli(info, tmp_path, "register", "carol", password="carol-password")
        assert code_ == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "Error: too many registrations or failed attempts from this address, or the broker is busy (code 3)"
        ), err


# ---------------------------------------------------------------- look-alike names (issue 18)


def test_an_account_name_that_looks_like_another_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``a1ice`` beside ``alice`` (TR39 skeletons): refused through a raw register CONNECT, through
    ``imcli register`` in one line, and by the account store itself (``imcli admin user add``)."""
    with serve(tmp_path) as info:
        AccountStore(info.data_dir).add("alice", "alice-password")
        with caplog.at_level(logging.INFO, logger="imcli.broker.connection_gate"):
            assert register(info, "a1ice") == 4
        assert "the name 'a1ice' looks like the account 'alice'" in caplog.text
        assert register(info, "b0b", source="127.0.0.2") == 0  # 0 and o are different letters here
        code_, _, err = cli(info, tmp_path, "register", "a1ice", password="a1ice-password")
        assert code_ == 1 and len(err.strip().splitlines()) == 1
        assert err.startswith("Error: cannot register 'a1ice': the name is taken or reserved, or looks like"), err
        store = AccountStore(info.data_dir)
        assert store.get("a1ice") is None
        with pytest.raises(NameTaken, match="the name 'a1ice' looks like the account 'alice'"):
            store.add("a1ice", "a1ice-password")
        with pytest.raises(InvalidInput, match="the name 'a11' looks like the reserved name 'all'"):
            store.add("a11", "a11-password")


def test_an_account_name_that_looks_like_a_display_name_is_refused(tmp_path: Path) -> None:
    """bob calls himself Mary (the presence worker's retained record, which the broker reads):
    nobody may then register ``mary``; and, the other way, nobody may take a display name that
    looks like an account (``AIice``, ``\\u0430lice`` with a Cyrillic a)."""
    with serve(tmp_path) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        assert services.rename(ident(info, "bob"), "Mary") == "Mary"
        assert register(info, "mary") == 4
        code_, _, err = cli(info, tmp_path, "register", "mary", password="mary-password")
        assert code_ == 1 and err.startswith("Error: cannot register 'mary': the name is taken"), err
        assert AccountStore(info.data_dir).get("mary") is None
        for look_alike in ("AIice", "\u0430lice", "a1ice"):
            with pytest.raises(NameTaken, match="is taken"):
                services.rename(ident(info, "bob"), look_alike)
        assert services.rename(ident(info, "bob"), "bob") == "bob"  # Mary is free again: so is the account name
        assert register(info, "mary", source="127.0.0.3") == 0
