"""The group worker: answers ``group_request``s and ``friend_request``s, and keeps ``<prefix>/group/<g>/info`` retained.

The retained record is the group's only state: the broker reads it to enforce
membership, members read it, and a restarted worker reads it back before answering.
Members hear of changes on their notice topics.

On Mosquitto (``dynsec=True``) the worker also keeps the broker's dynamic-security roles in
step with its records (``groups.dynsec``), sending the commands before the records. On a
NATS cluster (``nats=NatsAuth(...)``) it rewrites the nodes' user permissions and reloads them
(``groups.natsauth``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from imcli.core.errors import RequestTimeout
from imcli.core.mqtt import BrokerAddress, Credentials, Message
from imcli.core.service import AccountDirectory, ServiceWorker
from imcli.core.wire import (
    FriendRequest,
    Friends,
    GroupInfo,
    GroupList,
    GroupRequest,
    Notice,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    decode_as,
    encode,
)
from imcli.groups import dynsec as dynsec_module
from imcli.groups.book import DEFAULT_CREATIONS_PER_MINUTE, DEFAULT_MAX_OWNED, GroupBook, fit_groups
from imcli.groups.friends import FriendBook
from imcli.groups.natsauth import NatsAuth

log = logging.getLogger(__name__)

DYNSEC_TIMEOUT = 10.0


class GroupWorker(ServiceWorker):
    requests = (FriendRequest, GroupRequest)

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        directory: AccountDirectory | None = None,
        topics: Topics | None = None,
        device: str = "worker",
        clock: Callable[[], float] = time.time,
        *,
        dynsec: bool = False,
        dm_readers: tuple[str, ...] = (),
        max_groups: int = DEFAULT_MAX_OWNED,
        group_rate: int = DEFAULT_CREATIONS_PER_MINUTE,
        nats: NatsAuth | None = None,
        max_payload: int | None = None,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock)
        self.max_payload = max_payload  # imcli workers --max-payload; imcli serve: None (its workers pass)
        # max_groups: groups one account owns; group_rate: groups it creates per minute (issue 15)
        self.friends = FriendBook(directory)
        self.book = GroupBook(
            directory, max_owned=max_groups, creations_per_minute=group_rate, may_invite=self.friends.may_add
        )
        self.mirror = dynsec_module.DynsecMirror(self.topics, dm_readers) if dynsec else None
        self._dynsec_answered = threading.Event()
        self.nats = nats
        self._leaver: tuple[str, list[tuple[str, bytes, bool]]] | None = None  # handle -> send_reply (NATS)
        if nats is not None:  # it answers a change once every node of ``address`` has it in force
            nats.attach(address, credentials)

    def state_filters(self) -> list[str]:
        mirror = [dynsec_module.RESPONSE_TOPIC] if self.mirror is not None else []
        return [self.topics.group_info_filter(), self.topics.friends_filter(), *mirror]

    def recoverable_filters(self) -> list[str]:
        # our own retained records, read at the first sync and ignored after it (``on_state``)
        return [self.topics.group_info_filter(), self.topics.friends_filter()]

    def on_state(self, topic: Topic, payload: bytes) -> None:
        if self.synced.is_set() or not payload:
            return  # after sync, records coming back are our own
        if topic.kind is TopicKind.GROUP_INFO:
            info = decode_as(payload, GroupInfo)
            if info.name == topic.name:
                self.book.load(info)
        elif topic.kind is TopicKind.FRIENDS:
            record = decode_as(payload, Friends)
            if record.account == topic.owner:
                self.friends.load(record)

    def on_synced(self) -> None:
        if self.nats is not None:
            for info in self.book.records():
                self.nats.permissions.group_changed(info.name, info)
            for record in self.friends.records():
                self.nats.permissions.friends_changed(record)
            self.nats.start()
            self.nats.apply_and_wait()
        if self.mirror is None:
            return
        for info in self.book.records():
            self.mirror.group_changed(info.name, info)
        for record in self.friends.records():
            self.mirror.friends_changed(record)
        self._control(self.mirror.commands(self.mirror.users()))
        self._control(self.mirror.probe())

    def started(self) -> None:
        if self.mirror is not None and not self._dynsec_answered.wait(DYNSEC_TIMEOUT):
            raise RequestTimeout(
                f"Mosquitto's dynamic-security plugin did not answer {self.account} within {DYNSEC_TIMEOUT:g}s",
                f"load it in mosquitto.conf and let {self.account} write {dynsec_module.CONTROL_TOPIC} "
                "(deploy/mosquitto), or run without --dynsec",
            )

    def on_foreign(self, message: Message) -> None:
        if self.mirror is None or message.topic != dynsec_module.RESPONSE_TOPIC:
            return
        self._dynsec_answered.set()
        for response in dynsec_module.decode_responses(message.payload):
            if response.correlationData == dynsec_module.LIST_ROLES:
                with self.lock:
                    self._control(self.mirror.stale(dynsec_module.role_names(response)))
            elif response.error and not response.error.endswith("already exists"):
                log.warning("dynamic security refused %s: %s", response.command, response.error)

    def __exit__(self, *exc: object) -> None:
        if self.nats is not None:
            self.nats.close()
        super().__exit__(*exc)

    def _control(self, payload: bytes | None) -> None:
        if payload is not None:
            self.publish(dynsec_module.CONTROL_TOPIC, payload)

    def on_reconnected(self) -> None:
        for info in self.book.records():
            self.publish(self.topics.group_info(info.name), encode(info), retain=True)
        for record in self.friends.records():
            self.publish(self.topics.friends(record.account), encode(record), retain=True)

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if isinstance(request, FriendRequest):
            friends = self.friends.apply(sender, request)
            if self.mirror is not None:
                changed = set().union(*(self.mirror.friends_changed(r) for r in friends.changed))
                self._control(self.mirror.commands(changed))
            if self.nats is not None and friends.changed:
                self.nats.change_and_wait(friends=friends.changed)  # in force on every node before anyone hears
            for record in friends.changed:
                self.publish(self.topics.friends(record.account), encode(record), retain=True)
            self._tell(sender, friends.notices, "friend")
            return friends.reply
        if not isinstance(request, GroupRequest):
            return None
        outcome = self.book.apply(sender, request, self.clock())
        if self.mirror is not None:
            changed = set().union(*(self.mirror.group_changed(name, info) for name, info in outcome.changed))
            self._control(self.mirror.commands(changed))
        leaving = False
        if self.nats is not None and outcome.changed:
            leaving = self.nats.probe is not None and self.nats.leaves(outcome.changed, sender)
            # in force on every node before the reply and the notices: a member's first line is not dropped
            self.nats.change_and_wait(groups=outcome.changed, asker=sender)  # a kicked member's connections end
        out = [(self.topics.group_info(n), encode(info) if info else b"", True) for n, info in outcome.changed]
        out += self._notices(sender, outcome.notices, "group")
        if leaving and outcome.reply is not None:  # sent with the reply, then his connections end (send_reply)
            self._leaver = (sender, out)
            return outcome.reply
        for topic, payload, retain in out:
            self.publish(topic, payload, retain=retain)
        return outcome.reply

    def fit(self, reply: WireModel, limit: int) -> WireModel:
        """A ``group list`` page past the broker's limit keeps its first groups by name (``more``): the
        records of groups others put you in, and of everyone's public groups, grow it past any limit,
        and Mosquitto dropped it, so ``group list`` went unanswered (tests/test_groups.py). A friends
        record is bounded instead (``groups.friends``), and so is one group's."""
        return fit_groups(reply, limit) if isinstance(reply, GroupList) else reply

    def send_reply(self, sender: str, corr: str, reply: WireModel, payload: bytes) -> None:
        """On NATS, a member who left a group: his connections are ended too (``NatsAuth.cut``), or a
        subscription he made before would go on delivering the group (nats-server 2.9 does not
        re-check an MQTT QoS 1 subscription on a reload). His leave came over one of them and waits
        for this reply, so the record, the notices and the reply go out first, through the reload
        probes (this connection sends nothing before this returns), and every node has passed the
        reply on before the cut. The cut is done here, in this connection's thread: the worker takes
        no other request until it is in force."""
        leaver, self._leaver = self._leaver, None
        if self.nats is None or leaver is None:
            super().send_reply(sender, corr, reply, payload)
            return
        with self.lock:
            if not self.nats.deliver([*leaver[1], (self.topics.reply(sender, corr), payload, False)]):
                log.warning("the reply to %s's leave may not have reached every NATS node before his cut", sender)
            self.nats.cut([leaver[0]])

    def _notices(self, sender: str, notices: list[tuple[str, str]], code: str) -> list[tuple[str, bytes, bool]]:
        return [(self.topics.notice(u), encode(Notice(code=code, text=t)), False) for u, t in notices if u != sender]

    def _tell(self, sender: str, notices: list[tuple[str, str]], code: str) -> None:
        for topic, payload, _ in self._notices(sender, notices, code):
            self.publish(topic, payload)
