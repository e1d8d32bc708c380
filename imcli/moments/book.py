"""Moments (朋友圈) without any MQTT: who may post, see, like, comment and delete what.

Every decision is ``imcli.core.rules.moment_visible``: a moment, its likes and its comments
are the author's and the author's friends' (as the group worker's retained friends records say
now), and nobody else's. A moment the asker may not see answers exactly like one that does not
exist. ``Outcome.notices`` are what the worker tells people on their own notice topics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from imcli.core.rules import missing_moment, moment_visible
from imcli.core.text import is_plain
from imcli.core.wire import (
    COMMENT_TEXT_MAX,
    MOMENT_TEXT_MAX,
    ErrorReply,
    Moment,
    MomentComment,
    MomentReply,
    MomentRequest,
    encode,
    is_name,
    most_that_fit,
    new_id,
)
from imcli.moments.store import MomentStore

PREVIEW = 60  # characters of a moment quoted in a notice


@dataclass
class Outcome:
    reply: MomentReply | ErrorReply
    notices: list[tuple[str, str]] = field(default_factory=list)  # (user, text)


class MomentsBook:
    def __init__(self, store: MomentStore) -> None:
        self.store = store
        self._friends: dict[str, frozenset[str]] = {}

    def friends_changed(self, user: str, friends: Iterable[str]) -> None:
        self._friends[user] = frozenset(friends)

    def friends_of(self, user: str) -> frozenset[str]:
        return self._friends.get(user, frozenset())

    def apply(self, sender: str, req: MomentRequest, now: float) -> Outcome:
        match req.op:
            case "post":
                return self._post(sender, req, now)
            case "feed":
                return self._feed(sender, req)
        if not req.post:
            return _error(req, "invalid", "which moment? give its id")
        moment = self.store.get(req.post)
        if moment is None or not moment_visible(moment.author, sender, self.friends_of(moment.author)):
            return _error(req, "not_found", missing_moment(req.post))
        match req.op:
            case "like" | "unlike":
                self.store.like(moment.id, sender, now, liked=req.op == "like")
                notices = [(moment.author, f"{sender} liked your moment “{_preview(moment.text)}”")]
                return self._changed(req, moment.id, notices if req.op == "like" else [], sender, moment.author)
            case "comment":
                text = (req.text or "").strip()
                if not text or len(text) > COMMENT_TEXT_MAX or not is_plain(text):
                    hint = f"one line of 1 to {COMMENT_TEXT_MAX} characters, no control characters"
                    return _error(req, "invalid", f"invalid comment: {hint}")
                self.store.comment(moment.id, MomentComment(id=new_id(), author=sender, ts=now, text=text))
                notice = f"{sender} commented on your moment “{_preview(moment.text)}”: {_preview(text)}"
                return self._changed(req, moment.id, [(moment.author, notice)], sender, moment.author)
            case "delete":
                if moment.author != sender:
                    return _error(
                        req, "denied", f"moment {moment.id} is {moment.author}'s: only its author can delete it"
                    )
                # the reply is the moment deleted, with the images no other moment of the author shows:
                # its client deletes those files (file_delete, as 'imcli rm'); the others stay for the others
                kept = self.store.files_elsewhere(moment.author, moment.id)
                self.store.delete_post(moment.id)
                unshown = [i for i in moment.images if i.file not in kept]
                gone = moment.model_copy(update={"images": unshown, "likes": [], "comments": []})
                return Outcome(MomentReply(id=req.id, moments=[gone]))
        return _error(req, "invalid", f"unknown moments operation {req.op!r}")

    def _post(self, sender: str, req: MomentRequest, now: float) -> Outcome:
        text = (req.text or "").strip()
        if not text and not req.images:
            return _error(req, "invalid", "an empty moment: give some text or an image")
        if len(text) > MOMENT_TEXT_MAX or not is_plain(text, lines=True):
            hint = f"at most {MOMENT_TEXT_MAX} characters, no control characters but line feeds"
            return _error(req, "invalid", f"invalid moment text: {hint}")
        moment = Moment(id=new_id(), author=sender, ts=now, text=text, images=req.images)
        self.store.add_post(moment)
        quoted = _preview(text) if text else f"{len(req.images)} image(s)"
        notice = f"{sender} posted a moment: {quoted} (imcli moments {sender})"
        return Outcome(MomentReply(id=req.id, moments=[moment]), [(f, notice) for f in sorted(self.friends_of(sender))])

    def _feed(self, sender: str, req: MomentRequest) -> Outcome:
        if req.user:
            author = req.user
            if not is_name(author) or not moment_visible(author, sender, self.friends_of(author)):
                return _error(req, "denied", f"you can see the moments of your friends only, and {author} is not one")
            authors = [author]
        else:
            authors = sorted({sender, *self.friends_of(sender)})
            # a friendship is two records: both must say so (the group worker writes both at once)
            authors = [a for a in authors if moment_visible(a, sender, self.friends_of(a))]
        moments, more = self.store.page(authors, req.limit, req.before)
        return Outcome(MomentReply(id=req.id, moments=moments, more=more))

    def _changed(
        self, req: MomentRequest, post: str, notices: list[tuple[str, str]], sender: str, author: str
    ) -> Outcome:
        moment = self.store.get(post)
        told = [(user, text) for user, text in notices if user != sender]
        return Outcome(MomentReply(id=req.id, moments=[moment] if moment else []), told if author != sender else [])


def _preview(text: str) -> str:
    line = text.split("\n", 1)[0]
    return line if len(line) <= PREVIEW else line[: PREVIEW - 1] + "…"


def _error(req: MomentRequest, code: str, text: str) -> Outcome:
    return Outcome(ErrorReply(id=req.id, code=code, text=text))


def fit(reply: MomentReply, limit: int) -> MomentReply:
    """``reply`` as a broker that carries at most ``limit`` bytes will deliver it. A reply past it was
    dropped by the broker (Mosquitto applies its limit to the workers too), so a friend's few hundred
    comments on one moment made every feed that showed it go unanswered. The page's last moments are
    left for the next one (``more``: the client pages on from the last moment it got); a moment too
    large on its own keeps its newest comments that fit, then loses thumbnails from its last image
    back, as a client leaves them out of a post that does not fit (imcli.client.moments)."""
    if len(encode(reply)) <= limit:
        return reply

    def page(count: int) -> MomentReply:
        return reply.model_copy(update={"moments": reply.moments[:count], "more": True})

    kept = most_that_fit(len(reply.moments), lambda n: len(encode(page(n))) <= limit)
    if kept >= 1:
        return page(kept)
    moment = reply.moments[0]

    def alone(comments: int, thumbs: int = len(moment.images)) -> MomentReply:
        images = [i if n < thumbs else i.model_copy(update={"thumbnail": ""}) for n, i in enumerate(moment.images)]
        shown = moment.comments[len(moment.comments) - comments :] if comments else []
        one = moment.model_copy(update={"comments": shown, "images": images})
        return reply.model_copy(update={"moments": [one], "more": reply.more or len(reply.moments) > 1})

    comments = most_that_fit(len(moment.comments), lambda n: len(encode(alone(n))) <= limit)
    thumbs = most_that_fit(len(moment.images), lambda n: len(encode(alone(comments, n))) <= limit)
    return alone(comments, thumbs)
