"""The embedded broker: amqtt's ``Broker`` with this project's plugins and its traps closed.

amqtt 0.12.1 (pinned exactly in pyproject.toml) has behaviour that an auth plugin alone
cannot fix; ``ImBroker`` overrides the few private methods involved, each marked below:

* A CONNECT deletes (clean session) or merges into (persistent session) the existing
  session of its client id, and takes over a connected one, *before* authentication.
  A wrong password with a victim's client id would wipe or kick the victim. We
  authenticate right after reading the CONNECT, before any session is touched.
* Every CONNECT is sent the retained messages of every filter anyone subscribed to,
  without a topic check (the worker's ``status/+/+`` would reach every user). We send a
  resumed session the retained messages of its own filters only, checked.
* The Last Will topic is never checked: the auth plugin checks it like a publish.
* Messages queued for an offline persistent session are delivered with retain=1 and
  without a RECEIVE check: we deliver them as ordinary messages, checked.
* A publish the topic plugin refuses is dropped silently (the sender still gets its
  PUBACK): we tell the sender on its notice topic. There is no payload size limit and
  anyone may retain anything: we refuse oversized payloads and retained chat.
* Retained messages live in memory only: the workers' state records (presence, groups,
  friends) are also kept in ``<data_dir>/retained.sqlite3`` and restored on start.
* amqtt trusts every length field, waits for a CONNECT forever and buffers a packet of any
  size before the payload limit applies: ``PacketGuard`` (imcli/broker/packets.py) keeps its
  parser inside each packet, caps the packet size and times out a packet left unfinished.
* Every topic check goes through ``PluginManager.map_plugin_topic``, which creates one
  task per plugin per call, per recipient on fan-out. Our ACL is pure and synchronous,
  so ``_topic_filtering`` calls it directly.
* After every SUBSCRIBE, amqtt logs ``repr(self._subscriptions)`` at debug level, built
  even when debug is off: O(subscriptions) per SUBSCRIBE, a third of a join storm's time
  at 3,000 users; and each session carries a full ``transitions.Machine`` (about 12 KB).
  ``imcli/broker/sessions.py`` has the lighter stand-ins.
* Every message is matched against every subscription filter, each copy is sent by its
  own task, and every SUBSCRIBE scans every retained topic: ``_run_broadcast`` and the
  retained lookups use the indexes and batched writes of ``imcli/broker/fanout.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader, WebSocketsWriter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from imcli.broker.accounts import AccountStore, Role
from imcli.broker.acl import Access
from imcli.broker.fanout import Deliveries, EncodedPublish, FilterIndex, RetainedIndex
from imcli.broker.journal import AckAfterJournal, ArchiveWriter, Journal
from imcli.broker.limits import Limits, PublishRate
from imcli.broker.packets import MalformedPacket, PacketGuard
from imcli.broker.plugins import (
    CONNECTION_ACCEPTED,
    NOT_AUTHORIZED,
    REGISTER_PREFIX,
    AccountAuthPlugin,
    TopicAclPlugin,
    forget_store,
    shared_store,
)
from imcli.broker.retained import DURABLE, RetainedStore
from imcli.broker.sessions import SubscriptionTable, use_light_sessions
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, DEFAULT_PREFIX, Notice, TopicKind, Topics, encode, is_name

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = "presence"
WS_LISTENER = "ws"
TLS_LISTENER = "tls"
ACCOUNT_CHECK = 1.0  # seconds between looks at accounts.json for removed accounts
BROADCAST_BATCH = 256  # messages fanned out together, each connection written once per batch

_P = TypeVar("_P")


@dataclass(frozen=True)
class BrokerSettings:
    data_dir: Path
    bind: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    registration: str = "open"
    max_payload: int = DEFAULT_MAX_PAYLOAD
    limits: Limits = field(default_factory=Limits)
    history_days: float | None = None  # the archive worker's retention; None keeps everything
    tls_cert: Path | None = None  # PEM certificate (chain) and key: TLS on every listener bound to `bind`
    tls_key: Path | None = None
    ws_port: int | None = None  # an MQTT-over-WebSocket listener as well (wss with TLS)
    packet_timeout: float = 10.0  # seconds a peer has to complete its CONNECT, or any packet it started

    @property
    def max_packet(self) -> int:
        """Largest MQTT packet accepted from a user: a payload at the limit plus the longest possible
        topic and CONNECT fields (payloads in between are dropped with a notice, larger packets cut)."""
        return self.max_payload + 4 * 65_536

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def amqtt_config(self) -> dict[str, Any]:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        data_dir = str(self.data_dir.resolve())
        secure: dict[str, Any] = {}
        if self.tls_cert is not None and self.tls_key is not None:
            secure = {"ssl": True, "certfile": str(self.tls_cert), "keyfile": str(self.tls_key)}
        main = {"type": "tcp", "bind": f"{host}:{self.port}", **secure}
        if secure:
            # amqtt copies every field a listener leaves at its default value (ssl=False among them)
            # from the listener named "default", so "default" must be the plain one. It is where the
            # in-process workers connect: plain MQTT on loopback only, so they need not trust (or
            # match the host name of) whatever certificate the operator gave.
            listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": "127.0.0.1:0"}, TLS_LISTENER: main}
        else:
            listeners = {"default": main}
        if self.ws_port is not None:
            listeners[WS_LISTENER] = {"type": "ws", "bind": f"{host}:{self.ws_port}", **secure}
        return {
            "listeners": listeners,
            "timeout_disconnect_delay": 2,
            "plugins": {
                "imcli.broker.plugins.AccountAuthPlugin": {
                    "data_dir": data_dir,
                    "prefix": self.prefix,
                    "registration": self.registration,
                },
                "imcli.broker.plugins.TopicAclPlugin": {
                    "data_dir": data_dir,
                    "prefix": self.prefix,
                    "max_payload": self.max_payload,
                },
            },
        }


class ImBroker(Broker):
    """amqtt ``Broker`` that authenticates before touching sessions and enforces limits."""

    def __init__(self, settings: BrokerSettings, open_archive: Callable[[Path], ArchiveWriter]) -> None:
        # opened before amqtt loads the plugins (which share it), so that an unusable data
        # directory is reported as such rather than wrapped in amqtt's PluginInitError
        shared_store(settings.data_dir)
        use_light_sessions()
        super().__init__(settings.amqtt_config())
        self._subscriptions: dict[str, list[tuple[Session, int]]] = SubscriptionTable()
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self._auth = _plugin(self, AccountAuthPlugin)
        self._acl = _plugin(self, TopicAclPlugin)
        self._streams: set[asyncio.StreamWriter] = set()
        self._open: Counter[str] = Counter()  # open connections per account
        self._filters: dict[str, dict[str, int]] = {}  # client id -> its subscriptions (filter -> QoS)
        self._durable = RetainedStore(settings.data_dir)
        self._rate = PublishRate(settings.limits.publish_rate, settings.limits.publish_burst)
        self._queue_drops: Counter[str] = Counter()  # per client id, to log a full queue once
        self._away: dict[str, float] = {}  # persistent sessions whose client left -> since (monotonic)
        self._journal = Journal(open_archive(settings.data_dir), self.topics, self._may_publish)
        # QoS 1 messages whose rate token was taken before their PUBACK: id -> (message, allowed, when)
        self._charged: dict[int, tuple[ApplicationMessage, bool, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._revoker: asyncio.Task[None] | None = None
        self._filter_index = FilterIndex()
        self._retained_index = RetainedIndex()
        self._deliveries: Deliveries | None = None  # created in the running loop

    @property
    def accounts(self) -> AccountStore:
        return shared_store(self.settings.data_dir)

    def bound_port(self, listener: str | None = None) -> int:
        """The TCP port a listener actually bound (useful with port 0); by default the main one."""
        name = listener or (TLS_LISTENER if self.settings.tls else "default")
        # amqtt keeps its asyncio/websockets servers private; there is no public accessor in 0.12.1
        server = self._servers[name].instance
        return int(next(iter(server.sockets)).getsockname()[1])

    def worker_port(self) -> int:
        """Where the in-process workers connect: the plain loopback listener when TLS is on."""
        return self.bound_port("default")

    # ---------------------------------------------------------------- connect

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        self._streams.add(writer)
        try:  # amqtt's stream_connected, with the reader kept inside its packets (see imcli/broker/packets.py)
            guard = PacketGuard(StreamReaderAdapter(reader), self.settings.max_packet, self.settings.packet_timeout)
            await self._client_connected(listener_name, guard, StreamWriterAdapter(writer))
        finally:
            self._streams.discard(writer)
            writer.close()  # amqtt leaves some finished connections open (found by ResourceWarnings)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        # amqtt's ws_connected, with the same packet guard as TCP connections
        guard = PacketGuard(WebSocketsReader(websocket), self.settings.max_packet, self.settings.packet_timeout)
        await self._client_connected(listener_name, guard, WebSocketsWriter(websocket))

    async def start(self) -> None:
        try:
            await super().start()  # amqtt starts with no retained messages
        except BaseException:
            # amqtt leaves the listeners it already started open when a later one fails to bind
            for server in self._servers.values():
                if server.instance is not None:
                    server.instance.close()
            raise
        for topic, payload, qos in self._durable.all():
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
            self._retained_index.add(topic)
            self._track_state(topic, payload)
        self._sweeper = asyncio.create_task(self._expire_sessions())
        self._revoker = asyncio.create_task(self._end_revoked_logins())

    async def _expire_sessions(self) -> None:
        """amqtt keeps a persistent session (its subscriptions and queue) forever: every login
        that never comes back would cost memory for good. We drop one away for too long."""
        expiry = self.settings.limits.session_expiry
        while True:
            await asyncio.sleep(min(expiry / 4, 600.0))
            now = time.monotonic()
            for key, (_, _, when) in list(self._charged.items()):
                if now - when > 60:  # its connection ended before the broker delivered it
                    del self._charged[key]
            for client_id, since in list(self._away.items()):
                if now - since < expiry:
                    continue
                del self._away[client_id]
                session = self._sessions.get(client_id, (None, None))[0]
                if session is None or session.transitions.is_connected():
                    continue
                try:
                    await self._delete_session(client_id)
                except Exception:  # one bad session must not end the sweeping
                    log.exception("could not expire the session %s", client_id)
                self._queue_drops.pop(client_id, None)
                log.info("persistent session %s expired after %.0f s away", client_id, expiry)

    async def _end_revoked_logins(self) -> None:
        """``imcli admin user remove`` edits accounts.json from another process, and amqtt would
        go on serving the removed account's open connections and keep its persistent sessions.
        Once a second the file's stamp is looked at. The connections of an account that is gone,
        or was made again with another password, are closed (their Last Will fires) and its
        sessions are deleted, so that a new owner of the name cannot resume them."""
        seen, known = -1, dict[str, str]()
        doomed: set[str] = set()  # client ids to delete once their connection has ended
        while True:
            await asyncio.sleep(ACCOUNT_CHECK)
            try:
                self.accounts.refresh()
                if self.accounts.generation != seen:
                    seen = self.accounts.generation
                    accounts = self.accounts.list_accounts()
                    current = {a.name: a.hash for a in accounts}
                    # `imcli serve` gives its workers new passwords at every start, while they connect
                    rekeyed = {a.name for a in accounts if a.role is Role.SERVICE}
                    replaced = {name for name, key in known.items() if current.get(name, key) != key} - rekeyed
                    known = current
                    for client_id, (session, handler) in list(self._sessions.items()):
                        name = session.username or ""
                        if not name or name.startswith(REGISTER_PREFIX) or (name in current and name not in replaced):
                            continue
                        doomed.add(client_id)
                        if session.transitions.is_connected():
                            log.warning("closing %s: its account was removed or replaced", client_id)
                            await handler.handle_connection_closed()
                            await handler.stop()
                for client_id in list(doomed):
                    session = self._sessions.get(client_id, (None, None))[0]
                    if session is None or not session.transitions.is_connected():
                        doomed.discard(client_id)
                        self._away.pop(client_id, None)
                        await self._delete_session(client_id)
            except Exception:  # a damaged accounts.json or one bad session must not end the watch
                log.exception("could not end the sessions of removed accounts")

    def persistent_sessions(self) -> set[str]:
        """Client ids of the persistent sessions the broker keeps (connected or not)."""
        return {cid for cid, (session, _) in self._sessions.items() if not session.clean_session}

    async def shutdown(self) -> None:
        for task in (self._sweeper, self._revoker):
            if task is not None:
                task.cancel()
        # stop accepting first: amqtt closes its listeners last, after the sessions, so clients
        # reconnecting meanwhile would be accepted into a loop that is about to end
        for server in self._servers.values():  # amqtt private, as in bound_port()
            if server.instance is not None:
                server.instance.close()
        await super().shutdown()
        self._durable.close()
        self._journal.close()
        # asyncio.Server.close() leaves accepted connections open before Python 3.13
        writers = list(self._streams)
        for writer in writers:
            writer.close()
        if writers:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in writers], timeout=5)

    async def _initialize_client_session(  # amqtt private: see module docstring
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            # amqtt waits for the CONNECT forever, and its parser reads past a short packet's
            # remaining length (a TLS ClientHello parses as one): without a deadline any peer
            # holds a connection, a task and its buffers open for as long as it likes
            handler, incoming = await asyncio.wait_for(
                AckAfterJournal.init_from_connect(reader, writer, self.plugins_manager),
                self.settings.packet_timeout,
            )
        except (AMQTTError, MQTTError, NoDataError, TimeoutError, MalformedPacket, UnicodeDecodeError) as exc:
            log.info("bad CONNECT from %s:%s: %s", remote_address, remote_port, exc or "none in time")
            raise AMQTTError(exc) from exc

        code = await self._auth.check_connect(incoming)
        if code == CONNECTION_ACCEPTED and isinstance(reader, PacketGuard) and self._is_service(incoming):
            reader.limit = None  # a worker's `who` reply may be large
        if code == CONNECTION_ACCEPTED and self._too_many_connections(incoming):
            log.warning("CONNECT refused for %r: %d connections already", incoming.username,
                        self.settings.limits.max_connections)  # fmt: skip
            code = NOT_AUTHORIZED
        if code != CONNECTION_ACCEPTED:
            # refuse before any existing session is deleted, merged or taken over
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused ({code}) for {incoming.username!r}")

        session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            existing, _ = self._sessions[incoming.client_id]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, attr, getattr(incoming, attr))
            session = existing
            session.parent = 1
        else:
            incoming.parent = 0

        if isinstance(handler, AckAfterJournal):
            handler.before_ack = self._before_ack
        delay = self.config.timeout_disconnect_delay or 0
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _handle_client_session(  # amqtt private: see module docstring
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        # amqtt's version authenticates again here and then, for every CONNECT, re-sends the
        # retained messages of every filter *anyone* subscribed to, unchecked: a leak (the
        # worker's status/+/+ to every user) and O(subscriptions x retained) per CONNECT.
        if client_session.client_id is None:
            raise BrokerError("client id was not set")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():  # same account, same client id: take over
                    _old_session, old_handler = self._sessions[client_session.client_id]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    break
                await asyncio.sleep(1)  # the old connection of this session is still closing

        account = client_session.username or ""
        self._open[account] += 1  # this call lasts as long as the connection: counted until it ends
        self._away.pop(client_session.client_id, None)
        try:
            await self._serve_connection(client_session, handler, reader, writer)
        finally:
            self._open[account] -= 1
            if not self._open[account]:
                del self._open[account]
            if not client_session.clean_session:
                self._away[client_session.client_id] = time.monotonic()

    async def _serve_connection(
        self, client_session: Session, handler: BrokerProtocolHandler, reader: Any, writer: Any
    ) -> None:
        assert client_session.client_id is not None
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        if client_session.parent:  # a resumed persistent session: retained messages of its own filters
            for subscription in list(self._filters.get(client_session.client_id, {}).items()):
                await self._publish_retained_messages_for_subscription(subscription, client_session)
        await self._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(  # amqtt private
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # checked per message (RECEIVE), and only topics under the filter's literal prefix are matched
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        retained_messages = self._retained_messages
        tasks = [
            asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
            )
            for topic in self._retained_index.under(topic_filter, retained_messages)
            if (retained := retained_messages.get(topic)) is not None
            and self._matches(topic, topic_filter)
            and self._acl.check(session.username, topic, Access.RECEIVE)
        ]
        if tasks:
            await asyncio.wait(tasks)

    def _is_service(self, session: Session) -> bool:
        """Workers' service accounts are trusted: no limits apply to them."""
        return self._acl.store.cached_role(session.username or "") is Role.SERVICE

    def _too_many_connections(self, incoming: Session) -> bool:
        if self._is_service(incoming):
            return False
        current = self._sessions.get(incoming.client_id or "")
        replaced = (  # a reconnect of the same client id replaces its own connection
            current is not None
            and current[0].username == incoming.username
            and current[0].transitions.state == "connected"
        )
        return self._open[incoming.username or ""] - replaced >= self.settings.limits.max_connections

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter = subscription[0]
        held = self._filters.setdefault(session.client_id or "", {})
        limit = self.settings.limits.max_subscriptions
        if topic_filter not in held and len(held) >= limit and not self._is_service(session):
            await self.notify(session.username, "limit", f"subscription to {topic_filter} refused: at most {limit}")
            return 0x80
        granted: int = await super().add_subscription(subscription, session)
        if granted != 0x80:
            held[topic_filter] = granted
            self._filter_index.add(topic_filter)
        return granted

    async def _del_all_subscriptions(self, session: Session) -> None:  # amqtt private
        # amqtt walks every filter on the broker for each session it ends or replaces (quadratic
        # in a storm of 10,000 reconnects); the session's own filters are in self._filters
        for topic_filter in list(self._filters.get(session.client_id or "", {})):
            self._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]

    def _del_subscription(self, a_filter: str, session: Session) -> int:  # amqtt private: every removal path
        deleted: int = super()._del_subscription(a_filter, session)
        held = self._filters.get(session.client_id or "")
        if deleted and held is not None:
            held.pop(a_filter, None)
            if not held:
                del self._filters[session.client_id or ""]
        return deleted

    # ---------------------------------------------------------------- delivery

    async def _run_broadcast(self, running_tasks: Any) -> None:  # amqtt private: see imcli/broker/fanout.py
        batch = [await self._broadcast_queue.get()]
        while len(batch) < BROADCAST_BATCH and not self._broadcast_queue.empty():
            batch.append(self._broadcast_queue.get_nowait())
        if self._deliveries is None:
            self._deliveries = Deliveries(asyncio.get_running_loop())
        for broadcast in batch:
            await self._fan_out(broadcast, self._deliveries, running_tasks)
        self._deliveries.flush_soon()

    async def _fan_out(self, broadcast: dict[str, Any], deliveries: Deliveries, running_tasks: Any) -> None:
        """amqtt's ``_run_broadcast`` for one message, with the same rules, minus its per-copy costs."""
        topic, data = broadcast["topic"], bytes(broadcast["data"] or b"")
        forced_qos = broadcast.get("qos")
        encoded = EncodedPublish(topic, data)
        may_receive = self._acl.receive_check(topic)
        subscriptions = self._subscriptions
        for topic_filter in self._filter_index.candidates(topic):
            targets = subscriptions.get(topic_filter)
            if targets is None:
                self._filter_index.discard(topic_filter)
                continue
            if not targets or not self._matches(topic, topic_filter):
                continue
            for session, sub_qos in list(targets):
                qos = sub_qos if forced_qos is None else forced_qos
                if not may_receive(session.username):
                    continue
                if session.transitions.state != "connected":
                    # as amqtt: kept for an offline persistent session, at QoS 1 or 2
                    if not session.clean_session and qos in (1, 2) and not session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, session)
                    continue
                handler = self._get_handler(session)
                if handler is None:
                    continue
                if qos in (0, 1) and isinstance(handler.writer, StreamWriterAdapter):
                    deliveries.add(handler, session, encoded, qos)
                else:  # QoS 2, or a transport that needs its drain: amqtt's own path
                    running_tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False)))

    # ---------------------------------------------------------------- topics

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:  # amqtt private
        allowed = self._acl.check(session.username, topic, Access(action.value))
        if not allowed and action is Action.PUBLISH:
            await self.notify(session.username, "denied", self._acl.acl.refusal(session.username, topic), topic)
        return allowed

    async def _handle_message_delivery(  # amqtt private: limits before amqtt's own handling
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is not None and message.topic:
            size = len(message.data or b"")
            account = client_session.username or ""
            trusted = self._is_service(client_session)
            now = time.monotonic()
            charged = self._charged.pop(id(message), None)
            allowed = (
                charged[1] if charged is not None and charged[0] is message else self._rate_allows(client_session, now)
            )
            if not allowed:
                if self._rate.should_warn(account, now):
                    rate = self.settings.limits.publish_rate
                    await self.notify(account, "rate", f"slow down: messages beyond {rate:g} a second are dropped")
                return True
            if size > self.settings.max_payload and not trusted:  # a worker's `who` reply may be large
                await self.notify(
                    client_session.username,
                    "too_large",
                    f"message of {size} bytes dropped: the limit is {self.settings.max_payload} bytes",
                    message.topic,
                )
                return True
            packet = message.publish_packet
            if packet is not None and packet.retain_flag and not self._acl.acl.may_retain(message.topic):
                await self.notify(
                    client_session.username,
                    "denied",
                    f"retained messages are not allowed on {message.topic}",
                    message.topic,
                )
                return True
            if charged is None:  # QoS 0: never acknowledged, kept as it is delivered
                self._journal.record(client_session.username, message)
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    def _may_publish(self, username: str | None, topic: str) -> bool:
        return self._acl.check(username, topic, Access.PUBLISH)

    def _rate_allows(self, session: Session, now: float) -> bool:
        return self._is_service(session) or self._rate.allow(session.username or "", now)

    def _before_ack(self, session: Session, message: ApplicationMessage) -> None:
        """A QoS 1 PUBLISH is about to be acknowledged: take its rate token and, if it will be
        delivered, write it to the archive first (imcli/broker/journal.py)."""
        now = time.monotonic()
        allowed = self._rate_allows(session, now)
        self._charged[id(message)] = (message, allowed, now)
        small = len(message.data or b"") <= self.settings.max_payload or self._is_service(session)
        if allowed and small:
            self._journal.record(session.username, message)

    async def _publish_session_retained_messages(self, session: Session) -> None:  # amqtt private
        # amqtt sends messages queued while offline with retain=1 and unchecked
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if self._acl.check(session.username, queued.topic, Access.RECEIVE):
                tasks.append(asyncio.ensure_future(handler.mqtt_publish(queued.topic, queued.data, queued.qos, False)))
        if tasks:
            await asyncio.wait(tasks)

    async def _retain_broadcast_message(  # amqtt private: its offline queue is unbounded
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        queue = target_session.retained_messages
        if queue.qsize() >= self.settings.limits.max_queued:
            queue.get_nowait()  # keep the newest; the archive still has the oldest for 'imcli history'
            self._queue_drops[target_session.client_id] += 1
            if self._queue_drops[target_session.client_id] == 1:
                log.info("offline queue of %s is full: dropping its oldest", target_session.client_id)
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name:
            if topic_name in self._retained_messages:
                self._retained_index.add(topic_name)
            else:
                self._retained_index.discard(topic_name)
            kind = self._track_state(topic_name, bytes(data or b""))
            if kind in DURABLE:
                self._durable.put(topic_name, bytes(data or b""), qos or 0)

    def _track_state(self, topic: str, payload: bytes) -> TopicKind | None:
        """Feed the ACL's caches from the records the workers retain."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            return None
        if parsed.kind is TopicKind.GROUP_INFO and parsed.name:
            self._acl.groups.update(parsed.name, payload)
        elif parsed.kind is TopicKind.FRIENDS and parsed.owner:
            self._acl.friends.update(parsed.owner, payload)
        return parsed.kind

    async def notify(self, username: str | None, code: str, text: str, topic: str | None = None) -> None:
        """Tell one user something on its notice topic (nobody hears it if it is not listening)."""
        if username is None or not is_name(username):
            return
        log.info("notice to %s: %s", username, text)
        payload = encode(Notice(code=code, text=text, topic=topic))
        await self.internal_message_broadcast(self.topics.notice(username), payload, 1)


def _plugin(broker: Broker, kind: type[_P]) -> _P:
    for plugin in broker.plugins_manager.plugins:
        if isinstance(plugin, kind):
            return plugin
    raise RuntimeError(f"{kind.__name__} is not loaded")


class EmbeddedBroker:
    """Start and stop an ``ImBroker`` (async context manager) that journals into ``open_archive(data_dir)``."""

    def __init__(self, settings: BrokerSettings, open_archive: Callable[[Path], ArchiveWriter]) -> None:
        self.settings = settings
        self._open_archive = open_archive
        self.broker: ImBroker | None = None

    async def __aenter__(self) -> ImBroker:
        self.broker = ImBroker(self.settings, self._open_archive)
        await self.broker.start()
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None
        forget_store(self.settings.data_dir)


def check_tls_files(cert: Path, key: Path) -> None:
    """Raise ``ValueError`` saying what is wrong with a certificate/key pair (amqtt would only
    fail later, inside its start-up, with a wrapped traceback)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"no such file: {exc.filename}") from exc
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot use {cert} with {key}: {reason}") from exc


def new_service_password() -> str:
    return secrets.token_urlsafe(24)
