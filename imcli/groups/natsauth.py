"""Group membership, dm-policy and accounts for a NATS 2.9 cluster, through its configuration.

NATS 2.9 has no dynamic-security API and no auth callout (2.10 added it). What it offers is
a configuration reload (SIGHUP, ``nats-server --signal reload``) and accounts. So the group
worker, given a ``NatsAuth`` (``imcli workers --nats-users FILE``), writes the whole user list
of the ``IM`` account as one include file (``deploy/nats/nats.conf`` includes it), each user
with subject permissions that are exactly the topic contract of ``imcli.broker.acl`` plus that
user's groups and dm-policy, and then asks every node to reload.

MQTT topics map onto NATS subjects: ``/`` is ``.``, ``+`` is ``*``, ``#`` is ``>`` (and ``a/#``
also matches ``a`` itself, so it is two subjects). These facts of nats-server 2.9.10 shape
this (seen on a three-node cluster here, tests/test_nats.py shows each):

- A subscribe ``deny`` is not applied per delivery to an MQTT wildcard subscription, so
  ``im/group/+/msg/+`` cannot be narrowed to one's groups: a member is allowed exactly
  ``im.group.<g>.msg.*`` for each of its groups, and the wildcard is refused.
- A reload makes every node parse the whole users file; it disconnects nobody but the users it
  cuts off (``cut``), also when the account's user list changes (tests/test_nats.py,
  ``test_new_account_can_log_in_once_the_worker_renders_it``). Changes are coalesced
  (``DEBOUNCE``): fine for a team, the limit of this design for a large cluster (docs/SCALING.md).
- Reloaded permissions remove a NATS subscription no longer allowed, but not an MQTT QoS 1
  subscription made before (a JetStream consumer delivering to a ``$MQTT.sub.`` subject): a
  kicked member would read on until he reconnects. So when someone else takes a user out of a
  group (a kick), his connections are ended first (``NatsAuth.cut``): one file takes every right
  to read from him, the next moves him to the account ``PARKED`` (no JetStream), which closes
  every connection he has as each node reloads it, and the third puts him back, new rights.
  A member who leaves is cut the same way once his reply is out (``GroupWorker.send_reply``).
- A reload that takes a publish right away from a user who published a retained message there,
  which was then cleared through another node, crashes that node (2.9.10: the cleared message is
  kept as a record naming its publisher, with no subscription, until the node restarts, and
  ``mqttCheckPubRetainedPerms`` removes that nil subscription). So an account removed from the
  password file stays in the users file as a ghost (``GHOST_HASH``): in ``PARKED``, with the
  publish rights it had, and a password field no password matches.
- Friends-only DMs are refused at publish: each sender gets a ``deny`` on the DM topic of
  every friends-only user who does not take its DMs, so nobody (the archive included)
  receives it.
- A node applies a reload on its own time (SIGHUP; the other machines' watchers later still),
  and nothing on the MQTT side says when. A line sent to a group right after an invite would be
  dropped by a node that still has the old rights. So a group or friends change is answered
  only once it is in force on every node the worker knows (its ``--host`` list): each users file
  carries a fresh stamp, a subject only the worker's own account may subscribe
  (``imcli-reload/<stamp>``), and a probe connection to each node (kept open) subscribes it
  (QoS 0: no JetStream) until the node grants it (``NatsAuth.attach``, ``natsprobe``).

Accounts come from a password file of ``name:password`` lines (the password in clear or as a
bcrypt hash ``$2a$...``, which nats-server checks itself). Service accounts
(``imcli.core.rules.SERVICE_ACCOUNTS``) get the rights of ``deploy/mosquitto/aclfile``'s sections.
This module cannot import ``imcli.broker`` (a worker beside the broker, docs/ARCHITECTURE.md), so the
contract is restated below, and a test compares the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from imcli.core.mqtt import BrokerAddress, Credentials
from imcli.core.rules import ARCHIVE_ACCOUNT, FILES_ACCOUNT, SERVICE_ACCOUNTS, dm_senders
from imcli.core.wire import Friends, GroupInfo, Topics, is_name
from imcli.groups.natsprobe import RELOAD_WAIT, ReloadProbe

log = logging.getLogger(__name__)

ACCOUNT = "IM"
# nats-server's own MQTT subjects: an MQTT client must be allowed to subscribe its deliveries (a QoS 1
# subscription is a JetStream consumer delivering to ``$MQTT.sub.<id>``), and nothing else there:
# 2.9.10 checks no '$' in an MQTT topic, so a SUBSCRIBE to ``$MQTT/msgs/#`` read every QoS 1 message
# as the node stored it (everyone's DMs, group lines, requests), ``$MQTT/JSA/#`` the JetStream API's
# answers (stored messages among them), and a PUBLISH to ``$MQTT/rmsgs`` put a forged retained record
# (any topic, any payload, any publisher named) into every node's retained messages, a forged
# ``$MQTT.JSA.<id>.RD`` cleared one (tests/test_nats.py: test_nobody_reads_others_messages_through_nats_…
# and test_nobody_forges_a_retained_message_through_nats_internal_subjects).
MQTT_INTERNAL = "$MQTT.sub.>"
# Every user of the users file may connect through MQTT only. That right to subscribe ``$MQTT.sub.>`` is
# what an MQTT session needs and all nats-server 2.9.10 lets an MQTT client use it for (it refuses an MQTT
# SUBSCRIBE to ``$MQTT/sub/#``), but a plain NATS client's ``SUB $MQTT.sub.>`` on the node's client port
# got every QoS 1 delivery of every MQTT session in the account: anyone's DMs, group lines, replies
# (tests/test_nats.py::test_nobody_reads_others_deliveries_through_the_nats_client_port). imcli's clients
# and workers speak MQTT only, so no account needs the NATS protocol (the operator has the monitoring port).
CONNECTION_TYPES = ["MQTT"]
DEBOUNCE = 0.3  # seconds: changes within this are one reload (each makes every node parse the users file)
POLL = 2.0  # seconds between looks at the password file
STAMP_TOPIC = "imcli-reload/{stamp}"  # outside the prefix: no user's or service's rights match it
# A user whose connections must end lives here for one reload: nats-server closes the connections of a
# user who moved to another account. No JetStream, so an MQTT CONNECT meanwhile fails before its
# CONNACK (the client tries again, as after a lost connection; a CONNACK "not authorized" would make
# imcli's clients give up), and nothing to read for a plain NATS client. He keeps his publish rights
# (nobody there receives them): on a reload nats-server 2.9.10 deletes the retained messages of a
# user who may no longer publish them, and crashes (nil pointer, mqttCheckPubRetainedPerms) where such
# a message had been cleared through another node.
PARKED = "PARKED"
# Before that he is muted for one reload (in IM, nothing to read), which removes his subscriptions
# the right way. Likely why (the 2.9.10 source): a reload closes a connection with the account as it was, so
# the node's count of route interest in a subscription closed then stays one too high in the new
# account, and it never tells the other nodes again that the subscription is back. A persistent
# session resumed on that node then got nothing from a JetStream consumer led by another node
# (the QoS 1 subscriptions made before), for over a minute (tests/test_nats.py, seen here).
MUTED = {"subscribe": {"deny": [">"]}}
# An account removed from the password file stays in the users file as a ghost, in ``PARKED``, with the
# publish rights it had (nats-server 2.9.10 keeps a retained message cleared through another node as a
# record naming its publisher until it restarts, and crashes on the first reload that takes that right
# away: ``mqttCheckPubRetainedPerms`` removes a nil subscription). Its password is a bcrypt hash of cost
# 00, which bcrypt refuses before it hashes anything: no password logs in as a ghost, and none is stored.
GHOST_HASH = "$2a$00$"  # + 53 random characters of bcrypt's alphabet
BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def ghost_password() -> str:
    """A password field no password matches (``GHOST_HASH``)."""
    return GHOST_HASH + "".join(secrets.choice(BCRYPT_ALPHABET) for _ in range(53))


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


def private_device(device: str, password: str) -> str:
    """``device`` with a suffix that only the account's password gives (``workers-3f9a...``).

    NATS 2.9 binds an MQTT client id to no user: anyone in the account who connects with a worker's
    client id takes its session over and disconnects it. So the workers' ids must not be guessable.
    The same password gives the same id, so the archive's persistent session outlives a restart."""
    digest = hmac.new(password.encode(), f"imcli nats client id {device}".encode(), hashlib.sha256).hexdigest()
    return f"{device}-{digest[:16]}"


