"""Receiving: what a client shows for an MQTT message, and the long-lived ``Listener``.

The listener is one connection that does everything a terminal client needs: it
receives rooms, direct and group messages, notices and events, announces the device
online, asks the workers (request/reply on the same connection) and publishes. With a
``session`` name it keeps a persistent MQTT session, so the broker queues direct and
group messages (QoS 1) while the device is away; they arrive first on the next start,
before the SUBACK of our subscription, and are marked ``missed``.

A broker that restarts without keeping sessions (the embedded one keeps them in memory)
has forgotten what it queued: when a CONNACK says the session is not present, the
listener asks the archive for what arrived since it was last connected (``since`` on
start, the moment the connection dropped on a reconnect) and shows it, marked ``missed``,
once (``seen``), so a long-running client loses nothing the archive kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from imcli.client.groupfollow import GroupFollower
from imcli.client.identity import Identity
from imcli.client.pages import all_history
from imcli.core.errors import AuthenticationFailed, DeviceLoggedOut, ImcliError, PublishFailed, SessionTakenOver
from imcli.core.mqtt import SUBSCRIBE_TRIES, ConnectionListener, Message, MqttClient, Will
from imcli.core.names import label
from imcli.core.request_reply import RequestClient
from imcli.core.rules import DEVICE_CREDENTIAL_PREFIX
from imcli.core.wire import (
    DEFAULT_HEARTBEAT,
    DeviceStatus,
    ErrorReply,
    Event,
    Friends,
    HistoryReply,
    HistoryRequest,
    MalformedPayload,
    Notice,
    Payload,
    Presence,
    Profile,
    Received,
    TopicKind,
    Topics,
    WireModel,
    chat_received,
    check_name,
    decode_as,
    device_client_id,
    encode,
    new_id,
    status_level,
)

log = logging.getLogger(__name__)

CATCH_UP_OVERLAP = 5.0  # seconds before the last known contact: the seen ids drop what was shown already
CATCH_UP_LIMIT = 500  # the archive's page size (HISTORY_MAX); more than that is said, not shown


_SHOWN = (TopicKind.ROOM, TopicKind.DM, TopicKind.SENT, TopicKind.GROUP_MSG, TopicKind.NOTICE, TopicKind.EVENTS)


class RecentIds:
    """Message ids seen lately: QoS 1 is at-least-once, so duplicates are dropped here."""

    def __init__(self, capacity: int = 10_000, initial: list[str] | None = None) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict.fromkeys(initial or [])
        self._capacity = capacity

    def seen(self, message_id: str) -> bool:
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return False

    def newest(self, n: int) -> list[str]:
        return list(self._ids)[-n:]

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._ids

    def forget(self, message_id: str) -> None:
        self._ids.pop(message_id, None)

    def add_line(self, item: Received) -> None:
        """A plain-text line shown: its copy in the archive (under an id of the archive's) is matched
        by content, one copy per line shown (``take_line``)."""
        n = 0
        while self.seen(_line_key(item, n)):
            n += 1

    def take_line(self, item: Received) -> bool:
        """Whether a line like ``item`` (the archive's copy) was shown, counting it off if so."""
        n = 0
        while _line_key(item, n) in self:
            n += 1
        if n:
            self.forget(_line_key(item, n - 1))
        return n > 0


def seen_key(item: Received) -> str:
    """Ids are chosen by senders, so one sender cannot hide another's message by reusing its id."""
    return f"{item.sender or ''}/{item.id}"


def content_key(item: Received) -> str:
    """What a plain-text line (a bot's ``mosquitto_pub -m``) says, where and from whom: such a
    line carries no id, every reader makes one up, so copies of it are matched by this."""
    digest = hashlib.sha256(item.text.encode()).hexdigest()[:32]
    return f"{item.kind}/{item.room or item.group or item.to or ''}/{item.sender or ''}/{digest}"


def _line_key(item: Received, n: int) -> str:
    return f"line:{content_key(item)}#{n}"


def to_received(topics: Topics, message: Message) -> Received | None:
    """What a client shows for one MQTT message; ``None`` for topics it does not display."""
    parsed = topics.parse(message.topic)
    if parsed is None or parsed.kind not in _SHOWN:
        return None
    try:
        if parsed.kind is TopicKind.EVENTS:
            event = decode_as(message.payload, Event)
            return Received(
                kind="event", sender=event.account, nick=event.nick, id=event.id, ts=event.ts, text=event_text(event)
            )
        if parsed.kind is TopicKind.NOTICE:
            notice = decode_as(message.payload, Notice)
            return Received(kind="notice", id=notice.id, ts=notice.ts, text=notice.text)
        return chat_received(parsed, message.payload)
    except MalformedPayload as exc:
        return Received(
            kind="malformed", sender=parsed.sender, id=new_id(), ts=time.time(), text=f"{message.topic}: {exc}"
        )


def profile_changes(before: Profile | None, after: Profile) -> list[str]:
    """What changed in a profile, in words (``signature “…”``, ``about``, ``avatar``)."""
    was = before or Profile(account=after.account, name=after.name)
    changes = []
    if was.signature != after.signature:
        changes.append(f"signature “{after.signature}”" if after.signature else "signature removed")
    if was.about != after.about:
        changes.append("about")
    if was.avatar != after.avatar:
        changes.append("avatar" if after.avatar else "avatar removed")
    return changes


def event_text(event: Event) -> str:
    if event.event == "rename":
        return f"{event.old_nick} is now known as {event.nick}"
    who = event.nick if event.nick == event.account else f"{event.nick} ({event.account})"
    if event.event == "device_join":
        return f"{who} is online on {event.device} too"
    if event.event == "device_leave":
        return f"{who} left {event.device} (still online elsewhere)"
    return f"{who} is {'online' if event.event == 'join' else 'offline'}"


class Listener:
    """Rooms, direct messages, notices and events as they arrive; reconnects by itself.

    While it runs, the device is online: a retained status on
    ``<prefix>/status/<me>/<device>`` repeated every ``heartbeat`` seconds, an empty
    retained Last Will that clears it if the process dies, and a clear on a clean exit.
    ``with Listener(identity) as l: for item in l: ...``

    ``session``: a stable name for this device's persistent session (client id
    ``<me>:<session>``); ``None`` for a throw-away clean session.
    """

    # seconds what was queued while away may wait for its senders' presence records (their display
    # names), which come after our SUBACK, the queue before it (``_settled``)
    SETTLE = 1.0

    def __init__(
        self,
        identity: Identity,
        rooms: list[str] | None = None,
        on_connection: ConnectionListener | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        *,
        session: str | None = None,
        seen: RecentIds | None = None,
        since: float | None = None,
    ) -> None:
        self.identity = identity
        self._rooms = set(rooms or [])
        self._persistent = session is not None
        self._contact: float | None = since  # when we were last known connected (None: never, no catch-up)
        topics = identity.topics
        room_filters = (
            [topics.room_filter(check_name(r, "room name")) for r in rooms] if rooms else [topics.room_filter()]
        )
        self._filters = [
            *room_filters,
            *topics.inbox_filters(identity.account),  # DMs, replies, notices, my friends record
            topics.presence_filter(),
            topics.events(),
            topics.profile_filter(),  # friends' profile changes are shown as events
        ]
        self.device = session or identity.session_name("listen")
        client_id = device_client_id(identity.account, self.device)
        self._status_topic = topics.status(identity.account, status_level(self.device))
        self._heartbeat = heartbeat
        self._user_on_connection = on_connection
        self._client = MqttClient(
            identity.address,
            identity.credentials,
            client_id,
            clean_session=session is None,
            reconnect=True,
            will=Will(self._status_topic, b"", qos=1, retain=True),
            on_message=self._route,
            on_connection=self._connection_changed,
            quick_losses=session is not None,  # a persistent session's id is the device's: another may use it
        )
        self._client_id = client_id
        self.seen = seen or RecentIds()
        self._logged_out = False  # the broker said this device was revoked
        self._uses_device_credential = identity.credentials.password.startswith(DEVICE_CREDENTIAL_PREFIX)
        self.nicks: dict[str, str] = {}
        self.friends: set[str] = set()  # from my retained friends record
        self.profiles: dict[str, Profile] = {}  # as last received: a change is told against it
        self.online: set[str] = set()  # accounts the presence worker says are online
        self._inbox: queue.Queue[tuple[Message | Received, bool]] = queue.Queue()
        self._catching_up = True  # until our SUBACK: what arrives first was queued while we were away
        self.requests = RequestClient(topics, identity.account, self.publish)  # our inbox filters cover the replies
        self._requests_shown: set[str] = set()
        self.accept_hint = "imcli friend accept {}"  # what a friend request says to run (chat: its /friend)
        self.group_follower: GroupFollower | None = None  # only where the group wildcard is refused (NATS)
        self._notice_topic = topics.notice(identity.account)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="imcli-heartbeat", daemon=True)

    def __enter__(self) -> Listener:
        self._client.connect()
        try:
            self._client.subscribe(self._filters, tries=SUBSCRIBE_TRIES)
            if self._persistent:  # a session from before inbox_filters holds the whole user tree: no more
                self._client.unsubscribe([self.identity.topics.user_filter(self.identity.account)])
            self._subscribe_groups()
            self._catching_up = False
            self._client.publish(self._status_topic, self._status(), qos=1, retain=True)
            if self.group_follower is not None and not self.group_follower.wait_first(self.requests.timeout):
                log.info("my groups are not followed yet: their lines come once they are")
        except ImcliError as exc:
            self._client.close()
            if self._client.fatal is not None and self._client.fatal is not exc:
                raise self._client.fatal from exc  # taken over while subscribing: that is what happened
            raise
        self._beat.start()
        self._after_connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _subscribe_groups(self) -> None:
        """Every group: the embedded broker and Mosquitto deliver only my groups' messages. NATS 2.9
        cannot narrow a wildcard per delivery and refuses it (deploy/nats): there one subscription per
        group of mine, kept current by a ``GroupFollower`` (imcli.client.groupfollow)."""
        try:
            self._client.subscribe([self.identity.topics.group_msg_filter()])
        except PublishFailed:
            log.info("the broker refused %s: following my groups one by one", self.identity.topics.group_msg_filter())
            self.group_follower = GroupFollower(self._client, self.identity.topics, self.requests.ask)
            self.group_follower.start()

    def close(self) -> None:
        """Say offline (clear the device's status) and disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.group_follower is not None:
            self.group_follower.close()
        if self._client.connected:
            # if the broker is gone, the Last Will or the worker's expiry says offline instead
            with contextlib.suppress(ImcliError):
                self._client.publish(self._status_topic, b"", qos=1, retain=True)
        self._client.close()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # ---------------------------------------------------------------- talking on the same connection

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement (any thread but paho's)."""
        self._client.publish(topic, payload, qos=1)

    def publish_later(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 publish without waiting: while disconnected, paho sends it on reconnecting."""
        self._client.publish_nowait(topic, payload, qos=1)

    @property
    def connected(self) -> bool:
        return self._client.connected

    def ask(self, request: WireModel, timeout: float | None = None) -> Payload:
        """Request/reply over this connection (an ``imcli.core.request_reply.Asker``)."""
        return self.requests.ask(request, timeout)

    # ---------------------------------------------------------------- receiving

    def _route(self, message: Message) -> None:  # paho's thread
        notice = self._my_notice(message)
        if notice is not None and notice.code == "device_revoked" and notice.topic == self.identity.device:
            self._logged_out = True
        if notice is not None and notice.code == "taken_over" and notice.topic == self._client_id:
            # another client connected with our id, and the broker closes us now: reconnecting would take
            # the session back a second later, and lose it again, for ever (docs/PROTOCOL.md §9)
            self._client.stop(SessionTakenOver(self.identity.device))
            return
        if self.group_follower is not None and message.topic == self._notice_topic:
            self.group_follower.refresh()  # an invite, a kick, a new member: my groups may have changed
        if not self.requests.deliver(message):
            self._inbox.put((message, self._catching_up))

    def _my_notice(self, message: Message) -> Notice | None:
        """A notice of the broker about this client itself: this device was revoked (``imcli logout``
        here, or ``imcli devices revoke`` elsewhere: imcli/broker/device_service.py), or this
        connection was taken over (imcli/broker/amqtt_adapter.py). Only the broker and the workers
        may publish on my notice topic."""
        if not message.topic.endswith("/notice") or (
            b"device_revoked" not in message.payload and b"taken_over" not in message.payload
        ):
            return None
        parsed = self.identity.topics.parse(message.topic)
        if parsed is None or parsed.kind is not TopicKind.NOTICE or parsed.owner != self.identity.account:
            return None
        try:
            return decode_as(message.payload, Notice)
        except MalformedPayload:
            return None

    def __iter__(self) -> Iterator[Received]:
        yield from self._settled()
        while not self._stop.is_set():
            if self._logged_out:
                raise DeviceLoggedOut(self.identity.device)
            if self._client.fatal is not None:
                if isinstance(self._client.fatal, AuthenticationFailed) and self._uses_device_credential:
                    raise DeviceLoggedOut(self.identity.device) from self._client.fatal
                raise self._client.fatal
            try:
                message, missed = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            yield from self.process(message, missed)

    def _settled(self) -> Iterator[Received]:
        """What arrived first, once the presence records of the senders of what was queued while away are
        in, or ``SETTLE`` seconds have passed: a missed line shows its sender's display name as a live one
        does (``process`` names a sender from the records seen so far). Records are taken as they come,
        everything else in the order it came."""
        held: list[tuple[Message | Received, bool]] = []
        waiting_for: set[str] = set()  # senders of queued lines whose record has not come yet
        deadline = time.monotonic() + self.SETTLE
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                message, missed = self._inbox.get(timeout=0.05)
            except queue.Empty:
                if waiting_for - self.nicks.keys():
                    continue
                break
            parsed = None
            if isinstance(message, Message):
                parsed = self.identity.topics.parse(message.topic)
                if parsed is not None and parsed.kind is TopicKind.PRESENCE:
                    self._remember_nick(message.payload)
                    continue
            held.append((message, missed))
            if missed and parsed is not None and parsed.sender and parsed.sender != self.identity.account:
                waiting_for.add(parsed.sender)
        for message, missed in held:
            yield from self.process(message, missed)

    def pending(self) -> Iterator[Received]:
        """What has arrived so far, without waiting (for a client that merges it with history)."""
        while True:
            try:
                message, missed = self._inbox.get_nowait()
            except queue.Empty:
                return
            yield from self.process(message, missed)

    def process(self, message: Message | Received, missed: bool = False) -> Iterator[Received]:
        if isinstance(message, Received):  # from the archive (or our own notice)
            yield from self._archived(message, missed)
            return
        parsed = self.identity.topics.parse(message.topic)
        if parsed is not None and parsed.kind is TopicKind.PRESENCE:
            self._remember_nick(message.payload)
            return
        if parsed is not None and parsed.kind is TopicKind.FRIENDS:
            yield from self._new_requests(message, missed)
            return
        if parsed is not None and parsed.kind is TopicKind.PROFILE:
            if not isinstance(message, Received):
                yield from self._profile_changed(message)
            return
        item = to_received(self.identity.topics, message)
        if item is not None and missed and item.kind == "event":
            return  # "bob is online" from hours ago: presence records say how things are now
        if item is None or (item.kind != "malformed" and self.seen.seen(seen_key(item))):
            return
        if item.kind == "event" and item.sender and item.nick:
            self.nicks[item.sender] = item.nick
        elif item.sender and self.nicks.get(item.sender, item.sender) != item.sender:
            item = item.model_copy(update={"nick": self.nicks[item.sender]})
        if item.kind in ("dm", "group", "room"):
            if item.format == "text":
                self.seen.add_line(item)
            if missed:
                item = item.model_copy(update={"missed": True})
        yield item

    def _archived(self, item: Received, missed: bool) -> Iterator[Received]:
        if item.kind == "notice":
            yield item
            return
        if self.seen.seen(seen_key(item)):
            return
        # a bot's plain line shown live has an id this reader made up, its archived copy another
        if item.format == "text" and self.seen.take_line(item):
            return
        yield item.model_copy(update={"missed": True}) if missed else item

    def _new_requests(self, message: Message, missed: bool) -> Iterator[Received]:
        """Friend requests waiting in my retained record: they reach me even if I was offline."""
        if missed and not message.retain:
            return  # queued while away, so old (a request since accepted): the retained copy says now's
        try:
            record = decode_as(message.payload, Friends)
        except MalformedPayload:
            return
        self.friends = set(record.friends)
        self._requests_shown &= set(record.incoming)  # a request asked again after a decline shows again
        for asker in record.incoming:
            if asker not in self._requests_shown:
                self._requests_shown.add(asker)
                text = f"{asker} wants to be your friend ({self.accept_hint.format(asker)})"
                yield Received(kind="notice", sender=asker, id=new_id(), ts=time.time(), text=text)

    def _profile_changed(self, message: Message) -> Iterator[Received]:
        """A friend's profile changed (live, not the retained copy a subscription starts with): an event."""
        try:
            profile = decode_as(message.payload, Profile)
        except MalformedPayload:
            return
        before = self.profiles.get(profile.account)
        self.profiles[profile.account] = profile
        if message.retain or profile.account not in self.friends:
            return
        changes = profile_changes(before, profile)
        if changes:
            text = f"{label(profile.account, profile.name)} changed their profile: {'; '.join(changes)}"
            ts = profile.updated or time.time()
            yield Received(kind="event", sender=profile.account, nick=profile.name, id=new_id(), ts=ts, text=text)

    def _remember_nick(self, payload: bytes) -> None:
        try:
            record = decode_as(payload, Presence)
        except MalformedPayload:
            return
        self.nicks[record.account] = record.nick
        if record.state == "online":
            self.online.add(record.account)
        else:
            self.online.discard(record.account)

    # ---------------------------------------------------------------- online status

    def _status(self) -> bytes:
        return encode(DeviceStatus(interval=self._heartbeat))

    def _connection_changed(self, up: bool) -> None:
        if up:  # paho's thread: announce again without waiting
            self._client.publish_nowait(self._status_topic, self._status(), qos=1, retain=True)
            if self.group_follower is not None:
                self.group_follower.refresh(reset=not self._client.session_present)
            self._after_connect()
        else:
            self._contact = time.time()
        if self._user_on_connection is not None:
            self._user_on_connection(up)

    @property
    def last_contact(self) -> float:
        """When this listener was last known connected: now, if it is (for the next run's ``since``)."""
        if self._client.connected or self._contact is None:
            return time.time()
        return self._contact

    # ---------------------------------------------------------------- catching up from the archive

    def _after_connect(self) -> None:
        """A persistent session the broker no longer had: ask the archive what it held (a thread of its
        own: the reply arrives on paho's thread, which may be the one calling)."""
        since = self._contact
        if not self._persistent or self._client.session_present or since is None:
            return
        threading.Thread(target=self._catch_up, args=(since - CATCH_UP_OVERLAP,), daemon=True).start()

    def _catch_up(self, since: float) -> None:
        request = HistoryRequest(limit=CATCH_UP_LIMIT, since=since)
        try:
            reply = all_history(self.requests.ask, request)
        except ImcliError as exc:
            self._say(f"could not catch up from the archive: {exc} (imcli history shows what you missed)")
            return
        if isinstance(reply, ErrorReply) or not isinstance(reply, HistoryReply):
            text = reply.text if isinstance(reply, ErrorReply) else "an unexpected reply"
            self._say(f"could not catch up from the archive: {text} (imcli history shows what you missed)")
            return
        if reply.more:
            # a full page: one cut to the broker's payload limit was followed to the next (all_history)
            self._say(f"more than {CATCH_UP_LIMIT} messages arrived while away; the newest follow (imcli history)")
        for item in reply.messages:
            if item.kind not in ("room", "dm", "group"):
                continue  # the archive keeps chat lines only: a notice or an event is not one of its answers
            if item.kind == "room" and self._rooms and item.room not in self._rooms:
                continue
            self._inbox.put((item, True))

    def _say(self, text: str) -> None:
        self._inbox.put((Received(kind="notice", id=new_id(), ts=time.time(), text=text), False))

    def _beat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat):
            if self._client.connected:
                self._client.publish_nowait(self._status_topic, self._status(), qos=1, retain=True)
