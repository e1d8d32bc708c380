"""A crowd of simulated signed-in users in one process, driven over stdin/stdout.

    python -m benchmarks.crowd --port P --first 0 --count 2500 [--room-listeners 50] [--talk 10]

Each user connects with a Last Will on its device status and publishes a retained online
status, as ``imcli listen`` does, then subscribes to its own ``im/user/<me>/#``. The
benchmark starts several crowds (one event loop per process, so the load generator has
more than one core to itself) and talks to each with one JSON line per command:

- on start the crowd prints ``{"event": "joined", "t0": …, "t1": …, "ok": n, "refused": m, "retried": r, …}``
  (``t0``/``t1`` are ``time.time()`` stamps of the first CONNECT and of the last status). A CONNECT
  refused as busy (CONNACK 3) is tried again at once after a short pause; one closed, reset or
  unanswered before any CONNACK (a node whose JetStream missed its 4 s still holding the user's
  first session, a full listen queue) is tried again with a growing back-off, as paho would, up to
  ``--connect-retries`` times; ``retried`` counts both, ``closed_retried`` the second kind;
- ``flip`` makes every user go offline and online again (two retained statuses) and
  prints ``{"event": "flipped", …}``;
- ``rejoin`` (after a restart of the broker) drops every connection and signs everyone in again,
  retrying a busy broker as above, and prints ``{"event": "joined", …}`` again;
- ``quit`` disconnects everyone (a DISCONNECT, so no Last Will) and exits.

``--no-status`` leaves the retained status out (a broker without a presence worker);
``--room-listeners K`` subscribes the first K users to the background room too;
``--talk R`` makes the first ten users say R messages a second in total in that room;
``--keepalive K --pings`` makes every user send a PINGREQ every K seconds (a run longer than
the keepalive, where the broker would otherwise drop the silent ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from benchmarks.mqttload import LoadClient
from imcli.core.wire import ChatMessage, DeviceStatus, Topics, encode, new_id

T = Topics()
BACKGROUND_ROOM = "background"
DEVICE = "bench"
SERVER_UNAVAILABLE = 3  # CONNACK: the broker is busy (imcli serve: too many password checks at once)
SUBACK_FAILURE = 0x80
CLOSED_BEFORE_CONNACK = -1  # the connection was refused, reset or closed, or said nothing, before a CONNACK
BUSY_RETRIES = 200
CONNECT_RETRIES = 20  # CONNECTs closed before a CONNACK tried again (back-off 0.5 s doubling to 4 to 8 s: ~2 min)
CONNACK_TIMEOUT = 60.0  # seconds for a CONNACK (a connection the broker never answers counts as closed)
ACK_TIMEOUT = 600.0  # seconds for a user's status and subscriptions to be acknowledged (SUBACK 0x80 retries included)


def user_name(index: int) -> str:
    return f"u{index:05d}"


def say(line: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class Crowd:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = [user_name(i) for i in range(args.first, args.first + args.count)]
        self.clients: dict[str, LoadClient] = {}
        self.status = encode(DeviceStatus(interval=3600))
        self.refused = 0
        self.retried = 0  # CONNECTs tried again: refused with CONNACK 3 (busy) or closed before a CONNACK
        self.closed_retried = 0  # of those, the ones closed (refused, reset, unanswered) before a CONNACK
        self.sub_retried = self.sub_refused = 0  # SUBSCRIBEs refused (SUBACK 0x80) and tried again, or given up
        self.dropped = 0  # connections the broker closed after CONNACK, before the user had joined
        self.talking = asyncio.Event()
        # each user's own password, when the broker gave them device credentials (issue 17)
        self.passwords: dict[str, str] = json.loads(args.passwords.read_text()) if args.passwords else {}

    async def join(self) -> None:
        gate = asyncio.Semaphore(self.args.concurrency)
        listeners = set(self.names[: self.args.room_listeners])

        async def one(name: str) -> None:
            async with gate:
                for _ in range(self.args.busy_retries + 1):
                    if await self.join_one(name, name in listeners):
                        return
                    # the broker closed the connection after CONNACK (NATS under load): sign in again
                    self.dropped += 1
                    await asyncio.sleep(random.uniform(0.5, 2.0))
                self.refused += 1

        t0 = time.time()
        await asyncio.gather(*(one(n) for n in self.names))
        say(
            {
                "event": "joined",
                "t0": t0,
                "t1": time.time(),
                "ok": len(self.clients),
                "refused": self.refused,
                "retried": self.retried,
                "closed_retried": self.closed_retried,
                "sub_retried": self.sub_retried,
                "sub_refused": self.sub_refused,
                "dropped": self.dropped,
            }
        )

    async def join_one(self, name: str, listener: bool) -> bool:
        """Sign ``name`` in: CONNECT (again while the broker says busy), status, own filter. False when the
        broker closed the connection after its CONNACK; a refused login counts as refused (True: done)."""
        topic = T.status(name, DEVICE)
        closed = 0  # CONNECTs closed before their CONNACK, in a row
        for attempt in range(self.args.busy_retries + 1):
            client = LoadClient()
            try:
                rc = await asyncio.wait_for(
                    client.connect(
                        self.args.host, self.args.port, name, self.passwords.get(name, self.args.password),
                        f"{name}:{DEVICE}",
                        will=(topic, b"", True), keepalive=self.args.keepalive,
                    ),
                    CONNACK_TIMEOUT,
                )  # fmt: skip
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                rc = CLOSED_BEFORE_CONNACK
            if rc == SERVER_UNAVAILABLE and attempt < self.args.busy_retries:
                # the broker's password checks are busy (a bounded queue): back off and retry, as
                # imcli's clients and paho's reconnect loop do
                client.abort()
                self.retried += 1
                await asyncio.sleep(random.uniform(0.05, 0.25))
            elif rc == CLOSED_BEFORE_CONNACK and closed < self.args.connect_retries:
                # closed (or refused, or unanswered) before any CONNACK: nats-server closes a second CONNECT
                # while it still stores the first session ("other session ... is in the process of
                # connecting"), a full listen queue resets: retry with a growing back-off, as paho (1 to 4 s
                # between tries in imcli's clients) would
                client.abort()
                self.retried += 1
                self.closed_retried += 1
                await asyncio.sleep(random.uniform(0.5, 1.0) * 2 ** min(closed, 3))
                closed += 1
            else:
                break
        if rc != 0:
            self.refused += 1
            return True
        self.clients[name] = client

        async def settle() -> None:
            if self.args.status:
                await client.publish(topic, self.status, qos=1, retain=True)
            await self.subscribe(client, T.user_filter(name))
            if listener:
                await self.subscribe(client, T.room_filter(BACKGROUND_ROOM))

        try:  # an acknowledgement that never comes (a connection the broker dropped silently): sign in again
            await asyncio.wait_for(settle(), ACK_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            del self.clients[name]
            client.abort()
            return False
        return True

    async def subscribe(self, client: LoadClient, topic: str) -> None:
        """SUBSCRIBE, again after a refusal (SUBACK 0x80: NATS could not create the subscription's
        JetStream consumer in time), as a client that needs its messages would."""
        for _ in range(self.args.busy_retries + 1):
            if await client.subscribe(topic) != SUBACK_FAILURE:
                return
            self.sub_retried += 1
            await asyncio.sleep(random.uniform(0.5, 2.0))
        self.sub_refused += 1

    async def flip(self) -> None:
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one(name: str, client: LoadClient) -> None:
            async with gate:
                topic = T.status(name, DEVICE)
                await client.publish(topic, b"", qos=1, retain=True)
                await client.publish(topic, self.status, qos=1, retain=True)

        t0 = time.time()
        await asyncio.gather(*(one(n, c) for n, c in self.clients.items()))
        say({"event": "flipped", "t0": t0, "t1": time.time(), "changes": 2 * len(self.clients)})

    async def talk(self) -> None:
        """Background room traffic: the first ten users take turns, ``--talk`` messages a second, each
        in its own name (``self.clients`` is in the order the users joined, not ``self.names``': a line
        said in another user's name is denied, which costs the embedded broker a notice to the sender
        and Mosquitto nothing, so the DM scenario's background was not the same on both)."""
        talkers = [(n, self.clients[n]) for n in self.names[:10] if n in self.clients]
        if not talkers or self.args.talk <= 0:
            return
        period = 1.0 / self.args.talk
        turn = 0
        next_at = time.perf_counter()
        while True:
            name, client = talkers[turn % len(talkers)]
            message = encode(ChatMessage(id=new_id(), text=f"background line {turn}"))
            await client.publish(T.room(BACKGROUND_ROOM, name), message, qos=1)
            turn += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def keepalive(self) -> None:
        """With ``--pings``, each user sends a PINGREQ every ``--keepalive`` seconds from its CONNECT
        on, as paho does when idle (imcli: 30 s; the broker closes a client silent for 1.5 times
        that). Runs during the join too: a join of thousands takes longer than a keepalive."""
        if not self.args.pings:
            return
        while True:
            now = time.monotonic()
            for client in list(self.clients.values()):
                if now - client.last_ping >= self.args.keepalive:
                    client.send_ping()
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        pinger = asyncio.create_task(self.keepalive())
        await self.join()
        talker = asyncio.create_task(self.talk())
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            command = (await reader.readline()).decode().strip()
            if command == "flip":
                await self.flip()
            elif command == "rejoin":
                for client in self.clients.values():
                    client.abort()
                self.clients.clear()
                self.refused = self.retried = self.closed_retried = 0
                self.sub_retried = self.sub_refused = self.dropped = 0
                await self.join()
            elif command in ("quit", ""):
                break
        talker.cancel()
        pinger.cancel()
        await asyncio.gather(*(c.disconnect() for c in self.clients.values()), return_exceptions=True)
        say({"event": "done"})


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--passwords", type=Path, help="JSON: user -> password (device credentials)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--room-listeners", type=int, default=0)
    parser.add_argument("--talk", type=float, default=0.0)
    parser.add_argument("--busy-retries", type=int, default=BUSY_RETRIES, help="tries again after CONNACK 3")
    parser.add_argument(
        "--connect-retries", type=int, default=CONNECT_RETRIES, help="tries again after a close before CONNACK"
    )
    parser.add_argument("--keepalive", type=int, default=600, help="seconds, in CONNECT")
    parser.add_argument("--pings", action="store_true", help="send a PINGREQ every keepalive (long runs)")
    parser.add_argument("--no-status", dest="status", action="store_false", help="no retained online status")
    return parser


def main() -> None:
    asyncio.run(Crowd(options().parse_args()).run())


if __name__ == "__main__":
    main()
