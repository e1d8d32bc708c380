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

from imcli.cli.chat_state import SEEN_KEPT, ChatState
from imcli.client import services
from imcli.client.identity import Identity
from imcli.client.listener import Listener, content_key, seen_key
from imcli.client.services import Conversation
from imcli.core.errors import ImcliError, InvalidInput, RequestTimeout
from imcli.core.wire import DEFAULT_MAX_PAYLOAD, HISTORY_MAX, Presence, Received, encode

ROOM_BACKLOG = 20  # missed lines shown per visited room on start
CATCH_UP_OVERLAP = 120.0  # seconds asked again at the start: clocks differ; seen keys de-duplicate

COMMANDS = {
    "/dm": "/dm NAME [TEXT]   talk to NAME privately (with TEXT: send it and stay here)",
    "/room": "/room NAME        go to a room (its lines are shown from now on)",
    "/group": "/group NAME       go to a group you are in",
    "/who": "/who              who is online",
    "/whois": "/whois NAME       NAME's profile: display name, account, signature, about",
    "/nick": "/nick NEW         change your nickname",
    "/history": "/history [N]      the last N messages here (default 20)",
    "/help": "/help             this list",
    "/quit": "/quit             leave (Ctrl-D and Ctrl-C too)",
}


@dataclass(frozen=True)
class Note:
    """A line that is not a message: command output, errors, the catch-up summary."""

    text: str
    style: str = ""  # "", "error", "dim"


Output = Received | Note


@dataclass
class CatchUp:
    shown: list[Received] = field(default_factory=list)  # missed lines to show, oldest first
    unread: Counter[str] = field(default_factory=Counter)  # per conversation, while away
    more: bool = False
    archive_answered: bool = True


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
        self.unread: Counter[str] = Counter()  # rooms not shown, since this run started
        self.quit = threading.Event()
        self.max_payload = max_payload

    # ---------------------------------------------------------------- arriving messages

    def shows(self, item: Received) -> bool:
        """Direct and group messages always; rooms only once visited (the rest are counted)."""
        if item.kind == "room" and item.room not in self.rooms:
            self.unread[item.room or "?"] += 1
            return False
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
        fetched: list[Received] = []
        last_seen = self.state.last_seen
        if last_seen is not None:
            try:
                page = services.ask_history(self.listener, None, HISTORY_MAX, since=last_seen - CATCH_UP_OVERLAP)
                report.more = page.more
            except RequestTimeout:
                report.archive_answered = False
            else:
                # plain-text lines have no id of their own: the archive's copy of one the broker
                # queued is matched by content (a count, so a repeated line stays repeated), and
                # the overlap, asked again for ids, would show last run's lines once more
                queued_lines = Counter(content_key(m) for m in queued if m.format == "text")
                for m in page.messages:
                    if m.sender == self.me or self.listener.seen.seen(seen_key(m)):
                        continue
                    if m.format == "text" and m.ts < last_seen:
                        continue
                    if m.format == "text" and queued_lines[key := content_key(m)] > 0:
                        queued_lines[key] -= 1
                        continue
                    fetched.append(m.model_copy(update={"missed": True}))
        backlog: Counter[str] = Counter()
        for item in sorted([*queued, *fetched], key=lambda m: m.ts, reverse=True):
            where = Conversation.of(item, self.me)
            if item.missed and where is not None:
                report.unread[str(where)] += 1
            if item.kind != "room":
                report.shown.append(item)
            elif item.room in self.rooms and backlog[item.room or ""] < ROOM_BACKLOG:
                backlog[item.room or ""] += 1  # a busy room's last lines only; /history has the rest
                report.shown.append(item)
        report.shown.reverse()
        return report

    def toolbar(self) -> str:
        waiting = ", ".join(f"{room} {n}" for room, n in self.unread.most_common(4))
        return f" {self.me} · {self.here}" + (f" · unread: {waiting}" if waiting else "") + " · /help"

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
            self.listener.publish(topics.room(where.name, self.me), encode(message))
            return []  # it comes back through our subscription
        if where.kind == "group":
            self.listener.publish(topics.group_msg(where.name, self.me), encode(message))
            return []
        self.listener.publish(topics.dm(where.name, self.me), encode(message))
        nicks = self.listener.nicks
        mine, theirs = nicks.get(self.me, self.me), nicks.get(where.name, where.name)
        echo = Received(
            kind="dm", sender=self.me, to=where.name, id=message.id, ts=message.ts, text=message.text,
            nick=mine if mine != self.me else None, to_nick=theirs if theirs != where.name else None,
        )  # fmt: skip
        self.listener.seen.seen(seen_key(echo))
        return [echo]  # a DM I send is not delivered back to me

    def _command(self, line: str) -> list[Output]:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        match name.lower():
            case "/quit" | "/exit":
                self.quit.set()
                return []
            case "/help":
                lines: list[Output] = [Note(text, "dim") for text in COMMANDS.values()]
                return [*lines, Note("Plain text goes to the conversation in the prompt; Tab completes.", "dim")]
            case "/room":
                return self._go(Conversation.parse(_arg(rest, "/room NAME")))
            case "/group":
                return self._go(Conversation.parse("#" + _arg(rest, "/group NAME").removeprefix("#")))
            case "/dm":
                who_, _, text = rest.partition(" ")
                target = self._dm_target(_arg(who_, "/dm NAME [TEXT]"))
                if text.strip():
                    return self.send(target, text)
                return self._go(target)
            case "/who":
                return self._who()
            case "/whois":
                from imcli.cli.profile import whois_lines

                found = services.ask_whois(self.listener, _arg(rest, "/whois NAME"))
                return [Note(line) for line in whois_lines(found)]
            case "/nick":
                nick = services.ask_rename(self.listener, _arg(rest, "/nick NEW"))
                return [Note(f"you are now known as {nick}", "dim")]
            case "/history":
                return self._history(rest)
        raise InvalidInput(f"unknown command {name}", "type /help for the list")

    def _dm_target(self, name: str) -> Conversation:
        user = services.resolve_user(self.listener, name)
        if user.nick:
            self.listener.nicks.setdefault(user.account, user.nick)
        services.check_can_dm(self.listener, user.account)
        return Conversation("dm", user.account)

    def _go(self, where: Conversation) -> list[Output]:
        if where.kind == "group":
            services.check_member(self.listener, where.name, self.me)
        if where.kind == "room":
            self.rooms.add(where.name)
            self.unread.pop(where.name, None)
        self.here = where
        return [Note(f"now talking in {where}", "dim")]

    def _who(self) -> list[Output]:
        users: list[Presence] = services.ask_who(self.listener)
        if not users:
            return [Note("nobody is online", "dim")]
        return [
            Note("online: " + ", ".join(u.nick if u.nick == u.account else f"{u.nick} ({u.account})" for u in users))
        ]

    def _history(self, rest: str) -> list[Output]:
        if rest and not rest.isdigit():
            raise InvalidInput(f"invalid count {rest!r}", "/history [N], N from 1 to 1000")
        page = services.ask_history(self.listener, self.here, int(rest) if rest else 20)
        if not page.messages:
            return [Note(f"no messages in {self.here} yet", "dim")]
        return [Note(f"— history of {self.here} —", "dim"), *page.messages, Note("— end of history —", "dim")]


def _arg(value: str, usage: str) -> str:
    if not value:
        raise InvalidInput("missing argument", f"usage: {usage}")
    return value


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
