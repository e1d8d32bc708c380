"""imcli profile …: your display name, signature, about text and avatar, and anyone's profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imcli.cli.common import HostOpt, JsonOpt, PortOpt, console, sub_app
from imcli.client.identity import signed_in

if TYPE_CHECKING:
    from imcli.client.services import Whois

profile_app = sub_app("Profiles: display name, signature, about text, avatar.")


@profile_app.command("set")
def profile_set(
    name: Annotated[
        str | None, typer.Option("--name", help="Display name in any script (张三, José), unique by look.")
    ] = None,
    signature: Annotated[str | None, typer.Option("--signature", help="One line under your name ('' clears).")] = None,
    avatar: Annotated[Path | None, typer.Option("--avatar", help="An image file (PNG, JPEG, GIF, WebP).")] = None,
    about: Annotated[str | None, typer.Option("--about", help="A few lines about you ('' clears).")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Change your profile; only you can (the broker lets only the presence worker write profiles,
    and the worker changes only the asker's own)."""
    from imcli.client import services

    identity = signed_in(host, port)
    if name is not None:
        services.check_nick(name)  # before an avatar is uploaded for nothing
    picture = None
    if avatar is not None:
        from imcli.client.avatar import upload_avatar

        picture = upload_avatar(identity, avatar.expanduser())
    profile = services.set_profile(identity, name=name, signature=signature, about=about, avatar=picture)
    _print(services.Whois(profile, None))


@profile_app.command("show")
def profile_show(
    user: Annotated[str | None, typer.Argument(help="Account or display name [default: you].")] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Show a profile: display name, account, presence, signature, about, avatar."""
    from imcli.client import services

    found = services.whois(signed_in(host, port), user)
    if json_:
        doc = found.profile.model_dump(exclude={"type", "v", "avatar"})
        doc["avatar"] = found.profile.avatar.model_dump() if found.profile.avatar is not None else None
        if found.profile.avatar_refused:
            doc["avatar_refused"] = found.profile.avatar_refused
        if found.presence is not None:
            doc.update(state=found.presence.state, since=found.presence.since, devices=found.presence.device_names)
        print(json.dumps(doc, ensure_ascii=True))
        return
    _print(found)


def whois_lines(found: Whois) -> list[str]:
    """A profile as lines of plain text (not yet ``safe``): ``profile show`` and ``/whois``."""
    from imcli.core.names import label

    p = found.profile
    lines = [label(p.account, p.name)]
    if found.presence is not None:
        u = found.presence
        from imcli.cli.render import ago

        lines.append(f"  {u.state}" + (f" since {ago(u.since)}" if u.since > 0 else " (never online)"))
        if u.device_names:
            lines.append("  on " + ", ".join(u.device_names))
    if p.signature:
        lines.append(f"  “{p.signature}”")
    lines += [f"  {line}" for line in p.about.splitlines()]
    if p.avatar is not None:
        lines.append(f"  avatar: {p.avatar.media_type}, imcli get {p.avatar.file}")
    elif p.avatar_refused:
        lines.append(f"  avatar not shown: {p.avatar_refused}")
    return lines


def _print(found: Whois) -> None:
    from imcli.cli.render import shown

    out = console()
    for line in whois_lines(found):
        out.print(shown(line))
