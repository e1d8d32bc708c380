"""imcli moments …: a feed of your friends' posts and your own (朋友圈), kept by the moments worker.

``imcli moments [USER]`` reads the feed (one user's moments with USER); ``post``, ``like``,
``comment`` and ``delete`` change it. Only the author and the author's friends ever see a
moment, its likes and its comments: the worker answers nobody else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer._click.core import Context  # Typer 0.29 vendors click
from typer.core import TyperCommand

from imcli.cli.common import CliGroup, HostOpt, JsonOpt, PortOpt, console
from imcli.client.identity import max_payload_bytes, signed_in

if TYPE_CHECKING:
    from imcli.core.wire import Moment


class _FeedByDefault(CliGroup):
    """``imcli moments`` and ``imcli moments USER`` read the feed: anything that is not one of
    the sub-commands goes to the hidden ``feed`` command. Its help says both forms and lists the
    feed's options; the name ``feed`` appears nowhere a person reads (``_Feed``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["feed", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "[USER] [OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The feed's arguments and options (what ``imcli moments [USER] [OPTIONS]`` takes), then the commands."""
        feed = self.commands["feed"]
        feed_ctx = feed.context_class(feed, info_name="feed", parent=ctx)
        params = feed.get_params(feed_ctx)
        with formatter.section("Arguments"):
            formatter.write_dl(
                [(p.metavar, getattr(p, "help", None) or "") for p in params if p.param_type_name == "argument"]
            )
        with formatter.section("Options"):
            formatter.write_dl(
                [r for p in params if p.param_type_name == "option" and (r := p.get_help_record(feed_ctx))]
            )
        self.format_commands(ctx, formatter)


class _FeedContext(Context):
    """The feed's context: its path is ``imcli moments``, so a usage error says ``usage: imcli
    moments [OPTIONS] [USER]; more: imcli moments --help``, not the hidden ``feed``."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent is not None else super().command_path


class _Feed(TyperCommand):
    context_class = _FeedContext


moments_app = typer.Typer(
    cls=_FeedByDefault,
    help=(
        "Moments: your friends' posts and your own, newest first; post, like, comment, delete.\n\n"
        "Without a command, the feed: imcli moments [USER] [--limit N] [--before TS] [--json] (with USER:"
        " that user's moments only; the options are below)."
    ),
    no_args_is_help=False,
)

IdArg = Annotated[str, typer.Argument(help="The moment's id, as 'imcli moments' shows it.")]


@moments_app.command("feed", hidden=True, cls=_Feed)
def moments_feed(
    user: Annotated[str | None, typer.Argument(help="One user's moments (account or display name).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first (1-100).")] = 20,
    before: Annotated[float | None, typer.Option(help="Only moments older than this time stamp (paging).")] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Your friends' moments and your own, newest first (with USER: that user's)."""
    from imcli.client import moments

    page, names = moments.feed(signed_in(host, port), user, limit, before)
    if json_:
        print(page.model_dump_json(include={"moments", "more"}, ensure_ascii=True))
        return
    from imcli.cli.render import shown

    out = console()
    if not page.moments:
        out.print("no moments yet" if user is None else f"no moments of {shown(user)}")
        return
    for moment in page.moments:
        for line in moment_lines(moment, names):
            out.print(line, markup=False, highlight=False)
    if page.more:
        out.print(f"(older: imcli moments --before {page.moments[-1].ts!r})", style="dim")


def moment_lines(moment: Moment, names: dict[str, str]) -> list[str]:
    """A moment as safe lines of text; people by their display names (``names``) and accounts."""
    from imcli.cli.render import ago
    from imcli.core.names import label
    from imcli.core.text import safe

    def who(account: str) -> str:
        return safe(label(account, names.get(account)))

    lines = [f"{moment.id}  {who(moment.author)} · {ago(moment.ts)}"]
    lines += [f"  {safe(line)}" for line in moment.text.splitlines()]
    lines += [f"  [image {i.media_type}: imcli get {i.file}]" for i in moment.images]
    if moment.likes:
        lines.append("  ♥ " + ", ".join(who(u) for u in moment.likes))
    lines += [f"  {who(c.author)}: {safe(c.text)}" for c in moment.comments]
    return lines


@moments_app.command("post")
def moments_post(
    text: Annotated[str, typer.Argument(help="What to say (may be '' with --image).")],
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image (repeatable, at most 9).")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Post a moment: your friends see it (and are told), nobody else."""
    from imcli.client import moments

    reply = moments.post(signed_in(host, port), text, [p.expanduser() for p in image or []], max_payload_bytes())
    typer.echo(f"posted {reply.moments[0].id}")


@moments_app.command("like")
def moments_like(post: IdArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Like a moment you can see (its author is told)."""
    from imcli.client import moments

    moments.act(signed_in(host, port), "like", post)
    typer.echo(f"liked {post}")


@moments_app.command("comment")
def moments_comment(
    post: IdArg,
    text: Annotated[str, typer.Argument(help="The comment.")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Comment on a moment you can see (its author is told)."""
    from imcli.client import moments

    moments.act(signed_in(host, port), "comment", post, text)
    typer.echo(f"commented on {post}")


@moments_app.command("delete")
def moments_delete(post: IdArg, host: HostOpt = None, port: PortOpt = None) -> None:
    """Delete one of your moments, its likes, comments and images (those no other moment of yours shows)."""
    from imcli.client import moments

    removed = moments.delete(signed_in(host, port), post)
    images = f" and its {removed} image{'s' if removed != 1 else ''}" if removed else ""
    typer.echo(f"deleted {post}{images}")
