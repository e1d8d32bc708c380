"""Lighter stand-ins for two amqtt 0.12.1 structures that every connection pays for (issue 7).

* ``SessionState`` replaces a session's ``transitions.Machine``: amqtt builds a full state
  machine (about 12 KB of Python objects and a millisecond of CPU) per connection, and
  uses of it only ``state``, ``connect()``, ``disconnect()`` and ``is_connected()``.
  ``LightSession`` (imcli/broker/amqtt_adapter.py) never builds the Machine at all: a Machine is some 170 objects in
  reference cycles, so each one swapped out was garbage only a full (generation 2)
  collection finds, and those collections stalled the event loop for 50 to 170 ms after
  every few hundred connections (issue 7: the DM latency p99).
* ``SubscriptionTable`` is ``Broker._subscriptions`` with a repr that costs nothing:
  amqtt logs ``repr(self._subscriptions)`` at debug level after every SUBSCRIBE, built
  even when debug logging is off, which made a join storm quadratic.
"""

from __future__ import annotations

import weakref

from amqtt.session import Session
from transitions import MachineError


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


class SubscriptionTable(dict[str, list[tuple[Session, int]]]):
    """amqtt's ``Broker._subscriptions`` (filter -> sessions), with a repr that costs nothing."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"
