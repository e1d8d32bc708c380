"""Sockets that connect and never send a CONNECT (issue 15, missing limits: half-open TCP
connections). The attack held about 1,000 of them open and real clients intermittently got no
CONNACK for 15 s (a listen backlog of 100). Past ``Limits.pending_per_address`` such sockets
from one address the oldest is closed at once; the backlog is raised; real clients are served."""

from __future__ import annotations

import resource
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import chat, connect_packet, connect_raw, ended, password_of, read_packets, wait_until

PER_ADDRESS = 40
FLOOD = {f"127.0.0.{10 + i}": 100 for i in range(4)}  # 400 silent sockets from four addresses


@pytest.fixture
def flooded(tmp_path: Path) -> Iterator[ServeInfo]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * sum(FLOOD.values()) + 512  # both ends live in this process
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    # a CONNECT deadline far away: any socket closed within the test was closed by the pending cap
    settings = BrokerSettings(
        data_dir=tmp_path / "data", port=0, packet_timeout=300.0, limits=Limits(pending_per_address=PER_ADDRESS)
    )
    try:
        with BackgroundServer(settings) as info:
            store = AccountStore(info.data_dir)
            for name in ("alice", "bob"):
                store.add(name, password_of(name))
            yield info
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_silent_sockets_past_the_cap_are_closed_and_real_clients_chat(flooded: ServeInfo) -> None:
    where = (flooded.address.host, flooded.address.port)
    silent: list[socket.socket] = []
    try:
        for source, count in FLOOD.items():
            for _ in range(count):
                sock = socket.create_connection(where, timeout=30, source_address=(source, 0))
                sock.setblocking(False)
                silent.append(sock)
        excess = sum(count - PER_ADDRESS for count in FLOOD.values())
        assert wait_until(lambda: sum(ended(s) for s in silent) >= excess, 60), (
            f"{sum(ended(s) for s in silent)} of the {excess} sockets past the cap were closed"
        )
        assert flooded.broker is not None
        assert len(flooded.broker.pending) <= PER_ADDRESS * len(FLOOD)

        # a real client, from an address of its own and from a flooding one, still connects and chats
        alice = connect_raw(*where, "alice", "alice:phone")
        bob = connect_raw(*where, "bob", "bob:laptop")
        try:
            assert alice.rc == 0 and bob.rc == 0
            assert alice.subscribe("im/room/lobby/+") == 1
            payload = chat("still here")
            bob.publish("im/room/lobby/bob", payload)
            assert alice.expect("im/room/lobby/bob", timeout=30).payload == payload
        finally:
            alice.close()
            bob.close()
        with socket.create_connection(where, timeout=30, source_address=("127.0.0.10", 0)) as late:
            late.sendall(connect_packet(b"alice:late", b"alice", password_of("alice").encode()))
            got, _ = read_packets(late, bool)
            assert got and got[0] == (0x20, b"\x00\x00")
    finally:
        for s in silent:
            s.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listening socket's backlog")
def test_the_listen_backlog_is_raised(tmp_path: Path) -> None:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0)) as info:
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{info.address.port}"], capture_output=True, text=True, check=True
        ).stdout
        backlog = int(out.split()[2])  # State Recv-Q Send-Q …: a listening socket's Send-Q is its backlog
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert backlog == min(Limits().listen_backlog, somaxconn) > 100, out


def test_the_open_file_limit_is_raised(tmp_path: Path) -> None:
    """Every connection is a file descriptor: a soft limit of 1,024 (the usual default) would
    end the broker's accepting (EMFILE) long before the pending caps."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0)):
            raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            assert raised == hard or (hard == resource.RLIM_INFINITY and raised > 512)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _serve_open_files_line(tmp_path: Path, soft: int, hard: int) -> str:
    """``imcli serve`` started with the open-file limits (soft, hard) (lowering either needs no
    privilege): its start-up line about them."""
    import os
    import sys

    start = (
        f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "sys.argv[0] = 'imcli'; runpy.run_module('imcli', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", start, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("  open files"):
                return line.strip()
        raise AssertionError("imcli serve said nothing about its open files")
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_serve_raises_its_soft_open_file_limit_to_the_hard_one_and_says_so(tmp_path: Path) -> None:
    """A server started with the usual soft limit (here 512) takes the whole hard limit, and says it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192  # lowering the hard limit needs no root
    line = _serve_open_files_line(tmp_path, 512, hard)
    assert line == f"open files  {hard} (ulimit -n, raised to the hard limit)"


