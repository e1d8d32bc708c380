"""Short, rare garbage-collection pauses in ``imcli serve`` (issue 7: DM p99, join storms).

CPython's collector stops the whole process while it runs, and a full (generation 2)
collection walks every tracked object: about 190 per idle signed-in user in amqtt. With a
loop-stall probe in the broker's process (every event-loop callback over 15 ms, every
collection over 5 ms):

- DM benchmark, 1,000 users (240,000 objects): every stall above 100 ms was a full
  collection, 100 to 180 ms each;
- capacity benchmark, 10,000 users (about 2 million objects): nine full collections took
  9.9 s in all, 0.6 to 3.6 s each, most of them finding nothing to free. By default one
  runs whenever the old generation has grown by a quarter, so a heap that grows from
  nothing to 2 million objects is walked again and again during a join storm.

``calm_collector`` is called once the broker listens and its workers are up:

- it collects, then freezes (``gc.freeze()``) what start-up allocated, and after every
  later full collection it freezes again what survived it: a full collection then walks
  only what was allocated since the one before, not every session again;
- a full collection comes after every 2 generation 1 collections (threshold 1: CPython collects a
  generation once its count *passes* the threshold; CPython's default is 10, 11 collections):
  since each walks only what was allocated since the one before, frequent ones are short ones
  (issue 21: waiting for 100, as issue 7 did, let a join storm pile up hundreds of thousands of
  objects for one collection to walk; at CPython's 10, each full collection of a join storm
  walked about 67,000 objects, 45 to 58 ms of CPU on this machine, over the 50 ms bound; at 2
  about a fifth of that, 19 ms of CPU at most, in ``python -m benchmarks.memory --users 3000``;
  at 1, the ninth session, each walks two thirds of what it walked at 2, about 14,000 objects in a
  join of 10,000, and the longest used 10.0 and 14.5 ms of CPU against 14.3 and 17.6 at 2 in two
  alternated pairs of ``python -m benchmarks.memory --users 10000 --processes 4``: docs/PERFORMANCE.md);
- generation 1 collections come after every 5 generation 0 collections (CPython's default is 10):
  in a join of 10,000 users (``python -m benchmarks.memory --users 10000``) the longest generation 1
  collection used 18.3 ms of CPU at 10 and 8.4 at 5, the longest full one 19.9 and 13.4 (issue 21,
  sixth session; docs/PERFORMANCE.md);
- frozen objects are still freed by reference counting as usual; only a *cycle* among
  them would stay until a compaction (or the restart). The one cycle every connection made (asyncio's
  socket transport holds a bound method of itself, ``release_transport``) is broken when the
  connection ends, so ordinary traffic leaves none: a probe of 2,000 users joining and leaving
  found 6 unreachable objects per connection among the frozen ones before, 0 after. Once a day
  (``LEAK_CHECK_EVERY``) a thread counts the cycles frozen since start-up without stopping the
  broker (``frozen_garbage``, below), and only if they are many (``COMPACT_AT``) compacts;
- every ``TICK`` (1 s) the event loop runs a full collection itself (``_tick``; put off for up to
  ``DEFER_TICKS`` while a mass leave is served): it walks what
  was allocated since the last one and is still alive, and freezes it. CPython starts a
  collection when allocations outnumber deallocations by 700; with 10,000 idle users each PINGREQ
  replaces a few objects that live until the next one, as many freed as made, so the young
  generations held up to 116,644 objects when they were finally collected (117 ms of CPU for a
  generation 1 collection, 127 ms for a full one, in ``python -m benchmarks.memory --users 10000
  --hold 90``; issue 21); with the tick, no young collection used 5 ms of CPU and the longest full
  one 5.5 ms, in a 60 s hold at 10,000 users.

Frozen objects that become cyclic garbage stay until a compaction: what bounds memory is that
ordinary traffic makes none. The end of a connection made two such cycles, both broken when it
ends: the socket transport's bound method (``release_transport``) and, for a connection reset
by its peer, the exception the reader and the stream share, whose traceback holds the frames that
hold them (imcli/broker/reader.py: 829 of 10,000 connections left 46 objects each, 38,135 in all,
before). Young collections still free most cyclic garbage. Sessions and their queues are
freed by reference counting (``SessionState`` holds its session weakly), so freezing them does
not keep them alive.

The leak check instead of the daily compaction (issue 21: no stall over 50 ms). A compaction
(``gc.unfreeze()`` and one full collection: CPython cannot collect the frozen objects a slice at a
time) walks every object of every session: 765 to 812 ms of CPU at 10,000 users, the GIL held all
along, whether it finds anything or not, and since the two cycles above were broken it found
nothing (0 unreachable objects once 10,000 users had left, with and without room traffic, in
``python -m benchmarks.memory``). Nor can the process tell cheaply whether it would:
``gc.get_freeze_count()`` walks the frozen list (about 30 ms at 2 million objects) and a growing
count is as likely new users as a leak. So ``frozen_garbage`` asks a forked child: the child is a
copy of the heap at that instant, unfreezes and collects it (``DEBUG_SAVEALL``: nothing freed,
every unreachable object counted by type), writes the count to a pipe and exits; the broker's
only pause is ``fork()`` copying its page tables (8 to 15 ms for a 420 MB process on this machine,
measured with 2 million tracked objects; the child's collection takes about 0.4 s of the other
core and copies the pages it touches, up to the broker's size for that second). The child closes
every inherited file descriptor first and points 0 to 2 at /dev/null, so the finalizers its
collection runs (a coroutine's ``finally``, a transport's ``close``) cannot write to the broker's
sockets, its epoll set or its log. Found objects are logged as a warning with their types (a cycle
some path makes: a bug to find, as the two above were); at ``COMPACT_AT`` or more the broker
compacts all the same, memory mattering more than one pause (logged as such). Where ``os.fork``
does not exist the check is skipped and nothing compacts: frozen cycles then wait for the
restart. (Python 3.12 warns that forking a process with threads may deadlock the child: a
finalizer the child runs could wait for a lock another thread held at the fork; the child is
killed after ``CHECK_TIMEOUT`` and the check counts as not made.)

Every collection that stops the broker for ``PAUSE_LOG_MS`` or more (50 ms, issue 21's bound on
a stall; the environment variable ``IMCLI_GC_LOG_MS`` changes it, ``python -m benchmarks`` sets
5) is logged as a warning with its generation, its duration and the CPU time it used (on a busy
machine the difference is time spent waiting for a core): the collector's own pauses, timed
inside the broker (``gc.callbacks``), beside the stall probe's round trips from outside.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any

FULL_COLLECTION_EVERY = 1  # threshold: full after 2 generation 1 collections (CPython's 10; 2 until the ninth session)
MIDDLE_COLLECTION_EVERY = 5  # generation 0 collections (CPython's default: 10; issue 21, sixth session)
TICK = 1.0  # seconds between the event loop's own full collections (``_tick``)
DEFER_TICKS = 10  # ticks in a row whose collection may wait while a mass leave is served (``_tick``)
LEAK_CHECK_EVERY = 86_400.0  # seconds between counts of the frozen generation's cycles (``frozen_garbage``)
COMPACT_AT = 100_000  # unreachable objects (about 10 MB and up) that make the broker compact all the same
CHECK_TIMEOUT = 600.0  # seconds a leak check's child may take (it collects about 2 million objects in 0.4 s)
PAUSE_LOG_MS = 50.0  # a collection this long or longer is logged (IMCLI_GC_LOG_MS overrides)

log = logging.getLogger(__name__)
_started = False


def _pause_log_ms() -> float:
    try:
        return float(os.environ.get("IMCLI_GC_LOG_MS", PAUSE_LOG_MS))
    except ValueError:
        return PAUSE_LOG_MS


class _PauseTimer:
    """A ``gc.callbacks`` entry: times each collection and notes those at or over ``threshold_ms``;
    a thread logs the notes (a callback runs in the middle of whatever allocated: no logging there)."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self.started = self.cpu = 0.0
        # (seconds, CPU seconds, generation, collected); no frozen count: gc.get_freeze_count()
        # walks the whole frozen generation (13.5 ms at 311,000 objects), a pause of its own
        self.long: list[tuple[float, float, int, int]] = []

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started, self.cpu = time.perf_counter(), time.thread_time()
            return
        took = time.perf_counter() - self.started
        if took >= self.threshold:
            cpu = time.thread_time() - self.cpu
            self.long.append((took, cpu, info["generation"], info["collected"]))

    def report(self) -> None:
        while True:  # a daemon thread: ends with the process
            time.sleep(1.0)
            self.flush()

    def flush(self) -> None:
        """Log the notes taken since the last flush."""
        while self.long:
            took, cpu, generation, collected = self.long.pop(0)
            log.warning(
                "garbage collection paused the broker %.1f ms (generation %d, CPU %.1f ms, %d collected)",
                took * 1000, generation, cpu * 1000, collected,
            )  # fmt: skip


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    # right after a full collection the young generations are empty: nothing short-lived is frozen
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def _tick(loop: asyncio.AbstractEventLoop, deferred: int = 0) -> None:
    """A full collection from the event loop, every ``TICK`` seconds: it walks only what was
    allocated since the last freeze and is still alive (a second's worth), and frozen with it
    (``_freeze_after_full_collection``), it never reaches CPython's young generations' thresholds.

    Why (issue 21, ``python -m benchmarks.memory --users 10000 --hold 150``): CPython counts
    allocations minus deallocations, and a signed-in user's PINGREQ replaces a few objects that
    live until the next one (its read's future and its callback, its keep-alive timer): as many
    freed as allocated, so the count hardly moves and the young generations fill with every such
    object of the last seconds. Generation 0 collections then walked up to 20 ms of CPU,
    generation 1 up to 87 ms, and the full one 112 ms (117,400 objects promoted since its last
    freeze, none of them garbage), against a few ms when collected every second.

    While a mass leave is being served (the loop's selector holds a backlog,
    ``livefirst.LiveFirstSelector.waiting``, or connections' ends wait for their turn, a queue given
    to ``defer_while``: the broker's ``teardown.TeardownGate``), the collection waits, at most
    ``DEFER_TICKS`` ticks in a row: then it walks mostly the leavers' short-lived state, freed by
    reference counting a few rounds later anyway, and it was the longest round left in traced
    leaves at 10,000 users (12.6 to 39.8 ms of CPU, collecting nothing: issue 21, ninth session,
    helper leave5; 30 to 65 ms in the tenth session's, most of them after the selector's backlog was
    served, while thousands of ends still waited at the gate). What it would have frozen is walked by
    the next tick's instead."""
    if deferred < DEFER_TICKS and _backlog(loop):
        loop.call_later(TICK, _tick, loop, deferred + 1)
        return
    gc.collect()
    loop.call_later(TICK, _tick, loop)


