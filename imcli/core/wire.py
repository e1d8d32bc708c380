"""The wire format: every topic and every payload imcli puts on MQTT.

This module is the single source of truth for names, topics and payloads. It imports
neither paho, Rich nor Typer, so the broker plugins, the workers and the CLI share it.
No other module builds a topic string or encodes JSON for the wire. The names and topics
live in :mod:`imcli.core.topics` (standard library only, for ``imcli say``'s start-up) and are
re-exported here; the payload models are below.

The sender of anything is a topic level that the broker checks against the
authenticated username; payloads carry no trusted ``from`` field.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from imcli.core.names import DISPLAY_NAME_RULE, is_display_name
from imcli.core.rules import DmPolicy
from imcli.core.thumbnail import small_thumbnail

# The names and topics: imcli.core.topics has them; the `noqa` ones are re-exported, since the rest
# of imcli imports everything of the wire format from here.
from imcli.core.topics import (
    _ID,
    DEFAULT_MAX_PAYLOAD,  # noqa: F401
    DEFAULT_PREFIX,  # noqa: F401
    DEFAULT_ROOM,  # noqa: F401
    NAME_RULE,  # noqa: F401
    PROTOCOL_VERSION,
    RESERVED_NAMES,  # noqa: F401
    Topic,
    TopicKind,
    Topics,  # noqa: F401
    check_name,  # noqa: F401
    client_id_account,  # noqa: F401
    device_client_id,  # noqa: F401
    device_of_status,  # noqa: F401
    is_device,  # noqa: F401
    is_id,  # noqa: F401
    is_name,  # noqa: F401
    new_id,
    status_level,  # noqa: F401
)

# --------------------------------------------------------------------------- payloads


class WireModel(BaseModel):
    # schemas are built on first use, so a command pays only for the models it touches (issue 7)
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


MessageId = Annotated[str, Field(pattern=f"^{_ID.pattern}$")]
# a time as it travels (seconds since the epoch): a sender's own clock, so bounded by what every
# reader can show (the end of year 9999, datetime's and time.localtime's range): `"ts": 1e308`
# or `Infinity` from a raw client ended every listener's `imcli listen` with an OverflowError
MAX_TIMESTAMP = 253402300799.0
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)]


FILE_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
FILE_NAME_MAX = 255
THUMB_MAX = 9000  # characters of a thumbnail's base64 (about 6.6 KiB of JPEG): a file message fits 16 KiB
MAX_NOTICE_REQUESTS = 400  # requests one aggregated rate notice names at most (it fits 16 KiB)
MIME_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # the images the files worker recognises


def _file_thumb(value: str) -> str:
    if not small_thumbnail(value):
        raise ValueError("not a thumbnail the files worker makes (a JPEG of at most 320 pixels a side)")
    return value


def _avatar_thumb(value: str) -> str:
    if value and not small_thumbnail(value, ("jpeg", "png")):
        raise ValueError("not a thumbnail (a PNG or JPEG of at most 320 pixels a side)")
    return value


class FileInfo(WireModel):
    """A stored file as the files worker describes it (issue 16): in a file message, a listing, a reply.

    ``id`` is the worker's, unguessable; who may fetch it is decided by the conversation it was
    sent to (``place``: ``lobby``, ``@bob`` seen from the sender, ``#team``), never by the id.
    ``thumb`` is a small JPEG of an image (base64), made once by the worker.
    """

    type: Literal["file"] = "file"
    v: Literal[1] = PROTOCOL_VERSION
    id: Annotated[str, Field(pattern=f"^{FILE_ID.pattern}$")]
    name: Annotated[str, Field(min_length=1, max_length=FILE_NAME_MAX)]
    size: Annotated[int, Field(ge=1)]
    mime: Annotated[str, Field(max_length=100)] = "application/octet-stream"
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    sender: str | None = None  # listings: who sent it
    place: str | None = None  # listings: where (room, @user, #group)
    ts: Timestamp | None = None  # listings: when the worker stored it
    width: Annotated[int, Field(ge=1)] | None = None
    height: Annotated[int, Field(ge=1)] | None = None
    thumb: Annotated[str, Field(max_length=THUMB_MAX), AfterValidator(_file_thumb)] | None = None


class ChatMessage(WireModel):
    """A room, direct or group message. The sender is the topic's ``<from>`` level.

    A file message (issue 16) carries ``file`` beside a ``text`` that says the same in words,
    so a client that knows nothing of files still shows something true.
    """

    type: Literal["chat"] = "chat"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    ts: Timestamp = Field(default_factory=time.time)
    text: Annotated[str, Field(min_length=1)]
    file: FileInfo | None = None
    # Accepted for bots that send one, never trusted: the topic's <from> level is the sender.
    claimed_from: str | None = Field(default=None, alias="from", exclude=True)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Notice(WireModel):
    """The broker or a worker tells one user something (``<prefix>/user/<me>/notice``)."""

    type: Literal["notice"] = "notice"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    ts: Timestamp = Field(default_factory=time.time)
    code: str
    text: str
    topic: str | None = None
    # a ``rate`` notice: seconds until the broker accepts a message of this account again
    retry: Annotated[float, Field(ge=0, le=86400)] | None = None
    # an aggregated ``rate`` notice: the correlation ids of more requests dropped (the embedded
    # broker names one a second per account)
    requests: Annotated[list[MessageId], Field(max_length=MAX_NOTICE_REQUESTS)] | None = None


class ResolveRequest(WireModel):
    """Ask a worker which account a name (account or nickname) is."""

    type: Literal["resolve"] = "resolve"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    name: str


class Resolved(WireModel):
    type: Literal["resolved"] = "resolved"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    account: str
    nick: str | None = None  # the account's display name, when the worker knows it


class ErrorReply(WireModel):
    """A worker's refusal of a request; ``code`` is stable, ``text`` is for people."""

    type: Literal["error"] = "error"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    code: Literal["not_found", "invalid", "denied", "taken", "internal", "unsupported"]
    text: str
    hint: str | None = None  # what to do, when the worker knows better than the asker's generic hint


# a nickname is a display name: any script (imcli.core.names); the wire keeps the old field names
NICK_RULE = DISPLAY_NAME_RULE
DEFAULT_HEARTBEAT = 30.0
HEARTBEAT_RANGE = (1.0, 3600.0)  # seconds a device may choose between two statuses


def is_nick(value: str) -> bool:
    return is_display_name(value)


class DeviceStatus(WireModel):
    """A device says it is online (retained on ``<prefix>/status/<user>/<device>``).

    It repeats this every ``interval`` seconds; a device not heard for 2.5 intervals is
    gone. An empty retained payload (the Last Will, or a clean exit) clears the device.
    """

    type: Literal["status"] = "status"
    v: Literal[1] = PROTOCOL_VERSION
    state: Literal["online", "offline"] = "online"
    interval: Annotated[float, Field(ge=HEARTBEAT_RANGE[0], le=HEARTBEAT_RANGE[1])] = DEFAULT_HEARTBEAT
    ts: Timestamp = Field(default_factory=time.time)


class Presence(WireModel):
    """One user's aggregate presence (retained on ``<prefix>/presence/<user>``, worker only)."""

    type: Literal["presence"] = "presence"
    v: Literal[1] = PROTOCOL_VERSION
    account: str
    nick: str
    state: Literal["online", "offline"]
    since: float  # online since, or offline since (last seen)
    devices: Annotated[int, Field(ge=0)] = 0  # statuses (a device running chat and listen has two)
    device_names: list[str] = Field(default_factory=list)  # its online devices by name (issue 17), sorted


class Event(WireModel):
    """Join, leave and rename, broadcast on ``<prefix>/events`` by the presence worker."""

    type: Literal["event"] = "event"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    ts: Timestamp = Field(default_factory=time.time)
    event: Literal["join", "leave", "rename", "device_join", "device_leave"]
    account: str
    nick: str
    old_nick: str | None = None
    device: str | None = None  # device_join, device_leave: a device of a user online on others too


WHO_PAGE_MAX = 1000  # users in one ``roster``
GROUPS_PAGE_MAX = 500  # groups in one ``group_list``


class WhoRequest(WireModel):
    """Who is online (``all``: every account): a page of at most ``limit`` users by account name,
    those after ``after``; the reply says ``more`` if the next page has some."""

    type: Literal["who"] = "who"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    all: bool = False
    after: str | None = None
    limit: Annotated[int, Field(ge=1, le=WHO_PAGE_MAX)] | None = None  # None: WHO_PAGE_MAX


class Roster(WireModel):
    """A page of ``who``, by account name; ``more``: ask again with ``after`` the last one's account
    (the count, or the broker's payload limit, which Mosquitto applies to the workers too, cut it)."""

    type: Literal["roster"] = "roster"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    users: list[Presence]
    more: bool = False


DeviceOp = Literal["issue", "list", "revoke", "passwd", "token"]


class DeviceRequest(WireModel):
    """A request about the asker's own devices and tokens (issue 17), answered by the broker
    itself (``imcli serve``), never by a worker: it holds the device records.

    ``issue`` (a connection that logged in with the account password only): a credential for
    the device ``name``; ``token``: the same for a bot, listed as a token; ``list``; ``revoke``
    ``name``; ``passwd`` (password login only): ``password`` becomes the account's password,
    and with ``revoke_others`` every device but ``name`` is revoked.
    """

    type: Literal["device_request"] = "device_request"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    op: DeviceOp
    name: str | None = None
    password: str | None = Field(default=None, repr=False)
    revoke_others: bool = False


class DeviceInfo(WireModel):
    name: str
    kind: Literal["device", "token"] = "device"
    created: Timestamp
    last_seen: Timestamp | None = None
    online: bool = False


class DeviceReply(WireModel):
    type: Literal["device_reply"] = "device_reply"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    devices: list[DeviceInfo] = Field(default_factory=list)
    credential: str | None = Field(default=None, repr=False)  # ``issue`` and ``token``: shown once
    revoked: list[str] = Field(default_factory=list)


class RenameRequest(WireModel):
    type: Literal["rename"] = "rename"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    nick: str


class Renamed(WireModel):
    type: Literal["renamed"] = "renamed"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    nick: str


SIGNATURE_MAX = 120  # characters: one line under a name
ABOUT_MAX = 1000
THUMBNAIL_MAX = 12 * 1024  # bytes of base64: the profile record carries the avatar's thumbnail


class Avatar(WireModel):
    """A profile picture: the full image is a file (issue 16's files), its small thumbnail is here."""

    file: Annotated[str, Field(pattern=f"^{_ID.pattern}$")]
    media_type: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    # base64 of a small PNG or JPEG (imcli.core.thumbnail: anything larger is refused)
    thumbnail: Annotated[str, Field(max_length=THUMBNAIL_MAX), AfterValidator(_avatar_thumb)] = ""


class Profile(WireModel):
    """A user's public profile (retained on ``<prefix>/profile/<user>``, written by the presence
    worker only, each for its owner: a ``profile_set`` request from that account)."""

    type: Literal["profile"] = "profile"
    v: Literal[1] = PROTOCOL_VERSION
    account: str
    name: str  # the display name, as in the presence record's ``nick``
    signature: Annotated[str, Field(max_length=SIGNATURE_MAX)] = ""
    about: Annotated[str, Field(max_length=ABOUT_MAX)] = ""
    avatar: Avatar | None = None
    updated: Timestamp = 0.0
    # why the record's avatar was left out as it was decoded ("" if it was not), and the avatar as it
    # came: not fields, and not shown, but sent on as it came (the presence worker's replies)
    _avatar_refused: str = PrivateAttr(default="")
    _avatar_as_sent: Any = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _without_a_refused_avatar(cls, data: Any, handler: ModelWrapValidatorHandler[Profile]) -> Profile:
        """A profile whose avatar alone is refused (a record stored before the thumbnail bound, with a
        larger one) is read without it, and says why, instead of the whole profile being malformed;
        encoded again (the presence worker answering from its records) it carries the avatar as it came,
        so each reader says why in turn."""
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors()
            if not isinstance(data, dict) or not all(e["loc"][:1] == ("avatar",) for e in errors):
                raise
            profile = handler({k: v for k, v in data.items() if k != "avatar"})
            profile._avatar_refused = errors[0]["msg"].removeprefix("Value error, ")
            profile._avatar_as_sent = data["avatar"]
            return profile

    @model_serializer(mode="wrap")
    def _with_the_avatar_as_sent(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        out = handler(self)
        # unless set since (a new avatar, or none: model_copy) or left out by the caller
        again = self._avatar_as_sent is not None and "avatar" not in self.model_fields_set
        if again and isinstance(out, dict) and "avatar" not in (info.exclude or ()):
            out["avatar"] = self._avatar_as_sent
        return out

    @property
    def avatar_refused(self) -> str:
        return self._avatar_refused


class ProfileSet(WireModel):
    """Change my profile: each field given is set (``""`` clears a text); the sender is the owner."""

    type: Literal["profile_set"] = "profile_set"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    name: str | None = None
    signature: str | None = None
    about: str | None = None
    avatar: Avatar | None = None
    clear_avatar: bool = False


class ProfileGet(WireModel):
    """Ask for the profiles of some accounts (at most ``PROFILES_MAX``)."""

    type: Literal["profile_get"] = "profile_get"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    users: Annotated[list[str], Field(max_length=1000)]


class ProfileList(WireModel):
    """Profiles in the order asked (unknown accounts left out); ``more``: those asked after the last
    one here were left out (the broker's payload limit): ask for them again."""

    type: Literal["profile_list"] = "profile_list"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    profiles: list[Profile]
    more: bool = False


# --------------------------------------------------------------------------- moments (issue 18)

MOMENT_TEXT_MAX = 2000
MOMENT_IMAGES_MAX = 9
COMMENT_TEXT_MAX = 500
MOMENTS_PAGE_MAX = 100
ImageRef = Avatar  # an image that is a file of the files worker, with its thumbnail


class MomentComment(WireModel):
    id: MessageId
    author: str
    ts: Timestamp
    text: str


class Moment(WireModel):
    """One post of a user's moments, as the moments worker shows it to someone who may see it."""

    type: Literal["moment"] = "moment"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId
    author: str
    ts: Timestamp
    text: str = ""
    images: list[ImageRef] = Field(default_factory=list)
    likes: list[str] = Field(default_factory=list)
    comments: list[MomentComment] = Field(default_factory=list)


MomentOp = Literal["post", "feed", "like", "unlike", "comment", "delete"]


class MomentRequest(WireModel):
    """Ask the moments worker; the sender (the request topic's ``<from>``) is the one who posts,
    likes, comments, deletes or reads."""

    type: Literal["moment_request"] = "moment_request"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    op: MomentOp
    post: str | None = None  # like, unlike, comment, delete: the moment's id
    text: str | None = None  # post, comment
    images: Annotated[list[ImageRef], Field(max_length=MOMENT_IMAGES_MAX)] = Field(default_factory=list)
    user: str | None = None  # feed: one author's moments (none: friends' and my own)
    limit: Annotated[int, Field(ge=1, le=MOMENTS_PAGE_MAX)] = 20
    before: Timestamp | None = None  # feed: older than this (paging)


class MomentReply(WireModel):
    """Moments newest first (``feed``), or the one moment a request made or changed (none: deleted)."""

    type: Literal["moment_reply"] = "moment_reply"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    moments: list[Moment]
    more: bool = False


class GroupInfo(WireModel):
    """A group's state (retained on ``<prefix>/group/<group>/info``, written by the group worker).

    The embedded broker reads it too: membership in it is what the topic ACL enforces.
    """

    type: Literal["group"] = "group"
    v: Literal[1] = PROTOCOL_VERSION
    name: str
    owner: str
    admins: list[str]
    members: list[str]  # everyone, owner and admins included
    private: bool = False
    created: float
    removed: list[str] | None = None  # kicked and not invited back since: ``join`` refuses them (newest last)


GroupOp = Literal["create", "join", "leave", "invite", "kick", "promote", "members", "list"]


class GroupRequest(WireModel):
    type: Literal["group_request"] = "group_request"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    op: GroupOp
    group: str = ""
    user: str | None = None  # invite, kick, promote
    private: bool = False  # create
    after: str | None = None  # list: the groups whose names sort after this one (paging)
    limit: Annotated[int, Field(ge=1, le=GROUPS_PAGE_MAX)] | None = None  # list: groups in a page (None: the most)


class GroupReply(WireModel):
    type: Literal["group_reply"] = "group_reply"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    group: GroupInfo | None = None  # None when the request deleted it (the last member left)


class GroupList(WireModel):
    type: Literal["group_list"] = "group_list"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    mine: list[GroupInfo]
    public: list[GroupInfo]  # public groups I am not in
    # a page of both, by name: ask again ``after`` the last name of either list (the count, or the
    # broker's payload limit, which Mosquitto applies to the workers too, cut it)
    more: bool = False


class Friends(WireModel):
    """One user's friends, pending requests and DM policy (retained on ``<prefix>/user/<me>/friends``).

    Written by the group worker, readable by its owner only; the embedded broker reads it
    to enforce ``dm_policy``.
    """

    type: Literal["friends"] = "friends"
    v: Literal[1] = PROTOCOL_VERSION
    account: str
    friends: list[str] = Field(default_factory=list)
    incoming: list[str] = Field(default_factory=list)  # asked me, waiting for my answer
    outgoing: list[str] = Field(default_factory=list)  # I asked, waiting for theirs
    dm_policy: DmPolicy = "anyone"


FriendOp = Literal["add", "accept", "decline", "remove", "list", "policy", "can_dm"]


class FriendRequest(WireModel):
    type: Literal["friend_request"] = "friend_request"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    op: FriendOp
    user: str | None = None
    dm_policy: DmPolicy | None = None


class FriendReply(WireModel):
    type: Literal["friend_reply"] = "friend_reply"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    record: Friends
    allowed: bool | None = None  # can_dm: may I send a direct message to that user?


class SyncMarker(WireModel):
    """A worker's own barrier message: once it arrives, the retained state before it has too."""

    type: Literal["sync"] = "sync"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)


HISTORY_MAX = 1000


class HistoryRequest(WireModel):
    """Ask the archive worker for past messages; the requester is the request topic's sender.

    At most one of ``room``, ``user`` (a direct conversation with that account) and
    ``group``; none of them asks for everything the requester may read (catching up).
    """

    type: Literal["history"] = "history"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    room: str | None = None
    user: str | None = None
    group: str | None = None
    since: Timestamp | None = None  # archive time, inclusive
    before: Timestamp | None = None  # archive time, exclusive
    limit: Annotated[int, Field(ge=1, le=HISTORY_MAX)] = 50


class Received(WireModel):
    """One line of ``imcli listen``: what arrived, from whom, where (also its ``--json`` form)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["room", "dm", "group", "notice", "event", "malformed"]
    sender: str | None = Field(default=None, alias="from")
    nick: str | None = None  # chat lines: the sender's display name if it differs; events: always
    to: str | None = None
    to_nick: str | None = None  # direct messages: the recipient's display name if it differs
    room: str | None = None
    group: str | None = None
    id: str
    ts: Timestamp
    text: str
    format: Literal["json", "text"] = "json"
    missed: bool | None = None  # arrived while the reader was away (queued, or fetched from the archive)
    file: FileInfo | None = None  # a file message (issue 16)
    # a history reply's: when the archive stored it, by its own clock. ``ts`` is the sender's word and
    # may be anything (a raw client's 0): the next older page is asked ``before`` the oldest ``at``
    at: Timestamp | None = None

    def to_json(self) -> str:
        # ASCII only: U+2028, U+2029, NEL and bidi controls pass through JSON unescaped, and some
        # line readers (Python's splitlines, JavaScript before ES2019) or terminals act on them
        return self.model_dump_json(by_alias=True, exclude_none=True, ensure_ascii=True)


class HistoryReply(WireModel):
    """The newest ``limit`` matching messages, oldest first; ``more`` if older ones were left out."""

    type: Literal["history_reply"] = "history_reply"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    messages: list[Received]
    more: bool = False


# --------------------------------------------------------------------------- files (issue 16)

FileTarget = Literal["room", "user", "group"]


class FileOffer(WireModel):
    """Ask the files worker to take a file for a conversation (one of ``room``, ``user``, ``group``),
    or for ``moments``: the sender's own account, an image of its moments (issue 18) that only the
    sender and the sender's current friends may fetch.

    The answer is a ``file_upload`` (send the bytes from ``offset``: 0, or where an earlier
    attempt of the same sender, content and conversation stopped), a ``file_ready`` if that
    very upload was finished before, or an error that says which limit refused it.
    """

    type: Literal["file_offer"] = "file_offer"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    name: Annotated[str, Field(min_length=1, max_length=FILE_NAME_MAX)]
    size: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    room: str | None = None
    user: str | None = None
    group: str | None = None
    moments: str | None = None  # an image of the sender's own moments: the sender and its friends read it


class FileUpload(WireModel):
    """Send the bytes on ``<prefix>/upload/<me>/<upload>`` from ``offset``, ``chunk`` bytes a chunk."""

    type: Literal["file_upload"] = "file_upload"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    upload: MessageId
    offset: Annotated[int, Field(ge=0)]
    chunk: Annotated[int, Field(ge=1)]
    window: Annotated[int, Field(ge=1)]  # bytes the sender may have sent beyond the last progress


class FileProgress(WireModel):
    """The worker holds an upload's bytes up to ``offset`` (on ``<prefix>/user/<me>/reply/<upload>``)."""

    type: Literal["file_progress"] = "file_progress"
    v: Literal[1] = PROTOCOL_VERSION
    upload: MessageId
    offset: Annotated[int, Field(ge=0)]


class FileReady(WireModel):
    """A file stored and verified (sha256): the end of an upload, or the answer to ``file_get``."""

    type: Literal["file_ready"] = "file_ready"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    file: FileInfo


class FileGet(WireModel):
    """Fetch a file from ``offset``; the bytes come on ``<prefix>/user/<me>/file/<stream>`` as
    the receiver acknowledges them on ``<prefix>/fetch/<me>/<stream>`` (``FileAck``)."""

    type: Literal["file_get"] = "file_get"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    file: Annotated[str, Field(max_length=64)]
    stream: MessageId = Field(default_factory=new_id)
    offset: Annotated[int, Field(ge=0)] = 0


class FileAck(WireModel):
    """A receiver has a download's bytes up to ``offset``: the worker sends up to a window beyond."""

    type: Literal["file_ack"] = "file_ack"
    v: Literal[1] = PROTOCOL_VERSION
    offset: Annotated[int, Field(ge=0)]


class FileListRequest(WireModel):
    """The files the requester may fetch: of one conversation (or one friend's moments), or of
    all it may read."""

    type: Literal["file_list"] = "file_list"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    room: str | None = None
    user: str | None = None
    group: str | None = None
    moments: str | None = None
    limit: Annotated[int, Field(ge=1, le=HISTORY_MAX)] = 100


class FileListing(WireModel):
    """Oldest first, without thumbnails; ``more`` if older ones were left out (the limit, or the
    broker's payload limit, which Mosquitto applies to the workers too)."""

    type: Literal["file_listing"] = "file_listing"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    files: list[FileInfo]
    more: bool = False


class FileDelete(WireModel):
    """Delete a file one sent: gone from every listing, and its content removed once no file
    refers to it any more. Only the sender may; any other id answers ``not_found``."""

    type: Literal["file_delete"] = "file_delete"
    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId = Field(default_factory=new_id)
    file: Annotated[str, Field(max_length=64)]


class FileDeleted(WireModel):
    """The answer to ``file_delete``: ``content`` says whether its bytes were removed too (no other
    file, of anyone, has the same content)."""

    type: Literal["file_deleted"] = "file_deleted"
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    file: str
    name: str
    content: bool


Payload = Annotated[
    ChatMessage
    | Notice
    | ResolveRequest
    | Resolved
    | ErrorReply
    | DeviceStatus
    | Presence
    | Event
    | WhoRequest
    | Roster
    | RenameRequest
    | Renamed
    | DeviceRequest
    | DeviceReply
    | GroupInfo
    | GroupRequest
    | GroupReply
    | GroupList
    | Friends
    | FriendRequest
    | FriendReply
    | SyncMarker
    | HistoryRequest
    | HistoryReply
    | Profile
    | ProfileSet
    | ProfileGet
    | ProfileList
    | Moment
    | MomentRequest
    | MomentReply
    | FileInfo
    | FileOffer
    | FileUpload
    | FileProgress
    | FileReady
    | FileGet
    | FileAck
    | FileListRequest
    | FileListing
    | FileDelete
    | FileDeleted,
    Field(discriminator="type"),
]
_PAYLOAD: TypeAdapter[Payload] = TypeAdapter(Payload, config=ConfigDict(defer_build=True))


def build_schemas() -> None:
    """Build every payload model's validator now, for a long-running process (the broker, a worker).

    ``defer_build`` lets a command pay only for the models it touches (issue 7); a server would
    otherwise build them in the middle of the first message that needs one: the union of every
    payload, built by the first typed chat message the journal decodes (a file's message), took
    19 ms of the embedded broker's event loop, once per start, during its first file transfer
    (``python -m benchmarks.filestail``, issue 16). All of them take about 50 ms here."""
    _PAYLOAD.rebuild()
    models: list[type[WireModel]] = [WireModel]
    while models:
        model = models.pop()
        model.model_rebuild()
        models.extend(model.__subclasses__())


_M = TypeVar("_M", bound=WireModel)


class MalformedPayload(ValueError):
    """A payload that is neither one of our models nor (on chat topics) plain UTF-8 text."""


def encode(model: WireModel) -> bytes:
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()


def decode(data: bytes) -> Payload:
    """Decode one of our JSON payloads; raise ``MalformedPayload`` on anything else."""
    try:
        return _PAYLOAD.validate_json(data)
    except ValidationError as exc:
        raise MalformedPayload(_first_error(exc)) from exc


def decode_as(data: bytes, kind: type[_M]) -> _M:
    """Decode a payload that must be a ``kind``; any other model is malformed here too."""
    payload = decode(data)
    if not isinstance(payload, kind):
        raise MalformedPayload(f"a {payload.type!r} payload where a {kind.__name__} belongs")
    return payload


def decode_chat(data: bytes) -> tuple[ChatMessage, bool]:
    """Decode a chat-topic payload, accepting plain UTF-8 text from bots.

    Returns the message and whether it arrived as plain text. A JSON object with a
    ``type`` member must be a valid ``ChatMessage``; anything else that is valid UTF-8
    is a text message (a bot's ``mosquitto_pub -m 'hi'``).
    """
    if b"type" not in data and b"\\u" not in data:
        # no member can be named "type" (a name is "type" only as those bytes or with a \u escape):
        # whatever JSON it holds, it is a bot's text, as below. A bot's `{"sent": ...}` went through a
        # validation that failed (building its error and a default id) and a JSON parse: about 20 us
        # of the broker's loop per line, the room ping's own (issue 16, ninth session)
        return _text(data), True
    if data[:1] == b"{":  # what imcli's clients send: one validation, no JSON parse beside it (issue 21)
        try:
            chat = ChatMessage.model_validate_json(data)
        except ValidationError:
            chat = None  # anything else is decided below, as it always was
        if chat is not None and "type" in chat.model_fields_set:  # without "type" it is text (below)
            return chat, False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload("not valid UTF-8") from exc
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # `{"text":[[[…` nested past Python's stack: text, as any non-JSON
            obj = None
        if isinstance(obj, dict) and "type" in obj:
            return decode_as(data, ChatMessage), False
    return _text(data, text), True


def _text(data: bytes, text: str | None = None) -> ChatMessage:
    """A bot's plain text (``data``, or ``text`` decoded from it already) as a chat message."""
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPayload("not valid UTF-8") from exc
    if not text.strip():
        raise MalformedPayload("empty text")
    return ChatMessage(text=text)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


# --------------------------------------------------------------------------- what clients show


def chat_received(parsed: Topic, payload: bytes) -> Received:
    """A room, direct or group message; ``MalformedPayload`` if it is not one."""
    chat, plain = decode_chat(payload)
    common = {"id": chat.id, "ts": chat.ts, "text": chat.text, "format": "text" if plain else "json", "file": chat.file}
    if parsed.kind is TopicKind.ROOM:
        return Received(kind="room", sender=parsed.sender, room=parsed.name, **common)
    if parsed.kind is TopicKind.GROUP_MSG:
        return Received(kind="group", sender=parsed.sender, group=parsed.name, **common)
    if parsed.kind in (TopicKind.DM, TopicKind.SENT):  # SENT: my own DM, from another of my devices
        return Received(kind="dm", sender=parsed.sender, to=parsed.owner, **common)
    raise MalformedPayload(f"not a chat topic: {parsed.kind}")


def most_that_fit(top: int, fits: Callable[[int], bool]) -> int:
    """The largest n in 0..top for which ``fits(n)``, which holds for every smaller n too; 0 if none (a
    page of a reply cut to the broker's payload limit: ``ServiceWorker.fit``)."""
    low, high = 0, top
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
