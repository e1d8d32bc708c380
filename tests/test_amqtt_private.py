"""The pinned amqtt still has every private name the embedded broker relies on
(``AMQTT_PRIVATE`` in imcli/broker/amqtt_adapter.py), and every override of a private
amqtt method is listed there: an amqtt upgrade that renames one fails here, by name,
instead of silently bypassing a rule."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import pytest
from amqtt.adapters import WebSocketsReader
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from imcli.broker.amqtt_adapter import AMQTT_PRIVATE, AckAfterJournal, ImBroker, LightSession, PrivateName
from imcli.broker.packets import CheckedWebSocketsReader


@pytest.fixture(scope="module")
def instances() -> dict[str, Any]:
    """One unstarted instance of each amqtt class whose instance attributes are listed."""

    async def build() -> dict[str, Any]:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": {}})
        handler = BrokerProtocolHandler(broker.plugins_manager)
        reader = WebSocketsReader(object())  # only its attributes are read
        return {
            "Broker": broker, "BrokerProtocolHandler": handler, "Session": Session(), "WebSocketsReader": reader,
            "PluginManager": broker.plugins_manager,
        }  # fmt: skip

    return asyncio.run(build())


def _resolve(entry: PrivateName, instances: dict[str, Any]) -> Any:
    module = importlib.import_module(entry.module)
    owner_name, _, attribute = entry.name.rpartition(".")
    if not owner_name:
        assert hasattr(module, attribute), f"{entry.module}.{entry.name} no longer exists"
        return getattr(module, attribute)
    owner = getattr(module, owner_name, None)
    assert owner is not None, f"{entry.module}.{owner_name} no longer exists"
    if hasattr(owner, attribute):
        return getattr(owner, attribute)
    instance = instances.get(owner_name)
    assert instance is not None and hasattr(instance, attribute), f"{entry.module}.{entry.name} no longer exists"
    return getattr(instance, attribute)


@pytest.mark.parametrize("entry", AMQTT_PRIVATE, ids=lambda e: f"{e.module}.{e.name}")
def test_the_pinned_amqtt_has_it(entry: PrivateName, instances: dict[str, Any]) -> None:
    found = _resolve(entry, instances)
    if entry.use in ("overridden", "called"):
        assert callable(found), f"{entry.module}.{entry.name} is no longer a method"


OURS = {
    "Broker": ImBroker,
    "BrokerProtocolHandler": AckAfterJournal,
    "Session": LightSession,
    "WebSocketsReader": CheckedWebSocketsReader,
}


@pytest.mark.parametrize(
    "entry", [e for e in AMQTT_PRIVATE if e.use == "overridden"], ids=lambda e: f"{e.module}.{e.name}"
)
def test_each_override_keeps_amqtts_signature(entry: PrivateName, instances: dict[str, Any]) -> None:
    owner_name, _, method = entry.name.rpartition(".")
    theirs = inspect.signature(_resolve(entry, instances))
    ours = inspect.signature(getattr(OURS[owner_name], method))
    assert list(ours.parameters) == list(theirs.parameters), f"{entry.name}: amqtt now takes {theirs}"


@pytest.mark.parametrize(("owner_name", "ours"), OURS.items())
def test_every_override_of_a_private_amqtt_method_is_listed(owner_name: str, ours: type) -> None:
    amqtt_classes = {"Broker": Broker, "BrokerProtocolHandler": BrokerProtocolHandler, "Session": Session}
    amqtt_class = {**amqtt_classes, "WebSocketsReader": WebSocketsReader}[owner_name]
    listed = {e.name for e in AMQTT_PRIVATE}
    overridden = {
        f"{owner_name}.{name}"
        for name, value in vars(ours).items()
        if name.startswith("_") and not name.startswith("__") and callable(value) and hasattr(amqtt_class, name)
    }
    assert overridden <= listed, f"not in AMQTT_PRIVATE: {sorted(overridden - listed)}"
