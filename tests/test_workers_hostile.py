"""Every worker fed hostile requests by a raw MQTT client (tenth session).

mallory, a stranger to alice and bob, sends each worker's every request type (presence, groups and
friends, archive, files, moments) hundreds of times with generated field values: other users' names
and the ids of alice's moment and file, wrong types, huge strings and numbers, ``NaN`` and
``Infinity``, deep nesting, duplicate keys, fields left out, a request id used twice. A worker must
answer with an error or ignore it, never crash, never leak and never write another's state:

- every worker still answers bob afterwards, and again after a restart of ``imcli serve`` on the
  same data directory (what it wrote is read back consistently);
- alice's and bob's private world is as it was: the private group, their friendship, bob's DM
  policy, their profiles, alice's moment (no like or comment of mallory's), alice's file to bob, the
  DM history between them;
- nothing mallory received (every topic he may read) carries a word of that world, and no reply or
  notice meant for mallory reached alice or bob.

The values come from a seeded generator (the same on every run). The workers are the same code on
every broker; this runs on the embedded one, with the publish rate lifted so that each request
reaches a worker.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imcli.archive.worker import ArchiveWorker
from imcli.broker.accounts import AccountStore, Role
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.client import moments, services
from imcli.client.files import FileConnection
from imcli.client.services import Conversation
from imcli.core.wire import (
    Friends,
    GroupInfo,
    Profile,
    Topics,
    WhoRequest,
    WireModel,
    encode,
)
from imcli.files.worker import FilesWorker
from imcli.groups.worker import GroupWorker
from imcli.moments.worker import MomentsWorker
from imcli.presence.worker import PresenceWorker
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import ident
from tests.rawmqtt import connect_raw, password_of

T = Topics()
WORKERS = (PresenceWorker, GroupWorker, ArchiveWorker, FilesWorker, MomentsWorker)
REQUESTS: list[type[WireModel]] = [model for worker in WORKERS for model in worker.requests]
CASES_PER_TYPE = 80
# words of alice's and bob's world that mallory never names (the file's name among them)
SECRETS = ("SECRET-DM-7f3a", "SECRET-MOMENT-7f3a", "SECRET-COMMENT-7f3a", "secret-plans-7f3a.txt", "SECRET-LINE-7f3a")


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[ServeInfo]:
    limits = Limits(publish_rate=1e6, publish_burst=10**6)
    with BackgroundServer(BrokerSettings(data_dir=data_dir, port=0, limits=limits)) as info:
        yield info


# ---------------------------------------------------------------- alice's and bob's world


def build_world(info: ServeInfo, tmp_path: Path) -> dict[str, str]:
    store = AccountStore(info.data_dir)
    for name in ("alice", "bob", "mallory"):
        store.add(name, password_of(name))
    store.add("auditor", password_of("auditor"), Role.SERVICE)
    alice, bob = ident(info, "alice"), ident(info, "bob")
    services.friend_request(alice, "add", "bob")
    services.friend_request(bob, "accept", "alice")
    services.friend_request(bob, "policy", policy="friends")
    services.group_request(alice, "create", "crew", private=True)
    services.group_request(alice, "invite", "crew", "bob")
    services.set_profile(alice, signature="alice's own words", about="about alice")
    services.send_dm(alice, "bob", services.prepare_text(SECRETS[0]))
    services.group_say(alice, "crew", services.prepare_text(SECRETS[4]))
    post = moments.post(alice, SECRETS[1]).moments[0]
    moments.act(bob, "like", post.id)
    commented = moments.act(bob, "comment", post.id, SECRETS[2]).moments[0]
    plans = tmp_path / SECRETS[3]
    plans.write_bytes(b"the plans " * 500)
    with FileConnection(alice) as c:
        target = c.target(Conversation("dm", "bob"))
        file = c.upload(plans, target)
        c.post(Conversation("dm", "bob"), target, file)
    return {"moment": post.id, "file": file.id, "sha256": file.sha256, "comment": commented.comments[0].id}


def records(info: ServeInfo) -> dict[str, Any]:
    """The retained records of alice's and bob's world, as a reader of everything sees them."""
    auditor = connect_raw(info.address.host, info.address.port, "auditor", "auditor:look")
    try:
        wanted = {
            T.group_info("crew"): GroupInfo,
            T.friends("alice"): Friends,
            T.friends("bob"): Friends,
            T.profile("alice"): Profile,
            T.profile("bob"): Profile,
        }
        for topic in wanted:
            auditor.subscribe(topic)
        got: dict[str, Any] = {}
        for msg in auditor.arrivals(3):
            got[msg.topic] = json.loads(msg.payload)
            if set(got) == set(wanted):
                break
        for record in got.values():
            record.pop("updated", None)
            # anyone may ask to be a friend: mallory's requests are bob's to answer, not his friends
            record.pop("incoming", None)
        return got
    finally:
        auditor.close()


def world(info: ServeInfo, ids: dict[str, str]) -> dict[str, Any]:
    """Everything alice and bob can see of their world, through the workers (each must answer)."""
    alice, bob = ident(info, "alice"), ident(info, "bob")
    with FileConnection(bob) as c:
        files, _ = c.listing(Conversation("dm", "alice"))
    feed, _ = moments.feed(alice, "alice")
    dms = services.history(bob, Conversation("dm", "alice"))
    group = services.group_request(bob, "members", "crew")
    services.who(bob, include_offline=True)  # the presence worker answers
    return {
        "records": records(info),
        "files": sorted((f.id, f.name, f.sha256) for f in files),
        "moments": [m.model_dump(exclude={"ts"}) for m in feed.moments],
        "dms": [(m.sender, m.to, m.text) for m in dms.messages],
        "group": group.model_dump(exclude={"id"}),
    }


# ---------------------------------------------------------------- what mallory sends


NAMES = ["alice", "bob", "mallory", "crew", "lobby", "all", "auditor", "archive", "files", "presence", "groups"]
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1.5, 1e308, -1e308, "", " ", "5",
    "x" * 12000, "ALICE", "alice ", "al/ice", "+", "#", "$SYS", "../../etc/passwd", "bob\u0000", "\u202ebob",
    "\u0430lice", "a" * 33, "' OR 1=1 --", "%s%n", [], {}, ["bob"], ["bob"] * 1500, {"$gt": ""}, [[[[[]]]]],
    {"type": "group_request", "op": "kick"}, "NaN!", "Infinity!", "-Infinity!", "deep!",
]  # fmt: skip
# raw JSON that json.dumps cannot write: the generator puts it into the text as it is
RAW = {"NaN!": "NaN", "Infinity!": "Infinity", "-Infinity!": "-Infinity", "deep!": "[" * 3000 + "]" * 3000}
# half the time a field names alice's and bob's own world (``ids`` keys stand for the ids)
FOCUS: dict[str, list[Any]] = {
    "user": ["alice", "bob"], "users": [["alice", "bob"]], "group": ["crew"], "room": ["lobby"], "moments": ["alice"],
    "post": ["moment", "comment"], "file": ["file"], "sha256": ["sha256"],
}  # fmt: skip


def field_values(name: str, ids: dict[str, str]) -> list[Any]:
    """Values a well-meaning client could send in field ``name``: the others' names and ids among them."""
    by_field: dict[str, list[Any]] = {
        "user": NAMES,
        "users": [["alice", "bob"], ["bob"] * 1000, NAMES],
        "name": [*NAMES, "Alice", "alice's new name", "plans.txt"],
        "nick": ["Alice", "alice", "bob", "mallory2"],
        "group": ["crew", "crew2", "lobby"],
        "room": ["lobby", "crew"],
        "moments": ["alice", "mallory", "bob"],
        "post": [ids["moment"], ids["comment"], "0" * 32],
        "file": [ids["file"], ids["file"].upper(), ids["file"][:-1], "*"],
        "sha256": [ids["sha256"], "0" * 64],
        "size": [1, 5000, 2**40],
        "limit": [1, 100, 1000, 1001],
        "offset": [0, 4999, 5000, 2**40],
        "text": ["hi", "x" * 2001, "\u2028"],
        "since": [0, 1e10],
        "before": [0, 1e10, 253402300799.0],
        "dm_policy": ["anyone", "friends"],
        "private": [True, False],
        "all": [True, False],
        "clear_avatar": [True, False],
        "revoke_others": [True, False],
        "password": ["correct-horse-mallory", "x"],
        "images": [[{"file": ids["file"], "media_type": "image/png"}]],
        "avatar": [{"file": ids["file"], "media_type": "image/png", "thumbnail": ""}],
    }
    return by_field.get(name, ["x"])


