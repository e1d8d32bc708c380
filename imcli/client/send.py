"""Sending one line of text: the checks every sender shares, and ``say`` without pydantic.

``imcli say`` is what scripts and bots run in a loop, so it is built from
:mod:`imcli.core.topics` alone (issue 7); :mod:`imcli.client.services` builds its messages with the
payload models and the same checks.
"""

from __future__ import annotations

from imcli.client.identity import Identity
from imcli.core.errors import InvalidInput
from imcli.core.mqtt import MqttClient
from imcli.core.topics import chat_line, check_name


def clean_text(text: str) -> str:
    """The text to send: one trailing newline dropped (``echo hi | imcli say -`` sends "hi"),
    and never empty."""
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise InvalidInput("empty message", "type some text, or pipe it in with '-'")
    return text


_TS_SLACK = 4  # a message's time is a float whose repr varies by a few characters: what is said to fit, fits


def check_size(size: int, max_payload: int, text: str) -> None:
    """The limit is on the encoded message; the error says it in the text the user typed:
    how long it is and how much of it fits (the rest of a message, its id and time, and any
    escaping of the text take the difference)."""
    if size > max_payload:
        typed = len(text.encode("utf-8", "surrogatepass"))
        fits = max(0, max_payload - (size - typed) - _TS_SLACK)
        raise InvalidInput(
            f"message too long: {typed:,} bytes of text, {fits:,} fit in one message",
            "split it into several messages",
        )


def publish_to_room(identity: Identity, room: str, payload: bytes) -> None:
    """Publish ``payload`` to ``room`` as ``identity`` at QoS 1 and wait for the broker's PUBACK."""
    topic = identity.topics.room(check_name(room, "room name"), identity.account)
    with MqttClient(identity.address, identity.credentials, identity.client_id("say")) as client:
        client.publish(topic, payload, qos=1)


def say_text(identity: Identity, room: str, text: str, max_payload: int) -> None:
    """``imcli say``: one chat line to ``room``."""
    text = clean_text(text)
    try:
        payload = chat_line(text)
    except UnicodeEncodeError as exc:  # a lone surrogate from undecodable argv bytes
        raise InvalidInput("the message is not valid text", "send UTF-8") from exc
    check_size(len(payload), max_payload, text)
    publish_to_room(identity, room, payload)
