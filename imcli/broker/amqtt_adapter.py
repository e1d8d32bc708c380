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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import websockets
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader, WebSocketsWriter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol import broker_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import INCOMING, ApplicationMessage, Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from imcli.broker.accounts import AccountStore
from imcli.broker.acl import Access, TopicAcl
from imcli.broker.admission import Admission
from imcli.broker.connection_gate import CONNECTION_ACCEPTED, ConnectionGate, shown_username
from imcli.broker.fanout import FanOut, SessionFilters
from imcli.broker.journal import ArchiveWriter, Journal
from imcli.broker.notices import Notifier, session_dropped, subscription_refused
from imcli.broker.output import OutputBound
from imcli.broker.packets import MalformedPacket, PacketGuard
from imcli.broker.pending import PendingConnections, raise_fd_limit
from imcli.broker.publish_checks import PublishChecks
from imcli.broker.retained import RetainedState
from imcli.broker.session_upkeep import SessionUpkeep
from imcli.broker.sessions import SessionState, SubscriptionTable
from imcli.broker.settings import TLS_LISTENER, BrokerSettings
from imcli.broker.topic_access import TopicAccess
from imcli.core.wire import Topics

log = logging.getLogger(__name__)


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
    *_names(
        _B, "Broker", "overridden", "_publish_session_retained_messages _publish_retained_messages_for_subscription"
    ),
    *_names(_B, "Broker", "overridden", "_del_all_subscriptions _del_subscription _handle_disconnect"),
    *_names(_B, "Broker", "overridden", "_create_server_instance"),  # the listen backlog
    *_names(_B, "Broker", "called", "_client_connected _client_message_loop _delete_session _broadcast_message"),
    *_names(_B, "Broker", "called", "_stop_handler"),  # by _handle_disconnect
    *_names(_B, "Broker", "called", "_matches _get_handler"),  # handed to fanout.FanOut
    *_names(_B, "Broker", "read", "_servers _sessions _retained_messages _broadcast_queue"),
    *_names(_B, "Broker", "replaced", "_subscriptions"),  # by sessions.SubscriptionTable
    # AckAfterJournal, LightSession, use_light_sessions and puback_waiters, below
    *_names(_H, "BrokerProtocolHandler", "overridden", "_handle_qos1_message_flow"),
    *_names(_H, "BrokerProtocolHandler", "read", "_puback_waiters"),  # by fanout.Deliveries, via puback_waiters()
    *_names(_H, "", "replaced", "Session"),  # the name init_from_connect builds a session with
    *_names(_S, "Session", "overridden", "_init_states"),
    *_names(_S, "Session", "called", "_on_enter_connected _on_enter_disconnected"),  # by sessions.SessionState
)


class Will(NamedTuple):
    """The Last Will a CONNECT left: published, checked, if its connection ends without DISCONNECT."""

    topic: str
    data: bytes
    qos: int | None
    retain: bool


def will_of(session: Session) -> Will | None:
    if not session.will_flag:
        return None
    return Will(
        session.will_topic or "", bytes(session.will_message or b""), session.will_qos, bool(session.will_retain)
    )


class AckAfterJournal(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler, calling ``before_ack`` before each PUBACK, and
    holding the Last Will of its own connection's CONNECT (amqtt keeps it in the session, which
    a resumed or taken-over persistent session shares with the next connection)."""

    before_ack: Any = None  # (Session, ApplicationMessage) -> None
    will: Will | None = None
    _silent_close: asyncio.Task[None] | None = None

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction == INCOMING and self.before_ack is not None and self.session is not None:
            self.before_ack(self.session, app_message)
        await super()._handle_qos1_message_flow(app_message)

    def handle_read_timeout(self) -> None:
        """Nothing came from the client for its keep-alive (plus the grace ``ImBroker`` adds):
        it is gone, and the connection is closed (MQTT-3.1.2-24); its reader loop then ends as
        on EOF and its Last Will fires. amqtt's does nothing: a silent client stayed for ever."""
        if self._silent_close is None and self.writer is not None:
            log.info("%s: nothing heard within its keep-alive, closing", self.session and self.session.client_id)
            self._silent_close = asyncio.ensure_future(self.writer.close())


class LightSession(Session):
    """amqtt's ``Session`` with a ``SessionState`` from the start instead of a ``transitions.Machine``."""

    def _init_states(self) -> None:  # called by Session.__init__
        self.transitions = SessionState(self)


def use_light_sessions() -> None:
    """Make amqtt's broker protocol handler create ``LightSession`` objects for new connections.

    ``BrokerProtocolHandler.init_from_connect`` builds the session as ``Session()``, a name
    looked up in its module, before any broker hook sees it: replacing that one name is the
    only way short of copying the whole CONNECT validation (amqtt's client is not affected).
    """
    broker_handler.Session = LightSession


