"""Whether every NATS node has a users file in force: the group worker's probe connections.

A node applies a reload (SIGHUP) on its own time and no MQTT event says when. Each users file
the group worker writes carries a fresh stamp, a subject only the worker's account may subscribe
(``natsauth.STAMP_TOPIC``); a node has the file in force once it grants that SUBSCRIBE
(nats-server checks a SUBSCRIBE on an open connection against the reloaded rights). QoS 0: a
plain NATS subscription, no JetStream consumer to make.

One probe connection per node stays open (a new MQTT connection costs the cluster JetStream
writes). Their client ids are new at each start: NATS 2.9 binds a client id to no user, so
anyone in the account who knew one could connect with it and disconnect the probe, and every
change would then wait ``RELOAD_WAIT`` and be answered unchecked.

They also carry what must be out before the group worker ends a user's connections (a leave's
reply, ``deliver``): the worker's own connection cannot send while it handles the request (paho's
thread), and the probes are connections that no cut touches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable

from imcli.core.errors import BrokerUnreachable, ImcliError
from imcli.core.mqtt import BrokerAddress, Credentials, MqttClient

log = logging.getLogger(__name__)

# a change is answered once every node grants the new stamp, or after this long (a node that is slow
# to reload: logged; the answer must still come within a client's request timeout, 5 s by default)
RELOAD_WAIT = 4.0
PROBE_EVERY = 0.05  # seconds between two looks at a node that has not reloaded yet
DELIVERY_WAIT = 2.0  # seconds ``deliver`` waits for every node to have passed a message on

Node = tuple[str, int]


class ReloadProbe:
    """Asks each node of ``address`` (every endpoint), as ``credentials``, whether it grants a topic."""

    def __init__(self, address: BrokerAddress, credentials: Credentials) -> None:
        self.address = address
        self.credentials = credentials
        self.tag = secrets.token_hex(8)  # in the probes' client ids: known to this process only
        self.connects = 0  # probe connections made (one per node, again after a node drops it)
        self._probes: dict[Node, MqttClient] = {}  # used in the group worker's thread only

    def client_id(self, node: Node) -> str:
        # a client id per node: NATS sessions are cluster-wide, one id on two nodes would take turns
        return f"{self.credentials.username}:reload-{self.tag}-{self.address.endpoints.index(node) + 1}"

    def wait(self, topic: Callable[[], str], timeout: float = RELOAD_WAIT) -> bool:
        """Every node grants ``topic()`` (asked again before each look: a later file holds this change
        too, with its own stamp), within ``timeout``. A node that cannot be reached is passed over: it
        reads the current file when it starts."""
        deadline = time.monotonic() + timeout
        waiting = list(self.address.endpoints)
        while waiting:
            subject = topic()
            # past the deadline a node is not asked again: the answer must still come within a client's timeout
            waiting = [n for n in waiting if time.monotonic() >= deadline or not self._grants(n, subject, deadline)]
            if waiting and time.monotonic() >= deadline:
                log.warning("NATS nodes %s did not reload the users file within %gs", waiting, timeout)
                return False
            if waiting:
                time.sleep(PROBE_EVERY)
        return True

    def connected_nodes(self) -> list[Node]:
        """The nodes whose probe connection is open now (from any thread: a copy of the map is read)."""
        return [node for node, probe in list(self._probes.items()) if probe.connected]

    def close(self) -> None:
        for node in list(self._probes):
            self._drop(node)

    def deliver(self, messages: list[tuple[str, bytes, bool]], watch: str, timeout: float = DELIVERY_WAIT) -> bool:
        """Publish ``messages`` (topic, payload, retain) in order at QoS 1 through one node, each PUBACK
        waited for, and return once every node has passed on the last one (``watch``, its topic): each
        probe subscribes ``watch`` at QoS 0 first, and a node that delivers a message to the probe has
        handed it to its other subscribers there too (one pass over the node's local subscriptions).
        True if so within ``timeout`` (False: logged; what was published is still out); False too if
        no node took the messages."""
        deadline = time.monotonic() + timeout
        listening: list[MqttClient] = []
        for node in self.address.endpoints:
            probe = self._probe(node, deadline)
            try:
                if probe is not None and not probe.subscribe_each([watch], qos=0):
                    listening.append(probe)
            except ImcliError as exc:
                log.info("NATS node %s:%d: cannot watch %s (%s)", *node, watch, exc)
        sent = False
        for node in self.address.endpoints:
            probe = self._probe(node, deadline)
            if probe is None:
                continue
            try:
                for topic, payload, retain in messages:
                    probe.publish(topic, payload, qos=1, retain=retain)
            except ImcliError as exc:
                log.info("NATS node %s:%d did not take %s: %s", *node, messages[-1][0], exc)
                continue
            sent = True
            break
        passed = sent
        for probe in listening:
            while sent:
                message = probe.get(max(0.0, deadline - time.monotonic()))
                if message is None:
                    log.warning("NATS node %s:%d did not pass %s on within %gs", *probe.node, watch, timeout)
                    passed = False
                    break
                if message.topic == watch:
                    break
            with contextlib.suppress(ImcliError):
                probe.unsubscribe([watch])
        return passed

    def _probe(self, node: Node, deadline: float) -> MqttClient | None:
        """The probe connection to ``node`` (connected now if it was not); None if it cannot be reached."""
        try:
            return self._connected(node, deadline)
        except ImcliError as exc:
            self._drop(node)
            log.info("cannot reach NATS node %s:%d (%s)", *node, exc)
            return None

    def _connected(self, node: Node, deadline: float) -> MqttClient:
        """The probe connection to ``node``, connected now if it was not, waiting until ``deadline`` at most."""
        probe = self._probes.get(node)
        if probe is None or not probe.connected:
            if probe is not None:
                probe.close()
            at = dataclasses.replace(self.address, host=node[0], port=node[1], more=())
            # within what is left of the wait: three nodes' connects must not add up past it
            left = max(0.5, deadline - time.monotonic())
            probe = MqttClient(at, self.credentials, self.client_id(node), timeout=left)
            self._probes[node] = probe
            self.connects += 1
            probe.connect()
        probe.timeout = max(0.5, deadline - time.monotonic())
        return probe

    def _grants(self, node: Node, topic: str, deadline: float) -> bool:
        """Whether ``node`` lets the probe subscribe ``topic`` (True too if it cannot be reached)."""
        try:
            probe = self._connected(node, deadline)
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

    def _drop(self, node: Node) -> None:
        probe = self._probes.pop(node, None)
        if probe is not None:
            probe.close()
