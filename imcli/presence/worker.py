"""The presence worker: device statuses in, one retained presence record per user out.

It reads ``<prefix>/status/<user>/<device>``, keeps ``<prefix>/presence/<user>`` and
``<prefix>/profile/<user>`` (retained), announces join/leave/rename on ``<prefix>/events`` and
answers ``resolve``, ``who``, ``rename``, ``profile_set`` and ``profile_get``. Its state lives
in retained messages (see ``imcli.core.service`` for the restart procedure); devices that stop
their heartbeat without a Last Will expire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.service import AccountDirectory, ServiceWorker
from imcli.core.wire import (
    WHO_PAGE_MAX,
    DeviceRequest,
    DeviceStatus,
    ErrorReply,
    Presence,
    Profile,
    ProfileGet,
    ProfileList,
    ProfileSet,
    RenameRequest,
    Resolved,
    ResolveRequest,
    Roster,
    Topic,
    TopicKind,
    Topics,
    WhoRequest,
    WireModel,
    decode_as,
    encode,
    most_that_fit,
)
from imcli.presence.profiles import ProfileBook
from imcli.presence.roster import Effects, PresenceRoster


class PresenceWorker(ServiceWorker):
    """``with PresenceWorker(...):`` syncs from retained state, then serves until left."""

    requests = (ResolveRequest, WhoRequest, RenameRequest, ProfileSet, ProfileGet, DeviceRequest)

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        directory: AccountDirectory | None = None,
        topics: Topics | None = None,
        device: str = "worker",
        expiry_period: float = 1.0,
        clock: Callable[[], float] = time.time,
        max_payload: int | None = None,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock)
        self.max_payload = max_payload  # imcli workers --max-payload; imcli serve: None (its workers pass)
        self.roster = PresenceRoster(directory)
        self.profiles = ProfileBook()
        self._expiry_period = expiry_period
        self._expiry = threading.Thread(target=self._expire_loop, name="presence-expiry", daemon=True)

    def state_filters(self) -> list[str]:
        return [self.topics.presence_filter(), self.topics.status_filter(), self.topics.profile_filter()]

    def recoverable_filters(self) -> list[str]:
        # all three are retained: a status (its heartbeat and its Will too) that changed while away comes
        # back with the renewed subscription, and one cleared meanwhile is told by its absence
        # (``on_resynced``); presence records and profiles are our own, read only at the first sync
        return self.state_filters()

    def started(self) -> None:
        self._expiry.start()

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self._expiry.is_alive():
            self._expiry.join(5)
        super().__exit__(*exc)

    def on_state(self, topic: Topic, payload: bytes) -> None:
        if topic.kind is TopicKind.STATUS and topic.sender and topic.key:
            self._on_status(topic.sender, topic.key, payload)
        elif topic.kind is TopicKind.PRESENCE and not self.synced.is_set() and payload:
            self.roster.load_presence(decode_as(payload, Presence))  # after sync: our own records
        elif topic.kind is TopicKind.PROFILE and not self.synced.is_set() and payload:
            record = decode_as(payload, Profile)
            if record.account == topic.owner:
                self.profiles.load(record)

    def _on_status(self, user: str, device: str, payload: bytes) -> None:
        now = self.clock()
        if not payload:
            self._apply(self.roster.device_gone(user, device, now))
        else:
            self._apply(self.roster.device_seen(user, device, decode_as(payload, DeviceStatus), now))

    def on_synced(self) -> None:
        self._apply(self.roster.finish_sync(self.clock()))

    def on_reconnected(self) -> None:
        self.roster.begin_resync()
        for record in self.roster.records():
            self.publish(self.topics.presence(record.account), encode(record), retain=True)
        for profile in self.profiles.records():
            self.publish(self.topics.profile(profile.account), encode(profile), retain=True)

    def on_resynced(self) -> None:
        self._apply(self.roster.finish_resync(self.clock()))

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if isinstance(request, ResolveRequest):
            account = self.roster.resolve(request.name.strip().removeprefix("@"))
            if account is not None:
                return Resolved(id=request.id, account=account, nick=self.roster.nick_of(account))
            return ErrorReply(id=request.id, code="not_found", text=f"unknown user {request.name!r}")
        if isinstance(request, WhoRequest):
            after = request.after or ""
            listed = [u for u in self.roster.who(include_offline=request.all) if u.account > after]
            listed.sort(key=lambda u: u.account)  # pages by account: a rename between pages moves nobody
            limit = request.limit or WHO_PAGE_MAX
            return Roster(id=request.id, users=listed[:limit], more=len(listed) > limit)
        if isinstance(request, RenameRequest):
            reply, effects = self.roster.rename(sender, request.nick, request.id, self.clock())
            self._apply(effects)
            return reply
        if isinstance(request, ProfileSet):
            return self._set_profile(sender, request)
        if isinstance(request, ProfileGet):
            users = [u for u in dict.fromkeys(request.users) if self.roster.known(u)]
            return ProfileList(id=request.id, profiles=[self.profiles.get(u, self.roster.nick_of(u)) for u in users])
        if isinstance(request, DeviceRequest):  # the embedded broker answers these itself, before any worker
            text = "this broker does not issue device credentials (Mosquitto, NATS: deploy/mosquitto/README.md)"
            return ErrorReply(id=request.id, code="unsupported", text=text)
        return None

    def fit(self, reply: WireModel, limit: int) -> WireModel:
        """A ``who`` page or a ``profile_get`` answer past the broker's limit keeps its first users
        (``more``: the asker asks again for the rest): everyone online, each with up to 200 device names,
        and friends' profiles with their avatars' thumbnails grow them past any limit, and Mosquitto
        dropped them, so ``who`` and ``friend list`` went unanswered (tests/test_presence.py)."""
        if isinstance(reply, Roster):
            users = reply.users

            def roster(n: int) -> Roster:
                return Roster(id=reply.id, users=users[:n], more=n < len(users) or reply.more)

            return roster(max(1, most_that_fit(len(users), lambda n: len(encode(roster(n))) <= limit)))
        if isinstance(reply, ProfileList):
            profiles = reply.profiles

            def listed(n: int) -> ProfileList:
                return ProfileList(id=reply.id, profiles=profiles[:n], more=n < len(profiles) or reply.more)

            return listed(max(1, most_that_fit(len(profiles), lambda n: len(encode(listed(n))) <= limit)))
        return reply

    def _set_profile(self, sender: str, request: ProfileSet) -> WireModel:
        """The sender's own profile, the only one a request can change (the broker checked the sender)."""
        refusal = self.profiles.check(request)
        if refusal is not None:
            return refusal
        now = self.clock()
        if request.name is not None:
            reply, effects = self.roster.rename(sender, request.name, request.id, now)
            if isinstance(reply, ErrorReply):
                return reply
            self._apply(effects)
        elif not self.roster.known(sender):
            self._apply(self.roster.rename(sender, sender, request.id, now)[1])  # on the roster from now on
        profile = self.profiles.apply(sender, self.roster.nick_of(sender), request, now)
        self.publish(self.topics.profile(sender), encode(profile), retain=True)
        return ProfileList(id=request.id, profiles=[profile])

    def _apply(self, effects: Effects) -> None:
        t = self.topics
        for record in effects.presence:
            self.publish(t.presence(record.account), encode(record), retain=True)
            profile = self.profiles.renamed(record.account, record.nick, self.clock())
            if profile is not None:
                self.publish(t.profile(record.account), encode(profile), retain=True)
        for event in effects.events:
            self.publish(t.events(), encode(event))
        for user, device in effects.clear_status:
            self.publish(t.status(user, device), b"", retain=True)

    def _expire_loop(self) -> None:
        while not self.stopping.wait(self._expiry_period):
            with self.lock:
                self._apply(self.roster.expire(self.clock()))
