"""The group worker: answers ``group_request``s and ``friend_request``s, and keeps ``<prefix>/group/<g>/info`` retained.

The retained record is the group's only state: the broker reads it to enforce
membership, members read it, and a restarted worker reads it back before answering.
Members hear of changes on their notice topics.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from groups.book import GroupBook
from groups.friends import FriendBook
from imcli.mqtt import BrokerAddress, Credentials
from imcli.wire import (
    FriendRequest,
    Friends,
    GroupInfo,
    GroupRequest,
    Notice,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    decode_as,
    encode,
)
from imcli.worker import AccountDirectory, ServiceWorker


class GroupWorker(ServiceWorker):
    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        directory: AccountDirectory | None = None,
        topics: Topics | None = None,
        device: str = "worker",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock)
        self.book = GroupBook(directory)
        self.friends = FriendBook(directory)

    def state_filters(self) -> list[str]:
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

    def on_reconnected(self) -> None:
        for info in self.book.records():
            self.publish(self.topics.group_info(info.name), encode(info), retain=True)
        for record in self.friends.records():
            self.publish(self.topics.friends(record.account), encode(record), retain=True)

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if isinstance(request, FriendRequest):
            friends = self.friends.apply(sender, request)
            for record in friends.changed:
                self.publish(self.topics.friends(record.account), encode(record), retain=True)
            self._tell(sender, friends.notices, "friend")
            return friends.reply
        if not isinstance(request, GroupRequest):
            return None
        outcome = self.book.apply(sender, request, self.clock())
        for name, info in outcome.changed:
            self.publish(self.topics.group_info(name), encode(info) if info else b"", retain=True)
        self._tell(sender, outcome.notices, "group")
        return outcome.reply

    def _tell(self, sender: str, notices: list[tuple[str, str]], code: str) -> None:
        for user, text in notices:
            if user != sender:
                self.publish(self.topics.notice(user), encode(Notice(code=code, text=text)))
