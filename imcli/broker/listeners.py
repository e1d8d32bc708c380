"""The broker's listening sockets and the connections they accept, from accept to close.

* A listen backlog (``Limits.listen_backlog``): asyncio's default of 100 makes a flood of
  silent sockets overflow the kernel's queue, and real clients' SYNs wait seconds for a retry.
  asyncio also accepts up to the backlog's number of connections in *one* callback, and each
  accepted one then goes through its first steps in the same rounds as the others (its accept
  task, its stream, the CONNECT's read): with a backlog of 4,096, a burst of logins waiting in the
  kernel's queue came in as clumps of 100 and more a round (issue 21, ninth session: rounds of
  125 CONNECTs read, 11 to 19 ms of the loop's CPU, in a traced join of 10,000). So the server
  is made with ``ACCEPTS_PER_ROUND`` as its backlog (what asyncio accepts per callback) and its
  sockets then listen with the full one (``deepen``): the kernel's queue holds the flood, and
  the loop takes it ``ACCEPTS_PER_ROUND`` a round. The WebSocket listener alike (websockets builds
  its server with ``loop.create_server`` and passes the backlog on; tenth session).
* Each accepted connection is pending until its CONNECT is read (imcli/broker/pending.py)
  and has its output bounded (imcli/broker/output.py) until it ends.
* A WebSocket handshake that fails is the peer's doing (no or another subprotocol, not an
  upgrade, gone or late): one INFO line (``QuietHandshakes``), not websockets' ERROR with a
  traceback, which let any program fill the broker's log at will (ninth session, helper web5).
* Listeners stop first at shutdown: amqtt closes them last, after the sessions, so clients
  reconnecting meanwhile would be accepted into a loop that is about to end; and the TCP
  connections still open are closed (``asyncio.Server.close()`` leaves accepted
  connections open before Python 3.13, and amqtt leaves some finished ones open).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import websockets
from amqtt.contexts import ListenerType
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidHandshake

from imcli.broker.output import OutputBound, Transport
from imcli.broker.pending import PendingConnections

OnStream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

ACCEPTS_PER_ROUND = 32  # connections asyncio accepts in one callback of the loop (module docstring)


def deepen(server: Any, backlog: int) -> None:
    """Have ``server``'s (asyncio's or websockets') listening sockets queue up to ``backlog`` connections
    in the kernel, whatever backlog asyncio made them with (``listen`` again on a listening socket sets
    its backlog; through a duplicate of its descriptor, as asyncio hands out only wrappers of its sockets)."""
    for wrapped in getattr(server, "sockets", None) or ():
        with socket.socket(wrapped.family, wrapped.type, wrapped.proto, fileno=os.dup(wrapped.fileno())) as listening:
            listening.listen(backlog)


class QuietHandshakes(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger for the WebSocket listener, with a failed opening handshake that is
    the peer's doing logged as one INFO line: websockets logs every one as an ERROR with its
    traceback (about 20 lines), and anyone who can reach the port can fail as many as they like.
    Any other failure (the web client's own ``process_request`` raising) stays an ERROR with its
    traceback."""

    PEERS_DOING = (InvalidHandshake, EOFError, OSError, TimeoutError)

    def __init__(self) -> None:
        super().__init__(logging.getLogger("websockets.server"), {})

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        failed = sys.exc_info()[1]
        if msg == "opening handshake failed" and kwargs.get("exc_info") and isinstance(failed, self.PEERS_DOING):
            kwargs.pop("exc_info")
            peer = getattr((kwargs.get("extra") or {}).get("websocket"), "remote_address", None)
            level, msg, args = (
                logging.INFO,
                "WebSocket handshake from %s refused: %s: %s",
                (peer, type(failed).__name__, failed),
            )
        super().log(level, msg, *args, **kwargs)


