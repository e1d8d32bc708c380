"""The group worker: answers ``group_request``s and keeps ``<prefix>/group/<g>/info`` retained.

The retained record is the group's only state: the broker reads it to enforce
membership, members read it, and a restarted worker reads it back before answering.
Members hear of changes on their notice topics.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from groups.book import GroupBook
from imcli.mqtt import BrokerAddress, Credentials
from imcli.wire import (
    GroupInfo,
    GroupRequest,
    MalformedPayload,
    Notice,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    decode,
    encode,
)
from imcli.worker import ServiceWorker
from presence.roster import AccountDirectory


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

    def state_filters(self) -> list[str]:
        return [self.topics.group_info_filter()]

    def on_state(self, topic: Topic, payload: bytes) -> None:
        if topic.kind is not TopicKind.GROUP_INFO or self.synced.is_set() or not payload:
            return  # after sync, records coming back are our own
        try:
            info = decode(payload)
        except MalformedPayload:
            return
        if isinstance(info, GroupInfo) and info.name == topic.name:
            self.book.load(info)

    def on_reconnected(self) -> None:
        for info in self.book.records():
            self.publish(self.topics.group_info(info.name), encode(info), retain=True)

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if not isinstance(request, GroupRequest):
            return None
        outcome = self.book.apply(sender, request, self.clock())
        for name, info in outcome.changed:
            self.publish(self.topics.group_info(name), encode(info) if info else b"", retain=True)
        for user, text in outcome.notices:
            if user != sender:
                self.publish(self.topics.notice(user), encode(Notice(code="group", text=text)))
        return outcome.reply
