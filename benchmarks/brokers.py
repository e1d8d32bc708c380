"""The three brokers under test, each started by the benchmark on a free loopback port.

- ``stock``: amqtt 0.12.1 as shipped (its default plugins, anonymous access), no workers;
- ``embedded``: ``imcli serve`` (our plugins; the presence, group, archive and files workers in its child process);
- ``mosquitto``: Mosquitto 2 with deploy/mosquitto's config, aclfile and dynamic-security
  plugin, plus ``imcli workers --dynsec`` (presence, groups, archive, files) as its own process, as
  deploy/mosquitto/README.md sets it up; skipped when mosquitto is not installed;
- ``nats``: three nats-server nodes from deploy/nats, plus ``imcli workers --nats-users`` on all
  three; clients spread over the nodes; skipped when nats-server is not installed.

Accounts ``u00000…`` (and the few helpers the scenarios use) exist on every broker with
one password. The embedded broker's accounts use cheap argon2 parameters (t=1, m=1 MiB)
so that the figures measure messaging, not password hashing: a real first login costs a
full argon2 verification (docs/PERFORMANCE.md); later logins hit the credential cache.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ``python -m benchmarks --keep-logs DIR``: a broker copies its logs there as it stops (the NATS nodes'
# logs, the users file and the workers' log), so a shortfall can be traced afterwards (issue 20)
KEEP_LOGS: Path | None = None
DEPLOY = REPO / "deploy" / "mosquitto"
PASSWORD = "bench-password"
HELPERS = ("watch", "pinga", "pingb", "pingc", "pingd", "pinge", "pongr", "colds", "probe", "flood")
SERVICES = ("presence", "groups", "archive", "files")
# files a single-process broker is left for what it opens during a run (archive, logs, retained store) and
# the scenario's own connections (watcher, stall probe, probes): the crowd takes what is left
FD_RESERVE = 64
# imcli serve logs every collection that stops it this long or longer (imcli/broker/gcpause.py)
GC_LOG_MS = 5
GC_PAUSE = re.compile(r"garbage collection paused the broker ([\d.]+) ms \(generation (\d), CPU ([\d.]+) ms")

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/local/sbin:/usr/sbin")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
DYNSEC_PLUGIN = next(iter(sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))), None)


def user_names(count: int) -> list[str]:
    return [f"u{i:05d}" for i in range(count)] + list(HELPERS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far: a figure the machine's noise moves far
    less than wall-clock rates, since a process waiting for a core uses none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {timeout:g}s")


def _read_port(proc: subprocess.Popen[str], pattern: str, timeout: float = 60.0) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return int(match.group(1))
    proc.kill()
    raise RuntimeError("the broker did not say where it listens")


@dataclass
class Broker:
    """One running broker; ``pid`` is the broker process (its RSS is what we report)."""

    name: str
    port: int
    procs: list[subprocess.Popen[str]]
    workdir: tempfile.TemporaryDirectory[str]
    has_presence: bool
    note: str = ""
    extra_pids: dict[str, int] = field(default_factory=dict)
    # user -> password for crowds that sign in as imcli does after `imcli login`: a device credential (issue 17)
    passwords_file: Path | None = None
    # stops the broker process (procs[0]) and starts it again on the same port with the same data
    relaunch: Callable[[], subprocess.Popen[str]] | None = None
    ports: list[int] = field(default_factory=list)  # a cluster's nodes (MQTT ports); ``port`` is the first
    # logins (and first SUBSCRIBEs) each crowd process has going at once
    crowd_concurrency: int = 100
    log_path: Path | None = None  # the broker's own log (imcli serve: its collector's pauses, gcpause.py)
    trace_path: Path | None = None  # its loop's slow callbacks and rounds in CPU time (benchmarks/stalltrace.py)
    # copies the broker's logs into a new folder under the given one, and says which (``KEEP_LOGS``)
    keep_logs: Callable[[Path], Path] | None = None
    monitors: list[int] = field(default_factory=list)  # a NATS cluster's nodes' monitoring ports (loopback)
    node_logs: list[Path] = field(default_factory=list)  # a NATS cluster's nodes' logs, in the order of ``ports``

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path is not None and self.log_path.exists() else 0

    def collector_pauses(self, since: int = 0) -> list[tuple[float, int, float]]:
        """(ms, generation, CPU ms) of every pause ``imcli serve`` logged after byte ``since`` of its log."""
        if self.log_path is None or not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [(float(ms), int(gen), float(cpu)) for ms, gen, cpu in GC_PAUSE.findall(text)]

    def port_of(self, i: int) -> int:
        """The node the ``i``-th client uses: a cluster's nodes in turn, else the one port."""
        return self.ports[i % len(self.ports)] if self.ports else self.port

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def connection_room(self) -> tuple[int, int] | None:
        """(open-file limit, connections it can still accept) for a single-process broker: its soft
        limit less the files it holds now and ``FD_RESERVE`` for what it opens later and the helpers'
        connections; None for a cluster (each node holds a share) or when /proc does not say."""
        if self.ports:
            return None
        try:
            limits = Path(f"/proc/{self.pid}/limits").read_text()
            held = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None
        soft = next((line.split()[3] for line in limits.splitlines() if line.startswith("Max open files")), "")
        return (int(soft), int(soft) - held - FD_RESERVE) if soft.isdigit() else None

    def client_id(self, user: str, device: str) -> str:
        return f"{user}:{device}"

    def restart(self) -> None:
        """Stop the broker's process (a clean stop) and start it again on the same port and data;
        what runs beside it (workers) stays and reconnects, as after an operator's restart."""
        if self.relaunch is None:
            raise RuntimeError(f"{self.name} cannot be restarted by the benchmark")
        old = self.procs[0]
        old.terminate()
        try:
            old.wait(30)
        except subprocess.TimeoutExpired:
            old.kill()
            old.wait(5)
        if old.stdout is not None:
            old.stdout.close()
        self.procs[0] = self.relaunch()
        if self.name == "embedded":
            for child in _children(self.pid):
                self.extra_pids["workers"] = child

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stdin is not None:
                proc.stdin.close()
        if KEEP_LOGS is not None and self.keep_logs is not None:
            print(f"  {self.name}: logs kept in {self.keep_logs(KEEP_LOGS)}", flush=True)
        self.workdir.cleanup()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _python(
    *args: str, stdout: int, stderr: int, stdin: int | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], text=True, cwd=REPO, stdin=stdin, stdout=stdout, stderr=stderr, env=env
    )


