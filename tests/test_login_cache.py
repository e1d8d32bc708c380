"""The embedded broker remembers verified logins (broker/accounts.py): removal and a new password still bite."""

from __future__ import annotations

from collections.abc import Callable

from broker.accounts import AccountStore
from imcli.embedded import ServeInfo
from tests.conftest import Raw

RawFactory = Callable[..., Raw]


def test_a_remembered_login_ends_with_the_account(
    users: Callable[..., None], server: ServeInfo, raw: RawFactory
) -> None:
    users("alice", "bob")
    first = raw("alice", client_id="alice:a")
    assert first.rc == 0
    first.close()
    assert raw("alice", client_id="alice:b").rc == 0  # remembered
    operator = AccountStore(server.data_dir)  # `imcli admin user remove`, in another process
    operator.remove("alice")
    assert raw("alice", client_id="alice:c").rc == 4
    operator.add("alice", "a-brand-new-password")
    assert raw("alice", client_id="alice:d").rc == 4
    assert raw("alice", "a-brand-new-password", "alice:e").rc == 0
    assert raw("bob", "not-bobs-password", "bob:x").rc == 4  # a failure is never remembered
    assert raw("bob", client_id="bob:y").rc == 0
