"""The moments worker: answers ``moment_request``s, keeps the feed in ``moments.sqlite3``.

It reads the group worker's retained friends records (``<prefix>/user/+/friends``) to know,
at every request, who may see whose moments (``imcli.core.rules.moment_visible``). It runs
under the group worker's service account (a device of its own), whose rights it needs and no
more: read the friends records and requests, write replies and notices. A restart reads the
friends back from the broker and the moments from its file.

New moments are told to the author's friends, likes and comments to the author, on their own
notice topics (code ``moments``): ``imcli chat`` and ``listen`` show them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.service import ServiceWorker
from imcli.core.wire import (
    Friends,
    MomentReply,
    MomentRequest,
    Notice,
    Topic,
    TopicKind,
    Topics,
    WireModel,
    decode_as,
    encode,
)
from imcli.moments.book import MomentsBook, fit
from imcli.moments.store import MomentStore


class MomentsWorker(ServiceWorker):
    requests = (MomentRequest,)

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials,
        data_dir: Path,
        topics: Topics | None = None,
        device: str = "moments",
        clock: Callable[[], float] = time.time,
        max_payload: int | None = None,
    ) -> None:
        super().__init__(address, credentials, topics, device, clock)
        self.store = MomentStore(data_dir)
        self.book = MomentsBook(self.store)
        self.max_payload = max_payload  # imcli workers --max-payload; imcli serve: None (its workers pass)

    def state_filters(self) -> list[str]:
        return [self.topics.friends_filter()]

    def recoverable_filters(self) -> list[str]:
        # the group worker's retained records; a clean session misses a record cleared while away at QoS 1 too
        return self.state_filters()

    def on_state(self, topic: Topic, payload: bytes) -> None:
        # after sync too: the group worker's changes keep arriving, and each one counts at once
        if topic.kind is TopicKind.FRIENDS and topic.owner:
            if not payload:
                self.book.friends_changed(topic.owner, ())
                return
            record = decode_as(payload, Friends)
            if record.account == topic.owner:
                self.book.friends_changed(record.account, record.friends)

    def handle(self, sender: str, request: WireModel) -> WireModel | None:
        if not isinstance(request, MomentRequest):
            return None
        outcome = self.book.apply(sender, request, self.clock())
        for user, text in outcome.notices:
            self.publish(self.topics.notice(user), encode(Notice(code="moments", text=text)))
        return outcome.reply

    def fit(self, reply: WireModel, limit: int) -> WireModel:
        return fit(reply, limit) if isinstance(reply, MomentReply) else reply

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.store.close()
