"""Live group lines where the broker refuses ``<prefix>/group/+/msg/+``: one subscription per group of mine.

The embedded broker and Mosquitto grant the wildcard and deliver only my groups' messages. A
NATS 2.9 cluster cannot narrow a wildcard subscription per delivery (a subscribe ``deny`` is not
applied to MQTT wildcard deliveries), so its permissions allow exactly
``<prefix>/group/<g>/msg/+`` for each group I am in and refuse the wildcard (deploy/nats). There the
listener follows its groups with a ``GroupFollower``: it asks the group worker for my groups
(``group_request`` ``list``) and subscribes each, and asks again

- on every reconnect (a NATS node reloads its users when the group worker changes permissions, and
  disconnects the account's MQTT clients: the new permissions apply from the next connection), and
- on every notice to me (the group worker tells a member of an invite, a kick, a new member).

A subscription refused because the nodes have not reloaded yet, or while the cluster elects
JetStream leaders after a node died, is asked again with a backoff (1 s, 2 s, ... 8 s; about
a minute and a half in all), then at the next trigger.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from imcli.client.pages import all_groups
from imcli.core.errors import ImcliError
from imcli.core.mqtt import MqttClient
from imcli.core.wire import GroupList, Payload, Topics, WireModel

log = logging.getLogger(__name__)

RETRIES = 15  # refreshes that fail in a row (backoff up to MAX_DELAY) before waiting for the next trigger
MAX_DELAY = 8.0


class GroupFollower:
    """Keeps one subscription per group I am in on ``client``; ``ask`` reaches the group worker."""

    def __init__(self, client: MqttClient, topics: Topics, ask: Callable[[WireModel], Payload]) -> None:
        self._client = client
        self._topics = topics
        self._ask = ask
        self._subscribed: set[str] = set()  # groups whose subscription the broker holds, as far as we know
        self.changed = threading.Condition()  # notified after every refresh that reached the worker
        self.refreshes = 0
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._reset = False
        self._thread = threading.Thread(target=self._run, name="imcli-groups", daemon=True)

    @property
    def groups(self) -> set[str]:
        """The groups whose lines reach this client now (their subscriptions were granted)."""
        with self.changed:
            return set(self._subscribed)

    def start(self) -> None:
        self._thread.start()
        self.refresh()

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()

    def wait_first(self, timeout: float) -> bool:
        """Whether a first refresh reached the worker within ``timeout`` (my groups asked for and
        subscribed): a listener starts only then, so a line said right after it is not missed."""
        with self.changed:
            return self.changed.wait_for(lambda: self.refreshes > 0, timeout)

    def refresh(self, *, reset: bool = False) -> None:
        """Ask for my groups again (any thread, paho's too). ``reset``: the broker lost our subscriptions
        (a clean session reconnected), subscribe every group again."""
        if reset:
            self._reset = True
        self._wanted.set()

    def _run(self) -> None:
        failures = 0
        while True:
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            if self._follow():
                failures = 0
                continue
            failures += 1
            if failures > RETRIES:
                log.warning("could not follow my groups after %d tries: waiting for the next reconnect", RETRIES)
                failures = 0
                continue
            if not self._wanted.wait(min(float(failures), MAX_DELAY)):
                self._wanted.set()

    def _follow(self) -> bool:
        """One refresh: whether every group of mine is subscribed."""
        if not self._client.connected:
            return False  # the reconnect triggers the next one
        try:
            reply = all_groups(self._ask)  # every page: a group on a later one is followed too
        except ImcliError as exc:
            log.info("cannot list my groups: %s", exc)
            return False
        if not isinstance(reply, GroupList):
            log.info("the group worker answered the list of my groups with %s", type(reply).__name__)
            return False
        if self._reset:
            self._reset = False
            self._subscribed = set()
        want = {g.name for g in reply.mine}
        new, gone = sorted(want - self._subscribed), sorted(self._subscribed - want)
        topic = self._topics.group_msg_filter
        try:
            refused = set(self._client.subscribe_each([topic(g) for g in new])) if new else set()
            if gone:
                self._client.unsubscribe([topic(g) for g in gone])
        except ImcliError as exc:
            log.info("cannot subscribe to my groups: %s", exc)
            return False
        with self.changed:
            self._subscribed = (self._subscribed | {g for g in new if topic(g) not in refused}) - set(gone)
            self.refreshes += 1
            self.changed.notify_all()
        if refused:
            log.info("the broker refused %s (its permissions may not be reloaded yet): asking again", refused)
        return not refused
