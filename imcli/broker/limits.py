"""Per-account limits of the embedded broker, as pure code (the clock is passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field

from imcli.core.topics import DEFAULT_MAX_CHUNK
from imcli.core.wire import MAX_NOTICE_REQUESTS


@dataclass(frozen=True)
class Limits:
    publish_rate: float = 20.0  # messages per second per account, sustained
    publish_burst: int = 60  # messages an account may send at once
    # issue 16: chunks of files (max_chunk each at most) and download acknowledgements
    file_rate: float = 4000.0  # messages per second per account on upload and fetch topics
    file_burst: int = 8000
    max_file: int = 100 << 20  # bytes of one file (the files worker)
    file_quota: int = 1 << 30  # bytes one account may have stored, unfinished uploads included
    max_uploads: int = 4  # unfinished uploads one account may have going at once
    # bytes of one chunk of a file on an upload topic (the files worker's chunks), header included;
    # every other payload keeps to BrokerSettings.max_payload
    max_chunk: int = DEFAULT_MAX_CHUNK
    # output per connection (imcli/broker/output.py): bytes the broker holds for a client that does not read
    output_drop: int = 1 << 20  # past it, QoS 0 messages to that connection are dropped
    output_close: int = 8 << 20  # a message that would take it past this closes the connection
    output_stuck: float = 60.0  # seconds with output waiting at every check: the connection is closed
    max_subscriptions: int = 100  # per connection
    max_connections: int = 10  # per account (devices and one-shot commands together)
    max_queued: int = 1000  # messages kept for one offline persistent session; the archive keeps the rest
    session_expiry: float = 7 * 86400.0  # seconds a persistent session is kept while its client is away
    max_client_id: int = 128  # characters; a longer client id gets CONNACK 2 (MQTT 3.1.1 promises 23)
    max_unreleased: int = 32  # incoming QoS 2 messages one connection holds awaiting their PUBREL; one more closes it
    # issue 15, per-account quotas (imcli/broker/admission.py, session_upkeep.py, retained.py)
    max_sessions: int = 20  # persistent sessions per account, connected or not; past it the longest-idle one goes
    max_retained: int = 20  # retained status records per account (im/status/<me>/<device>, one per device)
    max_status: int = 1024  # bytes of one status message (a DeviceStatus is about 60)
    # the group worker's, carried to it by imcli serve (imcli/core/rules.py: group_creation_refusal)
    max_groups: int = 50  # groups one account owns
    group_rate: int = 10  # groups one account may create per minute
    # logins and registrations (imcli/broker/throttle.py): past the free failures of a key, each
    # further attempt on it is refused (CONNACK 3, password unchecked) until a delay has passed
    # that starts at login_backoff and doubles per further failure, up to login_backoff_cap
    login_failures: int = 5  # free failures per (account, address)
    account_failures: int = 20  # per account, from addresses it never logged in from
    address_failures: int = 20  # per address, over all accounts, registrations and invite codes
    login_backoff: float = 1.0  # seconds
    login_backoff_cap: float = 900.0  # seconds
    failures_forgotten: float = 3600.0  # seconds after a key's last failure
    throttle_entries: int = 10_000  # keys per throttle table (least recently used forgotten first)
    password_checks: int = 2  # argon2 checks at once (64 MiB each)
    password_queue: int = 128  # logins waiting for a check (~10 s of real argon2); more get CONNACK 3 at once
    registrations_per_hour: int = 10  # accounts created per address per hour
    # connections that have not sent their CONNECT yet (imcli/broker/pending.py): past these the
    # oldest is closed; the listen backlog is asyncio's (100 by default), bounded by net.core.somaxconn
    pending_per_address: int = 64
    max_pending: int = 2048
    listen_backlog: int = 4096


REQUEST_NOTICES = 10  # rate notices a second about dropped requests, beyond the one about anything
# requests dropped beyond those: named together in one notice a second per account, at most this many
# (a flood past it is not told of the rest: what the broker holds and writes for it stays bounded)
UNHEARD_REQUESTS = MAX_NOTICE_REQUESTS


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    warned: float = -1e9
    requests_warned: int = 0  # rate notices about requests in the second since requests_since
    requests_since: float = -1e9


@dataclass
class PublishRate:
    """A token bucket per account: ``allow`` spends one token or refuses."""

    rate: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def allow(self, account: str, now: float) -> bool:
        bucket = self._buckets.get(account)
        if bucket is None:
            bucket = self._buckets[account] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False

    def retry_after(self, account: str, now: float) -> float:
        """Seconds until ``account`` has a token again (0: now)."""
        bucket = self._buckets.get(account)
        if bucket is None:
            return 0.0
        tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        return max(0.0, (1.0 - tokens) / self.rate)

    def should_warn(self, account: str, now: float, request: bool = False) -> bool:
        """At most one notice a second, so a flood of refusals is not answered by a flood; and
        (``request``) up to ``REQUEST_NOTICES`` more about dropped requests, each of which has
        an asker waiting for a reply that will never come."""
        bucket = self._buckets.get(account)
        if bucket is None:  # refused by another bucket (a file's chunks): warn through this one
            bucket = self._buckets[account] = _Bucket(float(self.burst), now)
        if now - bucket.warned >= 1.0:
            bucket.warned = now
            return True
        if not request:
            return False
        if now - bucket.requests_since >= 1.0:
            bucket.requests_since, bucket.requests_warned = now, 0
        if bucket.requests_warned < REQUEST_NOTICES:
            bucket.requests_warned += 1
            return True
        return False
