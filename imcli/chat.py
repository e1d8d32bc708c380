"""Client services: accounts, sending, request/reply and listening. No Typer, no Rich.

Every function takes what it needs (address, credentials, topics) explicitly, so bots
and tests can call them without the CLI.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from imcli.errors import (
    AccountError,
    AuthenticationFailed,
    ImcliError,
    InvalidInput,
    NameTaken,
    NotAllowed,
    NotFound,
    RequestTimeout,
)
from imcli.mqtt import BrokerAddress, ConnectionListener, Credentials, Message, MqttClient, Will
from imcli.wire import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_PAYLOAD,
    NICK_RULE,
    ChatMessage,
    DeviceStatus,
    DmPolicy,
    ErrorReply,
    Event,
    FriendOp,
    FriendReply,
    FriendRequest,
    Friends,
    GroupList,
    GroupOp,
    GroupReply,
    GroupRequest,
    MalformedPayload,
    Notice,
    Payload,
    Presence,
    Received,
    Renamed,
    RenameRequest,
    Resolved,
    ResolveRequest,
    Roster,
    TopicKind,
    Topics,
    WhoRequest,
    WireModel,
    check_name,
    decode,
    decode_as,
    decode_chat,
    encode,
    is_nick,
    new_id,
)

_R = TypeVar("_R")

REGISTER_PREFIX = "register:"
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Identity:
    """Who is talking to which broker, from which device."""

    address: BrokerAddress
    credentials: Credentials
    device: str
    topics: Topics = field(default_factory=Topics)

    @property
    def account(self) -> str:
        return self.credentials.username

    def client_id(self, purpose: str | None = None) -> str:
        """``<account>:<device>``; one-shot commands add a random suffix so they never take
        over (or flap) the device's long-lived session."""
        suffix = f"-{purpose}{secrets.token_hex(3)}" if purpose else ""
        return f"{self.account}:{self.device}{suffix}"


# ---------------------------------------------------------------- accounts


def register(address: BrokerAddress, name: str, password: str) -> None:
    """Create an account on a broker with open registration."""
    check_name(name)
    creds = Credentials(REGISTER_PREFIX + name, password)
    try:
        with MqttClient(address, creds, REGISTER_PREFIX + name):
            pass
    except AuthenticationFailed as exc:
        if exc.code == 4:
            raise NameTaken(f"cannot register {name!r}: the name is taken or reserved", "choose another name") from exc
        if exc.code == 5:
            raise AccountError(
                "registration is closed on this broker", "ask its operator to run 'imcli admin user add NAME'"
            ) from exc
        raise


def verify_login(address: BrokerAddress, credentials: Credentials, device: str) -> None:
    """Connect once to check the credentials."""
    try:
        with MqttClient(address, credentials, f"{credentials.username}:{device}-login{secrets.token_hex(3)}"):
            pass
    except AuthenticationFailed as exc:
        if exc.code == 4:
            raise AuthenticationFailed(
                "wrong account name or password",
                "check both, or create the account with 'imcli register NAME'",
                code=4,
            ) from exc
        if exc.code == 5:  # Mosquitto's answer to a wrong password; ours beyond --max-connections
            raise AuthenticationFailed(
                f"the broker did not let {credentials.username} in (not authorized)",
                "check the name and password; close other sessions if the broker limits connections",
                code=5,
            ) from exc
        raise


# ---------------------------------------------------------------- sending


def prepare_text(text: str, max_payload: int = DEFAULT_MAX_PAYLOAD) -> ChatMessage:
    """Build the message for ``text``, refusing empty and over-long ones before sending."""
    if text.endswith("\n"):
        text = text[:-1]  # `echo hi | imcli say -` sends "hi"
    if not text.strip():
        raise InvalidInput("empty message", "type some text, or pipe it in with '-'")
    message = ChatMessage(text=text)
    size = len(encode(message))
    if size > max_payload:
        raise InvalidInput(
            f"message too long: {size} bytes encoded, the limit is {max_payload}",
            "split it into several messages",
        )
    return message


