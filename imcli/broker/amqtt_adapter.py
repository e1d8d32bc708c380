"""The one place where this project meets amqtt's insides: ``ImBroker`` and the private
names it relies on.

amqtt 0.12.1 (pinned exactly in pyproject.toml) has behaviour that no plugin can fix, so
``ImBroker`` overrides a few of its private methods. Each override is thin: it calls the
project's own rules, which live in modules named for what they do and know nothing of
amqtt's internals (imcli/broker/server.py's docstring says which module holds which rule).

Every private name of amqtt that any module of imcli/broker relies on is listed once in
``AMQTT_PRIVATE``; tests/test_amqtt_private.py fails, naming it, when the pinned amqtt no
longer has one. Other modules reach amqtt's private state through ``ImBroker``'s public
methods (``session_table``, ``delete_session``, ``close_connection``) or through the
callables handed to them here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial, partialmethod
from pathlib import Path
from typing import Any, NamedTuple

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WebSocketsWriter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol import broker_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import INCOMING, ApplicationMessage, IncomingApplicationMessage, OutgoingApplicationMessage, Session

from imcli.broker import chatfirst
from imcli.broker.accounts import AccountStore
from imcli.broker.acl import Access, TopicAcl
from imcli.broker.admission import Admission
from imcli.broker.client_loop import Bell, run_client_loop
from imcli.broker.connection_gate import ConnectionGate
from imcli.broker.device_service import DeviceService
from imcli.broker.devices import DeviceStore
from imcli.broker.fanout import FanOut, InFlight, SessionFilters
from imcli.broker.gcpause import defer_while, release_stream, release_transport
from imcli.broker.journal import KEPT, ArchiveWriter, Journal
from imcli.broker.listeners import Connections, peer_host, serve, stop_listening
from imcli.broker.notices import Notifier, taken_over
from imcli.broker.output import OutputBound, ReadGate
from imcli.broker.packets import CheckedWebSocketsReader, PacketGuard, connect_within
from imcli.broker.pending import OpenFiles, PendingConnections, raise_fd_limit
from imcli.broker.publish_checks import PublishChecks
from imcli.broker.reader import AFTER_OTHERS, PacketReader, StreamGuard
from imcli.broker.retained import RETAINED_SLICE, RetainedState, send_in_slices
from imcli.broker.session_sweep import EndedSessions
from imcli.broker.session_upkeep import SessionUpkeep
from imcli.broker.sessions import (
    LeanQueue,
    SessionState,
    SubscriptionTable,
    close_silent,
    connect_session,
    no_pubrel,
    start_session,
)
from imcli.broker.settings import TLS_LISTENER, BrokerSettings
from imcli.broker.teardown import TeardownGate
from imcli.broker.topic_access import TopicAccess
from imcli.broker.webapp import WebApp, loopback_host
from imcli.broker.wills import LastWills, Will, will_of
from imcli.core.rules import device_of_client_id
from imcli.core.wire import TopicKind, Topics, build_schemas

log = logging.getLogger(__name__)
FILE_BYTES = frozenset({TopicKind.UPLOAD, TopicKind.FILE_DATA})  # a file's chunks (deliver_file)
CHAT_LINES = frozenset({TopicKind.ROOM, TopicKind.DM, TopicKind.GROUP_MSG})  # chat lines (deliver_line)


class Route(NamedTuple):
    """A way a PUBLISH read from a client reaches ``ImBroker.publish``, the one list of steps: the topic
    kinds it takes (``None``: any) and, for each step of ``ImBroker.deliver`` that acts on some topics
    only, whether it runs. A route may skip a step only if none of its topics is one the step acts on
    (``route`` refuses to make it otherwise; ``STEP_KINDS`` says which topics each step acts on, and
    tests/test_publish_routes.py that the step's own test agrees)."""

    name: str
    kinds: frozenset[TopicKind] | None
    device: bool = True  # a device request answered by the broker (DeviceService.intercept)
    held: bool = True  # a request to the workers held until the journal commits (ImBroker.is_request)
    chat_first: bool = True  # a chunk's fan-out a round late while chat waits (ImBroker.carries_file_bytes)
    sent: bool = True  # a DM's copy for its sender's other devices (ImBroker.sent_copy)
    journal: bool = True  # chat's row journalled (Journal.record_line)
    chunks: bool = False  # every topic it takes is a file's chunk: the chat-first look without the topic's test


STEP_KINDS: dict[str, frozenset[TopicKind]] = {  # the topics each skippable step acts on
    "device": frozenset({TopicKind.REQUEST}),
    "held": frozenset({TopicKind.REQUEST}),
    "chat_first": FILE_BYTES,
    "sent": frozenset({TopicKind.DM}),
    "journal": KEPT,
}


def route(name: str, kinds: frozenset[TopicKind] | None, *skipped: str) -> Route:
    """A ``Route`` that skips ``skipped`` steps, if none of them can act on its ``kinds``."""
    for step in skipped:
        acts_on = STEP_KINDS[step]
        if kinds is None or not kinds.isdisjoint(acts_on):
            raise ValueError(f"the {name} route takes topics the {step} step acts on: it cannot skip it")
    chunks = kinds is not None and kinds <= STEP_KINDS["chat_first"]
    return Route(name, kinds, **dict.fromkeys(skipped, False), chunks=chunks)


GENERAL = route("general", None)  # the message loop's queue, the reader's deliver_now: every topic, every step
LINE = route("line", CHAT_LINES, "device", "held", "chat_first")  # deliver_line
CHUNK = route("chunk", FILE_BYTES, "device", "held", "sent", "journal")  # deliver_file
RETRY_WAIT = 10  # seconds amqtt gives a message sent again on a resumed session (its _retry_deliveries)
TAKEOVER_NOTICE_WAIT = 1.0  # seconds a connection taken over has to take its notice (ImBroker._tell_taken_over)


class PrivateName(NamedTuple):
    module: str
    name: str  # qualified: Class.attribute, or a module-level name
    use: str  # "overridden", "called", "read" (an attribute), "replaced" (we assign our own)


def _names(module: str, owner: str, use: str, names: str) -> tuple[PrivateName, ...]:
    return tuple(PrivateName(module, f"{owner}.{name}" if owner else name, use) for name in names.split())


_B, _H, _S = "amqtt.broker", "amqtt.mqtt.protocol.broker_handler", "amqtt.session"
AMQTT_PRIVATE: tuple[PrivateName, ...] = (
    # ImBroker, below
    *_names(_B, "Broker", "overridden", "_initialize_client_session _handle_client_session _handle_message_delivery"),
    *_names(_B, "Broker", "overridden", "_topic_filtering _run_broadcast _retain_broadcast_message"),
    *_names(_B, "Broker", "overridden", "_broadcast_message"),  # fanned out where published (fanout.FanOut)
    *_names(_B, "Broker", "overridden", "_publish_session_retained_messages"),
    *_names(_B, "Broker", "overridden", "_publish_retained_messages_for_subscription"),
    *_names(_B, "Broker", "overridden", "_del_all_subscriptions _del_subscription _handle_disconnect"),
    *_names(_B, "Broker", "overridden", "_create_server_instance"),  # the listen backlog
    *_names(_B, "Broker", "called", "_client_connected _delete_session"),
    *_names(_B, "Broker", "overridden", "_client_message_loop"),  # by client_loop.run_client_loop
    *_names(_B, "Broker", "called", "_handle_subscription _handle_unsubscription"),  # by client_loop
    *_names(_H, "BrokerProtocolHandler", "read", "_disconnect_waiter _pending_subscriptions _pending_unsubscriptions"),
    *_names(_B, "Broker", "called", "_stop_handler"),  # by _handle_disconnect
    *_names(_B, "Broker", "overridden", "_session_monitor"),  # by session_sweep.EndedSessions
    *_names(_B, "Broker", "called", "_cleanup_session"),  # by session_sweep.EndedSessions
    *_names(_B, "Broker", "called", "_matches _get_handler"),  # handed to fanout.FanOut
    *_names(_B, "Broker", "read", "_servers _sessions _retained_messages"),
    *_names(_B, "Broker", "replaced", "_subscriptions"),  # by sessions.SubscriptionTable
    # ImBroker.publish and deliver fire amqtt's message events only if a plugin listens; is_file_topic and
    # is_line_topic let the direct paths (which build no packet for PACKET_RECEIVED) take a PUBLISH only if none does
    *_names("amqtt.plugins.manager", "PluginManager", "read", "_event_plugin_callbacks"),
    # AckAfterJournal, LightSession and use_light_sessions, below
    *_names(_H, "BrokerProtocolHandler", "overridden", "_handle_qos1_message_flow _handle_qos2_message_flow"),
    *_names(_H, "BrokerProtocolHandler", "overridden", "_handle_qos0_message_flow"),  # delivered at once, or queued
    *_names(_H, "BrokerProtocolHandler", "read", "_puback_waiters"),  # by reader.PacketReader (amqtt's own QoS 1 flows)
    *_names(_H, "BrokerProtocolHandler", "overridden", "_reader_loop"),  # by reader.PacketReader, TCP and TLS
    *_names(_H, "BrokerProtocolHandler", "overridden", "_retry_deliveries"),  # sent again, not waited for
    *_names(_H, "BrokerProtocolHandler", "called", "_handle_message_flow"),  # by _retry_deliveries (QoS 2, WebSocket)
    *_names(_H, "BrokerProtocolHandler", "read", "_reader_ready _reader_stopped"),  # by reader.PacketReader
    *_names(_H, "BrokerProtocolHandler", "overridden", "_stop_waiters"),  # by AckAfterJournal.stop, below
    *_names(_H, "BrokerProtocolHandler", "read", "_reader_task _keepalive_task"),  # by AckAfterJournal.stop
    *_names(_H, "BrokerProtocolHandler", "read", "_pubcomp_waiters _pubrec_waiters _pubrel_waiters"),  # the same
    *_names(_H, "", "replaced", "Session"),  # the name init_from_connect builds a session with
    *_names(_S, "Session", "overridden", "_init_states"),
    *_names(_S, "Session", "called", "_on_enter_connected _on_enter_disconnected"),  # by sessions.SessionState
    # packets.CheckedWebSocketsReader
    *_names("amqtt.adapters", "WebSocketsReader", "overridden", "_feed_buffer"),
    *_names("amqtt.adapters", "WebSocketsReader", "read", "_stream _protocol"),
)


class AckAfterJournal(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler, calling ``before_ack`` before each PUBACK, and
    holding the Last Will of its own connection's CONNECT (amqtt keeps it in the session, which
    a resumed or taken-over persistent session shares with the next connection).

    A QoS 0 or 1 PUBLISH that a stream connection's reader reads while nothing it sent before
    waits (``may_deliver_now``) is handled in the reader's own callback by ``deliver_now``
    (``ImBroker.deliver_now``: the publish checks, the fan-out, then the journal, then the PUBACK)
    instead of being queued for the connection's message loop (imcli/broker/client_loop.py), one
    event-loop round later, whose fan-out was written one round later still (issue 21: DM
    latency)."""

    before_ack: Any = None  # (Session, ApplicationMessage) -> None
    deliver_now: Any = None  # (Session, ApplicationMessage, acknowledged: bool) -> Awaitable[bool]
    deliver_file: Any = None  # (Session, topic, payload) -> Awaitable[bool]: ImBroker.deliver_file
    is_file_topic: Callable[[str], bool] | None = None  # ImBroker.is_file_topic
    deliver_line: Any = None  # (Session, topic, payload) -> Awaitable[bool]: ImBroker.deliver_line
    is_line_topic: Callable[[str], bool] | None = None  # ImBroker.is_line_topic
    carries_file_bytes: Callable[[str], bool] | None = None  # ImBroker.carries_file_bytes
    loop_idle = False  # the message loop waits with nothing to do (client_loop.run_client_loop)
    delivering = False  # the reader is handling a message itself: the message loop waits
    refused = False  # a message handled by the reader ends the connection (an invalid topic)
    at_once = 0  # messages the reader may still handle itself in its current read (reader.PacketReader)
    will: Will | None = None  # imcli/broker/wills.py
    max_unreleased = 1 << 16  # incoming QoS 2 messages held for their PUBREL (sessions.no_pubrel)
    _silent_close: asyncio.Future[None] | None = None
    activity: Bell | None = None  # set when a packet handled left work for the message loop
    answered = 0  # SUBSCRIBEs and UNSUBSCRIBEs the message loop has answered (SUBACK, UNSUBACK)
    loop_ended = False  # the message loop has returned (it answers no more)
    said_goodbye = False  # a DISCONNECT was handled: a PUBLISH after it is not the client's (MQTT-3.14.4-1)
    taken_over = False  # closed for a new CONNECT with its client id (ImBroker.take_over)
    goodbye: DisconnectPacket | None = None  # the DISCONNECT read, taking effect at the connection's end
    teardown_gate: TeardownGate | None = None  # the broker's: when the end may go on (reader.PacketReader)
    answers: bytearray | None = None  # PUBACKs for the packets of one read, while its reader handles them
    journal: Journal | None = None  # the broker's: answers wait for its commits (imcli/broker/journal.py)
    _stopping: asyncio.Event | None = None  # a stop() under way; set when it ends (done or cancelled)
    _stopped = False  # stop() has done its work (it does it once)
    _disconnect_waiter: asyncio.Future[Any] | None  # amqtt's (AMQTT_PRIVATE), set by its start()

    def __init__(self, plugins_manager: Any, session: Session | None = None, loop: Any = None) -> None:
        super().__init__(plugins_manager, session, loop)
        # amqtt's asyncio.Queue objects: 3 KB each, empty (imcli/broker/sessions.py)
        self._pending_subscriptions: LeanQueue[Any] = LeanQueue()
        self._pending_unsubscriptions: LeanQueue[Any] = LeanQueue()
        self.in_flight = InFlight()  # the fan-out's QoS 1 copies awaiting their PUBACK (fanout.py)
        self._retrying: set[asyncio.Task[Any]] = set()  # amqtt's flows of messages sent again (_retry_deliveries)

    def attach(self, session: Session, reader: Any, writer: Any) -> None:
        super().attach(session, reader, writer)
        # No write timer (issue 21: no stall over 50 ms). amqtt arms one per connection for its
        # ``handle_write_timeout``, which does nothing on a broker's side, and moves it at every packet
        # it writes (a PINGRESP, a SUBACK, a PUBACK: ``_send_packet`` cancels it and calls
        # ``call_later`` again). A cancelled timer stays in asyncio's heap until half the heap is
        # cancelled; then one round rebuilds the heap from all of them (``BaseEventLoop._run_once``,
        # ``heapify`` comparing timers in Python): joining 10,000 users with a PINGREQ every 30 s,
        # 28,663 timers of which 14,347 cancelled took one round 32.5 ms of CPU outside any callback,
        # and such a round came every 30 to 40 s (``--trace-stalls``, benchmarks/stalltrace.py).
        # The read timeout is the reader's own (reader.PacketReader; amqtt's _reader_loop, for the
        # WebSocket, reads ``session.keep_alive``), not this attribute.
        self.keepalive_timeout = None

    async def stop(self) -> None:
        # asked up to four times per connection (its reader's end, the message loop's disconnect, the
        # ended session's cleanup, a take-over), amqtt's did all its work each time: 22 debug lines
        # built (f-strings, a packet's repr), every waiter cancelled again. Once is enough: a later
        # call returns once the stop under way has ended, not before: a take-over (ImBroker.take_over)
        # whose call returned while the reader's end was still closing the old connection went on to
        # replace the session under it.
        while (running := self._stopping) is not None:
            await running.wait()  # its caller cancelled: not stopped after all, and this call does it
        if self._stopped:
            return
        reader = self._reader_task  # amqtt private (AMQTT_PRIVATE)
        reader_ended = reader is None or reader.done() or reader is asyncio.current_task()
        if reader_ended and self._closes_at_once():  # the usual end (its reader's): nothing to wait for
            self._let_go()
            self._close_at_once()
            self._forget_pending()
            self._stopped = True
            return
        self._stopping = running = asyncio.Event()
        try:
            self._let_go()
            if not reader_ended and reader is not None:
                reader.cancel()
                await self._reader_stopped.wait()  # amqtt private (AMQTT_PRIVATE)
            if self._closes_at_once():
                self._close_at_once()
            else:
                await self._close_writer()
            self._forget_pending()
            self._stopped = True
        finally:
            self._stopping = None
            running.set()

    # amqtt's ProtocolHandler.stop and BrokerProtocolHandler.stop, in parts, without their debug lines
    # (issue 21: the broker's CPU per user leaving; docs/PERFORMANCE.md)

    def _let_go(self) -> None:
        """Everything waiting on this connection cancelled: flows of messages sent again, the fan-out's
        copies awaiting a PUBACK, amqtt's waiters of its own flows, the keep-alive timer."""
        for task in list(self._retrying):
            task.cancel()
        self.in_flight.forget_all()
        self._stop_waiters()
        if self._keepalive_task is not None:  # amqtt private (AMQTT_PRIVATE)
            self._keepalive_task.cancel()

    def _stop_waiters(self) -> None:  # amqtt's, without its four debug lines built each time
        for waiters in (self._puback_waiters, self._pubcomp_waiters, self._pubrec_waiters, self._pubrel_waiters):
            for waiter in waiters.values():
                waiter.cancel()

    def _closes_at_once(self) -> bool:
        """Whether the writer is a TCP (or TLS) connection's with nothing left to write, or none: closing
        it then waits for nothing (``_close_at_once``)."""
        if self.writer is None:
            return True
        guard = self.reader
        return (
            isinstance(guard, StreamGuard)
            and isinstance(self.writer, StreamWriterAdapter)
            and not guard.transport.get_write_buffer_size()
        )

    def _close_at_once(self) -> None:
        """amqtt's ``StreamWriterAdapter.close`` for a connection with nothing left to write, without
        its waits: its ``drain`` (nothing to drain), its ``write_eof`` (a ``shutdown``: the close
        sends the FIN as well) and its ``wait_closed`` (one more event-loop round per connection,
        for ``connection_lost``, which asyncio calls at its next round all the same)."""
        if not isinstance(self.writer, StreamWriterAdapter) or not isinstance(self.reader, StreamGuard):
            return
        self.writer.is_closed = True  # amqtt's adapter writes nothing more, and its close() returns at once
        transport = self.reader.transport
        if not transport.is_closing():  # a TLS transport closed again (after an abort) drops its protocol:
            transport.close()  # its get_write_buffer_size() then raises (OutputBound's check)

    async def _close_writer(self) -> None:  # amqtt's, for anything else (output still to write, WebSocket)
        try:
            if self.writer is not None:
                await self.writer.close()
        except (asyncio.CancelledError, TimeoutError, OSError) as exc:  # as amqtt's stop()
            log.debug("closing the writer of %s: %r", self.session and self.session.client_id, exc)

    def _forget_pending(self) -> None:
        waiter: asyncio.Future[Any] | None = self._disconnect_waiter  # amqtt private (AMQTT_PRIVATE)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._disconnect_waiter = None
        while not self._pending_subscriptions.empty():
            self._pending_subscriptions.get_nowait()
        while not self._pending_unsubscriptions.empty():
            self._pending_unsubscriptions.get_nowait()

    async def handle_disconnect(self, disconnect: Any) -> None:
        # amqtt's (and, with None, its handle_connection_closed) without its debug lines: one of
        # them built the packet's repr (3 us) whether debug logging was on or not
        self.said_goodbye = True
        waiter: asyncio.Future[Any] | None = self._disconnect_waiter  # amqtt private (AMQTT_PRIVATE)
        if waiter is not None and not waiter.done():
            waiter.set_result(disconnect)
        self._disconnect_waiter = None  # as amqtt's: set once

    def say_goodbye(self, disconnect: DisconnectPacket) -> None:
        """A DISCONNECT read by ``reader.PacketReader``: nothing after it is the client's, and it takes
        effect (its Last Will discarded, the message loop ended) when the connection's end gets its
        turn (imcli/broker/teardown.py), or at once if the connection is taken over meanwhile."""
        self.said_goodbye = True
        self.goodbye = disconnect

    async def handle_connection_closed(self) -> None:
        await self.handle_disconnect(self.goodbye)

    # QoS 1 PUBLISHes of this connection being handled, and what waits for none to be (``_after_publishes``)
    _publishing = 0
    _settled: asyncio.Future[None] | None = None

    async def handle_publish(self, publish_packet: Any) -> None:
        if self.said_goodbye:  # bytes after the client's DISCONNECT (amqtt's WebSocket loop reads on)
            log.debug("%s: PUBLISH after DISCONNECT dropped", self.session.client_id if self.session else "?")
            return
        try:
            # amqtt's handle_publish and _handle_message_flow in one step, without the debug line it
            # built for every PUBLISH (an f-string and the queue's size) whether debug was on or not
            topic, data = publish_packet.topic_name, publish_packet.data
            if topic is None or data is None:
                return
            header, qos = publish_packet.variable_header, publish_packet.qos
            message = IncomingApplicationMessage(
                header.packet_id if header else None, topic, qos, data, publish_packet.retain_flag
            )
            message.publish_packet = publish_packet
            if qos == QOS_1:
                self._publishing += 1  # its PUBACK is an answer (a QoS 2 flow waits for the client's PUBREL)
                try:
                    await self._handle_qos1_message_flow(message)
                finally:
                    self._publishing -= 1
                    if not self._publishing and self._settled is not None and not self._settled.done():
                        self._settled.set_result(None)
            elif qos == QOS_0:
                await self._handle_qos0_message_flow(message)
            elif qos == QOS_2:
                await self._handle_qos2_message_flow(message)
            else:
                raise AMQTTError(f"Unexpected QOS value '{qos}'")
        finally:
            if self.session is None or not self.session.delivered_message_queue.empty():
                self._stir()  # a message handled at once left nothing for the message loop

    async def _after_publishes(self) -> None:
        """Until no QoS 1 PUBLISH read before is being handled (its PUBACK written): amqtt's WebSocket loop
        handles every packet in a task of its own, and a PUBACK waits for the journal's commit
        (imcli/broker/journal.py), so a PINGRESP or SUBACK answered meanwhile overtook it (a client
        that pings as a barrier saw the answer before the acknowledgements). A TCP connection's
        reader handles its packets in order itself (reader.py); there nothing is being handled here."""
        while self._publishing:
            if self._settled is None or self._settled.done():
                self._settled = asyncio.get_running_loop().create_future()
            await self._settled

    async def handle_pingreq(self, pingreq: Any) -> None:
        await self._after_publishes()
        await super().handle_pingreq(pingreq)

    async def handle_subscribe(self, subscribe: Any) -> None:
        await self._after_publishes()
        try:
            await super().handle_subscribe(subscribe)
        finally:
            self._stir()

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        await self._after_publishes()
        try:
            await super().handle_unsubscribe(unsubscribe)
        finally:
            self._stir()

    async def _retry_deliveries(self) -> None:
        """A resumed session's unacknowledged messages sent again (MQTT-4.4.0-1), not waited for.
        amqtt's waited for each one's PUBACK (or PUBREL) before the connection's message loop began,
        while this connection's reader (reader.py) waits for that loop's SUBACK before it reads what
        follows a SUBSCRIBE: a client that subscribed at once (every ``imcli`` command does) and had
        a copy outstanding got its SUBACK 5 s late, or never when its session changed hands again
        meanwhile (CI: two ``imcli chat`` of one device). A QoS 1 copy goes again with DUP set, its
        PUBACK settled by the reader (fanout.InFlight); QoS 2 flows, and a WebSocket's, are amqtt's,
        in tasks of their own. A copy written on this connection already (since its CONNACK) is not."""
        session = self.session
        if session is None:
            return
        stream = isinstance(self.reader, StreamGuard) and self.writer is not None
        later: list[Any] = []
        for message in list(session.inflight_out.values()):
            if message.packet_id in self.in_flight:
                continue
            if stream and message.qos == 1 and isinstance(message, OutgoingApplicationMessage):
                try:
                    self.in_flight.resend(session, message, self.writer)
                except (ConnectionError, RuntimeError) as exc:  # closing: its reader ends the connection
                    log.debug("%s: resend to a closing connection dropped: %s", session.client_id, exc)
                    return
            else:
                later.append(message)
        for message in [*later, *session.inflight_in.values()]:
            task = asyncio.create_task(asyncio.wait_for(self._handle_message_flow(message), RETRY_WAIT))
            self._retrying.add(task)
            task.add_done_callback(self._retried)

    def _retried(self, task: asyncio.Task[Any]) -> None:
        self._retrying.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("%s: a message sent again was not acknowledged: %r", self.session and self.session.client_id, exc)

    async def _reader_loop(self) -> None:
        if isinstance(self.reader, StreamGuard):  # TCP and TLS (imcli/broker/reader.py)
            await PacketReader(self, self.reader).run()
        else:  # WebSocket: amqtt's loop
            await super()._reader_loop()

    async def mqtt_acknowledge_subscription(self, packet_id: int, return_codes: list[int]) -> None:
        try:
            await super().mqtt_acknowledge_subscription(packet_id, return_codes)
        finally:
            self.answered += 1  # the reader waits for it (imcli/broker/reader.py)

    async def mqtt_acknowledge_unsubscription(self, packet_id: int) -> None:
        try:
            await super().mqtt_acknowledge_unsubscription(packet_id)
        finally:
            self.answered += 1

    def _stir(self) -> None:
        if self.activity is not None:  # the connection's message loop (imcli/broker/client_loop.py)
            self.activity.set()

    def may_deliver_now(self) -> bool:
        """Whether a message just read may be handled by the reader at once: read by
        ``reader.PacketReader`` (which gathers its PUBACKs in ``answers``), within the read's
        share (``at_once``: ``client_loop.FAIR_SHARE``, as the message loop's), the message loop
        idle with nothing queued ahead of it (the client's order is kept), the connection not ended."""
        session, ended = self.session, self._disconnect_waiter  # amqtt private (AMQTT_PRIVATE)
        return (
            self.loop_idle
            and self.at_once > 0
            and self.answers is not None
            and self.deliver_now is not None
            and not self.delivering
            and not self.refused
            and session is not None
            and session.delivered_message_queue.empty()
            and self._pending_subscriptions.empty()
            and self._pending_unsubscriptions.empty()
            and ended is not None
            and not ended.done()
        )

    async def _deliver_at_once(self, app_message: Any, acknowledged: bool) -> None:
        delivering = self.deliver_now(self.session, app_message, acknowledged)
        await self._at_once(delivering, app_message.packet_id if acknowledged else None)

    async def _at_once(self, delivering: Awaitable[bool], packet_id: int | None) -> None:
        """``delivering`` (the broker's handling of a message this reader read), awaited in the reader's
        callback; then its PUBACK (``packet_id``, if QoS 1) joins the read's answers (reader.PacketReader
        writes them after the journal's commit)."""
        self.at_once -= 1
        self.delivering = True
        delivered = False
        try:
            delivered = await delivering
        finally:
            self.delivering = False
            if not delivered:
                self.refused = True  # the message loop ends the connection, as it would have
            if not self.loop_idle or self.refused:  # it waits for this one (client_loop.py)
                self._stir()
        if packet_id is not None and self.answers is not None:  # the PUBACK after the journal (ImBroker.deliver_now)
            self.answers += b"\x40\x02" + packet_id.to_bytes(2, "big")

    def file_topic(self, topic: str) -> bool:
        """Whether a QoS 1 PUBLISH on ``topic`` is a file's bytes that ``file_bytes`` may take."""
        return self.deliver_file is not None and self.is_file_topic is not None and self.is_file_topic(topic)

    async def file_bytes(self, topic: str, packet_id: int, payload: bytes) -> None:
        """A file's chunk (QoS 1, ``file_topic``) that the reader reads while ``may_deliver_now``:
        handled as ``_deliver_at_once`` handles a message, by ``ImBroker.deliver_file``, without the
        amqtt packet, the application message and the layers of ``handle_publish`` (issue 16: a
        chat line arriving meanwhile waits for what a chunk takes of the loop)."""
        await self._directly(self.deliver_file, topic, packet_id, payload)

    def line_topic(self, topic: str) -> bool:
        """Whether a QoS 1 PUBLISH on ``topic`` is a chat line that ``chat_line`` may take."""
        return self.deliver_line is not None and self.is_line_topic is not None and self.is_line_topic(topic)

    async def chat_line(self, topic: str, packet_id: int, payload: bytes) -> None:
        """A chat line (QoS 1, neither DUP nor RETAIN, ``line_topic``) that the reader reads while
        ``may_deliver_now``: handled by ``ImBroker.deliver_line`` as a file's chunk is, without amqtt's
        packet and message objects and the layers of ``handle_publish`` and ``deliver_now`` (issue 16,
        ninth session: a line's CPU in the loop is what the chat tail multiplies)."""
        await self._directly(self.deliver_line, topic, packet_id, payload)

    async def _directly(
        self, deliver: Callable[[Any, str, bytes], Awaitable[bool]], topic: str, packet_id: int, payload: bytes
    ) -> None:
        if self.said_goodbye:  # as handle_publish (the reader handles nothing after a DISCONNECT anyway)
            return
        try:
            await self._at_once(deliver(self.session, topic, payload), packet_id)
        finally:
            if self.session is None or not self.session.delivered_message_queue.empty():
                self._stir()

    async def _handle_qos0_message_flow(self, app_message: Any) -> None:
        packet = app_message.publish_packet
        dup = packet is not None and packet.dup_flag  # amqtt's flow ignores it (reader.check_packet refuses it first)
        if app_message.direction == INCOMING and not dup and self.may_deliver_now():
            await self._deliver_at_once(app_message, acknowledged=False)
            return
        await super()._handle_qos0_message_flow(app_message)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction == INCOMING and self.before_ack is not None and self.may_deliver_now():
            await self._deliver_at_once(app_message, acknowledged=True)
            return
        if app_message.direction == INCOMING and self.before_ack is not None and self.session is not None:
            self.before_ack(self.session, app_message)
        if app_message.direction == INCOMING and self.answers is not None and self.session is not None:
            # amqtt's flow (queued for the message loop, then the PUBACK), the PUBACK written
            # with the others of the same read (imcli/broker/reader.py)
            await self.session.delivered_message_queue.put(app_message)
            self.answers += b"\x40\x02" + app_message.packet_id.to_bytes(2, "big")
            return
        if app_message.direction == INCOMING and self.journal is not None and not await self.journal.committed():
            log.error("%s: not acknowledged: the journal could not keep it", self.session and self.session.client_id)
            return  # (a WebSocket connection) its sender sends it again when it comes back
        await super()._handle_qos1_message_flow(app_message)

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        if not no_pubrel(self.session, app_message, self.max_unreleased):
            await super()._handle_qos2_message_flow(app_message)
        elif self._silent_close is None and self.writer is not None:  # imcli/broker/sessions.py
            self._silent_close = close_silent(self.writer, self.session and self.session.client_id, "no PUBREL")

    def take_will(self) -> Will | None:
        """The Will of this connection's CONNECT, once: published, or discarded by DISCONNECT."""
        will, self.will = self.will, None
        return will

    def handle_read_timeout(self) -> None:  # amqtt's does nothing (imcli/broker/sessions.py)
        if self._silent_close is None and self.writer is not None:
            self._silent_close = close_silent(self.writer, self.session and self.session.client_id)


class LightSession(Session):
    """amqtt's ``Session`` with a ``SessionState`` from the start instead of a ``transitions.Machine``."""

    def __init__(self) -> None:
        super().__init__()
        # amqtt's asyncio.Queue objects: 3 KB each, empty (imcli/broker/sessions.py)
        self.retained_messages: LeanQueue[Any] = LeanQueue()
        self.delivered_message_queue: LeanQueue[Any] = LeanQueue()

    def _init_states(self) -> None:  # called by Session.__init__
        self.transitions = SessionState(self)


def use_light_sessions() -> None:
    """Make amqtt's broker protocol handler create ``LightSession`` objects for new connections.

    ``BrokerProtocolHandler.init_from_connect`` builds the session as ``Session()``, a name
    looked up in its module, before any broker hook sees it: replacing that one name is the
    only way short of copying the whole CONNECT validation (amqtt's client is not affected).
    """
    broker_handler.Session = LightSession


class ImBroker(Broker):
    """amqtt ``Broker`` that authenticates before touching sessions and enforces limits."""

    def __init__(self, settings: BrokerSettings, open_archive: Callable[[Path], ArchiveWriter]) -> None:
        # opened before amqtt starts, so that an unusable data directory is reported as such
        self._accounts = AccountStore(settings.data_dir.resolve())
        use_light_sessions()
        super().__init__(settings.amqtt_config())
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.subscription_table = SubscriptionTable()  # a client id's subscription found in O(1) (sessions.py)
        self._subscriptions = self.subscription_table  # amqtt kept lists of (session, QoS) there
        self.access = TopicAccess(self.topics, self._accounts.cached_role)
        lim = settings.limits
        # the Last Will's topic is checked at CONNECT without group or friend records
        self.devices = DeviceStore(settings.data_dir.resolve())  # imcli/broker/devices.py
        gate = ConnectionGate(
            self._accounts, TopicAcl(self.topics), settings.registration, lim,
            devices=self.devices, display_names=self.access.names.in_use,
        )  # fmt: skip
        self.admission = Admission(gate, self.access, lim)
        self.retained = RetainedState(settings.data_dir, self.access, lim)
        self.publishing = PublishChecks(self.access, lim, settings.max_payload, statuses=self.retained.status_refusal)
        self.wills = LastWills(self.publishing, self.deliver)
        self.upkeep = SessionUpkeep(self, lim)
        self.ended_sessions = EndedSessions()  # forgotten a slice at a time (imcli/broker/session_sweep.py)
        self.teardown = TeardownGate()  # connections' ends, a slice per loop round (imcli/broker/teardown.py)
        defer_while(self.teardown)  # no collector's tick while ends wait their turn: a mass leave (gcpause._tick)
        self.notifier = Notifier(self.topics, self.internal_message_broadcast)
        self.device_service = DeviceService(
            self.devices, self._accounts, self.topics, self, self.internal_message_broadcast
        )
        self.admission.tell = self.publishing.tell = self.upkeep.tell = self.notifier.tell
        self.filters = SessionFilters()
        # (connection's handler, filter) -> the retained sending of its latest SUBSCRIBE still going
        self._retained_sending: dict[tuple[Any, str], object] = {}
        self.output = OutputBound(lim.output_drop, lim.output_close, lim.output_stuck)
        amqtts = (self.subscription_table, self._matches, self._get_handler, self._retain_broadcast_message)
        self.fan_out = FanOut(*amqtts, self.access.receive_check, self.output, file_topic=self.carries_file_bytes)
        self._journal = Journal(open_archive(settings.data_dir), self.topics, self.access.may_publish)
        self._requests_held = 0  # requests waiting for the journal's commit (``deliver``)
        self.pending = PendingConnections(lim.pending_per_address, lim.max_pending)
        self.open_files: OpenFiles | None = None  # raised at start (imcli serve's start-up lines say it)
        self.connections = Connections(self.pending, self.output)
        self._upkeep_tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- public: host, tests, upkeep

    @property
    def accounts(self) -> AccountStore:
        return self._accounts

    def bound_port(self, listener: str | None = None) -> int:
        """The TCP port a listener actually bound (useful with port 0); by default the main one."""
        name = listener or (TLS_LISTENER if self.settings.tls else "default")
        server = self._servers[name].instance  # amqtt has no public accessor for its servers
        return int(next(iter(server.sockets)).getsockname()[1])

    def worker_port(self) -> int:
        """Where the in-process workers connect: the plain loopback listener when TLS is on."""
        return self.bound_port("default")

    def persistent_sessions(self) -> set[str]:
        """Client ids of the persistent sessions the broker keeps (connected or not)."""
        return {cid for cid, (session, _) in self._sessions.items() if not session.clean_session}

    def session_table(self) -> dict[str, tuple[Session, BrokerProtocolHandler]]:
        sessions: dict[str, tuple[Session, BrokerProtocolHandler]] = self._sessions
        return sessions

    async def delete_session(self, client_id: str) -> None:
        await self._delete_session(client_id)

    async def close_connection(self, handler: BrokerProtocolHandler) -> None:
        await handler.handle_connection_closed()
        await handler.stop()

    async def take_over(self, handler: BrokerProtocolHandler) -> None:
        """Close the connection of ``handler`` because a new CONNECT takes its client id (MQTT-3.1.4-2).
        Its end must not end the session: a resumed one is the new connection's now. Marking it
        disconnected let a third CONNECT in without closing the second (two live connections on
        one session), and let the sweep forget a clean one the new connection resumed (closing it)."""
        if isinstance(handler, AckAfterJournal):
            handler.taken_over = True
        await self._tell_taken_over(handler)
        await self.close_connection(handler)

    async def _tell_taken_over(self, handler: BrokerProtocolHandler) -> None:
        """The connection closed for a newer one is told why, before its close, on its notice topic and
        to it alone: MQTT 3.1.1 has no reason for a closed connection, and without one its client (paho)
        reconnects a second later and takes the session back, for ever (docs/PROTOCOL.md §9). QoS 0,
        written on that connection only: the session, and what is queued in it, is the newer one's now.
        A connection that does not take it within ``TAKEOVER_NOTICE_WAIT`` is closed without it."""
        session = handler.session
        if session is None or session.client_id is None:
            return
        addressed = self.notifier.addressed(session.username, taken_over(session.client_id))
        if addressed is None:
            return
        try:
            await asyncio.wait_for(handler.mqtt_publish(*addressed, 0, retain=False), TAKEOVER_NOTICE_WAIT)
        except (TimeoutError, OSError, AMQTTError) as exc:
            log.info("%s: the takeover notice was not written: %r", session.client_id, exc)

    # ---------------------------------------------------------------- start, stop, connections

    async def start(self) -> None:
        self.open_files = raise_fd_limit(self.settings.limits.max_pending + 1024)  # imcli/broker/pending.py
        build_schemas()  # now, not in the event loop's first typed chat message (imcli/core/wire.py)
        try:
            await super().start()  # amqtt starts with no retained messages
        except BaseException:
            stop_listening(self._servers.values())  # amqtt leaves those it started open when a later one fails
            raise
        for topic, payload, qos in self.retained.restore():
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
        self._upkeep_tasks = [
            asyncio.create_task(self.upkeep.expire_sessions(self.publishing.forget_unsent)),
            asyncio.create_task(self.upkeep.end_revoked_logins()),
            asyncio.create_task(self.output.run()),
            asyncio.create_task(self.pending.run()),  # imcli/broker/pending.py
            asyncio.create_task(self.device_service.keep_last_seen()),
        ]

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        on_stream = partial(self.stream_connected, listener_name=listener_name)
        on_ws = partial(self.ws_connected, listener_name=listener_name)
        backlog, deadline = self.settings.limits.listen_backlog, self.settings.packet_timeout  # listeners.py
        web = None
        if listener_type == ListenerType.WS:  # the web client, on the same port (imcli/broker/webapp.py)
            tls, origins = ssl_context is not None, self.settings.ws_origins
            web = WebApp(tls=tls, origins=origins, loopback=loopback_host(address))
        server = await serve(
            listener_type, on_stream, on_ws, address, port, ssl_context, backlog, self.pending, deadline, web
        )
        if server is None:
            server = await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return server

    async def shutdown(self) -> None:
        for task in self._upkeep_tasks:
            task.cancel()
        self.fan_out.cancel_tasks()
        stop_listening(self._servers.values())  # first: imcli/broker/listeners.py says why
        await super().shutdown()
        self.retained.close()
        self._journal.close()
        self.devices.flush(force=True)
        await self.connections.close_all()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        adapter, transport = StreamWriterAdapter(writer), writer.transport
        try:
            with self.connections.accepted(adapter, peer_host(writer.get_extra_info("peername")), transport, writer):
                # amqtt's stream_connected, with the reader kept inside its packets (imcli/broker/packets.py)
                guard = self._guard(StreamReaderAdapter(reader), adapter, stream=reader, transport=transport)
                await self._client_connected(listener_name, guard, adapter)
        finally:
            release_transport(transport)  # freed by reference counting, not by a full collection
            release_stream(reader)  # the same for a connection its peer reset

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        adapter, transport = WebSocketsWriter(websocket), websocket.transport  # the WebSocket's TCP (or TLS) one
        with self.connections.accepted(adapter, peer_host(websocket.remote_address), transport):
            await self._client_connected(
                listener_name, self._guard(CheckedWebSocketsReader(websocket), adapter), adapter
            )

    def _guard(
        self, inner: Any, writer: Any, stream: asyncio.StreamReader | None = None, transport: Any = None
    ) -> PacketGuard:
        """amqtt's reader, kept inside well-formed packets (imcli/broker/packets.py), paused while
        the connection's output is past its high-water mark or its inbox full (imcli/broker/output.py);
        a stream connection's, once its CONNECT is in, is ``reader.PacketReader`` with the same rules."""
        s = self.settings
        gated = ReadGate(inner, self.output, writer)
        if stream is None:
            return PacketGuard(gated, s.max_packet, s.packet_timeout, s.limits.max_client_id)
        readable = partial(self.output.readable, writer)
        return StreamGuard(
            gated, s.max_packet, s.packet_timeout, s.limits.max_client_id,
            stream=stream, transport=transport, readable=readable,
        )  # fmt: skip

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:  # with a deadline (imcli/broker/packets.py)
            reading = AckAfterJournal.init_from_connect(reader, writer, self.plugins_manager)
            handler, incoming = await connect_within(reading, self.settings.packet_timeout, remote_address, remote_port)
        finally:
            self.pending.done(writer)  # its CONNECT is read (or it never will be)
        # admitted (imcli/broker/admission.py) before any existing session is deleted, merged or taken over
        await self.admission.admit_or_refuse(reader, writer, incoming, self._sessions, self.upkeep.persistent_of)
        delay = self.config.timeout_disconnect_delay or 0
        session = await start_session(  # imcli/broker/sessions.py
            incoming, self._sessions, self._delete_session, delay, close_current=self.take_over
        )
        self.output.attach_inbox(writer, session.delivered_message_queue)  # output.ReadGate
        if isinstance(handler, AckAfterJournal):
            handler.before_ack, handler.max_unreleased = self._before_ack, self.settings.limits.max_unreleased
            handler.deliver_now = self.deliver_now
            handler.deliver_file, handler.is_file_topic = self.deliver_file, self.is_file_topic
            handler.deliver_line, handler.is_line_topic = self.deliver_line, self.is_line_topic
            handler.carries_file_bytes = self.carries_file_bytes  # its chunks mark it a transfer's (chatfirst)
            handler.teardown_gate = self.teardown  # imcli/broker/teardown.py
            handler.journal = self._journal  # its answers wait for the journal's commits
            handler.will = will_of(incoming)  # imcli/broker/wills.py
        return handler, session

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, handler: Any, server: Any, listener_name: str
    ) -> None:
        # amqtt's version authenticates again here and then re-sends to every CONNECT the
        # retained messages of every filter anyone subscribed to, unchecked
        client_id = client_session.client_id
        if client_id is None:
            raise BrokerError("client id was not set")
        await connect_session(client_session, lambda: self.take_over(self._sessions[client_id][1]))
        account = client_session.username or ""
        self.admission.opened(account)  # this call lasts as long as the connection
        self.upkeep.connected(client_id)
        try:
            handler.attach(client_session, reader, writer)
            self._sessions[client_id] = (client_session, handler)
            if not client_session.clean_session and not self.access.is_service(account):
                await self.upkeep.make_room_for(account, client_id)  # imcli/broker/session_upkeep.py
            await handler.mqtt_connack_authorize(True)
            log.info("%s connected", client_id)  # imcli serve --verbose: this project's events, not amqtt's
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=client_session
            )
            await handler.start()
            await self._publish_session_retained_messages(client_session)
            if client_session.parent:  # a resumed persistent session: retained messages of its own filters
                for subscription in list(self.filters.of(client_id).items()):
                    await self._publish_retained_messages_for_subscription(subscription, client_session)
            await self._client_message_loop(client_session, handler)
        finally:
            log.info("%s disconnected", client_id)
            self.admission.closed(account)
            if (device := device_of_client_id(account, client_id)) is not None:
                self.devices.seen(account, device)  # last seen: when it left
            if not client_session.clean_session:
                self.upkeep.left(client_id)

    # ---------------------------------------------------------------- subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        held = self.filters.held(session.client_id)
        if not await self.admission.subscription_allowed(session, held, subscription[0]):
            return 0x80
        granted = await self._subscribe(subscription, session)
        if granted != 0x80:
            held[subscription[0]] = granted
            self.fan_out.filters.add(subscription[0])
        return granted

    async def _subscribe(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's ``add_subscription``, the same checks in the same order, with the subscription found
        in O(1) (``sessions.Subscribers``): amqtt scanned every subscriber of the filter for this
        client id (414 us per SUBSCRIBE on average when 10,000 users subscribed to one filter)."""
        topic_filter, qos = subscription
        levels = topic_filter.split("/")
        last = len(levels) - 1
        if any("#" in level and (level != "#" or index != last) for index, level in enumerate(levels)):
            return 0x80  # MQTT-4.7.1-2
        if any("+" in level and level != "+" for level in levels):
            return 0x80  # MQTT-4.7.1-3
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return 0x80
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos if isinstance(max_qos, int) else qos)
        self.subscription_table.add(topic_filter, session, granted)  # as amqtt's: a second keeps the first QoS
        return granted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walks every filter on the broker for each session it ends or replaces
        for topic_filter in list(self.filters.of(session.client_id)):
            self._del_subscription(topic_filter, session)
            if not self.subscription_table.get(topic_filter, True):
                del self.subscription_table[topic_filter]

    def _del_subscription(self, a_filter: str, session: Session) -> int:  # every removal path
        # amqtt's scanned the filter's subscribers for this client id (and built a debug line)
        deleted = int(self.subscription_table.remove(a_filter, session))
        if deleted:
            self.filters.removed(session.client_id, a_filter)
        return deleted

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # amqtt asks every topic plugin through one task each; the ACL is pure and synchronous
        return self.access.check(session.username, topic, Access(action.value))

    # ---------------------------------------------------------------- publishing and delivery

    def _before_ack(self, session: Session, message: ApplicationMessage) -> None:
        """A QoS 1 PUBLISH is about to be acknowledged (imcli/broker/journal.py)."""
        if self.publishing.charge(session.username, message, len(message.data or b"")):
            self._journal.record(session.username, message)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        # one task per connection instead of five, and nothing a client sent lost when it leaves
        await run_client_loop(self, client_session, handler)  # imcli/broker/client_loop.py

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # the publish checks (imcli/broker/publish_checks.py) instead of amqtt's broadcast and retain
        return await self._received(client_session, wait_deliver.result())

    async def _received(self, session: Session, message: ApplicationMessage | None) -> bool:
        """A message the connection's message loop takes from its queue (a QoS 1 one took its rate
        token, and was journalled, before its PUBACK: ``_before_ack``), through ``publish``."""
        if message is None:
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_RECEIVED, client_id=session.client_id, message=None
            )
            return True
        charged, rate_ok = self.publishing.take_charge(message)
        packet = message.publish_packet
        retain = packet is not None and bool(packet.retain_flag)
        return await self.publish(
            session, message.topic or "", message.data or b"", message.qos or 0, retain,
            message=message, rate_ok=rate_ok, journalled=charged,
        )  # fmt: skip

    async def deliver_now(self, session: Session, message: ApplicationMessage, acknowledged: bool) -> bool:
        """A message its connection's reader handles itself (``AckAfterJournal.may_deliver_now``), through
        ``publish``: a QoS 1 one (``acknowledged``) is journalled once its copies are written, before
        the PUBACK that the reader writes when this returns (imcli/broker/journal.py). False: its
        connection is to be closed (an invalid topic)."""
        packet = message.publish_packet
        retain = packet is not None and bool(packet.retain_flag)
        return await self.publish(
            session, message.topic or "", message.data or b"", message.qos or 0, retain, message=message
        )

    def carries_file_bytes(self, topic: str) -> bool:
        """Whether ``topic`` carries a file's bytes (an upload's chunks to the files worker, a download's
        from it: issue 16): a connection that sends or is sent such chunks is a transfer's
        (imcli/broker/chatfirst.py), whatever the size of anything else it sends or gets."""
        if "/upload/" not in topic and "/file/" not in topic:
            return False
        parsed = self.topics.parse(topic)
        return parsed is not None and parsed.kind in FILE_BYTES

    def is_file_topic(self, topic: str) -> bool:
        """Whether a QoS 1 PUBLISH on ``topic`` (neither DUP nor RETAIN) is a file's chunk that
        ``deliver_file`` may take (a ``CHUNK`` topic), while no amqtt plugin listens to messages (the
        direct paths build no amqtt packet for ``PACKET_RECEIVED``)."""
        return (
            self.carries_file_bytes(topic)
            and not self.plugins_manager._event_plugin_callbacks  # amqtt private (AMQTT_PRIVATE)
        )

    def is_line_topic(self, topic: str) -> bool:
        """Whether a QoS 1 PUBLISH on ``topic`` (neither DUP nor RETAIN) is a chat line that
        ``deliver_line`` may take (a ``LINE`` topic: a room's, a DM's or a group's), while no amqtt
        plugin listens."""
        parsed = self.topics.parse(topic)
        return (
            parsed is not None
            and parsed.kind in CHAT_LINES
            and not self.plugins_manager._event_plugin_callbacks  # amqtt private (AMQTT_PRIVATE)
        )

    async def publish(
        self,
        session: Session,
        topic: str,
        payload: bytes | bytearray,
        qos: int,
        retain: bool,
        *,
        route: Route = GENERAL,
        message: ApplicationMessage | None = None,
        rate_ok: bool | None = None,
        journalled: bool = False,
    ) -> bool:
        """The one list of steps of a PUBLISH read from a client, whichever way it came (``Route``: the
        message loop's queue and the reader's ``deliver_now`` are ``GENERAL``; a chat line's and a
        file chunk's direct paths, ``LINE`` and ``CHUNK``, skip only what cannot act on their topics):

        1. amqtt's ``MESSAGE_RECEIVED``, if a plugin listens (the direct paths are taken only while
           none does: ``is_line_topic``, ``is_file_topic``; amqtt's message built for it if need be);
        2. its rate token (``PublishChecks.token``, by ``judge``), unless taken before its PUBACK when it
           was queued (``rate_ok``, ``_before_ack``; ``journalled``: its row recorded then too);
        3. the checks (``PublishChecks.judge``: the rate, the size, retain, the topic, the ACL, a status);
        4. its sender told why it is refused, if it is (false: the connection is to be closed);
        5. ``deliver``: a device request answered, ``MESSAGE_BROADCAST``, a request held for the
           journal, a chunk's fan-out a round late while chat waits, the copies, a DM's sent copy,
           retained, then its row journalled (copies before the row; the PUBACK, which the reader
           writes once the row is committed, after both)."""
        listened = self.plugins_manager._event_plugin_callbacks  # amqtt private (AMQTT_PRIVATE)
        if listened:
            message = message or ApplicationMessage(None, topic, qos, payload, retain)
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_RECEIVED, client_id=session.client_id, message=message
            )
        publishing = self.publishing
        # its rate token: taken by judge (PublishChecks.token) unless it was before its PUBACK
        decision = publishing.judge(session.username, topic, len(payload), retain=retain, rate_ok=rate_ok)
        if not await publishing.tell_sender(session, decision):
            return False
        if decision.deliver:
            await self.deliver(
                session, topic, payload, qos=qos, retain=retain, journal=not journalled, route=route, message=message
            )
        return True

    # A chat line its connection's reader handles itself (``AckAfterJournal.chat_line``: QoS 1, neither DUP
    # nor RETAIN, a ``LINE`` topic; issue 16, ninth session) and a file's chunk (``AckAfterJournal.file_bytes``,
    # a ``CHUNK`` topic; seventh session): ``publish``, as every PUBLISH, without amqtt's packet and message
    # objects; (session, topic, payload) -> Awaitable[bool], false: the connection is to be closed. Partial
    # methods rather than coroutines that call ``publish``: a frame less per line and per chunk.
    deliver_line = partialmethod(publish, qos=QOS_1, retain=False, route=LINE)
    deliver_file = partialmethod(publish, qos=QOS_1, retain=False, route=CHUNK)

    async def deliver(
        self,
        session: Session,
        topic: str,
        payload: bytes | bytearray,
        *,
        qos: int,
        retain: bool,
        journal: bool,
        route: Route = GENERAL,
        message: ApplicationMessage | None = None,
    ) -> None:
        """A publish the checks let through (``publish``, or a Last Will: imcli/broker/wills.py),
        in this order: a device request answered by the broker itself (imcli/broker/device_service.py),
        and nothing more; amqtt's ``MESSAGE_BROADCAST``; a request to the workers held until the journal
        commits; a file's chunk a round late while chat waits (imcli/broker/chatfirst.py); its copies
        (imcli/broker/fanout.py, at each subscription's QoS); a DM's copy for its sender's other
        devices; retained if flagged; its row journalled (``journal``: not before its PUBACK already).
        ``route`` says which steps cannot act on the topics it takes (``Route``)."""
        if route.device and await self.device_service.intercept(session, topic, payload):  # no copy: chunks
            return
        if self.plugins_manager._event_plugin_callbacks:  # amqtt private (AMQTT_PRIVATE)
            message = message or ApplicationMessage(None, topic, qos, payload, retain)  # the one received, if any
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST, client_id=session.client_id, message=message
            )
        if (
            route.held
            and self.is_request(topic)
            and (self._requests_held or not self._journal.is_kept(self._journal.recorded))
        ):
            # Copies of chat go out before their rows are committed (imcli/broker/journal.py), so a
            # history request sent on seeing a line could reach the archive before the line's row:
            # a request goes to the workers once every row recorded until now is committed (then an
            # answer holds everything its asker has been sent), in the order requests came (one held
            # holds those after it), without holding its asker's connection (its PUBACK, its other
            # messages) meanwhile.
            self._requests_held += 1

            def later(_committed: bool) -> None:  # a failed batch: the request goes all the same
                self._requests_held -= 1
                self.fan_out.keep(asyncio.ensure_future(self._broadcast_message(session, topic, payload)))

            self._journal.after_commit(later)
            return
        fan_out = self.fan_out
        if (
            route.chat_first
            and (route.chunks or self.carries_file_bytes(topic))
            and chatfirst.for_loop(asyncio.get_running_loop()).chat_waiting()
        ):
            # chat came while this chunk was being read and checked: it is read and handled before
            # the chunk's fan-out (a timer's wakeup comes after the sockets its round reads and the
            # reader steps they wake: reader.PacketReader._handle_publish)
            await asyncio.sleep(AFTER_OTHERS)
        await fan_out.publish({"session": session, "topic": topic, "data": payload})
        if route.sent and (sent := self.sent_copy(topic)) is not None:  # the sender's other devices
            await fan_out.publish({"session": session, "topic": sent, "data": payload})
        if retain:
            await self.retain_message(session, topic, payload, qos)
        elif journal and route.journal:  # (a retained message is never chat's: the checks refuse it)
            self._journal.record_line(session.username, topic, bytes(payload))

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # amqtt's, except for the Last Will: amqtt broadcasts whatever Will the session holds
        # (by now perhaps the next connection's), unchecked (imcli/broker/wills.py)
        will = handler.take_will() if isinstance(handler, AckAfterJournal) else None
        disconnected = isinstance(disconnect_waiter.result(), DisconnectPacket)
        await self.wills.connection_ended(client_session, will, disconnected=disconnected)
        await self._stop_handler(handler)
        if not getattr(handler, "taken_over", False):  # else the session goes on with the next connection
            client_session.transitions.disconnect()
            self.ended_sessions.ended(client_session.client_id, client_session)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=client_session.client_id, client_session=client_session
        )

    async def _session_monitor(self) -> None:
        # amqtt's walks the whole table every second and forgets every ended clean session in one
        # callback (232 ms of CPU when 10,000 users left at once): a slice at a time instead
        await self.ended_sessions.run(self._sessions, self._cleanup_session)

    def is_request(self, topic: str) -> bool:
        """Whether ``topic`` is a request to the workers (``<prefix>/request/<me>/<id>``)."""
        if "/request/" not in topic:
            return False
        parsed = self.topics.parse(topic)
        return parsed is not None and parsed.kind is TopicKind.REQUEST

    def sent_copy(self, topic: str) -> str | None:
        """Where the copy of a DM goes for its sender's own devices (``<prefix>/user/<from>/sent/<to>``,
        issue 17: what I send from one device appears on the others); ``None`` for anything else.
        Only the broker writes there, so a copy is always what its sender really sent."""
        if "/dm/" not in topic:
            return None
        parsed = self.topics.parse(topic)
        if parsed is None or parsed.kind is not TopicKind.DM or not parsed.sender or not parsed.owner:
            return None
        return self.topics.sent(parsed.sender, parsed.owner)

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        # fanned out here, in the publisher's task, not through amqtt's queue and its broadcast
        # loop's task per message (imcli/broker/fanout.py says why)
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        await self.fan_out.publish(broadcast)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        # amqtt's broadcast loop waits here until the broker shuts down: nothing reaches its queue
        await asyncio.get_running_loop().create_future()

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        self.upkeep.make_room(target_session.client_id, target_session.retained_messages)
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt sends messages queued while offline with retain=1 and unchecked
        handler = self._get_handler(session)
        if handler is not None:
            queued = self.upkeep.take_queued(session.retained_messages, self.access.receives(session.username))
            self.fan_out.publish_later(handler, queued, retain=False)  # in order, not awaited: as below

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # checked per message (RECEIVE), and only topics under the filter's literal head are matched
        handler = self._get_handler(session)
        if handler is None:
            return
        receives = self.access.receives(session.username)
        topics = self.retained.index.under(subscription[0], self._retained_messages)

        def send(some: list[str]) -> None:
            # each message as the table has it now: a newer one may have been delivered meanwhile
            matching = self.retained.matching(subscription, self._retained_messages, self._matches, receives, some)
            # not awaited: the connection's message loop (which calls this after the SUBACK) would
            # wait for the client's PUBACKs, and its reader for that loop's next SUBACK (reader.py)
            self.fan_out.publish_later(handler, matching, retain=True)

        # A newer SUBSCRIBE to the same filter starts its own sending: the older one stops, as it
        # does when the filter is unsubscribed (MQTT-3.10.4-2) or the connection is not the one that
        # asked; else an UNSUBSCRIBE did not stop the slices, and each resubscription added a copy.
        key, token = (handler, subscription[0]), object()
        self._retained_sending.pop(key, None)
        send(topics[:RETAINED_SLICE])
        if len(topics) > RETAINED_SLICE:  # the rest a slice per round: 10,000 presence records at once
            # were one callback of 118 ms of CPU (issue 21: `imcli listen` at 10,000 users)
            self._retained_sending[key] = token

            def going() -> bool:
                return (
                    self._retained_sending.get(key) is token
                    and self._get_handler(session) is handler
                    and subscription[0] in self.filters.of(session.client_id)
                )

            async def rest() -> None:
                try:
                    await send_in_slices(topics[RETAINED_SLICE:], RETAINED_SLICE, send, going)
                finally:
                    if self._retained_sending.get(key) is token:
                        del self._retained_sending[key]

            self.fan_out.keep(asyncio.ensure_future(rest()))

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name:
            kept = topic_name in self._retained_messages
            self.retained.changed(topic_name, bytes(data or b""), qos or 0, kept=kept)
