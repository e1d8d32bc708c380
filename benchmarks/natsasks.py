"""Requests to the workers on the three-node NATS cluster under load: which go unanswered, and where (issue 20).

``python -m benchmarks.natsasks [--seconds 60] [--askers 6] [--storm 4] [--talkers 4] [--timeout 5]
[--changes N] [--hearers N] [--no-resend] [--users-shape accounts|global] [--keep DIR]``

Three nodes from deploy/nats (tests/natscluster.py) and the presence and group workers as
``imcli workers --nats-users`` runs them (QoS 0 requests and replies), on nodes 2, 3, 1 in that
order. ``askers`` threads ask, each as a command does: a new clean-session connection to a node
(round robin), the reply filter subscribed at QoS 0, the request published at QoS 1, the reply
waited for ``timeout`` seconds (the CLI's default 5) and then, to tell late from lost, up to
``late`` seconds in all. Half ask the presence worker (``who``), half the group worker (``list``).
Meanwhile the load: ``storm`` threads connect and close clean sessions with a QoS 1 subscription
(a JetStream consumer made and deleted each time: a login storm), and ``talkers`` say QoS 1 room
lines as fast as their PUBACKs come to as many QoS 1 listeners (a fan-out).
``changes`` threads make group changes (each a reload of every node); ``hearers`` threads make new
clean sessions that subscribe the talkers' room at QoS 1 and wait for a line (a subscription left
deaf by a reload). ``--users-shape global`` (an experiment) writes every user into the global account
instead of ``IM``. The summary counts each node's reloads and ``Unknown account`` lines.

Each worker's ``_on_request`` and reply are wrapped to note when it heard each correlation id and
when it sent the reply, so an unanswered request is told apart: never reached the worker, or its
reply never reached the asker, or the worker answered late (busy). Prints a JSON summary, then
each request that was not answered in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imcli.client.identity import Identity
from imcli.client.services import Connection
from imcli.core import request_reply
from imcli.core.errors import ImcliError
from imcli.core.mqtt import BrokerAddress, Credentials, MqttClient
from imcli.core.service import PasswordFileDirectory, ServiceWorker
from imcli.core.wire import ChatMessage, GroupRequest, Topics, WhoRequest, WireModel, encode, new_id
from imcli.groups import natsauth
from imcli.groups.natsauth import NatsAuth, NatsPermissions
from imcli.groups.worker import GroupWorker
from imcli.presence.worker import PresenceWorker
from tests.natscluster import ACCOUNTS, NatsCluster, running_cluster
from tests.rawmqtt import password_of

T = Topics()


@dataclass
class Ask:
    """One request as its asker saw it (monotonic seconds from the run's start; None: never)."""

    asker: str
    kind: str
    node: int  # 1-3, the asker's node
    corr: str = ""
    connected: float | None = None
    subscribed: float | None = None
    sent: float | None = None  # PUBACK of the request
    answered: float | None = None
    sends: int = 0  # the request sent this many times (request_reply.RESEND_AFTER)
    error: str = ""


@dataclass
class Hear:
    """One QoS 1 subscription to the talkers' room, made by a new clean session (``hearer``)."""

    client_id: str
    node: int
    subscribed: float | None = None  # SUBACK (monotonic seconds from the run's start)
    subscribed_utc: str = ""
    heard: float | None = None  # its first line; None: none within ``HEAR_WAIT``
    lines_meanwhile: int = 0  # room lines acknowledged to the talkers between the SUBACK and the give-up
    delivery_subjects: list[str] = field(default_factory=list)  # its ``$MQTT.sub.`` subjects (/connz), if deaf
    error: str = ""


HEAR_WAIT = 15.0  # seconds a new QoS 1 subscription waits for a line the talkers keep saying


@dataclass
class Heard:
    """What the workers noted of one correlation id."""

    by: dict[str, list[float]] = field(default_factory=dict)  # worker account -> when it heard the request (each send)
    replied: dict[str, list[float]] = field(default_factory=dict)  # worker account -> when it queued each reply


class Log:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.wall = time.time()  # the nodes' logs say wall-clock times
        self.lock = threading.Lock()
        self.heard: dict[str, Heard] = {}
        self.asks: list[Ask] = []
        self.storm = [0, 0]  # logins done, failed
        self.lines = [0, 0]  # room lines acknowledged, failed
        self.changes: list[Ask] = []  # group changes (changer)
        self.hears: list[Hear] = []  # QoS 1 room subscriptions made while the load runs (hearer)

    def now(self) -> float:
        return round(time.monotonic() - self.start, 3)

    def note(self, corr: str, worker: str, replied: bool) -> None:
        with self.lock:
            entry = self.heard.setdefault(corr, Heard())
            (entry.replied if replied else entry.by).setdefault(worker, []).append(self.now())


def instrument(worker: ServiceWorker, log: Log) -> None:
    """Note each request the worker hears and each reply it sends, then do as before."""
    on_request: Callable[[str, str, bytes], None] = worker._on_request
    publish_reply: Callable[[str, str, bytes], None] = worker._publish_reply

    def heard(sender: str, corr: str, payload: bytes) -> None:
        log.note(corr, worker.account, replied=False)
        on_request(sender, corr, payload)

    def replied(sender: str, corr: str, payload: bytes) -> None:
        log.note(corr, worker.account, replied=True)
        publish_reply(sender, corr, payload)

    setattr(worker, "_on_request", heard)  # noqa: B010 - the instance's own, not the class's
    setattr(worker, "_publish_reply", replied)  # noqa: B010


@contextlib.contextmanager
def workers(cluster: NatsCluster, log: Log) -> Iterator[list[ServiceWorker]]:
    """The presence and group workers of ``imcli workers --nats-users``, on nodes 2, 3, 1."""
    n1, n2, n3 = cluster.nodes
    address = BrokerAddress.of(f"127.0.0.1:{n2.mqtt},127.0.0.1:{n3.mqtt},127.0.0.1:{n1.mqtt}")
    directory = PasswordFileDirectory(cluster.passwd)
    auth = NatsAuth(Topics(), cluster.passwd, cluster.users, [n.pidfile for n in cluster.nodes])

    def creds(name: str) -> Credentials:
        return Credentials(name, password_of(name))

    def device(name: str) -> str:
        return natsauth.private_device("bench", password_of(name))

    made: list[ServiceWorker] = [
        PresenceWorker(address, creds("presence"), directory, device=device("presence")),
        GroupWorker(address, creds("groups"), directory, device=device("groups"), nats=auth),
    ]
    with contextlib.ExitStack() as stack:
        for worker in made:
            worker.at_most_once = True
            instrument(worker, log)
            stack.enter_context(worker)
        yield made


def port_of(cluster: NatsCluster, node: int) -> int:
    return cluster.nodes[node - 1].mqtt


def ask_once(
    cluster: NatsCluster, log: Log, account: str, kind: str, node: int, late: float, request: WireModel | None = None
) -> Ask:
    """One request as ``imcli who`` or ``imcli group list`` asks it (services.Connection), waiting ``late`` s."""
    ask = Ask(account, kind, node)
    address = BrokerAddress("127.0.0.1", port_of(cluster, node))
    identity = Identity(address, Credentials(account, password_of(account)), f"ask-{new_id()[:8]}")
    try:
        with Connection(identity, "who", timeout=late) as connection:
            ask.connected = ask.subscribed = log.now()
            publish = connection.requests._publish

            def sending(topic: str, payload: bytes) -> None:
                ask.corr = topic.rsplit("/", 1)[1]
                publish(topic, payload)
                ask.sends += 1
                ask.sent = ask.sent or log.now()

            connection.requests._publish = sending
            if request is None:
                request = WhoRequest(all=True) if kind == "who" else GroupRequest(op="list")
            connection.ask(request)
            ask.answered = log.now()
    except ImcliError as exc:
        ask.error = str(exc)
    return ask


def storm(cluster: NatsCluster, log: Log, account: str, node: int, stop: threading.Event) -> None:
    """Logins of a clean session with a QoS 1 subscription (one JetStream consumer), then a close."""
    while not stop.is_set():
        client = MqttClient(
            BrokerAddress("127.0.0.1", port_of(cluster, node)),
            Credentials(account, password_of(account)),
            f"{account}:storm-{new_id()[:8]}",
        )
        try:
            client.connect()
            client.subscribe([T.user_filter(account)], qos=1)
            ok = 0
        except ImcliError:
            ok = 1
        finally:
            client.close()
        with log.lock:
            log.storm[ok] += 1
        node = node % 3 + 1


def changer(cluster: NatsCluster, log: Log, owner: str, member: str, node: int, stop: threading.Event) -> None:
    """Group changes, each a reload of every node waited for by the group worker: create, invite, kick."""
    while not stop.is_set():
        group = f"g{new_id()[:8]}"
        for op, user in (("create", None), ("invite", member), ("kick", member)):
            result = ask_once(cluster, log, owner, op, node, 60, GroupRequest(op=op, group=group, user=user))
            with log.lock:
                log.changes.append(result)
        node = node % 3 + 1


def hearer(cluster: NatsCluster, log: Log, account: str, node: int, stop: threading.Event) -> None:
    """New clean sessions, one after the other, each subscribing the talkers' room at QoS 1 (a JetStream
    consumer whose delivery subject the other nodes must be told of) and waiting for one line: a
    subscription made while a node reloads can stay deaf (issue 20)."""
    while not stop.is_set():
        hear = hear_once(cluster, log, account, node)
        with log.lock:
            log.hears.append(hear)
        node = node % 3 + 1


def hear_once(cluster: NatsCluster, log: Log, account: str, node: int) -> Hear:
    """One such subscription; a deaf one's ``$MQTT.sub.`` subjects are read from its node's /connz
    before it closes, to be found in the nodes' logs."""
    got = threading.Event()
    hear = Hear(f"{account}:hear-{new_id()[:8]}", node)
    client = MqttClient(
        BrokerAddress("127.0.0.1", port_of(cluster, node)),
        Credentials(account, password_of(account)),
        hear.client_id,
        on_message=lambda _m: got.set(),
    )
    try:
        client.connect()
        client.subscribe([T.room_filter("lobby")], qos=1)
        hear.subscribed, hear.subscribed_utc = log.now(), time.strftime("%H:%M:%S", time.gmtime())
        before = log.lines[0]
        if got.wait(HEAR_WAIT):
            hear.heard = log.now()
        else:
            hear.lines_meanwhile = log.lines[0] - before
            hear.delivery_subjects = delivery_subjects(cluster.nodes[node - 1].http, hear.client_id)
    except ImcliError as exc:
        hear.error = str(exc)[:80]
    finally:
        client.close()
    return hear


def delivery_subjects(http: int, client_id: str) -> list[str]:
    """The ``$MQTT.sub.`` subjects of an MQTT client's connection on a node (its monitoring port)."""
    url = f"http://127.0.0.1:{http}/connz?mqtt_client={urllib.parse.quote(client_id)}&subs=detail"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            connz = json.load(answer)
    except (OSError, ValueError):
        return []
    return [
        str(sub.get("subject"))
        for conn in connz.get("connections") or []
        for sub in conn.get("subscriptions_list_detail") or []
        if str(sub.get("subject")).startswith("$MQTT.sub.")
    ]


def talker(cluster: NatsCluster, log: Log, account: str, node: int, stop: threading.Event) -> None:
    client = MqttClient(
        BrokerAddress("127.0.0.1", port_of(cluster, node)),
        Credentials(account, password_of(account)),
        f"{account}:talk",
        reconnect=True,
    )
    with client:
        while not stop.is_set():
            try:
                client.publish(T.room("lobby", account), encode(ChatMessage(text="x" * 200)))
                ok = 0
            except ImcliError:
                ok = 1
                time.sleep(0.5)
            with log.lock:
                log.lines[ok] += 1


ACCOUNTS_RENDER = NatsPermissions.render


def render_global(self: NatsPermissions, passwords: Mapping[str, str]) -> str:
    """The users file with every user in the global account (``authorization { users }``), no ``accounts``
    block: then nats-server 2.9.10 gives the global account JetStream. Parked users and ghosts stay in
    it, muted (an experiment: their connections are not closed)."""
    text = ACCOUNTS_RENDER(self, passwords)
    users = [line.strip() for line in text.splitlines() if line.strip().startswith('{"user"')]
    return "authorization {\n  users: [\n" + "".join(f"    {u}\n" for u in users) + "  ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.natsasks", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--askers", type=int, default=6)
    parser.add_argument("--storm", type=int, default=4)
    parser.add_argument("--talkers", type=int, default=4)
    parser.add_argument("--listeners", type=int, default=8)
    parser.add_argument("--changes", type=int, default=0, help="threads making group changes (reloads)")
    parser.add_argument(
        "--hearers", type=int, default=0, help="threads making QoS 1 room subscriptions, each waiting for a line"
    )
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--late", type=float, default=30.0)
    parser.add_argument("--no-resend", action="store_true", help="as before: each request sent once")
    parser.add_argument("--keep", help="a folder to keep the nodes' logs in")
    parser.add_argument(
        "--users-shape",
        choices=("accounts", "global"),
        default="accounts",
        help="an experiment (issue 20, ninth session): 'global' writes every user into the global account "
        "(authorization { users }, JetStream on it) instead of account IM; cut users are only muted then",
    )
    args = parser.parse_args(argv)
    if args.users_shape == "global":
        setattr(NatsPermissions, "render", render_global)  # noqa: B010 - the experiment's own writer
    if args.no_resend:
        request_reply.RESEND_AFTER = ()
    n_users = args.askers + args.storm + args.talkers + args.listeners + 2 * args.changes + args.hearers
    accounts = (*ACCOUNTS, *(f"q{i}" for i in range(n_users)))
    log = Log()
    stop = threading.Event()
    with (
        tempfile.TemporaryDirectory(prefix="natsasks-") as tmp,
        running_cluster(Path(args.keep or tmp) / f"c{int(time.time())}", accounts) as cluster,
        workers(cluster, log) as made,
    ):
        nodes_of_workers = {w.account: w.client.node[1] for w in made}
        names = iter(f"q{i}" for i in range(n_users))
        listeners = []
        for i in range(args.listeners):
            account = next(names)
            listener = MqttClient(
                BrokerAddress("127.0.0.1", port_of(cluster, i % 3 + 1)),
                Credentials(account, password_of(account)),
                f"{account}:listen",
                reconnect=True,
                on_message=lambda _m: None,
            )
            listener.connect()
            listener.subscribe([T.room_filter()], qos=1)
            listeners.append(listener)
        threads = [
            threading.Thread(target=storm, args=(cluster, log, next(names), i % 3 + 1, stop), daemon=True)
            for i in range(args.storm)
        ] + [
            threading.Thread(target=talker, args=(cluster, log, next(names), i % 3 + 1, stop), daemon=True)
            for i in range(args.talkers)
        ]
        threads += [
            threading.Thread(
                target=changer, args=(cluster, log, next(names), next(names), i % 3 + 1, stop), daemon=True
            )
            for i in range(args.changes)
        ]
        threads += [
            threading.Thread(target=hearer, args=(cluster, log, next(names), i % 3 + 1, stop), daemon=True)
            for i in range(args.hearers)
        ]
        askers = [next(names) for _ in range(args.askers)]

        def asking(index: int) -> None:
            account, kind = askers[index], ("who" if index % 2 == 0 else "list")
            node = index % 3 + 1
            while not stop.is_set():
                result = ask_once(cluster, log, account, kind, node, args.late)
                with log.lock:
                    log.asks.append(result)
                node = node % 3 + 1

        threads += [threading.Thread(target=asking, args=(i,), daemon=True) for i in range(args.askers)]
        load = os.getloadavg()[0]
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join(args.late + 15)
        for listener in listeners:
            listener.close()
        report(log, args, load, nodes_of_workers, cluster)
    return 0


def report(log: Log, args: argparse.Namespace, load: float, worker_ports: dict[str, int], cluster: NatsCluster) -> None:
    node_of_port = {n.mqtt: i + 1 for i, n in enumerate(cluster.nodes)}
    owner = {"who": "presence", "list": "groups"}
    summary: dict[str, object] = {
        "seconds": args.seconds,
        "started_utc": time.strftime("%H:%M:%S", time.gmtime(log.wall)),
        "nodes_ports": [n.mqtt for n in cluster.nodes],
        "load_at_start": load,
        "load_at_end": os.getloadavg()[0],
        "workers_on_node": {k: node_of_port.get(v) for k, v in worker_ports.items()},
        "users_shape": args.users_shape,
        "reloads_per_node": [n.reloads for n in cluster.nodes],
        "unknown_account_lines_per_node": [n.log.count("Unknown account") for n in cluster.nodes],
        "unknown_account_names": sorted(
            set(re.findall(r'Unknown account "([^"]*)"', "".join(n.log for n in cluster.nodes)))
        ),
        "storm_logins_ok_failed": log.storm,
        "room_lines_ok_failed": log.lines,
        "group_changes": {
            "asked": len(log.changes),
            "answered": sum(a.answered is not None for a in log.changes),
            "max_s": max(((a.answered or 0) - (a.sent or 0) for a in log.changes if a.answered), default=None),
            "errors": sorted({a.error[:80] for a in log.changes if a.error}),
        },
    }
    bad: list[dict[str, object]] = []
    for kind in ("who", "list"):
        asks = [a for a in log.asks if a.kind == kind]
        sent = [a for a in asks if a.sent is not None]
        in_time = [a for a in sent if a.answered is not None and a.answered - (a.sent or 0) <= args.timeout]
        late = [a for a in sent if a.answered is not None and a not in in_time]
        never = [a for a in sent if a.answered is None]
        waits = sorted((a.answered or 0) - (a.sent or 0) for a in sent if a.answered is not None)
        summary[kind] = {
            "asked": len(asks),
            "failed_before_sent": len(asks) - len(sent),
            "sent": len(sent),
            "answered_in_time": len(in_time),
            "late": len(late),
            "never": len(never),
            "median_s": waits[len(waits) // 2] if waits else None,
            "max_s": waits[-1] if waits else None,
            "errors": sorted({a.error[:80] for a in asks if a.error}),
            "answered_after_a_resend": sum(a.answered is not None and a.sends > 1 for a in sent),
        }
        for a in late + never:
            heard = log.heard.get(a.corr, Heard())
            worker = owner[kind]
            bad.append(
                asdict(a)
                | {
                    "worker_heard": heard.by.get(worker),
                    "worker_replied": heard.replied.get(worker),
                    "heard_by": sorted(heard.by),
                    "where": (
                        "never reached the worker"
                        if worker not in heard.by
                        else "worker answered late"
                        if (heard.replied.get(worker) or [1e9])[0] - (a.sent or 0) > args.timeout
                        else "reply lost on the way back"
                        if a.answered is None
                        else "reply came late"
                    ),
                }
            )
    logs = "".join(n.log for n in cluster.nodes)
    deaf = [h for h in log.hears if h.subscribed is not None and h.heard is None]
    summary["qos1_subscriptions"] = {
        "made": sum(h.subscribed is not None for h in log.hears),
        "failed": sum(h.subscribed is None for h in log.hears),
        "heard_a_line": sum(h.heard is not None for h in log.hears),
        "deaf": len(deaf),
        "deaf_with_lines_said_meanwhile": sum(h.lines_meanwhile > 0 for h in deaf),
    }
    print(json.dumps(summary, indent=1))
    for entry in bad:
        print(json.dumps(entry))
    for h in deaf:  # each with the node log lines that name its delivery subjects
        named = [line[:200] for line in logs.splitlines() if any(sub in line for sub in h.delivery_subjects)]
        print(json.dumps(asdict(h) | {"log_lines": named}))


if __name__ == "__main__":
    sys.exit(main())
