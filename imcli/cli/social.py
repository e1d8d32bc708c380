"""imcli group …, imcli friend …, imcli config …: the social commands (served by the group worker)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from imcli.cli.common import (
    HostOpt,
    JsonOpt,
    PortOpt,
    console,
    not_answered,
    sub_app,
)
from imcli.client.identity import max_payload_bytes, message_text, signed_in
from imcli.core.errors import InvalidInput
from imcli.core.rules import DM_POLICIES
from imcli.core.text import quoted

group_app = sub_app("Group chat; membership is enforced by the broker.")
friend_app = sub_app("Friends and friend requests.")
config_app = sub_app("Your settings, kept by the broker's workers.")


# ---------------------------------------------------------------- groups

GroupArg = Annotated[str, typer.Argument(help="Group name.")]


def _group_line(info: Any) -> str:
    from imcli.cli.render import shown

    kind = "private" if info.private else "public"
    members = f"{len(info.members)} member{'s' if len(info.members) != 1 else ''}"
    return f"#{shown(info.name)}  {kind}, {members}, owner {shown(info.owner)}"


@group_app.command("create")
def group_create(
    name: GroupArg,
    private: Annotated[bool, typer.Option("--private", help="Only invited people can join or see it.")] = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Create a group; you become its owner."""
    from imcli.client import services

    services.group_request(signed_in(host, port), "create", name, private=private)
    console().print(f"created #{name} ({'private' if private else 'public'})")