def start_stock() -> Broker:
    workdir = tempfile.TemporaryDirectory(prefix="bench-stock-")
    proc = _python("-m", "benchmarks.stock_amqtt", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    port = _read_port(proc, r"listening on (\d+)")
    return Broker("stock", port, [proc], workdir, has_presence=False, note="amqtt 0.12.1, default plugins, anonymous")


def start_embedded(users: int, *, production: bool = False, trace_stalls: bool = False) -> Broker:
    """``production``: argon2-cffi's default parameters and ``imcli serve``'s default login queue,
    as deployed (the reconnect storm); otherwise cheap hashes and a queue that holds every crowd.
    ``trace_stalls``: the broker's loop traced in CPU time (benchmarks/stalltrace.py) into ``trace_path``."""
    from argon2 import PasswordHasher

    from imcli.broker.accounts import AccountStore

    workdir = tempfile.TemporaryDirectory(prefix="bench-embedded-")
    data = Path(workdir.name) / "data"
    hasher = PasswordHasher() if production else PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    store = AccountStore(data, hasher)
    # one hash for every account: the same password, and hashing 10,000 would take a minute
    digest = store._hasher.hash(PASSWORD)
    created = time.time()
    doc = {
        "version": 1,
        "accounts": {name: {"role": "user", "created": created, "hash": digest} for name in user_names(users)},
    }
    (data / AccountStore.FILE_NAME).write_text(json.dumps(doc))
    os.chmod(data / AccountStore.FILE_NAME, 0o600)
    passwords_file = None
    if production:  # users sign in as imcli does after `imcli login`: with a device credential (issue 17)
        from imcli.broker.devices import DeviceStore

        names = user_names(users)
        credentials = DeviceStore(data).issue_many([(name, "bench") for name in names])
        passwords_file = Path(workdir.name) / "credentials.json"
        passwords_file.write_text(json.dumps(dict(zip(names, credentials, strict=True))))
    port = free_port()
    # the benchmark's bots and talkers publish far past a person's rate (20/s, bursts of 3 s); Mosquitto
    # has no such limit, so it is lifted as Mosquitto's queue and size limits are (docs/PERFORMANCE.md)
    options = ["--max-rate", "1000000"]
    if not production:
        # the crowds log in hundreds at once with cheap hashes: a queue that holds them all measures the
        # broker, not the crowd's back-off (the default, 128, suits real argon2; docs/SECURITY.md)
        options += ["--password-queue", "4096"]

    log_path = Path(workdir.name) / "serve.log"
    trace_path = Path(workdir.name) / "stalls.jsonl" if trace_stalls else None
    program = ["-m", "benchmarks.stalltrace", str(trace_path), "--"] if trace_path is not None else ["-m", "imcli"]

    def launch() -> subprocess.Popen[str]:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *program, "serve", "--port", str(port), "--data-dir", str(data), *options],
                text=True, cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "COLUMNS": "200", "IMCLI_GC_LOG_MS": str(GC_LOG_MS)},
            )  # fmt: skip
        _read_port(proc, r"listening on 127\.0\.0\.1:(\d+)")  # said once its workers run
        return proc

    from imcli.serve import loops  # its event loop: IMCLI_LOOP, which imcli serve reads too (--loop)

    proc = launch()
    broker = Broker(
        "embedded", port, [proc], workdir, has_presence=True, relaunch=launch,
        note=f"imcli serve ({loops.chosen_loop()} loop, IMCLI_LOOP): broker + workers",
        passwords_file=passwords_file, log_path=log_path, trace_path=trace_path,
    )  # fmt: skip
    for child in _children(proc.pid):  # imcli serve runs its workers in a child process
        broker.extra_pids["workers"] = child
    return broker


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def mosquitto_clients() -> bool:
    """The load generators of the fan-out scenarios, whatever the broker under test."""
    return MOSQUITTO_SUB is not None and MOSQUITTO_PUB is not None


