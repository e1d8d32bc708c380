"""A changed accounts.json at many accounts is reloaded off the event loop (issue 21), and still bites:
a removed or replaced account's connections end and publish nothing more."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from imcli.broker.accounts import Account, AccountStore, Role, _parse
from imcli.broker.limits import Limits
from imcli.broker.session_upkeep import WALK_SLICE, SessionUpkeep
from imcli.core.errors import AccountError
from imcli.serve.host import ServeInfo
from tests.conftest import Raw

RawFactory = Callable[..., Raw]
MANY = 20_000  # accounts: the file is 3.7 MB, a reload tens of ms of CPU
HASH = "$argon2id$v=19$m=65536,t=3,p=4$" + "A" * 22 + "$" + "B" * 43  # the length of a real one


def _many(store: AccountStore, count: int) -> None:
    """``count`` accounts written at once (their hashes fake: nobody logs in as them)."""
    with store._locked() as accounts:  # one write, no argon2 per account
        accounts.update({f"u{i:05d}": Account(f"u{i:05d}", Role.USER, 1.0 + i, HASH) for i in range(count)})


class _Turns:
    """Counts the event loop's rounds while it runs (one ``sleep(0)`` a round)."""

    def __init__(self) -> None:
        self.count = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    def __enter__(self) -> _Turns:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


def test_a_changed_file_is_parsed_while_the_loop_goes_on(tmp_path: Path) -> None:
    store = AccountStore(tmp_path)
    _many(AccountStore(tmp_path), MANY)  # another process's write: this store has not seen it
    assert store.stale()

    async def reload() -> tuple[bool, int, int]:
        with _Turns() as turns:
            await asyncio.sleep(0)
            before = turns.count
            reloaded = await store.refresh_off_loop()
            return reloaded, before, turns.count

    reloaded, before, after = asyncio.run(reload())
    assert reloaded and len(store.snapshot()) == MANY and not store.stale()
    # parsed in the loop, the reload would leave it no round at all (it did before: 30 to 46 ms at
    # 10,000 accounts, in one callback)
    assert after - before >= 2, f"the loop ran {after - before} rounds while {MANY} accounts were parsed"
    assert asyncio.run(store.refresh_off_loop()) is False  # unchanged: not read again


def test_the_parse_reads_what_json_reads_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    store = AccountStore(tmp_path)
    _many(store, 50)
    text = store.path.read_text()
    whole = json.loads(text)["accounts"]
    assert {n: (a.role.value, a.created, a.hash) for n, a in _parse(text).items()} == {
        n: (e["role"], e["created"], e["hash"]) for n, e in whole.items()
    }
    assert _parse(' {"accounts" : {"a":{"hash":"h","created":1,"role":"service"}} , "version":1 }\n') == {
        "a": Account("a", Role.SERVICE, 1.0, "h")
    }
    for damaged in ("", "{", "[]", '{"version": 1}', '{"accounts": {}} x', '{"accounts": {"a": 1}}',
                    '{"accounts": {"a": {"role": "root", "created": 1, "hash": "h"}}}'):  # fmt: skip
        store.path.write_text(damaged)
        with pytest.raises(AccountError, match="damaged"):
            store.refresh()


def test_accounts_removed_or_made_again_are_gone_but_not_a_new_password_nor_a_rekeyed_worker(tmp_path: Path) -> None:
    store = AccountStore(tmp_path, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    operator = AccountStore(tmp_path)  # another process
    for name in ("alice", "bob", "carol", "dave"):
        store.add(name, "a-password")
    store.ensure_service("presence", "a-service-key-0")
    assert store.take_gone() == set()
    operator.remove("alice")
    operator.remove("bob")
    operator.add("bob", "another-password", reuse=True)  # another owner of the name
    operator.set_password("carol", "a-new-password")  # passwd: the same owner
    operator.ensure_service("presence", "a-service-key-1")  # imcli serve's next start
    store.refresh()  # one reload sees all of it at once
    assert store.take_gone() == {"alice", "bob"}
    assert store.take_gone() == set()


class _Session:
    def __init__(self, username: str) -> None:
        self.username = username
        self.transitions = self

    def is_connected(self) -> bool:
        return True


class _Host:
    def __init__(self, store: AccountStore, names: list[str]) -> None:
        self.accounts = store
        self.table: dict[str, tuple[Any, Any]] = {f"{n}:c": (_Session(n), n) for n in names}
        self.closed: list[str] = []

    def session_table(self) -> Mapping[str, tuple[Any, Any]]:
        return self.table

    async def delete_session(self, client_id: str) -> None:
        self.table.pop(client_id, None)

    async def close_connection(self, handler: Any) -> None:
        self.closed.append(handler)


def test_the_sessions_of_removed_accounts_are_walked_a_slice_per_loop_round(tmp_path: Path) -> None:
    store = AccountStore(tmp_path)
    _many(store, 5 * WALK_SLICE)
    names = sorted(store.snapshot())
    host = _Host(store, names)
    upkeep = SessionUpkeep(host, Limits())
    current = dict.fromkeys(names[1:], "1.0")  # the first account was removed

    async def walk() -> int:
        with _Turns() as turns:
            await asyncio.sleep(0)
            before = turns.count
            doomed: set[str] = set()
            await upkeep._close_revoked(current, {names[-1]}, doomed)  # the last one replaced
            assert doomed == {f"{names[0]}:c", f"{names[-1]}:c"}
            return turns.count - before

    rounds = asyncio.run(walk())
    assert host.closed == [names[0], names[-1]]
    assert rounds >= 4, f"{5 * WALK_SLICE} sessions walked in {rounds + 1} loop rounds"


def test_a_replaced_account_publishes_nothing_more(
    users: Callable[..., None], server: ServeInfo, raw: RawFactory
) -> None:
    """With thousands of accounts in the file, so that the reload and the walk are sliced: the old
    owner's open connection is closed, and what it tries to publish reaches nobody."""
    users("alice", "bob")
    operator = AccountStore(server.data_dir)  # `imcli admin user …`, in another process
    _many(operator, 3 * WALK_SLICE)
    alice = raw("alice", client_id="alice:phone")
    bob = raw("bob", client_id="bob:laptop")
    assert bob.subscribe("im/user/bob/#") == 1
    alice.publish("im/user/bob/dm/alice", b"before")
    assert bob.expect("im/user/bob/dm/alice").payload == b"before"

    operator.remove("alice")
    operator.add("alice", "a-brand-new-password", reuse=True)  # someone else's account now
    assert alice.disconnected.wait(10), "the replaced account's connection stayed open"
    alice.client.publish("im/user/bob/dm/alice", b"after", qos=1)  # refused by paho or by the broker
    assert bob.silent(1.0, "im/user/bob/dm/alice") == []
    assert raw("alice", client_id="alice:tablet").rc == 4  # the old password is gone, remembered or not
    newcomer = raw("alice", "a-brand-new-password", "alice:phone")
    assert newcomer.rc == 0
    assert not bob.disconnected.is_set()
    newcomer.publish("im/user/bob/dm/alice", b"new alice")
    assert bob.expect("im/user/bob/dm/alice").payload == b"new alice"
