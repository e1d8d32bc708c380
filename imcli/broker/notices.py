"""What the broker tells a user on its notice topic, and how.

amqtt drops a refused publish silently and still sends the PUBACK (DESIGN.md): the only
way a sender learns why its message went nowhere is a notice on
``<prefix>/user/<me>/notice``. Each refusal's wording is one function here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from imcli.core.wire import Notice, Topics, encode, is_name

log = logging.getLogger(__name__)

Broadcast = Callable[[str, bytes, int], Awaitable[None]]


@dataclass(frozen=True)
class Telling:
    """One notice to one sender: its code, its words and the topic it is about."""

    code: str
    text: str
    topic: str | None = None
    retry: float | None = None  # seconds until a message is accepted again (rate notices)
    requests: tuple[str, ...] = ()  # correlation ids of the requests dropped (an aggregated rate notice)


def rate_exceeded(
    rate: float, topic: str | None = None, retry: float | None = None, *, transfer: bool = False
) -> Telling:
    """``topic``: the message dropped (a request's asker fails at once instead of waiting for a
    reply that cannot come); ``retry``: seconds until the account may send on that limit again;
    ``transfer``: the drop was on the file-transfer limit (``Limits.file_rate``: a file's chunks, a
    download's acknowledgements), not the chat rate (``Limits.publish_rate``)."""
    what = "file transfer messages (chunks, acknowledgements)" if transfer else "messages"
    return Telling("rate", f"slow down: {what} beyond {rate:g} a second are dropped", topic, retry)


def requests_dropped(requests: list[str], rate: float, retry: float | None) -> Telling:
    """The requests dropped for the rate beyond those told one by one (``REQUEST_NOTICES`` a
    second), by correlation id: their askers fail at once too."""
    count = f"{len(requests)} more request{'s' if len(requests) != 1 else ''}"
    return Telling(
        "rate", f"slow down: {count} dropped, beyond {rate:g} messages a second", None, retry, tuple(requests)
    )


def too_large(size: int, limit: int, topic: str) -> Telling:
    return Telling("too_large", f"message of {size} bytes dropped: the limit is {limit} bytes", topic)


def retain_refused(topic: str) -> Telling:
    return Telling("denied", f"retained messages are not allowed on {topic}", topic)


def publish_refused(refusal: str, topic: str) -> Telling:
    """``refusal`` is the ACL's own words (``TopicAcl.refusal``: a friends-only DM says so)."""
    return Telling("denied", refusal, topic)


def subscription_refused(topic_filter: str, limit: int) -> Telling:
    return Telling("limit", f"subscription to {topic_filter} refused: at most {limit}")


def session_dropped(client_id: str, limit: int) -> Telling:
    return Telling(
        "limit",
        f"persistent session {client_id} dropped to make room: at most {limit} per account, "
        "the longest idle goes first (its device starts afresh; imcli history has what was queued)",
    )


def connection_refused(client_id: str, limit: int) -> Telling:
    return Telling("limit", f"new connection {client_id} refused: at most {limit} connections per account")


def session_refused(client_id: str, limit: int) -> Telling:
    return Telling("limit", f"new persistent session {client_id} refused: {limit} per account, all connected")


def status_too_large(size: int, limit: int, topic: str) -> Telling:
    return Telling("too_large", f"status of {size} bytes dropped: a status is at most {limit} bytes", topic)


def too_many_statuses(limit: int, topic: str) -> Telling:
    return Telling(
        "limit",
        f"status dropped: at most {limit} retained statuses (devices) per account; "
        "clear one with an empty retained message first",
        topic,
    )


def taken_over(client_id: str) -> Telling:
    """To the connection closed because a newer CONNECT took its client id (MQTT-3.1.4-2): its client
    stops instead of taking the session back a second later (docs/PROTOCOL.md §9, ``taken_over``)."""
    return Telling("taken_over", f"the session {client_id} was taken over by a newer connection", client_id)


class Notifier:
    """Publishes notices through the broker itself (``broadcast(topic, payload, qos)``)."""

    def __init__(self, topics: Topics, broadcast: Broadcast) -> None:
        self._topics = topics
        self._broadcast = broadcast

    async def tell(self, username: str | None, telling: Telling) -> None:
        """Tell one user something on its notice topic (nobody hears it if it is not listening)."""
        addressed = self.addressed(username, telling)
        if addressed is not None:
            await self._broadcast(*addressed, 1)

    def addressed(self, username: str | None, telling: Telling) -> tuple[str, bytes] | None:
        """The notice topic of ``username`` and the notice's payload, for a notice that goes to one
        connection only (``taken_over``); ``None`` for a client that is no user."""
        if username is None or not is_name(username):
            return None
        log.info("notice to %s: %s", username, telling.text)
        requests = list(telling.requests) or None
        notice = Notice(
            code=telling.code, text=telling.text, topic=telling.topic, retry=telling.retry, requests=requests
        )
        return self._topics.notice(username), encode(notice)
