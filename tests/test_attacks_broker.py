"""Attacks on the broker's issue-15 mechanisms with inputs nobody wrote down (raw sockets).

Each test failed before the fix it names.
"""

from __future__ import annotations

import socket

from imcli.serve.host import ServeInfo
from tests.rawmqtt import connect_packet, read_packets


def _connack(info: ServeInfo, username: bytes, password: bytes, client_id: bytes = b"") -> int:
    with socket.create_connection((info.address.host, info.address.port), timeout=10) as sock:
        sock.sendall(connect_packet(client_id, username, password))
        got, _closed = read_packets(sock, lambda p: len(p) >= 1)
    assert got and got[0][0] == 0x20, got
    return got[0][1][1]


def test_a_username_no_account_can_have_is_not_kept_by_the_login_throttle(server: ServeInfo) -> None:
    """A 60 KB username (or any that is no account name) failed like a wrong password and was
    kept, whole, as a key of the per-account and per-(account, address) tables: 10,000 of them
    (from enough addresses: an IPv6 /48 has 65,536 /64s) held 600 MB. It is refused (CONNACK 4)
    without a password check and counted against its address alone (connection_gate.py)."""
    assert server.broker is not None
    throttle = server.broker.admission.gate.throttle
    for i in range(3):
        name = f"{i}" + "X" * 60_000
        assert _connack(server, name.encode(), b"wrong") == 4
    for odd in ("Alice", " alice", "alice\t", "a" * 33, "-x", "\u0430lice"):
        assert _connack(server, odd.encode(), b"wrong") == 4
    keys = [*throttle.accounts._entries, *(a for a, _ in throttle.pairs._entries)]
    assert all(len(k) <= 32 for k in keys), [k[:40] for k in keys]
    assert len(throttle.addresses) == 1  # every one of them counted against 127.0.0.1
