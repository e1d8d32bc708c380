"""``imcli chat``'s slash commands, in one table: ``COMMANDS``.

A command is a function ``(chat, rest) -> list[Output]`` registered with ``@command(usage,
help)``; ``rest`` is what follows the command's name. Dispatch, ``/help`` and Tab completion
read the table, so adding a command is writing one function here (``/send``, ``/whois``: put
them beside their kin, or in a module imported at the end of this one). Expected failures
are raised as ``ImcliError`` with a hint; the session shows them as one line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imcli.client import services
from imcli.client.listener import Listener
from imcli.client.services import Conversation
from imcli.core.errors import InvalidInput, NotFound
from imcli.core.rules import DM_POLICIES
from imcli.core.text import quoted
from imcli.core.wire import GroupInfo, GroupList, GroupReply, Received


@dataclass(frozen=True)
class Note:
    """A line that is not a message: command output, errors, the catch-up summary."""

    text: str
    style: str = ""  # "", "error", "dim"


Output = Received | Note


class ChatSession(Protocol):
    """What a command may use of the session (``imcli.cli.chat_session.ChatSession``)."""

    me: str
    here: Conversation
    listener: Listener  # requests go over the chat's one connection: services.ask_*(chat.listener, …)
    quit: threading.Event

    def go(self, where: Conversation) -> list[Output]: ...
    def send(self, where: Conversation, text: str) -> list[Output]: ...
    def dm_target(self, name: str) -> Conversation: ...
    def who_line(self) -> Note: ...


Run = Callable[[ChatSession, str], list[Output]]


@dataclass(frozen=True)
class SlashCommand:
    name: str  # "/dm"
    usage: str  # "/dm NAME [TEXT]"
    help: str
    run: Run
    aliases: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        return f"{self.usage:<26} {self.help}"


COMMANDS: dict[str, SlashCommand] = {}  # by name, in /help's order
_ALIASES: dict[str, str] = {}


def command(usage: str, help_text: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Run], Run]:
    """Register a slash command; ``usage`` starts with its name (``"/invite USER [GROUP]"``)."""

    def register(run: Run) -> Run:
        name = usage.split(maxsplit=1)[0]
        if name in COMMANDS or name in _ALIASES:
            raise ValueError(f"slash command {name} registered twice")
        COMMANDS[name] = SlashCommand(name, usage, help_text, run, aliases)
        for alias in aliases:
            _ALIASES[alias] = name
        return run

    return register


def find(name: str) -> SlashCommand:
    wanted = name.lower()
    found = COMMANDS.get(_ALIASES.get(wanted, wanted))
    if found is None:
        raise InvalidInput(f"unknown command {name}", "type /help for the list")
    return found


def args(rest: str, usage: str, least: int, most: int) -> list[str]:
    """``rest`` split in words, between ``least`` and ``most`` of them, else a usage error."""
    words = rest.split()
    if len(words) < least:
        raise InvalidInput("missing argument", f"usage: {usage}")
    if len(words) > most:
        raise InvalidInput(f"too many arguments: {' '.join(words[most:])}", f"usage: {usage}")
    return words


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u300c": "\u300d"}


def user_and_rest(chat: ChatSession, rest: str, usage: str, *, last: bool = False) -> tuple[str, str]:
    """The user a command names first, and what follows it. A display name may hold spaces
    (``Mary Ann``): it is taken in quotes (``"Mary Ann" hi``, ``“Mary Ann”``), or as the longest
    display or account name this chat knows that starts the text (then a space, or the end);
    otherwise the first word (``last``: the whole text, for a command that takes nothing after
    the user), which the resolver then knows or refuses as ``unknown user``."""
    text = rest.strip()
    if not text:
        raise InvalidInput("missing argument", f"usage: {usage}")
    close = _QUOTES.get(text[0])
    if close is not None:
        end = text.find(close, 1)
        if end < 0:
            raise InvalidInput("a quote is not closed", f'usage: {usage}, a name with spaces in quotes: "Mary Ann"')
        name, after = text[1:end].strip(), text[end + 1 :]
        if after and not after[0].isspace():
            raise InvalidInput(f"text right after the quoted name: {after.split()[0]}", f"usage: {usage}")
        if not name:
            raise InvalidInput("empty user name", "give an account or display name")
    else:
        body = text.removeprefix("@")
        name = _known_prefix(chat, body, refresh=False) or _known_prefix(chat, body, refresh=" " in body)
        if not name:
            name = body if last else body.split(maxsplit=1)[0]
        after = body[len(name) :]
    after = after.strip()
    if last and after:
        raise InvalidInput(f"too many arguments: {after}", f"usage: {usage}")
    return name, after


def _known_prefix(chat: ChatSession, text: str, *, refresh: bool) -> str:
    """The longest known display or account name that starts ``text`` (case aside), as typed."""
    nicks = chat.listener.nicks
    if refresh:  # a name with spaces this chat has not seen yet: ask the presence worker once
        nicks.update({a: n for a, n in services.display_names(chat.listener).items() if a not in nicks})
    best = ""
    for name in {chat.me, *nicks, *nicks.values()}:
        size = len(name)
        if size > len(best) and text[:size].casefold() == name.casefold() and text[size : size + 1] in ("", " "):
            best = text[:size]
    return best


def group_of(chat: ChatSession, given: str | None, usage: str) -> str:
    """The group named (``team`` or ``#team``), else the one the prompt is in."""
    if given:
        return given.removeprefix("#")
    if chat.here.kind == "group":
        return chat.here.name
    raise InvalidInput("which group?", f"name it: {usage}, or go to the group first: /group NAME")


def dim(text: str) -> list[Output]:
    return [Note(text, "dim")]


# ---------------------------------------------------------------- the chat itself


@command("/help [COMMAND]", "this list, or one command's usage")
def _help(chat: ChatSession, rest: str) -> list[Output]:
    (name,) = args(rest, "/help [COMMAND]", 0, 1) or [""]
    if name:
        return [Note(find("/" + name.removeprefix("/")).line, "dim")]
    lines: list[Output] = [Note(c.line, "dim") for c in COMMANDS.values()]
    return [
        *lines,
        Note("Plain text goes to the conversation in the prompt (// to start it with /); Tab completes.", "dim"),
    ]


@command("/quit", "leave (Ctrl-D and Ctrl-C too)", aliases=("/exit",))
def _quit(chat: ChatSession, rest: str) -> list[Output]:
    chat.quit.set()
    return []


@command("/room NAME", "go to a room (its lines are shown from now on)")
def _room(chat: ChatSession, rest: str) -> list[Output]:
    (name,) = args(rest, "/room NAME", 1, 1)
    return chat.go(Conversation.parse(name))


@command("/group NAME", "go to a group you are in")
def _group(chat: ChatSession, rest: str) -> list[Output]:
    (name,) = args(rest, "/group NAME", 1, 1)
    return chat.go(Conversation.parse("#" + name.removeprefix("#")))


@command("/dm NAME [TEXT]", "talk to NAME privately (with TEXT: send it and stay here)")
def _dm(chat: ChatSession, rest: str) -> list[Output]:
    name, text = user_and_rest(chat, rest, "/dm NAME [TEXT]")
    target = chat.dm_target(name)
    if text.strip():
        return chat.send(target, text)
    return chat.go(target)


@command("/who", "who is online")
def _who(chat: ChatSession, rest: str) -> list[Output]:
    args(rest, "/who", 0, 0)
    return [chat.who_line()]


@command("/whois NAME", "NAME's profile: display name, account, presence, signature, about")
def _whois(chat: ChatSession, rest: str) -> list[Output]:
    from imcli.cli.profile import whois_lines

    name, _ = user_and_rest(chat, rest, "/whois NAME", last=True)
    found = services.ask_whois(chat.listener, name)
    return [Note(line) for line in whois_lines(found)]


@command("/nick NEW", "change your display name (any script; spaces allowed)")
def _nick(chat: ChatSession, rest: str) -> list[Output]:
    if not rest.strip():
        raise InvalidInput("missing argument", "usage: /nick NEW")
    nick = services.ask_rename(chat.listener, rest.strip())
    chat.listener.nicks[chat.me] = nick  # at once: the presence record follows on its own time
    return dim(f"you are now known as {nick}")


@command("/history [N]", "the last N messages here (default 20)")
def _history(chat: ChatSession, rest: str) -> list[Output]:
    (count,) = args(rest, "/history [N]", 0, 1) or ["20"]
    if not (count.isascii() and count.isdigit()):
        raise InvalidInput(f"invalid count {quoted(count)}", "/history [N], N from 1 to 1000")
    page = services.ask_history(chat.listener, chat.here, int(count))
    if not page.messages:
        return dim(f"no messages in {chat.here} yet")
    return [Note(f"— history of {chat.here} —", "dim"), *page.messages, Note("— end of history —", "dim")]


# ---------------------------------------------------------------- groups


def _group_line(info: GroupInfo) -> str:
    kind = "private" if info.private else "public"
    members = f"{len(info.members)} member{'s' if len(info.members) != 1 else ''}"
    return f"#{info.name}  {kind}, {members}, owner {info.owner}"


@command("/groups", "groups you are in, and public groups you can join")
def _groups(chat: ChatSession, rest: str) -> list[Output]:
    args(rest, "/groups", 0, 0)
    reply = services.ask_group(chat.listener, "list")
    assert isinstance(reply, GroupList)
    lines = [Note("your groups:" if reply.mine else "you are in no group (/join NAME, /create NAME)")]
    lines += [Note("  " + _group_line(g)) for g in reply.mine]
    if reply.public:
        lines.append(Note("public groups you can join (/join NAME):"))
        lines += [Note("  " + _group_line(g)) for g in reply.public]
    return list(lines)


@command("/members [GROUP]", "members of a group (default: this one)")
def _members(chat: ChatSession, rest: str) -> list[Output]:
    given = args(rest, "/members [GROUP]", 0, 1)
    name = group_of(chat, given[0] if given else None, "/members GROUP")
    reply = services.ask_group(chat.listener, "members", name)
    if not isinstance(reply, GroupReply) or reply.group is None:
        raise NotFound(f"no group #{name}", "see the groups with /groups")
    info = reply.group
    roles = {m: "owner" if m == info.owner else "admin" if m in info.admins else "" for m in info.members}
    return [Note(_group_line(info)), *(Note(f"  {m}" + (f"  ({r})" if r else "")) for m, r in roles.items())]


@command("/create GROUP [private]", "create a group (you own it) and go there")
def _create(chat: ChatSession, rest: str) -> list[Output]:
    words = args(rest, "/create GROUP [private]", 1, 2)
    if len(words) == 2 and words[1].lower() not in ("private", "--private"):
        raise InvalidInput(f"unknown option {quoted(words[1])}", "usage: /create GROUP [private]")
    name, private = words[0].removeprefix("#"), len(words) == 2
    services.ask_group(chat.listener, "create", name, private=private)
    return [
        Note(f"created #{name} ({'private' if private else 'public'})", "dim"),
        *chat.go(Conversation("group", name)),
    ]


@command("/join GROUP", "join a public group and go there")
def _join(chat: ChatSession, rest: str) -> list[Output]:
    (name,) = args(rest, "/join GROUP", 1, 1)
    name = name.removeprefix("#")
    services.ask_group(chat.listener, "join", name)
    return [Note(f"joined #{name}", "dim"), *chat.go(Conversation("group", name))]


@command("/leave [GROUP]", "leave a group (default: this one; the last one out deletes it)")
def _leave(chat: ChatSession, rest: str) -> list[Output]:
    given = args(rest, "/leave [GROUP]", 0, 1)
    name = group_of(chat, given[0] if given else None, "/leave GROUP")
    reply = services.ask_group(chat.listener, "leave", name)
    gone = isinstance(reply, GroupReply) and reply.group is None
    lines = dim(f"left #{name}" + (" (it had no other members and is gone)" if gone else ""))
    if chat.here == Conversation("group", name):
        lines += chat.go(Conversation("room", "lobby"))
    return lines


def _member_op(op: str, usage: str, done: str) -> Run:
    def run(chat: ChatSession, rest: str) -> list[Output]:
        user, after = user_and_rest(chat, rest, usage)
        if len(after.split()) > 1:  # "/invite Nobody Here team": say the name is unknown, if it is
            services.resolve(chat.listener, user)
        given = args(after, usage, 0, 1)
        name = group_of(chat, given[0] if given else None, usage.replace("[GROUP]", "GROUP"))
        services.ask_group(chat.listener, op, name, user=user)  # type: ignore[arg-type]
        return dim(done.format(user=user, group=name))

    return run


command("/invite USER [GROUP]", "add someone to a group (owner and admins)")(
    _member_op("invite", "/invite USER [GROUP]", "added {user} to #{group}")
)
command("/kick USER [GROUP]", "remove a member (owner and admins)")(
    _member_op("kick", "/kick USER [GROUP]", "removed {user} from #{group}")
)
command("/promote USER [GROUP]", "make a member an admin (owner only)")(
    _member_op("promote", "/promote USER [GROUP]", "{user} is now an admin of #{group}")
)


# ---------------------------------------------------------------- friends

_FRIEND_DONE = {
    "add": "asked {user} to be your friend",
    "accept": "you and {user} are friends",
    "decline": "declined {user}'s request",
    "remove": "removed {user} from your friends",
}


@command("/friend add|accept|decline|remove USER", "friend requests")
def _friend(chat: ChatSession, rest: str) -> list[Output]:
    usage = "/friend add|accept|decline|remove USER"
    op, _, who = rest.strip().partition(" ")
    if not op:
        raise InvalidInput("missing argument", f"usage: {usage}")
    if op.lower() not in _FRIEND_DONE:
        raise InvalidInput(f"unknown friend action {quoted(op)}", f"usage: {usage}")
    user, _ = user_and_rest(chat, who, usage, last=True)
    services.ask_friend(chat.listener, op.lower(), user)  # type: ignore[arg-type]
    return dim(_FRIEND_DONE[op.lower()].format(user=user.removeprefix("@")))


@command("/friends", "your friends, who is online, and requests waiting")
def _friends(chat: ChatSession, rest: str) -> list[Output]:
    args(rest, "/friends", 0, 0)
    record = services.ask_friend(chat.listener, "list")
    online = chat.listener.online
    lines = [Note("friends: " + ", ".join(f"{f} ({'online' if f in online else 'offline'})" for f in record.friends))
             if record.friends else Note("no friends yet (/friend add USER)")]  # fmt: skip
    lines += [Note(f"{asker} wants to be your friend (/friend accept {asker})") for asker in record.incoming]
    lines += [Note(f"waiting for {asked} to answer", "dim") for asked in record.outgoing]
    lines.append(Note(f"direct messages from: {'friends only' if record.dm_policy == 'friends' else 'anyone'}", "dim"))
    return list(lines)


@command("/policy anyone|friends", "who may send you direct messages: anyone, or friends only")
def _dm_policy(chat: ChatSession, rest: str) -> list[Output]:
    (value,) = args(rest, "/policy anyone|friends", 1, 1)
    if value not in DM_POLICIES:
        raise InvalidInput(f"invalid dm-policy {quoted(value)}", "use /policy anyone or /policy friends")
    services.ask_friend(chat.listener, "policy", policy=value)
    return dim(f"dm-policy is now {value}")
