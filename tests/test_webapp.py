"""The web client's port (issue 19), without a browser: `imcli serve --ws-port` answers GETs with
the shipped files and their headers, refuses WebSocket handshakes from foreign origins, and
still carries MQTT over WebSocket for programs (no Origin) and for allowed origins.
The page itself is tested in Chromium: tests/test_web.py."""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin, Subprotocol

from imcli.broker.server import BrokerSettings
from imcli.broker.webapp import csp, origin_allowed, static_files
from imcli.cli.serve import check_origin
from imcli.core.errors import InvalidInput
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.conftest import password_of
from tests.rawmqtt import connect_raw

ALLOWED = "https://chat.example.org"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[ServeInfo]:
    settings = BrokerSettings(data_dir=tmp_path / "data", port=0, ws_port=0, ws_origins=(ALLOWED,))
    with BackgroundServer(settings) as info:
        assert info.ws_port is not None
        yield info


def get(port: int, path: str, host: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def handshake(port: int, origin: str | None) -> int:
    """The HTTP status of a WebSocket handshake to /mqtt with this Origin (101: upgraded)."""
    try:
        with ws_connect(
            f"ws://127.0.0.1:{port}/mqtt", origin=Origin(origin) if origin else None, subprotocols=[Subprotocol("mqtt")]
        ):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_the_page_and_its_files_are_served_with_a_strict_policy(web: ServeInfo) -> None:
    assert web.ws_port is not None
    page = get(web.ws_port, "/")
    assert page.status == 200
    assert page.getheader("Content-Type") == "text/html; charset=utf-8"
    policy = page.getheader("Content-Security-Policy") or ""
    assert "script-src 'self';" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert f"connect-src ws://127.0.0.1:{web.ws_port} wss://127.0.0.1:{web.ws_port};" in policy
    assert "frame-ancestors 'none'" in policy
    # Trusted Types: the browser refuses any string that would become HTML or script (static/policy.js
    # passes only the page's own blob: URLs, for mqtt.js's timer Worker)
    assert policy.endswith("; require-trusted-types-for 'script'; trusted-types default")
    # images only from what safeUrl (static/app.js) lets through: the page's own blob: URLs and
    # base64 data: thumbnails; no image is ever loaded from a path of the page's own origin
    assert "; img-src blob: data:;" in policy
    assert page.getheader("X-Content-Type-Options") == "nosniff"
    for path, kind in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/vendor/mqtt.min.js", "text/javascript"),
    ]:
        response = get(web.ws_port, path)
        assert (response.status, response.getheader("Content-Type")) == (200, f"{kind}; charset=utf-8"), path


def test_only_the_shipped_files_are_served(web: ServeInfo) -> None:
    assert web.ws_port is not None
    for path in [
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/vendor/../app.js",
        "//etc/passwd",
        "/nope",
        "/vendor/",
    ]:
        assert get(web.ws_port, path).status == 404, path


def test_no_inline_script_in_the_page() -> None:
    # the policy forbids inline script; the page must not need any (a test in Chromium also
    # runs it under that policy): scripts only by src, no on* attributes, no javascript: URLs
    page = static_files()["/index.html"].decode()
    assert page.count("<script") == page.count('<script src="')
    assert re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE) is None
    assert "javascript:" not in page.lower()
    script = static_files()["/app.js"].decode()
    for call in [
        ".innerHTML",
        ".outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setHTML",
        "DOMParser",
        "createContextualFragment",
        "srcdoc",
        ".style.",
        "cssText",
    ]:
        assert call not in script, call


def test_every_url_the_page_sets_goes_through_one_gate() -> None:
    """An <img>'s src and a link's href are set in one place, ``setUrl``, which lets through only a blob
    of the page's own and a checked PNG or JPEG data: URL: no other code names a URL attribute."""
    script = static_files()["/app.js"].decode()
    sinks = (r"\.(src|href|srcset|action|formAction|poster|data|background)\s*=(?!=)", r"setAttribute\(", r"\.open\(")
    for sink in sinks:
        assert re.search(sink, script) is None, (sink, re.search(sink, script))
    assert script.count("e[attr] = ok") == 1
    assert script.count("function setUrl(") == 1
    # the Trusted Types policy is the page's first script (the CSP's `trusted-types default` names it)
    page = static_files()["/index.html"].decode()
    assert page[page.index("<script") :].startswith('<script src="policy.js"></script>')


