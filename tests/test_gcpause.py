"""imcli/broker/gcpause.py: the collector's pauses are timed inside the process and logged."""

from __future__ import annotations

import gc
import logging

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
