"""The embedded broker's selector (imcli/serve/livefirst.py): a poll of more than ``BOUND`` ready
sockets is returned a bounded slice a round, sockets whose peer has not closed first; nothing is
lost, nothing returned twice, no stale key handed out. Real socket pairs, no timing."""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Iterator

import pytest

from imcli.serve import livefirst, loops

pytestmark = pytest.mark.skipif(not hasattr(livefirst, "LiveFirstSelector"), reason="epoll only")

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


@pytest.fixture
def selector() -> Iterator[livefirst.LiveFirstSelector]:
    sel = livefirst.LiveFirstSelector()
    sel.BOUND = 100
    sel.SORT_CPU = float("inf")  # every test here counts sockets, never CPU time
    yield sel
    sel.close()


def _pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(n)]


def _close_all(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for a, b in pairs:
        a.close()
        b.close()


def test_a_live_socket_behind_2000_closing_ones_is_in_the_first_slice(selector: livefirst.LiveFirstSelector) -> None:
    closing = _pairs(2000)
    live_ours, live_peer = socket.socketpair()
    try:
        for ours, _ in closing:
            selector.register(ours, selectors.EVENT_READ, "closing")
        selector.register(live_ours, selectors.EVENT_READ, "live")
        for _, peer in closing:  # each peer: DISCONNECT, then FIN
            peer.sendall(DISCONNECT)
            peer.close()
        live_peer.sendall(PINGREQ)  # readable last, behind 2,000 others in epoll's ready list
        served: list[int] = []
        rounds: list[list[str]] = []
        while True:
            ready = selector.select(0)
            if not ready:
                break
            rounds.append([key.data for key, _ in ready])
            for key, events in ready:
                assert events == selectors.EVENT_READ
                served.append(key.fd)
                if key.data == "live":
                    assert live_ours.recv(2) == PINGREQ
                else:  # as the broker does with a DISCONNECT: read it, stop reading
                    selector.unregister(key.fd)
        assert rounds[0][0] == "live"
        assert all(len(r) <= selector.BOUND for r in rounds)
        assert len(rounds) >= 2000 // selector.BOUND
        assert sorted(served) == sorted([ours.fileno() for ours, _ in closing] + [live_ours.fileno()])
        assert selector.waiting == 0
    finally:
        _close_all(closing)
        live_ours.close()
        live_peer.close()


def test_a_few_ready_sockets_are_returned_all_in_one_poll(selector: livefirst.LiveFirstSelector) -> None:
    pairs = _pairs(50)
    try:
        for ours, peer in pairs:
            selector.register(ours, selectors.EVENT_READ | selectors.EVENT_WRITE, None)
            peer.close()
        ready = selector.select(0)
        assert len(ready) == 50 and selector.waiting == 0
        assert all(events == selectors.EVENT_READ | selectors.EVENT_WRITE for _, events in ready)
    finally:
        _close_all(pairs)


def test_a_reused_fd_is_not_served_with_the_old_key(selector: livefirst.LiveFirstSelector) -> None:
    pairs = _pairs(300)
    try:
        for ours, peer in pairs:
            selector.register(ours.fileno(), selectors.EVENT_READ, ("old", ours.fileno()))
            peer.close()
        first = selector.select(0)
        assert len(first) == selector.BOUND and selector.waiting == 200
        last_ours, _ = pairs[-1]  # waiting for a later round
        fd = last_ours.fileno()
        # the broker forgets it as asyncio does (a stale key object in the selector's map), and a new
        # connection gets the same number
        old_key = selector._fd_to_key[fd]
        selector._fd_to_key[fd] = old_key._replace(data=("new", fd))  # what asyncio's modify does too
        served = [key.data for key, _ in first]
        for key, _ in first:
            selector.unregister(key.fd)
        while ready := selector.select(0):
            served += [key.data for key, _ in ready]
            for key, _ in ready:
                selector.unregister(key.fd)
        assert ("old", fd) not in served
        assert served.count(("new", fd)) == 1  # its own event, from a later poll (level-triggered)
        assert sorted(served) == sorted([("old", ours.fileno()) for ours, _ in pairs[:-1]] + [("new", fd)])
    finally:
        _close_all(pairs)


def test_a_socket_that_closes_after_publishing_is_read_in_full(selector: livefirst.LiveFirstSelector) -> None:
    pairs = _pairs(400)
    try:
        for ours, peer in pairs:
            selector.register(ours, selectors.EVENT_READ, ours)
            peer.sendall(b"PUBLISH" + DISCONNECT)
            peer.close()
        got: dict[int, bytes] = {}
        for _ in range(10):
            for key, _ in selector.select(0):
                sock = key.data
                data = sock.recv(100)
                got[sock.fileno()] = got.get(sock.fileno(), b"") + data
                if not data:
                    selector.unregister(sock)
        assert selector.waiting == 0 and not selector.get_map()
        assert sorted(got.values()) == [b"PUBLISH" + DISCONNECT] * 400
    finally:
        _close_all(pairs)


def test_a_backlog_drains_without_waiting_and_an_empty_one_waits(selector: livefirst.LiveFirstSelector) -> None:
    pairs = _pairs(250)
    try:
        for ours, peer in pairs:
            selector.register(ours, selectors.EVENT_READ, None)
            peer.close()
        selector.select(0)
        assert selector.waiting == 150
        # a timeout of an hour: the backlog is served at once, not after it
        assert len(selector.select(3600)) == selector.BOUND
        for ours, _ in pairs:
            selector.unregister(ours)
        assert selector.waiting == 0
        assert selector.select(0.01) == []  # nothing ready, nothing waiting: the poll waits (and returns none)
    finally:
        _close_all(pairs)


def test_with_live_first_the_broker_loop_is_asyncio_on_the_selector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "LIVE_FIRST", True)
    factory = loops.loop_factory("asyncio")
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop._selector, livefirst.LiveFirstSelector)  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_a_ping_behind_a_crowd_closing_is_answered_in_the_first_round_on_the_loop() -> None:
    """asyncio's own loop on the selector: 1,500 connections close, then one sends a PINGREQ; its
    callback runs in the first round, before most closing ones."""

    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        pairs = _pairs(1500)
        live_ours, live_peer = socket.socketpair()

        def read(fd: int, what: str) -> None:
            order.append(what)
            loop.remove_reader(fd)

        for ours, _ in pairs:
            loop.add_reader(ours.fileno(), read, ours.fileno(), "closing")
        loop.add_reader(live_ours.fileno(), read, live_ours.fileno(), "live")
        for _, peer in pairs:
            peer.sendall(DISCONNECT)
            peer.close()
        live_peer.sendall(PINGREQ)
        while len(order) < 1501:
            await asyncio.sleep(0)
        _close_all(pairs)
        live_ours.close()
        live_peer.close()
        return order.index("live"), order.count("closing")

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(livefirst.new_selector())) as runner:
        position, closed = runner.run(run())
    assert closed == 1500
    assert position == 0


