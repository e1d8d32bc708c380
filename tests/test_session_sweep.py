"""Work a crowd makes at once, done a slice per round of the event loop (issue 21): ended clean sessions
(imcli/broker/session_sweep.py), the output check, a new subscription's retained messages."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from imcli.broker import amqtt_adapter, output, session_sweep
from imcli.broker.amqtt_adapter import LightSession
from imcli.broker.output import OutputBound
from imcli.broker.retained import RETAINED_SLICE, send_in_slices
from imcli.broker.session_sweep import EndedSessions, forgettable
from imcli.core.wire import DeviceStatus, encode
from imcli.serve.host import ServeInfo
from tests.conftest import Raw, wait_until

STATUS = encode(DeviceStatus(interval=30))


def _session(client_id: str, *, clean: bool = True, connected: bool = False) -> LightSession:
    session = LightSession()
    session.client_id, session.clean_session, session.username = client_id, clean, client_id.split(":", maxsplit=1)[0]
    session.transitions.connect()
    if not connected:
        session.transitions.disconnect()
    return session


def test_a_session_is_forgotten_only_if_ended_clean_and_still_the_tables() -> None:
    ended, persistent, live = _session("a:1"), _session("b:1", clean=False), _session("c:1", connected=True)
    table: dict[str, tuple[Any, Any]] = {"a:1": (ended, None), "b:1": (persistent, None), "c:1": (live, None)}
    assert forgettable(table, "a:1", ended)
    assert not forgettable(table, "b:1", persistent)  # its client may come back to it
    assert not forgettable(table, "c:1", live)
    assert not forgettable(table, "a:1", _session("a:1"))  # the id's session now is another one
    assert not forgettable({}, "a:1", ended)  # gone already


class _Ticks:
    """Counts the rounds of the event loop, in a task of its own."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)


def test_ended_sessions_are_forgotten_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_sweep, "SLICE", 3)
    sessions = {f"u{i}:1": _session(f"u{i}:1") for i in range(7)}
    table: dict[str, tuple[Any, Any]] = {cid: (s, None) for cid, s in sessions.items()}
    forgotten: list[tuple[str, int]] = []

    async def main() -> None:
        ticks = _Ticks()
        ticker = asyncio.create_task(ticks.run())
        await asyncio.sleep(0)

        async def forget(client_id: str) -> None:  # amqtt's _cleanup_session: out of the table
            del table[client_id]
            forgotten.append((client_id, ticks.count))

        ended = EndedSessions()
        for client_id, session in sessions.items():
            ended.ended(client_id, session)
        await ended.forget_ended(table, forget)
        ticker.cancel()

    asyncio.run(main())
    assert [cid for cid, _ in forgotten] == list(sessions)  # in the order they ended
    assert table == {}
    by_round: dict[int, int] = {}
    for _, tick in forgotten:
        by_round[tick] = by_round.get(tick, 0) + 1
    assert sorted(by_round.values(), reverse=True) == [3, 3, 1], "the loop ran others between slices"


def test_the_sweep_finds_what_ended_unannounced_and_leaves_the_rest() -> None:
    unannounced, live = _session("a:1"), _session("b:1", connected=True)
    table: dict[str, tuple[Any, Any]] = {"a:1": (unannounced, None), "b:1": (live, None)}
    gone: list[str] = []

    async def forget(client_id: str) -> None:
        gone.append(client_id)

    async def main() -> None:
        ended = EndedSessions()
        await ended.sweep(table)
        assert len(ended) == 1
        await ended.forget_ended(table, forget)

    asyncio.run(main())
    assert gone == ["a:1"]


