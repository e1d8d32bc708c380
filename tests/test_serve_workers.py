"""``imcli serve`` runs its workers in a child process (issue 7): the command starts it,
restarts it when it dies, stops it on exit, and a ``kill -9`` of the broker takes it along."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imcli.broker.accounts import AccountStore
from imcli.client import services
from imcli.core.errors import ImcliError
from tests.conftest import ident, password_of, wait_until
from tests.test_durability import Serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child pids from /proc")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def who_answers(serve: Serve) -> bool:
    """The presence worker answers ``who`` (an empty roster: nobody has a status yet)."""
    try:
        services.who(ident(serve.address, "alice"), include_offline=True)
    except ImcliError:  # no worker to answer (yet): RequestTimeout
        return False
    return True


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    data = tmp_path / "data"
    AccountStore(data).add("alice", password_of("alice"))
    started = Serve(data)
    yield started
    started.stop()


def test_workers_run_in_a_child_that_is_restarted_and_stopped(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMCLI_REQUEST_TIMEOUT", "2")  # each ask while the child restarts waits this long
    assert who_answers(serve)  # the presence worker answers as soon as serve says it listens
    (first,) = children(serve.popen.pid)
    serve_pid = serve.popen.pid

    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: [c for c in children(serve_pid) if c != first] != [], timeout=30)
    (second,) = children(serve_pid)
    assert second != first
    assert wait_until(lambda: who_answers(serve), timeout=60)

    serve.popen.terminate()
    assert serve.popen.wait(30) == 0
    assert gone(second)


def test_kill_9_of_serve_ends_its_workers_child(serve: Serve) -> None:
    assert who_answers(serve)
    (child,) = children(serve.popen.pid)
    serve.kill9()
    assert wait_until(lambda: gone(child), timeout=10)