def test_a_socket_holding_only_a_disconnect_waits_behind_a_live_one(selector: livefirst.LiveFirstSelector) -> None:
    """A client leaving writes its DISCONNECT and only later closes (FIN): a poll then sees it open.
    Its bytes, peeked, are exactly a DISCONNECT: it counts as closing, after a PINGREQ written later."""
    leaving = _pairs(300)
    live_ours, live_peer = socket.socketpair()
    try:
        for ours, peer in leaving:
            selector.register(ours, selectors.EVENT_READ, "closing")
            peer.sendall(DISCONNECT)  # no FIN
        selector.register(live_ours, selectors.EVENT_READ, "live")
        live_peer.sendall(PINGREQ)
        first = [key.data for key, _ in selector.select(0)]
        assert first[0] == "live" and len(first) == selector.BOUND
        assert all(ours.recv(10) == DISCONNECT for ours, _ in leaving)  # peeked, not taken
    finally:
        _close_all(leaving)
        live_ours.close()
        live_peer.close()


def test_sockets_waiting_their_turn_are_out_of_the_kernels_poll(selector: livefirst.LiveFirstSelector) -> None:
    """A socket left waiting is taken out of epoll's interest at the next poll (each poll returned
    every waiting one again, level-triggered: a round's cost grew with the backlog) and put back once
    taken: a socket still readable then is returned by a later poll again, and nothing is lost or
    served twice, its interest changed meanwhile (as asyncio's modify does) included."""
    pairs = _pairs(300)
    try:
        for ours, peer in pairs:
            selector.register(ours, selectors.EVENT_READ, ours)
            peer.sendall(DISCONNECT + b"more")  # not a lone DISCONNECT: live, read in two steps
        got: dict[int, bytes] = {}
        first = selector.select(0)
        assert len(first) == selector.BOUND and selector.waiting == 200
        for key, _ in first:  # read in full and forgotten, as an ended connection
            got[key.fd] = key.data.recv(100)
            selector.unregister(key.fd)
        second = selector.select(0)
        assert len(second) == selector.BOUND and selector.waiting == 100
        # the kernel's poll returns none of them: 100 served and forgotten, 100 taken (put back at the
        # next poll), 100 waiting (out); with every waiting socket in epoll, it returned 200
        assert selector._selector.poll(0, 1000) == []
        waiting = [ours for ours, _ in pairs if ours.fileno() in selector._live]
        assert len(waiting) == 100
        selector.modify(waiting[0], selectors.EVENT_READ | selectors.EVENT_WRITE, "modified")  # as asyncio may
        served: list[object] = []
        ready = second
        while ready:
            for key, events in ready:
                served.append(key.data)
                sock = waiting[0] if key.data == "modified" else key.data
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_READ:
                    got[sock.fileno()] = got.get(sock.fileno(), b"") + sock.recv(3)  # a part only
                if key.data == "modified":
                    selector.modify(sock, selectors.EVENT_READ, sock)
            ready = selector.select(0)
        assert served.count("modified") >= 1
        assert sorted(got.values()) == [DISCONNECT + b"more"] * 300  # every byte, the rest from later polls
        assert selector.waiting == 0
    finally:
        _close_all(pairs)


