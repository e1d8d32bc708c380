"""The embedded broker remembers verified logins (imcli/broker/accounts.py): removal and a new password still bite."""

from __future__ import annotations

from collections.abc import Callable

from imcli.broker.accounts import AccountStore
from imcli.serve.host import ServeInfo
from tests.conftest import Cli, Raw, wait_until

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
    operator.add("alice", "a-brand-new-password", reuse=True)
    assert raw("alice", client_id="alice:d").rc == 4
    assert raw("alice", "a-brand-new-password", "alice:e").rc == 0
    assert raw("bob", "not-bobs-password", "bob:x").rc == 4  # a failure is never remembered
    assert raw("bob", client_id="bob:y").rc == 0


def test_removing_an_account_ends_its_open_connections_and_sessions(
    users: Callable[..., None], server: ServeInfo, raw: RawFactory
) -> None:
    users("alice", "bob")
    alice = raw("alice", client_id="alice:phone", clean=False)
    assert alice.subscribe("im/user/alice/#") == 1
    bob = raw("bob", client_id="bob:laptop")
    assert server.broker is not None
    assert "alice:phone" in server.broker.persistent_sessions()

    operator = AccountStore(server.data_dir)  # `imcli admin user remove`, in another process
    operator.remove("alice")
    assert alice.disconnected.wait(5), "the removed account's connection stayed open"
    assert wait_until(lambda: "alice:phone" not in server.broker.persistent_sessions())  # type: ignore[union-attr]
    assert not bob.disconnected.is_set()

    # whoever gets the name next starts afresh: nothing of the old alice's session is resumed
    operator.add("alice", "a-brand-new-password", reuse=True)
    bob.publish("im/user/alice/dm/bob", b"for the new alice only")
    newcomer = raw("alice", "a-brand-new-password", "alice:phone", clean=False)
    assert newcomer.rc == 0
    assert newcomer.silent(1.0) == []  # no subscription came back with the session


def test_a_removed_name_is_not_given_to_someone_else(
    users: Callable[..., None], server: ServeInfo, raw: RawFactory, cli_as: Callable[[str], Cli]
) -> None:
    """The archive keeps a removed account's direct messages under its name: a newcomer who
    registered the name could read them with ``imcli history @peer``."""
    users("alice", "bob")
    AccountStore(server.data_dir).remove("alice")
    newcomer = cli_as("newcomer")
    where = ("--host", server.address.host, "--port", str(server.address.port), "--password-stdin")
    taken = newcomer("register", "alice", *where, input="newcomers-password\n")
    assert taken.exit_code == 1
    assert taken.stderr.startswith("Error: cannot register 'alice': the name is taken or reserved"), taken.stderr
    assert raw("register:alice", "newcomers-password", "register:alice").rc != 0  # nor through raw MQTT

    data = ("--data-dir", str(server.data_dir), "--password-stdin")
    refused = newcomer("admin", "user", "add", "alice", *data, input="operators-choice\n")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Error: the name 'alice' belonged to a removed account"), refused.stderr
    given = newcomer("admin", "user", "add", "alice", "--reuse", *data, input="operators-choice\n")
    assert given.exit_code == 0, given.stderr
    assert raw("alice", "operators-choice", "alice:new").rc == 0
