"""Bulk work at a lower CPU priority than chat: a file's bytes give way to messages.

A file transfer keeps its sender, the files worker and its receiver busy (hashing, copying,
publishing 256 KiB chunks), and on a machine of few cores a chat message's client and broker
then wait for a core behind them. The threads that move a file's bytes lower themselves
(``lower_this_thread``) for as long as they live, so that the scheduler hands the core to anyone
else who wakes: on Linux the ``SCHED_IDLE`` policy (a waking ordinary task preempts such a thread
at once; with nothing else to run it has the whole core, so an idle machine transfers as fast),
else the lowest nice value (19). Other platforms are left alone: only Linux sets either for one
thread (elsewhere a thread id is no process id, and a whole process would be lowered).

Neither can be undone by an unprivileged process, so only threads that do file work and end
with it are lowered: a dedicated thread (``run_lowered``) or the paho thread of a connection
made for file work. ``IMCLI_BULK_PRIORITY`` chooses: ``idle`` (the default), ``nice``, or
``normal`` (leave every thread as it is).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ENV = "IMCLI_BULK_PRIORITY"
NICEST = 19

_done = threading.local()


def policy() -> str:
    """``idle``, ``nice`` or ``normal``: what ``lower_this_thread`` does (``IMCLI_BULK_PRIORITY``)."""
    chosen = os.environ.get(ENV, "idle").strip().lower()
    return chosen if chosen in ("idle", "nice", "normal") else "idle"


def lower_this_thread() -> None:
    """Lower the calling thread to bulk priority, once (later calls cost an attribute lookup).

    Best effort: a platform or sandbox that refuses leaves the thread as it was."""
    if getattr(_done, "lowered", False):
        return
    _done.lowered = True
    chosen = policy()
    if chosen == "normal" or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    if chosen == "idle":
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))  # a tid names one thread
        except OSError:
            pass
        else:
            return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, NICEST)


def run_lowered(work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own at bulk priority; its result, or its exception, here.

    The caller's thread keeps its priority (it may be a chat's, or a benchmark's that goes on)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        lower_this_thread()
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller, who raises it
            error.append(exc)

    thread = threading.Thread(target=body, name="imcli-bulk", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
