"""Client services: accounts, sending, request/reply and listening. No Typer, no Rich.

Every function takes what it needs (address, credentials, topics) explicitly, so bots
and tests can call them without the CLI.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Literal, TypeVar

from imcli.client.identity import Identity, listen_session
from imcli.client.pages import all_groups, all_history, all_profiles, all_users
from imcli.client.send import check_size, clean_text, publish_to_room
from imcli.core.errors import (
    AccountError,
    AuthenticationFailed,
    ImcliError,
    InvalidInput,
    NameTaken,
    NotAllowed,
    NotFound,
    RequestTimeout,
)
from imcli.core.mqtt import SUBSCRIBE_TRIES, BrokerAddress, Credentials, Message, MqttClient
from imcli.core.names import clean_display_name
from imcli.core.request_reply import Asker, RequestClient
from imcli.core.rules import REGISTER_PREFIX, dm_refusal
from imcli.core.text import quoted
from imcli.core.wire import (
    DEFAULT_MAX_PAYLOAD,
    HISTORY_MAX,
    NICK_RULE,
    Avatar,
    ChatMessage,
    DmPolicy,
    ErrorReply,
    FriendOp,
    FriendReply,
    FriendRequest,
    Friends,
    GroupList,
    GroupOp,
    GroupReply,
    GroupRequest,
    HistoryReply,
    HistoryRequest,
    Payload,
    Presence,
    Profile,
    ProfileList,
    ProfileSet,
    Received,
    Renamed,
    RenameRequest,
    Resolved,
    ResolveRequest,
    Roster,
    WireModel,
    check_name,
    device_client_id,
    encode,
    is_name,
    is_nick,
)

_R = TypeVar("_R")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- accounts


# CONNACK 3 from imcli serve: its login throttle (imcli/broker/throttle.py); MQTT 3.1.1 has no room for a reason
_THROTTLED_HINT = "wait a minute or two and try again; each further failure doubles the wait (up to 15 min by default)"


def register(address: BrokerAddress, name: str, password: str, invite: str | None = None) -> None:
    """Create an account on a broker with open registration, or with an invite code.

    The code travels in the CONNECT's username, ``register:<name>:<code>`` (docs/PROTOCOL.md)."""
    check_name(name)
    if invite is not None and (not invite or not invite.isascii() or ":" in invite or not invite.isprintable()):
        raise InvalidInput("invalid invite code", "give the code 'imcli admin invite' printed")
    username = REGISTER_PREFIX + name + (f":{invite}" if invite else "")
    creds = Credentials(username, password)
    try:
        with MqttClient(address, creds, REGISTER_PREFIX + name):
            pass
    except AuthenticationFailed as exc:
        if exc.code == 3:
            raise AuthenticationFailed(
                "too many registrations or failed attempts from this address, or the broker is busy (code 3)",
                _THROTTLED_HINT,
                code=3,
            ) from exc
        if exc.code == 4:
            raise NameTaken(  # a CONNACK says no more: which name it looks like is in the broker's log
                f"cannot register {quoted(name)}: the name is taken or reserved, or looks like an account or display "
                "name in use (a1ice beside alice)",
                "choose another name",
            ) from exc
        if exc.code == 5 and invite:
            raise AccountError(
                "the invite code is wrong, used up or expired, or registration is closed on this broker (code 5)",
                "ask the broker's operator for a new code ('imcli admin invite')",
            ) from exc
        if exc.code == 5:
            raise AccountError(  # imcli serve --registration closed, or Mosquitto (no self-registration)
                "registration is closed on this broker, or needs an invite code (code 5)",
                "give --invite CODE if its operator gave you one, or ask them to make the account: "
                "'imcli admin user add NAME' for imcli serve, mosquitto_passwd for Mosquitto",
            ) from exc
        raise


def verify_login(address: BrokerAddress, credentials: Credentials, device: str) -> None:
    """Connect once to check the credentials."""
    try:
        with MqttClient(
            address, credentials, device_client_id(credentials.username, f"{device}.login{secrets.token_hex(3)}")
        ):
            pass
    except AuthenticationFailed as exc:
        if exc.code == 3:  # imcli serve's login throttle, or too many password checks at once
            raise AuthenticationFailed(
                "too many failed logins for this account or from this address, or the broker is busy (code 3)",
                _THROTTLED_HINT,
                code=3,
            ) from exc
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


