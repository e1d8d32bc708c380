"""Group membership, dm-policy and accounts for a NATS 2.9 cluster, through its configuration.

NATS 2.9 has no dynamic-security API and no auth callout (2.10 added it). What it offers is
a configuration reload (SIGHUP, ``nats-server --signal reload``) and accounts. So the group
worker, given a ``NatsAuth`` (``imcli workers --nats-users FILE``), writes the whole user list
of the ``IM`` account as one include file (``deploy/nats/nats.conf`` includes it), each user
with subject permissions that are exactly the topic contract of ``imcli.broker.acl`` plus that
user's groups and dm-policy, and then asks every node to reload.

MQTT topics map onto NATS subjects: ``/`` is ``.``, ``+`` is ``*``, ``#`` is ``>`` (and ``a/#``
also matches ``a`` itself, so it is two subjects). Three facts of nats-server 2.9.10 shape
this (seen on a three-node cluster here, tests/test_nats.py shows each):

- A subscribe ``deny`` is not applied per delivery to an MQTT wildcard subscription, so
  ``im/group/+/msg/+`` cannot be narrowed to one's groups: a member is allowed exactly
  ``im.group.<g>.msg.*`` for each of its groups, and the wildcard is refused.
- A reload that changes the account's user list disconnects every MQTT client of the
  account; they come back at once (persistent sessions survive, re-checked against the new
  permissions). So changes are coalesced (``DEBOUNCE``), and a reload costs every connected
  client a reconnect: fine for a team, the limit of this design for a large cluster
  (docs/SCALING.md).
- Friends-only DMs are refused at publish: each sender gets a ``deny`` on the DM topic of
  every friends-only user who does not take its DMs, so nobody (the archive included)
  receives it.
- A node applies a reload on its own time (SIGHUP; the other machines' watchers later still),
  and nothing on the MQTT side says when. A line sent to a group right after an invite would be
  dropped by a node that still has the old rights. So a group or friends change is answered
  only once it is in force on every node the worker knows (its ``--host`` list): each users file
  carries a fresh stamp, a subject only the worker's own account may subscribe
  (``imcli-reload/<stamp>``), and a probe connection to each node (kept open) subscribes it
  (QoS 0: no JetStream) until the node grants it (``NatsAuth.attach``, ``RELOAD_WAIT``).

Accounts come from a password file of ``name:password`` lines (the password in clear or as a
bcrypt hash ``$2a$...``, which nats-server checks itself). Service accounts
(``imcli.core.rules.SERVICE_ACCOUNTS``) get the rights of ``deploy/mosquitto/aclfile``'s sections.
This module cannot import ``imcli.broker`` (a worker beside the broker, docs/ARCHITECTURE.md), so the
contract is restated below, and a test compares the two.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from imcli.core.errors import BrokerUnreachable, ImcliError
from imcli.core.mqtt import BrokerAddress, Credentials, MqttClient
from imcli.core.rules import ARCHIVE_ACCOUNT, FILES_ACCOUNT, SERVICE_ACCOUNTS, dm_senders
from imcli.core.wire import Friends, GroupInfo, Topics, is_name

log = logging.getLogger(__name__)

ACCOUNT = "IM"
MQTT_INTERNAL = "$MQTT.>"  # nats-server's own MQTT subjects: every MQTT client needs them both ways
DEBOUNCE = 0.3  # seconds: changes within this are one reload (each reload reconnects every client)
POLL = 2.0  # seconds between looks at the password file
# a change is answered once every node grants the new stamp, or after this long (a node that is slow
# to reload: logged; the answer must still come within a client's request timeout, 5 s by default)
RELOAD_WAIT = 4.0
PROBE_EVERY = 0.05  # seconds between two looks at a node that has not reloaded yet
STAMP_TOPIC = "imcli-reload/{stamp}"  # outside the prefix: no user's or service's rights match it


# The topic contract of imcli.broker.acl (USER_WRITE, USER_READ, SERVICE_WRITE, SERVICE_READ) and
# deploy/mosquitto/aclfile's service sections, under the prefix; tests/test_nats.py checks they agree.
USER_WRITE = ("room/+/%u", "user/+/dm/%u", "status/%u/+", "request/%u/+", "upload/%u/+", "fetch/%u/+")
USER_READ = ("room/#", "user/%u/#", "presence/#", "events", "profile/#")
SERVICE_WRITE = (
    "user/+/reply/+",
    "user/+/notice",
    "presence/+",
    "profile/+",
    "events",
    "group/+/info",
    "user/+/friends",
    "status/+/+",
    "user/+/file/+",
)
SERVICE_READ = ("#",)
# least privilege, as the aclfile's `user archive` and `user files` (with its patterns' reads)
SERVICE_RIGHTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    ARCHIVE_ACCOUNT: (
        ("user/+/reply/+", "user/%u/notice"),
        ("room/#", "user/+/dm/+", "group/+/info", "group/+/msg/+", "request/+/+", "presence/#", "events", "profile/#"),
    ),
    FILES_ACCOUNT: (
        ("user/+/reply/+", "user/+/file/+", "user/%u/notice"),
        (
            "upload/+/+",
            "fetch/+/+",
            "group/+/info",
            "user/+/friends",
            "request/+/+",
            "room/#",
            "presence/#",
            "events",
            "profile/#",
        ),
    ),
}


def subjects(mqtt_filter: str) -> list[str]:
    """The NATS subjects that an MQTT topic filter names (``a/#`` is ``a`` and ``a.>``)."""
    levels = ["*" if lvl == "+" else ">" if lvl == "#" else lvl for lvl in mqtt_filter.split("/")]
    if levels[-1] == ">":
        return [".".join(levels[:-1]), ".".join(levels)]
    return [".".join(levels)]


def _all(filters: Iterable[str]) -> list[str]:
    return [s for f in filters for s in subjects(f)]


def read_passwords(path: Path) -> dict[str, str]:
    """``name:password`` lines; lines with an invalid name are skipped with a warning."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, password = line.partition(":")
        if not sep or not password:
            continue
        if not is_name(name):
            log.warning("skipping %r in %s: not an account name", name[:40], path)
            continue
        found[name] = password
    return found


class NatsPermissions:
    """The group worker's records as per-user NATS permissions. Not thread-safe: the worker's lock."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._members: dict[str, frozenset[str]] = {}
        self._public: set[str] = set()
        self._dm_senders: dict[str, frozenset[str]] = {}
        # the users file's stamp and the one account that may subscribe it (``NatsAuth.attach``)
        self.stamp: str | None = None
        self.prober: str | None = None

    def group_changed(self, name: str, info: GroupInfo | None) -> None:
        self._members.pop(name, None)
        self._public.discard(name)
        if info is not None and info.members:
            self._members[name] = frozenset(info.members)
            if not info.private:
                self._public.add(name)

    def friends_changed(self, record: Friends) -> None:
        senders = dm_senders(record.account, record.dm_policy, record.friends)
        if senders is None:
            self._dm_senders.pop(record.account, None)
        else:
            self._dm_senders[record.account] = senders

    # ---------------------------------------------------------------- rights out

    def user(self, name: str) -> dict[str, dict[str, list[str]]]:
        t, p = self.topics, self.topics.prefix
        groups = sorted(g for g, members in self._members.items() if name in members)
        pub = [f"{p}/{rule}".replace("%u", name) for rule in USER_WRITE]
        pub += [t.group_msg(g, name) for g in groups]
        sub = [f"{p}/{rule}".replace("%u", name) for rule in USER_READ]
        sub += [t.group_msg_filter(g) for g in groups]
        sub += [t.group_info(g) for g in sorted(set(groups) | self._public)]
        deny = [t.dm(to, name) for to, senders in sorted(self._dm_senders.items()) if name not in senders]
        publish: dict[str, list[str]] = {"allow": [MQTT_INTERNAL, *_all(pub)]}
        if deny:
            publish["deny"] = _all(deny)
        return {"publish": publish, "subscribe": {"allow": [MQTT_INTERNAL, *_all(sub)]}}

    def service(self, name: str) -> dict[str, dict[str, list[str]]]:
        p = self.topics.prefix
        write, read = SERVICE_RIGHTS.get(name, (SERVICE_WRITE, SERVICE_READ))
        own = [f"user/{name}/#"]  # its notice topic: the sync marker every worker reads back
        stamp = _all([STAMP_TOPIC.format(stamp=self.stamp)]) if self.stamp and name == self.prober else []
        return {
            "publish": {"allow": [MQTT_INTERNAL, *_all(f"{p}/{r}".replace("%u", name) for r in write)]},
            "subscribe": {"allow": [MQTT_INTERNAL, *_all(f"{p}/{r}" for r in [*read, *own]), *stamp]},
        }

    def render(self, passwords: Mapping[str, str]) -> str:
        """The include file: account ``IM`` with every user and its permissions."""
        users = []
        for name in sorted(passwords):
            rights = self.service(name) if name in SERVICE_ACCOUNTS else self.user(name)
            users.append({"user": name, "password": passwords[name], "permissions": rights})
        body = "[\n" + "".join(f"      {json.dumps(u)}\n" for u in users) + "    ]"
        return (
            "# Written by imcli's group worker (imcli workers --nats-users): do not edit, it is rewritten\n"
            f"accounts {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: {body}\n  }}\n}}\n"
        )


class NatsAuth:
    """Keeps ``users_file`` equal to the worker's rights and ``passwd``'s accounts, and reloads the nodes.

    ``pidfiles``: the nodes on this machine (``pid_file`` in nats.conf), each sent SIGHUP after a
    write. Nodes elsewhere reload through their own watcher (deploy/nats/README.md).
    """

    def __init__(self, topics: Topics, passwd: Path, users_file: Path, pidfiles: Iterable[Path] = ()) -> None:
        self.permissions = NatsPermissions(topics)
        self.passwd = passwd
        self.users_file = users_file
        self.pidfiles = tuple(pidfiles)
        self.reloads = 0  # how many times the file was written and the nodes told
        self.reloaded = threading.Condition()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._passwords = read_passwords(passwd)
        self._due: threading.Timer | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="imcli-nats-passwd", daemon=True)
        self._address: BrokerAddress | None = None
        self._credentials: Credentials | None = None
        self._probes: dict[tuple[str, int], MqttClient] = {}  # used in the worker's thread only

    def attach(self, address: BrokerAddress, credentials: Credentials) -> None:
        """The nodes to check (every endpoint of ``address``) and the account that checks them: from
        now on each users file carries a stamp only this account may subscribe (the group worker's)."""
        self._address, self._credentials = address, credentials
        with self._lock:
            self.permissions.prober = credentials.username

    def start(self) -> None:
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._due is not None:
                self._due.cancel()
        for node in list(self._probes):
            self._drop(node)

    def reload_passwords(self) -> None:
        """Read the password file now (not at the next look) and apply at once."""
        passwords = read_passwords(self.passwd)
        with self._lock:
            self._passwords = passwords
        self.changed(now=True)

    def changed(self, now: bool = False) -> None:
        """Rights changed: write and reload after ``DEBOUNCE`` (coalescing), or ``now``."""
        with self._lock:
            if self._due is not None:
                self._due.cancel()
            self._due = None
            if not now:
                self._due = threading.Timer(DEBOUNCE, self.apply)
                self._due.daemon = True
                self._due.start()
        if now:
            self.apply()

    def change_and_wait(
        self, groups: Iterable[tuple[str, GroupInfo | None]] = (), friends: Iterable[Friends] = ()
    ) -> bool:
        """These records changed: write and reload now, and return once every node has them in force."""
        with self._lock:
            for name, info in groups:
                self.permissions.group_changed(name, info)
            for record in friends:
                self.permissions.friends_changed(record)
        return self.apply_and_wait()

    def apply_and_wait(self) -> bool:
        """Write and reload now, then wait until every node has the new file in force (``in_force``)."""
        with self._lock:
            if self._due is not None:
                self._due.cancel()
            self._due = None
        stamp = self.apply()
        return stamp is None or self.in_force(stamp)

    def apply(self) -> str | None:
        """Write the users file if the rights changed, and tell the nodes; the new file's stamp (None:
        nothing changed, or no stamp without ``attach``)."""
        stamp = None
        with self._lock:
            text = self.permissions.render(self._passwords)
            try:
                old = self.users_file.read_text(encoding="utf-8")
            except OSError:
                old = None
            if text != old:
                if self.permissions.prober is not None:
                    self.permissions.stamp = stamp = secrets.token_hex(8)
                    text = self.permissions.render(self._passwords)
                tmp = self.users_file.with_name(self.users_file.name + ".tmp")
                tmp.write_text(text, encoding="utf-8")
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.users_file)
                self._signal()
        with self.reloaded:
            self.reloads += 1
            self.reloaded.notify_all()
        return stamp

    def in_force(self, stamp: str, timeout: float = RELOAD_WAIT) -> bool:
        """Every node of the attached address grants the stamp's subject (has reloaded this file),
        within ``timeout``. A node that cannot be reached is passed over: it reads the current file
        when it starts."""
        address, credentials = self._address, self._credentials
        if address is None or credentials is None:
            return True
        deadline = time.monotonic() + timeout
        waiting = list(address.endpoints)
        while waiting:
            with self._lock:  # a later file (the password watcher's) holds this change too, and its stamp
                topic = STAMP_TOPIC.format(stamp=self.permissions.stamp or stamp)
            # past the deadline a node is not asked again: the answer must still come within a client's timeout
            waiting = [
                node
                for node in waiting
                if time.monotonic() >= deadline or not self._grants(address, credentials, node, topic, deadline)
            ]
            if waiting and time.monotonic() >= deadline:
                log.warning("NATS nodes %s did not reload the users file within %gs", waiting, timeout)
                return False
            if waiting:
                time.sleep(PROBE_EVERY)
        return True

    def _grants(
        self, address: BrokerAddress, credentials: Credentials, node: tuple[str, int], topic: str, deadline: float
    ) -> bool:
        """Whether ``node`` lets the prober subscribe ``topic`` (True too if it cannot be reached). One
        probe connection per node stays open (a new MQTT connection costs the cluster JetStream
        writes): nats-server checks a SUBSCRIBE on an open connection against the reloaded rights."""
        probe = self._probes.get(node)
        try:
            if probe is None or not probe.connected:
                if probe is not None:
                    probe.close()
                at = dataclasses.replace(address, host=node[0], port=node[1], more=())
                # a client id per node: NATS sessions are cluster-wide, one id on two nodes would take turns
                device = f"reload-probe{address.endpoints.index(node) + 1}"
                # within what is left of the wait: three nodes' connects must not add up past it
                left = max(0.5, deadline - time.monotonic())
                probe = MqttClient(at, credentials, f"{credentials.username}:{device}", timeout=left)
                self._probes[node] = probe
                probe.connect()
            probe.timeout = max(0.5, deadline - time.monotonic())
            refused = probe.subscribe_each([topic], qos=0)
            if not refused:
                probe.unsubscribe([topic])
        except BrokerUnreachable as exc:
            self._drop(node)
            log.info("cannot reach NATS node %s:%d to check the reload (%s): passed over", *node, exc)
            return True
        except ImcliError:  # refused mid-reload, no SUBACK in time, disconnected: look again
            self._drop(node)
            return False
        return not refused

    def _drop(self, node: tuple[str, int]) -> None:
        probe = self._probes.pop(node, None)
        if probe is not None:
            probe.close()

    def _signal(self) -> None:
        for pidfile in self.pidfiles:
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGHUP)
            except (OSError, ValueError) as exc:
                log.warning("cannot tell the NATS node of %s to reload: %s", pidfile, exc)

    def _watch(self) -> None:
        while not self._stop.wait(POLL):
            try:
                st = self.passwd.stat()
                if (st.st_mtime_ns, st.st_size) == self._stamp:
                    continue
                self._stamp = (st.st_mtime_ns, st.st_size)
                passwords = read_passwords(self.passwd)
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot read %s: %s", self.passwd, exc)
                continue
            with self._lock:
                fresh, self._passwords = passwords != self._passwords, passwords
            if fresh:
                self.changed()
