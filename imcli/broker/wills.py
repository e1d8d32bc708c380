"""Last Wills: the Will a CONNECT leaves is held by that connection alone and fires, checked,
at most once, when that connection ends without DISCONNECT.

amqtt keeps the Will in the session, which a resumed or taken-over persistent session
shares with the next connection, and when a connection ends broadcasts whatever Will the
session holds by then (perhaps the next connection's), unchecked. Here each connection's
protocol handler (``AckAfterJournal`` in imcli/broker/amqtt_adapter.py) holds the Will of
its own CONNECT, taken once: published, or discarded by DISCONNECT (MQTT-3.1.2-8, -10).

A Will is a publish that happens later: it passes the publish checks
(imcli/broker/publish_checks.py) when it fires, as an ordinary PUBLISH of it would
(issue 15). Its sender is gone, so a Will dropped is only logged.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from amqtt.session import Session

from imcli.broker.publish_checks import Deliver, PublishChecks

log = logging.getLogger(__name__)


class Will(NamedTuple):
    """The Last Will a CONNECT left: published, checked, if its connection ends without DISCONNECT."""

    topic: str
    data: bytes
    qos: int | None
    retain: bool


def will_of(session: Session) -> Will | None:
    """The Will of a CONNECT, as amqtt parsed it into its (not yet resumed) session."""
    if not session.will_flag:
        return None
    return Will(
        session.will_topic or "", bytes(session.will_message or b""), session.will_qos, bool(session.will_retain)
    )


class LastWills:
    """Fires the Will of a connection that ended without DISCONNECT, if the publish checks let it."""

    def __init__(self, publishing: PublishChecks, deliver: Deliver) -> None:
        self.publishing = publishing
        self.deliver = deliver

    async def connection_ended(self, session: Session, will: Will | None, *, disconnected: bool) -> None:
        """``will`` is the one the connection held (already taken from it); DISCONNECT discards it."""
        if will is not None and not disconnected:
            await self.fire(session, will)

    async def fire(self, session: Session, will: Will) -> None:
        decision = self.publishing.judge(session.username, will.topic, len(will.data), retain=will.retain)
        if not decision.deliver:  # its sender is gone: nobody to tell
            why = decision.telling.text if decision.telling is not None else "over the publish rate"
            log.info("Last Will of %s on %s dropped: %s", session.client_id, will.topic, why)
            return
        # journalled like a QoS 0 publish (a Will has no PUBACK), and delivered as an ordinary
        # publish is: at each subscription's QoS. amqtt forced the Will's QoS on every copy: a QoS 2
        # Will went as QoS 2 to QoS 0 subscribers and into the offline queues of their persistent sessions
        await self.deliver(session, will.topic, will.data, qos=will.qos or 0, retain=will.retain, journal=True)