def say(identity: Identity, room: str, message: ChatMessage) -> None:
    topic = identity.topics.room(check_name(room, "room name"), identity.account)
    with MqttClient(identity.address, identity.credentials, identity.client_id("say")) as client:
        client.publish(topic, encode(message), qos=1)


def send_dm(identity: Identity, name: str, message: ChatMessage) -> str:
    """Resolve ``name`` (account or nickname) and send; returns the recipient's account."""
    with MqttClient(identity.address, identity.credentials, identity.client_id("dm")) as client:
        requests = Requests(client, identity)
        to = resolve(requests, name)
        # the broker would drop a refused DM silently (the PUBACK comes anyway): ask first
        check = expect(requests.ask(FriendRequest(op="can_dm", user=to)), FriendReply)
        if not check.allowed:
            raise NotAllowed(f"{to} accepts direct messages from friends only", f"ask first: imcli friend add {to}")
        client.publish(identity.topics.dm(to, identity.account), encode(message), qos=1)
    return to


def friend_request(
    identity: Identity, op: FriendOp, user: str | None = None, policy: DmPolicy | None = None
) -> Friends:
    if user is not None:
        check_name(user.removeprefix("@"))
    request = FriendRequest(op=op, user=user, dm_policy=policy)
    with MqttClient(identity.address, identity.credentials, identity.client_id("friend")) as client:
        return expect(Requests(client, identity).ask(request), FriendReply).record


def resolve(requests: Requests, name: str) -> str:
    wanted = name.removeprefix("@").strip()
    if not wanted:
        raise InvalidInput("empty recipient name")
    reply = requests.ask(ResolveRequest(name=wanted))
    if isinstance(reply, ErrorReply) and reply.code == "not_found":
        raise NotFound(f"unknown recipient {wanted!r}", "check the name with 'imcli who --all'")
    return expect(reply, Resolved).account


def who(identity: Identity, include_offline: bool = False) -> list[Presence]:
    with MqttClient(identity.address, identity.credentials, identity.client_id("who")) as client:
        reply = Requests(client, identity).ask(WhoRequest(all=include_offline))
    return expect(reply, Roster).users


def rename(identity: Identity, nick: str) -> str:
    if not is_nick(nick):
        raise InvalidInput(f"invalid nickname {nick!r}", NICK_RULE)
    with MqttClient(identity.address, identity.credentials, identity.client_id("nick")) as client:
        reply = Requests(client, identity).ask(RenameRequest(nick=nick))
    if isinstance(reply, ErrorReply) and reply.code == "taken":
        raise NameTaken(f"the nickname {nick!r} is taken", "choose another one")
    return expect(reply, Renamed).nick


_ERRORS: dict[str, type[ImcliError]] = {
    "not_found": NotFound,
    "taken": NameTaken,
    "invalid": InvalidInput,
    "denied": NotAllowed,
}


def group_request(
    identity: Identity, op: GroupOp, group: str = "", user: str | None = None, private: bool = False
) -> GroupReply | GroupList:
    if op != "list":
        check_name(group, "group name")
    request = GroupRequest(op=op, group=group, user=user, private=private)
    with MqttClient(identity.address, identity.credentials, identity.client_id("group")) as client:
        reply = Requests(client, identity).ask(request)
    if isinstance(reply, GroupList):
        return reply
    return expect(reply, GroupReply)


def group_say(identity: Identity, group: str, message: ChatMessage) -> None:
    """Send to a group, after checking membership (the broker would drop it silently)."""
    check_name(group, "group name")
    with MqttClient(identity.address, identity.credentials, identity.client_id("gsay")) as client:
        reply = expect(Requests(client, identity).ask(GroupRequest(op="members", group=group)), GroupReply)
        if reply.group is None or identity.account not in reply.group.members:
            raise NotAllowed(f"you are not a member of &{group}", f"join it first: imcli group join {group}")
        client.publish(identity.topics.group_msg(group, identity.account), encode(message), qos=1)


