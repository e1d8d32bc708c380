"""The three-node NATS cluster as the third broker of tests/brokers.py (``broker_kind == "nats"``).

A fresh cluster takes about 8 s to start (JetStream elects its leaders and makes the MQTT
streams), too long per test: one cluster serves a whole test session (under ``pytest -n``, the one
xdist worker that runs every NATS test: tests/natsschedule.py), and each test gets what a fresh
broker would give it:

- before the test, the workers of ``imcli workers --nats-users`` start afresh (their own archive
  and files directories under the test's ``tmp_path``), after every retained message the last
  test left (group records, friends records, presence, profiles, statuses) was cleared. They
  start side by side (presence and groups, then the other three once the group worker's users
  file is in force): each start waits mostly on JetStream making the consumers of its QoS 1
  subscriptions (0.2 to 0.8 s each here), so one after the other they took 10 to 12 s a test,
  side by side about 5 s; the clearing subscribes at QoS 0 (no consumer: 1 s to 0.02 s);
- after it, every MQTT session a client of the test made (the nodes' ``/connz`` lists their
  client ids, closed connections included) is ended by a clean-session CONNECT with that id,
  so nothing queued for one test's ``alice:desk`` reaches the next one's.

Users are spread over the nodes: alice's address lists node 1 first, bob's node 3, everyone
else's node 2 (``ClusterInfo.address_for``, used by tests/conftest.py's ``ident``, ``raw`` and
``cli_as``). Accounts come from the cluster's password file (``users(...)`` adds lines, and the
group worker renders and reloads them, as ``imcli workers --nats-users`` does).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imcli.archive.worker import ArchiveWorker
from imcli.core.errors import ImcliError
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.service import PasswordFileDirectory, ServiceWorker
from imcli.core.wire import TopicKind, Topics, build_schemas
from imcli.files.worker import FilesWorker
from imcli.groups.natsauth import NatsAuth, private_device
from imcli.groups.worker import GroupWorker
from imcli.moments.worker import MomentsWorker
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import ServeInfo
from tests.natscluster import NatsCluster, NatsNode
from tests.rawmqtt import chat, connect_raw, password_of

T = Topics()
# topics only their sender may write, not the group worker's account: a retained message there is cleared by the sender
SENDERS_ONLY = (TopicKind.ROOM, TopicKind.DM, TopicKind.GROUP_MSG)
FIRST_NODE = {"alice": 1, "bob": 3}  # everyone else: node 2
RELOAD_TIMEOUT = 20.0


@dataclass(frozen=True)
class ClusterInfo(ServeInfo):
    """``ServeInfo`` of the cluster (``address``: every node, node 1 first) that also says where each
    user connects first."""

    nodes: tuple[int, ...] = field(default=(), compare=False)  # the nodes' MQTT ports, in order

    def address_for(self, name: str | None) -> BrokerAddress:
        first = FIRST_NODE.get(name or "", 2) - 1
        ports = self.nodes[first:] + self.nodes[:first]
        return BrokerAddress.of(",".join(f"127.0.0.1:{p}" for p in ports))


def address_for(server: ServeInfo, name: str | None) -> BrokerAddress:
    """Where ``name`` connects on the broker under test: on the cluster, its own node first."""
    return server.address_for(name) if isinstance(server, ClusterInfo) else server.address


class SharedCluster:
    """One running cluster, made ready for one test at a time (``for_test``)."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.cluster = cluster
        self._seen_cid = {node.name: 0 for node in cluster.nodes}

    def info(self, data_dir: Path) -> ClusterInfo:
        nodes = tuple(n.mqtt for n in self.cluster.nodes)
        address = BrokerAddress.of(self.cluster.host_list)
        return ClusterInfo(address, "127.0.0.1", data_dir, "none: accounts come from the password file", nodes=nodes)

    @contextlib.contextmanager
    def for_test(self, workdir: Path) -> Iterator[ClusterInfo]:
        for node in self.cluster.nodes:  # a test before may have killed one
            if node.proc is None or node.proc.poll() is not None:
                self.cluster.restart(node)
        self.clear_retained()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            with self.workers(workdir):
                yield self.info(workdir)
        finally:
            self.cluster.auth = None
            self.end_sessions()

    # ---------------------------------------------------------------- the workers

    @contextlib.contextmanager
    def workers(self, workdir: Path) -> Iterator[None]:
        """``imcli workers --nats-users <users> --nats-pidfile ... --archive-dir --files-dir`` in this
        process, on node 2 first; returns once the users file they wrote is in force on every node."""
        cluster = self.cluster
        n1, n2, n3 = cluster.nodes
        address = BrokerAddress.of(f"127.0.0.1:{n2.mqtt},127.0.0.1:{n3.mqtt},127.0.0.1:{n1.mqtt}")
        directory = PasswordFileDirectory(cluster.passwd)

        def group_worker() -> GroupWorker:
            auth = NatsAuth(T, cluster.passwd, cluster.users, [n.pidfile for n in cluster.nodes])
            cluster.auth = auth
            return GroupWorker(address, creds("groups"), directory, device=device("groups"), nats=auth)

        def creds(name: str) -> Credentials:
            return Credentials(name, password_of(name))

        def device(name: str, base: str = "test") -> str:  # as imcli workers --nats-users: not guessable
            return private_device(base, password_of(name))

        before = [n.reloads for n in cluster.nodes]
        text_before = cluster.users.read_text()
        with contextlib.ExitStack() as stack:
            # started side by side: each start waits mostly on JetStream making its subscriptions' consumers
            for worker in started_together(
                lambda: PresenceWorker(address, creds("presence"), directory, device=device("presence")), group_worker
            ):
                stack.push(worker)
            if cluster.users.read_text() != text_before:  # the group worker rewrote the rights: in force first
                wait_reloaded(cluster.nodes, before)
            for worker in started_together(
                lambda: ArchiveWorker(address, creds("archive"), workdir / "archive", device=device("archive")),
                lambda: FilesWorker(address, creds("files"), workdir, device=device("files")),
                lambda: MomentsWorker(address, creds("groups"), workdir, device=device("groups", "moments")),
            ):
                stack.push(worker)
            yield

    # ---------------------------------------------------------------- what one test leaves behind

    def clear_retained(self) -> None:
        """Every retained message under the prefix, cleared by the group worker's account (it may write
        every retained topic of the contract), or by its sender where only the sender may write (a
        retained chat line: test_history's ``test_what_the_broker_drops_is_never_archived`` leaves one
        on ``im/room/lobby/carol``, which the group worker's account could not clear, a Publish
        Violation, so every later test's QoS 1 ``im/room/+/+`` got it)."""
        node = self.cluster.nodes[1]
        cleaner = connect_raw("127.0.0.1", node.mqtt, "groups", "groups:cleaner", password_of("groups"))
        try:
            assert cleaner.rc == 0, node.log[-2000:]
            cleaner.subscribe(f"{T.prefix}/#", qos=0)  # retained messages come all the same; no JetStream consumer
            marker = chat("cleaner's barrier")
            cleaner.publish(T.notice("groups"), marker)
            seen = cleaner.until(T.notice("groups"), marker)
            retained = sorted({m.topic for m in seen if m.retain and m.payload})
            by_sender: dict[str, list[str]] = {}
            for topic in retained:
                parsed = T.parse(topic)
                if parsed is not None and parsed.kind in SENDERS_ONLY and parsed.sender:
                    by_sender.setdefault(parsed.sender, []).append(topic)
                else:
                    cleaner.publish(topic, b"", retain=True)
        finally:
            cleaner.close()
        for sender, topics in by_sender.items():
            owner = connect_raw("127.0.0.1", node.mqtt, sender, f"{sender}:cleaner", password_of(sender))
            try:
                assert owner.rc == 0, node.log[-2000:]
                for topic in topics:
                    owner.publish(topic, b"", retain=True)
            finally:
                owner.close()

    def end_sessions(self) -> None:
        """End every MQTT session made since the last call: a clean-session CONNECT with its client id
        (NATS 2.9 does not bind client ids to accounts, so the service account may)."""
        ids: set[str] = set()
        for node in self.cluster.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            for conn in connections(node):
                if conn["cid"] > self._seen_cid[node.name] and conn.get("mqtt_client"):
                    ids.add(conn["mqtt_client"])
            self._seen_cid[node.name] = max([self._seen_cid[node.name], *(c["cid"] for c in connections(node))])
        node = next(n for n in self.cluster.nodes if n.proc is not None and n.proc.poll() is None)
        for client_id in sorted(ids):
            connect_raw("127.0.0.1", node.mqtt, "presence", client_id, password_of("presence")).close()


