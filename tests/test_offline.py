"""Offline delivery on every broker: what arrives for bob while he is away (his persistent session)
reaches him once, in order, when he comes back, with what the archive kept merged in.

Runs on the embedded broker, on Mosquitto with ``imcli workers --dynsec`` beside it, and on a
three-node NATS cluster where alice is on node 1 and bob on node 3 (his session is kept in
JetStream, three replicas): tests/brokers.py, tests/natsbroker.py. tests/test_chat.py has the
embedded broker's own cases (a broker restart, ``imcli listen`` in its own process).

On NATS 2.9 a resumed session's queue does not all come before the SUBACK of the client's SUBSCRIBE,
as it does on the embedded broker and Mosquitto: its JetStream consumers deliver it at their own pace,
also after that SUBACK (seen here: queued DMs not marked missed, and three queued plain lines out of
order in chat's catch-up). imcli's clients tell queued from live by that SUBACK, so on NATS some queued
messages are not marked ``missed``, and chat's catch-up merges only what arrived by then (JSON
messages are still shown once and in order: the archive's copies fill in, and a later copy is dropped
by its id). What depends on the queue coming first is checked on the other two brokers only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from imcli.cli.chat_state import ChatState
from imcli.core.wire import Topics
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import Raw, wait_until
from tests.test_chat import chat_start, history_has, make_team, send_fifty

broker_kind, broker_under_test, server, users = brokers.ALL  # every test using `server` on the three brokers

T = Topics()
# the embedded broker and Mosquitto only (the module's docstring says why)
QUEUE_FIRST = pytest.mark.parametrize("broker_kind", ["amqtt", "mosquitto"], indirect=True)


def test_offline_messages_arrive_once_in_order(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], broker_kind: str
) -> None:
    """bob runs chat once (his session exists from then on) and leaves; alice sends 25 direct and
    25 group messages, interleaved; bob's next chat shows each once, in order, marked missed: queued
    by the broker and kept by the archive, merged."""
    users("alice", "bob")
    make_team(server)
    listener, session, _ = chat_start(server, ChatState())
    listener.close()
    state = session.remember()
    alice = raw("alice", client_id="alice:bot")
    sent = send_fifty(server, alice)
    listener, _session, shown = chat_start(server, state)
    listener.close()
    mine = [m for m in shown if m.sender == "alice" and m.kind in ("dm", "group")]
    assert sorted(m.text for m in mine) == sorted(sent), "each message exactly once"
    for kind in ("dm", "group"):
        assert [m.text for m in mine if m.kind == kind] == [t for t in sent if t.startswith(kind)], "in order"
    if broker_kind != "nats":  # there the queue may come after the SUBACK (the module's docstring)
        assert all(m.missed for m in mine)


@QUEUE_FIRST
def test_a_bots_plain_lines_are_shown_once(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    """Lines without an id (``mosquitto_pub -m``): the queued copy and the archive's are matched by
    content, a repeated line stays repeated, and what was shown live is not shown again."""
    users("alice", "bob")
    listener, session, _ = chat_start(server, ChatState())
    bot = raw("alice", client_id="alice:bot")
    bot.publish(T.dm("bob", "alice"), b"seen live")
    assert wait_until(lambda: any(m.text == "seen live" for m in listener.pending()), 15)
    history_has(server, ["seen live"])
    listener.close()
    state = session.remember()
    lines = ["deploy done", "tests green", "deploy done"]
    for line in lines:
        bot.publish(T.dm("bob", "alice"), line.encode())
    history_has(server, lines)
    listener, session, shown = chat_start(server, state)
    listener.close()
    assert [m.text for m in shown if m.sender == "alice"] == lines
    assert all(m.format == "text" and m.missed for m in shown if m.sender == "alice")
