"""Failed logins are throttled per (account, address), per account and per address, with a
doubling delay, and password checks are bounded (issue 15, missing limits: logins). Tried
with hand-made CONNECTs on raw sockets from several loopback addresses (127.0.0.x)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcli.broker.accounts import Account, AccountStore, Role
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.broker.throttle import Busy, FailureTable, LoginThrottle, PasswordChecks, address_key, backoff
from imcli.core.mqtt import Credentials, MqttClient
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import Cli
from tests.rawmqtt import connect_packet, password_of, read_packets, wait_until

THROTTLED = 3  # CONNACK "server unavailable"


def connack(server: ServeInfo, username: str, password: str, client_id: str = "", source: str = "127.0.0.1") -> int:
    """The CONNACK code a hand-made CONNECT from ``source`` gets."""
    cid = client_id or f"{username}:t{threading.get_ident() % 100000}"
    where = (server.address.host, server.address.port)
    with socket.create_connection(where, timeout=20, source_address=(source, 0)) as sock:
        sock.sendall(connect_packet(cid.encode(), username.encode(), password.encode()))
        got, closed = read_packets(sock, bool)
    assert got and got[0][0] == 0x20, f"no CONNACK (closed: {closed})"
    return got[0][1][1]


def start(tmp_path: Path, limits: Limits, *names: str) -> BackgroundServer:
    background = BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, limits=limits))
    store = AccountStore(tmp_path / "data")
    for name in names:
        store.add(name, password_of(name))
    return background


SLOW = Limits(login_backoff=60.0)  # the defaults, with a first wait long enough for a loaded test machine


@pytest.fixture
def defaults(tmp_path: Path) -> Iterator[ServeInfo]:
    with start(tmp_path, SLOW, "alice", "bob") as info:
        yield info


def test_guessing_one_account_from_one_address_is_throttled(
    defaults: ServeInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack run got the right password accepted right after 200 wrong ones."""
    caplog.set_level(logging.INFO, logger="imcli.broker")
    for i in range(6):  # 5 free, then a wait (by default 1 s, doubling with each further failure)
        assert connack(defaults, "alice", f"guess-number-{i}") == 4
    # refused at once, the right password unchecked (so the refusal tells nothing about it)
    assert connack(defaults, "alice", password_of("alice")) == THROTTLED
    assert connack(defaults, "alice", "guess-number-99") == THROTTLED
    # the guesser's address is not alice's: she logs in from elsewhere, and bob from the same address
    assert connack(defaults, "alice", password_of("alice"), source="127.0.0.2") == 0
    assert connack(defaults, "bob", password_of("bob")) == 0
    # failures are logged with the name and address, never the password
    assert "login refused for 'alice' from 127.0.0.1" in caplog.text
    assert "guess-number" not in caplog.text
    assert password_of("alice") not in caplog.text


def test_the_wait_passes_and_a_success_clears_it(tmp_path: Path) -> None:
    limits = Limits(login_failures=2, login_backoff=0.3, login_backoff_cap=0.3)
    with start(tmp_path, limits, "alice") as info:
        for _ in range(3):
            assert connack(info, "alice", "wrong-password") == 4
        assert connack(info, "alice", password_of("alice")) == THROTTLED
        assert wait_until(lambda: connack(info, "alice", password_of("alice")) == 0, 20)
        # a success forgets the pair's failures: two more are free again
        for _ in range(2):
            assert connack(info, "alice", "wrong-password") == 4
        assert connack(info, "alice", password_of("alice")) == 0


def test_guessing_from_many_addresses_does_not_lock_out_a_known_address(tmp_path: Path) -> None:
    """Failures spread over addresses lock the account for addresses it never logged in from;
    the addresses the user logged in from before keep working (so an attacker cannot lock them out)."""
    limits = Limits(login_failures=100, address_failures=100, account_failures=4, login_backoff=60.0)
    with start(tmp_path, limits, "alice") as info:
        assert connack(info, "alice", password_of("alice"), source="127.0.0.2") == 0  # her usual device
        for i in range(3, 8):  # five attackers, one guess each
            assert connack(info, "alice", "wrong-password", source=f"127.0.0.{i}") == 4
        assert connack(info, "alice", password_of("alice"), source="127.0.0.20") == THROTTLED  # a new address waits
        assert connack(info, "alice", password_of("alice"), source="127.0.0.2") == 0  # her usual one does not


def test_password_spraying_from_one_address_is_throttled(tmp_path: Path) -> None:
    limits = Limits(login_failures=100, address_failures=5, login_backoff=60.0)
    with start(tmp_path, limits, "alice", "bob") as info:
        for i in range(6):  # a few guesses at many names, known or not
            assert connack(info, f"user{i}", "password123") == 4
        assert connack(info, "bob", password_of("bob")) == THROTTLED  # bob never logged in from there
        assert connack(info, "bob", password_of("bob"), source="127.0.0.2") == 0


