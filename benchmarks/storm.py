"""The reconnect storm of issue 21: everyone signed in, the broker restarts, everyone comes back.

The broker runs with the password settings it is deployed with (``brokers.start(...,
production=True)``: argon2-cffi's default parameters and the default login queue for
``imcli serve``; ``mosquitto_passwd``'s hashes for Mosquitto), and the users sign in as imcli
does after ``imcli login``: on the embedded broker with a device credential each (issue 17,
checked with HMAC-SHA256, no argon2), on Mosquitto with the password (it cannot issue one).
Clients retry a login refused as busy (CONNACK 3), as imcli's clients and paho's reconnect
loop do. Measured: how long after
the broker listens again everyone is back, and the longest PINGREQ round trip meanwhile.
"""

from __future__ import annotations

import time

from benchmarks.brokers import Broker
from benchmarks.scenarios import Crowds
from benchmarks.stallprobe import stalls

# a storm of real argon2 checks takes minutes: the crowds keep retrying a busy broker that long
RETRY_FOR_EVER = ("--busy-retries", "1000000")


def storm(broker: Broker, users: int, processes: int) -> dict[str, object]:
    result: dict[str, object] = {"users": users, "login": "device credential" if broker.passwords_file else "password"}
    with Crowds.join(broker, users, processes, status=broker.has_presence, extra=RETRY_FOR_EVER) as (crowds, joined):
        result["joined"] = joined["ok"]
        result["first_logins_per_s"] = round(joined["ok"] / joined["seconds"], 1)
        started = time.time()
        broker.restart()
        listening = time.time()
        result["restart_s"] = round(listening - started, 2)
        with stalls(broker) as probe:
            crowds.command("rejoin")
            back = crowds.collect("joined")
        ok = sum(int(b["ok"]) for b in back)
        result["rejoined"] = ok
        result["refused"] = sum(int(b["refused"]) for b in back)
        result["busy_retries"] = sum(int(b.get("retried", 0)) for b in back)
        result["all_back_s"] = round(max(b["t1"] for b in back) - listening, 2)
        result["reconnects_per_s"] = round(ok / max(float(result["all_back_s"]), 1e-6), 1)  # type: ignore[arg-type]
        result.update(probe)
    return result
