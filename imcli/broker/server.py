"""The embedded broker as ``imcli serve`` runs it: ``EmbeddedBroker`` starts and stops an
``ImBroker``, amqtt's ``Broker`` with this project's rules.

Where each part lives:

* imcli/broker/amqtt_adapter.py: ``ImBroker``, amqtt's overrides as thin methods that
  delegate to the modules below, the hook classes on amqtt's protocol handler and session,
  and every private name of amqtt the broker relies on (``AMQTT_PRIVATE``, checked by
  tests/test_amqtt_private.py);
* imcli/broker/listeners.py: the listening sockets (a listen backlog) and each accepted
  connection until it ends (pending, output-bounded, closed at shutdown);
* imcli/broker/pending.py: connections that have not sent their CONNECT yet, bounded per
  address and in all;
* imcli/broker/packets.py: amqtt's parser kept inside each packet, a packet size cap and
  a deadline for unfinished packets and for the CONNECT;
* imcli/broker/reader.py: every complete packet of a read handled in the connection's own
  task (a PUBLISH read while nothing before it waits: its checks, fan-out, journal and PUBACK
  at once), PUBACKs gathered into one write;
* imcli/broker/client_loop.py: each connection's message loop in one task, what a client sent
  before it left handled before its end;
* imcli/broker/teardown.py: a connection's end (once its last packet is read) waits for a turn,
  a slice of connections per event-loop round, so a mass leave does not hold the loop;
* imcli/broker/connection_gate.py: a CONNECT is authenticated and its client id bound to
  its account *before* any session is touched (amqtt deletes, merges or takes over the
  session of the client id first: a wrong password could wipe or kick the victim);
* imcli/broker/admission.py: the gate, then connections per account and persistent
  sessions per account (refused with CONNACK before any session is touched); subscriptions
  per connection;
* imcli/broker/sessions.py: a CONNECT's session started, resumed or taken over (after
  admission), the keep-alive's read timeout and the close of a client silent past it, and
  lighter stand-ins for amqtt's per-connection state machine and subscription table;
* imcli/broker/publish_checks.py: rate, size, retained chat and the topic ACL, with a
  notice to the sender (amqtt drops a refused publish silently, PUBACK included), for
  every PUBLISH and for every Last Will when it fires; every route a PUBLISH takes (the
  message loop's queue, the reader's own handling, a chat line's and a chunk's direct
  paths) runs one list of steps, ``ImBroker.publish`` (imcli/broker/amqtt_adapter.py);
* imcli/broker/wills.py: a Last Will held by its own connection, fired at most once,
  checked, unless the connection ended with DISCONNECT;
* imcli/broker/output.py: what the broker holds for one connection is bounded (QoS 0
  dropped, then the connection closed) for clients that do not read, and nothing more is
  read from one while its output is past its high-water mark;
* imcli/broker/topic_access.py: the ACL (imcli/broker/acl.py) with the broker's roles,
  groups and friends;
* imcli/broker/fanout.py: indexed matching and batched writes instead of one task per copy;
* imcli/broker/retained.py: retained state indexed, learnt by the ACL, kept across restarts;
  a resumed session gets the retained messages of its own filters only, checked (amqtt
  sends every CONNECT those of every filter anyone subscribed to, unchecked);
* imcli/broker/session_upkeep.py: persistent sessions expire, are dropped past the
  account's limit (longest idle first), their offline queue is bounded (and delivered as
  ordinary, checked messages, not with retain=1), removed accounts end;
* imcli/broker/journal.py: a QoS 1 chat message is in the archive before its PUBACK;
* imcli/broker/notices.py: what the sender is told;
* imcli/broker/limits.py: the limits per account and the publish rate's token buckets (the
  chat rate, and the file-transfer rate of a file's chunks), as pure code;
* imcli/broker/throttle.py: failed logins and registrations slowed down, password checks bounded;
* imcli/broker/accounts.py, imcli/broker/invites.py: accounts and invite codes in the data directory;
* imcli/broker/devices.py: device credentials (issue 17), checked with a keyed hash;
* imcli/broker/device_service.py: the broker's own answers to device requests (issue, list,
  revoke, passwd, tokens), and a revoked device's connections and sessions ended;
* imcli/broker/webapp.py: the web client's files and the Origin rule on the WebSocket port;
* imcli/broker/gcpause.py: short, rare garbage-collection pauses.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable
from pathlib import Path

from imcli.broker.amqtt_adapter import ImBroker
from imcli.broker.journal import ArchiveWriter
from imcli.broker.settings import TLS_LISTENER, WS_LISTENER, BrokerSettings

__all__ = [
    "TLS_LISTENER",
    "WS_LISTENER",
    "BrokerSettings",
    "EmbeddedBroker",
    "ImBroker",
    "check_tls_files",
    "new_service_password",
]


class EmbeddedBroker:
    """Start and stop an ``ImBroker`` (async context manager) that journals into ``open_archive(data_dir)``."""

    def __init__(self, settings: BrokerSettings, open_archive: Callable[[Path], ArchiveWriter]) -> None:
        self.settings = settings
        self._open_archive = open_archive
        self.broker: ImBroker | None = None

    async def __aenter__(self) -> ImBroker:
        self.broker = ImBroker(self.settings, self._open_archive)
        await self.broker.start()
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None


def check_tls_files(cert: Path, key: Path) -> None:
    """Raise ``ValueError`` saying what is wrong with a certificate/key pair (amqtt would only
    fail later, inside its start-up, with a wrapped traceback)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"no such file: {exc.filename}") from exc
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot use {cert} with {key}: {reason}") from exc


def new_service_password() -> str:
    return secrets.token_urlsafe(24)
