"""Brokers for the tests: a real Mosquitto 2 started from deploy/mosquitto, and fixtures that
run one test module against both the embedded broker and Mosquitto.

A module opts in by binding the fixtures (``server`` and ``users`` replace conftest's)::

    broker_kind, broker_under_test, server, users = brokers.BOTH

conftest's ``raw``, ``cli_as`` and the rest then connect to whichever broker the test runs on.
On Mosquitto the presence, group and archive workers run beside it exactly as ``imcli workers
--dynsec --accounts-file <passwd>`` runs them (the same classes, in this process: a subprocess per test
would cost a second each; tests/test_mosquitto.py runs the real command). A test that cannot
pass on one broker carries ``@pytest.mark.broker_xfail("mosquitto", reason=...)``: it still runs
there, as ``xfail(strict=True)``, so it fails loudly the day the gap closes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imcli.archive.worker import ArchiveWorker
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.server import BrokerSettings
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.service import PasswordFileDirectory, ServiceWorker
from imcli.files.worker import FileLimits, FilesWorker
from imcli.groups.worker import GroupWorker
from imcli.moments.worker import MomentsWorker
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import connect_raw, password_of

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
# Debian puts the broker in /usr/sbin, which a non-root PATH may lack
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/local/sbin:/usr/sbin")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
DYNSEC_PLUGIN = next(iter(sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))), None)
WEB_STATIC = Path(__file__).resolve().parent.parent / "imcli" / "web" / "static"  # the web client's files
NOT_INSTALLED = "mosquitto not installed (.ci/run installs Debian's package)"
# created before the broker starts (cheap with mosquitto_passwd); users() adds others with a reload
ACCOUNTS = ("alice", "bob", "carol", "dave", "presence", "groups", "archive", "files")
SERVICES = ("presence", "groups", "archive", "files")
LIMIT = 262144  # message_size_limit in deploy/mosquitto/mosquitto.conf (the files worker's chunks fill it)

# reasons for broker_xfail("mosquitto", ...) shared by the modules that run on both brokers
NO_CLIENT_ID_BINDING = (
    "Mosquitto 2.0 cannot bind a client id to its account for several devices: password_file "
    "and acl_file accept any id, use_username_as_clientid allows one connection per account, "
    "dynamic-security's clientid is one exact id (deploy/mosquitto/README.md, 'Client ids')"
)
NO_NOTICES = "Mosquitto has no notices: a refused publish is acknowledged and dropped silently"
NATS_NO_NOTICES = (
    "NATS 2.9 has no notices: a publish its permissions refuse is acknowledged and dropped silently "
    "(the node logs a Publish Violation; deploy/nats/README.md)"
)
SUBSCRIBE_GRANTED = (
    "Mosquitto 2.0's acl_file grants every SUBSCRIBE ('FIXME - implement ACL subscription strings') "
    "and filters each delivery instead"
)
NO_REGISTRATION = (
    "Mosquitto has no self-registration: it refuses every register:<name> login with 5 "
    "(the operator makes accounts with mosquitto_passwd, deploy/mosquitto/README.md)"
)
NO_DEVICE_CREDENTIALS = (
    "Mosquitto's password file and dynamic security hold one password per user name: no per-device "
    "credential checked with a fast keyed hash, so imcli keeps the password (deploy/mosquitto/README.md)"
)


def mosquitto_available() -> bool:
    return MOSQUITTO is not None and MOSQUITTO_PASSWD is not None and DYNSEC_PLUGIN is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_config(
    port: int, workdir: Path, extra: str = "", aclfile: Path = DEPLOY / "aclfile", ws_port: int | None = None
) -> str:
    """deploy/mosquitto/mosquitto.conf with this port, temp paths and the current user; its WebSocket
    listener (the second ``listener``, serving the web client) on ``ws_port``, or left out."""
    replace = {
        "listener": f"listener {port} 127.0.0.1",
        "password_file": f"password_file {workdir / 'passwd'}",
        "acl_file": f"acl_file {aclfile}",
        "persistence_location": f"persistence_location {workdir}/",
        "plugin": f"plugin {DYNSEC_PLUGIN}",
        "plugin_opt_config_file": f"plugin_opt_config_file {workdir / 'imcli-dynsec.json'}",
    }
    seen: list[str] = []
    lines = []
    listeners = 0
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        listeners += key == "listener"
        if listeners == 2 and key in ("listener", "protocol", "http_dir"):  # the WebSocket listener
            if ws_port is not None:
                lines.append(
                    {"listener": f"listener {ws_port} 127.0.0.1", "http_dir": f"http_dir {WEB_STATIC}"}.get(key, line)
                )
        elif key in replace:
            seen.append(key)
            lines.append(replace[key])
        elif key != "user":
            lines.append(line)
    assert sorted(seen) == sorted(replace), f"deploy/mosquitto/mosquitto.conf changed shape: {seen}"
    # as root, mosquitto would drop to user `mosquitto`, which cannot read the temp files
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n" + extra


@dataclass
class Mosquitto:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    ws_port: int | None = None  # the WebSocket listener with the web client (running_mosquitto(ws=True))

    @property
    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port)

    @property
    def passwd(self) -> Path:
        return self.workdir / "passwd"

    def info(self) -> ServeInfo:
        return ServeInfo(self.address, "127.0.0.1", self.workdir, "none: accounts come from mosquitto_passwd")

    def has_account(self, name: str) -> bool:
        return any(line.split(":", 1)[0] == name for line in self.passwd.read_text().splitlines())

    def add_account(self, name: str) -> None:
        """mosquitto_passwd, then SIGHUP; returns once the new account can log in."""
        _passwd(self.passwd, name, create=False)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = connect_raw("127.0.0.1", self.port, name, f"{name}:probe")
            probe.close()
            if probe.rc == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not take account {name} within 10s:\n{self.log}")

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"mosquitto did not listen on {self.port} within {timeout}s:\n{self.log}")

    def restart(self) -> None:
        """Stop (SIGTERM: Mosquitto saves retained messages and persistent sessions) and start
        again on the same port and files."""
        assert MOSQUITTO is not None, NOT_INSTALLED
        self.stop()
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.wait_listening()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _passwd(path: Path, name: str, *, create: bool) -> None:
    assert MOSQUITTO_PASSWD is not None
    flags = ["-c"] if create else []
    subprocess.run(
        [MOSQUITTO_PASSWD, *flags, "-b", str(path), name, password_of(name)], check=True, capture_output=True
    )


@contextlib.contextmanager
def running_mosquitto(
    workdir: Path,
    accounts: tuple[str, ...] = ACCOUNTS,
    extra: str = "",
    aclfile: Path = DEPLOY / "aclfile",
    ws: bool = False,
) -> Iterator[Mosquitto]:
    """A mosquitto from deploy/mosquitto on a free loopback port, with ``accounts`` (password_of)."""
    assert MOSQUITTO is not None, NOT_INSTALLED
    workdir.mkdir(parents=True)
    for i, name in enumerate(accounts):
        _passwd(workdir / "passwd", name, create=i == 0)
    shutil.copy(DEPLOY / "imcli-dynsec.json", workdir / "imcli-dynsec.json")
    conf = workdir / "mosquitto.conf"
    for attempt in range(3):
        # Mosquitto cannot listen on port 0 and say which port it got: a port free a moment ago
        # may be taken by then (another xdist worker's client), so a refused bind tries another
        port, ws_port = free_port(), free_port() if ws else None
        conf.write_text(mosquitto_config(port, workdir, extra, aclfile, ws_port))
        with (workdir / "mosquitto.log").open("wb") as log:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        broker = Mosquitto(port, workdir, proc, ws_port)
        try:
            broker.wait_listening()
            break
        except AssertionError:
            broker.stop()
            if attempt == 2 or "Address already in use" not in broker.log:
                raise
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def running_workers(
    broker: Mosquitto, archive: bool = True, files: bool = True, limit: int = LIMIT
) -> Iterator[list[ServiceWorker]]:
    """What ``imcli workers --dynsec --accounts-file <passwd> --archive-dir <workdir>/archive
    --files-dir <workdir> --max-payload 262144`` runs, in this process (``archive=False``:
    ``--no-archive``; ``files=False``: ``--no-files``; ``limit``: another ``--max-payload``, for a
    broker started with that ``message_size_limit``)."""
    directory = PasswordFileDirectory(broker.passwd)
    creds = {name: Credentials(name, password_of(name)) for name in SERVICES}
    with contextlib.ExitStack() as stack:
        started: list[ServiceWorker] = [
            stack.enter_context(
                PresenceWorker(broker.address, creds["presence"], directory, device="test", max_payload=limit)
            ),
            stack.enter_context(
                GroupWorker(
                    broker.address,
                    creds["groups"],
                    directory,
                    device="test",
                    dynsec=True,
                    dm_readers=("archive",),
                    max_payload=limit,
                )
            ),
        ]
        if archive:
            started.append(stack.enter_context(archive_worker(broker)))
        if files:
            started.append(
                # --max-payload 262144, as deploy/systemd/imcli-workers.service gives it
                stack.enter_context(
                    FilesWorker(
                        broker.address,
                        creds["files"],
                        broker.workdir,
                        device="test",
                        limits=FileLimits(max_payload=limit),
                    )
                )
            )
        # --moments (the default): the group worker's account, a device of its own
        moments = MomentsWorker(broker.address, creds["groups"], broker.workdir, max_payload=limit)
        started.append(stack.enter_context(moments))
        yield started


def archive_worker(broker: Mosquitto) -> ArchiveWorker:
    """The archive worker of ``running_workers`` (same account, device and directory), not yet started."""
    creds = Credentials("archive", password_of("archive"))
    return ArchiveWorker(broker.address, creds, broker.workdir / "archive", device="test", max_payload=LIMIT)


# ---------------------------------------------------------------- both brokers


@dataclass
class BrokerUnderTest:
    kind: str  # "amqtt" (the embedded default), "mosquitto" or "nats" (tests/natsbroker.py)
    info: ServeInfo
    add_users: Callable[..., None]
    # a service account that reads every topic (password_of(name)): where it sees nothing, nobody did
    add_reader: Callable[[], str]


def _broker_kind(kinds: list[str]) -> Callable[[pytest.FixtureRequest], str]:
    @pytest.fixture(params=kinds, name="broker_kind")
    def broker_kind(request: pytest.FixtureRequest) -> str:
        kind: str = request.param
        if kind == "mosquitto" and not mosquitto_available():
            pytest.skip(NOT_INSTALLED)
        for mark in request.node.iter_markers("broker_xfail"):
            if kind in mark.args:
                request.applymarker(pytest.mark.xfail(reason=f"{kind}: {mark.kwargs['reason']}", strict=True))
        return kind

    return broker_kind


broker_kind = _broker_kind(["amqtt", "mosquitto"])


@pytest.fixture
def broker_under_test(broker_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerUnderTest]:
    if broker_kind == "amqtt":
        with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0)) as info:
            store = AccountStore(info.data_dir)

            def add_amqtt(*names: str) -> None:
                for name in names:
                    store.add(name, password_of(name))

            def add_auditor() -> str:
                if store.get("auditor") is None:
                    store.add("auditor", password_of("auditor"), Role.SERVICE)
                return "auditor"

            yield BrokerUnderTest(broker_kind, info, add_amqtt, add_auditor)
        return
    if broker_kind == "nats":
        from tests.natsbroker import SharedCluster, add_accounts  # natscluster imports this module

        shared: SharedCluster = request.getfixturevalue("nats_shared")
        # JetStream makes a consumer for every new QoS 1 subscription and, on this loaded two-core
        # machine, takes seconds to: CI saw a login's device request go unanswered within the default
        # 5 s, and a kick (three reloads, each waited for on every node) within 15 s. Speed is the
        # benchmarks' to measure; here a worker's answer may take 30 s. An operator of a loaded
        # cluster raises it too (deploy/nats/README.md).
        request.getfixturevalue("monkeypatch").setenv("IMCLI_REQUEST_TIMEOUT", "30")
        with shared.for_test(tmp_path / "nats") as cluster_info:
            # the service accounts read every topic (natsauth.SERVICE_READ): "presence" as on Mosquitto
            yield BrokerUnderTest(broker_kind, cluster_info, add_accounts(shared.cluster), lambda: "presence")
        return
    with running_mosquitto(tmp_path / "mosquitto") as mosquitto, running_workers(mosquitto):

        def add_mosquitto(*names: str) -> None:
            for name in names:
                if not mosquitto.has_account(name):
                    mosquitto.add_account(name)

        # deploy/mosquitto/aclfile lets the service accounts read everything; the workers use
        # "presence" under other client ids, so a test's own connection does not take theirs over
        yield BrokerUnderTest(broker_kind, mosquitto.info(), add_mosquitto, lambda: "presence")


@pytest.fixture
def server(broker_under_test: BrokerUnderTest) -> ServeInfo:
    """conftest's ``server``, on the embedded broker and on Mosquitto (with its workers)."""
    return broker_under_test.info


