"""Moments (朋友圈) for clients: post, read the feed, like, comment, delete. No Typer, no Rich.

Every request goes to the moments worker, which answers only what the asker may see: the
moments of the asker and of the asker's friends (``imcli.core.rules.moment_visible``).
"""

from __future__ import annotations

from pathlib import Path

from imcli.client.avatar import check_image, upload_images
from imcli.client.files import FileConnection
from imcli.client.identity import Identity
from imcli.client.services import MOMENT_HINTS, Connection, display_names, expect, resolve
from imcli.core.errors import ImcliError, InvalidInput, NotFound, RequestTimeout
from imcli.core.request_reply import Asker
from imcli.core.text import quoted
from imcli.core.wire import (
    DEFAULT_MAX_PAYLOAD,
    MAX_TIMESTAMP,
    MOMENT_IMAGES_MAX,
    MOMENT_TEXT_MAX,
    MOMENTS_PAGE_MAX,
    MomentOp,
    MomentReply,
    MomentRequest,
    encode,
    is_id,
)


def ask(asker: Asker, request: MomentRequest) -> MomentReply:
    try:
        return expect(asker.ask(request), MomentReply, MOMENT_HINTS)
    except RequestTimeout as exc:
        raise RequestTimeout(
            "the moments worker did not answer", "moments need the moments worker, which 'imcli serve' runs"
        ) from exc


def post(
    identity: Identity, text: str, images: list[Path] | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> MomentReply:
    """Post a moment; images are checked (all of them) before any is uploaded."""
    text = text.strip()
    paths = images or []
    if not text and not paths:
        raise InvalidInput("an empty moment", "give some text, or --image FILE")
    if len(text) > MOMENT_TEXT_MAX:
        raise InvalidInput(f"the moment is {len(text)} characters long", f"at most {MOMENT_TEXT_MAX}")
    if len(paths) > MOMENT_IMAGES_MAX:
        raise InvalidInput(f"{len(paths)} images", f"at most {MOMENT_IMAGES_MAX} a moment")
    for path in paths:
        check_image(path, "the image", "--image")
    refs = upload_images(identity, paths, "--image", moments=True) if paths else []
    with Connection(identity, "moments") as connection:
        return ask(connection, _fitting(MomentRequest(op="post", text=text, images=refs), max_payload))


def _fitting(request: MomentRequest, max_payload: int) -> MomentRequest:
    """Thumbnails are left out, from the last image back, until the request fits the broker's limit."""
    images = list(request.images)
    for i in reversed(range(len(images))):
        if len(encode(request)) <= max_payload:
            break
        images[i] = images[i].model_copy(update={"thumbnail": ""})
        request = request.model_copy(update={"images": list(images)})
    return request


def feed(
    identity: Identity, user: str | None = None, limit: int = 20, before: float | None = None
) -> tuple[MomentReply, dict[str, str]]:
    """Newest first: my friends' moments and my own, or one user's (``user``: an account or display
    name); with everyone's display names, to show people as everywhere else."""
    if not 1 <= limit <= MOMENTS_PAGE_MAX:
        raise InvalidInput(f"invalid limit {limit}", f"use 1-{MOMENTS_PAGE_MAX}")
    if before is not None and not 0 <= before <= MAX_TIMESTAMP:  # a negative one was a pydantic traceback
        raise InvalidInput(f"invalid time stamp {before:g}", "give --before a time stamp a listing showed")
    with Connection(identity, "moments") as connection:
        account = resolve(connection, user) if user is not None else None
        page = ask(connection, MomentRequest(op="feed", user=account, limit=limit, before=before))
        return page, (display_names(connection) if page.moments else {})


def act(identity: Identity, op: MomentOp, post_id: str, text: str | None = None) -> MomentReply:
    """Like, unlike, comment on or delete one moment (by its id, as ``imcli moments`` shows it)."""
    if not is_id(post_id):
        raise InvalidInput(f"invalid moment id {quoted(post_id)}", "give an id as 'imcli moments' shows it")
    if op == "comment" and not (text or "").strip():
        raise InvalidInput("an empty comment", "give the comment's text")
    with Connection(identity, "moments") as connection:
        return ask(connection, MomentRequest(op=op, post=post_id, text=text))


def delete(identity: Identity, post_id: str) -> int:
    """Delete one of my moments, then its images from the files worker (``file_delete``, as ``imcli rm``);
    the worker's reply names only the images no other moment of mine shows. How many were removed."""
    if not is_id(post_id):
        raise InvalidInput(f"invalid moment id {quoted(post_id)}", "give an id as 'imcli moments' shows it")
    with FileConnection(identity, "moments") as connection:
        reply = ask(connection, MomentRequest(op="delete", post=post_id))
        files = list(dict.fromkeys(image.file for moment in reply.moments for image in moment.images))
        removed = 0
        for file_id in files:
            try:
                connection.delete(file_id)
            except NotFound:
                continue  # removed before ('imcli rm ID')
            except ImcliError as exc:
                raise ImcliError(
                    f"moment {post_id} was deleted, but not its images: {exc.message}",
                    "remove them with 'imcli rm ID' ('imcli files --json' lists them)",
                ) from exc
            removed += 1
        return removed