def test_password_checks_at_once_are_bounded(tmp_path: Path) -> None:
    """A flood of logins that each need argon2 waits in a bounded queue; past it they are
    refused at once (the attack run: 16 threads slowed every login tenfold, +300 MB)."""
    limits = Limits(password_checks=1, password_queue=2, login_failures=100, address_failures=100)
    with start(tmp_path, limits, "alice", "bob") as info:
        assert info.broker is not None
        gate = info.broker.admission.gate
        release, entered = threading.Event(), threading.Event()
        verify = gate.store.verify

        def slow_verify(name: str, password: str) -> Account | None:
            entered.set()
            release.wait(30)
            return verify(name, password)

        gate.store.verify = slow_verify  # type: ignore[method-assign]
        results: dict[int, int] = {}

        def attempt(i: int) -> None:
            results[i] = connack(info, "alice", f"wrong-{i}", client_id=f"alice:w{i}", source=f"127.0.0.{10 + i}")

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(3)]
        threads[0].start()
        assert entered.wait(10)
        for t in threads[1:]:
            t.start()
        assert wait_until(lambda: gate.checks.waiting == 2, 10)
        # one checking, two waiting: the next is refused at once, and so is a right password
        assert connack(info, "bob", "wrong-password", source="127.0.0.30") == THROTTLED
        assert connack(info, "bob", password_of("bob"), source="127.0.0.31") == THROTTLED
        release.set()
        for t in threads:
            t.join(30)
        assert results == {0: 4, 1: 4, 2: 4}
        gate.store.verify = verify  # type: ignore[method-assign]
        assert connack(info, "bob", password_of("bob"), source="127.0.0.31") == 0


def test_workers_service_accounts_are_not_throttled_once_logged_in(tmp_path: Path) -> None:
    """A lock would let anyone on their address stop the workers: a service account's password,
    once verified, is recalled without the throttle. A guess at it is throttled like any other
    (tests/test_attacks_broker.py): it costs a password check all the same."""
    with start(tmp_path, Limits(login_failures=1, address_failures=1), "alice") as info:
        AccountStore(info.data_dir).add("robot", password_of("robot"), Role.SERVICE, allow_reserved=True)
        assert connack(info, "robot", password_of("robot")) == 0
        codes = [connack(info, "robot", "wrong-password") for _ in range(5)]
        assert codes[0] == 4 and 3 in codes
        assert connack(info, "robot", password_of("robot")) == 0


def test_login_prints_one_line_when_throttled(defaults: ServeInfo, tmp_path: Path) -> None:
    for i in range(6):
        assert connack(defaults, "alice", f"guess-{i}") == 4
    where = ("--host", defaults.address.host, "--port", str(defaults.address.port), "--password-stdin")
    result = Cli(CliRunner(), defaults, tmp_path / "config")(
        "login", "alice", *where, input=password_of("alice") + "\n"
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "Error: too many failed logins for this account or from this address, or the broker is busy (code 3)"
    ), lines


# ---------------------------------------------------------------- the pieces, alone


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n, 2, 1.0, 10.0) for n in range(1, 8)] == [0, 0, 1, 2, 4, 8, 10]
    assert backoff(10_000, 2, 1.0, 900.0) == 900.0


def test_throttle_tables_are_bounded() -> None:
    table = FailureTable[str](free=0, first=1.0, cap=1.0, forget=60.0, size=100)
    for i in range(10_000):
        table.failed(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(table) == 100
    throttle = LoginThrottle(Limits(throttle_entries=50))
    for i in range(1000):
        throttle.failed(f"user{i}", f"10.1.{i // 256}.{i % 256}", now=0.0)
        throttle.succeeded(f"user{i}", "10.9.9.9")
    assert max(len(throttle.pairs), len(throttle.accounts), len(throttle.addresses), len(throttle.known)) <= 50


def test_failures_are_forgotten_after_a_quiet_while() -> None:
    table = FailureTable[str](free=1, first=5.0, cap=5.0, forget=60.0, size=10)
    table.failed("a", 0.0)
    assert table.failed("a", 1.0) == 5.0
    assert table.wait("a", 2.0) == 4.0
    assert table.wait("a", 100.0) == 0.0
    assert table.failed("a", 100.0) == 0.0  # free again


def test_ipv6_counts_by_its_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") == "192.0.2.7"


def test_password_checks_refuse_past_the_queue() -> None:
    async def main() -> None:
        checks = PasswordChecks(concurrent=1, queued=1)
        gate = threading.Event()
        first = asyncio.ensure_future(checks.run(lambda: gate.wait(10)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(checks.run(lambda: True))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await checks.run(lambda: True)
        gate.set()
        assert await first and await second

    asyncio.run(main())


def test_a_reconnecting_client_waits_out_code_3(tmp_path: Path) -> None:
    """After a broker restart a whole team reconnects at once, and the password checks' queue
    (or a throttle) answers some with CONNACK 3: ``listen`` and ``chat`` must try again, not give up."""
    with start(tmp_path, Limits(), "alice") as info:
        assert info.broker is not None
        gate = info.broker.admission.gate
        original, refused = gate.check, []

        async def busy(connect: object) -> int:
            refused.append(connect)
            return THROTTLED

        states: list[bool] = []
        credentials = Credentials("alice", password_of("alice"))
        with MqttClient(info.address, credentials, "alice:listen", reconnect=True, on_connection=states.append) as c:
            gate.check = busy  # type: ignore[method-assign]
            sock = c._paho.socket() if c._paho is not None else None
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)  # the connection drops
            assert wait_until(lambda: len(refused) >= 2, 30), "no reconnect attempt was refused"
            assert c.fatal is None
            gate.check = original  # type: ignore[method-assign]
            assert wait_until(lambda: states[-1:] == [True], 30), states
            assert c.fatal is None