@pytest.fixture
def users(broker_under_test: BrokerUnderTest) -> Callable[..., None]:
    """``users("alice", "bob")``: accounts with password ``password_of(name)``, on either broker."""
    return broker_under_test.add_users


# A module runs on both brokers with:  broker_kind, broker_under_test, server, users = brokers.BOTH
BOTH = (broker_kind, broker_under_test, server, users)
# ... and also on a three-node NATS cluster (tests/natsbroker.py: one cluster per session, alice on
# node 1, bob on node 3) with:  broker_kind, broker_under_test, server, users = brokers.ALL
ALL = (_broker_kind(["amqtt", "mosquitto", "nats"]), broker_under_test, server, users)

# In such a module, ``@brokers.EMBEDDED_ONLY`` runs one test on the embedded broker alone (it is
# parametrised directly, which overrides the fixture's params): for a test about ``imcli serve``
# or the embedded broker itself, or one that never reaches a broker. Say why in a comment above it.
EMBEDDED_ONLY = pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)


@contextlib.contextmanager
def loop_held(info: ServeInfo) -> Iterator[None]:
    """The embedded broker's loop held in one callback while the block runs: what the block writes
    to the broker's sockets meanwhile, its next look finds readable at once, in the order written
    (the tests of the reader's and the teardown gate's ordering: tests/test_deliver_at_once.py,
    tests/test_teardown.py)."""
    assert info.broker is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    info.broker._loop.call_soon_threadsafe(hold)  # amqtt private: the broker's loop
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()


@contextlib.contextmanager
def bare_broker(data_dir: Path, *accounts: str, loop: str | None = None, ws: bool = False) -> Iterator[ServeInfo]:
    """The embedded broker alone (no workers), its publish rate unbounded, with ``accounts``
    (passwords ``password_of``) and, with ``ws``, a WebSocket listener: the reader's, the journal's
    and the event loops' tests."""
    from imcli.broker.limits import Limits

    limits = Limits(publish_rate=1e6, publish_burst=10**6)
    settings = BrokerSettings(data_dir=data_dir, port=0, limits=limits, ws_port=0 if ws else None)
    with BackgroundServer(settings, workers=False, loop=loop) as info:
        store = AccountStore(info.data_dir)
        for name in accounts:
            store.add(name, password_of(name))
        yield info