def puback_waiters(handler: BrokerProtocolHandler) -> dict[int, Any]:
    """The futures amqtt's PUBACK handler resolves, by packet id (imcli/broker/fanout.py registers its own)."""
    waiters: dict[int, Any] = handler._puback_waiters
    return waiters


# what a CONNECT that resumes a persistent session brings to it (amqtt copies all but will_retain)
_RESUMED = ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive", "username", "password")


class ImBroker(Broker):
    """amqtt ``Broker`` that authenticates before touching sessions and enforces limits."""

    def __init__(self, settings: BrokerSettings, open_archive: Callable[[Path], ArchiveWriter]) -> None:
        # opened before amqtt starts, so that an unusable data directory is reported as such
        self._accounts = AccountStore(settings.data_dir.resolve())
        use_light_sessions()
        super().__init__(settings.amqtt_config())
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self._subscriptions = SubscriptionTable()
        self.access = TopicAccess(self.topics, self._accounts.cached_role)
        # the Last Will's topic is checked at CONNECT without group or friend records
        gate = ConnectionGate(self._accounts, TopicAcl(self.topics), settings.registration, settings.limits)
        self.admission = Admission(gate, self.access, settings.limits)
        self.retained = RetainedState(settings.data_dir, self.access, settings.limits)
        self.publishing = PublishChecks(
            self.access, settings.limits, settings.max_payload, statuses=self.retained.status_refusal
        )
        self.notifier = Notifier(self.topics, self.internal_message_broadcast)
        self.admission.tell = self.notifier.tell
        self.upkeep = SessionUpkeep(self, settings.limits)
        self.filters = SessionFilters()
        lim = settings.limits
        self.output = OutputBound(lim.output_drop, lim.output_close, lim.output_stuck)
        self.fan_out = FanOut(
            self._subscriptions,
            self._matches,
            self._get_handler,
            self._retain_broadcast_message,
            self.access.receive_check,
            puback_waiters,
            self.output,
        )
        self._journal = Journal(open_archive(settings.data_dir), self.topics, self.access.may_publish)
        self._streams: set[asyncio.StreamWriter] = set()
        self.pending = PendingConnections(settings.limits.pending_per_address, settings.limits.max_pending)
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

    # ---------------------------------------------------------------- start, stop, connections

    async def start(self) -> None:
        raise_fd_limit(self.settings.limits.max_pending + 1024)  # imcli/broker/pending.py
        try:
            await super().start()  # amqtt starts with no retained messages
        except BaseException:
            self._stop_listening()  # amqtt leaves those it started open when a later one fails to bind
            raise
        for topic, payload, qos in self.retained.restore():
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
        self._upkeep_tasks = [
            asyncio.create_task(self.upkeep.expire_sessions(self.publishing.forget_unsent)),
            asyncio.create_task(self.upkeep.end_revoked_logins()),
            asyncio.create_task(self.output.run()),
            asyncio.create_task(self.pending.run()),  # imcli/broker/pending.py
        ]

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        # amqtt's, with a listen backlog: asyncio's default of 100 makes a flood of silent
        # sockets overflow the kernel's queue, and real clients' SYNs wait seconds for a retry
        backlog = self.settings.limits.listen_backlog
        if listener_type == ListenerType.TCP:
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name),
                address,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=backlog,
            )
        if listener_type == ListenerType.WS:
            return await websockets.serve(
                partial(self.ws_connected, listener_name=listener_name),
                address,
                port,
                ssl=ssl_context,
                subprotocols=[websockets.Subprotocol("mqtt")],
                backlog=backlog,
            )
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    def _stop_listening(self) -> None:
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()

    async def shutdown(self) -> None:
        for task in self._upkeep_tasks:
            task.cancel()
        # stop accepting first: amqtt closes its listeners last, after the sessions, so clients
        # reconnecting meanwhile would be accepted into a loop that is about to end
        self._stop_listening()
        await super().shutdown()
        self.retained.close()
        self._journal.close()
        # asyncio.Server.close() leaves accepted connections open before Python 3.13
        writers = list(self._streams)
        for writer in writers:
            writer.close()
        if writers:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in writers], timeout=5)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        self._streams.add(writer)
        adapter = StreamWriterAdapter(writer)
        self.pending.arrived(adapter, _peer_host(writer.get_extra_info("peername")), writer.transport.abort)
        self.output.watch(adapter, writer.transport)  # imcli/broker/output.py
        try:  # amqtt's stream_connected, with the reader kept inside its packets (imcli/broker/packets.py)
            guard = self._guard(StreamReaderAdapter(reader))
            await self._client_connected(listener_name, guard, adapter)
        finally:
            self.pending.done(adapter)
            self.output.forget(adapter)
            self._streams.discard(writer)
            writer.close()  # amqtt leaves some finished connections open (found by ResourceWarnings)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        guard = self._guard(WebSocketsReader(websocket))
        adapter = WebSocketsWriter(websocket)
        self.pending.arrived(adapter, _peer_host(websocket.remote_address), websocket.transport.abort)
        self.output.watch(adapter, websocket.transport)  # the WebSocket's TCP (or TLS) transport
        try:
            await self._client_connected(listener_name, guard, adapter)
        finally:
            self.pending.done(adapter)
            self.output.forget(adapter)

    def _guard(self, inner: Any) -> PacketGuard:
        """amqtt's reader, kept inside well-formed packets (imcli/broker/packets.py)."""
        s = self.settings
        return PacketGuard(inner, s.max_packet, s.packet_timeout, s.limits.max_client_id)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            # amqtt waits for the CONNECT forever: without a deadline any peer holds a
            # connection, a task and its buffers open for as long as it likes
            handler, incoming = await asyncio.wait_for(
                AckAfterJournal.init_from_connect(reader, writer, self.plugins_manager),
                self.settings.packet_timeout,
            )
        except (AMQTTError, MQTTError, NoDataError, TimeoutError, MalformedPacket, UnicodeDecodeError) as exc:
            log.info("bad CONNECT from %s:%s: %s", remote_address, remote_port, exc or "none in time")
            raise AMQTTError(exc) from exc
        finally:
            self.pending.done(writer)  # its CONNECT is read (or it never will be)

        # a CONNECT refused on its form alone (a client id past Limits.max_client_id) is not looked at further
        refusal = reader.connect_refusal if isinstance(reader, PacketGuard) else CONNECTION_ACCEPTED
        code, trusted = (
            (refusal, False)
            if refusal
            else await self.admission.admit(
                incoming, lambda client_id: self._sessions.get(client_id, (None,))[0], self.upkeep.persistent_of
            )
        )
        if code == CONNECTION_ACCEPTED and trusted and isinstance(reader, PacketGuard):
            reader.limit = None  # a worker's `who` reply may be large
        if code != CONNECTION_ACCEPTED:
            # refuse before any existing session is deleted, merged or taken over
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused ({code}) for {shown_username(incoming.username)!r}")

        session = incoming  # from here on, amqtt's own handling of the session
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            session, _ = self._sessions[incoming.client_id]
            for attr in _RESUMED:
                setattr(session, attr, getattr(incoming, attr))
            session.parent = 1
        else:
            incoming.parent = 0
        if isinstance(handler, AckAfterJournal):
            handler.before_ack = self._before_ack
            handler.will = will_of(incoming)
        delay = self.config.timeout_disconnect_delay or 0
        if session.keep_alive > 0 and isinstance(delay, int):  # the read timeout: 1.5 times, at least 2 s more
            session.keep_alive += max(delay, session.keep_alive // 2)  # (MQTT-3.1.2-24; AckAfterJournal closes)
        return handler, session

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, handler: Any, server: Any, listener_name: str
    ) -> None:
        # amqtt's version authenticates again here and then re-sends to every CONNECT the
        # retained messages of every filter anyone subscribed to, unchecked
        if client_session.client_id is None:
            raise BrokerError("client id was not set")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():  # same account, same client id: take over
                    await self.close_connection(self._sessions[client_session.client_id][1])
                    break
                await asyncio.sleep(1)  # the old connection of this session is still closing

        account = client_session.username or ""
        self.admission.opened(account)  # this call lasts as long as the connection
        self.upkeep.connected(client_session.client_id)
        try:
            handler.attach(client_session, reader, writer)
            self._sessions[client_session.client_id] = (client_session, handler)
            if not client_session.clean_session and not self.access.is_service(account):
                await self._make_room(account, client_session.client_id)
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
            )
            await handler.start()
            await self._publish_session_retained_messages(client_session)
            if client_session.parent:  # a resumed persistent session: retained messages of its own filters
                for subscription in list(self.filters.of(client_session.client_id).items()):
                    await self._publish_retained_messages_for_subscription(subscription, client_session)
            await self._client_message_loop(client_session, handler)
        finally:
            self.admission.closed(account)
            if not client_session.clean_session:
                self.upkeep.left(client_session.client_id)

    async def _make_room(self, account: str, client_id: str) -> None:
        """A persistent session of ``account`` is in the table: past ``Limits.max_sessions``,
        its longest-idle ones are dropped (imcli/broker/admission.py says why), and it is told."""
        self.upkeep.kept(account, client_id)
        try:
            dropped = await self.upkeep.trim(account)
        except Exception:  # the new connection goes on; the next persistent CONNECT trims again
            log.exception("could not drop the idle sessions of %s", account)
            return
        for gone in dropped:
            await self.notifier.tell(account, session_dropped(gone, self.settings.limits.max_sessions))

    # ---------------------------------------------------------------- subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter = subscription[0]
        held = self.filters.held(session.client_id)
        if self.admission.subscription_refused(held, topic_filter) and not self.access.is_service(session.username):
            refusal = subscription_refused(topic_filter, self.settings.limits.max_subscriptions)
            await self.notifier.tell(session.username, refusal)
            return 0x80
        granted: int = await super().add_subscription(subscription, session)
        if granted != 0x80:
            held[topic_filter] = granted
            self.fan_out.filters.add(topic_filter)
        return granted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walks every filter on the broker for each session it ends or replaces
        for topic_filter in list(self.filters.of(session.client_id)):
            self._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]

    def _del_subscription(self, a_filter: str, session: Session) -> int:  # every removal path
        deleted: int = super()._del_subscription(a_filter, session)
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

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # the publish checks (imcli/broker/publish_checks.py), then amqtt's broadcast and retain
        message = wait_deliver.result()
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=message
        )
        if message is None:
            return True
        charged, rate_ok = self.publishing.take_charge(message)
        packet = message.publish_packet
        retain = packet is not None and bool(packet.retain_flag)
        username = client_session.username
        decision = self.publishing.judge(
            username, message.topic or "", len(message.data or b""), retain=retain, rate_ok=rate_ok
        )
        if decision.telling is not None:
            await self.notifier.tell(username, decision.telling)
        if decision.close:
            log.warning("%s sent a PUBLISH on an invalid topic: closing", client_session.client_id)
            return False
        if decision.deliver:
            # QoS 0 is never acknowledged: journalled as it is delivered (QoS 1 was, before its PUBACK)
            await self._deliver(client_session, message, retain=retain, journal=not charged)
        return True

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # amqtt's, except for the Last Will: amqtt broadcasts whatever Will the session holds
        # (by now perhaps the next connection's), unchecked. A Will is a publish that happens
        # later: it passes ``self.publishing.judge`` now, as an ordinary PUBLISH of it would (issue 15)
        will = handler.will if isinstance(handler, AckAfterJournal) else None
        if isinstance(handler, AckAfterJournal):
            handler.will = None  # published once, or discarded by DISCONNECT (MQTT-3.1.2-8, -10)
        if will is not None and not isinstance(disconnect_waiter.result(), DisconnectPacket):
            await self._fire_will(client_session, will)
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=client_session.client_id, client_session=client_session
        )

    async def _fire_will(self, session: Session, will: Will) -> None:
        decision = self.publishing.judge(session.username, will.topic, len(will.data), retain=will.retain)
        if not decision.deliver:  # its sender is gone: nobody to tell
            why = decision.telling.text if decision.telling is not None else "over the publish rate"
            log.info("Last Will of %s on %s dropped: %s", session.client_id, will.topic, why)
            return
        message = ApplicationMessage(None, will.topic, will.qos, will.data, will.retain)
        # journalled like a QoS 0 publish (a Will has no PUBACK); delivered at its own QoS, as amqtt does
        await self._deliver(session, message, retain=will.retain, journal=True, qos=will.qos)

    async def _deliver(
        self, session: Session, message: ApplicationMessage, *, retain: bool, journal: bool, qos: int | None = None
    ) -> None:
        """A publish the checks let through: journalled (chat), broadcast, retained if flagged."""
        if journal:
            self._journal.record(session.username, message)
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=session.client_id, message=message
        )
        await self._broadcast_message(session, message.topic, message.data, qos)
        if retain:
            await self.retain_message(session, message.topic, message.data, message.qos)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        await self.fan_out.run_batch(self._broadcast_queue, running_tasks)

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        self.upkeep.make_room(target_session.client_id, target_session.retained_messages)
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt sends messages queued while offline with retain=1 and unchecked
        handler = self._get_handler(session)
        if handler is not None:
            queued = self.upkeep.take_queued(session.retained_messages, self._receives(session))
            await _publish_all(handler, queued, retain=False)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # checked per message (RECEIVE), and only topics under the filter's literal head are matched
        handler = self._get_handler(session)
        if handler is not None:
            table, receives = self._retained_messages, self._receives(session)
            await _publish_all(
                handler, self.retained.matching(subscription, table, self._matches, receives), retain=True
            )

    def _receives(self, session: Session) -> Callable[[str], bool]:
        return lambda topic: self.access.check(session.username, topic, Access.RECEIVE)

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


def _peer_host(peer: Any) -> str | None:
    """The host part of a socket's peer name (an (address, port, …) tuple, or None)."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


async def _publish_all(handler: BrokerProtocolHandler, messages: list[tuple[str, bytes, int]], *, retain: bool) -> None:
    tasks = [asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain)) for topic, data, qos in messages]
    if tasks:
        await asyncio.wait(tasks)