def test_serve_says_when_the_hard_open_file_limit_is_below_what_it_needs(tmp_path: Path) -> None:
    """Below ``max_pending`` + 1,024 (3,072 by default) the line says so, and what to raise."""
    wanted = Limits().max_pending + 1024
    line = _serve_open_files_line(tmp_path, 256, 1500)
    assert line.startswith("open files  1500 (ulimit -n, raised to the hard limit)"), line
    assert f"below the {wanted} the limits need: raise the hard limit" in line, line


def test_a_burst_of_real_clients_from_one_address_is_not_cut(flooded: ServeInfo) -> None:
    """A NAT's team reconnecting at once: accepted together, before any CONNECT is read; none
    of them is mistaken for a silent socket (each gets its CONNACK, here 5: no username)."""
    where = (flooded.address.host, flooded.address.port)
    burst: list[socket.socket] = []
    try:
        for i in range(3 * PER_ADDRESS):
            sock = socket.create_connection(where, timeout=30, source_address=("127.0.0.20", 0))
            sock.sendall(connect_packet(f"anon{i}".encode()))
            burst.append(sock)
        for sock in burst:
            got, _ = read_packets(sock, bool)
            assert got and got[0] == (0x20, b"\x00\x05"), got
    finally:
        for sock in burst:
            sock.close()


def _accept_rounds(start: Callable[[list[int], list[int]], Awaitable[Any]]) -> list[int]:
    """The loop round each of 100 connections waiting in the kernel's queue was accepted in, by the
    listener ``start(arrivals, rounds)`` makes (each accept appends ``rounds[0]`` to ``arrivals``)."""
    import asyncio

    arrivals: list[int] = []
    rounds = [0]

    async def main() -> None:
        async def count_rounds() -> None:
            while True:
                rounds[0] += 1
                await asyncio.sleep(0)

        server = await start(arrivals, rounds)
        assert server is not None
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]  # queued by the kernel
        counter = asyncio.create_task(count_rounds())
        for _ in range(1000):
            if len(arrivals) == len(clients):
                break
            await asyncio.sleep(0.01)
        counter.cancel()
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    return arrivals


def test_a_burst_of_connections_is_accepted_a_slice_per_loop_round() -> None:
    """100 connections waiting in the kernel's queue: the loop takes at most ``ACCEPTS_PER_ROUND`` of them
    a round, not all 100 in one callback (asyncio accepts up to its backlog per callback, and the backlog is
    4,096: issue 21, ninth session), and every one is served."""
    import asyncio
    from collections import Counter

    from amqtt.contexts import ListenerType

    from imcli.broker import listeners

    async def start(arrivals: list[int], rounds: list[int]) -> Any:
        async def on_stream(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            arrivals.append(rounds[0])  # the loop round this connection's handler started in
            writer.close()

        async def on_websocket(_websocket: object) -> None:
            raise AssertionError("a TCP listener")

        return await listeners.serve(
            ListenerType.TCP, on_stream, on_websocket, "127.0.0.1", 0, None, Limits().listen_backlog
        )

    arrivals = _accept_rounds(start)
    assert len(arrivals) == 100
    assert max(Counter(arrivals).values()) <= listeners.ACCEPTS_PER_ROUND < 100


def test_a_burst_of_websocket_connections_is_accepted_a_slice_per_loop_round() -> None:
    """The WebSocket listener as the TCP one: websockets builds its server with asyncio's
    ``create_server`` and accepted up to the full backlog (4,096) in one callback. Counted at each
    connection's accept (``pending.arrived``), before any handshake: the sockets send nothing."""
    import asyncio
    from collections import Counter

    from amqtt.contexts import ListenerType

    from imcli.broker import listeners

    async def start(arrivals: list[int], rounds: list[int]) -> Any:
        class Arrivals:  # PendingConnections' two calls, counting the loop round of each accept
            def arrived(self, _connection: object, _host: str | None, _abort: object) -> None:
                arrivals.append(rounds[0])

            def done(self, _connection: object) -> None:
                pass

        async def on_stream(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
            raise AssertionError("a WebSocket listener")

        async def on_websocket(_websocket: object) -> None:
            raise AssertionError("no handshake is sent")

        return await listeners.serve(
            ListenerType.WS,
            on_stream,
            on_websocket,
            "127.0.0.1",
            0,
            None,
            Limits().listen_backlog,
            cast(Any, Arrivals()),
        )

    arrivals = _accept_rounds(start)
    assert len(arrivals) == 100
    assert max(Counter(arrivals).values()) <= listeners.ACCEPTS_PER_ROUND < 100
