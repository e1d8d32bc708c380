"""The broker's listening sockets and the connections they accept, from accept to close.

* A listen backlog (``Limits.listen_backlog``): asyncio's default of 100 makes a flood of
  silent sockets overflow the kernel's queue, and real clients' SYNs wait seconds for a retry.
* Each accepted connection is pending until its CONNECT is read (imcli/broker/pending.py)
  and has its output bounded (imcli/broker/output.py) until it ends.
* Listeners stop first at shutdown: amqtt closes them last, after the sessions, so clients
  reconnecting meanwhile would be accepted into a loop that is about to end; and the TCP
  connections still open are closed (``asyncio.Server.close()`` leaves accepted
  connections open before Python 3.13, and amqtt leaves some finished ones open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import websockets
from amqtt.contexts import ListenerType
from websockets.asyncio.server import ServerConnection

from imcli.broker.output import OutputBound, Transport
from imcli.broker.pending import PendingConnections

OnStream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
        return await asyncio.start_server(
            on_stream,
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            backlog=backlog,
            ssl_handshake_timeout=tls_timeout,
        )
    if listener_type == ListenerType.WS:
        opened = on_websocket
        if pending is not None:
            count = pending

            async def opened(websocket: Any) -> None:
                count.done(websocket)  # handshake over: pending again (as amqtt's writer) until its CONNECT
                await on_websocket(websocket)

        return await websockets.serve(
            opened,
            address,
            port,
            ssl=ssl_context,
            subprotocols=[websockets.Subprotocol("mqtt")],
            backlog=backlog,
            open_timeout=handshake_timeout,
            create_connection=counted_websockets(pending) if pending is not None else None,
            process_request=process_request,
        )
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