def started(make: Callable[[], ServiceWorker], tries: int = 3) -> ServiceWorker:
    """A worker, entered, hearing requests at QoS 0 as ``imcli workers --nats-users`` makes it. On a loaded
    machine JetStream can time out making the consumer of a new QoS 1 subscription (its API waits 4 s; the
    node logs ``Unable to add JetStream consumer``) and the SUBSCRIBE is refused: ``imcli workers`` would
    exit and be restarted by systemd; here, try again."""
    for attempt in range(tries):
        worker = make()
        worker.at_most_once = True
        try:
            worker.__enter__()
        except ImcliError:
            if attempt == tries - 1:
                raise
        else:
            return worker
    raise AssertionError("unreachable")


def started_together(*makers: Callable[[], ServiceWorker]) -> list[ServiceWorker]:
    """``started`` for each, in threads of their own; if any fails, those that started are stopped and
    its error is raised."""
    build_schemas()  # here first: each worker's start calls it too, and pydantic's rebuild is not made for threads
    results: list[ServiceWorker | BaseException | None] = [None] * len(makers)

    def start(i: int) -> None:
        try:
            results[i] = started(makers[i])
        except BaseException as exc:  # handed to the caller's thread below
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,), name=f"start-worker-{i}") for i in range(len(makers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    workers = [r for r in results if isinstance(r, ServiceWorker)]
    failed = [r for r in results if not isinstance(r, ServiceWorker)]
    if failed:
        for worker in workers:
            worker.__exit__(None, None, None)
        error = failed[0]
        raise error if isinstance(error, BaseException) else AssertionError("a worker's start did not end")
    return workers


def connections(node: NatsNode) -> list[dict[str, Any]]:
    """The node's MQTT connections, open and closed (nats-server keeps the last 10,000 closed).
    Note: nats-server 2.9 shows an MQTT client's password in the ``jwt`` field here."""
    url = f"http://127.0.0.1:{node.http}/connz?state=all&limit=100000"
    with urllib.request.urlopen(url, timeout=10) as reply:
        found: list[dict[str, Any]] = json.load(reply).get("connections") or []
    return found


def wait_reloaded(nodes: list[NatsNode], before: list[int], timeout: float = RELOAD_TIMEOUT) -> None:
    """Every node has applied one more configuration reload than ``before``."""
    deadline = time.monotonic() + timeout
    while any(n.reloads <= b for n, b in zip(nodes, before, strict=True)):
        assert time.monotonic() < deadline, f"the nodes did not reload within {timeout:g}s"
        time.sleep(0.05)


def add_accounts(cluster: NatsCluster) -> Callable[..., None]:
    def add(*names: str) -> None:
        for name in names:
            if not cluster.has_account(name):
                cluster.add_account(name)

    return add
