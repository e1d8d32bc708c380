"""amqtt's per-connection reader loop, with two of its per-packet costs taken out (issue 21).

amqtt 0.12.1's ``ProtocolHandler._reader_loop`` reads each packet's fixed header through
``asyncio.wait_for(..., keepalive)``, which in Python 3.11 wraps the read in a task of its
own (a Task, its Context and a timer per packet, and a Task that lives as long as every idle
connection waits), and then handles each packet in one more task. A room's fan-out at QoS 1
makes every recipient send a PUBACK per copy: two tasks per copy, on top of the copy itself.
In a profile of a bot streaming 2,000 lines to 50 listeners (docs/PERFORMANCE.md) the reader
path took about a fifth of the broker's time.

``read_packets`` is the same loop, packet for packet and error for error, except that

* the keep-alive deadline is an ``asyncio.timeout`` around the read, in the reader's own task
  (one timer, rescheduled, no task);
* a PUBACK is handled where it is read: amqtt's ``handle_puback`` only resolves the future of
  the copy it acknowledges, synchronously, so a task for it bought nothing.

Every other packet goes to amqtt's handler in a task of its own, as before (a PUBLISH waits
for the journal and its PUBACK's write; a SUBSCRIBE for its SUBACK's), and the loop lets that
task start before it reads on, as amqtt's did.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)

log = logging.getLogger(__name__)

# packet type -> the name of amqtt's handler method run in a task of its own (CONNECT is awaited)
HANDLERS = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}


async def read_packets(handler: Any) -> None:
    """Run ``handler``'s reader loop (a ``BrokerProtocolHandler``) until its connection ends."""
    session = handler.session
    if session is None:
        raise AMQTTError("Session is not initialized.")
    if not handler._reader_ready:  # amqtt private (listed in amqtt_adapter.py)
        raise ProtocolHandlerError("Reader ready is not initialized.")
    running: set[asyncio.Task[None]] = set()  # a set, not amqtt's deque (760 bytes, empty): tasks leave it when done
    keepalive: int | None = session.keep_alive
    if keepalive is not None and keepalive <= 0:
        keepalive = None
    while True:
        try:
            handler._reader_ready.set()
            if not await _one_packet(handler, session, keepalive, running):
                break
        except MQTTError:
            log.debug("Message discarded")
        except asyncio.CancelledError:
            break
        except TimeoutError:
            handler.handle_read_timeout()
        except NoDataError:
            log.debug("%s: no data available", session.client_id)
        except Exception as exc:  # amqtt's loop ends the connection on anything else too
            log.warning("%s: unhandled exception in the reader loop: %r", type(handler).__name__, exc)
            break
    for task in list(running):
        task.cancel()
    await handler.handle_connection_closed()
    handler._reader_stopped.set()  # amqtt private (listed in amqtt_adapter.py)
    await handler.stop()


async def _one_packet(handler: Any, session: Any, keepalive: int | None, running: set[asyncio.Task[None]]) -> bool:
    """Read and dispatch one packet; False at the end of the stream."""
    reader = handler.reader
    if reader is None:
        log.warning("Reader is not initialized!")
        return False
    async with asyncio.timeout(keepalive):
        fixed_header = await MQTTFixedHeader.from_stream(reader)
    if not fixed_header:
        return False
    kind = fixed_header.packet_type
    if kind in (RESERVED_0, RESERVED_15):
        log.warning("%s sent a reserved packet type: closing the connection", session.client_id)
        await handler.handle_connection_closed()
        return True
    packet = await packet_class(fixed_header).from_stream(reader, fixed_header=fixed_header)
    await handler.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
    if kind == PUBACK:
        await handler.handle_puback(packet)  # resolves one future; never suspends
    elif kind == CONNECT:
        await handler.handle_connect(packet)
    elif kind in HANDLERS:
        task = asyncio.create_task(getattr(handler, HANDLERS[kind])(packet))
        running.add(task)
        task.add_done_callback(running.discard)
        # one event-loop round before the next packet, as amqtt's task per read gave: the tasks of
        # packets read in a row then answer in their order (a PUBREL's PUBCOMP before the PINGRESP
        # of a PINGREQ behind it)
        await asyncio.sleep(0)
    else:
        log.warning("%s: unhandled packet type %s", session.client_id, kind)
    return True
