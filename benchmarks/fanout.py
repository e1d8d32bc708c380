"""Fan-out in the shapes users produce (issue 21), and a room flood to run under other scenarios.

A ``Shape`` is some rooms, each with listeners and talkers: one room where everyone talks
(issue 7's room fan-out), a bot streaming into a busy room, many rooms at once, a large
group with a few talkers. Every listener is a ``mosquitto_sub`` (a C client: one time stamp
per message, line buffered through ``stdbuf``), every talker a ``mosquitto_pub -l``, so the
load generator costs little beside the broker and is the same for every broker. Before the
clock starts, probe messages in a room of their own show that every listener is subscribed.

The large group is a room with 500 listeners: a group's messages take the same delivery path
plus a membership check per recipient, and a group of 500 needs 500 invitations through the
groups worker before the clock starts.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import brokers
from benchmarks.brokers import MOSQUITTO_PUB, MOSQUITTO_SUB, PASSWORD, Broker, cpu_seconds
from imcli.core.wire import ChatMessage, Topics, encode, new_id

T = Topics()
STDBUF = shutil.which("stdbuf")
UNBUFFERED = [STDBUF, "-oL"] if STDBUF else []
QOS1_QUIET = 15.0  # seconds without a new QoS 1 copy (and every talker done) before the count stops


def user(index: int) -> str:
    return f"u{index:05d}"


@dataclass(frozen=True)
class Shape:
    """``rooms`` rooms of ``members`` listeners; in each, ``talkers`` say ``lines`` lines each.

    Talkers are the room's first members (they hear themselves, as ``imcli`` users do), or,
    with ``bot``, accounts of their own that do not listen."""

    rooms: int
    members: int
    talkers: int
    lines: int
    bot: bool = False

    def listeners(self, room: int) -> list[str]:
        return [user(room * self.members + j) for j in range(self.members)]

    def speakers(self, room: int) -> list[str]:
        if self.bot:
            return [user(self.rooms * self.members + room * self.talkers + k) for k in range(self.talkers)]
        return self.listeners(room)[: self.talkers]

    @property
    def users(self) -> int:
        return self.rooms * (self.members + (self.talkers if self.bot else 0))

    @property
    def messages(self) -> int:
        return self.rooms * self.talkers * self.lines

    @property
    def deliveries(self) -> int:
        return self.messages * self.members

    @property
    def per_listener(self) -> int:
        """The copies each listener hears: every line said in its room."""
        return self.talkers * self.lines


class Listeners:
    """``mosquitto_sub`` processes, each writing ``<unix time> <topic>`` per message to a file."""

    def __init__(self, broker: Broker, qos: int, out: Path) -> None:
        self.broker = broker
        self.common = ["-h", "127.0.0.1", "-P", PASSWORD, "-q", str(qos)]  # -p per client: a cluster's nodes in turn
        self.qos = qos
        self.out = out
        self.files: list[Path] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.client_ids: list[str] = []
        self.probe_room = f"probe{qos}"

    def add(self, name: str, client_id: str, room: str) -> Path:
        assert MOSQUITTO_SUB is not None
        path = self.out / f"sub-{client_id.replace(':', '-')}"
        with path.open("w") as stamps, path.with_suffix(".err").open("w") as errors:  # a refused SUBSCRIBE
            self.procs.append(subprocess.Popen(
                [*UNBUFFERED, MOSQUITTO_SUB, *self.common, "-p", str(self.port(len(self.procs))), "-u", name,
                 "-i", client_id,
                 "-t", T.room_filter(room), "-t", T.room_filter(self.probe_room), "-F", "%U %t"],
                stdout=stamps, stderr=errors, text=True,
            ))  # fmt: skip
        self.files.append(path)
        self.client_ids.append(client_id)
        return path

    def port(self, i: int) -> int:
        """The port of the ``i``-th client (a cluster's nodes in turn)."""
        return self.broker.port_of(i)

    def ready(self, timeout: float = 90) -> None:
        """Probe messages until every listener has written one (each probe is one more chance)."""
        assert MOSQUITTO_PUB is not None
        probe = [MOSQUITTO_PUB, *self.common[:-2], "-p", str(self.broker.port), "-q", "1", "-u", "watch",
                 "-i", f"watch:probe{self.qos}",
                 "-t", T.room(self.probe_room, "watch"), "-m", "probe"]  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(path.stat().st_size for path in self.files):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fan-out listeners not ready within {timeout:g}s")
            subprocess.run(probe, check=False, capture_output=True)
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


def _stamps(path: Path, marker: str) -> list[float]:
    return [float(x.split()[0]) for x in path.read_text().splitlines() if marker in x]


def _monitor(port: int, path: str) -> Any:  # a node's JSON answer, read as it comes
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return json.load(answer)


def trace_short(broker: Broker, listeners: Listeners, per_listener: int, marker: str, dest: Path) -> Path | None:
    """For each QoS 1 listener on a NATS cluster that got fewer than ``per_listener`` lines, while it is still
    connected: its subscriptions (``/connz``, on its node), and on every node each JetStream consumer that
    delivers to one of them (``/jsz``: leader, delivered, pending, whether the node sees a subscriber on
    its delivery subject, ``push_bound``) and the lines of the node's log that name that subject. Written to
    ``dest/fanout-trace-<time>.json`` (None: no listener short)."""
    short = [i for i, path in enumerate(listeners.files) if len(_stamps(path, marker)) < per_listener]
    if not short:
        return None
    logs = {f"nats-{n + 1}": p.read_text(errors="replace") for n, p in enumerate(broker.node_logs) if p.exists()}
    jsz: dict[str, Any] = {}
    for n, port in enumerate(broker.monitors):
        with contextlib.suppress(OSError, ValueError):
            jsz[f"nats-{n + 1}"] = _monitor(port, "/jsz?accounts=true&streams=true&consumers=true&config=true")
    streams = {  # each node's copy of the MQTT streams: a replica short of messages delivers them to nobody
        name: {
            st.get("name"): {**(st.get("state") or {}), "leader": (st.get("cluster") or {}).get("leader")}
            for acc in doc.get("account_details") or []
            for st in acc.get("stream_detail") or []
        }
        for name, doc in jsz.items()
    }
    traced = []
    for i in short:
        client_id = listeners.client_ids[i]
        node = broker.ports.index(listeners.port(i)) if listeners.port(i) in broker.ports else -1
        entry: dict[str, object] = {
            "client_id": client_id,
            "node": f"nats-{node + 1}",
            "lines": len(_stamps(listeners.files[i], marker)),
            "probes": sum(1 for x in listeners.files[i].read_text().splitlines() if listeners.probe_room in x),
            "stderr": listeners.files[i].with_suffix(".err").read_text(errors="replace")[-2000:],
            "lines_per_topic": dict(
                collections.Counter(x.split()[1] for x in listeners.files[i].read_text().splitlines() if marker in x)
            ),
            "log_lines_of_client": {
                name: [line for line in text.splitlines() if f'"{client_id}"' in line] for name, text in logs.items()
            },
        }
        try:
            connz = _monitor(broker.monitors[node], f"/connz?mqtt_client={client_id}&subs=detail")
        except (OSError, ValueError, IndexError) as exc:
            entry["connz_error"] = str(exc)
            traced.append(entry)
            continue
        conns = connz.get("connections") or []
        subs = [
            str(d.get("subject"))
            for c in conns
            if isinstance(c, dict)
            for d in c.get("subscriptions_list_detail") or []
        ]
        entry["subscriptions"] = subs
        consumers: list[dict[str, object]] = []
        for name, doc in jsz.items():
            for consumer in _consumers(doc):
                deliver = (consumer.get("config") or {}).get("deliver_subject")
                if deliver in subs:
                    cluster = consumer.get("cluster") or {}
                    consumers.append({
                        "seen_on": name, "deliver_subject": deliver, "name": consumer.get("name"),
                        "leader": cluster.get("leader"), "push_bound": consumer.get("push_bound", False),
                        "delivered": (consumer.get("delivered") or {}).get("consumer_seq"),
                        "num_pending": consumer.get("num_pending"), "num_ack_pending": consumer.get("num_ack_pending"),
                        "num_redelivered": consumer.get("num_redelivered"), "created": consumer.get("created"),
                    })  # fmt: skip
        entry["consumers"] = consumers
        entry["log_lines"] = {
            name: [line for line in text.splitlines() if any(s in line for s in subs if s.startswith("$MQTT.sub."))]
            for name, text in logs.items()
        }
        traced.append(entry)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"fanout-trace-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"per_listener": per_listener, "streams": streams, "short": traced}, indent=1) + "\n")
    print(f"  {len(short)} QoS 1 listeners short: traced in {out}", flush=True)
    return out


def _consumers(jsz: Any) -> Iterator[Any]:
    """Every consumer detail in a node's ``/jsz?accounts=true&streams=true&consumers=true`` answer."""
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            yield from stream.get("consumer_detail") or []


def fan(broker: Broker, shape: Shape, qos: int) -> dict[str, object]:
    """Run ``shape`` at ``qos``: deliveries a second from the first line sent to the last received."""
    assert MOSQUITTO_PUB is not None
    rooms = [f"f{qos}r{i:03d}" for i in range(shape.rooms)]  # one width: every stamp line has one length
    line = encode(ChatMessage(id=new_id(), text="x" * 60)).decode()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        listeners = Listeners(broker, qos, Path(tmp))
        talkers: list[subprocess.Popen[str]] = []
        try:
            for i, room in enumerate(rooms):
                for name in shape.listeners(i):
                    listeners.add(name, f"{name}:fsub{qos}", room)
            for i, room in enumerate(rooms):
                for name in shape.speakers(i):
                    talkers.append(subprocess.Popen(
                        [MOSQUITTO_PUB, *listeners.common, "-p", str(listeners.port(len(talkers) + 1)), "-u", name,
                         "-i", f"{name}:fpub{qos}", "-t", T.room(room, name), "-l"],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                    ))  # fmt: skip
            listeners.ready()
            time.sleep(0.5)  # let the talkers' CONNECTs finish: lines written earlier would wait for them
            body = (line + "\n") * shape.lines
            cpu_before = cpu_seconds(broker.pid)
            started = time.time()
            for talker in talkers:
                assert talker.stdin is not None
                talker.stdin.write(body)
                talker.stdin.close()
            marker = f" {T.prefix}/room/f{qos}r"
            per_line = len(f"{started:.9f} ") + len(T.room(rooms[0], user(0))) + 1
            expected_bytes = shape.deliveries * per_line
            deadline = time.monotonic() + (300 if qos else 60)
            # QoS 1 on the NATS cluster: a JetStream consumer may stall 2-4 s on a loaded machine
            # (tests/conftest.py), so a 3 s silence there stopped the count with copies still on their way
            quiet = QOS1_QUIET if qos else 3.0
            last_size, last_change = 0, time.monotonic()
            while time.monotonic() < deadline:
                size = sum(path.stat().st_size for path in listeners.files)
                sending = any(talker.poll() is None for talker in talkers)  # a talker waits for a PUBACK
                if size != last_size:
                    last_size, last_change = size, time.monotonic()
                elif time.monotonic() - last_change > quiet and not (qos and sending):
                    break  # nothing more arrives (QoS 0 may lose some)
                if size >= expected_bytes and sum(len(_stamps(p, marker)) for p in listeners.files) >= shape.deliveries:
                    break
                time.sleep(0.1)
            cpu = cpu_seconds(broker.pid) - cpu_before
            unfinished = sum(talker.poll() is None for talker in talkers)
            if qos and broker.monitors and brokers.KEEP_LOGS is not None:
                trace_short(broker, listeners, shape.per_listener, marker, brokers.KEEP_LOGS)
        finally:
            listeners.stop()
            for talker in talkers:
                if talker.poll() is None:
                    talker.kill()
                talker.wait()
        delivered, last, short, stamps = 0, started, [], [started]
        for path in listeners.files:
            got = _stamps(path, marker)
            stamps += got
            delivered += len(got)
            if len(got) < shape.per_listener:
                short.append(shape.per_listener - len(got))
            if got:
                last = max(last, *got)
    elapsed = max(last - started, 1e-6)
    return {
        "rooms": shape.rooms,
        "members": shape.members,
        "talkers": shape.talkers * shape.rooms,
        "messages": shape.messages,
        "qos": qos,
        "expected_deliveries": shape.deliveries,
        "deliveries": delivered,
        "listeners_short": sorted(short, reverse=True),  # copies each listener missed, largest first
        "talkers_unfinished": unfinished,  # still waiting for PUBACKs when the count stopped
        # the longest time without a new copy before the last one: over 3 s, the former wait stopped there
        "longest_gap_s": round(max(b - a for a, b in itertools.pairwise(sorted(stamps))) if delivered else 0.0, 3),
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(delivered / elapsed),
        # the broker's process only (not its workers): CPU per copy, steadier than the rate on a loaded machine
        "broker_cpu_us_per_delivery": round(cpu / max(delivered, 1) * 1e6, 1),
    }


@contextlib.contextmanager
def room_flood(broker: Broker, listeners: int, rate: float) -> Iterator[dict[str, object]]:
    """A bot (account ``flood``) says ``rate`` lines a second at QoS 1 into a room that ``listeners``
    hear, for as long as the block runs; the figures of the flood are added to the yielded dict."""
    assert MOSQUITTO_PUB is not None
    figures: dict[str, object] = {}
    line = encode(ChatMessage(id=new_id(), text="flood " + "x" * 60)).decode() + "\n"
    stop = threading.Event()
    sent = 0

    def pace(stdin: object) -> None:
        nonlocal sent
        period, next_at = 1.0 / rate, time.perf_counter()
        while not stop.is_set():
            try:
                stdin.write(line)  # type: ignore[attr-defined]
                stdin.flush()  # type: ignore[attr-defined]
            except (BrokenPipeError, ValueError):
                return
            sent += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.perf_counter()))

    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        subs = Listeners(broker, 1, Path(tmp))
        bot: subprocess.Popen[str] | None = None
        try:
            for j in range(listeners):
                subs.add(user(j), f"{user(j)}:flood", "flood")
            subs.ready()
            bot = subprocess.Popen(
                [MOSQUITTO_PUB, *subs.common, "-p", str(subs.port(1)), "-u", "flood", "-i", "flood:bot",
                 "-t", T.room("flood", "flood"), "-l"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            pacer = threading.Thread(target=pace, args=(bot.stdin,), daemon=True)
            started = time.perf_counter()
            pacer.start()
            yield figures
            stop.set()
            pacer.join()
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            if bot is not None:
                if bot.poll() is None:
                    bot.kill()
                bot.wait()
            subs.stop()
        heard = sum(len(_stamps(p, f" {T.prefix}/room/flood/")) for p in subs.files)
    figures["flood"] = f"{rate:g} msg/s to {listeners} room listeners"
    figures["flood_sent"] = sent
    figures["flood_deliveries_per_s"] = round(heard / elapsed)
