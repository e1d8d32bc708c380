"""Where the embedded broker's memory per signed-in user goes (issue 21: 10,000 users <= 400 MB).

    python -m benchmarks.memory [--users 2000] [--processes 2] [--tracemalloc] [--top 25]

Runs the broker as ``imcli serve`` does (``serve_forever`` in this process, the workers in their
child process, the collector tuned by imcli/broker/gcpause.py), signs ``--users`` idle users in
from crowd processes (benchmarks/crowd.py: status, Last Will, their own filter, as ``imcli
listen``), then prints what each user added: the broker's RSS, the objects the collector tracks
by type (``gc.get_objects()``, frozen ones included), and with ``--tracemalloc`` the source lines
that allocated the bytes (tracemalloc slows the broker and costs memory of its own: its RSS
figure is then not the broker's). The workers' process RSS is printed too; with
``--workers-in-threads`` the workers run in this process instead, and the figures are theirs and
the broker's together.

``--talk R`` has ten users say ``R`` room messages a second in all to 50 listeners meanwhile.
``--hold S`` keeps everyone signed in ``S`` more seconds, each user sending a PINGREQ every 30 s
(imcli's keepalive), and prints the collector's own pauses, timed in this process
(``gc.callbacks``: CPU time of the thread that collected, which a loaded machine moves far less
than wall time) during the join and during the hold, by generation; then one full collection as
the broker's collector makes it (frozen objects left out), the daily leak check's pause (its
``fork()``) and what it found, a compaction's (everything unfrozen), the frozen generation at the
hold's start and end (it grows with leaked cycles, not with time), and, once everyone has left,
how many unreachable objects the frozen generation kept (cycles frozen with the sessions: what
only a compaction frees).

``--probe`` times the broker's event loop round by round (benchmarks/dmtail.py ``_LoopProbe``) and
prints, for each phase (``loop_join``, ``loop_hold``, ``loop_who``: one `who` of everyone after the
hold, ``loop_leave``: everyone leaving at once), the rounds whose callbacks took 20 ms or more with
what ran in them by kind, callbacks over 20 ms of CPU and collections over 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import tempfile
import threading
import time
import tracemalloc
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.brokers import PASSWORD, _children, rss_mb, user_names
from benchmarks.scenarios import Crowds, Watcher
from imcli.broker import gcpause
from imcli.broker.limits import Limits


class _Here:
    """What ``Crowds.join`` needs of a broker: its port and passwords (none: one password for all)."""

    name = "embedded"
    passwords_file = None
    ports: list[int] = []  # noqa: RUF012 - never changed: one broker, not a cluster
    crowd_concurrency = 100

    def __init__(self, port: int) -> None:
        self.port = port

    def port_of(self, i: int) -> int:
        return self.port


def _objects_by_type() -> collections.Counter[str]:
    """Every object the collector tracks, frozen or not, by type (no collection: imcli's callback
    would freeze everything again)."""
    gc.unfreeze()  # gc.get_objects() leaves frozen objects out
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    gc.freeze()
    return counts


class _Collections:
    """Every collection of this process: (generation, CPU ms, wall ms, collected), from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float, int]] = []
        self._started = self._cpu = 0.0

        self.look = False  # note what a young collection walks (``slow``)
        self.slow: list[dict[str, object]] = []  # collections that used 5 ms of CPU or more
        self._walked: dict[str, object] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            if self.look:
                self._walked = _young(info["generation"])
            self._started, self._cpu = time.perf_counter(), time.thread_time()
        else:
            cpu, wall = time.thread_time() - self._cpu, time.perf_counter() - self._started
            self.seen.append((info["generation"], cpu * 1000, wall * 1000, info["collected"]))
            if self.look and cpu >= 0.005:
                self.slow.append({"generation": info["generation"], "cpu_ms": round(cpu * 1000, 1), **self._walked})

    def summary(self, since: int) -> dict[str, object]:
        """Collections after the ``since``-th, by generation: count, CPU ms in all, longest CPU ms."""
        out: dict[str, object] = {}
        for generation in (0, 1, 2):
            these = [c for c in self.seen[since:] if c[0] == generation]
            out[f"gen{generation}"] = {
                "count": len(these),
                "cpu_ms_total": round(sum(c[1] for c in these), 1),
                "cpu_ms_max": round(max((c[1] for c in these), default=0.0), 2),
                "wall_ms_max": round(max((c[2] for c in these), default=0.0), 2),
                "collected": sum(c[3] for c in these),
            }
        return out


def _young(generation: int) -> dict[str, object]:
    """What a collection of ``generation`` is about to walk (frozen objects left out): objects, and the
    largest containers."""
    objects = [o for g in range(generation + 1) for o in gc.get_objects(g)]
    containers = (list, dict, set, tuple, collections.deque)
    sized = sorted(((len(o), type(o).__qualname__) for o in objects if isinstance(o, containers)), reverse=True)
    return {"objects": len(objects), "largest": sized[:3]}


