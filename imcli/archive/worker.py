"""The archive worker: keeps every room, direct and group message and answers ``history``.

It is an ordinary MQTT client with a service account, which may read every chat topic.
Its session is persistent (QoS 1), so a restart of the worker alone loses nothing the
broker kept for it. Who may read what is decided here, from the requester's account
(the request topic's sender, checked by the broker):

* a room: every signed-in user;
* a direct conversation: only its two parties (the query is always "me and X");
* a group: its current members, as the group worker's retained records say. A private
  group the requester is not in answers exactly like a group that does not exist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from imcli.archive.store import (
    ARCHIVE_FILE,
    ArchiveStore,
    Page,
    dm_conversation,
    group_conversation,
    room_conversation,
)
from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.rules import group_history_start, group_visible, missing_group
from imcli.core.service import ServiceWorker
from imcli.core.wire import (
    ErrorReply,
    GroupInfo,
    HistoryReply,
    HistoryRequest,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    chat_received,
    decode_as,
    encode,
    is_name,
    most_that_fit,
)

log = logging.getLogger(__name__)


class ArchiveWorker(ServiceWorker):
    requests = (HistoryRequest,)

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        data_dir: Path,
        topics: Topics | None = None,
        device: str = "worker",
        clock: Callable[[], float] = time.time,
        retention_days: float | None = None,
        store_messages: bool = True,
        max_payload: int | None = None,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock, persistent=True)
        self.max_payload = max_payload  # imcli workers --max-payload; imcli serve: None (its workers pass)
        self.store = ArchiveStore(data_dir / ARCHIVE_FILE)
        self._groups: dict[str, GroupInfo] = {}
        self._store_messages = store_messages  # False beside the embedded broker, which journals them itself
        self._retention = retention_days * 86400 if retention_days else None
        self._pruner = threading.Thread(target=self._prune_loop, name="archive-prune", daemon=True)

    def started(self) -> None:
        if self._retention is not None:
            self._prune()
            self._pruner.start()

    def _prune_loop(self) -> None:
        while not self.stopping.wait(3600):
            self._prune()

    def _prune(self) -> None:
        assert self._retention is not None
        gone = self.store.prune(self.clock() - self._retention)
        if gone:
            log.info("archive: %d messages older than %g days removed", gone, self._retention / 86400)

    def state_filters(self) -> list[str]:
        t = self.topics
        chat = [t.room_filter(), t.dm_filter(), t.group_msg_filter()] if self._store_messages else []
        return [t.group_info_filter(), *chat]

    # ``recoverable_filters``: none. The chat is not retained: the persistent session queues what is said
    # while the archive is away, which is the history. A group record cleared while it is away (the last
    # member left) leaves no retained message either, only the copy the session queued at QoS 1

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._pruner.is_alive():
            self._pruner.join(5)
        self.store.close()

    def on_state(self, topic: Topic, payload: bytes) -> None:
        if topic.kind is TopicKind.GROUP_INFO and topic.name:
            if not payload:
                self._groups.pop(topic.name, None)  # the last member left
                return
            info = decode_as(payload, GroupInfo)
            if info.name == topic.name:
                self._groups[info.name] = info
        elif topic.kind in (TopicKind.ROOM, TopicKind.DM, TopicKind.GROUP_MSG):
            self.store.add(chat_received(topic, payload), self.clock())

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if not isinstance(request, HistoryRequest):
            return None
        targets = [t for t in (request.room, request.user, request.group) if t is not None]
        if len(targets) > 1:
            return ErrorReply(id=request.id, code="invalid", text="ask for one room, person or group at a time")
        if any(not is_name(t) for t in targets):
            return ErrorReply(id=request.id, code="invalid", text=f"invalid name {targets[0]!r}")
        page = self._page(sender, request)
        if isinstance(page, ErrorReply):
            return page
        return HistoryReply(id=request.id, messages=page.messages, more=page.more)

    def fit(self, reply: WireModel, limit: int) -> WireModel:
        """A page of history that fits ``limit``: its newest messages, ``more`` saying older ones wait (a
        raw client's two lines of 200 KB on Mosquitto made ``history lobby`` and every ``imcli chat``'s
        catch-up go unanswered, tests/test_history.py); one message too large alone, its text cut."""
        if not isinstance(reply, HistoryReply):
            return reply
        messages = reply.messages

        def newest(n: int) -> HistoryReply:
            return reply.model_copy(update={"messages": messages[len(messages) - n :] if n else [], "more": True})

        kept = most_that_fit(len(messages), lambda n: len(encode(newest(n))) <= limit)
        if kept or not messages:
            return newest(kept)
        last = messages[-1]

        def cut(n: int) -> HistoryReply:
            text = last.text[:n] + f" … ({len(last.text) - n} characters more)"
            return reply.model_copy(update={"messages": [last.model_copy(update={"text": text})], "more": True})

        return cut(most_that_fit(len(last.text), lambda n: len(encode(cut(n))) <= limit))

    def _page(self, sender: str, r: HistoryRequest) -> Page | ErrorReply:
        if r.room is not None:
            return self.store.conversation_page(room_conversation(r.room), r.limit, r.since, r.before)
        if r.user is not None:
            return self.store.conversation_page(dm_conversation(sender, r.user), r.limit, r.since, r.before)
        if r.group is not None:
            info = self._groups.get(r.group)
            if info is None or sender not in info.members:
                if info is None or not group_visible(private=info.private, member=False):
                    return ErrorReply(id=r.id, code="not_found", text=missing_group(r.group))
                return ErrorReply(id=r.id, code="denied", text=f"you are not a member of #{r.group}")
            start = group_history_start(info.created, r.since)  # not the history of an older group of that name
            return self.store.conversation_page(group_conversation(r.group), r.limit, start, r.before)
        mine = {g.name: group_history_start(g.created) for g in self._groups.values() if sender in g.members}
        return self.store.catch_up(sender, mine, r.limit, r.since, r.before)