@group_app.command("join")
def group_join(name: GroupArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Join a public group."""
    from imcli.client import services

    services.group_request(signed_in(host, port), "join", name)
    console().print(f"joined #{name}")


@group_app.command("leave")
def group_leave(name: GroupArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Leave a group (the last one out deletes it)."""
    from imcli.client import services

    reply = services.group_request(signed_in(host, port), "leave", name)
    gone = getattr(reply, "group", True) is None
    console().print(f"left #{name}" + (" (it had no other members and is gone)" if gone else ""))


@group_app.command("invite")
def group_invite(name: GroupArg, user: Annotated[str, typer.Argument(help="Account to add.")],
                 host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Add someone to a group (owner and admins)."""
    from imcli.cli.render import shown
    from imcli.client import services

    services.group_request(signed_in(host, port), "invite", name, user=user)
    console().print(f"added {shown(user)} to #{name}")


@group_app.command("kick")
def group_kick(name: GroupArg, user: Annotated[str, typer.Argument(help="Member to remove.")],
               host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Remove a member (owner and admins); they stop receiving at once."""
    from imcli.cli.render import shown
    from imcli.client import services

    services.group_request(signed_in(host, port), "kick", name, user=user)
    console().print(f"removed {shown(user)} from #{name}")


@group_app.command("promote")
def group_promote(name: GroupArg, user: Annotated[str, typer.Argument(help="Member to make an admin.")],
                  host: HostOpt = None, port: PortOpt = None) -> None:  # fmt: skip
    """Make a member an admin (owner only): admins may invite and kick."""
    from imcli.cli.render import shown
    from imcli.client import services

    services.group_request(signed_in(host, port), "promote", name, user=user)
    console().print(f"{shown(user)} is now an admin of #{name}")


@group_app.command("list")
def group_list(json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Groups you are in, and public groups you can join."""
    from imcli.client import services
    from imcli.core.wire import GroupList

    reply = services.group_request(signed_in(host, port), "list")
    assert isinstance(reply, GroupList)
    if json_:
        print(
            json.dumps({"mine": [g.model_dump() for g in reply.mine], "public": [g.model_dump() for g in reply.public]})
        )
        return
    out = console()
    out.print("your groups:" if reply.mine else "you are in no group")
    for info in reply.mine:
        out.print("  " + _group_line(info))
    if reply.public:
        out.print("public groups you can join:")
        for info in reply.public:
            out.print("  " + _group_line(info))


@group_app.command("members")
def group_members(name: GroupArg, json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Members of a group (yours, or a public one)."""
    from imcli.client import services
    from imcli.core.errors import NotFound
    from imcli.core.wire import GroupReply

    reply = services.group_request(signed_in(host, port), "members", name)
    if not isinstance(reply, GroupReply) or reply.group is None:
        raise NotFound(f"no group #{name}", "see the groups with: imcli group list")
    info = reply.group
    from imcli.cli.render import shown

    if json_:
        print(info.model_dump_json(ensure_ascii=True, exclude_none=True))  # as the record: "removed" only if any
        return
    out = console()
    out.print(_group_line(info))
    for member in info.members:
        role = "owner" if member == info.owner else "admin" if member in info.admins else ""
        out.print(f"  {shown(member)}" + (f"  ({role})" if role else ""))
    if info.removed:
        out.print(f"removed, back only if invited: {', '.join(shown(r) for r in info.removed)}", style="dim")


@group_app.command("say")
def group_say(
    name: GroupArg,
    text: Annotated[str, typer.Argument(help="The message, or '-' to read it from stdin.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send a message to a group you are a member of."""
    from imcli.client import services

    identity = signed_in(host, port)
    message = services.prepare_text(message_text(text), max_payload_bytes())
    services.group_say(identity, name, message)
    typer.echo(f"sent to #{name}")  # plain, as in say: no Rich import for a one-line answer


# ---------------------------------------------------------------- friends

UserArg = Annotated[str, typer.Argument(help="Account or display name (张三, @alice).")]


def _friend(op: str, user: str, host: str | None, port: int | None, done: str) -> None:
    from imcli.cli.render import shown
    from imcli.client import services
    from imcli.core.names import label

    _, other = services.friend_with(signed_in(host, port), op, user)  # type: ignore[arg-type]
    who = label(other.account, other.nick) if other is not None else user
    console().print(done.format(user=shown(who)))


@friend_app.command("add")
def friend_add(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Send a friend request (it waits for USER even while they are offline)."""
    _friend("add", user, host, port, "asked {user} to be your friend")


@friend_app.command("accept")
def friend_accept(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Accept a friend request."""
    _friend("accept", user, host, port, "you and {user} are friends")


@friend_app.command("decline")
def friend_decline(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Decline a friend request."""
    _friend("decline", user, host, port, "declined {user}'s request")


@friend_app.command("remove")
def friend_remove(user: UserArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Remove a friend (on both sides)."""
    _friend("remove", user, host, port, "removed {user} from your friends")


@friend_app.command("list")
def friend_list(json_: JsonOpt = False, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your friends with their presence, and pending requests."""
    from imcli.client import services
    from imcli.core.errors import RequestTimeout

    identity = signed_in(host, port)
    record = services.friend_request(identity, "list")
    try:
        presence = {u.account: u for u in services.who(identity, include_offline=True)}
    except RequestTimeout:
        presence = None  # no presence worker: the list is still worth showing, and says what it lacks
    profiles = services.profiles_of(identity, record.friends) if presence is not None else None
    if presence is None or profiles is None:
        not_answered("states, names and signatures" if presence is None else "signatures")
    presence = presence or {}
    profiles = profiles or {}
    if json_:
        rows = [
            {
                "account": f,
                "name": presence[f].nick if f in presence else f,
                "state": presence[f].state if f in presence else "unknown",
                "signature": profiles[f].signature if f in profiles else "",
            }
            for f in record.friends
        ]
        print(json.dumps({"friends": rows, "incoming": record.incoming, "outgoing": record.outgoing,
                          "dm_policy": record.dm_policy}, ensure_ascii=True))  # fmt: skip
        return
    from imcli.cli.render import ago, shown
    from imcli.core.names import label

    def who(account: str) -> str:
        return shown(label(account, presence[account].nick if account in presence else None))

    out = console()
    out.print("friends:" if record.friends else "no friends yet")
    for f in record.friends:
        p = presence.get(f)
        state = (
            f"{shown(p.state)} since {ago(p.since)}"
            if p and p.since > 0
            else "never online"
            if p
            else "presence unknown"
        )
        signature = profiles[f].signature if f in profiles else ""
        out.print(f"  {who(f)}  {state}" + (f"  “{shown(signature)}”" if signature else ""))
    for asker in record.incoming:
        out.print(f"  {who(asker)} wants to be your friend (imcli friend accept {shown(asker)})")
    for asked in record.outgoing:
        out.print(f"  waiting for {who(asked)} to answer")
    out.print(f"direct messages from: {'friends only' if record.dm_policy == 'friends' else 'anyone'}", style="dim")


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="Setting: dm-policy.")],
    value: Annotated[str, typer.Argument(help="dm-policy: 'anyone' or 'friends'.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change a setting: 'dm-policy friends' lets only friends send you direct messages."""
    from imcli.client import services

    if key != "dm-policy":
        raise InvalidInput(f"unknown setting {quoted(key)}", "settings: dm-policy")
    if value not in DM_POLICIES:
        raise InvalidInput(f"invalid dm-policy {quoted(value)}", "use 'anyone' or 'friends'")
    services.friend_request(signed_in(host, port), "policy", policy=value)
    console().print(f"dm-policy is now {value}")