def test_a_ping_behind_a_crowd_leaving_reaches_its_transport_first() -> None:
    """asyncio's transports on the selector (the broker's path, the peek through the transport's
    socket): 600 connections write a DISCONNECT and stay open, then one writes a PINGREQ; its
    protocol hears it first, and every connection's bytes arrive."""

    async def run() -> tuple[list[bytes], int]:
        loop = asyncio.get_running_loop()
        heard: list[bytes] = []
        transports: list[asyncio.BaseTransport] = []

        class Recorder(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.append(transport)

            def data_received(self, data: bytes) -> None:
                heard.append(data)

        server = await loop.create_server(Recorder, "127.0.0.1", 0, backlog=1000)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(600)]
        live = socket.create_connection(("127.0.0.1", port))
        while len(transports) < 601:  # every connection accepted, its transport reading
            await asyncio.sleep(0)
        # all in one callback: every byte is there before the loop's next poll
        for client in clients:
            client.sendall(DISCONNECT)
        live.sendall(PINGREQ)
        while len(heard) < 601:
            await asyncio.sleep(0)
        for client in [*clients, live]:
            client.close()
        for transport in transports:
            transport.close()
        server.close()
        await server.wait_closed()
        return heard, len(heard)

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(_small_bound())) as runner:
        heard, count = runner.run(run())
    assert heard[0] == PINGREQ
    assert count == 601 and heard.count(DISCONNECT) == 600


def _small_bound() -> selectors.BaseSelector:
    selector = livefirst.new_selector()
    assert isinstance(selector, livefirst.LiveFirstSelector)
    selector.BOUND = 100
    selector.SORT_CPU = float("inf")
    return selector


