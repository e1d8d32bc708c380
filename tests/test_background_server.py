"""``BackgroundServer`` (imcli/serve/host.py), the embedded broker in a thread that tests, benchmarks
and bots' fixtures start: a stop that comes while it starts (from another thread, or because the
start took too long) ends everything it began: its thread, the broker's port and the workers'
threads, and nothing waits for ever."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from imcli.broker.server import BrokerSettings
from imcli.core.errors import ImcliError
from imcli.serve import host, loops
from imcli.serve.host import BackgroundServer

BOUND = 60.0  # seconds: only a bound against a hang, never a figure


def imcli_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("imcli") or t.name.startswith("paho")}


def closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def start_in_thread(server: BackgroundServer, outcome: list[BaseException | object]) -> threading.Thread:
    """A thread that starts ``server`` and puts what the start gave or raised in ``outcome``."""

    def start() -> None:
        try:
            outcome.append(server.__enter__())
        except BaseException as exc:  # what the start ended with is the test's subject
            outcome.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    return starter


def test_a_stop_before_its_loop_runs_ends_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop arrives while the thread has not yet made its event loop (the window in which a stop
    was lost: the thread then ran the broker for ever, and the stop waited 30 s for it in vain)."""
    before = imcli_threads()
    stop_called = threading.Event()
    run = loops.run

    def held_run(main: Any, kind: str | None) -> Any:
        assert stop_called.wait(BOUND)
        return run(main, kind)

    monkeypatch.setattr(loops, "run", held_run)
    server = BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0))
    outcome: list[BaseException | object] = []
    starter = start_in_thread(server, outcome)

    def stop() -> None:
        stop_called.set()
        server.__exit__(None, None, None)

    stopper = threading.Thread(target=stop)
    stopper.start()
    stopper.join(BOUND)
    starter.join(BOUND)
    try:
        assert not stopper.is_alive() and not starter.is_alive(), "the stop or the start hangs"
        assert not server._thread.is_alive(), "the broker's thread runs on after the stop"
        [ended] = outcome
        assert isinstance(ended, ImcliError) and "stopped while it started" in str(ended), ended
        assert imcli_threads() <= before, imcli_threads() - before
    finally:
        stop_called.set()
        server.__exit__(None, None, None)


def test_a_stop_while_the_workers_start_ends_them_and_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop arrives while the broker listens and its workers are starting."""
    before = imcli_threads()
    starting = threading.Event()
    go_on = threading.Event()
    start_threads = host._start_threads
    ports: list[int] = []

    async def held_start(running: Any, settings: Any, broker: Any, *args: Any) -> None:
        ports.append(broker.bound_port())
        starting.set()
        await asyncio.to_thread(go_on.wait, BOUND)
        await start_threads(running, settings, broker, *args)

    monkeypatch.setattr(host, "_start_threads", held_start)
    server = BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0))
    outcome: list[BaseException | object] = []
    starter = start_in_thread(server, outcome)
    assert starting.wait(BOUND)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    go_on.set()
    stopper.join(BOUND)
    starter.join(BOUND)
    assert not stopper.is_alive() and not starter.is_alive(), "the stop or the start hangs"
    assert not server._thread.is_alive()
    [ended] = outcome
    assert isinstance(ended, ImcliError) and "stopped while it started" in str(ended), ended
    assert closed(ports[0]), "the broker still listens"
    assert imcli_threads() <= before, imcli_threads() - before


def test_a_start_that_takes_too_long_is_stopped_not_left_running(tmp_path: Path) -> None:
    """``start_timeout`` passed: the start says so, and the broker it began does not run on unseen."""
    before = imcli_threads()
    server = BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0), start_timeout=1e-6)
    with pytest.raises(ImcliError, match="did not start within"):
        server.__enter__()
    assert not server._thread.is_alive(), "the broker's thread runs on"
    assert imcli_threads() <= before, imcli_threads() - before


def test_stop_at_any_time_more_than_once(tmp_path: Path) -> None:
    never = BackgroundServer(BrokerSettings(data_dir=tmp_path / "never", port=0))
    never.stop()  # never started: nothing to wait for
    with pytest.raises(ImcliError, match="stopped while it started"):
        never.__enter__()
    assert not never._thread.is_alive()
    server = BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0))
    with server as info:
        port = info.address.port
        assert not closed(port)  # the check can fail: the broker listens while it runs
    assert closed(port)
    server.stop()  # after the loop has closed
    server.stop()
    assert not server._thread.is_alive()
