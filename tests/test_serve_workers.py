"""``imcli serve`` runs its workers in a child process (issue 7): the command starts it,
restarts it when it dies, stops it on exit, and a ``kill -9`` of the broker takes it along."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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


# ---------------------------------------------------------------- a stop request wins over (re)starts

# Loaded by every Python process of the run (PYTHONPATH): in the workers' child, once the marker file
# exists, it crashes at start (``crash``) or hangs before its first line (``hang``), recording a SIGTERM.
CHILD_HOOK = """
import os, signal, sys, time
MARK = os.environ.get("IMCLI_TEST_CHILD_MARK", "")
if "imcli.serve.child" in sys.orig_argv and MARK and os.path.exists(MARK):
    with open(MARK) as f:
        how = f.read()
    def ended(*_):
        with open(MARK + ".ended", "a") as f:
            f.write(f"{os.getpid()} SIGTERM\\n")
        os._exit(0)
    signal.signal(signal.SIGTERM, ended)  # before it says it started: the test may stop serve then
    with open(MARK + ".started", "a") as f:
        f.write(f"{os.getpid()}\\n")
    if how == "crash":
        os._exit(3)
    time.sleep(3600)
"""


class HookedServe:
    """``imcli serve`` on an ephemeral port whose workers' child obeys CHILD_HOOK's marker, with every
    child process it was seen to have."""

    def __init__(self, tmp_path: Path, *, mark: str = "") -> None:
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(CHILD_HOOK)
        self.mark = tmp_path / "mark"
        if mark:
            self.mark.write_text(mark)
        data = tmp_path / "data"
        AccountStore(data).add("alice", password_of("alice"))
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "imcli", "serve", "--port", "0", "--data-dir", str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(hook), "IMCLI_TEST_CHILD_MARK": str(self.mark)},
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()
        self._pump = threading.Thread(target=lambda: self.lines.extend(self.popen.stdout or ()), daemon=True)
        self._pump.start()

    def said(self, text: str) -> bool:
        self.seen.update(children(self.popen.pid))
        return any(text in line for line in self.lines)

    def hooked(self, kind: str) -> list[int]:
        path = Path(f"{self.mark}.{kind}")
        return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []

    def terminate(self) -> int:
        self.seen.update(children(self.popen.pid))
        self.popen.terminate()
        try:
            return self.popen.wait(60)  # a hang guard, not a speed check: the hook's SIGTERM record says how
        finally:
            self.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._pump.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        for pid in self.seen:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_while_a_restarted_child_hangs_at_start_ends_it_at_once(tmp_path: Path) -> None:
    """The workers' child died; its restart hangs before it says it runs (it never reads its stdin).
    imcli serve used to close that stdin and wait STOP_TIMEOUT (15 s) before a SIGKILL: a SIGTERM
    now ends a child that has not started at once, with a SIGTERM of its own."""
    serve = HookedServe(tmp_path)
    try:
        assert wait_until(lambda: serve.said("listening on"), timeout=60), serve.lines
        (first,) = children(serve.popen.pid)
        serve.mark.write_text("hang")
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: serve.hooked("started") != [], timeout=60), serve.lines
        (hanging,) = serve.hooked("started")
        assert serve.terminate() == 0, serve.lines
        assert serve.hooked("ended") == [hanging]  # SIGTERM, not the SIGKILL after 15 s
        assert all(gone(pid) for pid in serve.seen | {first, hanging})
    finally:
        serve.close()


def test_sigterm_while_the_first_child_hangs_at_start_stops_serve(tmp_path: Path) -> None:
    """A SIGTERM before the workers ever said they run: serve waited for them START_TIMEOUT (60 s),
    then failed; now it stops at once (exit 0) and ends the child."""
    serve = HookedServe(tmp_path, mark="hang")
    try:
        assert wait_until(lambda: serve.hooked("started") != [], timeout=60), serve.lines
        (hanging,) = serve.hooked("started")
        assert serve.terminate() == 0, serve.lines
        assert serve.hooked("ended") == [hanging]
        assert not any("listening on" in line for line in serve.lines)
        assert gone(hanging)
    finally:
        serve.close()


def test_sigterm_while_the_child_keeps_crashing_stops_serve_and_every_child(tmp_path: Path) -> None:
    serve = HookedServe(tmp_path)
    try:
        assert wait_until(lambda: serve.said("listening on"), timeout=60), serve.lines
        (first,) = children(serve.popen.pid)
        serve.mark.write_text("crash")
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: len(serve.hooked("started")) >= 2 and serve.said("restarting it in"), timeout=60)
        assert serve.terminate() == 0, serve.lines
        assert all(gone(pid) for pid in serve.seen | {first, *serve.hooked("started")})
    finally:
        serve.close()
