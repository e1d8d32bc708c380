"""The topic contract in the standard library alone: names, topics, and the chat line.

This is the half of the wire format that needs no pydantic: account, room and group names,
every topic builder and the topic parser, and :func:`chat_line`, the bytes of a chat
message for senders that must start fast (``imcli say``, issue 7). :mod:`imcli.core.wire`
re-exports all of it beside the payload models; import from there unless start-up time
matters. No other module builds a topic string.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Final

from imcli.core.errors import InvalidInput
from imcli.core.rules import SERVICE_ACCOUNTS
from imcli.core.text import quoted

PROTOCOL_VERSION: Final = 1
DEFAULT_PREFIX = "im"
DEFAULT_ROOM = "lobby"
DEFAULT_MAX_PAYLOAD = 16 * 1024
# the embedded broker's limit on one chunk of a file (upload topics), its 8-byte header included: 16 times
# fewer publishes than chunks at DEFAULT_MAX_PAYLOAD, while chat keeps to DEFAULT_MAX_PAYLOAD (issue 16)
DEFAULT_MAX_CHUNK = 256 * 1024

NAME_RULE = "1-32 characters: lowercase letters, digits, '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DEVICE = re.compile(r"[a-z0-9][a-z0-9_.~-]{0,47}")  # '~' (and '.', before it): <device>~<session>
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}(/[a-z0-9][a-z0-9_-]{0,31}){0,3}")

# Reserved: the workers' service accounts and words that would confuse people or tools.
RESERVED_NAMES = frozenset({*SERVICE_ACCOUNTS, "admin", "root", "system", "imcli", "register", "everyone", "all", "me"})


def is_name(value: str) -> bool:
    """Whether ``value`` is a valid account, room or group name."""
    return _NAME.fullmatch(value) is not None


def check_name(value: str, what: str = "account name") -> str:
    """Return ``value`` if it is a valid name, else raise ``InvalidInput`` stating the rule."""
    if not is_name(value):
        raise InvalidInput(f"invalid {what} {quoted(value)}", NAME_RULE)
    return value


def status_level(session: str) -> str:
    """The status topic level of a session name: ``<device>.<session>`` becomes ``<device>~<session>``.
    NATS maps '.' in an MQTT topic to its subject separator and refuses a topic holding one (a Last
    Will too: the CONNECT is refused), so a status level never has a '.' (older clients' may)."""
    return session.replace(".", "~")


def device_of_status(level: str) -> str:
    """The device a status level belongs to: ``<device>``, ``<device>~<session>`` or ``<device>.<session>``."""
    return re.split(r"[.~]", level, maxsplit=1)[0]


def is_device(value: str) -> bool:
    return _DEVICE.fullmatch(value) is not None


def is_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def new_id() -> str:
    return uuid.uuid4().hex


def device_client_id(account: str, device: str) -> str:
    """The client id of ``account``'s ``device`` (``alice:laptop``): the broker lets only ``account`` use it."""
    return f"{account}:{device}"


def client_id_account(client_id: str) -> str:
    """The account a client id belongs to: ``alice`` for ``alice`` and ``alice:laptop``."""
    return client_id.split(":", 1)[0]


def chat_line(text: str, *, message_id: str | None = None, ts: float | None = None) -> bytes:
    """The JSON of a chat message (``imcli.core.wire.ChatMessage``) without pydantic.

    ``imcli say`` sends with this so that it starts without building the payload models
    (issue 7); the bytes are the same as ``wire.encode(ChatMessage(...))``, which
    tests/test_properties.py checks for any text. It does not validate: the caller passes
    non-empty text that encodes to UTF-8.
    """
    fields = {
        "type": "chat",
        "v": PROTOCOL_VERSION,
        "id": message_id or new_id(),
        "ts": time.time() if ts is None else ts,
    }
    return json.dumps({**fields, "text": text}, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- topics


class TopicKind(enum.StrEnum):
    ROOM = "room"
    DM = "dm"
    SENT = "sent"  # the broker's copy of a DM for the sender's other devices (issue 17)
    REPLY = "reply"
    NOTICE = "notice"
    FRIENDS = "friends"
    GROUP_MSG = "group_msg"
    GROUP_INFO = "group_info"
    STATUS = "status"
    PRESENCE = "presence"
    REQUEST = "request"
    EVENTS = "events"
    PROFILE = "profile"
    UPLOAD = "upload"  # a file's bytes, sender -> files worker (issue 16)
    FETCH = "fetch"  # a download's acknowledgements, receiver -> files worker
    FILE_DATA = "file_data"  # a download's bytes, files worker -> receiver


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic of the contract.

    ``owner`` is the user whose private subtree the topic is in (the DM recipient, the
    ``<me>`` of reply/notice), ``sender`` is the level the broker checks against the
    username (``<from>``, the status/request user), ``name`` is the room or group, and
    ``key`` is the correlation id or device.
    """

    kind: TopicKind
    sender: str | None = None
    owner: str | None = None
    name: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics under one prefix (``im`` unless configured)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if _PREFIX.fullmatch(self.prefix) is None:
            raise InvalidInput(f"invalid topic prefix {quoted(self.prefix)}", "use lowercase words joined by '/'")

    # builders: every argument is checked, so a built topic is always one the parser accepts
    def room(self, room: str, sender: str) -> str:
        return f"{self.prefix}/room/{_n(room)}/{_n(sender)}"

    def room_filter(self, room: str | None = None) -> str:
        return f"{self.prefix}/room/{_n(room) if room else '+'}/+"

    def dm(self, to: str, sender: str) -> str:
        return f"{self.prefix}/user/{_n(to)}/dm/{_n(sender)}"

    def dm_filter(self, to: str | None = None) -> str:
        """DMs to ``to``, or every direct message (the archive's subscription; a user may read only its own)."""
        return f"{self.prefix}/user/{_n(to) if to else '+'}/dm/+"

    def sent(self, me: str, to: str) -> str:
        """The copy of ``me``'s DM to ``to`` that the broker delivers to ``me``'s own devices."""
        return f"{self.prefix}/user/{_n(me)}/sent/{_n(to)}"

    def user_filter(self, me: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/#"

    def inbox_filters(self, me: str) -> list[str]:
        """What a reader of ``me``'s conversations (``listen``, ``chat``) subscribes to under
        ``<prefix>/user/<me>/``: DMs, its own DMs from other devices, replies, notices, the friends
        record; not ``user_filter``'s ``#``, which takes in every download's bytes (``file/<stream>``)
        to every device, and queues them for each one away."""
        user = f"{self.prefix}/user/{_n(me)}"
        return [f"{user}/dm/+", f"{user}/sent/+", f"{user}/reply/+", f"{user}/notice", f"{user}/friends"]

    def reply(self, me: str, corr: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/reply/{_i(corr)}"

    def reply_filter(self, me: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/reply/+"

    def notice(self, me: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/notice"

    def friends(self, me: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/friends"

    def friends_filter(self) -> str:
        return f"{self.prefix}/user/+/friends"

    def request(self, sender: str, corr: str) -> str:
        return f"{self.prefix}/request/{_n(sender)}/{_i(corr)}"

    def request_filter(self) -> str:
        return f"{self.prefix}/request/+/+"

    def status(self, user: str, device: str) -> str:
        if not is_device(device):
            raise InvalidInput(
                f"invalid device name {quoted(device)}", "letters, digits, '_' or '-'; imcli login picks one itself"
            )
        return f"{self.prefix}/status/{_n(user)}/{device}"

    def sync(self, service: str) -> str:
        """Where a worker sends its own sync barrier (its notice topic)."""
        return self.notice(service)

    def status_filter(self) -> str:
        return f"{self.prefix}/status/+/+"

    def presence(self, user: str) -> str:
        return f"{self.prefix}/presence/{_n(user)}"

    def presence_filter(self) -> str:
        return f"{self.prefix}/presence/+"

    def events(self) -> str:
        return f"{self.prefix}/events"

    def profile(self, user: str) -> str:
        """A user's public profile (retained; written by the presence worker, for its owner only)."""
        return f"{self.prefix}/profile/{_n(user)}"

    def profile_filter(self) -> str:
        return f"{self.prefix}/profile/+"

    def group_msg(self, group: str, sender: str) -> str:
        return f"{self.prefix}/group/{_n(group)}/msg/{_n(sender)}"

    def group_info(self, group: str) -> str:
        return f"{self.prefix}/group/{_n(group)}/info"

    def group_msg_filter(self, group: str | None = None) -> str:
        return f"{self.prefix}/group/{_n(group) if group else '+'}/msg/+"

    def group_info_filter(self) -> str:
        return f"{self.prefix}/group/+/info"

    # files (issue 16): the bytes travel beside the request/reply topics, in chunks (``chunk``)
    def upload(self, sender: str, upload: str) -> str:
        return f"{self.prefix}/upload/{_n(sender)}/{_i(upload)}"

    def upload_filter(self) -> str:
        return f"{self.prefix}/upload/+/+"

    def fetch(self, sender: str, stream: str) -> str:
        return f"{self.prefix}/fetch/{_n(sender)}/{_i(stream)}"

    def fetch_filter(self) -> str:
        return f"{self.prefix}/fetch/+/+"

    def file_data(self, me: str, stream: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/file/{_i(stream)}"

    def file_data_filter(self, me: str) -> str:
        return f"{self.prefix}/user/{_n(me)}/file/+"

    def parse(self, topic: str) -> Topic | None:
        """Parse a concrete topic (no wildcards); ``None`` if it is not part of the contract."""
        if len(topic) > PARSE_CACHED_UP_TO:
            return _parse(self.prefix, topic)
        return _parse_cached(self.prefix, topic)


# The embedded broker parses a publish's topic for its checks, its journal and its fan-out, and a
# conversation's topics recur line after line (issue 21: four parses of each chat line were 8 % of
# the broker's CPU for it). A parse is a pure function of the prefix and the topic, and a ``Topic`` is
# frozen, so its result can be shared. Bounded: the least recently used go first, and a topic longer
# than any of the contract's (a prefix of four levels and three of 64 characters) is parsed each time,
# so a flood of long made-up topics costs no memory (it fails the parse anyway).
PARSE_CACHE = 8192
PARSE_CACHED_UP_TO = 400


def _parse(prefix: str, topic: str) -> Topic | None:
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    match levels:
        case ["room", room, sender] if is_name(room) and is_name(sender):
            return Topic(TopicKind.ROOM, sender=sender, name=room)
        case ["user", owner, *rest] if is_name(owner):
            return _user_topic(owner, rest)
        case ["group", group, "msg", sender] if is_name(group) and is_name(sender):
            return Topic(TopicKind.GROUP_MSG, sender=sender, name=group)
        case ["group", group, "info"] if is_name(group):
            return Topic(TopicKind.GROUP_INFO, name=group)
        case ["status", user, device] if is_name(user) and is_device(device):
            return Topic(TopicKind.STATUS, sender=user, key=device)
        case ["presence", user] if is_name(user):
            return Topic(TopicKind.PRESENCE, owner=user)
        case ["profile", user] if is_name(user):
            return Topic(TopicKind.PROFILE, owner=user)
        case ["request", sender, corr] if is_name(sender) and is_id(corr):
            return Topic(TopicKind.REQUEST, sender=sender, key=corr)
        case ["events"]:
            return Topic(TopicKind.EVENTS)
    return _file_topic(levels)


_parse_cached = functools.lru_cache(maxsize=PARSE_CACHE)(_parse)


def _file_topic(levels: list[str]) -> Topic | None:
    """The topics of a file's bytes (issue 16), or ``None`` (``<prefix>/user/<me>/file/<stream>``: ``_user_topic``)."""
    match levels:
        case ["upload", sender, upload] if is_name(sender) and is_id(upload):
            return Topic(TopicKind.UPLOAD, sender=sender, key=upload)
        case ["fetch", sender, stream] if is_name(sender) and is_id(stream):
            return Topic(TopicKind.FETCH, sender=sender, key=stream)
    return None


# --------------------------------------------------------------------------- file chunks

CHUNK_HEADER: Final = 8  # a chunk is the big-endian offset of its first byte (8 bytes), then the bytes


def chunk(offset: int, data: bytes) -> bytes:
    """One chunk of a file as it travels on an upload or file-data topic."""
    return offset.to_bytes(CHUNK_HEADER, "big") + data


def unchunk(payload: bytes) -> tuple[int, bytes]:
    """The offset and bytes of a chunk; ``ValueError`` if it is too short to be one."""
    if len(payload) < CHUNK_HEADER:
        raise ValueError("a chunk is at least its 8-byte offset")
    return int.from_bytes(payload[:CHUNK_HEADER], "big"), payload[CHUNK_HEADER:]


def chunk_size(max_payload: int) -> int:
    """Bytes of a file per chunk, so that a chunk's payload is within ``max_payload``."""
    return max_payload - CHUNK_HEADER


def _user_topic(owner: str, rest: list[str]) -> Topic | None:
    """A topic of ``<prefix>/user/<owner>/…``."""
    match rest:
        case ["dm", sender] if is_name(sender):
            return Topic(TopicKind.DM, sender=sender, owner=owner)
        case ["sent", to] if is_name(to):
            return Topic(TopicKind.SENT, sender=owner, owner=to)
        case ["reply", corr] if is_id(corr):
            return Topic(TopicKind.REPLY, owner=owner, key=corr)
        case ["notice"]:
            return Topic(TopicKind.NOTICE, owner=owner)
        case ["friends"]:
            return Topic(TopicKind.FRIENDS, owner=owner)
        case ["file", stream] if is_id(stream):  # a file's bytes, streamed to its reader (issue 16)
            return Topic(TopicKind.FILE_DATA, owner=owner, key=stream)
    return None


def _n(value: str) -> str:
    return check_name(value, "name")


def _i(value: str) -> str:
    if not is_id(value):
        raise InvalidInput(f"invalid id {quoted(value)}", "ids are made by imcli; use the one it printed")
    return value