def expect(reply: Payload, kind: type[_R]) -> _R:
    """The reply if it is a ``kind``; a worker's refusal becomes the matching error."""
    if isinstance(reply, kind):
        return reply
    if isinstance(reply, ErrorReply):
        raise _ERRORS.get(reply.code, ImcliError)(reply.text)
    raise ImcliError(f"a worker answered with an unexpected {reply.type!r}")


# ---------------------------------------------------------------- request / reply


class Requests:
    """Request/reply without MQTT 5: subscribe to our reply topic, publish, wait."""

    def __init__(self, client: MqttClient, identity: Identity, timeout: float = REQUEST_TIMEOUT) -> None:
        self._client = client
        self._identity = identity
        self._timeout = timeout
        self._subscribed = False

    def ask(self, request: WireModel) -> Payload:
        topics, me = self._identity.topics, self._identity.account
        if not self._subscribed:
            self._client.subscribe([topics.reply_filter(me)])
            self._subscribed = True
        corr = new_id()
        self._client.publish(topics.request(me, corr), encode(request), qos=1)
        deadline = time.monotonic() + self._timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._client.get(timeout=left)
            if msg is None:
                break
            parsed = topics.parse(msg.topic)
            if parsed is None or parsed.kind is not TopicKind.REPLY or parsed.key != corr:
                continue
            try:
                return decode(msg.payload)
            except MalformedPayload as exc:
                raise ImcliError(f"a worker sent a malformed reply: {exc}") from exc
        raise RequestTimeout(
            f"no worker answered within {self._timeout:g}s",
            "is the presence worker running? 'imcli serve' starts it",
        )


# ---------------------------------------------------------------- receiving


