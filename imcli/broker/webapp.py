"""The web client's files and the Origin rule, on the WebSocket listener's port (issue 19).

``imcli serve --ws-port P`` answers plain HTTP GETs on ``P`` with the files of
``imcli/web/static`` (the page, its script and style, and the vendored mqtt.js), and lets
WebSocket upgrades through to MQTT. Both travel on one port, so the page connects to its
own origin (``ws://host:P/mqtt``, ``wss://`` under TLS) and its Content-Security-Policy can
say ``'self'`` and that host only. This is websockets' ``process_request`` hook: it runs
after the HTTP request is read and before the upgrade, on every connection of the listener.

* **Files.** Only the files found under ``static/`` when the broker starts are served, read
  once into memory: a path is a key in that table, never joined to a directory, so ``..`` or
  an encoded slash finds nothing (404). No directory listings, no other methods.
* **Origin.** A browser sends ``Origin`` with every WebSocket handshake; a page of another
  site that tries to open a socket to the broker (and then guess or phish a password, or use
  a session the user left open) is refused with 403 before the upgrade. Allowed: the
  listener's own origin (``Origin`` equal to ``http(s)://`` + the ``Host`` the browser
  asked), and the origins given with ``--ws-origin``. On a loopback listener that ``Host``
  must also name this machine (``localhost``, ``127.0.0.1``, ``[::1]``): a site whose name
  is re-pointed at 127.0.0.1 (DNS rebinding) would otherwise be its own origin. Programs that send no ``Origin`` (paho,
  mosquitto_sub, mqtt.js under Node) are let through: the Origin header is a browser's
  statement about the page, and MQTT's own login still applies to everyone.
* **Headers.** Every file carries a CSP with no inline script and no other host (``worker-src
  blob:`` for mqtt.js's keep-alive timer, a worker it builds so that a background tab's
  throttled timers do not miss the PINGREQ: a blob only a script already running can make),
  ``nosniff``, ``no-referrer`` and ``frame-ancestors 'none'``. And Trusted Types
  (``require-trusted-types-for 'script'; trusted-types default``): the browser itself refuses
  any string that would become HTML or script, so a renderer that ever put wire data through
  ``innerHTML`` would throw instead of parsing it; ``static/policy.js``, loaded first, passes
  only the URL of a blob the page made (mqtt.js's timer Worker).
"""

from __future__ import annotations

import http
import ipaddress
import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

MQTT_PATH = "/mqtt"  # what the page connects to; any path upgrades, as with Mosquitto
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain"}


def _walk(folder: Traversable, prefix: str = "/") -> Iterable[tuple[str, bytes]]:
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _walk(entry, f"{prefix}{entry.name}/")
        elif not entry.name.startswith("."):
            yield f"{prefix}{entry.name}", entry.read_bytes()


def static_files() -> dict[str, bytes]:
    """Every file the web client ships, by URL path (``/`` is ``index.html``)."""
    files = dict(_walk(resources.files("imcli.web") / "static"))
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def csp(host: str) -> str:
    """The page's Content-Security-Policy: its own files only, and MQTT to the host it came from."""
    if _HOST.fullmatch(host) is None:  # not a host name: no socket at all
        return (
            "default-src 'none'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
            "require-trusted-types-for 'script'; trusted-types default"
        )
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src blob: data:; worker-src blob:; "
        f"connect-src ws://{host} wss://{host}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        "require-trusted-types-for 'script'; trusted-types default"
    )


def loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine: ``localhost``, ``127.x.y.z`` or ``[::1]``, any port."""
    if host is None:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
    name = name.rsplit("]", 1)[0].strip("[]").lower() if name.startswith("[") else name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(
    origin: str | None, host: str | None, tls: bool, extra: Iterable[str] = (), *, loopback: bool = False
) -> bool:
    """Whether a WebSocket handshake with this ``Origin`` may go on to MQTT (see the module docstring).
    ``loopback``: the listener is bound to loopback, so its own origin must name a loopback host."""
    if origin is None or origin in set(extra):
        return True
    own = host is not None and origin == f"{'https' if tls else 'http'}://{host}"
    return own and (not loopback or loopback_host(host))


@dataclass
class WebApp:
    """The ``process_request`` of the WebSocket listener: files for GETs, the Origin rule for upgrades."""

    tls: bool = False
    origins: tuple[str, ...] = ()
    loopback: bool = False  # bound to loopback only: the Host must name this machine
    files: dict[str, bytes] = field(default_factory=static_files)

    def __call__(self, connection: Any, request: Request) -> Response | None:
        headers = request.headers
        if any(len(headers.get_all(name)) > 1 for name in ("Host", "Origin", "Upgrade")):
            return self._response(http.HTTPStatus.BAD_REQUEST, b"one Host, Origin and Upgrade only\n", "text/plain")
        if "websocket" in headers.get("Upgrade", "").lower():
            if origin_allowed(
                headers.get("Origin"), headers.get("Host"), self.tls, self.origins, loopback=self.loopback
            ):
                return None
            return self._response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
        path = request.path.split("?", 1)[0]
        body = self.files.get(path)
        if body is None:
            return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        kind = _TYPES.get(path[path.rfind(".") :]) or mimetypes.guess_type(path)[0] or "application/octet-stream"
        if path == "/":
            kind = "text/html"
        response = self._response(http.HTTPStatus.OK, body, kind)
        response.headers["Content-Security-Policy"] = csp(headers.get("Host", "127.0.0.1"))
        return response

    @staticmethod
    def _response(status: http.HTTPStatus, body: bytes, kind: str) -> Response:
        headers = Headers()
        headers["Content-Type"] = f"{kind}; charset=utf-8" if kind.startswith("text/") else kind
        headers["Content-Length"] = str(len(body))
        headers["Cache-Control"] = "no-cache"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Connection"] = "close"
        return Response(status.value, status.phrase, headers, body)
