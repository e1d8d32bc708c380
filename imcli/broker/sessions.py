"""A CONNECT's session: started, resumed or taken over, and lighter stand-ins for two amqtt
0.12.1 structures that every connection pays for (issue 7).

* ``start_session`` and ``connect_session`` are amqtt's own handling of the session of a
  CONNECT admitted (imcli/broker/admission.py), run only *after* admission: amqtt deletes,
  merges or takes over the session of the client id before it authenticates;
  ``read_timeout`` is the keep-alive with the grace MQTT-3.1.2-24 allows, and
  ``close_silent`` ends a connection that let it pass (amqtt does nothing then: a silent
  client stayed for ever).

* ``SessionState`` replaces a session's ``transitions.Machine``: amqtt builds a full state
  machine (about 12 KB of Python objects and a millisecond of CPU) per connection, and
  uses of it only ``state``, ``connect()``, ``disconnect()`` and ``is_connected()``.
  ``LightSession`` (imcli/broker/amqtt_adapter.py) never builds the Machine at all: a Machine is some 170 objects in
  reference cycles, so each one swapped out was garbage only a full (generation 2)
  collection finds, and those collections stalled the event loop for 50 to 170 ms after
  every few hundred connections (issue 7: the DM latency p99).
* ``LeanQueue`` replaces the four ``asyncio.Queue`` objects of every connection (a session's
  delivered and offline queues, a handler's pending SUBSCRIBEs and UNSUBSCRIBEs): an
  ``asyncio.Queue`` holds three deques and an ``Event`` with a fourth, 760 bytes each even
  when empty, some 12 KB of the 39 KB an idle signed-in user cost (issue 21); a ``LeanQueue``
  holds its items' deque only while it has items.
* ``SubscriptionTable`` is ``Broker._subscriptions`` with a repr that costs nothing:
  amqtt logs ``repr(self._subscriptions)`` at debug level after every SUBSCRIBE, built
  even when debug logging is off, which made a join storm quadratic. Each filter's
  subscriptions are ``Subscribers``, a client id's found in O(1): amqtt kept a list and scanned
  it on every SUBSCRIBE (is it there already?) and every removal, so 10,000 users holding one
  filter (``im/presence/+``, which every ``imcli listen`` holds) cost 414 us per SUBSCRIBE on
  average when they joined (issue 21), and up to as much per filter when they left.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from amqtt.session import INCOMING, Session
from amqtt.utils import gen_client_id
from transitions import MachineError

log = logging.getLogger(__name__)

# what a CONNECT that resumes a persistent session brings to it (amqtt copies all but will_retain)
_RESUMED = ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive", "username", "password")


async def start_session(
    incoming: Session,
    table: Mapping[str, tuple[Session, Any]],
    delete_session: Callable[[str], Awaitable[None]],
    disconnect_delay: Any,
    close_current: Callable[[Any], Awaitable[None]] | None = None,
) -> Session:
    """The session an admitted CONNECT (``incoming``) goes on with: a clean one replaces any
    its client id had (or gets a random id), a persistent one resumes the one in ``table``
    with this CONNECT's Will, keep-alive and credentials. ``parent`` is 1 for a resumed one.
    Its keep-alive becomes its ``read_timeout`` (``disconnect_delay``: amqtt's setting).

    A clean one whose client id is connected now first has that connection closed
    (``close_current``, given its handler; MQTT-3.1.4-2), as ``connect_session`` closes the
    connection of a resumed one: amqtt only deleted the session, and the old connection lived
    on without it, still publishing as that client, its Last Will due whenever it ended."""
    session = incoming
    if incoming.clean_session:
        if incoming.client_id:
            current = table.get(incoming.client_id)
            if close_current is not None and current is not None and current[0].transitions.is_connected():
                await close_current(current[1])
            await delete_session(incoming.client_id)
        else:
            incoming.client_id = gen_client_id()
        incoming.parent = 0
    elif incoming.client_id in table:
        session, _ = table[incoming.client_id]
        for attr in _RESUMED:
            setattr(session, attr, getattr(incoming, attr))
        session.parent = 1
    else:
        incoming.parent = 0
    session.keep_alive = read_timeout(session.keep_alive, disconnect_delay)
    return session


def read_timeout(keep_alive: int, delay: Any) -> int:
    """How long the broker waits to hear from a client with ``keep_alive`` (0: for ever):
    1.5 times it, and at least ``delay`` (amqtt's ``timeout-disconnect-delay``) more
    (MQTT-3.1.2-24; then ``close_silent``)."""
    if keep_alive > 0 and isinstance(delay, int):
        return keep_alive + max(delay, keep_alive // 2)
    return keep_alive


def close_silent(
    writer: Any, client_id: str | None, why: str = "nothing heard within its keep-alive"
) -> asyncio.Future[None]:
    """Nothing came from a client within its ``read_timeout``: it is gone, and its connection
    is closed (MQTT-3.1.2-24); its reader loop then ends as on EOF and its Last Will fires.
    Also for a client past ``unreleased_refused``."""
    log.info("%s: %s, closing", client_id, why)
    closing: asyncio.Future[None] = asyncio.ensure_future(writer.close())
    return closing


def no_pubrel(session: Session | None, message: Any, limit: int) -> bool:
    """Whether ``message``, a QoS 2 PUBLISH read from ``session``'s client, is one too many: the
    client holds ``limit`` received (PUBREC sent) and not released by their PUBREL (a resent one,
    same packet id, is not one more). amqtt keeps each, payload and task, until its PUBREL, which
    a client need never send: 1,500 of 200 KB held 290 MB, and 65,535 packet ids are allowed.
    The connection is then closed (``close_silent``)."""
    if session is None or message.direction != INCOMING:
        return False
    held = session.inflight_in
    return message.packet_id not in held and len(held) >= limit


async def connect_session(session: Session, close_current: Callable[[], Awaitable[None]]) -> None:
    """Mark ``session`` connected; if it already is (same account, same client id), the
    connection holding it is closed (``close_current``) and this one takes it over."""
    while True:
        try:
            session.transitions.connect()
        except (MachineError, ValueError):
            if session.transitions.is_connected():
                await close_current()
                return
            await asyncio.sleep(1)  # the old connection of this session is still closing
        else:
            return


class SessionState:
    """The session state machine amqtt uses: new -> connected <-> disconnected.

    It holds its session weakly: session -> state -> session would be a reference cycle,
    and an ended session (with its queues: about 40 objects) would wait for a full garbage
    collection instead of being freed when the broker lets go of it.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session, state: str = "new") -> None:
        self._session = weakref.ref(session)
        self.state = state

    def connect(self) -> None:
        if self.state == "connected":  # what transitions.Machine raises, and amqtt catches
            raise MachineError(f'"Can\'t trigger event connect from state {self.state}!"')
        self.state = "connected"
        session = self._session()
        if session is not None:
            session._on_enter_connected()  # amqtt private (listed in amqtt_adapter.py): the Machine's on_enter

    def disconnect(self) -> None:
        self.state = "disconnected"
        session = self._session()
        if session is not None:
            session._on_enter_disconnected()  # amqtt private (listed in amqtt_adapter.py): the Machine's on_enter

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def is_new(self) -> bool:
        return self.state == "new"


T = TypeVar("T")


class LeanQueue(asyncio.Queue[T]):
    """An unbounded ``asyncio.Queue`` as amqtt uses one (``put``, ``put_nowait``, ``get``,
    ``get_nowait``, ``qsize``, ``empty``, ``full``) that holds no deque while it is empty and
    none for its waiters. ``task_done`` and ``join`` (which nobody here uses) are refused."""

    def __init__(self) -> None:  # asyncio.Queue's own builds the deques and Event this class avoids
        self._items: collections.deque[T] | None = None
        self._waiting: list[asyncio.Future[None]] | None = None

    @property
    def maxsize(self) -> int:
        return 0

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    async def put(self, item: T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._waiting is None:
                self._waiting = []
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif self._items:  # woken, but cancelled: the next waiter takes the item
                    self._wake_one()
                raise
        return self.get_nowait()

    def task_done(self) -> None:
        raise NotImplementedError("LeanQueue does not count finished tasks")

    async def join(self) -> None:
        raise NotImplementedError("LeanQueue does not count finished tasks")

    def __repr__(self) -> str:
        return f"<LeanQueue of {self.qsize()}>"


class Subscribers:
    """One filter's subscriptions: what amqtt kept as a list of (session, granted QoS), in the order
    they came, iterated as such (over a copy: a caller may await between two), a client id's found in
    O(1). As amqtt's, one per client id: a SUBSCRIBE again keeps the QoS first granted."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[str | None, tuple[Session, int]] = {}

    def __iter__(self) -> Iterator[tuple[Session, int]]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"<{len(self._by_id)} subscribers>"

    def add(self, session: Session, qos: int) -> bool:
        """Whether ``session``'s client id was not here yet (and now is, at ``qos``)."""
        if session.client_id in self._by_id:
            return False
        self._by_id[session.client_id] = (session, qos)
        return True

    def remove(self, session: Session) -> bool:
        """Whether the subscription of ``session``'s client id was here (and now is not)."""
        return self._by_id.pop(session.client_id, None) is not None


class SubscriptionTable(dict[str, Subscribers]):
    """amqtt's ``Broker._subscriptions`` (filter -> ``Subscribers``), with a repr that costs nothing."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"

    def add(self, topic_filter: str, session: Session, qos: int) -> bool:
        subscribers = self.get(topic_filter)
        if subscribers is None:
            subscribers = self[topic_filter] = Subscribers()
        return subscribers.add(session, qos)

    def remove(self, topic_filter: str, session: Session) -> bool:
        subscribers = self.get(topic_filter)
        return subscribers is not None and subscribers.remove(session)
