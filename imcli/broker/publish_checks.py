"""Publish checks: whether a message a client sent is delivered, and what its sender is told.

amqtt 0.12.1 has no payload size limit, lets anyone retain anything and drops a publish
its topic plugin refuses silently, PUBACK included. Every PUBLISH therefore goes through
``PublishChecks.judge`` (called by ``ImBroker.publish``, the one list of steps every route of a
PUBLISH read from a client runs: imcli/broker/amqtt_adapter.py) before it is broadcast, in this
order:

1. an empty topic ends the connection (MQTT-4.7.3-1, as amqtt does);
2. the account's publish rate (workers' service accounts are not limited);
3. the payload size (workers' are not limited: a ``who`` reply may be large): ``max_payload``,
   or ``Limits.max_chunk`` on an upload topic (a file's chunks, issue 16);
4. retained chat: only state records (status, presence, groups, friends) may be retained;
5. a wildcard or ``$`` topic ends the connection (MQTT-3.3.2-2, MQTT-4.7.2-1, as amqtt does);
6. the topic ACL, with its own words for the sender (a friends-only DM says so);
7. a status: its size and the account's retained statuses (imcli/broker/retained.py).

A refused message is dropped with a notice to its sender (imcli/broker/notices.py).

A Last Will (issue 15) is a publish that happens later: when it fires,
imcli/broker/wills.py calls ``judge`` with the
Will's sender, topic, size and retain flag, exactly as for an ordinary publish (a rate token
included), and broadcasts and journals it only if the decision says ``deliver``; a refusal
is logged, as its sender is gone.

A rate token is taken one way, ``token`` (its bucket: the chat rate, or the file-transfer rate),
by ``judge`` for every publish of every route (imcli/broker/amqtt_adapter.py ``ImBroker.publish``)
and for a Last Will, except a QoS 1 PUBLISH queued for its connection's message loop: that one
takes it before its PUBACK, when the journal decides whether to keep it (``charge``, which
remembers the decision), and ``judge`` is given that decision (``rate_ok``) instead of taking a
second token.

A rate refusal names the limit that dropped the message (the chat rate, or the file-transfer
rate of a file's chunks and a download's acknowledgements) and that limit's own retry time. Rate
notices are bounded (one a second about anything, ``REQUEST_NOTICES`` more about requests); a
request dropped beyond those is not forgotten: its correlation id waits, and one notice a second
per account names all that waited (at most ``UNHEARD_REQUESTS``), so every asker fails at once
instead of timing out while a flood still cannot make the broker write without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.session import Session

from imcli.broker.acl import FILE_TRANSFER, Access
from imcli.broker.limits import UNHEARD_REQUESTS, Limits, PublishRate
from imcli.broker.notices import Telling, publish_refused, rate_exceeded, requests_dropped, retain_refused, too_large
from imcli.broker.topic_access import TopicAccess
from imcli.core.topics import TopicKind, is_id

log = logging.getLogger(__name__)

# (topic, size, retain) -> why a status is dropped, if it is (RetainedState.status_refusal)
StatusQuota = Callable[[str, int, bool], Telling | None]

UNSENT_AFTER = 60.0  # seconds after which a charged message that never reached delivery is forgotten


@dataclass(frozen=True)
class Decision:
    """What becomes of one publish: delivered or dropped, what its sender is told, and
    whether the connection ends because the publish broke MQTT."""

    deliver: bool
    telling: Telling | None = None
    close: bool = False
    unheard: str | None = None  # a request dropped for the rate, told later with others (its correlation id)


DELIVER = Decision(deliver=True)
CLOSE = Decision(deliver=False, close=True)


def decide_publish(
    access: TopicAccess,
    sender: str | None,
    topic: str,
    size: int,
    *,
    retain: bool,
    rate_ok: bool,
    trusted: bool,
    max_payload: int,
    rate: float,
    max_chunk: int | None = None,
    retry: float | None = None,
    transfer: bool = False,
) -> Decision:
    """The checks of this module's docstring, in order, as a pure function of their inputs
    (``max_chunk``: the limit on upload topics, ``max_payload`` if not given; ``rate``, ``retry``:
    the limit that applies to ``topic``, ``transfer`` if it is the file-transfer one, and seconds
    until the sender has a token of it again, told with a rate refusal)."""
    if not topic:
        return CLOSE
    if not rate_ok:
        return Decision(deliver=False, telling=rate_exceeded(rate, topic, retry, transfer=transfer))
    if size > max_payload and not trusted:
        limit = size_limit(access, topic, max_payload, max_chunk)
        if size > limit:
            return Decision(deliver=False, telling=too_large(size, limit, topic))
    if retain and not access.acl.may_retain(topic):
        return Decision(deliver=False, telling=retain_refused(topic))
    if "#" in topic or "+" in topic or topic.startswith("$"):
        return CLOSE
    if not access.check(sender, topic, Access.PUBLISH):
        return Decision(deliver=False, telling=publish_refused(access.acl.refusal(sender, topic), topic))
    return DELIVER


def size_limit(access: TopicAccess, topic: str, max_payload: int, max_chunk: int | None) -> int:
    """The payload limit of ``topic``: ``max_chunk`` for a file's chunks, ``max_payload`` for the rest."""
    if max_chunk is None or "/upload/" not in topic:
        return max_payload
    parsed = access.topics.parse(topic)
    return max_chunk if parsed is not None and parsed.kind is TopicKind.UPLOAD else max_payload


