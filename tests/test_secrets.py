"""No password leaves the places it must be: a whole session against `imcli serve --verbose`
(as subprocesses, so every log line is real) is scanned for the passwords it used.

Scanned: the broker's stdout and stderr, every client's stdout and stderr, and every file in
the data directory (the account file holds argon2 hashes only, checked separately). The
credential files must be private: the login profile, the account file and its lock 0600,
the profile's and the data directory 0700, and nothing in the data directory open to others.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Proc

PASSWORDS = {
    "alice": "alice-Secret-0f3c9e",
    "bob": "bob-Secret-8d21aa",
    "carol": "carol-Secret-55e0b7",  # added by the operator
    "wrong": "not-alices-Secret-9b4d",  # a failed login
}

pytestmark = pytest.mark.slow


def imcli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imcli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_no_password_in_logs_or_data_files(tmp_path: Path, procs: Callable[..., Proc]) -> None:
    data = tmp_path / "data"
    serve = procs("serve", "--verbose", "--port", "0", "--data-dir", str(data), env={})
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", serve.line(timeout=30))
    assert match, serve.err_lines
    port = match.group(1)
    where = ["--host", "127.0.0.1", "--port", port]
    alice = {"IMCLI_CONFIG_DIR": str(tmp_path / "alice")}
    bob = {"IMCLI_CONFIG_DIR": str(tmp_path / "bob")}
    carol = PASSWORDS["carol"] + "\n"

    runs = [
        imcli(alice, "register", "alice", *where, "--password-stdin", stdin=PASSWORDS["alice"] + "\n"),
        imcli(bob, "register", "bob", *where, "--password-stdin", stdin=PASSWORDS["bob"] + "\n"),
        imcli(alice, "login", "alice", *where, "--password-stdin", stdin=PASSWORDS["wrong"] + "\n"),
        imcli(alice, "login", "alice", *where, "--password-stdin", stdin=PASSWORDS["alice"] + "\n"),
        imcli(alice, "say", "hello lobby"),
        imcli(alice, "dm", "bob", "hello bob"),
        imcli(bob, "who", "--json"),
        imcli(alice, "admin", "user", "add", "carol", "--data-dir", str(data), "--password-stdin", stdin=carol),
        imcli(alice, "admin", "user", "list", "--data-dir", str(data)),
        imcli({**alice, "IMCLI_PASSWORD": PASSWORDS["wrong"]}, "login", "carol", *where),
    ]
    codes = [r.returncode for r in runs]
    assert codes == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1], [(r.args[3:5], r.stderr) for r in runs]
    assert "wrong account name or password" in runs[2].stderr  # the wrong password was really tried against the broker
    open_while_running = _open_to_others(data)  # sqlite's -wal/-shm files exist only while the broker runs
    assert serve.stop() == 0
    assert open_while_running == [], f"files open to others while the broker ran: {open_while_running}"

    logged = {"broker stdout": "\n".join(_drain(serve)), "broker stderr": "\n".join(serve.err_lines)}
    for i, r in enumerate(runs):
        logged[f"client {i} {r.args[3:5]} stdout"] = r.stdout
        logged[f"client {i} {r.args[3:5]} stderr"] = r.stderr
    assert "CONNECT refused" in logged["broker stderr"], "the verbose log is not what was scanned"
    files = {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert {"accounts.json", "retained.sqlite3"} <= set(files)

    for label, secret in PASSWORDS.items():
        for source, text in logged.items():
            assert secret not in text, f"{label}'s password is in the {source}"
        for name, content in files.items():
            assert secret.encode() not in content, f"{label}'s password is in {name}"
    for source, text in logged.items():
        assert "$argon2" not in text, f"a password hash is in the {source}"
    for name, content in files.items():
        if name != "accounts.json":
            assert b"$argon2" not in content, f"a password hash is in {name}"
    services = ("presence", "groups", "archive", "files")  # the workers imcli serve runs
    assert files["accounts.json"].count(b"$argon2id$") == 3 + len(services)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(data) == 0o700
    assert mode(data / "accounts.json") == 0o600
    assert mode(data / "accounts.lock") == 0o600
    assert mode(data / "retained.sqlite3") == 0o600
    assert _open_to_others(data) == []
    for config in (tmp_path / "alice", tmp_path / "bob"):
        assert mode(config) == 0o700
        assert mode(config / "profile.json") == 0o600


def _open_to_others(data: Path) -> list[str]:
    """Files and folders in the data directory (the archive, with DMs, among them) that others may read."""
    modes = {p: p.stat().st_mode & 0o777 for p in data.rglob("*")}
    return [f"{p.relative_to(data)} {oct(m)}" for p, m in modes.items() if m & 0o077]


def _drain(proc: Proc) -> list[str]:
    lines = []
    while not proc.lines.empty():
        lines.append(proc.lines.get_nowait())
    return lines
