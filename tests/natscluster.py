"""A real three-node NATS cluster for the tests, from deploy/nats/nats.conf, on loopback ports.

A JetStream cluster needs its routes in the config from the start, so the three route ports
are chosen first (bind port 0, release; a start that finds one taken tries other ports); the
MQTT and the other ports are ``-1`` (nats-server picks a free one and logs it). Then each
node's config is rewritten with the MQTT port it got, so a node killed with ``kill -9`` comes
back on the same ports and rejoins. Accounts come from a password file (``name:password``) rendered into the
``IM`` account by ``imcli.groups.natsauth`` (as the group worker does).

The nodes' logs go with the cluster's folder. To trace a fault afterwards (a reload that lost a
subscription's interest: ``Unknown account ... for remote subject``, issue 20), set
``IMCLI_NATS_KEEP_LOGS=<folder>``: each cluster's node logs and users file are copied there as it stops
(``keep_logs``; the benchmarks' ``--keep-logs`` does the same).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imcli.core.mqtt import BrokerAddress
from imcli.core.wire import Topics
from imcli.groups.natsauth import NatsAuth, NatsPermissions, read_passwords
from tests.brokers import free_port
from tests.rawmqtt import connect_raw, password_of

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "nats"
NATS_SERVER = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/local/sbin:/usr/sbin")
NOT_INSTALLED = "nats-server not installed (.ci/run installs Debian's package)"
ACCOUNTS = ("alice", "bob", "carol", "dave", "presence", "groups", "archive", "files")
START_TIMEOUT = 60.0  # a fresh JetStream cluster elects its leaders and makes the MQTT streams: seconds
KEEP_LOGS_ENV = "IMCLI_NATS_KEEP_LOGS"  # a folder: every cluster's node logs are copied there when it stops


def nats_available() -> bool:
    return NATS_SERVER is not None


def node_config(
    name: str,
    workdir: Path,
    users: Path,
    *,
    mqtt: int = -1,
    cluster: int = -1,
    routes: list[int] | None = None,
    max_payload: int | None = None,
    consumer_replicas: int | None = None,
) -> str:
    """deploy/nats/nats.conf for one loopback node: its name, ports, files and routes.
    ``consumer_replicas`` turns on the line nats.conf leaves commented (the benchmark's ``nats-r1``)."""
    top = {
        "server_name": f"server_name: {name}",
        "listen": "listen: 127.0.0.1:-1",
        "http": "http: 127.0.0.1:-1",
        "pid_file": f"pid_file: {workdir / 'nats.pid'}",
        "include": f"include {os.path.relpath(users, workdir)}",
        "max_payload": f"max_payload: {max_payload}" if max_payload else "",
    }
    inner = {
        ("cluster", "listen"): f"listen: 127.0.0.1:{cluster}",
        ("jetstream", "store_dir"): f"store_dir: {workdir / 'jetstream'}",
        ("mqtt", "listen"): f"listen: 127.0.0.1:{mqtt}",
    }
    route_lines = "".join(f"    nats-route://127.0.0.1:{p}\n" for p in routes or [])
    out, seen, block, skipping = [], [], "", False
    for line in (DEPLOY / "nats.conf").read_text().splitlines():
        words = line.split()
        key = words[0].rstrip(":") if words and not words[0].startswith("#") else ""
        if skipping:
            skipping = not line.strip().startswith("]")
            continue
        if block == "cluster" and key == "routes":
            out.append(f"  routes: [\n{route_lines}  ]")
            seen.append("routes")
            skipping = True
        elif block == "mqtt" and consumer_replicas and line.strip().startswith("# consumer_replicas:"):
            out.append(f"  consumer_replicas: {consumer_replicas}")
            seen.append("consumer_replicas")
        elif block and (block, key) in inner:
            out.append("  " + inner[block, key])
            seen.append(f"{block}.{key}")
        elif not block and key in top:
            out.append(top[key] or line)
            seen.append(key)
        else:
            out.append(line)
        if line.rstrip().endswith("{") and not block:
            block = key
        elif line.strip() == "}":
            block = ""
    expected = len(top) + len(inner) + 1 + (1 if consumer_replicas else 0)
    assert len(seen) == expected, f"deploy/nats/nats.conf changed shape: {seen}"
    return "\n".join(out) + "\n"


@dataclass
class NatsNode:
    name: str
    workdir: Path
    users: Path
    mqtt: int = -1
    cluster: int = -1
    proc: subprocess.Popen[str] | None = None
    max_payload: int | None = None  # the benchmark lifts it, as it lifts Mosquitto's message_size_limit
    http: int = -1  # the monitoring port (loopback), for /connz
    client: int = -1  # the NATS protocol's port (loopback: `listen` in nats.conf), which no account may use
    consumer_replicas: int | None = None  # nats.conf's commented capacity line, turned on (benchmark only)

    @property
    def reloads(self) -> int:
        """How many configuration reloads this node has applied (its log says each)."""
        return self.log.count("Reloaded server configuration")

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pidfile(self) -> Path:
        return self.workdir / "nats.pid"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.mqtt)

    def start(self, routes: list[int]) -> None:
        assert NATS_SERVER is not None, NOT_INSTALLED
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(
            node_config(
                self.name,
                self.workdir,
                self.users,
                mqtt=self.mqtt,
                cluster=self.cluster,
                routes=routes,
                max_payload=self.max_payload,
                consumer_replicas=self.consumer_replicas,
            )
        )
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, text=True
            )
        deadline = time.monotonic() + 60  # a loaded machine (CI, -n auto) can take its time
        while time.monotonic() < deadline:
            text = self.log[offset:]
            mqtt = re.search(r"Listening for MQTT clients on mqtt://127\.0\.0\.1:(\d+)", text)
            route = re.search(r"Listening for route connections on 127\.0\.0\.1:(\d+)", text)
            http = re.search(r"Starting http monitor on 127\.0\.0\.1:(\d+)", text)
            client = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", text)
            if mqtt and route and http and client:
                self.mqtt, self.cluster, self.http = int(mqtt.group(1)), int(route.group(1)), int(http.group(1))
                self.client = int(client.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"nats node {self.name} did not start:\n{self.log[offset:]}")

    def kill(self) -> None:
        """kill -9: no goodbye to the cluster or the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def reload(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)


@dataclass
class NatsCluster:
    workdir: Path
    nodes: list[NatsNode]
    passwd: Path
    users: Path
    auth: NatsAuth | None = None  # the group worker's, once workers run: it then writes ``users``
    permissions: NatsPermissions = field(default_factory=lambda: NatsPermissions(Topics()))

    @property
    def addresses(self) -> list[BrokerAddress]:
        return [n.address for n in self.nodes]

    @property
    def host_list(self) -> str:
        """What ``--host`` takes: every node, in order."""
        return ",".join(f"127.0.0.1:{n.mqtt}" for n in self.nodes)

    def write_users(self) -> None:
        """Render the password file into the users file and reload every node (no worker running)."""
        if self.auth is not None:
            self.auth.reload_passwords()
            return
        self.users.write_text(self.permissions.render(read_passwords(self.passwd)))
        for node in self.nodes:
            node.reload()

    def has_account(self, name: str) -> bool:
        return name in read_passwords(self.passwd)

    def add_account(self, name: str, password: str | None = None) -> None:
        """A new line in the password file, rendered and reloaded; returns once node 1 lets it in."""
        with self.passwd.open("a") as f:
            f.write(f"{name}:{password or password_of(name)}\n")
        self.write_users()
        for node in self.nodes:
            wait_login(node, name, password or password_of(name))

    def restart(self, node: NatsNode) -> None:
        """Start a killed node again on its ports, routing to the others; returns once it serves MQTT."""
        node.start([n.cluster for n in self.nodes if n is not node])
        wait_login(node, "presence", password_of("presence"))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def keep_logs(nodes: list[NatsNode], dest: Path, label: str, also: tuple[Path, ...] = ()) -> Path:
    """Copy each node's log (and the files ``also``: the users file, a workers' log) to a new folder
    ``dest/<label>-<time>-<pid>``; that folder."""
    folder = dest / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        if node.log_path.exists():
            shutil.copyfile(node.log_path, folder / f"{node.name}.log")
    for path in also:
        if path.exists():
            shutil.copyfile(path, folder / path.name)
    return folder


def wait_login(node: NatsNode, name: str, password: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = connect_raw("127.0.0.1", node.mqtt, name, f"{name}:probe-{node.name}", password)
        probe.close()
        if probe.rc == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{node.name} did not let {name} in within {timeout:g}s:\n{node.log[-3000:]}")


@contextlib.contextmanager
def running_cluster(workdir: Path, accounts: tuple[str, ...] = ACCOUNTS) -> Iterator[NatsCluster]:
    """Three nodes from deploy/nats/nats.conf on free loopback ports, with ``accounts`` (password_of)."""
    assert NATS_SERVER is not None, NOT_INSTALLED
    workdir.mkdir(parents=True)
    passwd, users = workdir / "passwd", workdir / "imcli-users.conf"
    passwd.write_text("".join(f"{name}:{password_of(name)}\n" for name in accounts))
    permissions = NatsPermissions(Topics())
    users.write_text(permissions.render(read_passwords(passwd)))
    nodes = [NatsNode(f"nats-{i}", workdir / f"nats-{i}", users) for i in (1, 2, 3)]
    cluster = NatsCluster(workdir, nodes, passwd, users, permissions=permissions)
    try:
        for attempt in range(3):
            for node in nodes:
                node.cluster = free_port()
            try:
                for node in nodes:
                    node.start([n.cluster for n in nodes if n is not node])
                break
            except AssertionError:
                cluster.stop()
                if attempt == 2 or not any("address already in use" in n.log for n in nodes if n.log_path.exists()):
                    raise
        for node in nodes:  # the config each node restarts with: its own ports, routes to all
            (node.workdir / "nats.conf").write_text(
                node_config(node.name, node.workdir, users, mqtt=node.mqtt, cluster=node.cluster,
                            routes=[n.cluster for n in nodes if n is not node])
            )  # fmt: skip
        for node in nodes:
            wait_login(node, "presence", password_of("presence"))
        yield cluster
    finally:
        cluster.stop()
        if keep := os.environ.get(KEEP_LOGS_ENV):
            keep_logs(nodes, Path(keep), workdir.name, (users,))
