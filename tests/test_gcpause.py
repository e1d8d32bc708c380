"""imcli/broker/gcpause.py: the collector's pauses are timed inside the process and logged."""

from __future__ import annotations

import gc
import logging
from typing import Any

import pytest

from imcli.broker import gcpause


def test_a_collection_over_the_threshold_is_noted_with_its_generation_and_cpu_time() -> None:
    timer = gcpause._PauseTimer(0.0)  # every collection is at or over 0 ms
    gc.callbacks.append(timer)
    try:
        gc.collect(1)
    finally:
        gc.callbacks.remove(timer)
    assert timer.long, "a collection was timed"
    took, cpu, generation, _collected = timer.long[-1]
    assert generation == 1
    assert took >= 0 and cpu >= 0


def test_a_short_collection_is_not_noted() -> None:
    timer = gcpause._PauseTimer(60_000.0)  # a minute
    gc.callbacks.append(timer)
    try:
        gc.collect(0)
    finally:
        gc.callbacks.remove(timer)
    assert timer.long == []


def test_the_threshold_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMCLI_GC_LOG_MS", "5")
    assert gcpause._pause_log_ms() == 5.0
    monkeypatch.setenv("IMCLI_GC_LOG_MS", "not a number")
    assert gcpause._pause_log_ms() == gcpause.PAUSE_LOG_MS
    monkeypatch.delenv("IMCLI_GC_LOG_MS")
    assert gcpause._pause_log_ms() == gcpause.PAUSE_LOG_MS


def test_the_notes_are_logged_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    timer = gcpause._PauseTimer(0.0)
    timer.long.append((0.123, 0.045, 2, 7))
    with caplog.at_level(logging.WARNING, logger="imcli.broker.gcpause"):
        timer.flush()
    assert "paused the broker 123.0 ms (generation 2, CPU 45.0 ms, 7 collected)" in caplog.text
    assert timer.long == []


def test_the_tick_collects_and_comes_again() -> None:
    """``_tick``: a full collection from the event loop, then the next one ``TICK`` seconds later."""
    scheduled: list[tuple[float, object]] = []
    collections: list[int] = []

    class Loop:
        def call_later(self, delay: float, callback: object, *args: object) -> None:
            scheduled.append((delay, callback))

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    gc.callbacks.append(note)
    try:
        gcpause._tick(Loop())  # type: ignore[arg-type]
    finally:
        gc.callbacks.remove(note)
    assert 2 in collections
    assert scheduled == [(gcpause.TICK, gcpause._tick)]


def test_a_reset_connection_leaves_no_cycle_through_its_exception() -> None:
    """The reader's exception is also its stream's; its traceback would hold the frames that hold the
    stream, the transport and the handler: a cycle that a frozen connection keeps until the compaction.
    The reader drops the traceback when the connection ends."""
    import asyncio

    from imcli.broker.reader import PacketReader, StreamGuard

    reset = ConnectionResetError("reset by peer")

    class Stream:
        async def read(self, n: int) -> bytes:
            raise reset

    class Event:
        def set(self) -> None:
            pass

    class Handler:
        session = None
        answered = 0
        _reader_ready = _reader_stopped = Event()

        async def handle_connection_closed(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    async def main() -> None:
        stream: Any = Stream()
        guard = StreamGuard(None, None, 10.0, 64, stream=stream, transport=stream, readable=lambda: True)
        await PacketReader(Handler(), guard).run()

    asyncio.run(main())
    assert reset.__traceback__ is None


def test_the_exception_that_ended_a_stream_loses_its_traceback() -> None:
    import asyncio

    async def main() -> None:
        reader = asyncio.StreamReader()
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as exc:
            reader.set_exception(exc)
        kept = reader.exception()
        assert kept is not None and kept.__traceback__ is not None
        gcpause.release_stream(reader)
        assert kept.__traceback__ is None
        gcpause.release_stream(asyncio.StreamReader())  # one that ended cleanly: nothing to drop

    asyncio.run(main())
