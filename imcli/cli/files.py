"""``imcli send``, ``imcli files`` and ``imcli get``: files and images through the broker (issue 16).

The work is :mod:`imcli.client.files`; here are the options, the progress bar (on a terminal
only: piped, the commands print their result lines and nothing else) and the tables.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imcli.cli.common import HostOpt, JsonOpt, PortOpt, console, local_path
from imcli.client.identity import signed_in
from imcli.core.errors import InvalidInput
from imcli.core.text import quoted

if TYPE_CHECKING:
    from imcli.client.files import Progress


@contextlib.contextmanager
def progress_bar(what: str, total: int) -> Iterator[Progress | None]:
    """A rich.progress bar (bytes, speed, time left) on stderr if it is a terminal, else nothing."""
    from rich.console import Console

    err = Console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from imcli.cli.render import shown

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(shown(what), total=total)
        yield lambda done, _total: bar.update(task, completed=done)


def send(
    args: Annotated[
        list[str], typer.Argument(help="Recipient (bob, @bob or '#team') then the files; only files with --room.")
    ],
    room: Annotated[
        str | None, typer.Option("--room", "-r", help="Send to this room instead of a person or group.")
    ] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Send files (images, documents, anything) to a person, a group or a room, each as a message."""
    from imcli.client.files import FileConnection, check_file
    from imcli.client.services import Conversation
    from imcli.core.text import human_size, safe

    if room is not None:
        where, names = Conversation.parse(room), args
        if where.kind != "room":
            raise InvalidInput(f"invalid room name {quoted(room)}", "give a room name such as lobby")
    else:
        if len(args) < 2:
            raise InvalidInput("name a recipient and at least one file", "imcli send bob photo.png")
        first = args[0]
        where = Conversation.parse(first if first.startswith(("#", "@")) else "@" + first)
        names = args[1:]
    if not names:
        raise InvalidInput("no file to send", "imcli send --room lobby photo.png")
    paths = [local_path(n) for n in names]
    sizes = [check_file(p) for p in paths]  # every file checked before anything is sent
    identity = signed_in(host, port)
    with FileConnection(identity, "send") as connection:
        target = connection.target(where)
        for path, size in zip(paths, sizes, strict=True):
            with progress_bar(path.name, size) as progress:
                info = connection.upload(path, target, progress)
            connection.post(where, target, info)
            typer.echo(f"sent {safe(path.name)} ({human_size(info.size)}) to {where}: {info.id}")  # any local name


def files(
    conversation: Annotated[
        str | None, typer.Argument(help="Only this conversation: a room, @person or #group [default: all].")
    ] = None,
    json_: JsonOpt = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """List the files you may fetch (newest last)."""
    from imcli.client.files import FileConnection
    from imcli.client.services import Conversation

    where = Conversation.parse(conversation) if conversation else None
    with FileConnection(signed_in(host, port), "files") as connection:
        found, more = connection.listing(where)
    if json_:
        print(json.dumps([f.model_dump(exclude_none=True, exclude={"thumb"}) for f in found]))
        return
    if not found:
        console().print("no files")
        return
    if more:
        print("(older files left out)", file=sys.stderr)
    from rich.table import Table

    from imcli.cli.render import ago, shown
    from imcli.core.text import human_size

    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=24)  # what `imcli get` needs: never cut
    for header in ("name", "size", "type", "from", "where", "when"):
        table.add_column(header)
    for f in found:
        kind = f.mime + (f" {f.width}x{f.height}" if f.width and f.height else "")
        table.add_row(
            f.id, shown(f.name), human_size(f.size), shown(kind), shown(f.sender or ""), shown(f.place or ""),
            ago(f.ts) if f.ts else "",
        )  # fmt: skip
    console().print(table)


def get(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="The file's id (from its message or 'imcli files').")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it (a file or a directory) [default: here].")
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite a file that exists.")] = False,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Download a file you may read; a download that stopped goes on where it stopped."""
    from imcli.client.files import FileConnection
    from imcli.core.text import human_size, safe

    with FileConnection(signed_in(host, port), "get") as connection:
        bar: contextlib.ExitStack = contextlib.ExitStack()
        progress_holder: list[Progress | None] = []

        def progress(done: int, total: int) -> None:
            if not progress_holder:
                progress_holder.append(bar.enter_context(progress_bar(file_id, total)))
            report = progress_holder[0]
            if report is not None:
                report(done, total)

        with bar:
            fetched = connection.download(file_id, output, force=force, progress=progress)
    typer.echo(f"saved {safe(str(fetched.path))} ({human_size(fetched.file.size)})")  # -o may be any bytes
    sys.stdout.flush()


def rm(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="The id of a file you sent (see 'imcli files').")],
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Delete a file you sent: gone from every listing; its content goes when no other file has it."""
    from imcli.client.files import FileConnection
    from imcli.core.text import safe

    with FileConnection(signed_in(host, port), "rm") as connection:
        deleted = connection.delete(file_id)
    kept = "" if deleted.content else " (the same content sent again is kept for that one)"
    typer.echo(f"deleted {safe(deleted.name)} ({safe(deleted.file)}){kept}")  # the worker's words: as any
