"""Bulk priority (imcli/core/bulk.py): a file's bytes move in threads that give way to chat.

The policy of a thread is read back from the kernel; the caller's thread is never lowered
(an unprivileged process cannot raise it again)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from imcli.core import bulk
from imcli.core.errors import InvalidInput

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are lowered on Linux only")


def _policy_and_nice() -> tuple[int, int]:
    tid = threading.get_native_id()
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)


def test_the_work_runs_at_sched_idle_and_the_caller_keeps_its_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bulk.ENV, raising=False)
    before = _policy_and_nice()
    policy, _ = bulk.run_lowered(_policy_and_nice)
    assert policy == os.SCHED_IDLE
    assert _policy_and_nice() == before


def test_nice_and_normal_are_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bulk.ENV, "nice")
    policy, nice = bulk.run_lowered(_policy_and_nice)
    assert policy == os.SCHED_OTHER and nice == bulk.NICEST
    monkeypatch.setenv(bulk.ENV, "normal")
    assert bulk.run_lowered(_policy_and_nice) == _policy_and_nice()


def test_lowering_happens_once_per_thread_and_errors_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bulk.ENV, raising=False)
    calls: list[int] = []
    real = os.sched_setscheduler

    def counted(tid: int, policy: int, param: os.sched_param) -> None:
        calls.append(tid)
        real(tid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", counted)

    def twice() -> None:
        bulk.lower_this_thread()
        bulk.lower_this_thread()
        raise InvalidInput("no such file", "check the path")

    with pytest.raises(InvalidInput, match="no such file"):
        bulk.run_lowered(twice)
    assert len(calls) == 1