def test_the_sweep_makes_no_object_per_session_it_looks_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's copy of a table of 10,000 is one list of its client ids, not a tuple per session
    (10,000 new objects at once set off collections, a full one among them: imcli/broker/gcpause.py);
    the objects the collector counts are read between two slices, the collector off meanwhile."""
    monkeypatch.setattr(session_sweep, "SWEEP_SLICE", 1000)
    table: dict[str, tuple[Any, Any]] = {f"u{i}:1": (_session(f"u{i}:1", connected=True), None) for i in range(10_000)}
    counts: list[int] = []

    async def main() -> None:
        async def count() -> None:
            while True:
                counts.append(gc.get_count()[0])
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        await asyncio.sleep(0)
        await EndedSessions().sweep(table)
        counter.cancel()

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
    assert len(counts) >= 10, "the loop ran others between slices"
    assert max(counts) - counts[0] < 1000, counts[:12]


def test_the_broker_forgets_a_clean_session_when_its_connection_ends_and_keeps_a_persistent_one(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    assert server.broker is not None
    broker = server.broker
    users("alice", "bob")
    clean = raw("alice", client_id="alice:clean")
    kept = raw("bob", client_id="bob:kept", clean=False)
    table = broker.session_table()
    assert "alice:clean" in table and "bob:kept" in table
    before = broker.ended_sessions.forgotten
    clean.close()
    kept.close()
    assert wait_until(lambda: "alice:clean" not in table, 5)
    assert wait_until(lambda: not table["bob:kept"][0].transitions.is_connected(), 5)
    assert broker.ended_sessions.forgotten == before + 1
    assert "bob:kept" in table  # its client may come back to it


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


def test_the_output_check_looks_at_a_slice_of_connections_per_loop_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "CHECK_SLICE", 2)
    bound = OutputBound(drop_at=100, close_at=1000, stuck_after=10.0)
    for i in range(5):
        bound.watch(f"w{i}", _Transport())
    slices: list[tuple[int, int]] = []

    async def main() -> None:
        ticks = _Ticks()
        ticker = asyncio.create_task(ticks.run())
        checked = bound._check

        def check(outlets: list[Any], now: float) -> None:
            slices.append((len(outlets), ticks.count))
            checked(outlets, now)

        monkeypatch.setattr(bound, "_check", check)
        running = asyncio.create_task(bound.run(period=0.001))
        while len(slices) < 3:
            await asyncio.sleep(0.001)
        running.cancel()
        ticker.cancel()

    asyncio.run(main())
    assert [size for size, _ in slices[:3]] == [2, 2, 1]
    assert len({tick for _, tick in slices[:3]}) == 3, "the loop ran others between slices"


def test_an_ended_connection_is_not_kept_alive_by_the_output_checks_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` holds its list of outlets while it checks them a slice a round (and until the next check):
    a connection forgotten meanwhile is let go of at once, not freed with thousands of others when the
    list is dropped (a mass leave's 18 to 27 ms step of frees: docs/PERFORMANCE.md, tenth session)."""
    monkeypatch.setattr(output, "CHECK_SLICE", 1)
    bound = OutputBound(drop_at=100, close_at=1000, stuck_after=10.0)
    transports = {f"w{i}": _Transport() for i in range(3)}
    for writer, transport in transports.items():
        bound.watch(writer, transport)
        bound.attach_inbox(writer, asyncio.Queue())
    del transport  # the loop's last one is w2's
    left = weakref.ref(transports.pop("w2"))
    alive: list[bool] = []

    async def main() -> None:
        checked = bound._check

        def check(outlets: list[Any], now: float) -> None:
            if not alive:  # the first slice: run holds every outlet in its list now
                bound.forget("w2")
                alive.append(left() is not None)
            checked(outlets, now)

        monkeypatch.setattr(bound, "_check", check)
        running = asyncio.create_task(bound.run(period=0.001))
        while not alive:
            await asyncio.sleep(0.001)
        running.cancel()

    asyncio.run(main())
    assert alive == [False], "the forgotten connection's transport lived on in the check's list"
    assert bound.waiting("w2") == 0 and bound.admit("w2", "w2", 1, 10) is output.Verdict.WRITE


# ---------------------------------------------------------------- a new subscription's retained messages


def test_retained_topics_are_sent_a_slice_per_loop_round_while_the_connection_lasts() -> None:
    sent: list[tuple[list[str], int]] = []
    going = [True]

    async def main() -> None:
        ticks = _Ticks()
        ticker = asyncio.create_task(ticks.run())
        await asyncio.sleep(0)

        def send(some: list[str]) -> None:
            sent.append((some, ticks.count))
            if len(sent) == 2:
                going[0] = False  # the subscriber's connection ended

        await send_in_slices([f"t{i}" for i in range(7)], 3, send, lambda: going[0])
        ticker.cancel()

    asyncio.run(main())
    assert [some for some, _ in sent] == [["t0", "t1", "t2"], ["t3", "t4", "t5"]]  # none after it ended
    assert sent[0][1] != sent[1][1], "the loop ran others between slices"


def test_ten_thousand_presence_records_go_out_at_most_a_hundred_a_loop_round() -> None:
    """A watcher subscribing to ``im/presence/+`` at 10,000 users: the records after the first slice go out
    ``RETAINED_SLICE`` a round, the loop running others between (500 a round used up to 33.5 ms of the loop's
    CPU in a traced join: issue 21, ninth session)."""
    rounds: list[tuple[int, int]] = []  # (topics sent, the loop's rounds so far)

    async def main() -> None:
        ticks = _Ticks()
        ticker = asyncio.create_task(ticks.run())
        await asyncio.sleep(0)
        topics = [f"im/presence/user{i}" for i in range(10_000)]
        first, rest = topics[:RETAINED_SLICE], topics[RETAINED_SLICE:]
        rounds.append((len(first), ticks.count))
        await send_in_slices(rest, RETAINED_SLICE, lambda some: rounds.append((len(some), ticks.count)), lambda: True)
        ticker.cancel()

    asyncio.run(main())
    assert sum(n for n, _ in rounds) == 10_000
    assert max(n for n, _ in rounds) <= 100
    assert len({tick for _, tick in rounds}) == len(rounds), "one slice a loop round, others run between"