_queues: weakref.WeakSet[Sized] = weakref.WeakSet()


def defer_while(queue: Sized) -> None:
    """The tick's collection waits while ``queue`` is not empty (``_tick``; for as long as ``queue`` lives)."""
    _queues.add(queue)


def _backlog(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop``'s selector has polled events it has not yet handed out (a selector with a
    ``waiting`` count, imcli/serve/livefirst.py; asyncio's own and uvloop have none), or a queue given
    to ``defer_while`` holds anything."""
    waiting = getattr(getattr(loop, "_selector", None), "waiting", 0)  # asyncio private: the loop's selector
    return (isinstance(waiting, int) and waiting > 0) or any(len(queue) for queue in list(_queues))


@dataclass(frozen=True)
class FrozenGarbage:
    """What a compaction would free now: unreachable objects, frozen or not, and their types."""

    objects: int
    by_type: dict[str, int]
    paused_ms: float = 0.0  # how long ``fork()`` held this process (its one pause)


def should_compact(found: FrozenGarbage | None, limit: int = COMPACT_AT) -> bool:
    """Whether the leak check's finding is worth a compaction's pause (about 1 s at 10,000 users)."""
    return found is not None and found.objects >= limit


def frozen_garbage(timeout: float = CHECK_TIMEOUT) -> FrozenGarbage | None:
    """Count, in a forked child, the objects a compaction would free (the docstring above says why a
    child); ``None`` if this system has no ``fork`` or the child gave no answer within ``timeout``."""
    if not hasattr(os, "fork"):
        return None
    readable, writable = os.pipe()
    started = time.perf_counter()
    with warnings.catch_warnings():  # Python 3.12+ warns of forking a threaded process (the child may
        # find a lock held): the child runs only the collector, json and os.write, and is killed past
        # ``timeout``; the README promises 3.11+, and the tests make every warning an error
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    paused = (time.perf_counter() - started) * 1000
    if pid == 0:  # the child: never returns
        try:
            _count_in_child(writable)
        finally:
            os._exit(0)
    os.close(writable)
    answer = b""
    try:
        waiting = select.poll()  # not select.select: the broker's descriptors go past FD_SETSIZE (1024)
        waiting.register(readable, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and waiting.poll(left * 1000):
            chunk = os.read(readable, 65536)
            if not chunk:
                break
            answer += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(readable)
        os.waitpid(pid, 0)
    try:
        found = json.loads(answer)
        by_type = {str(k): int(v) for k, v in found["by_type"].items()}
        return FrozenGarbage(int(found["objects"]), by_type, round(paused, 2))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _count_in_child(out: int) -> None:
    """The forked child's part: nothing it runs may reach what it shares with the broker (its sockets,
    epoll set, log files), so every inherited descriptor but ``out`` is closed first."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, out)
    os.closerange(out + 1, os.sysconf("SC_OPEN_MAX"))
    gc.callbacks.clear()  # no freezing, no pause notes
    sys.unraisablehook = _ignore  # a finalizer's error (a closed socket) is not news, nor kept (a hook that
    # keeps the failed object, as pytest's does, would bring it back to life: then not counted)
    gc.collect()  # the young garbage the broker's next tick frees anyway
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)  # nothing freed: every unreachable object lands in gc.garbage
    gc.garbage.clear()
    gc.collect()
    by_type = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    answer = json.dumps({"objects": len(gc.garbage), "by_type": dict(by_type)}).encode()
    while answer:
        answer = answer[os.write(out, answer) :]