def _all(filters: Iterable[str]) -> list[str]:
    return [s for f in filters for s in subjects(f)]


def _entry(name: str, password: str, rights: dict[str, dict[str, list[str]]]) -> dict[str, object]:
    """One user of the users file: MQTT connections only (``CONNECTION_TYPES``)."""
    return {"user": name, "password": password, "permissions": rights, "allowed_connection_types": CONNECTION_TYPES}


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
        self.muted: frozenset[str] = frozenset()  # users with nothing to read (``NatsAuth.cut``)
        self.parked: frozenset[str] = frozenset()  # users written to ``PARKED`` (``NatsAuth.cut``)
        self.published: dict[str, dict[str, list[str]]] = {}  # each user's publish rights in the last file
        self.ghosts: dict[str, tuple[str, dict[str, list[str]]]] = {}  # removed: password field, publish rights

    def recall(self, text: str) -> None:
        """The users file written before (this worker's last start): its users' publish rights, and
        its ghosts, so that an account removed while the worker was down becomes one, and a ghost
        stays one."""
        for line in text.splitlines():
            try:
                entry = json.loads(line.strip())
                name, password, publish = entry["user"], entry["password"], entry["permissions"]["publish"]
            except (ValueError, TypeError, KeyError):
                continue
            if not isinstance(name, str) or not isinstance(password, str) or not isinstance(publish, dict):
                continue
            if password.startswith(GHOST_HASH):
                self.ghosts[name] = (password, publish)
            else:
                self.published[name] = publish

    def group_changed(self, name: str, info: GroupInfo | None) -> frozenset[str]:
        """The group's new record; returns who was a member and is not any more."""
        before = self._members.pop(name, frozenset())
        self._public.discard(name)
        if info is not None and info.members:
            self._members[name] = frozenset(info.members)
            if not info.private:
                self._public.add(name)
        return before - self._members.get(name, frozenset())

    def members(self, group: str) -> frozenset[str]:
        return self._members.get(group, frozenset())

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
        publish: dict[str, list[str]] = {"allow": _all(pub)}
        if deny:
            publish["deny"] = _all(deny)
        return {"publish": publish, "subscribe": {"allow": [MQTT_INTERNAL, *_all(sub)]}}

    def service(self, name: str) -> dict[str, dict[str, list[str]]]:
        p = self.topics.prefix
        write, read = SERVICE_RIGHTS.get(name, (SERVICE_WRITE, SERVICE_READ))
        own = [f"user/{name}/#"]  # its notice topic: the sync marker every worker reads back
        stamp = _all([STAMP_TOPIC.format(stamp=self.stamp)]) if self.stamp and name == self.prober else []
        return {
            "publish": {"allow": _all(f"{p}/{r}".replace("%u", name) for r in write)},
            "subscribe": {"allow": [MQTT_INTERNAL, *_all(f"{p}/{r}" for r in [*read, *own]), *stamp]},
        }

    def render(self, passwords: Mapping[str, str]) -> str:
        """The include file: account ``IM`` with every user and its permissions, ``PARKED`` with the
        users being cut off and the ghosts of removed accounts (made here, when a user of the last
        file is no longer in ``passwords``)."""
        for name, publish in self.published.items():
            if name not in passwords and name not in self.ghosts:
                self.ghosts[name] = (ghost_password(), publish)
        self.published = {}
        users: list[dict[str, object]] = []
        parked: list[dict[str, object]] = []
        for name in sorted(passwords):
            self.ghosts.pop(name, None)  # given again: a user as any other
            rights = self.service(name) if name in SERVICE_ACCOUNTS else self.user(name)
            self.published[name] = rights["publish"]
            if name in self.muted | self.parked:
                rights = {"publish": rights["publish"], **MUTED}
            (parked if name in self.parked else users).append(_entry(name, passwords[name], rights))
        for name, (password, publish) in sorted(self.ghosts.items()):
            parked.append(_entry(name, password, {"publish": publish, **MUTED}))
        body = "[\n" + "".join(f"      {json.dumps(u)}\n" for u in users) + "    ]"
        aside = "[\n" + "".join(f"      {json.dumps(u)}\n" for u in parked) + "    ]"
        return (
            "# Written by imcli's group worker (imcli workers --nats-users): do not edit, it is rewritten\n"
            f"accounts {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: {body}\n  }}\n"
            + (f"  {PARKED}: {{\n    users: {aside}\n  }}\n" if parked else "")
            + "}\n"
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
        with contextlib.suppress(OSError, UnicodeDecodeError):  # removed accounts' ghosts live on there
            self.permissions.recall(users_file.read_text(encoding="utf-8"))
        self._due: threading.Timer | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="imcli-nats-passwd", daemon=True)
        self.probe: ReloadProbe | None = None  # once attached

    def attach(self, address: BrokerAddress, credentials: Credentials) -> None:
        """The nodes to check (every endpoint of ``address``) and the account that checks them: from
        now on each users file carries a stamp only this account may subscribe (the group worker's)."""
        self.probe = ReloadProbe(address, credentials)
        with self._lock:
            self.permissions.prober = credentials.username

    def start(self) -> None:
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._due is not None:
                self._due.cancel()
        if self.probe is not None:
            self.probe.close()

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
        self, groups: Iterable[tuple[str, GroupInfo | None]] = (), friends: Iterable[Friends] = (), asker: str = ""
    ) -> bool:
        """These records changed: write and reload now, and return once every node has them in force.
        Users taken out of a group by someone else (kicked) have their connections ended first
        (``cut``). Not ``asker``: his leave comes over one of his connections, which waits for the reply;
        the group worker cuts him once it is out (``leaves``, ``deliver``)."""
        removed: set[str] = set()
        with self._lock:
            for name, info in groups:
                removed |= self.permissions.group_changed(name, info)
            for record in friends:
                self.permissions.friends_changed(record)
            removed = {u for u in removed if u in self._passwords and u not in SERVICE_ACCOUNTS and u != asker}
        return self.cut(removed) if removed else self.apply_and_wait()

    def leaves(self, groups: Iterable[tuple[str, GroupInfo | None]], asker: str) -> bool:
        """Whether these records, not yet applied, take ``asker`` (a user) out of a group: his own
        request, so ``change_and_wait`` does not cut him; the group worker does once his reply is out
        (``GroupWorker.send_reply``)."""
        with self._lock:
            if asker not in self._passwords or asker in SERVICE_ACCOUNTS:
                return False
            return any(
                asker in self.permissions.members(name) and (info is None or asker not in info.members)
                for name, info in groups
            )

    def deliver(self, messages: list[tuple[str, bytes, bool]]) -> bool:
        """Publish ``messages`` in order through a probe connection (not the worker's own, which cannot
        send while it handles a request), and return once every node has passed the last one on to its
        subscribers (``ReloadProbe.deliver``). False without a probe (nothing sent)."""
        if self.probe is None:
            return False
        return self.probe.deliver(messages, messages[-1][0])

    def cut(self, users: Iterable[str]) -> bool:
        """End every connection of ``users`` on every node, then let them in again with their current
        rights; True once that is in force everywhere. A subscription a user made before he lost a
        group would otherwise go on delivering it (nats-server 2.9 re-checks only NATS subscriptions
        on a reload, not the JetStream consumer behind an MQTT QoS 1 one). First muted (his
        subscriptions removed, ``MUTED``), then parked (his connections closed, ``PARKED``), each in
        force everywhere; then back, waited for as well."""
        cut = frozenset(users)
        with self._lock:
            self.permissions.muted |= cut
        done = self.apply_and_wait()
        with self._lock:
            self.permissions.parked |= cut
        done = self.apply_and_wait() and done  # each node closes their connections as it reloads this file
        with self._lock:
            self.permissions.muted -= cut
            self.permissions.parked -= cut
        # waited for too: a request answered before he is let in again would be refused to him by a node
        # still holding the parked file
        self.apply_and_wait()
        if not done:  # a node that skipped a file (read the next one first) may keep their connections
            log.warning("the connections of %s may stay open on a NATS node that did not reload", sorted(cut))
        return done

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
        """Every node of the attached address has the file of ``stamp`` (or a later one) in force,
        within ``timeout`` (``natsprobe``)."""
        if self.probe is None:
            return True

        def topic() -> str:
            with self._lock:  # a later file (the password watcher's) holds this change too, and its stamp
                return STAMP_TOPIC.format(stamp=self.permissions.stamp or stamp)

        return self.probe.wait(topic, timeout)

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
