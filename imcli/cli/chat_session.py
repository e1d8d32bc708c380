"""The interactive client's logic, without a terminal: where the prompt is, what a line
of input does, which arriving messages are shown, and catching up after an absence.

``imcli.cli.chat_ui`` draws it with prompt_toolkit and Rich; tests drive it directly.
Everything goes over the one ``Listener`` connection (requests included).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from imcli.cli import chat_commands
from imcli.cli.chat_commands import COMMANDS, Note, Output
from imcli.cli.chat_files import ChatFiles  # its slash commands (/send, /get, /open) join the table
from imcli.cli.chat_state import SEEN_KEPT, ChatState
from imcli.client import services
from imcli.client.identity import Identity
from imcli.client.listener import Listener, content_key, seen_key
from imcli.client.services import Conversation
from imcli.core.errors import ImcliError, InvalidInput, PublishFailed, RateLimited, RequestTimeout
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, HISTORY_MAX, Presence, Received, encode

ROOM_BACKLOG = 20  # missed lines shown per visited room on start
FIRST_RUN = 50  # lines asked of the archive on the first run on a device: what was waiting
CATCH_UP_OVERLAP = 120.0  # seconds asked again at the start: clocks differ; seen keys de-duplicate

__all__ = ["COMMANDS", "QUEUED", "CatchUp", "ChatSession", "Note", "Output"]  # chat_ui and tests import these here

QUEUED = "not connected: this line will be sent when reconnected"


@dataclass
class CatchUp:
    shown: list[Received] = field(default_factory=list)  # missed lines to show, oldest first
    unread: Counter[str] = field(default_factory=Counter)  # missed lines shown, per conversation
    hidden: Counter[str] = field(default_factory=Counter)  # missed room lines not shown, per room
    more: bool = False
    archive_answered: bool = True
    archive_refused: str = ""  # why the broker dropped the archive request (its rate notice), if it did


class ChatSession:
    def __init__(
        self, identity: Identity, state: ChatState, listener: Listener, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        self.identity = identity
        self.me = identity.account
        self.state = state
        self.listener = listener
        self.here = _parse_or(state.here, Conversation("room", "lobby"))
        self.rooms = {r for r in state.rooms if _valid_room(r)} or {"lobby"}
        self.unread: Counter[str] = Counter()  # per conversation other than here, since last there
        self.quit = threading.Event()
        self.max_payload = max_payload
        self.files = ChatFiles()  # the files shown, by number (/get N, /open N)
        listener.accept_hint = "/friend accept {}"  # a friend request offers the in-chat command

    # ---------------------------------------------------------------- arriving messages

    def shows(self, item: Received) -> bool:
        """Direct and group messages always; rooms only once visited (the rest are counted).
        A line of another conversation than the prompt's is counted unread until one goes there."""
        if item.kind == "room" and item.room not in self.rooms:
            self.unread[item.room or "?"] += 1
            return False
        where = Conversation.of(item, self.me)
        if where is not None and where != self.here and item.sender != self.me:
            self.unread[str(where)] += 1
        return True

    def mentions_me(self, item: Received) -> bool:
        if item.kind not in ("room", "group") or item.sender == self.me:
            return False
        names = {self.me, self.listener.nicks.get(self.me, self.me)}
        return any(re.search(rf"(?<![\w@-])@?{re.escape(n)}(?![\w-])", item.text, re.IGNORECASE) for n in names)

    def catch_up(self, queued: list[Received]) -> CatchUp:
        """Merge what the broker queued with what the archive kept since the last run.

        The broker keeps direct and group messages for a persistent session only while it
        runs; the archive fills what it lost (a restart) and counts the rooms. Each message
        appears once, in time order.
        """
        report = CatchUp()
        fetched = self._from_archive(queued, report)
        backlog: Counter[str] = Counter()
        for item in sorted([*queued, *fetched], key=lambda m: m.ts, reverse=True):
            where = Conversation.of(item, self.me)
            if item.kind != "room" or (item.room in self.rooms and backlog[item.room or ""] < ROOM_BACKLOG):
                backlog[item.room or ""] += item.kind == "room"  # a busy room's last lines only; /history has the rest
                report.shown.append(item)
                if item.missed and where is not None:
                    report.unread[str(where)] += 1  # the counts say what the lines shown are
            elif item.missed and where is not None:
                report.hidden[str(where)] += 1
        report.shown.reverse()
        for name, n in [*report.unread.items(), *report.hidden.items()]:
            if name != str(self.here):
                self.unread[name] += n
        return report

    def _from_archive(self, queued: list[Received], report: CatchUp) -> list[Received]:
        """What the archive kept since the last run that was neither seen nor queued, marked missed."""
        fetched: list[Received] = []
        last_seen = self.state.last_seen
        # the first run of a user or of a new device (issue 17): the newest of what is waiting,
        # once (the next run starts from this one's last_seen)
        since = None if last_seen is None else last_seen - CATCH_UP_OVERLAP
        try:
            page = services.ask_history(self.listener, None, FIRST_RUN if since is None else HISTORY_MAX, since=since)
            report.more = page.more
        except RequestTimeout:
            report.archive_answered = False
            return fetched
        except RateLimited as exc:  # chat goes on with what the broker kept, and says why
            report.archive_answered, report.archive_refused = False, exc.message
            return fetched
        # plain-text lines have no id of their own: the archive's copy of one the broker
        # queued is matched by content (a count, so a repeated line stays repeated), and
        # the overlap, asked again for ids, would show last run's lines once more
        queued_lines = Counter(content_key(m) for m in queued if m.format == "text")
        for m in page.messages:
            # my own lines count too: those sent from my other devices (issue 17); this
            # device's own are in its seen ids
            if self.listener.seen.seen(seen_key(m)):
                continue
            if m.format == "text" and last_seen is not None and m.ts < last_seen:
                continue
            if m.format == "text" and queued_lines[key := content_key(m)] > 0:
                queued_lines[key] -= 1
                continue
            fetched.append(m.model_copy(update={"missed": True}))
        return fetched

    def prompt(self) -> str:
        """``lobby> ``, or with unread lines elsewhere ``lobby [@alice 2, #team 1]> ``."""
        waiting = ", ".join(f"{where} {n}" for where, n in self.unread.most_common(4))
        return f"{self.here}" + (f" [{waiting}{', …' if len(self.unread) > 4 else ''}]" if waiting else "") + "> "

    def toolbar(self) -> str:
        state = "" if self.listener.connected else " · not connected, reconnecting…"
        return f" {self.me} · {self.here}{state} · /help"

    def online(self) -> list[str]:
        """Names to complete: online accounts and their nicknames."""
        names = set(self.listener.online)
        names.update(self.listener.nicks.get(a, a) for a in self.listener.online)
        return sorted(names - {self.me})

    def remember(self) -> ChatState:
        self.state.last_seen = time.time()
        self.state.seen = self.listener.seen.newest(SEEN_KEPT)
        self.state.here = str(self.here)
        self.state.rooms = sorted(self.rooms)
        return self.state

    # ---------------------------------------------------------------- input

    def handle(self, line: str) -> list[Output]:
        """One line typed at the prompt: a slash command, or text for the current conversation."""
        line = line.rstrip("\n")
        if not line.strip():
            return []
        try:
            if line.startswith("/") and not line.startswith("//"):
                return self._command(line)
            return self.send(self.here, line.removeprefix("/"))
        except ImcliError as exc:
            return [Note(str(exc), "error")]

    def send(self, where: Conversation, text: str) -> list[Output]:
        message = services.prepare_text(text, self.max_payload)
        topics = self.identity.topics
        if where.kind == "room":
            return self._publish(topics.room(where.name, self.me), encode(message))  # it comes back to us
        if where.kind == "group":
            return self._publish(topics.group_msg(where.name, self.me), encode(message))
        nicks = self.listener.nicks
        mine, theirs = nicks.get(self.me, self.me), nicks.get(where.name, where.name)
        echo = Received(
            kind="dm", sender=self.me, to=where.name, id=message.id, ts=message.ts, text=message.text,
            nick=mine if mine != self.me else None, to_nick=theirs if theirs != where.name else None,
        )  # fmt: skip
        # Seen before it is sent: the broker's copy for my devices (im/user/<me>/sent/<to>) reaches
        # this connection too, before the PUBACK, and would be shown beside the echo.
        self.listener.seen.seen(seen_key(echo))
        try:
            queued = self._publish(topics.dm(where.name, self.me), encode(message))
        except ImcliError:
            self.listener.seen.forget(seen_key(echo))
            raise
        return [*queued, echo]

    def _publish(self, topic: str, payload: bytes) -> list[Output]:
        """Send now; while the connection is down, queue it (paho sends it on reconnecting) and say so."""
        if not self.listener.connected:
            self.listener.publish_later(topic, payload)
            return [Note(QUEUED, "dim")]
        try:
            self.listener.publish(topic, payload)
        except PublishFailed:
            if self.listener.connected:
                raise
            return [Note(QUEUED, "dim")]  # lost on the way: paho keeps a QoS 1 message for the next connection
        return []

    def _command(self, line: str) -> list[Output]:
        name, _, rest = line.partition(" ")
        return chat_commands.find(name).run(self, rest.strip())

    def dm_target(self, name: str) -> Conversation:
        user = services.resolve_user(self.listener, name)
        if user.nick:
            self.listener.nicks.setdefault(user.account, user.nick)
        services.check_can_dm(self.listener, user.account)
        return Conversation("dm", user.account)

    def go(self, where: Conversation) -> list[Output]:
        if where.kind == "group":
            services.check_member(self.listener, where.name, self.me)
        if where.kind == "room":
            self.rooms.add(where.name)
        self.unread.pop(str(where), None)
        self.here = where
        return [Note(f"now talking in {where}", "dim")]

    def who_line(self) -> Note:
        """Who is online, in one line."""
        users: list[Presence] = services.ask_who(self.listener)
        if not users:
            return Note("nobody is online", "dim")
        return Note("online: " + ", ".join(u.nick if u.nick == u.account else f"{u.nick} ({u.account})" for u in users))


def _valid_room(name: str) -> bool:
    try:
        return Conversation.parse(name).kind == "room"
    except InvalidInput:
        return False


def _parse_or(text: str, default: Conversation) -> Conversation:
    try:
        return Conversation.parse(text)
    except InvalidInput:
        return default