def drop_device_sessions(address: BrokerAddress, credentials: Credentials, device: str) -> bool:
    """End the persistent sessions of ``imcli chat`` and ``listen`` on this device (a clean
    CONNECT with their client ids makes the broker forget them); ``False`` if unreachable."""
    for session in (device, listen_session(device)):
        try:
            with MqttClient(address, credentials, device_client_id(credentials.username, session), timeout=3.0):
                pass
        except AuthenticationFailed:
            return True  # the account is gone, and its sessions cannot be resumed
        except ImcliError:
            return False
    return True


# ---------------------------------------------------------------- sending


def prepare_text(text: str, max_payload: int = DEFAULT_MAX_PAYLOAD) -> ChatMessage:
    """Build the message for ``text``, refusing empty and over-long ones before sending."""
    message = ChatMessage(text=clean_text(text))
    check_size(len(encode(message)), max_payload, message.text)
    return message


def say(identity: Identity, room: str, message: ChatMessage) -> None:
    publish_to_room(identity, room, encode(message))


def send_dm(identity: Identity, name: str, message: ChatMessage) -> Resolved:
    """Resolve ``name`` (account or display name) and send; returns the recipient."""
    with Connection(identity, "dm") as connection:
        to = resolve_user(connection, name)
        check_can_dm(connection, to.account)
        connection.publish(identity.topics.dm(to.account, identity.account), encode(message))
    return to


def check_can_dm(asker: Asker, to: str) -> None:
    """The broker would drop a refused DM silently (the PUBACK comes anyway): ask first."""
    if not expect(asker.ask(FriendRequest(op="can_dm", user=to)), FriendReply).allowed:
        raise NotAllowed(dm_refusal(to), f"ask first: imcli friend add {to}")


def friend_request(
    identity: Identity, op: FriendOp, user: str | None = None, policy: DmPolicy | None = None
) -> Friends:
    """A friend operation; ``user`` is an account or display name. My record after it."""
    return friend_with(identity, op, user, policy)[0]


def friend_with(
    identity: Identity, op: FriendOp, user: str | None = None, policy: DmPolicy | None = None
) -> tuple[Friends, Resolved | None]:
    """``friend_request``, and whom ``user`` resolved to."""
    with Connection(identity, "friend") as connection:
        return ask_friend_with(connection, op, user, policy)


def ask_friend(asker: Asker, op: FriendOp, user: str | None = None, policy: DmPolicy | None = None) -> Friends:
    """A friend request over an open connection (``imcli chat``'s ``/friend``)."""
    return ask_friend_with(asker, op, user, policy)[0]


def ask_friend_with(
    asker: Asker, op: FriendOp, user: str | None = None, policy: DmPolicy | None = None
) -> tuple[Friends, Resolved | None]:
    """``ask_friend``, and whom ``user`` (an account or display name) resolved to."""
    other = resolve_user(asker, user) if user is not None else None
    request = FriendRequest(op=op, user=other.account if other else None, dm_policy=policy)
    return expect(asker.ask(request), FriendReply, _FRIEND_HINTS).record, other


def resolve(asker: Asker, name: str) -> str:
    """The account ``name`` means: an account name, or anyone's display name (``张三``, ``@Ally``)."""
    return resolve_user(asker, name).account


def resolve_user(asker: Asker, name: str) -> Resolved:
    """The one resolver of every command that takes a user: the presence worker's answer (the
    account and its display name) for an account or display name, with or without ``@``."""
    wanted = clean_display_name(name.removeprefix("@"))
    if not wanted:
        raise InvalidInput("empty user name", "give an account or display name")
    if not is_nick(wanted):
        raise InvalidInput(f"invalid user name {quoted(wanted)}", "give an account or display name")
    try:
        reply = asker.ask(ResolveRequest(name=wanted))
    except RequestTimeout:
        if is_name(wanted.lower()):  # no presence worker (a bare broker): an account name still means itself
            return Resolved(id="", account=wanted.lower())
        raise
    if isinstance(reply, ErrorReply) and reply.code == "not_found":
        raise NotFound(f"unknown user {quoted(wanted)}", "check the name with 'imcli who --all'")
    return expect(reply, Resolved)


