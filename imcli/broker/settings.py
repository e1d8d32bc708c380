"""What an embedded broker is told at start: ``BrokerSettings``, and the amqtt configuration made from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imcli.broker.limits import Limits
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, DEFAULT_PREFIX

WS_LISTENER = "ws"
TLS_LISTENER = "tls"


@dataclass(frozen=True)
class BrokerSettings:
    data_dir: Path
    bind: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    registration: str = "open"
    max_payload: int = DEFAULT_MAX_PAYLOAD
    limits: Limits = field(default_factory=Limits)
    history_days: float | None = None  # the archive worker's retention; None keeps everything
    tls_cert: Path | None = None  # PEM certificate (chain) and key: TLS on every listener bound to `bind`
    tls_key: Path | None = None
    ws_port: int | None = None  # an MQTT-over-WebSocket listener as well (wss with TLS), serving the web client
    ws_origins: tuple[str, ...] = ()  # browser origins allowed besides the listener's own (imcli/broker/webapp.py)
    packet_timeout: float = 10.0  # seconds a peer has to complete its CONNECT, or any packet it started

    @property
    def max_packet(self) -> int:
        """Largest MQTT packet accepted from a user: a payload at the limit (a file's chunk's) plus the longest possible
        topic and CONNECT fields (payloads in between are dropped with a notice, larger packets cut)."""
        return max(self.max_payload, self.limits.max_chunk) + 4 * 65_536

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def amqtt_config(self) -> dict[str, Any]:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        secure: dict[str, Any] = {}
        if self.tls_cert is not None and self.tls_key is not None:
            secure = {"ssl": True, "certfile": str(self.tls_cert), "keyfile": str(self.tls_key)}
        main = {"type": "tcp", "bind": f"{host}:{self.port}", **secure}
        if secure:
            # amqtt copies every field a listener leaves at its default value (ssl=False among them)
            # from the listener named "default", so "default" must be the plain one. It is where the
            # in-process workers connect: plain MQTT on loopback only, so they need not trust (or
            # match the host name of) whatever certificate the operator gave.
            listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": "127.0.0.1:0"}, TLS_LISTENER: main}
        else:
            listeners = {"default": main}
        if self.ws_port is not None:
            listeners[WS_LISTENER] = {"type": "ws", "bind": f"{host}:{self.ws_port}", **secure}
        return {
            "listeners": listeners,
            "timeout_disconnect_delay": 2,
            # no amqtt plugins: ImBroker (imcli/broker/amqtt_adapter.py) calls the connection gate
            # and the topic ACL itself, before amqtt would ask its auth and topic plugins (an
            # empty table also keeps amqtt's defaults, anonymous login among them, out)
            "plugins": {},
        }
