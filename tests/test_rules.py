"""The system's rules (imcli/core/rules.py), each a pure function shared by workers, broker and client."""

from __future__ import annotations

from typing import get_args

from imcli.core import rules
from imcli.core.rules import (
    DM_POLICIES,
    REGISTER_PREFIX,
    SERVICE_ACCOUNTS,
    DmPolicy,
    dm_refusal,
    dm_senders,
    group_visible,
    may_dm,
    missing_group,
)
from imcli.core.topics import RESERVED_NAMES, is_name
from imcli.core.wire import Friends


def test_anyone_takes_dms_from_everyone() -> None:
    assert dm_senders("bob", "anyone", ["carol"]) is None
    assert may_dm("alice", dm_senders("bob", "anyone", []))


def test_friends_only_takes_dms_from_friends_and_oneself() -> None:
    senders = dm_senders("bob", "friends", ["carol"])
    assert senders == frozenset({"bob", "carol"})
    assert may_dm("carol", senders)
    assert may_dm("bob", senders)  # a note to self is never refused
    assert not may_dm("alice", senders)


def test_friends_only_without_friends_takes_only_ones_own() -> None:
    senders = dm_senders("bob", "friends", [])
    assert senders == frozenset({"bob"})
    assert not may_dm("alice", senders)


def test_every_policy_of_the_wire_model_has_a_rule() -> None:
    assert get_args(DmPolicy) == DM_POLICIES
    for policy in DM_POLICIES:
        record = Friends(account="bob", friends=["carol"], dm_policy=policy)
        assert may_dm("carol", dm_senders(record.account, record.dm_policy, record.friends))


def test_the_dm_refusal_names_the_recipient() -> None:
    assert dm_refusal("bob") == "bob accepts direct messages from friends only"


def test_members_see_every_group_others_only_public_ones() -> None:
    assert group_visible(private=False, member=False)
    assert group_visible(private=False, member=True)
    assert group_visible(private=True, member=True)
    assert not group_visible(private=True, member=False)


def test_a_hidden_group_is_answered_as_a_missing_one() -> None:
    assert missing_group("team") == "no group #team (or it is private)"


def test_service_accounts_are_valid_distinct_and_reserved() -> None:
    assert SERVICE_ACCOUNTS == (rules.PRESENCE_ACCOUNT, rules.GROUPS_ACCOUNT, rules.ARCHIVE_ACCOUNT)
    assert len(set(SERVICE_ACCOUNTS)) == len(SERVICE_ACCOUNTS)
    for account in SERVICE_ACCOUNTS:
        assert is_name(account)
        assert account in RESERVED_NAMES


def test_registration_names_cannot_be_account_names() -> None:
    assert not is_name(REGISTER_PREFIX + "alice")
    assert REGISTER_PREFIX.removesuffix(":") in RESERVED_NAMES