def counted_websockets(pending: PendingConnections) -> type[ServerConnection]:
    """websockets' connection, pending (imcli/broker/pending.py) from its TCP accept until its
    handshake is over: a socket that never sends the HTTP upgrade is as silent as one that never
    sends a CONNECT, and is capped per address and in all the same way."""

    class PendingWebSocket(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            abort = cast(asyncio.Transport, transport).abort
            pending.arrived(self, peer_host(transport.get_extra_info("peername")), abort)

        def connection_lost(self, exc: Exception | None) -> None:
            pending.done(self)
            super().connection_lost(exc)

    return PendingWebSocket


async def serve(
    listener_type: Any,
    on_stream: OnStream,
    on_websocket: Callable[[Any], Awaitable[None]],
    address: str | None,
    port: int,
    ssl_context: Any,
    backlog: int,
    pending: PendingConnections | None = None,
    handshake_timeout: float = 10.0,
    process_request: Callable[[Any, Any], Any] | None = None,
) -> Any | None:
    """amqtt's server for a TCP or WebSocket listener, with a listen backlog (None: another type).
    A TLS or WebSocket handshake has ``handshake_timeout`` (the CONNECT's deadline) to finish,
    and a WebSocket counts as ``pending`` from its accept (``counted_websockets``). ``process_request``
    answers plain HTTP requests on the WebSocket port (the web client, imcli/broker/webapp.py)."""
    if listener_type == ListenerType.TCP:
        tls_timeout = handshake_timeout if ssl_context is not None else None
        server = await asyncio.start_server(
            on_stream,
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            backlog=min(backlog, ACCEPTS_PER_ROUND),  # accepted per callback (module docstring)
            ssl_handshake_timeout=tls_timeout,
        )
        deepen(server, backlog)
        return server
    if listener_type == ListenerType.WS:
        opened = on_websocket
        if pending is not None:
            count = pending

            async def opened(websocket: Any) -> None:
                count.done(websocket)  # handshake over: pending again (as amqtt's writer) until its CONNECT
                await on_websocket(websocket)

        # websockets hands its keyword arguments to loop.create_server: the same slice a round as TCP's
        ws_server = await websockets.serve(
            opened,
            address,
            port,
            ssl=ssl_context,
            subprotocols=[websockets.Subprotocol("mqtt")],
            backlog=min(backlog, ACCEPTS_PER_ROUND),  # accepted per callback (module docstring)
            open_timeout=handshake_timeout,
            create_connection=counted_websockets(pending) if pending is not None else None,
            process_request=process_request,
            logger=QuietHandshakes(),
        )
        deepen(ws_server, backlog)
        return ws_server
    return None


def stop_listening(servers: Iterable[Any]) -> None:
    """Close the listening sockets of amqtt's servers (amqtt's ``Server`` objects)."""
    for server in servers:
        if server.instance is not None:
            server.instance.close()


def peer_host(peer: Any) -> str | None:
    """The host part of a socket's peer name (an (address, port, …) tuple, or None)."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class Connections:
    """Every accepted connection until it ends: pending, output-bounded, closed at shutdown."""

    def __init__(self, pending: PendingConnections, output: OutputBound) -> None:
        self.pending = pending
        self.output = output
        self._streams: set[asyncio.StreamWriter] = set()

    @contextmanager
    def accepted(
        self, writer: Any, host: str | None, transport: Transport, stream: asyncio.StreamWriter | None = None
    ) -> Iterator[None]:
        """Around amqtt's handling of one connection; ``writer`` is amqtt's writer adapter,
        ``stream`` the asyncio writer of a TCP (or TLS) connection, closed when it ends."""
        if stream is not None:
            self._streams.add(stream)
        self.pending.arrived(writer, host, transport.abort)
        self.output.watch(writer, transport)
        try:
            yield
        finally:
            self.pending.done(writer)
            self.output.forget(writer)
            if stream is not None:
                self._streams.discard(stream)
                if not stream.transport.is_closing():  # a TLS transport closed twice drops its protocol
                    stream.close()  # amqtt leaves some finished connections open (found by ResourceWarnings)

    async def close_all(self) -> None:
        writers = list(self._streams)
        for writer in writers:
            writer.close()
        if writers:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in writers], timeout=5)
