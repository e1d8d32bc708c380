"""What ``imcli chat`` (per account) and ``imcli listen`` (per session) remember between runs,
in the config directory.

``last_seen`` (when it last ran) lets the next start ask the archive what was missed;
``seen`` (the newest message keys shown) keeps a message that the broker queued *and*
the archive returns, or that was shown just before the last exit, from showing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imcli.client.config import config_dir
from imcli.core.errors import ImcliError
from imcli.core.wire import DEFAULT_ROOM

SEEN_KEPT = 2000


@dataclass
class ChatState:
    last_seen: float | None = None
    seen: list[str] = field(default_factory=list)
    here: str = DEFAULT_ROOM  # the conversation the prompt was in
    rooms: list[str] = field(default_factory=lambda: [DEFAULT_ROOM])  # rooms whose lines are shown


def state_path(account: str) -> Path:
    return config_dir() / f"chat-{account}.json"


def listen_state_path(client_id: str) -> Path:
    """``imcli listen``'s ``last_seen`` and ``seen``, per persistent session (its rooms are its own)."""
    return config_dir() / f"listen-{client_id.replace(':', '-')}.json"


def load_state(account: str, path: Path | None = None) -> ChatState:
    path = path or state_path(account)
    try:
        raw = json.loads(path.read_text())
        return ChatState(
            last_seen=float(raw["last_seen"]) if raw.get("last_seen") is not None else None,
            seen=[str(k) for k in raw.get("seen", [])][-SEEN_KEPT:],
            here=str(raw.get("here", DEFAULT_ROOM)),
            rooms=[str(r) for r in raw.get("rooms", [DEFAULT_ROOM])] or [DEFAULT_ROOM],
        )
    except FileNotFoundError:
        return ChatState()
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return ChatState()  # a damaged state costs a few duplicate lines, not the chat


def load_chat_state(account: str) -> ChatState:
    """``imcli chat``'s state, with what ``imcli listen`` showed on this machine counted as seen:
    a line read live in ``listen`` is not shown again as missed by the next ``chat``."""
    state = load_state(account)
    seen = dict.fromkeys(state.seen)
    for path in sorted(config_dir().glob(f"listen-{account}-*.json"), key=_mtime):
        seen.update(dict.fromkeys(load_state(account, path).seen))
    state.seen = list(seen)[-SEEN_KEPT * 2 :]
    return state


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def save_state(account: str, state: ChatState, path: Path | None = None) -> None:
    path = path or state_path(account)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(state) | {"seen": state.seen[-SEEN_KEPT:]}, f)
        tmp.replace(path)
    except OSError as exc:
        raise ImcliError(
            f"cannot save the chat state in {path.parent}: {exc.strerror or exc}",
            "check that directory's permissions, or set IMCLI_CONFIG_DIR",
        ) from exc


@contextlib.contextmanager
def device_session(client_id: str) -> Iterator[bool]:
    """``True`` if this process may use the persistent session ``client_id``; another
    ``imcli chat`` or ``listen`` on this machine holds it otherwise (two clients with
    one client id would take the session from each other forever)."""
    path = config_dir() / f"session-{client_id.replace(':', '-')}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
