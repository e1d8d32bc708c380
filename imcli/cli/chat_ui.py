"""``imcli chat`` on a terminal: a scrolling Rich log above a prompt_toolkit input line.

prompt_toolkit owns the bottom line (editing, input history, Tab completion, a status
toolbar); everything else is printed above it through ``patch_stdout``, from the
receiving thread as messages arrive. The logic lives in ``imcli.cli.chat_session``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console

from imcli.cli.chat_files import file_text, load_previewer
from imcli.cli.chat_session import COMMANDS, CatchUp, ChatSession, Note, Output
from imcli.cli.chat_state import device_session, load_chat_state, save_state
from imcli.cli.render import print_line, received_line, safe
from imcli.client.config import config_dir
from imcli.client.identity import Identity
from imcli.client.listener import Listener, RecentIds
from imcli.core.errors import ImcliError, InvalidInput

_NOTE_STYLES = {"": "", "error": "bold red", "dim": "dim"}


class ChatCompleter(Completer):
    """Slash commands at the start of the line; names of online users anywhere else."""

    def __init__(self, session: ChatSession) -> None:
        self._session = session
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.startswith("/send "):  # a path: the rest of the line, spaces included
            path = before[len("/send ") :]
            yield from self._paths.get_completions(Document(path, len(path)), complete_event)
            return
        if before.startswith("/") and " " not in before:
            for command in COMMANDS:
                if command.startswith(before.lower()):
                    yield Completion(command + " ", start_position=-len(before), display=command)
            return
        word = document.get_word_before_cursor(WORD=True)
        at = "@" if word.startswith("@") else ""
        for name in self._session.online():
            if name.lower().startswith(word.removeprefix("@").lower()):
                yield Completion(at + name, start_position=-len(word))


def run_chat(identity: Identity, heartbeat: float, max_payload: int) -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInput("imcli chat needs a terminal", "in scripts use 'imcli listen' and 'imcli say'")
    state = load_chat_state(identity.account)
    with device_session(identity.client_id()) as own:
        view = ChatView(identity, heartbeat, own)
        listener = Listener(
            identity,
            session=identity.device if own else None,
            heartbeat=heartbeat,
            seen=RecentIds(initial=state.seen),
            on_connection=view.connection_changed,
        )
        with listener:
            session = ChatSession(identity, state, listener, max_payload)
            try:
                view.run(session)
            finally:
                listener.close()  # says offline before the state is written
                save_state(identity.account, session.remember())
    if view.failure is not None:  # the broker refused us, or another imcli took this device's session
        raise view.failure
    Console(highlight=False).print(f"left imcli chat: {identity.account} is offline here", style="dim")


class ChatView:
    def __init__(self, identity: Identity, heartbeat: float, own_session: bool) -> None:
        self.identity = identity
        self.own_session = own_session
        self.failure: ImcliError | None = None  # what ended the chat from the receiving side: the command's error
        self.out = Console(highlight=False, soft_wrap=True, force_terminal=True)
        self._prompt: PromptSession[str] | None = None
        self._preview = load_previewer()  # before the prompt owns the keyboard: it may ask the terminal

    def run(self, session: ChatSession) -> None:
        history_file = config_dir() / f"chat-{self.identity.account}.history"
        history_file.touch(mode=0o600, exist_ok=True)
        self._prompt = PromptSession(
            message=session.prompt,
            history=FileHistory(str(history_file)),
            completer=ChatCompleter(session),
            complete_while_typing=False,
            bottom_toolbar=session.toolbar,
            refresh_interval=0.5,
            erase_when_done=True,  # the line comes back from the broker (a DM as a local echo)
        )
        session.files.emit = lambda outputs: self.show(outputs, session)  # what /send, /get, /open report later
        previous = signal.signal(signal.SIGTERM, lambda *_: self._leave())
        try:
            with patch_stdout(raw=True):
                self._welcome(session)
                receiver = threading.Thread(target=self._receive, args=(session,), name="imcli-chat-in", daemon=True)
                receiver.start()
                self._read(session)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _welcome(self, session: ChatSession) -> None:
        a = self.identity.address
        self.note(Note(f"imcli chat: {self.identity.account} on {a} · /help for commands", "dim"))
        try:
            self.note(session.who_line())
        except ImcliError as exc:
            self.note(Note(f"who is online is not known: {exc}", "dim"))
        if not self.own_session:
            self.note(Note("another imcli chat runs here: this one will miss what is sent while it is away", "dim"))
        report = session.catch_up(list(session.listener.pending()))
        self._summary(report)
        self.show(report.shown, session)

    def _summary(self, report: CatchUp) -> None:
        if report.archive_refused:
            self.note(Note(f"{report.archive_refused}: only what the broker kept is shown (/history later)"))
        elif not report.archive_answered:
            self.note(Note("the archive did not answer: only what the broker kept is shown", "dim"))
        if report.unread:
            counts = ", ".join(f"{n} in {where}" for where, n in report.unread.most_common())
            self.note(Note(f"while you were away: {counts}" + (" (and more: /history)" if report.more else "")))
        if report.hidden:
            counts = ", ".join(f"{n} in {where}" for where, n in report.hidden.most_common())
            self.note(Note(f"not shown: {counts} (/room NAME to go there, /history for its lines)", "dim"))

    def _read(self, session: ChatSession) -> None:
        assert self._prompt is not None
        while not session.quit.is_set():
            try:
                line = self._prompt.prompt()
            except (EOFError, KeyboardInterrupt):
                return
            self.show(session.handle(line), session)

    def _receive(self, session: ChatSession) -> None:
        try:
            for item in session.listener:
                if session.shows(item):
                    self.show([item], session)
        except ImcliError as exc:  # refused after a reconnect (account removed, …), or taken over: said on leaving
            self.failure = exc
            session.quit.set()
            self._leave()

    def show(self, outputs: Iterable[Output], session: ChatSession) -> None:
        for output in outputs:
            if isinstance(output, Note):
                self.note(output)
                continue
            shown = output
            if output.file is not None:  # one line: sender, name, size (and dimensions), its number
                shown = output.model_copy(update={"text": file_text(output, session.files.number(output.file))})
            line = received_line(shown, session.me)
            if session.mentions_me(output):
                line.stylize("bold reverse")
                self.out.bell()
            print_line(self.out, line)
            if output.file is not None and output.file.thumb and self._preview is not None:
                self._draw(output.file.thumb)

    def _draw(self, thumb: str) -> None:
        assert self._preview is not None
        try:
            self.out.print(self._preview(thumb))
        except Exception:  # a thumbnail that does not decode is just not drawn
            self.note(Note("(no preview: the thumbnail does not decode)", "dim"))

    def note(self, note: Note) -> None:
        self.out.print(safe(note.text), style=_NOTE_STYLES.get(note.style, ""), markup=False)  # may quote others

    def connection_changed(self, up: bool) -> None:
        self.note(Note("reconnected" if up else "connection lost, reconnecting…", "dim"))

    def _leave(self, *_: Any) -> None:
        """End the prompt from another thread or a signal handler."""
        prompt = self._prompt
        if prompt is not None and prompt.app.is_running and prompt.app.loop is not None:
            prompt.app.loop.call_soon_threadsafe(lambda: prompt.app.exit(exception=EOFError()))