def _ignore(_unraisable: Any) -> None:
    pass


def compact() -> None:
    """Collect everything, frozen objects included (the callback freezes again what survives)."""
    gc.unfreeze()
    gc.collect()


def _watch_frozen_garbage() -> None:
    while True:  # a daemon thread: ends with the process
        time.sleep(LEAK_CHECK_EVERY)
        found = frozen_garbage()
        if found is None or not found.objects:
            continue
        most = sorted(found.by_type.items(), key=lambda kv: -kv[1])[:10]
        kinds = ", ".join(f"{name} {count}" for name, count in most)
        if should_compact(found):
            log.warning(
                "%d unreachable objects kept frozen (%s): compacting (a pause of about a second)", found.objects, kinds
            )
            compact()
        else:
            log.warning("%d unreachable objects kept frozen (%s): left until %d", found.objects, kinds, COMPACT_AT)


def release_transport(transport: Any) -> None:
    """Break the reference cycle of a closed asyncio socket transport: it keeps a bound method of
    itself (``_read_ready_cb``, asyncio private: the one place this project touches it), so a
    closed one, with its socket and buffers, waits for a full collection, or, frozen, for a
    compaction. Only once it is closing: the event loop no longer calls it then."""
    if transport.is_closing() and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None


def release_stream(reader: Any) -> None:
    """Drop the traceback of the exception that ended a stream connection (an ``asyncio.StreamReader``):
    the stream keeps it (``exception()``, and so do its read's future and its protocol's), and its
    traceback holds the frames that hold the stream, its transport and the connection's handler. Such a
    cycle, made after the connection was frozen, waits for a compaction: 530 of 10,000 connections
    ended by their peers left 46 objects each after the reader's own exception was cleared (issue 21)."""
    exc = reader.exception()
    if exc is not None:
        exc.__traceback__ = None


def calm_collector() -> None:
    """Apply the policy above to this process (once; it lasts as long as the process)."""
    global _started  # noqa: PLW0603 - the policy is per process
    if _started:
        return
    _started = True
    young, _, _ = gc.get_threshold()
    gc.set_threshold(young, MIDDLE_COLLECTION_EVERY, FULL_COLLECTION_EVERY)
    gc.callbacks.append(_freeze_after_full_collection)
    gc.collect()  # start-up's: what it allocated is frozen; before the first user, so no pause of theirs
    timer = _PauseTimer(_pause_log_ms())
    gc.callbacks.insert(0, timer)  # first: its "stop" comes before the freeze
    with contextlib.suppress(RuntimeError):  # no running loop: the thresholds alone
        loop = asyncio.get_running_loop()
        loop.call_later(TICK, _tick, loop)
    threading.Thread(target=_watch_frozen_garbage, name="gc-leak-check", daemon=True).start()
    threading.Thread(target=timer.report, name="gc-pauses", daemon=True).start()