def mosquitto_available() -> bool:
    return all((MOSQUITTO, MOSQUITTO_PASSWD, MOSQUITTO_SUB, MOSQUITTO_PUB, DYNSEC_PLUGIN))


def deploy_size_limit() -> str:
    """deploy/mosquitto's ``message_size_limit`` (the benchmark lifts it; the files worker's chunks keep to it)."""
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "message_size_limit":
            return words[1]
    raise RuntimeError("deploy/mosquitto/mosquitto.conf has no message_size_limit")


def start_mosquitto(users: int, *, production: bool = False) -> Broker:
    """Mosquitto's password file always has ``mosquitto_passwd``'s own (production) hashes."""
    assert MOSQUITTO is not None and MOSQUITTO_PASSWD is not None
    workdir = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
    work = Path(workdir.name)
    port = free_port()
    passwd = work / "passwd"
    passwd.write_text("".join(f"{name}:{PASSWORD}\n" for name in [*user_names(users), *SERVICES]))
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwd)], check=True)
    passwd.chmod(0o600)
    replace = {
        "listener": f"listener {port} 127.0.0.1",
        "password_file": f"password_file {passwd}",
        "acl_file": f"acl_file {DEPLOY / 'aclfile'}",
        "persistence_location": f"persistence_location {work}/",
        "plugin": f"plugin {DYNSEC_PLUGIN}",
        "plugin_opt_config_file": f"plugin_opt_config_file {work / 'imcli-dynsec.json'}",
        # deploy/mosquitto/README.md: raise it for teams beyond ~130 users, or `who` replies are dropped
        "message_size_limit": "message_size_limit 0",
        # 1,000 queued per client would drop most of a 2,000-message burst; amqtt queues without limit
        "max_queued_messages": "max_queued_messages 0",
    }
    lines = []
    listeners = 0
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        listeners += key == "listener"
        if listeners >= 2 and key in ("listener", "protocol", "http_dir"):
            continue  # the web client's WebSocket listener: not measured here
        if key in replace:
            lines.append(replace[key])
        elif key not in ("user", "log_type", "connection_messages"):
            lines.append(line)
    lines += ["log_type error", "log_type warning", f"user {pwd.getpwuid(os.geteuid()).pw_name}"]
    shutil.copy(DEPLOY / "imcli-dynsec.json", work / "imcli-dynsec.json")
    conf = work / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")

    def launch() -> subprocess.Popen[str]:
        assert MOSQUITTO is not None
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        wait_listening(port, proc)
        return proc

    proc = launch()
    broker = Broker(
        "mosquitto", port, [proc], workdir, has_presence=True, relaunch=launch,
        note="Mosquitto 2 with deploy/mosquitto (message_size_limit and max_queued_messages lifted); imcli workers",
    )  # fmt: skip
    try:
        worker = _python(
            "-m", "imcli", "workers", "--host", "127.0.0.1", "--port", str(port), "--password-stdin",
            "--accounts-file", str(passwd), "--dynsec", "--archive-dir", str(work / "archive"),
            "--max-payload", deploy_size_limit(),  # as deploy/systemd/imcli-workers.service: the files' chunks
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        broker.procs.append(worker)
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(f"{PASSWORD}\n" * len(SERVICES))
        worker.stdin.close()
        worker.stdin = None
        started = "workers running" in worker.stdout.readline()
        broker.extra_pids["workers"] = worker.pid
    except BaseException:
        broker.stop()
        raise
    if not started:
        broker.stop()
        raise RuntimeError("imcli workers did not start on mosquitto")
    return broker


def nats_available() -> bool:
    from tests.natscluster import nats_available as available

    return available()


# every user's QoS 1 subscription is a JetStream consumer with three replicas (a Raft group of its
# own): a hundred created at once per crowd time out inside the cluster ("Unable to add JetStream
# consumer ... timeout for request type CC", SUBACK 0x80), and the retries only add to the queue
NATS_CROWD_CONCURRENCY = 8


def start_nats(users: int, *, production: bool = False, consumer_replicas: int | None = None) -> Broker:
    """deploy/nats: three nodes on loopback (tests/natscluster.py starts them the same way) and
    ``imcli workers --nats-users`` against all three; clients spread over the nodes in turn.
    Its password file is the deploy's as it is (``production`` changes nothing). ``consumer_replicas``
    turns on nats.conf's commented capacity line (``nats-r1``: one replica per subscription's consumer)."""
    from imcli.core.wire import Topics
    from imcli.groups.natsauth import NatsPermissions, read_passwords
    from tests.natscluster import NatsNode, keep_logs, wait_login

    workdir = tempfile.TemporaryDirectory(prefix="bench-nats-")
    work = Path(workdir.name)
    passwd, users_file = work / "passwd", work / "imcli-users.conf"
    passwd.write_text("".join(f"{name}:{PASSWORD}\n" for name in [*user_names(users), *SERVICES]))
    passwd.chmod(0o600)
    users_file.write_text(NatsPermissions(Topics()).render(read_passwords(passwd)))
    nodes = [
        NatsNode(f"nats-{i}", work / f"nats-{i}", users_file, max_payload=8 * 1024 * 1024,
                 consumer_replicas=consumer_replicas)
        for i in (1, 2, 3)
    ]  # fmt: skip
    for node in nodes:
        node.cluster = free_port()
    for node in nodes:
        node.start([n.cluster for n in nodes if n is not node])
    procs = [n.proc for n in nodes if n.proc is not None]
    broker = Broker(
        "nats-r1" if consumer_replicas == 1 else "nats", nodes[0].mqtt, procs, workdir, has_presence=True,
        ports=[n.mqtt for n in nodes],
        note="three nats-server 2.9 nodes (deploy/nats, max_payload lifted), JetStream R3"
        + (f", consumer_replicas {consumer_replicas}" if consumer_replicas else "")
        + "; imcli workers on all three",
        crowd_concurrency=NATS_CROWD_CONCURRENCY,
        monitors=[n.http for n in nodes],
        node_logs=[n.log_path for n in nodes],
    )  # fmt: skip
    workers_log = work / "workers.log"
    broker.keep_logs = lambda dest: keep_logs(nodes, dest, "bench-nats", (users_file, workers_log))
    broker.extra_pids.update({n.name: n.proc.pid for n in nodes[1:] if n.proc is not None})
    try:
        for node in nodes:
            wait_login(node, "presence", PASSWORD)
        hosts = ",".join(f"127.0.0.1:{n.mqtt}" for n in nodes)
        with workers_log.open("wb") as errors:  # its warnings (a node that did not reload in time), kept too
            worker = _python(
                "-m", "imcli", "workers", "--host", hosts, "--password-stdin", "--accounts-file", str(passwd),
                "--nats-users", str(users_file), *[a for n in nodes for a in ("--nats-pidfile", str(n.pidfile))],
                "--archive-dir", str(work / "archive"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors.fileno(),
                env={**os.environ, "COLUMNS": "200"},
            )  # fmt: skip
        broker.procs.append(worker)
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(f"{PASSWORD}\n" * len(SERVICES))
        worker.stdin.close()
        worker.stdin = None
        started = "workers running" in worker.stdout.readline()
        broker.extra_pids["workers"] = worker.pid
    except BaseException:
        broker.stop()
        raise
    if not started:
        broker.stop()
        raise RuntimeError("imcli workers did not start on the NATS cluster")
    return broker


def _stock(users: int, *, production: bool = False) -> Broker:
    return start_stock()


def _mosquitto_missing() -> str | None:
    if mosquitto_available():
        return None
    return "mosquitto, mosquitto_passwd, mosquitto_sub, mosquitto_pub or the dynamic-security plugin not installed"


@dataclass(frozen=True)
class Kind:
    """One kind of broker the suite can run: how to start it, and why it cannot run here (or None).

    ``start(users, production=...)`` starts it with accounts ``user_names(users)``; ``production``
    asks for the password settings it is deployed with (the reconnect storm)."""

    start: Callable[..., Broker]
    missing: Callable[[], str | None] = lambda: None


# every broker ``python -m benchmarks --brokers`` knows, in the order of the tables; another one
# (a NATS cluster, …) is one more entry here and a column everywhere
KINDS: dict[str, Kind] = {
    "stock": Kind(_stock),
    "embedded": Kind(start_embedded),
    "mosquitto": Kind(start_mosquitto, _mosquitto_missing),
    "nats": Kind(start_nats, lambda: None if nats_available() else "nats-server not installed"),
    # deploy/nats with its commented `consumer_replicas: 1` on: what 20,000 users take on this machine,
    # at the cost of a node's death stopping a third of the subscriptions (deploy/nats/README.md)
    "nats-r1": Kind(
        functools.partial(start_nats, consumer_replicas=1),
        lambda: None if nats_available() else "nats-server not installed",
    ),
}


def start(name: str, users: int, *, production: bool = False, trace_stalls: bool = False) -> Broker:
    """``trace_stalls``: the embedded broker's loop traced (benchmarks/stalltrace.py); others ignore it."""
    if name not in KINDS:
        raise ValueError(name)
    if trace_stalls and name == "embedded":
        return start_embedded(users, production=production, trace_stalls=True)
    return KINDS[name].start(users, production=production)
