"""Who is talking to which broker: options, environment and the stored profile made into an
:class:`Identity`. The standard library and paho only, so that ``imcli say`` starts fast
(issue 7); every command that talks to a broker starts here.
"""

from __future__ import annotations

import os
import secrets
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imcli.core.errors import InvalidInput
from imcli.core.text import quoted
from imcli.core.topics import DEFAULT_MAX_PAYLOAD, Topics, device_client_id

if TYPE_CHECKING:
    from imcli.client.config import Profile
    from imcli.core.mqtt import BrokerAddress, Credentials


@dataclass(frozen=True)
class Identity:
    """Who is talking to which broker, from which device."""

    address: BrokerAddress
    credentials: Credentials
    device: str
    topics: Topics = field(default_factory=Topics)

    @property
    def account(self) -> str:
        return self.credentials.username

    def client_id(self, purpose: str | None = None) -> str:
        """``<account>:<device>``, or ``<account>:<device>.<purpose><random>`` (``session_name``)."""
        return device_client_id(self.account, self.session_name(purpose))

    def session_name(self, purpose: str | None = None) -> str:
        """The device's name; one-shot commands add a random suffix so they never take
        over (or flap) the device's long-lived session. After a '.': a device credential is
        bound to ``<account>:<device>`` and ``<account>:<device>.<anything>`` (imcli/core/rules.py)."""
        return f"{self.device}.{purpose}{secrets.token_hex(3)}" if purpose else self.device


def listen_session(device: str, rooms: list[str] | None = None) -> str:
    """The persistent session ``imcli listen`` keeps on ``device``: one per selection of rooms,
    so the broker keeps what arrives for each while it is away."""
    return f"{device}.listen" + (f"-{zlib.crc32(' '.join(sorted(rooms)).encode()):08x}" if rooms else "")


def broker_address(
    host: str | None,
    port: int | None,
    profile: Profile | None = None,
    *,
    tls: bool | None = None,
    ca: Path | None = None,
) -> BrokerAddress:
    """Options first, then IMCLI_TLS/IMCLI_CA, then the profile, then plain 127.0.0.1:1883."""
    from imcli.core.mqtt import BrokerAddress

    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"invalid port {port}", "use 1-65535")
    if ca is None and os.environ.get("IMCLI_CA"):
        ca = Path(os.environ["IMCLI_CA"])
    if tls is None and os.environ.get("IMCLI_TLS"):
        tls = os.environ["IMCLI_TLS"].strip().lower() not in ("0", "no", "false", "off")
    if ca is not None:
        if not ca.expanduser().is_file():
            raise InvalidInput(f"no CA file {ca}", "give the PEM file of the CA that signed the broker's certificate")
        ca_file: str | None = str(ca.expanduser().resolve())  # the profile is used from any directory
        tls = True if tls is None else tls
    else:
        ca_file = profile.ca if profile else None
    return BrokerAddress.of(
        host or (profile.host if profile else "127.0.0.1"),
        port if port is not None else (profile.port if profile else 1883),
        tls if tls is not None else bool(profile and profile.tls),
        ca_file,
    )


def signed_in(host: str | None, port: int | None) -> Identity:
    from imcli.client.config import load_profile

    profile = load_profile()
    return Identity(broker_address(host, port, profile), profile.credentials, profile.device)


def message_text(text: str) -> str:
    return read_text_stdin() if text == "-" else text


def read_text_stdin() -> str:
    """A message from stdin; binary input (a picture piped in) is refused in one line, pointing to
    ``imcli send``, instead of a traceback or a message of mojibake."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if "\x00" in text or (data and not text):
        raise InvalidInput("the input is not text (binary data)", "send files and images with: imcli send NAME FILE")
    return text


def heartbeat_seconds() -> float:
    from imcli.core.wire import DEFAULT_HEARTBEAT, HEARTBEAT_RANGE

    raw = os.environ.get("IMCLI_HEARTBEAT")
    if raw is None:
        return DEFAULT_HEARTBEAT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    low, high = HEARTBEAT_RANGE
    if not low <= value <= high:
        raise InvalidInput(f"invalid IMCLI_HEARTBEAT {quoted(raw)}", f"give seconds between {low:g} and {high:g}")
    return value


def max_payload_bytes() -> int:
    raw = os.environ.get("IMCLI_MAX_PAYLOAD")
    if raw is None:
        return DEFAULT_MAX_PAYLOAD
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 64:
        raise InvalidInput(f"invalid IMCLI_MAX_PAYLOAD {quoted(raw)}", "give a number of bytes, at least 64")
    return int(raw)
