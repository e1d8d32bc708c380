"""One connection's message loop in one task: amqtt's ``Broker._client_message_loop`` without
its four waiter tasks, and without losing what a client sent just before it left (issue 21).

amqtt 0.12.1 runs, for every connection and for as long as it lasts, four tasks that each wait
for one thing (the end of the connection, a SUBSCRIBE, an UNSUBSCRIBE, a message the client
published) and an ``asyncio.wait`` over them: with their coroutines, contexts and callbacks,
about a quarter of the objects an idle signed-in user costs (docs/PERFORMANCE.md). And when the
end of the connection and messages were both waiting, amqtt ended the session first: messages
already acknowledged with PUBACK (and journalled) were never fanned out. A client that
publishes a burst and disconnects at once (``mosquitto_pub -l`` at the end of its input; a bot)
lost its last lines.

``run_client_loop`` is the same loop in the connection's own task: the handler
(``AckAfterJournal``) sets ``activity`` whenever a packet it handled may have left something to
do (a PUBLISH, a SUBSCRIBE or an UNSUBSCRIBE handled), and the end of the connection sets it
through its future. Each round handles what is waiting with amqtt's own methods, in amqtt's
order (subscriptions, unsubscriptions, messages), yielding to the event loop every
``FAIR_SHARE`` messages; once the connection has ended, the messages it had sent are handled
before the end is (its Last Will comes after its last message, as the client sent them).

A message read while this loop waits idle, with nothing queued ahead of it, is handled by the
connection's reader itself, in the callback that read it (``AckAfterJournal.may_deliver_now``:
a DM then leaves in the round it arrived in, not two rounds later). ``handler.loop_idle`` says
that this loop waits with nothing to do; while the reader handles a message itself
(``handler.delivering``) this loop does not start a round, so that what the client sent keeps
its order (a Last Will after the message being handled).
"""

from __future__ import annotations

import asyncio
from typing import Any

FAIR_SHARE = 32  # messages handled before the loop lets other connections' tasks run


class Bell:
    """``asyncio.Event`` for one waiter, without the Event's deque of waiters (760 bytes, empty)."""

    __slots__ = ("_rung", "_waiter")

    def __init__(self) -> None:
        self._rung = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._rung = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._rung = False

    async def wait(self) -> None:
        if self._rung:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


def _done(value: Any) -> asyncio.Future[Any]:
    """A finished future holding ``value``: amqtt's ``_handle_*`` methods take their waiter's."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _idle(handler: Any, activity: Bell, *queues: Any) -> None:
    """Wait for something to do, unless ``queues`` hold some: meanwhile the reader may handle a
    message itself (``loop_idle``); if it is doing so when this wakes, wait until it is done."""
    if not all(queue.empty() for queue in queues):
        return
    handler.loop_idle = True
    try:
        await activity.wait()
    finally:
        handler.loop_idle = False
    while handler.delivering:  # the reader rings when it is done
        activity.clear()
        await activity.wait()


async def run_client_loop(broker: Any, session: Any, handler: Any) -> None:
    """Handle what ``handler``'s connection sends until it ends (``broker`` is the ``ImBroker``)."""
    activity = handler.activity = Bell()
    ended: asyncio.Future[Any] | None = handler._disconnect_waiter  # amqtt private (amqtt_adapter.py)
    if ended is None:  # amqtt's wait_disconnect() returns None at once then
        ended = _done(None)
    else:
        ended.add_done_callback(lambda _: activity.set())
    inbox = session.delivered_message_queue
    subscribing, unsubscribing = handler._pending_subscriptions, handler._pending_unsubscriptions
    try:
        while not handler.refused:  # a message the reader handled itself ends the connection
            activity.clear()
            while not subscribing.empty():
                await broker._handle_subscription(session, handler, _done(subscribing.get_nowait()))
            while not unsubscribing.empty():
                await broker._handle_unsubscription(session, handler, _done(unsubscribing.get_nowait()))
            # once it has ended, only what it sent before (a client could go on sending after a DISCONNECT)
            count = inbox.qsize() if ended.done() else None
            handled = 0
            while not inbox.empty() and (count is None or handled < count):
                if not await broker._handle_message_delivery(session, handler, _done(inbox.get_nowait())):
                    return
                handled += 1
                if not handled % FAIR_SHARE:
                    await asyncio.sleep(0)
            if ended.done():
                await broker._handle_disconnect(session, handler, ended)
                return
            await _idle(handler, activity, subscribing, unsubscribing, inbox)
    except asyncio.CancelledError:  # as amqtt's loop: a cancelled connection just ends
        return
    finally:
        handler.activity = None
        handler.loop_idle = False
        handler.loop_ended = True  # its reader waits for no more answers (imcli/broker/reader.py)