def _counting_peeks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``livefirst._peek`` counted: the fds peeked, in order."""
    peeked: list[int] = []
    peek = livefirst._peek

    def counted(key: selectors.SelectorKey, size: int) -> bytes:
        peeked.append(key.fd)
        return peek(key, size)

    monkeypatch.setattr(livefirst, "_peek", counted)
    return peeked


def test_a_wave_of_sockets_not_served_lately_is_peeked_a_budget_a_round(
    selector: livefirst.LiveFirstSelector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mass leave's first poll returned 8,000 sockets, each peeked in the same round (23 to 42 ms of
    CPU): a socket not served lately is peeked ``PEEKS`` a round at most, first polled first, and no
    closing one is served while any is unsorted, so a live one polled last is still served before every
    closing one; nothing is lost or served twice."""
    selector.PEEKS = 50
    peeked = _counting_peeks(monkeypatch)
    leaving = _pairs(300)
    live_ours, live_peer = socket.socketpair()
    try:
        for ours, peer in leaving:
            selector.register(ours, selectors.EVENT_READ, "closing")
            peer.sendall(DISCONNECT)  # no FIN: only a peek tells
        selector.register(live_ours, selectors.EVENT_READ, "live")
        live_peer.sendall(PINGREQ)  # polled last
        rounds: list[list[str]] = []
        peeks: list[int] = []
        served: list[int] = []
        while True:
            before = len(peeked)
            ready = selector.select(0)
            peeks.append(len(peeked) - before)
            if not ready and not selector.waiting:
                break
            rounds.append([key.data for key, _ in ready])
            for key, _ in ready:
                served.append(key.fd)
                selector.unregister(key.fd)  # as a parked DISCONNECT: read no more
        assert max(peeks) <= selector.PEEKS
        assert sum(peeks) == 301  # each once
        order = [data for r in rounds for data in r]
        assert order[0] == "live", "a closing one before the live one"
        first_closing = next(n for n, r in enumerate(rounds) if "closing" in r)
        assert first_closing >= 301 // selector.PEEKS  # not before every socket was sorted
        assert sorted(served) == sorted([ours.fileno() for ours, _ in leaving] + [live_ours.fileno()])
    finally:
        _close_all(leaving)
        live_ours.close()
        live_peer.close()


def test_a_socket_served_lately_is_peeked_as_soon_as_polled(
    selector: livefirst.LiveFirstSelector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chatting client's or the stall probe's socket, served within ``HOT_FOR`` seconds, is peeked in
    the poll that returns it, whatever the budget the others wait for: served in the first round."""
    selector.PEEKS = 10
    peeked = _counting_peeks(monkeypatch)
    leaving = _pairs(300)
    live_ours, live_peer = socket.socketpair()
    try:
        selector.register(live_ours, selectors.EVENT_READ, "live")
        live_peer.sendall(PINGREQ)
        assert [key.data for key, _ in selector.select(0)] == ["live"]  # served: recently now
        assert live_ours.recv(2) == PINGREQ
        for ours, peer in leaving:
            selector.register(ours, selectors.EVENT_READ, "closing")
            peer.sendall(DISCONNECT)
        live_peer.sendall(PINGREQ)  # polled behind 300 sockets never served
        first = selector.select(0)
        assert [key.data for key, _ in first] == ["live"]
        assert live_ours.fileno() in peeked and len(peeked) <= selector.PEEKS + 1
        assert selector.waiting == 300
    finally:
        _close_all(leaving)
        live_ours.close()
        live_peer.close()


def test_sorting_stops_at_the_rounds_cpu_budget_after_a_batch(
    selector: livefirst.LiveFirstSelector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peeks cost 2 to 5 us each on a loaded machine: once the selector's round has used ``SORT_CPU``
    (none here), a round peeks only the batch under way, ``SORT_BATCH``, and sorting goes on later."""
    selector.SORT_CPU = 0.0
    selector.SORT_BATCH = 8
    peeked = _counting_peeks(monkeypatch)
    leaving = _pairs(150)  # more than BOUND: sliced
    try:
        for ours, peer in leaving:
            selector.register(ours, selectors.EVENT_READ, "closing")
            peer.sendall(DISCONNECT)
        counts = []
        while (ready := selector.select(0)) or selector.waiting:
            counts.append(len(peeked))
            for key, _ in ready:
                selector.unregister(key.fd)
        steps = [b - a for a, b in zip([0, *counts], counts, strict=False)]
        assert steps[:18] == [8] * 18 and sum(steps) == 150
    finally:
        _close_all(leaving)
