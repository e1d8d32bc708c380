"""Debian's Chromium driven by Playwright, for the web client's tests (issue 19).

Playwright's own browser download is never used: ``executable_path`` points at the system's
``/usr/bin/chromium`` (``.ci/run`` installs Debian's package). Each user is a fresh browser
context (its own storage, so its own device), one page each. ``WebUser`` wraps the few
things a test does on the page, by the ids of imcli/web/static/index.html.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, sync_playwright

CHROMIUM = os.environ.get("IMCLI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


def require_chromium() -> None:
    """Skip when Chromium is absent here; CI installs it (.ci/run), so there it always runs."""
    if not chromium_available():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} not installed (.ci/run installs Debian's chromium package)")


@dataclass
class WebUser:
    """One person in one browser context, on the web client."""

    p: Page
    name: str
    errors: list[str] = field(default_factory=list)

    def sign_in(self, password: str, *, register: bool = False) -> None:
        p = self.p
        p.fill("#account", self.name)
        p.fill("#password", password)
        p.click("#register-button" if register else "#signin-button")
        p.wait_for_selector("#app:not([hidden])")
        # joined: the page shows itself online (its own presence record came back)
        p.wait_for_selector(f'#people li.online[data-account="{self.name}"]', state="attached")

    def open_room(self, room: str) -> None:
        self.p.fill("#room-input", room)
        self.p.press("#room-input", "Enter")
        self.wait_title(room)

    def open_dm(self, who: str) -> None:
        self.p.fill("#dm-input", who)
        self.p.press("#dm-input", "Enter")
        self.wait_title(f"@{who}")

    def open_conv(self, key: str) -> None:
        self.p.click(f'li[data-key="{key}"]')

    def wait_title(self, title: str) -> None:
        self.p.wait_for_function(
            "t => document.getElementById('conv-title').textContent === t", arg=title, timeout=TIMEOUT_MS
        )

    def say(self, text: str) -> None:
        self.p.fill("#text", text)
        self.p.press("#text", "Enter")
        self.see(text)

    def see(self, text: str, sender: str | None = None) -> None:
        """Wait until the open conversation shows a message whose text is exactly ``text``."""
        self.p.wait_for_function(
            """([text, sender]) => [...document.querySelectorAll('#messages li.message')].some(li =>
                 li.querySelector('.text')?.textContent === text && (!sender || li.dataset.from === sender))""",
            arg=[text, sender],
            timeout=TIMEOUT_MS,
        )

    def see_line(self, text: str) -> None:
        """Wait until the open conversation shows a line of the page's own (an event, a notice)."""
        self.p.wait_for_function(
            "t => [...document.querySelectorAll('#messages li.system')].some(li => li.textContent === t)",
            arg=text,
            timeout=TIMEOUT_MS,
        )

    def texts(self) -> list[str]:
        return list(self.p.eval_on_selector_all("#messages li.message .text", "els => els.map(e => e.textContent)"))

    def group_action(self, button: str, user: str) -> None:
        self.p.fill("#member-input", user)
        self.p.click(button)
        self.p.wait_for_function("() => document.getElementById('member-input').value === ''", timeout=TIMEOUT_MS)


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless system Chromium; Playwright gives it a fresh, temporary profile directory."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_user(
    browser: Browser, url: str, name: str, viewport: tuple[int, int] = (1100, 720), *, trust_any_cert: bool = False
) -> WebUser:
    """A fresh context (storage, device) on the web client at ``url``; page errors and dialogs are recorded.
    ``trust_any_cert``: the tests' throw-away CA is not in the browser's store."""
    context = browser.new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, ignore_https_errors=trust_any_cert
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    user = WebUser(page, name)
    page.on("pageerror", lambda exc: user.errors.append(f"pageerror: {exc}"))

    def dialog(d: Dialog) -> None:  # an alert() of injected script, say
        user.errors.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    page.on("console", lambda m: user.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.goto(url)
    return user