def test_a_subscriber_gets_every_retained_record_when_they_come_in_slices(
    monkeypatch: pytest.MonkeyPatch, server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    """Presence records of seven users, sent to a new subscriber two per loop round: all arrive, retained."""
    monkeypatch.setattr(amqtt_adapter, "RETAINED_SLICE", 2)
    names = [f"user{i}" for i in range(7)]
    users(*names, "watcher")
    for name in names:
        client = raw(name, client_id=f"{name}:d")
        client.publish(f"im/status/{name}/d", STATUS, retain=True)
    watcher = raw("watcher", client_id="watcher:w")
    watcher.subscribe("im/presence/+")
    seen: set[str] = set()

    def all_online() -> bool:  # the presence worker may still be publishing them: ask again
        seen.update(m.topic for m in watcher.arrivals(0.2) if m.payload)
        return seen >= {f"im/presence/{n}" for n in names}

    assert wait_until(all_online, 10)
    late = raw("watcher", client_id="watcher:late")
    late.subscribe("im/presence/+")
    arrived = [late.expect(timeout=5) for _ in names]
    assert {m.topic for m in arrived} == {f"im/presence/{n}" for n in names}
    assert all(m.retain for m in arrived)


def test_a_handler_asked_to_stop_again_does_its_work_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its reader's end, the message loop's disconnect and the ended session's cleanup each ask."""
    from amqtt.broker import Broker

    stops: list[int] = []

    async def main() -> None:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": {}})
        handler = amqtt_adapter.AckAfterJournal(broker.plugins_manager)
        monkeypatch.setattr(handler, "_stop_waiters", lambda: stops.append(1))
        for _ in range(3):
            await handler.stop()

    asyncio.run(main())
    assert stops == [1]


def test_a_second_stop_returns_only_when_the_first_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """A take-over's stop must not return while the reader's end is still closing the old
    connection (ImBroker.take_over then replaces the session); a cancelled stop leaves the work
    to the next caller."""
    from amqtt.broker import Broker

    closes: list[str] = []

    async def main() -> None:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": {}})
        handler = amqtt_adapter.AckAfterJournal(broker.plugins_manager)
        closing, release = asyncio.Event(), asyncio.Event()

        class Writer:
            async def close(self) -> None:
                closes.append("begun")
                closing.set()
                await release.wait()
                closes.append("ended")

        handler.writer = Writer()
        first = asyncio.create_task(handler.stop())
        await closing.wait()
        second = asyncio.create_task(handler.stop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not second.done()  # it waits for the first stop's end
        release.set()
        await second
        assert closes == ["begun", "ended"] and first.done()
        await handler.stop()  # once stopped, at once
        assert closes == ["begun", "ended"]

        cancelled = amqtt_adapter.AckAfterJournal(broker.plugins_manager)
        cancelled.writer = Writer()  # release is set: it closes at once
        cancelled._reader_task = reader = asyncio.create_task(asyncio.sleep(3600))  # amqtt private
        first = asyncio.create_task(cancelled.stop())
        for _ in range(5):
            await asyncio.sleep(0)  # first waits for the reader's end (amqtt's _reader_stopped)
        second = asyncio.create_task(cancelled.stop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert reader.cancelled() and closes == ["begun", "ended"] and not second.done()
        first.cancel()  # not stopped after all: the second caller does the work
        await second
        assert first.cancelled() and closes == ["begun", "ended", "begun", "ended"]

    asyncio.run(main())


def test_a_filters_subscribers_are_found_by_client_id() -> None:
    """sessions.Subscribers (issue 21: amqtt scanned a filter's list on every SUBSCRIBE and removal):
    one per client id, the first QoS kept as amqtt kept it, removed by client id whatever the session
    object, in the order they came, and iterated over a copy (the fan-out awaits within its loop)."""
    from imcli.broker.sessions import SubscriptionTable

    table = SubscriptionTable()
    a, b, c = _session("a:1", connected=True), _session("b:1", connected=True), _session("c:1", connected=True)
    assert table.add("im/presence/+", a, 1) and table.add("im/presence/+", b, 0) and table.add("im/presence/+", c, 1)
    assert not table.add("im/presence/+", _session("a:1", connected=True), 0)  # the same client id again
    assert list(table["im/presence/+"]) == [(a, 1), (b, 0), (c, 1)]
    seen = []
    for session, _ in table["im/presence/+"]:
        seen.append(session.client_id)
        table.remove("im/presence/+", session)  # as a connection ending during a fan-out's await
    assert seen == ["a:1", "b:1", "c:1"] and not table["im/presence/+"]
    assert not table.remove("im/presence/+", b) and not table.remove("im/room/+/+", b)  # gone, or never there
    assert table.add("im/presence/+", b, 1) and list(table["im/presence/+"]) == [(b, 1)]