def _by_type(objects: list[object], top: int) -> list[tuple[str, int]]:
    return collections.Counter(type(o).__qualname__ for o in objects).most_common(top)


def _innermost(tb: types.TracebackType) -> str:
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 2)[-1]}:{tb.tb_lineno} {code.co_qualname}"


def _timed_collection() -> tuple[float, int]:
    """One full collection now (this thread holds the GIL: the broker's loop waits): CPU ms, collected."""
    cpu = time.thread_time()
    collected = gc.collect()
    return round((time.thread_time() - cpu) * 1000, 2), collected


def _write_accounts(data: Path, users: int) -> None:
    from argon2 import PasswordHasher

    from imcli.broker.accounts import AccountStore

    store = AccountStore(data, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    digest = store._hasher.hash(PASSWORD)
    doc = {
        "version": 1,
        "accounts": {n: {"role": "user", "created": time.time(), "hash": digest} for n in user_names(users)},
    }
    (data / AccountStore.FILE_NAME).write_text(json.dumps(doc))
    os.chmod(data / AccountStore.FILE_NAME, 0o600)


def serve_here(users: int, prefix: str, drive: Callable[[int], None], *, workers_in_child: bool = True) -> None:
    """Runs the broker as ``imcli serve`` does (``serve_forever`` in this thread, its workers in
    their child process unless ``workers_in_child`` is false), with ``users`` accounts of one
    password and the benchmark broker's limits (benchmarks/brokers.py: no publish limit, a login
    queue for every crowd); calls ``drive(port)`` in another thread once it listens, and stops
    the broker when ``drive`` returns or raises. benchmarks/dmtail.py runs its broker with this too."""
    from imcli.broker.settings import BrokerSettings
    from imcli.serve import loops
    from imcli.serve.host import ServeInfo, serve_forever

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _write_accounts(data, users)
        limits = Limits(publish_rate=1e6, publish_burst=1_000_000, password_queue=4096)
        settings = BrokerSettings(data_dir=data, port=0, limits=limits)
        ready = threading.Event()
        port: list[int] = []
        stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

        def on_ready(info: ServeInfo) -> None:
            port.append(info.address.port)
            ready.set()

        def driver() -> None:
            ready.wait(120)
            try:
                drive(port[0])
            finally:  # whatever happened, the broker stops
                loop, event = stop[0]
                loop.call_soon_threadsafe(event.set)

        async def main() -> None:
            event = asyncio.Event()
            stop.append((asyncio.get_running_loop(), event))
            threading.Thread(target=driver, daemon=True).start()
            await serve_forever(settings, on_ready, event, workers_in_child=workers_in_child)

        loops.run(main())  # the loop IMCLI_LOOP names (imcli/serve/loops.py), asyncio's by default


def measure(
    users: int,
    processes: int,
    trace: bool,
    top: int,
    *,
    threads: bool = False,
    hold: float = 0.0,
    talk: float = 0.0,
    probe_loop: bool = False,
) -> dict[str, object]:
    result: dict[str, object] = {"users": users}
    collections_seen = _Collections()
    gc.callbacks.insert(0, collections_seen)  # first: the broker's own callbacks are not in its times
    marks: dict[str, float] = {}  # epochs where the phases begin and end (``--probe``)
    loop_probe = None
    if probe_loop:  # the broker's loop, round by round (benchmarks/dmtail.py)
        from benchmarks.dmtail import _LoopProbe

        loop_probe = _LoopProbe(rounds=True)

    def probe(port: int) -> None:
        me = os.getpid()
        before = _objects_by_type()
        rss_before = rss_mb(me)
        if trace:
            tracemalloc.start(1)
            snap_before = tracemalloc.take_snapshot()
        joined_figures(port, me, before, rss_before, snap_before if trace else None)

    def joined_figures(
        port: int, me: int, before: collections.Counter[str], rss_before: float, snap: tracemalloc.Snapshot | None
    ) -> None:
        before_join = len(collections_seen.seen)
        extra = ("--keepalive", "30", "--pings") if hold > 0 else ()
        here: Any = _Here(port)
        listeners = 50 if talk else 0
        marks["join"] = time.time()
        with Crowds.join(here, users, processes, extra=extra, listeners=listeners, talk=talk) as (_, joined):
            time.sleep(10)  # the presence worker's records, the retained statuses
            marks["joined"] = time.time()
            result["collections_join"] = collections_seen.summary(before_join)
            result["joined"] = joined["ok"]
            result["rss_mb_before"] = round(rss_before, 1)
            result["rss_mb_after"] = round(rss_mb(me), 1)
            result["kb_per_user"] = round((rss_mb(me) - rss_before) * 1024 / users, 1)
            result["workers_rss_mb"] = [round(rss_mb(c), 1) for c in _children(me)]
            if snap is not None:
                snap_after = tracemalloc.take_snapshot()
                stats = snap_after.compare_to(snap, "lineno")
                result["traced_kb_per_user"] = round(sum(s.size_diff for s in stats) / 1024 / users, 2)
                result["top_lines_bytes_per_user"] = [
                    (str(s.traceback[0]), round(s.size_diff / users)) for s in stats[:top]
                ]
                tracemalloc.stop()
            after = _objects_by_type()
            grown = {k: v - before.get(k, 0) for k, v in after.items()}
            result["objects_per_user"] = round(sum(grown.values()) / users, 1)
            result["top_types_per_user"] = [
                (k, round(v / users, 2)) for k, v in sorted(grown.items(), key=lambda kv: -kv[1])[:top]
            ]
            if hold > 0:
                before_hold = len(collections_seen.seen)
                result["frozen_at_hold_start"] = gc.get_freeze_count()  # grows with a leak, not with time
                collections_seen.look = True
                marks["hold"] = time.time()
                time.sleep(hold)
                marks["hold_end"] = time.time()
                collections_seen.look = False
                if loop_probe is not None:  # a `who` of everyone, as the capacity scenario's at its end
                    result["who_ms_users"] = asyncio.run(_who(port))
                    marks["who_end"] = time.time()
                result["hold_s"] = hold
                result["collections_hold"] = collections_seen.summary(before_hold)
                result["slow_collections_hold"] = collections_seen.slow[:10]
                result["tracked_unfrozen_after_hold"] = len(gc.get_objects())
                result["old_unfrozen_after_hold_by_type"] = _by_type(gc.get_objects(2), top)
                result["frozen_after_hold"] = gc.get_freeze_count()
                # as the broker's collector makes one (its callback freezes what survives)
                result["full_collection_cpu_ms_collected"] = _timed_collection()
                # the daily leak check (gcpause.frozen_garbage): the broker's pause is its fork()
                check = gcpause.frozen_garbage()
                if check is not None:
                    result["leak_check_fork_ms"] = check.paused_ms
                    result["leak_check_found"] = check.objects
                    result["leak_check_found_by_type"] = sorted(check.by_type.items(), key=lambda kv: -kv[1])[:top]
                gc.unfreeze()  # what a compaction costs (gcpause.compact), now only when the check finds many
                result["compaction_cpu_ms_collected"] = _timed_collection()
            time.sleep(2)  # the figures' own pauses (the collections above) are over
            marks["leave"] = time.time()
        marks["left"] = time.time()
        if hold > 0 or loop_probe is not None:
            time.sleep(10)  # everyone has left: their sessions end
            marks["left"] = time.time()
        if loop_probe is not None:
            phases = [("join", "join", "joined"), ("hold", "hold", "hold_end"), ("who", "hold_end", "who_end")]
            for phase, since, until in [*phases, ("leave", "leave", "left")]:
                if since in marks and until in marks:
                    result[f"loop_{phase}"] = loop_probe.slow_rounds(marks[since], marks[until])
        if hold > 0:
            result["frozen_after_leaving"] = gc.get_freeze_count()
            gc.unfreeze()
            # what freezing kept: unreachable objects among those frozen since the compaction
            gc.set_debug(gc.DEBUG_SAVEALL)
            result["unreachable_after_leaving_cpu_ms_collected"] = _timed_collection()
            gc.set_debug(0)
            result["unreachable_after_leaving_by_type"] = _by_type(gc.garbage, top)
            # where the kept exceptions were raised: each traceback's innermost frame
            where = collections.Counter(_innermost(o) for o in gc.garbage if isinstance(o, types.TracebackType))
            result["unreachable_tracebacks_raised_in"] = where.most_common(top)
            gc.garbage.clear()
            result["tracked_after_leaving"] = gc.get_freeze_count() + len(gc.get_objects())
            result["rss_mb_after_leaving"] = round(rss_mb(me), 1)

    if loop_probe is not None:
        loop_probe.install()  # serve_here runs the broker's loop in this thread
    serve_here(users, "bench-memory-", probe, workers_in_child=not threads)
    return result


async def _who(port: int) -> tuple[float, int]:
    """One `who` (the presence worker's roster of everyone): ms to its reply, users in it."""
    watcher = Watcher()
    await watcher.start(port)
    took, listed, _size = await watcher.who()
    await watcher.client.disconnect()
    return round(took * 1000, 1), listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds everyone stays, then the collector's figures")
    parser.add_argument("--talk", type=float, default=0.0, help="room messages/s to 50 listeners meanwhile")
    parser.add_argument(
        "--probe", action="store_true", help="time the broker's loop round by round: what stalls it, by phase"
    )
    parser.add_argument(
        "--workers-in-threads", action="store_true", help="the workers in this process too (in the figures)"
    )
    args = parser.parse_args()
    threads = args.workers_in_threads
    figures = measure(
        args.users, args.processes, args.tracemalloc, args.top,
        threads=threads, hold=args.hold, talk=args.talk, probe_loop=args.probe,
    )  # fmt: skip
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