class RecentIds:
    """Message ids seen lately: QoS 1 is at-least-once, so duplicates are dropped here."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def seen(self, message_id: str) -> bool:
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return False


def to_received(topics: Topics, message: Message) -> Received | None:
    """What a client shows for one MQTT message; ``None`` for topics it does not display."""
    parsed = topics.parse(message.topic)
    if parsed is None or parsed.kind not in (
        TopicKind.ROOM,
        TopicKind.DM,
        TopicKind.GROUP_MSG,
        TopicKind.NOTICE,
        TopicKind.EVENTS,
    ):
        return None
    if parsed.kind is TopicKind.EVENTS:
        try:
            event = decode_as(message.payload, Event)
        except MalformedPayload as exc:
            return _malformed(message, exc)
        return Received(
            kind="event",
            sender=event.account,
            nick=event.nick,
            id=event.id,
            ts=event.ts,
            text=event_text(event),
        )
    if parsed.kind is TopicKind.NOTICE:
        try:
            notice = decode_as(message.payload, Notice)
        except MalformedPayload as exc:
            return _malformed(message, exc)
        return Received(kind="notice", id=notice.id, ts=notice.ts, text=notice.text)
    try:
        chat, plain = decode_chat(message.payload)
    except MalformedPayload as exc:
        return _malformed(message, exc, sender=parsed.sender)
    common = {"id": chat.id, "ts": chat.ts, "text": chat.text, "format": "text" if plain else "json"}
    if parsed.kind is TopicKind.ROOM:
        return Received(kind="room", sender=parsed.sender, room=parsed.name, **common)
    if parsed.kind is TopicKind.GROUP_MSG:
        return Received(kind="group", sender=parsed.sender, group=parsed.name, **common)
    return Received(kind="dm", sender=parsed.sender, to=parsed.owner, **common)


def event_text(event: Event) -> str:
    if event.event == "rename":
        return f"{event.old_nick} is now known as {event.nick}"
    who = event.nick if event.nick == event.account else f"{event.nick} ({event.account})"
    return f"{who} is {'online' if event.event == 'join' else 'offline'}"


def _malformed(message: Message, exc: Exception, sender: str | None = None) -> Received:
    return Received(kind="malformed", sender=sender, id=new_id(), ts=time.time(), text=f"{message.topic}: {exc}")


class Listener:
    """Rooms, direct messages, notices and events as they arrive; reconnects by itself.

    While it runs, the device is online: a retained status on
    ``<prefix>/status/<me>/<device>`` repeated every ``heartbeat`` seconds, an empty
    retained Last Will that clears it if the process dies, and a clear on a clean exit.
    ``with Listener(identity) as l: for item in l: ...``
    """

    def __init__(
        self,
        identity: Identity,
        rooms: list[str] | None = None,
        on_connection: ConnectionListener | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        self.identity = identity
        topics = identity.topics
        room_filters = (
            [topics.room_filter(check_name(r, "room name")) for r in rooms] if rooms else [topics.room_filter()]
        )
        self._filters = [
            *room_filters,
            topics.user_filter(identity.account),
            topics.group_msg_filter(),  # every group: the broker delivers only my groups' messages
            topics.presence_filter(),
            topics.events(),
        ]
        client_id = identity.client_id("listen")
        self._status_topic = topics.status(identity.account, client_id.split(":", 1)[1])
        self._heartbeat = heartbeat
        self._user_on_connection = on_connection
        self._client = MqttClient(
            identity.address,
            identity.credentials,
            client_id,
            reconnect=True,
            will=Will(self._status_topic, b"", qos=1, retain=True),
            on_connection=self._connection_changed,
        )
        self._seen = RecentIds()
        self._nicks: dict[str, str] = {}
        self._requests_shown: set[str] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="imcli-heartbeat", daemon=True)

    def __enter__(self) -> Listener:
        self._client.connect()
        try:
            self._client.subscribe(self._filters)
            self._client.publish(self._status_topic, self._status(), qos=1, retain=True)
        except ImcliError:
            self._client.close()
            raise
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Say offline (clear the device's status) and disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._client.connected:
            # if the broker is gone, the Last Will or the worker's expiry says offline instead
            with contextlib.suppress(ImcliError):
                self._client.publish(self._status_topic, b"", qos=1, retain=True)
        self._client.close()

    def _status(self) -> bytes:
        return encode(DeviceStatus(interval=self._heartbeat))

    def _connection_changed(self, up: bool) -> None:
        if up:  # paho's thread: announce again without waiting
            self._client.publish_nowait(self._status_topic, self._status(), qos=1, retain=True)
        if self._user_on_connection is not None:
            self._user_on_connection(up)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat):
            if self._client.connected:
                self._client.publish_nowait(self._status_topic, self._status(), qos=1, retain=True)

    def __iter__(self) -> Iterator[Received]:
        topics = self.identity.topics
        while not self._stop.is_set():
            if self._client.fatal is not None:
                raise self._client.fatal
            message = self._client.get(timeout=0.5)
            if message is None:
                continue
            parsed = topics.parse(message.topic)
            if parsed is not None and parsed.kind is TopicKind.PRESENCE:
                self._remember_nick(message.payload)
                continue
            if parsed is not None and parsed.kind is TopicKind.FRIENDS:
                yield from self._new_requests(message.payload)
                continue
            item = to_received(topics, message)
            if item is None or (item.kind != "malformed" and self._seen.seen(item.id)):
                continue
            if item.kind == "event" and item.sender and item.nick:
                self._nicks[item.sender] = item.nick
            elif item.sender and self._nicks.get(item.sender, item.sender) != item.sender:
                item = item.model_copy(update={"nick": self._nicks[item.sender]})
            yield item

    def _new_requests(self, payload: bytes) -> Iterator[Received]:
        """Friend requests waiting in my retained record: they reach me even if I was offline."""
        try:
            record = decode_as(payload, Friends)
        except MalformedPayload:
            return
        self._requests_shown &= set(record.incoming)  # a request asked again after a decline shows again
        for asker in record.incoming:
            if asker not in self._requests_shown:
                self._requests_shown.add(asker)
                text = f"{asker} wants to be your friend (imcli friend accept {asker})"
                yield Received(kind="notice", sender=asker, id=new_id(), ts=time.time(), text=text)

    def _remember_nick(self, payload: bytes) -> None:
        try:
            record = decode_as(payload, Presence)
        except MalformedPayload:
            return
        self._nicks[record.account] = record.nick
