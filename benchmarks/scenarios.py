"""The five scenarios of issue 7, each run against one started broker.

Every scenario returns a flat dict of figures. The load generators are other processes:
the C clients ``mosquitto_sub``/``mosquitto_pub`` for fan-out, and crowds of asyncio
clients (``benchmarks/crowd.py``), several processes at a time, for signed-in users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from benchmarks import stalltrace
from benchmarks.brokers import GC_LOG_MS, PASSWORD, REPO, Broker, rss_mb
from benchmarks.fanout import Shape, fan
from benchmarks.mqttload import LoadClient
from imcli.core.wire import ChatMessage, Roster, Topics, WhoRequest, decode, encode, new_id

T = Topics()
SUBACK_FAILURE = 0x80
STDBUF = shutil.which("stdbuf")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, period: float = 0.02) -> None:
    """Poll ``predicate`` (a file, a process) until it holds; the benchmark's only waiting."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g}s")
        time.sleep(period)


# ---------------------------------------------------------------- 1. room fan-out


def fanout(broker: Broker, members: int, messages: int, qos: int) -> dict[str, object]:
    """``members`` each say ``messages / members`` lines in one room; everyone hears everything
    (``benchmarks/fanout.py`` runs it, and the other shapes of issue 21)."""
    return fan(broker, Shape(1, members, members, messages // members), qos)


# ---------------------------------------------------------------- crowds


@dataclass
class Crowds:
    """Several ``benchmarks.crowd`` processes holding ``users`` signed-in users between them."""

    procs: list[subprocess.Popen[str]]

    @classmethod
    @contextlib.contextmanager
    def join(
        cls,
        broker: Broker,
        users: int,
        processes: int,
        *,
        status: bool = True,
        listeners: int = 0,
        talk: float = 0,
        extra: tuple[str, ...] = (),
    ) -> Iterator[tuple[Crowds, dict[str, float]]]:
        if broker.ports:  # a cluster: as many crowds on every node
            processes = -(-processes // len(broker.ports)) * len(broker.ports)
        share = -(-users // processes)
        procs = []
        for k in range(processes):
            first, count = k * share, min(share, users - k * share)
            if count <= 0:
                break
            args = ["--port", str(broker.port_of(k)), "--first", str(first), "--count", str(count),
                    "--concurrency", str(broker.crowd_concurrency), *extra]  # fmt: skip
            if k == 0:
                args += ["--room-listeners", str(listeners), "--talk", str(talk)]
            if not status:
                args.append("--no-status")
            if broker.passwords_file is not None:
                args += ["--passwords", str(broker.passwords_file)]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.crowd", *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            ))  # fmt: skip
        crowds = cls(procs)
        try:
            joined = crowds.collect("joined")
            ok = sum(int(j["ok"]) for j in joined)
            t0, t1 = min(j["t0"] for j in joined), max(j["t1"] for j in joined)
            yield (
                crowds,
                {
                    "ok": ok,
                    "refused": sum(int(j["refused"]) for j in joined),
                    "seconds": t1 - t0,
                    "sub_retried": sum(int(j.get("sub_retried", 0)) for j in joined),
                    "sub_refused": sum(int(j.get("sub_refused", 0)) for j in joined),
                    "dropped": sum(int(j.get("dropped", 0)) for j in joined),
                    "retried": sum(int(j.get("retried", 0)) for j in joined),
                    "closed_retried": sum(int(j.get("closed_retried", 0)) for j in joined),
                },
            )
        finally:
            crowds.quit()

    def collect(self, event: str) -> list[dict[str, float]]:
        lines = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a crowd process ended before {event}")
            record = json.loads(line)
            assert record["event"] == event, record
            lines.append(record)
        return lines

    def command(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()

    def quit(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class Watcher:
    """A signed-in observer: presence records, and `who` requests with their replies."""

    def __init__(self) -> None:
        self.online: set[str] = set()
        self.records = 0
        self.replies: dict[str, tuple[float, bytes]] = {}
        self.changed = asyncio.Event()
        self.client = LoadClient(on_message=self)

    def __call__(self, topic: str, payload: bytes) -> None:
        parsed = T.parse(topic)
        if parsed is None:
            return
        if "/reply/" in topic and parsed.key:
            self.replies[parsed.key] = (time.perf_counter(), payload)
        elif payload and parsed.owner:
            record = json.loads(payload)
            self.records += 1
            if record.get("state") == "online":
                self.online.add(record["account"])
            else:
                self.online.discard(record["account"])
        self.changed.set()

    async def start(self, port: int, qos: int = 1) -> None:
        """``qos=0`` on a NATS cluster: there a QoS 1 subscription gets a QoS 1 publish only from its
        JetStream consumer, made after the node sent the subscription's retained messages and starting
        at the next stored message (nats-server 2.9.10 ``processSubs``, ``mqttDeliverMsgCbQos0``:
        server/mqtt.go:1998, 2025-2032, 3432-3434, 3699), so a presence record written in between (seconds on
        a loaded cluster) never reached the watcher, which then waited its whole timeout (a run of
        1,000 users here: every record online, the watcher short). A QoS 0 subscription is a plain
        NATS one, made before the retained messages are read: nothing falls between."""
        rc = await self.client.connect("127.0.0.1", port, "watch", PASSWORD, "watch:bench")
        if rc != 0:
            raise RuntimeError(f"watcher refused: {rc}")
        for topic in (T.presence_filter(), T.reply_filter("watch")):
            for _ in range(60):  # NATS refuses (0x80) when its JetStream consumer is not created in time
                if await self.client.subscribe(topic, qos) != SUBACK_FAILURE:
                    break
                await asyncio.sleep(1.0)
            else:
                raise RuntimeError(f"watcher's SUBSCRIBE to {topic} refused 60 times")

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.perf_counter() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{what} within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))

    async def who(self, timeout: float = 60) -> tuple[float, int, int]:
        corr = new_id()
        started = time.perf_counter()
        await self.client.publish(T.request("watch", corr), encode(WhoRequest()))
        await self.until(lambda: corr in self.replies, timeout, "a who reply")
        arrived, payload = self.replies.pop(corr)
        roster = decode(payload)
        assert isinstance(roster, Roster)
        return arrived - started, len(roster.users), len(payload)


# ---------------------------------------------------------------- 2. DM latency


async def dm_pings(
    port: int,
    samples: int,
    rate: float,
    receiver_port: int | None = None,
    *,
    stamps: list[tuple[str, float, float]] | None = None,
) -> list[tuple[float, float]]:
    """The DM scenario's pinger: ``samples`` DMs at ``rate`` a second from five senders to one
    receiver (on ``receiver_port``, another node of a cluster, if given); (epoch sent, seconds)
    of each DM that arrived. benchmarks/dmtail.py runs the same pinger in a process of its own;
    ``stamps`` gets (message id, ``perf_counter`` sent, received) of each (benchmarks/dmsplit.py)."""
    senders = ["pinga", "pingb", "pingc", "pingd", "pinge"]
    sent: dict[str, tuple[float, float]] = {}
    out: list[tuple[float, float]] = []
    done = asyncio.Event()

    def received(topic: str, payload: bytes) -> None:
        message_id = json.loads(payload)["id"]
        if message_id in sent:
            epoch, started = sent.pop(message_id)
            now = time.perf_counter()
            out.append((epoch, now - started))
            if stamps is not None:
                stamps.append((message_id, started, now))
            if len(out) >= samples:
                done.set()

    receiver = LoadClient(on_message=received)
    assert await receiver.connect("127.0.0.1", receiver_port or port, "pongr", PASSWORD, "pongr:bench") == 0
    await receiver.subscribe(T.user_filter("pongr"))
    clients = []
    for name in senders:
        client = LoadClient()
        assert await client.connect("127.0.0.1", port, name, PASSWORD, f"{name}:bench") == 0
        clients.append(client)
    period, next_at = 1.0 / rate, time.perf_counter()
    pending = set()
    for i in range(samples):
        message = ChatMessage(id=new_id(), text=f"ping {i}")
        sender = senders[i % len(senders)]
        sent[message.id] = (time.time(), time.perf_counter())
        # open loop: the next ping leaves on time whether or not the last one was acknowledged
        pending.add(asyncio.ensure_future(clients[i % len(clients)].publish(T.dm("pongr", sender), encode(message))))
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30)
    await asyncio.gather(*pending, return_exceptions=True)
    for client in [receiver, *clients]:
        await client.disconnect()
    return out


def dm_latency(
    broker: Broker,
    idle_users: int,
    samples: int,
    talk: float,
    during: Callable[[], contextlib.AbstractContextManager[dict[str, Any]]] | None = None,
) -> dict[str, object]:
    """DM latency among ``idle_users`` signed in, 50 of them hearing ``talk`` room lines a second;
    ``during`` (a background load's context, whose figures join the result) runs around the DMs only."""
    listeners = 50
    background: dict[str, Any] = {}
    with Crowds.join(broker, idle_users, 2, status=broker.has_presence, listeners=listeners, talk=talk) as (_, joined):
        with during() if during is not None else contextlib.nullcontext(background) as background:
            pings = asyncio.run(dm_pings(broker.port, samples, rate=50.0, receiver_port=broker.port_of(2)))
        latencies = sorted(took for _, took in pings)
    if not latencies:
        return {"idle_users": joined["ok"], "samples": 0, **background}
    quantile = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        **background,
        "idle_users": joined["ok"],
        "background": f"{talk:g} msg/s to {listeners} room listeners",
        "samples": len(latencies),
        "lost": samples - len(latencies),
        "p50_ms": round(quantile[49] * 1000, 2),
        "p99_ms": round(quantile[98] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
    }


# ---------------------------------------------------------------- 3. capacity


PRESENCE_TIMEOUT = 600.0  # seconds for presence to list everyone who joined (a cluster: three times)
LEAVE_TAIL = 3.0  # seconds the stall probe goes on after everyone has left (capacity without a rejoin)
KEEPALIVE = 30  # seconds: imcli's clients (paho) send a PINGREQ this often when idle; the crowds do too in a hold
RSS_SAMPLE_EVERY = 30.0  # seconds between memory samples in a hold


def _memory(broker: Broker) -> dict[str, float]:
    return {
        "broker": round(broker.rss_mb(), 1),
        **{what.replace(" ", "_"): round(rss_mb(pid), 1) for what, pid in broker.extra_pids.items()},
    }


def _pauses(broker: Broker, since: int, prefix: str) -> dict[str, object]:
    """The collector's own pauses that ``imcli serve`` logged (imcli/broker/gcpause.py), if it logs them."""
    if broker.log_path is None:
        return {}
    pauses = broker.collector_pauses(since)
    longest = max(pauses, default=(0.0, -1, 0.0))
    return {
        f"{prefix}gc_pauses_over_{GC_LOG_MS}ms": len(pauses),
        f"{prefix}gc_pauses_over_50ms": sum(1 for ms, _, _ in pauses if ms >= 50),
        f"{prefix}gc_longest_ms": longest[0],
        f"{prefix}gc_longest_generation": longest[1],
        f"{prefix}gc_longest_cpu_ms": longest[2],  # the rest of its wall time: waiting for a core
        f"{prefix}gc_most_cpu_ms": max((cpu for _, _, cpu in pauses), default=0.0),
        f"{prefix}gc_full_collections_logged": sum(1 for _, gen, _ in pauses if gen == 2),
    }


def capacity(
    broker: Broker,
    users: int,
    processes: int,
    hold: float = 0.0,
    on_hold: Callable[[], None] | None = None,
    on_hold_end: Callable[[], None] | None = None,
    *,
    rejoin: bool = True,
    on_leave: Callable[[], None] | None = None,
) -> dict[str, object]:
    """``users`` sign in (status, Last Will, their own filter); presence must see them all and
    ``who`` list them; memory is read; then everyone leaves and comes back. ``hold``: before
    leaving, everyone stays signed in that many seconds, sending a PINGREQ every ``KEEPALIVE``
    seconds as imcli's clients do, while memory is sampled (``on_hold`` is called as it starts:
    the stall probe's phase). ``rejoin=False`` leaves the rejoin out (the NATS cluster creates a
    dozen replicated consumers a second here: a rejoin of 20,000 takes as long as the join)."""
    result: dict[str, object] = {"users": users, "rss_mb_idle": round(broker.rss_mb(), 1)}
    room = broker.connection_room()
    if room is not None and room[1] < users:
        # one broker process holds every user's socket: past its open-file limit it stops accepting (EMFILE),
        # so the crowd is what the limit lets in, and says so (docs/SCALING.md, "sixth session")
        result["users_asked"], result["users"] = users, room[1]
        result["capped_by"] = f"the broker process's open-file limit ({room[0]}, ulimit -n)"
        users = room[1]
    log_start = broker.log_size()

    async def observe(port: int) -> tuple[Watcher, float]:
        watcher = Watcher()
        await watcher.start(port, 0 if broker.ports else 1)
        started = time.perf_counter()
        # a cluster's presence records are replicated JetStream writes, each acknowledged by its stream's
        # quorum: 20,000 take the presence worker more than ten minutes there (docs/SCALING.md)
        timeout = PRESENCE_TIMEOUT * (3 if broker.ports else 1)
        await watcher.until(lambda: len(watcher.online) >= users, timeout, f"{users} users online in presence")
        return watcher, time.perf_counter() - started

    async def who(watcher: Watcher, prefix: str = "") -> None:
        timings = [await watcher.who() for _ in range(5)]
        result[f"{prefix}who_ms_median"] = round(statistics.median(t[0] for t in timings) * 1000, 1)
        result[f"{prefix}who_ms_max"] = round(max(t[0] for t in timings) * 1000, 1)
        result[f"{prefix}who_users"] = timings[0][1]
        result[f"{prefix}who_reply_kb"] = round(timings[0][2] / 1024)

    async def settle_and_hold() -> None:
        watcher, settled = await observe(broker.port)
        result["presence_settled_s"] = round(settled, 2)
        await who(watcher)
        if broker.trace_path is not None:  # --trace-stalls: the probe's join phase (logins, presence, `who`) traced
            traced = stalltrace.read(broker.trace_path, join_began, time.time())
            result.update({f"join_{name}": figure for name, figure in traced.items()})
        if hold <= 0:
            await watcher.client.disconnect()
            return
        result["rss_mb_loaded"] = round(broker.rss_mb(), 1)
        if on_hold is not None:
            on_hold()
        hold_log = broker.log_size()
        hold_began = time.time()
        samples: list[dict[str, float]] = []
        started = time.perf_counter()
        while (left := hold - (time.perf_counter() - started)) > 0:
            samples.append(_memory(broker))
            await asyncio.sleep(min(RSS_SAMPLE_EVERY, left))
            watcher.client.send_ping()
        samples.append(_memory(broker))
        result["hold_s"] = round(time.perf_counter() - started)
        if broker.trace_path is not None:  # --trace-stalls: what the loop ran when it held the CPU long
            traced = stalltrace.read(broker.trace_path, hold_began, time.time())
            result.update({f"hold_{name}": figure for name, figure in traced.items()})
        if on_hold_end is not None:  # the hold's figures end here: the who below and everyone leaving are apart
            on_hold_end()
        result["hold_online_at_end"] = len(watcher.online)
        await who(watcher, "hold_end_")
        for what in samples[0]:
            series = [sample[what] for sample in samples]
            result[f"hold_rss_mb_{what}_start_max_end"] = [series[0], max(series), series[-1]]
        result.update(_pauses(broker, hold_log, "hold_"))
        await watcher.client.disconnect()

    extra: tuple[str, ...] = ("--keepalive", str(KEEPALIVE), "--pings") if hold > 0 else ()
    if broker.ports and not extra:  # a cluster's join outlasts 1.5 keepalives (600 s): ping every 600 s
        extra = ("--pings",)
    join_began = time.time()  # the stall probe's join phase begins about now (its trace: join_trace_*)
    with Crowds.join(broker, users, processes, status=broker.has_presence, extra=extra) as (_, joined):
        result["joined"] = joined["ok"]
        result["refused"] = joined["refused"]
        result["join_seconds"] = round(joined["seconds"], 2)
        result["connects_per_s"] = round(joined["ok"] / joined["seconds"])
        if joined["sub_retried"] or joined["sub_refused"]:
            result["subscribes_retried"], result["subscribes_refused"] = joined["sub_retried"], joined["sub_refused"]
        if joined["dropped"]:
            result["dropped_mid_join"] = joined["dropped"]
        if joined["retried"]:  # CONNECTs refused as busy or closed before a CONNACK, and tried again
            result["connects_retried"], result["connects_closed_retried"] = joined["retried"], joined["closed_retried"]
        if broker.has_presence:
            try:
                asyncio.run(settle_and_hold())
            except (TimeoutError, RuntimeError, OSError) as exc:  # keep the figures measured so far
                result["error"] = f"{type(exc).__name__}: {exc}"
        elif hold > 0:  # no presence to watch (stock amqtt): hold all the same
            if on_hold is not None:
                on_hold()
            time.sleep(hold)
        result["rss_mb_loaded" if hold <= 0 else "rss_mb_held"] = round(broker.rss_mb(), 1)
        for what, mb in _memory(broker).items():
            if what != "broker":
                result[f"rss_mb_{what}"] = mb
        result["rss_mb_total"] = round(sum(_memory(broker).values()), 1)
        if on_leave is not None:  # everyone leaves at once as this block ends (the stall probe's phase)
            on_leave()
        leave_began, leave_log = time.time(), broker.log_size()
    if on_leave is not None and not rejoin:
        # the crowds have sent their DISCONNECTs; the broker's ends of them go on a slice a loop round
        # (imcli/broker/teardown.py): the probe's leave phase goes on while they do
        time.sleep(LEAVE_TAIL)
        if broker.trace_path is not None:  # --trace-stalls: the leave's slow rounds, callbacks and collections too
            traced = stalltrace.read(broker.trace_path, leave_began, time.time())
            result.update({f"leave_{name}": figure for name, figure in traced.items()})
        if broker.log_path is not None and broker.log_path.exists():  # what the broker logged as they left
            with broker.log_path.open("rb") as log:
                log.seek(leave_log)
                lines = log.read().decode("utf-8", "replace").splitlines()
            result["leave_log_lines"] = len(lines)
            result["leave_log_closed_not_reading"] = sum(1 for line in lines if "it does not read" in line)
            result["leave_log_sample"] = [line[:200] for line in lines if "collection" not in line][:3]
    result.update(_pauses(broker, log_start, ""))
    if not rejoin or "error" in result:
        return result
    # everyone leaves and comes back: logins the broker has verified before (a network blip)
    with Crowds.join(broker, users, processes, status=broker.has_presence) as (_, rejoined):
        result["rejoined"] = rejoined["ok"]
        result["reconnects_per_s"] = round(rejoined["ok"] / rejoined["seconds"])
    return result


# ---------------------------------------------------------------- 4. presence churn


def churn(broker: Broker, users: int, processes: int) -> dict[str, object]:
    if not broker.has_presence:
        return {"skipped": "no presence worker on this broker"}
    result: dict[str, object] = {"users": users}

    async def settle(watcher: Watcher, records: int) -> float:
        started = time.perf_counter()
        await watcher.until(
            lambda: watcher.records >= records and len(watcher.online) >= users, 600, "a settled roster"
        )
        return time.perf_counter() - started

    with Crowds.join(broker, users, processes) as (crowds, _):

        async def run() -> None:
            watcher = Watcher()
            await watcher.start(broker.port, 0 if broker.ports else 1)
            await watcher.until(lambda: len(watcher.online) >= users, 600, "everyone online")
            before = watcher.records
            started = time.perf_counter()
            crowds.command("flip")
            # the crowds flip in their own processes; this loop keeps reading the records meanwhile
            flipped = await asyncio.to_thread(crowds.collect, "flipped")
            changes = sum(int(f["changes"]) for f in flipped)
            await settle(watcher, before + changes)
            elapsed = time.perf_counter() - started
            _, listed, _ = await watcher.who()
            result["status_changes"] = changes
            result["seconds"] = round(elapsed, 2)
            result["status_changes_per_s"] = round(changes / elapsed)
            result["roster_consistent"] = listed == users and len(watcher.online) == users
            await watcher.client.disconnect()

        asyncio.run(run())
    return result


# ---------------------------------------------------------------- 5. CLI cold start


PAHO_SAY = REPO / "benchmarks" / "paho_say.py"


def cold_start(broker: Broker, runs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        env = {**os.environ, "IMCLI_CONFIG_DIR": tmp, "COLUMNS": "200"}
        env.pop("IMCLI_PASSWORD", None)
        imcli = [sys.executable, "-m", "imcli"]
        subprocess.run(
            [*imcli, "login", "colds", "--host", "127.0.0.1", "--port", str(broker.port), "--password-stdin"],
            input=PASSWORD + "\n", env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        commands = {
            "imcli_say": [*imcli, "say", "cold start", "--room", "bench"],
            "paho_script": [sys.executable, str(PAHO_SAY), str(broker.port), "colds", PASSWORD],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(runs):
            for name, command in commands.items():  # interleaved, so noise hits both alike
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - started)
    say_ms = statistics.median(times["imcli_say"]) * 1000
    paho_ms = statistics.median(times["paho_script"]) * 1000
    return {
        "runs": runs,
        "imcli_say_ms": round(say_ms, 1),
        "paho_script_ms": round(paho_ms, 1),
        "ratio": round(say_ms / paho_ms, 2),
    }