def display_names(asker: Asker) -> dict[str, str]:
    """Every account's display name, as the presence worker has it (empty if none answers)."""
    try:
        return {u.account: u.nick for u in ask_who(asker, include_offline=True)}
    except RequestTimeout:
        return {}


def with_names(item: Received, names: dict[str, str]) -> Received:
    """A line from the archive with its sender's (and a DM's recipient's) display names filled in."""
    update: dict[str, str] = {}
    if item.sender and names.get(item.sender, item.sender) != item.sender and item.kind != "notice":
        update["nick"] = names[item.sender]
    if item.to and names.get(item.to, item.to) != item.to:
        update["to_nick"] = names[item.to]
    return item.model_copy(update=update) if update else item


def who(identity: Identity, include_offline: bool = False) -> list[Presence]:
    with Connection(identity, "who") as connection:
        return ask_who(connection, include_offline)


def ask_who(asker: Asker, include_offline: bool = False) -> list[Presence]:
    """Everyone online (or every account), every page of them (``pages``)."""
    return expect(all_users(asker.ask, include_offline), Roster).users


def rename(identity: Identity, nick: str) -> str:
    check_nick(nick)
    with Connection(identity, "nick") as connection:
        return ask_rename(connection, nick)


def check_nick(nick: str) -> str:
    nick = clean_display_name(nick)
    if not is_nick(nick):
        raise InvalidInput(f"invalid display name {quoted(nick)}", NICK_RULE)
    return nick


def ask_rename(asker: Asker, nick: str) -> str:
    reply = asker.ask(RenameRequest(nick=check_nick(nick)))
    if isinstance(reply, ErrorReply) and reply.code == "taken":
        raise NameTaken(f"the name {quoted(nick)} is taken (or looks like one that is)", "choose another one")
    return expect(reply, Renamed).nick


# ---------------------------------------------------------------- profiles


def set_profile(
    identity: Identity,
    *,
    name: str | None = None,
    signature: str | None = None,
    about: str | None = None,
    avatar: Avatar | None = None,
) -> Profile:
    """Change my own profile (the presence worker writes it, for me only); the profile after it."""
    if name is not None:
        name = check_nick(name)
    request = ProfileSet(name=name, signature=signature, about=about, avatar=avatar)
    if request.model_dump(exclude={"type", "v", "id"}, exclude_defaults=True) == {}:
        raise InvalidInput("nothing to change", "give --name, --signature, --about or --avatar")
    with Connection(identity, "profile") as connection:
        reply = connection.ask(request)
    if isinstance(reply, ErrorReply) and reply.code == "taken" and name is not None:
        raise NameTaken(f"the name {quoted(name)} is taken (or looks like one that is)", "choose another one")
    return expect(reply, ProfileList).profiles[0]


def ask_profiles(asker: Asker, accounts: list[str]) -> dict[str, Profile]:
    """The profiles of ``accounts`` (those that are users), by account."""
    if not accounts:
        return {}
    reply = expect(all_profiles(asker.ask, accounts), ProfileList)
    return {p.account: p for p in reply.profiles}


def profiles_of(identity: Identity, accounts: list[str]) -> dict[str, Profile] | None:
    """``ask_profiles`` on a connection of its own; None if no presence worker answers (the caller says
    so: a list without signatures is still worth showing, but not as if nobody had one)."""
    if not accounts:
        return {}
    try:
        with Connection(identity, "profile") as connection:
            return ask_profiles(connection, accounts)
    except RequestTimeout:
        return None


@dataclass(frozen=True)
class Whois:
    """What ``profile show`` and ``/whois`` tell about one user."""

    profile: Profile
    presence: Presence | None


def ask_whois(asker: Asker, name: str) -> Whois:
    account = resolve(asker, name)
    profile = ask_profiles(asker, [account]).get(account) or Profile(account=account, name=account)
    presence = next((u for u in ask_who(asker, include_offline=True) if u.account == account), None)
    return Whois(profile, presence)


def whois(identity: Identity, name: str | None = None) -> Whois:
    with Connection(identity, "profile") as connection:
        return ask_whois(connection, name or identity.account)


_ERRORS: dict[str, type[ImcliError]] = {
    "not_found": NotFound,
    "taken": NameTaken,
    "invalid": InvalidInput,
    "denied": NotAllowed,
}