class Deliver(Protocol):
    """The broker's delivery of a publish the checks let through (``ImBroker.deliver``): broadcast
    at each subscription's QoS, retained if flagged, journalled (unless it was before its PUBACK)."""

    async def __call__(
        self, session: Session, topic: str, payload: bytes, *, qos: int, retain: bool, journal: bool
    ) -> None: ...


class PublishChecks:
    """``decide_publish`` with the broker's state: the rate buckets and the tokens taken before PUBACKs."""

    def __init__(
        self, access: TopicAccess, limits: Limits, max_payload: int, statuses: StatusQuota | None = None
    ) -> None:
        self.access = access
        self.limits = limits
        self.max_payload = max_payload
        self.statuses = statuses
        self.rate = PublishRate(limits.publish_rate, limits.publish_burst)
        self.file_rate = PublishRate(limits.file_rate, limits.file_burst)  # chunks: their own bucket
        # QoS 1 messages whose rate token was taken before their PUBACK: id -> (message, allowed, when)
        self._charged: dict[int, tuple[Any, bool, float]] = {}
        self.tell: Callable[[str | None, Telling], Awaitable[None]] | None = None  # the notice topic (notices.py)
        self._unheard: dict[str, list[str]] = {}  # account -> requests dropped, not told yet (at most UNHEARD_REQUESTS)
        self._telling: set[asyncio.Task[None]] = set()

    def _bucket(self, topic: str) -> PublishRate:
        parsed = self.access.topics.parse(topic) if "/upload/" in topic or "/fetch/" in topic else None
        return self.file_rate if parsed is not None and parsed.kind in FILE_TRANSFER else self.rate

    def charge(self, sender: str | None, message: Any, size: int) -> bool:
        """A QoS 1 PUBLISH queued for its connection's message loop is about to be acknowledged: take
        its rate token now (``take_charge`` finds it). Whether it is worth journalling (within the
        rate and the size limit; the journal checks the rest)."""
        now = time.monotonic()
        topic = getattr(message, "topic", None) or ""
        allowed = self.token(sender, topic, now)
        self._charged[id(message)] = (message, allowed, now)
        return allowed and (
            self.access.is_service(sender)
            or size <= size_limit(self.access, topic, self.max_payload, self.limits.max_chunk)
        )

    def token(self, sender: str | None, topic: str, now: float | None = None, trusted: bool | None = None) -> bool:
        """The one way a rate token is taken: one of ``sender``'s bucket for ``topic`` (the chat rate,
        or the file-transfer rate of a file's chunks and a download's acknowledgements; a service
        account (``trusted``, looked up if not given) has no limit). Whether the rate allowed it
        (``judge``'s ``rate_ok``)."""
        if self.access.is_service(sender) if trusted is None else trusted:
            return True
        return self._bucket(topic).allow(sender or "", time.monotonic() if now is None else now)

    def take_charge(self, message: Any) -> tuple[bool, bool | None]:
        """Whether ``charge`` saw ``message`` before its PUBACK (QoS 1), and the rate decision
        it made then (``None``: take a token now, as for QoS 0)."""
        charged = self._charged.pop(id(message), None)
        if charged is None:
            return False, None
        return True, (charged[1] if charged[0] is message else None)

    def judge(
        self, sender: str | None, topic: str, size: int, *, retain: bool, rate_ok: bool | None = None
    ) -> Decision:
        """The decision for one publish (or a Last Will when it fires); takes its rate token (``token``)
        unless ``rate_ok`` says the one taken before its PUBACK (``charge``)."""
        now = time.monotonic()
        trusted = self.access.is_service(sender)
        if rate_ok is None:  # an empty topic ends the connection before any token is taken
            rate_ok = not topic or self.token(sender, topic, now, trusted)
        bucket = self._bucket(topic)
        decision = decide_publish(
            self.access,
            sender,
            topic,
            size,
            retain=retain,
            rate_ok=rate_ok,
            trusted=trusted,
            max_payload=self.max_payload,
            rate=bucket.rate,
            max_chunk=self.limits.max_chunk,
            retry=None if rate_ok else round(bucket.retry_after(sender or "", now), 3),
            transfer=bucket is self.file_rate,
        )
        if decision.deliver and not trusted and self.statuses is not None:
            refusal = self.statuses(topic, size, retain)
            if refusal is not None:
                decision = Decision(deliver=False, telling=refusal)
        rate_notice = decision.telling is not None and decision.telling.code == "rate"
        if rate_notice:
            corr = self._request_id(sender, topic)
            if not self.rate.should_warn(sender or "", now, request=corr is not None):
                # at most one rate notice a second (and a few about requests); a request's asker
                # still hears, in the next notice that names the requests held (``tell_sender``)
                return Decision(deliver=False, unheard=corr)
        return decision

    def _request_id(self, sender: str | None, topic: str) -> str | None:
        """The correlation id of ``sender``'s own request topic (one a notice can carry), else
        ``None``: a request under another's name has no asker waiting (the ACL refuses it anyway),
        and takes none of the notices meant for the sender's own."""
        parsed = self.access.topics.parse(topic)
        if parsed is None or parsed.kind is not TopicKind.REQUEST or parsed.sender != sender:
            return None
        return parsed.key if parsed.key and is_id(parsed.key) else None

    def _hold(self, account: str, corr: str) -> None:
        """Keep a dropped request's id for the account's next aggregated notice, a second after
        the first one held (so at most one such notice a second per account)."""
        held = self._unheard.get(account)
        if held is None:
            held = self._unheard[account] = []
            asyncio.get_running_loop().call_later(1.0, self._tell_unheard, account)
        if len(held) < UNHEARD_REQUESTS:
            held.append(corr)

    def _tell_unheard(self, account: str) -> None:
        held = self._unheard.pop(account, None)
        if not held or self.tell is None:
            return
        retry = round(self.rate.retry_after(account, time.monotonic()), 3)
        task = asyncio.ensure_future(self._tell_quietly(account, requests_dropped(held, self.rate.rate, retry)))
        self._telling.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._telling.discard)

    async def _tell_quietly(self, account: str, telling: Telling) -> None:
        assert self.tell is not None
        try:
            await self.tell(account, telling)
        except Exception:  # a notice that cannot go (the broker stopping) is only logged
            log.warning("could not tell %s of the requests dropped", account, exc_info=True)

    async def tell_sender(self, session: Session, decision: Decision) -> bool:
        """``session``'s sender told why its PUBLISH is refused, if it is; false if its connection is to
        be closed (an invalid topic)."""
        username = session.username
        if decision.telling is not None and self.tell is not None:
            await self.tell(username, decision.telling)
        elif decision.unheard is not None and username is not None and self.tell is not None:
            self._hold(username, decision.unheard)
        if decision.close:
            log.warning("%s sent a PUBLISH on an invalid topic: closing", session.client_id)
            return False
        return True

    def forget_unsent(self, now: float) -> None:
        """Drop the tokens of messages whose connection ended before the broker delivered them."""
        for key, (_, _, when) in list(self._charged.items()):
            if now - when > UNSENT_AFTER:
                del self._charged[key]