def test_a_foreign_origin_is_refused_before_mqtt(web: ServeInfo) -> None:
    port = web.ws_port
    assert port is not None
    assert handshake(port, "http://evil.example") == 403
    assert handshake(port, f"http://127.0.0.1:{port + 1}") == 403  # another port is another origin
    assert handshake(port, f"https://127.0.0.1:{port}") == 403  # and so is https on a plain listener
    assert handshake(port, "null") == 403  # sandboxed frames and file:// pages
    assert handshake(port, f"http://127.0.0.1:{port}") == 101  # the page's own origin
    assert handshake(port, ALLOWED) == 101  # --ws-origin
    assert handshake(port, None) == 101  # programs send no Origin


def test_a_host_name_that_points_here_is_only_its_own_origin(web: ServeInfo) -> None:
    # Origin must equal the Host the browser asked for: a page of evil.example cannot name this host
    port = web.ws_port
    assert port is not None
    assert origin_allowed(f"http://localhost:{port}", f"localhost:{port}", tls=False)
    assert not origin_allowed("http://evil.example", f"localhost:{port}", tls=False)
    assert not origin_allowed(f"http://localhost:{port}", f"localhost:{port}", tls=True)
    assert origin_allowed(f"https://localhost:{port}", f"localhost:{port}", tls=True)


def test_a_rebound_name_is_not_this_loopback_listeners_origin(web: ServeInfo) -> None:
    # DNS rebinding: evil.example re-pointed at 127.0.0.1 makes Origin and Host agree, but on a
    # loopback listener the Host must name this machine
    port = web.ws_port
    assert port is not None
    rebound = f"evil.example:{port}"
    assert not origin_allowed(f"http://{rebound}", rebound, tls=False, loopback=True)
    assert origin_allowed(f"http://{rebound}", rebound, tls=False, loopback=False)  # a public listener's name
    assert origin_allowed(f"http://localhost:{port}", f"localhost:{port}", tls=False, loopback=True)
    assert origin_allowed(f"http://[::1]:{port}", f"[::1]:{port}", tls=False, loopback=True)
    assert origin_allowed(f"http://127.0.0.2:{port}", f"127.0.0.2:{port}", tls=False, loopback=True)
    assert raw_handshake(port, host=rebound, origin=f"http://{rebound}").startswith(b"HTTP/1.1 403 ")
    assert raw_handshake(port, host=f"localhost:{port}", origin=f"http://localhost:{port}").startswith(b"HTTP/1.1 101 ")
    # two Host headers (which one would the check read?) are refused outright
    twice = raw_handshake(port, host=f"localhost:{port}\r\nHost: {rebound}", origin=f"http://{rebound}")
    assert twice.startswith(b"HTTP/1.1 400 ")


def raw_handshake(port: int, host: str, origin: str) -> bytes:
    """A WebSocket upgrade request written by hand (so that Host is exactly ``host``); the response's start."""
    request = (
        f"GET /mqtt HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: mqtt\r\nOrigin: {origin}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        return sock.recv(200)


def test_mqtt_over_websocket_still_works_for_programs(web: ServeInfo, users_on_web: None) -> None:
    assert web.ws_port is not None
    alice = connect_raw("127.0.0.1", web.ws_port, "alice", "alice:ws", transport="websockets")
    try:
        assert alice.rc == 0
    finally:
        alice.close()


@pytest.fixture
def users_on_web(web: ServeInfo) -> None:
    from imcli.broker.accounts import AccountStore

    AccountStore(web.data_dir).add("alice", password_of("alice"))


def test_a_hostile_host_header_gets_no_socket_policy(web: ServeInfo) -> None:
    assert web.ws_port is not None
    response = get(web.ws_port, "/", host="x; script-src *")
    assert "script-src *" not in (response.getheader("Content-Security-Policy") or "")
    assert "connect-src" not in (response.getheader("Content-Security-Policy") or "")
    assert csp("127.0.0.1:1883").count("connect-src") == 1


def test_ws_origin_option_is_checked() -> None:
    assert check_origin("https://chat.example.org") == "https://chat.example.org"
    assert check_origin("http://[::1]:8080") == "http://[::1]:8080"
    for bad in ["chat.example.org", "https://chat.example.org/", "*", "null", "https://a b"]:
        with pytest.raises(InvalidInput):
            check_origin(bad)


def test_a_bad_ws_origin_is_one_error_line() -> None:
    from typer.testing import CliRunner

    from imcli.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--ws-port", "0", "--ws-origin", "chat.example.org"])
    assert result.exit_code == 1
    assert "Error: invalid --ws-origin 'chat.example.org'" in result.output