def group_request(
    identity: Identity, op: GroupOp, group: str = "", user: str | None = None, private: bool = False
) -> GroupReply | GroupList:
    with Connection(identity, "group") as connection:
        return ask_group(connection, op, group, user, private)


def ask_group(
    asker: Asker, op: GroupOp, group: str = "", user: str | None = None, private: bool = False
) -> GroupReply | GroupList:
    """A group request over an open connection (``imcli chat``'s ``/join``, ``/invite``, …)."""
    if op != "list":
        check_name(group, "group name")
    account = resolve(asker, user) if user is not None else None
    if op == "list":  # every page of it (``pages``)
        reply = all_groups(asker.ask)
    else:
        reply = asker.ask(GroupRequest(op=op, group=group, user=account, private=private))
    if isinstance(reply, GroupList):
        return reply
    return expect(reply, GroupReply, _GROUP_HINTS)


def group_say(identity: Identity, group: str, message: ChatMessage) -> None:
    """Send to a group, after checking membership (the broker would drop it silently)."""
    check_name(group, "group name")
    with Connection(identity, "gsay") as connection:
        check_member(connection, group, identity.account)
        connection.publish(identity.topics.group_msg(group, identity.account), encode(message))


def check_member(asker: Asker, group: str, me: str) -> None:
    reply = expect(
        asker.ask(GroupRequest(op="members", group=check_name(group, "group name"))), GroupReply, _GROUP_HINTS
    )
    if reply.group is None or me not in reply.group.members:
        raise NotAllowed(f"you are not a member of #{group}", f"join it first: imcli group join {group}")


# ---------------------------------------------------------------- history


@dataclass(frozen=True)
class Conversation:
    """Where a line goes or comes from: a room (``lobby``), a person (``@bob``) or a group (``#team``)."""

    kind: Literal["room", "dm", "group"]
    name: str

    def __str__(self) -> str:
        return {"room": "", "dm": "@", "group": "#"}[self.kind] + self.name

    @classmethod
    def parse(cls, text: str) -> Conversation:
        text = text.strip()
        if text.startswith("@"):  # an account or display name (``@张三``): resolved where it is used
            name = clean_display_name(text[1:])
            if not is_nick(name):
                raise InvalidInput(f"invalid user name {quoted(name)}", "give an account or display name after @")
            return cls("dm", name)
        if text.startswith("#"):
            return cls("group", check_name(text[1:], "group name"))
        return cls("room", check_name(text, "room name"))

    @classmethod
    def of(cls, item: Received, me: str) -> Conversation | None:
        if item.kind == "room" and item.room:
            return cls("room", item.room)
        if item.kind == "group" and item.group:
            return cls("group", item.group)
        if item.kind == "dm" and item.sender and item.to:
            return cls("dm", item.to if item.sender == me else item.sender)
        return None


def history(
    identity: Identity,
    where: Conversation | None,
    limit: int = 50,
    since: float | None = None,
    before: float | None = None,
) -> HistoryReply:
    with Connection(identity, "history") as connection:
        return ask_history(connection, where, limit, since, before)


def ask_history(
    asker: Asker,
    where: Conversation | None,
    limit: int = 50,
    since: float | None = None,
    before: float | None = None,
) -> HistoryReply:
    """Past messages of one conversation, or (``where=None``) of everything I may read."""
    if not 1 <= limit <= HISTORY_MAX:
        raise InvalidInput(f"invalid limit {limit}", f"use 1-{HISTORY_MAX}")
    target: dict[str, str] = {}
    if where is not None:
        if where.kind == "dm":
            target["user"] = resolve(asker, where.name)
        else:
            target[where.kind] = where.name
    request = HistoryRequest(limit=limit, since=since, before=before, **target)
    try:
        page = expect(all_history(asker.ask, request), HistoryReply, _HISTORY_HINTS)
    except RequestTimeout as exc:
        raise RequestTimeout(
            "the archive did not answer", "history needs the archive worker, which 'imcli serve' runs"
        ) from exc
    if not page.messages:
        return page
    names = display_names(asker)
    return page.model_copy(update={"messages": [with_names(m, names) for m in page.messages]})


