"""Admission: whether a CONNECT is let in (the connection gate, then the number of
connections its account holds, then its persistent sessions) and how many filters a
connection may subscribe to (the publish rate is a publish check: imcli/broker/publish_checks.py).

Persistent sessions per account (``Limits.max_sessions``, issue 15): a CONNECT that would
start one more while the account holds the limit already is let in if one of them is idle
(its client away): imcli/broker/session_upkeep.py then drops the longest-idle one and the
account is told on its notice topic. Only when every one of them is connected (possible
only when ``max_connections`` is set above ``max_sessions``) is the new session refused,
with CONNACK 5, before any session is touched. Dropping rather than refusing means that a
user whose old devices left sessions behind is never locked out for the 7 days those
sessions would otherwise be kept, while one account can still never hold more than the limit.

Ready means ready (issue 22): while ``imcli serve`` starts its workers, a client's CONNACK waits
for them (``hold_clients``/``workers_ready``; at most ``WORKERS_READY_WAIT``), so a command run
the moment the port opens is answered instead of timing out on a worker not yet there.

Workers' service accounts are trusted: no limit applies to them. The decisions are plain
functions; ``Admission`` keeps the counts they are made from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

from amqtt.errors import MQTTError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.session import Session

from imcli.broker.connection_gate import CONNECTION_ACCEPTED, NOT_AUTHORIZED, ConnectionGate, shown_username
from imcli.broker.limits import Limits
from imcli.broker.notices import Telling, connection_refused, session_refused, subscription_refused
from imcli.broker.packets import PacketGuard
from imcli.broker.topic_access import TopicAccess

log = logging.getLogger(__name__)

WORKERS_READY_WAIT = 8.0  # seconds a client's CONNACK waits for the workers (clients wait 10 s for one)


def over_connection_limit(open_now: int, replaces_own: bool, limit: int) -> bool:
    """Whether one more connection would exceed ``limit``; a reconnect of a client id that is
    connected under the same account replaces that connection rather than adding one."""
    return open_now - replaces_own >= limit


def refuse_new_session(held: Mapping[str, bool], client_id: str, limit: int) -> bool:
    """Whether a persistent CONNECT with ``client_id`` is refused; ``held`` are the account's
    persistent sessions (client id -> connected). Resuming one it holds never is; a new one
    is when the account holds ``limit`` and none of them is idle to make room."""
    return client_id not in held and len(held) >= limit and all(held.values())


def over_subscription_limit(held: int, already_held: bool, limit: int) -> bool:
    """Whether a SUBSCRIBE to one more filter is refused (subscribing again to a held one never is)."""
    return not already_held and held >= limit


async def refuse(writer: Any, code: int, username: str | None) -> NoReturn:
    """Send CONNACK ``code`` and close: before any existing session is deleted, merged or taken over."""
    await ConnackPacket.build(0, code).to_stream(writer)
    await writer.close()
    log.info("CONNECT refused (CONNACK %d) for %r", code, shown_username(username))  # imcli serve --verbose
    raise MQTTError(f"CONNECT refused ({code}) for {shown_username(username)!r}")


class Admission:
    """Open connections per account, counted from the CONNACK until the connection ends."""

    def __init__(self, gate: ConnectionGate, access: TopicAccess, limits: Limits) -> None:
        self.gate = gate
        self.access = access
        self.limits = limits
        self._open: Counter[str] = Counter()
        self._workers_ready = asyncio.Event()
        self._workers_ready.set()  # a broker without workers of its own (tests, imcli workers elsewhere) is ready
        self.tell: Callable[[str | None, Telling], Awaitable[None]] | None = None  # the notice topic (notices.py)

    async def admit_or_refuse(
        self,
        reader: Any,
        writer: Any,
        incoming: Session,
        table: Mapping[str, tuple[Session, Any]],
        persistent_of: Callable[[str], Mapping[str, bool]],
    ) -> None:
        """Let in the CONNECT ``reader`` read, or refuse it (``refuse``) before any session
        of the broker's ``table`` is touched. One refused on its form alone (a client id past
        ``Limits.max_client_id``: imcli/broker/packets.py) is not looked at further; a trusted
        worker's packets have no size limit (its `who` reply may be large)."""
        code = reader.connect_refusal if isinstance(reader, PacketGuard) else CONNECTION_ACCEPTED
        if not code:
            code, trusted = await self.admit(
                incoming, lambda client_id: table.get(client_id, (None,))[0], persistent_of
            )
            if code == CONNECTION_ACCEPTED and trusted and isinstance(reader, PacketGuard):
                reader.limit = None
        if code != CONNECTION_ACCEPTED:
            await refuse(writer, code, incoming.username)

    async def admit(
        self,
        incoming: Session,
        session_of: Callable[[str], Session | None],
        persistent_of: Callable[[str], Mapping[str, bool]] = lambda _account: {},
    ) -> tuple[int, bool]:
        """The CONNACK code for ``incoming`` (0: accepted), and whether it is a trusted worker.
        ``session_of(client_id)`` is the session the broker keeps for a client id, if any;
        ``persistent_of(account)`` its persistent sessions (client id -> connected).

        Nothing is awaited after the counts are read, so the session admitted is in the
        broker's table before another CONNECT of the same account is counted."""
        code = await self.gate.check(incoming)  # binds the client id first
        trusted = self.access.is_service(incoming.username)
        if code != CONNECTION_ACCEPTED or trusted:
            return code, trusted
        await self._until_workers_ready()
        current = session_of(incoming.client_id or "")
        replaces_own = (  # a reconnect of the same client id replaces its own connection
            current is not None and current.username == incoming.username and current.transitions.state == "connected"
        )
        account, client_id = incoming.username or "", incoming.client_id or ""
        if self.too_many_connections(account, replaces_own):
            log.warning("CONNECT refused for %r: %d connections already", account, self.limits.max_connections)
            if self.tell is not None:  # its connected clients hear why (the new one gets CONNACK 5)
                await self.tell(account, connection_refused(client_id, self.limits.max_connections))
            return NOT_AUTHORIZED, trusted
        limit = self.limits.max_sessions
        if not incoming.clean_session and refuse_new_session(persistent_of(account), client_id, limit):
            log.warning(
                "CONNECT refused for %r: %d persistent sessions, all connected", account, self.limits.max_sessions
            )
            if self.tell is not None:  # its connected clients hear why (the new one gets CONNACK 5)
                await self.tell(account, session_refused(client_id, self.limits.max_sessions))
            return NOT_AUTHORIZED, trusted
        return code, trusted

    def hold_clients(self) -> None:
        """Until ``workers_ready``, a client's CONNACK waits (the workers' accounts come in): a
        client let in earlier would ask workers not yet there (``imcli who``: "no worker answered")."""
        self._workers_ready.clear()

    def workers_ready(self) -> None:
        self._workers_ready.set()

    async def _until_workers_ready(self) -> None:
        if self._workers_ready.is_set():
            return
        with contextlib.suppress(TimeoutError):  # workers that never come: the client's requests will say so
            await asyncio.wait_for(self._workers_ready.wait(), WORKERS_READY_WAIT)

    def too_many_connections(self, account: str, replaces_own: bool) -> bool:
        return over_connection_limit(self._open[account], replaces_own, self.limits.max_connections)

    def opened(self, account: str) -> None:
        self._open[account] += 1

    def closed(self, account: str) -> None:
        self._open[account] -= 1
        if not self._open[account]:
            del self._open[account]

    def subscription_refused(self, held: dict[str, int], topic_filter: str) -> bool:
        return over_subscription_limit(len(held), topic_filter in held, self.limits.max_subscriptions)

    async def subscription_allowed(self, session: Session, held: dict[str, int], topic_filter: str) -> bool:
        """Whether ``session`` (holding the filters ``held``) may subscribe to one more; if not, it is told."""
        if not self.subscription_refused(held, topic_filter) or self.access.is_service(session.username):
            return True
        if self.tell is not None:
            await self.tell(session.username, subscription_refused(topic_filter, self.limits.max_subscriptions))
        return False
