"""The system's rules (imcli/core/rules.py and the few beside their data), each decided once for workers,
broker and client."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from imcli.client.identity import heartbeat_seconds
from imcli.core import rules
from imcli.core.errors import InvalidInput
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
from imcli.core.service import names_a_user
from imcli.core.topics import RESERVED_NAMES, client_id_account, device_client_id, is_name
from imcli.core.wire import HEARTBEAT_RANGE, DeviceStatus, Friends


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
    assert SERVICE_ACCOUNTS == (
        rules.PRESENCE_ACCOUNT,
        rules.GROUPS_ACCOUNT,
        rules.ARCHIVE_ACCOUNT,
        rules.FILES_ACCOUNT,
    )
    assert len(set(SERVICE_ACCOUNTS)) == len(SERVICE_ACCOUNTS)
    for account in SERVICE_ACCOUNTS:
        assert is_name(account)
        assert account in RESERVED_NAMES


def test_registration_names_cannot_be_account_names() -> None:
    assert not is_name(REGISTER_PREFIX + "alice")
    assert REGISTER_PREFIX.removesuffix(":") in RESERVED_NAMES


class _Accounts:
    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def is_user(self, name: str) -> bool:
        return name in self.names

    def user_names(self) -> frozenset[str]:
        return frozenset(self.names)


def test_a_request_may_name_only_a_user() -> None:
    accounts = _Accounts("alice", "bob")
    assert names_a_user(accounts, "bob")
    assert not names_a_user(accounts, "carol")  # no such account
    assert not names_a_user(accounts, "Bob")  # not a name at all
    for account in SERVICE_ACCOUNTS:
        assert not names_a_user(_Accounts(account), account)  # a worker is nobody's friend or guest
    assert names_a_user(None, "carol")  # without a directory, any valid unreserved name
    assert not names_a_user(None, "presence")


def test_the_heartbeat_range_is_the_same_for_the_wire_and_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = HEARTBEAT_RANGE
    for value in (low, high):
        assert DeviceStatus(interval=value).interval == value
        monkeypatch.setenv("IMCLI_HEARTBEAT", f"{value:g}")
        assert heartbeat_seconds() == value
    for value in (low / 2, high * 2):
        with pytest.raises(ValidationError):
            DeviceStatus(interval=value)
        monkeypatch.setenv("IMCLI_HEARTBEAT", f"{value:g}")
        with pytest.raises(InvalidInput, match=f"between {low:g} and {high:g}"):
            heartbeat_seconds()


def test_a_device_client_id_belongs_to_its_account() -> None:
    assert device_client_id("alice", "laptop") == "alice:laptop"
    assert client_id_account(device_client_id("alice", "laptop-dm0a1b2c")) == "alice"


def test_group_history_starts_at_the_groups_creation() -> None:
    assert rules.group_history_start(100.0) == 100.0
    assert rules.group_history_start(100.0, since=50.0) == 100.0  # never before the group existed
    assert rules.group_history_start(100.0, since=150.0) == 150.0