def systematic(ids: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Every op of every request type with every combination of alice's and bob's things (``FOCUS``,
    or the field left out) in the fields that name them: what a stranger would try first."""
    for n, model in enumerate(REQUESTS):
        kind = model.model_fields["type"].default
        ops = model.model_fields["op"].annotation.__args__ if "op" in model.model_fields else (None,)  # type: ignore[union-attr]
        named = [f for f in model.model_fields if f in FOCUS]
        choices = [[None, *(ids.get(v, v) if isinstance(v, str) else v for v in FOCUS[f])] for f in named]
        for case, (op, values) in enumerate(itertools.product(ops, itertools.product(*choices))):
            body = {"type": kind, "v": 1, "id": f"s{n:03x}{case:04x}" + "0" * 24}
            if op is not None:
                body["op"] = op
            body |= {f: v for f, v in zip(named, values, strict=True) if v is not None}
            if kind in ("moment_request", "file_offer"):
                body |= {"text": "mallory was here"} if kind == "moment_request" else {"name": "x.txt", "size": 5000}
            yield f"s{n:03x}{case:04x}" + "0" * 24, json.dumps(body)


def requests(ids: dict[str, str], rng: random.Random) -> Iterator[tuple[str, str]]:
    """(correlation id, payload text) pairs: the ``systematic`` ones, then each request type
    ``CASES_PER_TYPE`` times with generated values."""
    yield from systematic(ids)
    for n, model in enumerate(REQUESTS):
        fields = [f for f in model.model_fields if f not in ("type", "v")]
        kind = model.model_fields["type"].default
        ops = model.model_fields["op"].annotation.__args__ if "op" in model.model_fields else ()  # type: ignore[union-attr]
        for case in range(CASES_PER_TYPE):
            body: list[tuple[str, Any]] = [("type", kind), ("v", 1), ("id", f"{n:04x}{case:04x}" + "0" * 24)]
            if ops:  # each op in turn, then any
                body.append(("op", ops[case % len(ops)] if case < 4 * len(ops) else rng.choice([*ops, "bogus", None])))
            hostility = rng.choice([0.0, 0.1, 0.5])  # a third are requests a client could send, word for word
            for name in fields:
                if name in ("id", "op") or rng.random() < 0.25:
                    continue
                pool = HOSTILE if rng.random() < hostility else field_values(name, ids)
                if name in FOCUS and rng.random() < 0.5:  # alice's and bob's own things, named by a stranger
                    pool = [ids.get(v, v) if isinstance(v, str) else v for v in FOCUS[name]]
                body.append((name, rng.choice(pool)))
            if rng.random() < 0.1:  # a duplicate key: the first says one thing, the last another
                body.insert(1, ("type", rng.choice([k.model_fields["type"].default for k in REQUESTS])))
            if rng.random() < 0.05:
                body = [(k, v) for k, v in body if k != "id"] + [("id", "repeat" + "0" * 26)]
            corr = f"m{n:03x}{case:04x}" + "0" * 24
            yield corr, "{" + ", ".join(f"{json.dumps(k)}: {as_json(v)}" for k, v in body) + "}"


def as_json(value: Any) -> str:
    """``value`` as JSON text; the ``RAW`` markers as the text json.dumps refuses to write."""
    return RAW[value] if isinstance(value, str) and value in RAW else json.dumps(value)


# ---------------------------------------------------------------- the test


def test_hostile_requests_to_every_worker_leak_nothing_and_change_nobody_elses_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serving(data) as info:
        ids = build_world(info, tmp_path)
        before = world(info, ids)
        assert before["files"] and before["moments"] and before["dms"]
        watcher = connect_raw(info.address.host, info.address.port, "auditor", "auditor:watch")
        assert watcher.subscribe("im/user/+/reply/+") == 1 and watcher.subscribe("im/user/+/notice") == 1
        mallory = connect_raw(info.address.host, info.address.port, "mallory", "mallory:evil")
        # everything he may read (the embedded broker refuses a wider filter)
        assert mallory.subscribe_all("im/user/mallory/#", "im/room/+/+", "im/events", "im/presence/+") == [1] * 4
        assert mallory.subscribe_all("im/profile/+") == [1]
        sent = 0
        for corr, payload in requests(ids, random.Random(20261127)):
            mallory.publish(T.request("mallory", corr), payload.encode())
            sent += 1
        # every worker has read past mallory's requests once it answers one of his sent after them
        last = "z" * 32
        mallory.publish(T.request("mallory", last), encode(WhoRequest(id=last)))
        mallory.expect(T.reply("mallory", last), timeout=120)
        seen = watcher.silent(0.5)
        watcher.close()
        after = world(info, ids)
        got = mallory.silent(1)
        mallory.close()
    assert after == before
    leaks = [(m.topic, s) for m in got for s in SECRETS if s.encode() in m.payload]
    assert leaks == [], [(m.topic, m.payload[:300]) for m in got if any(s.encode() in m.payload for s in SECRETS)]
    # replies go to their asker only (notices may tell bob of mallory's friend request)
    assert [m.topic for m in seen if "/reply/" in m.topic and not m.topic.startswith("im/user/mallory/")] == []
    with serving(data) as again:  # the workers read back what they wrote
        assert world(again, ids) == before
    assert sent == len(list(systematic(ids))) + len(REQUESTS) * CASES_PER_TYPE
