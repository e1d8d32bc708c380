"""The broker arms no timer per packet it writes (issue 21: no stall over 50 ms at 10,000 users).

amqtt's protocol handler moves a write timer (``call_later``, then ``cancel`` at the next packet)
at every packet it writes, for a ``handle_write_timeout`` that does nothing on a broker. asyncio
keeps a cancelled timer in its heap until half of the heap is cancelled, then rebuilds the heap
in one round of the loop, from every timer at once: with 10,000 users, each answered a PINGRESP
every 30 s, that round held the loop 20 ms and more (benchmarks/stalltrace.py, docs/PERFORMANCE.md).
``AckAfterJournal.attach`` (imcli/broker/amqtt_adapter.py) arms none.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.limits import Limits
from imcli.broker.settings import BrokerSettings
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import connect_packet, password_of, read_packets

PINGREQ, PINGRESP = b"\xc0\x00", 0xD0
PINGS = 50


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServeInfo]:
    limits = Limits(max_connections=100)
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0, limits=limits), workers=False) as info:
        AccountStore(info.data_dir).add("alice", password_of("alice"))
        yield info


def _timers(info: ServeInfo) -> tuple[int, list[object]]:
    """asyncio's count of cancelled timers in the broker's loop, and every scheduled timer's callback
    (read in the loop itself; asyncio private, read only)."""
    assert info.broker is not None
    loop = info.broker._loop  # amqtt private: the broker's loop

    async def read() -> tuple[int, list[object]]:
        return loop._timer_cancelled_count, [h._callback for h in loop._scheduled]

    return asyncio.run_coroutine_threadsafe(read(), loop).result(10)


def test_answering_pings_arms_and_cancels_no_timer(broker: ServeInfo) -> None:
    """A client with a keep-alive sends PINGREQs: each is answered, no write timer is armed for the
    connection, and no timer is cancelled per answer (amqtt's handler: one per PINGRESP)."""
    sock = socket.create_connection((broker.address.host, broker.address.port), timeout=10)
    sock.sendall(connect_packet(b"alice:pings", b"alice", password_of("alice").encode(), keepalive=30))
    assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(0x20, b"\x00\x00")]
    assert broker.broker is not None
    handler = broker.broker.session_table()["alice:pings"][1]
    cancelled_before, _ = _timers(broker)
    for _ in range(PINGS):
        sock.sendall(PINGREQ)
        assert read_packets(sock, lambda p: len(p) >= 1)[0] == [(PINGRESP, b"")]
    cancelled_after, callbacks = _timers(broker)
    sock.close()
    assert cancelled_after - cancelled_before < PINGS // 5, (cancelled_before, cancelled_after)
    assert handler._keepalive_task is None  # amqtt private (AMQTT_PRIVATE): its write timer
    assert not [c for c in callbacks if getattr(c, "__func__", None) is type(handler).handle_write_timeout]
