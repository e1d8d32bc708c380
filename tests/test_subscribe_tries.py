"""A client's first SUBSCRIBE of its own topics is tried again when refused (``SUBSCRIBE_TRIES``: a
loaded NATS 2.9 cluster refuses one whose JetStream consumer took over 4 s to make), but only a
refusal that took ``FINAL_REFUSAL`` seconds to come: one that came at once is the broker's decision
(an ACL), fails at once, and is asked once. Counted at the embedded broker, which runs in this process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imcli.broker import amqtt_adapter
from imcli.broker.accounts import AccountStore
from imcli.broker.settings import BrokerSettings
from imcli.core.errors import PublishFailed
from imcli.core.mqtt import FINAL_REFUSAL, SUBSCRIBE_TRIES, Credentials, MqttClient
from imcli.core.wire import Topics
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.rawmqtt import password_of

T = Topics()


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[ServeInfo]:
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "data", port=0), workers=False) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        yield info


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every filter the broker was asked to subscribe to, counted; the first SUBSCRIBE of alice's
    user filter is refused only after ``FINAL_REFUSAL`` and a half (NATS's slow refusal)."""
    counts: Counter[str] = Counter()
    add = amqtt_adapter.ImBroker.add_subscription

    async def counted(self: amqtt_adapter.ImBroker, subscription: tuple[str, int], session: Any) -> int:
        counts[subscription[0]] += 1
        if subscription[0] == T.user_filter("alice") and counts[subscription[0]] == 1:
            await asyncio.sleep(FINAL_REFUSAL + 0.5)
            return 0x80
        return await add(self, subscription, session)

    monkeypatch.setattr(amqtt_adapter.ImBroker, "add_subscription", counted)
    return counts


def client(info: ServeInfo, name: str) -> MqttClient:
    return MqttClient(info.address, Credentials(name, password_of(name)), f"{name}:tries")


def test_a_refusal_at_once_is_final_and_asked_once(bare: ServeInfo, asked: Counter[str]) -> None:
    """alice's SUBSCRIBE to bob's topics: the ACL's 0x80 fails at once (it was asked 3 times, 3 s)."""
    with client(bare, "alice") as alice, pytest.raises(PublishFailed) as refused:
        alice.subscribe([T.user_filter("bob")], tries=SUBSCRIBE_TRIES)
    assert str(refused.value) == (
        "the broker refused the subscription to im/user/bob/# (is your account allowed to read there?)"
    )
    assert asked[T.user_filter("bob")] == 1


def test_a_slow_refusal_is_tried_again(bare: ServeInfo, asked: Counter[str]) -> None:
    """A refusal that took seconds (JetStream's consumer not made in time) is asked again, and granted."""
    with client(bare, "alice") as alice:
        alice.timeout = FINAL_REFUSAL + 5  # the slow SUBACK is not a timeout
        alice.subscribe([T.user_filter("alice")], tries=SUBSCRIBE_TRIES)
    assert asked[T.user_filter("alice")] == 2