# what to do after a worker's refusal (its ErrorReply says what happened), by request and code
_GROUP_HINTS = {
    "not_found": "see the groups with 'imcli group list', the users with 'imcli who --all'",
    "taken": "choose another name",
    "denied": "ask the group's owner or an admin; 'imcli group members NAME' lists them",
    "invalid": "see the group with 'imcli group members NAME'",
}
_FRIEND_HINTS = {
    "not_found": "see your friends and requests with 'imcli friend list', the users with 'imcli who --all'",
    "invalid": "see your friends and requests with 'imcli friend list'",
}
MOMENT_HINTS = {
    "not_found": "see the moments you can see with 'imcli moments'",
    "denied": "see the moments you can see with 'imcli moments', your friends with 'imcli friend list'",
}
_HISTORY_HINTS = {
    "not_found": "see the groups with 'imcli group list'",
    "denied": "join the group first: imcli group join NAME",
    "invalid": "name one room, @person or #group",
}
_HINTS = {
    "not_found": "check the name with 'imcli who --all' or 'imcli group list'",
    "taken": "choose another name",
    "denied": "you may not do that here",
    "invalid": "check what you typed",
    "internal": "try again; the broker's log says what failed",
}


def expect(reply: Payload, kind: type[_R], hints: dict[str, str] | None = None) -> _R:
    """The reply if it is a ``kind``; a worker's refusal becomes the matching error, with what to do."""
    if isinstance(reply, kind):
        return reply
    if isinstance(reply, ErrorReply):
        hint = (
            reply.hint
            or (hints or {}).get(reply.code)
            or _HINTS.get(reply.code, "try again; the broker's log says more")
        )
        raise _ERRORS.get(reply.code, ImcliError)(reply.text, hint)
    raise ImcliError(
        f"a worker answered with an unexpected {quoted(reply.type)}", "is the broker's imcli the same version?"
    )


# ---------------------------------------------------------------- request / reply


class Connection:
    """A short-lived connection that asks the workers (``Asker``) and publishes.

    ``with Connection(identity, "dm") as c:`` connects as ``<me>:<device>-dm<random>`` and
    subscribes to the reply topic and the notice topic at QoS 0 (the embedded broker's ``rate``
    notice fails a dropped request at once), and to what a subclass adds (``_filters``) at QoS 1;
    the requests go through ``imcli.core.request_reply``, the same client the Listener uses on its
    long-lived connection. Replies at QoS 0: the connection is a clean session, so a reply lost
    with the connection is lost at QoS 1 as well (the request times out either way), while on NATS
    every QoS 1 subscription is a JetStream consumer, a three-replica Raft group made for each
    command and its replies delivered through it: under load that consumer was slow to be made or
    to deliver, and requests went unanswered for 15 s (deploy/nats/README.md).
    """

    def __init__(self, identity: Identity, purpose: str, timeout: float | None = None) -> None:
        self.requests = RequestClient(identity.topics, identity.account, self.publish, timeout, self._renew_replies)
        self._client = MqttClient(
            identity.address, identity.credentials, identity.client_id(purpose), on_message=self._route
        )

    def __enter__(self) -> Connection:
        self._client.connect()
        try:
            replies = self.requests.reply_filter()
            self._client.subscribe(
                [f for f in self._filters() if f != replies],
                at_most_once=[replies, self.requests.notice_topic],
                tries=SUBSCRIBE_TRIES,
            )
        except ImcliError:
            self._client.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def ask(self, request: WireModel) -> Payload:
        return self.requests.ask(request)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        self._client.publish(topic, payload, qos=1)

    def _filters(self) -> list[str]:
        return [self.requests.reply_filter()]

    def _renew_replies(self, reply: str) -> None:
        """Before a request is sent again: its reply's own topic subscribed too (QoS 0). On NATS each node tells
        the others of a subject's first subscriber (RS+); one told while the other node reloaded its users file
        can be lost there ("Unknown account" in its log), and a reload can leave the count of a node's own
        subscribers one too high, so subscribing the same filter again tells nobody (nats-server 2.9.10,
        docs/SCALING.md issue 20 eighth session). A subject no connection had is told afresh. Elsewhere it costs
        a SUBSCRIBE, and a reply may come twice (the first one counts). Not granted in time: sent again anyway."""
        try:
            self._client.subscribe([], at_most_once=[reply])
        except ImcliError as exc:
            log.info("the subscription to %s before a request's resend: %s", reply, exc)

    def _route(self, message: Message) -> None:  # paho's thread: nothing but replies and notices is subscribed
        self.requests.deliver(message)
