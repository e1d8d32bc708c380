"""Request/reply without MQTT 5 (DESIGN.md): the one client that asks the workers.

The asker's connection is subscribed to ``<prefix>/user/<me>/reply/+`` (or a filter that
covers it); ``ask`` publishes the request on ``<prefix>/request/<me>/<corr>`` and waits for
the reply whose topic names that ``corr``. Replies reach it through ``deliver``, which
the connection calls with each message it receives (in paho's thread), so a short-lived
connection (``imcli.client.services``) and the Listener's long-lived one, which receives
chat on the same connection, share this code. A late reply to a request that timed out
is dropped.

The embedded broker drops a request beyond the account's publish rate and says so on
``<prefix>/user/<me>/notice`` (a ``rate`` notice naming the request's topic and when to
retry; or, for requests dropped beyond the notices it sends one by one, an aggregated one a
second whose ``requests`` lists their correlation ids): a connection subscribed to its notice
topic hands that to ``deliver`` too, and each request named fails at once with ``RateLimited``
instead of waiting out the timeout. A rate notice about a file transfer's topic (the broker's
separate file-transfer rate) is read with ``rate_notice`` too (imcli/client/files.py). Mosquitto
and NATS have no such limit, and no such notice.

Only the broker and the workers may write a user's notice topic (the ACL of each broker kind,
tests/test_security.py); still, a notice is read defensively: anything malformed is ignored, and
the error it causes quotes none of its text.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from imcli.core.errors import ImcliError, InvalidInput, RateLimited, RequestTimeout
from imcli.core.mqtt import Message
from imcli.core.text import quoted
from imcli.core.wire import (
    MalformedPayload,
    Notice,
    Payload,
    TopicKind,
    Topics,
    WireModel,
    decode,
    decode_as,
    encode,
    new_id,
)

REQUEST_TIMEOUT = 5.0  # seconds an asker waits for a worker's reply, unless given another or IMCLI_REQUEST_TIMEOUT
# seconds after the first send at which a request still unanswered is sent again, the same topic and payload
# (the worker answers a repeat from the reply it kept: imcli/core/service.py); before the first resend, ``renew``
# (if given) subscribes the reply's own topic: on NATS 2.9 a node that reloads its users file can lose another
# node's word that this connection reads its replies, and so drop them (docs/SCALING.md, issue 20 eighth session)
RESEND_AFTER: tuple[float, ...] = (2.0, 4.0)


def request_timeout() -> float:
    """How long an asker waits by default: ``IMCLI_REQUEST_TIMEOUT`` (seconds), else ``REQUEST_TIMEOUT``.

    Read when a client is made, not at import, so that a test (or a script on a slow link)
    sets it for the commands it runs.
    """
    raw = os.environ.get("IMCLI_REQUEST_TIMEOUT")
    if raw is None:
        return REQUEST_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise InvalidInput(f"invalid IMCLI_REQUEST_TIMEOUT {quoted(raw)}", "give seconds, more than 0 and at most 3600")
    return value


class Asker(Protocol):
    """Something that sends a request to the workers and returns the reply."""

    def ask(self, request: WireModel) -> Payload: ...


class RequestClient:
    """Asks the workers over one connection; ``publish`` sends at QoS 1 and waits for the PUBACK."""

    def __init__(
        self,
        topics: Topics,
        account: str,
        publish: Callable[[str, bytes], None],
        timeout: float | None = None,
        renew: Callable[[str], None] | None = None,
    ) -> None:
        self.topics = topics
        self._renew = renew
        self.account = account
        self.timeout = request_timeout() if timeout is None else timeout
        self._publish = publish
        self._waiting: dict[str, queue.Queue[Message | Notice]] = {}
        self._lock = threading.Lock()
        self.notice_topic = topics.notice(account)

    def reply_filter(self) -> str:
        """What the connection must be subscribed to (unless a wider filter covers it)."""
        return self.topics.reply_filter(self.account)

    def ask(self, request: WireModel, timeout: float | None = None) -> Payload:
        """Send ``request`` and return the reply; ``RequestTimeout`` if no worker answers in time."""
        wait = self.timeout if timeout is None else timeout
        corr = new_id()
        box: queue.Queue[Message | Notice] = queue.Queue(maxsize=1)
        with self._lock:
            self._waiting[corr] = box
        topic, payload = self.topics.request(self.account, corr), encode(request)
        try:
            self._publish(topic, payload)
            started = time.monotonic()
            for resend in [*(at for at in RESEND_AFTER if at < wait), None]:
                try:
                    reply = box.get(timeout=max(0.0, started + (wait if resend is None else resend) - time.monotonic()))
                    break
                except queue.Empty:
                    if resend is None:
                        raise no_worker(wait) from None
                    if self._renew is not None and resend == RESEND_AFTER[0]:
                        self._renew(self.topics.reply(self.account, corr))
                    self._publish(topic, payload)
        finally:
            with self._lock:
                self._waiting.pop(corr, None)
        if isinstance(reply, Notice) and reply.code == "too_large":
            raise InvalidInput(f"the broker dropped the request: {reply.text}", "give less text, or a smaller file")
        if isinstance(reply, Notice):
            raise rate_limited(self.account, reply.retry)
        try:
            return decode(reply.payload)
        except MalformedPayload as exc:
            raise ImcliError(
                f"a worker sent a malformed reply: {exc}", "is the broker's imcli the same version as yours?"
            ) from exc

    def deliver(self, message: Message) -> bool:
        """Hand a received message to the request waiting for it (paho's thread); ``False`` if it is no reply.

        A ``rate`` or ``too_large`` notice about a waiting request fails that request; it is no reply (``False``:
        a Listener shows it too)."""
        if message.topic == self.notice_topic:
            self._dropped(message.payload)
            return False
        parsed = self.topics.parse(message.topic)
        if parsed is None or parsed.kind is not TopicKind.REPLY or parsed.owner != self.account or not parsed.key:
            return False
        with self._lock:
            box = self._waiting.get(parsed.key)
        if box is not None:
            with contextlib.suppress(queue.Full):  # a duplicate (QoS 1): the first copy is the answer
                box.put_nowait(message)
        return True

    def _dropped(self, payload: bytes) -> None:
        notice = rate_notice(payload) or too_large_notice(payload)
        if notice is None:
            return
        corrs = dropped(self.topics, self.account, notice, TopicKind.REQUEST)
        corrs += notice.requests or ()
        with self._lock:
            boxes = [box for corr in corrs if (box := self._waiting.get(corr)) is not None]
        for box in boxes:
            with contextlib.suppress(queue.Full):  # the reply came first after all
                box.put_nowait(notice)


def rate_notice(payload: bytes) -> Notice | None:
    """A well-formed ``rate`` notice, or ``None`` for anything else."""
    return _notice(payload, "rate")


def too_large_notice(payload: bytes) -> Notice | None:
    """A well-formed ``too_large`` notice (a request over the broker's payload limit: its asker
    fails at once, saying so, instead of waiting out its timeout and blaming the workers)."""
    return _notice(payload, "too_large")


def _notice(payload: bytes, code: str) -> Notice | None:
    if f'"{code}"'.encode() not in payload:
        return None
    try:
        notice = decode_as(payload, Notice)
    except MalformedPayload:
        return None
    return notice if notice.code == code else None


def dropped(topics: Topics, account: str, notice: Notice, *kinds: TopicKind) -> list[str]:
    """The key (a request's correlation id, an upload's id, a download's stream) of the topic a
    rate notice names, if it is ``account``'s own topic of one of ``kinds``."""
    parsed = topics.parse(notice.topic) if notice.topic else None
    if parsed is None or parsed.kind not in kinds or parsed.sender != account or not parsed.key:
        return []
    return [parsed.key]


def rate_limited(account: str, retry: float | None, *, transfer: bool = False) -> RateLimited:
    """The error of a request (``transfer``: part of a file transfer) that the broker dropped for
    the rate; ``retry`` as the notice said it (bounded by ``Notice``: 0 to 86,400 s)."""
    wait = f"in {max(1, math.ceil(retry))}s" if retry is not None else "in a few seconds"
    if transfer:
        return RateLimited(
            f"the broker dropped part of the file transfer: account {account} hit its file transfer rate",
            f"try again {wait}: the same command goes on where it stopped",
            retry=retry,
        )
    return RateLimited(
        f"the broker dropped the request: account {account} hit its rate limit (messages sent too fast)",
        f"try again {wait}, and send less often",
        retry=retry,
    )


def no_worker(timeout: float) -> RequestTimeout:
    sends = 1 + sum(at < timeout for at in RESEND_AFTER)
    return RequestTimeout(
        f"no worker answered within {timeout:g}s (sent {sends} times)",
        "are imcli's workers running? 'imcli serve' starts them, 'imcli workers' beside another broker;"
        " or you sent too fast; on a NATS 2.9 cluster a node reloading its users file can lose a request"
        " or its reply (deploy/nats/README.md): try again",
    )
