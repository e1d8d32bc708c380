"""Moments (issue 18): friends' posts and one's own, likes and comments, seen by the author's
friends only (the worker answers nobody else, and the broker carries moments only on each
reader's own reply and notice topics); kept across restarts.

Every test runs on the embedded broker and on Mosquitto with its workers (tests/brokers.py)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.settings import BrokerSettings
from imcli.client import moments, services
from imcli.core.errors import NotAllowed, NotFound
from imcli.core.wire import (
    ErrorReply,
    FileAck,
    FileGet,
    FileListing,
    FileListRequest,
    FileOffer,
    FileReady,
    MomentReply,
    MomentRequest,
    Topics,
    WireModel,
    decode,
    encode,
    new_id,
)
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import brokers
from tests.conftest import Cli, Proc, Raw, ident
from tests.rawmqtt import password_of

broker_kind, broker_under_test, server, users = brokers.BOTH

CliFactory = Callable[[str], Cli]
T = Topics()


@pytest.fixture
def people(users: Callable[..., None], cli_as: CliFactory) -> dict[str, Cli]:
    """alice and bob are friends; carol is nobody's."""
    users("alice", "bob", "carol")
    clis = {name: cli_as(name) for name in ("alice", "bob", "carol")}
    for name, cli in clis.items():
        cli.login(name)
    assert clis["alice"]("friend", "add", "bob").exit_code == 0
    assert clis["bob"]("friend", "accept", "alice").exit_code == 0
    return clis


def _feed(cli: Cli, *args: str) -> Any:
    result = cli("moments", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _texts(doc: Any) -> list[str]:
    return [m["text"] for m in doc["moments"]]


def test_friends_see_posts_likes_and_comments_newest_first(people: dict[str, Cli]) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    first = alice("moments", "post", "first light")
    assert first.exit_code == 0 and first.stdout.startswith("posted ")
    post_id = first.stdout.split()[1]
    assert alice("moments", "post", "second\nwith two lines").exit_code == 0
    assert bob("moments", "post", "bob's own").exit_code == 0
    assert carol("moments", "post", "carol alone").exit_code == 0

    assert _texts(_feed(bob)) == ["bob's own", "second\nwith two lines", "first light"]
    assert _texts(_feed(alice)) == ["bob's own", "second\nwith two lines", "first light"]
    assert _texts(_feed(carol)) == ["carol alone"]  # nobody's friend: her own only
    page = _feed(bob, "--limit", "2")
    assert len(page["moments"]) == 2 and page["more"] is True
    older = page["moments"][-1]["ts"]
    assert _texts(_feed(bob, "--limit", "2", "--before", repr(older))) == ["first light"]
    assert _texts(_feed(bob, "alice")) == ["second\nwith two lines", "first light"]

    assert bob("moments", "like", post_id).exit_code == 0
    assert bob("moments", "comment", post_id, "好看").exit_code == 0
    seen = next(m for m in _feed(alice)["moments"] if m["id"] == post_id)
    assert seen["likes"] == ["bob"]
    assert [(c["author"], c["text"]) for c in seen["comments"]] == [("bob", "好看")]
    shown = bob("moments").stdout
    assert "♥ bob" in shown and "bob: 好看" in shown and "first light" in shown


def test_a_non_friend_reads_nothing_of_a_post_by_any_way(
    people: dict[str, Cli], server: ServeInfo, raw: Callable[..., Raw]
) -> None:
    alice, carol = people["alice"], people["carol"]
    watcher = raw("carol", password_of("carol"), client_id="carol:watch")
    for topic_filter in ("#", "im/#", "im/user/alice/#", "im/user/bob/#", "im/user/+/notice", "im/user/+/reply/+"):
        watcher.subscribe(topic_filter)  # refused or, where granted, carries nothing of alice's
    watcher.subscribe(T.user_filter("carol"))
    post_id = alice("moments", "post", "for friends only").stdout.split()[1]
    assert people["bob"]("moments", "like", post_id).exit_code == 0

    for args, error in (
        (["like", post_id], f"Error: no moment {post_id} (or it is not yours to see)"),
        (["comment", post_id, "hi"], f"Error: no moment {post_id}"),
        (["delete", post_id], f"Error: no moment {post_id}"),
        (["alice"], "Error: you can see the moments of your friends only"),
    ):
        refused = carol("moments", *args)
        assert refused.exit_code == 1 and refused.stderr.startswith(error), refused.stderr
    # a raw request, by id and by author: the worker answers carol with a refusal only
    watcher.publish(T.request("carol", "c1"), encode(MomentRequest(op="like", post=post_id)))
    watcher.publish(T.request("carol", "c2"), encode(MomentRequest(op="feed", user="alice")))
    everything = [*watcher.until(T.reply("carol", "c2"), timeout=10), *watcher.silent(1.0)]
    replies = {
        m.topic: decode(bytes(m.payload)) for m in everything if m.topic.startswith(T.reply_filter("carol")[:-1])
    }
    assert isinstance(replies[T.reply("carol", "c1")], ErrorReply)
    assert isinstance(replies[T.reply("carol", "c2")], ErrorReply)
    # nothing carol's connection received (her subtree, and whatever the broker granted of the rest)
    assert not any(b"for friends only" in bytes(m.payload) for m in everything)
    assert "for friends only" not in carol("moments").stdout


def test_removing_a_friend_removes_their_view(people: dict[str, Cli]) -> None:
    alice, bob = people["alice"], people["bob"]
    post_id = alice("moments", "post", "while we were friends").stdout.split()[1]
    assert _texts(_feed(bob)) == ["while we were friends"]
    assert alice("friend", "remove", "bob").exit_code == 0
    assert _texts(_feed(bob)) == []
    refused = bob("moments", "like", post_id)
    assert refused.exit_code == 1 and refused.stderr.startswith(f"Error: no moment {post_id}")


def test_only_the_author_deletes(people: dict[str, Cli]) -> None:
    alice, bob = people["alice"], people["bob"]
    post_id = alice("moments", "post", "mine").stdout.split()[1]
    refused = bob("moments", "delete", post_id)
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"Error: moment {post_id} is alice's: only its author can delete it")
    assert alice("moments", "delete", post_id).exit_code == 0
    assert _texts(_feed(bob)) == []
    gone = alice("moments", "like", post_id)
    assert gone.exit_code == 1 and gone.stderr.startswith(f"Error: no moment {post_id}")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["post", ""], "Error: an empty moment"),
        (["post", "   "], "Error: an empty moment"),
        (["post", "x" * 2001], "Error: the moment is 2001 characters long"),
        (["post", "bell\x07"], "Error: invalid moment text"),
        (
            ["like", "nosuchid"],  # the moments' hint, not a name's
            "Error: no moment nosuchid (or it is not yours to see) (see the moments you can see with 'imcli moments')",
        ),
        (["like", "bad id!"], "Error: invalid moment id"),
        (["comment", "nosuchid", ""], "Error: an empty comment"),
        (["delete", "nosuchid"], "Error: no moment nosuchid"),
        (["nobody-at-all"], "Error: unknown user 'nobody-at-all'"),
        (["--limit", "0"], "Error: invalid limit 0"),
        (["post", "hi", "--image", "/no/such/file.png"], "Error: no file '/no/such/file.png'"),
    ],
)
def test_bad_input_is_one_error_line(people: dict[str, Cli], args: list[str], error: str) -> None:
    result = people["alice"]("moments", *args)
    assert result.exit_code == 1, result.stdout
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_oversized_or_false_image_is_refused_before_anything_is_sent(people: dict[str, Cli], tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(6 << 20))
    fake = tmp_path / "fake.png"
    fake.write_text("just text")
    for path, error in ((big, "more than 5 MiB"), (fake, "is not a PNG, JPEG, GIF or WebP image")):
        result = people["alice"]("moments", "post", "look", "--image", str(path))
        assert result.exit_code == 1 and error in result.stderr, result.stderr
    assert _texts(_feed(people["bob"])) == []


def test_a_post_with_images_carries_files_and_thumbnails(people: dict[str, Cli], tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i in range(2):
        path = tmp_path / f"p{i}.png"
        Image.new("RGB", (80, 60), (20 * i, 100, 200)).save(path, "PNG")
        paths += ["--image", str(path)]
    assert people["alice"]("moments", "post", "two pictures", *paths).exit_code == 0
    (moment,) = _feed(people["bob"])["moments"]
    assert [i["media_type"] for i in moment["images"]] == ["image/png", "image/png"]
    assert all(i["thumbnail"] for i in moment["images"])
    got = people["bob"]("get", moment["images"][0]["file"], "--output", str(tmp_path / "got.png"))
    assert got.exit_code == 0 and (tmp_path / "got.png").read_bytes() == (tmp_path / "p0.png").read_bytes()


def test_new_posts_likes_and_comments_reach_listen(people: dict[str, Cli], procs: Callable[..., Proc]) -> None:
    alice, bob = people["alice"], people["bob"]
    listener = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(alice.config_dir)})
    assert json.loads(listener.line(timeout=20))["kind"] == "event"  # her own join: listening now
    post_id = alice("moments", "post", "hello friends").stdout.split()[1]
    assert bob("moments", "like", post_id).exit_code == 0
    assert bob("moments", "comment", post_id, "hi alice").exit_code == 0
    assert bob("moments", "post", "bob writes too").exit_code == 0
    texts: list[str] = []
    while len(texts) < 3:
        line = json.loads(listener.line(timeout=20))
        if line["kind"] == "notice":
            texts.append(line["text"])
    assert texts == [
        "bob liked your moment “hello friends”",
        "bob commented on your moment “hello friends”: hi alice",
        "bob posted a moment: bob writes too (imcli moments bob)",
    ]


def test_the_services_answer_the_same(people: dict[str, Cli], server: ServeInfo) -> None:
    alice, carol = ident(server, "alice"), ident(server, "carol")
    posted = moments.post(alice, "through the library")
    assert isinstance(posted, MomentReply)
    with pytest.raises(NotFound):
        moments.act(carol, "like", posted.moments[0].id)
    with pytest.raises(NotAllowed):
        moments.feed(carol, "alice")
    assert services.rename(alice, "Алиса") == "Алиса"
    page, names = moments.feed(ident(server, "bob"), "Алиса")
    assert [m.text for m in page.moments] == ["through the library"] and names["alice"] == "Алиса"


@brokers.EMBEDDED_ONLY  # imcli serve's own restart: the moments file and the friends records come back
def test_moments_survive_a_restart(tmp_path: Path, broker_kind: str) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "durable", port=0)
    with BackgroundServer(settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob", "carol"):
            store.add(name, password_of(name))
        services.friend_request(ident(info, "alice"), "add", "bob")
        services.friend_request(ident(info, "bob"), "accept", "alice")
        post_id = moments.post(ident(info, "alice"), "kept").moments[0].id
        moments.act(ident(info, "bob"), "comment", post_id, "still here?")
        port = info.address.port
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "durable", port=port)) as info:
        page, _ = moments.feed(ident(info, "bob"))
        assert [(m.text, [c.text for c in m.comments]) for m in page.moments] == [("kept", ["still here?"])]
        with pytest.raises(NotFound):
            moments.act(ident(info, "carol"), "like", post_id)


# ---------------------------------------------------------------- a moment's images: friends only


def _ask(client: Raw, me: str, request: WireModel) -> object:
    corr = new_id()
    client.publish(T.request(me, corr), encode(request))
    return decode(bytes(client.expect(T.reply(me, corr), timeout=10).payload))


def _fetcher(raw: Callable[..., Raw], name: str) -> Raw:
    r = raw(name, password_of(name), client_id=f"{name}:raw")
    assert r.subscribe(T.reply_filter(name)) == 1
    return r


def _can_fetch(client: Raw, me: str, file_id: str) -> bool:
    reply = _ask(client, me, FileGet(file=file_id))
    if isinstance(reply, ErrorReply):
        assert reply.code == "not_found" and reply.text == f"no file {file_id} (or you may not fetch it)"
        return False
    assert isinstance(reply, FileReady) and reply.file.id == file_id
    return True


def _listed(client: Raw, me: str, request: FileListRequest) -> list[str] | None:
    reply = _ask(client, me, request)
    if isinstance(reply, ErrorReply):
        assert reply.code == "denied", reply
        return None
    assert isinstance(reply, FileListing)
    return [f.id for f in reply.files]


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """The files worker learns a friendship's end from the group worker's retained record, which
    may reach it a moment after ``friend remove`` returned: ask again until it says so."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_moments_image_is_for_the_author_and_current_friends_only(
    people: dict[str, Cli], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    from PIL import Image

    path = tmp_path / "friends-only.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, "PNG")
    alice = people["alice"]
    post = alice("moments", "post", "a picture", "--image", str(path))
    assert post.exit_code == 0, post.stderr
    post_id = post.stdout.split()[1]
    (moment,) = _feed(people["bob"])["moments"]
    file_id = moment["images"][0]["file"]
    a, b, c = _fetcher(raw, "alice"), _fetcher(raw, "bob"), _fetcher(raw, "carol")
    mine = FileListRequest(moments="alice")

    # the author and her friend fetch and list it; carol, holding the id, gets what an unknown id gets
    assert _can_fetch(a, "alice", file_id) and _can_fetch(b, "bob", file_id)
    assert _listed(a, "alice", mine) == [file_id] and _listed(b, "bob", mine) == [file_id]
    assert not _can_fetch(c, "carol", file_id)
    assert _listed(c, "carol", mine) is None
    assert file_id not in (_listed(c, "carol", FileListRequest()) or [])
    # nor may carol add an image to alice's moments, nor store one as a room file under that scope
    data = b"\x89PNG\r\n\x1a\n" + b"x" * 100
    forged = FileOffer(name="x.png", size=len(data), sha256=hashlib.sha256(data).hexdigest(), moments="alice")
    refused = _ask(c, "carol", forged)
    assert isinstance(refused, ErrorReply) and refused.code == "denied"
    two = FileOffer(name="x.png", size=len(data), sha256=forged.sha256, moments="carol", room="lobby")
    assert isinstance(_ask(c, "carol", two), ErrorReply)

    # unfriended, bob keeps the id and loses the image; alice keeps it
    assert alice("friend", "remove", "bob").exit_code == 0
    assert _eventually(lambda: not _can_fetch(b, "bob", file_id))
    assert _listed(b, "bob", mine) is None
    assert file_id not in (_listed(b, "bob", FileListRequest()) or [])
    assert _can_fetch(a, "alice", file_id)

    # deleting the moment deletes its image (file_delete): gone for its author too
    deleted = alice("moments", "delete", post_id)
    assert deleted.exit_code == 0 and deleted.stdout == f"deleted {post_id} and its 1 image\n"
    assert not _can_fetch(a, "alice", file_id)
    assert _listed(a, "alice", mine) == []


def test_deleting_a_moment_deletes_the_images_no_other_moment_shows(people: dict[str, Cli], tmp_path: Path) -> None:
    from PIL import Image

    shared, own = tmp_path / "shared.png", tmp_path / "own.png"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(shared, "PNG")
    Image.new("RGB", (40, 30), (10, 10, 200)).save(own, "PNG")
    alice, bob = people["alice"], people["bob"]
    first = alice("moments", "post", "first", "--image", str(shared)).stdout.split()[1]
    second = alice("moments", "post", "second", "--image", str(shared), "--image", str(own)).stdout.split()[1]
    files = {m["text"]: [i["file"] for i in m["images"]] for m in _feed(bob)["moments"]}
    shared_id, own_id = files["second"]
    assert files["first"] == [shared_id]  # the same image sent again is the same file

    deleted = alice("moments", "delete", second)
    assert deleted.exit_code == 0 and deleted.stdout == f"deleted {second} and its 1 image\n"
    gone = bob("get", own_id, "--output", str(tmp_path / "own-copy.png"))
    assert gone.exit_code == 1 and gone.stderr.startswith(f"Error: no file {own_id}"), gone.stderr
    kept = bob("get", shared_id, "--output", str(tmp_path / "shared-copy.png"))
    assert kept.exit_code == 0 and (tmp_path / "shared-copy.png").read_bytes() == shared.read_bytes()

    assert alice("rm", shared_id).exit_code == 0  # removed by hand first: the moment's delete goes on
    deleted = alice("moments", "delete", first)
    assert deleted.exit_code == 0 and deleted.stdout == f"deleted {first}\n"
    assert _feed(bob)["moments"] == []


def test_an_unfriended_download_of_a_moments_file_stops(
    people: dict[str, Cli], server: ServeInfo, raw: Callable[..., Raw], tmp_path: Path
) -> None:
    """bob is fetching a large file of alice's moments when she removes him: the worker sends
    nothing more after his next acknowledgement."""
    from imcli.client.files import FileConnection

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 << 10))  # 3 MiB: three windows
    with FileConnection(ident(server, "alice")) as connection:
        info = connection.upload(big, {"moments": "alice"})
    b = _fetcher(raw, "bob")
    assert b.subscribe(T.file_data_filter("bob")) == 1
    get = FileGet(file=info.id)
    assert isinstance(_ask(b, "bob", get), FileReady)
    b.publish(T.fetch("bob", get.stream), encode(FileAck(offset=0)))
    assert len(b.expect(T.file_data("bob", get.stream), timeout=10).payload) > 8  # it flows
    assert people["alice"]("friend", "remove", "bob").exit_code == 0
    assert _eventually(lambda: not _can_fetch(b, "bob", info.id))
    b.silent(1.0)  # what was on its way before
    b.publish(T.fetch("bob", get.stream), encode(FileAck(offset=1 << 20)))
    assert [m for m in b.silent(2.0) if m.topic == T.file_data("bob", get.stream)] == []


# ---------------------------------------------------------------- replies the broker can carry


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)  # applies its payload limit to the workers
def test_a_friends_comment_flood_does_not_silence_anyones_feed(
    people: dict[str, Cli], server: ServeInfo, raw: Callable[..., Raw]
) -> None:
    """bob, alice's friend, comments 520 times (500 characters each) on her moment through a raw client:
    every reply showing it (a feed, a comment's own answer) grew past Mosquitto's 256 KiB, which it applies
    to the workers too, so it was dropped and alice's, bob's and every friend's feed went unanswered. Now
    the moments worker fits each reply to ``imcli workers --max-payload``: the moment comes with its
    newest comments, and the page says there is more."""
    alice = ident(server, "alice")
    post = moments.post(alice, "comment on this").moments[0]
    spammer = raw("bob", password_of("bob"), "bob:spam")
    assert spammer.subscribe(T.reply_filter("bob")) == 1
    for i in range(520):
        comment = MomentRequest(op="comment", post=post.id, text=f"c{i:04d} " + "x" * 490)
        spammer.client.publish(T.request("bob", new_id()), encode(comment), qos=1)
    last = new_id()
    spammer.publish(T.request("bob", last), encode(MomentRequest(op="feed")))
    spammer.expect(T.reply("bob", last), timeout=60)  # the worker has taken every comment
    for who in (alice, ident(server, "bob")):
        page, _ = moments.feed(who)
        [shown] = page.moments
        assert shown.id == post.id and 100 < len(shown.comments) < 520
        assert shown.comments[-1].text.startswith("c0519")  # the newest kept


def test_a_reply_is_fitted_to_the_brokers_payload_limit() -> None:
    """``moments.book.fit``: moments past the limit go to the next page; a moment too large alone keeps
    its newest comments, then loses thumbnails from its last image back; a reply that fits is left as is."""
    from imcli.core.wire import Moment, MomentComment
    from imcli.moments.book import fit
    from tests.test_web_hostile import b64, image

    thumb = b64(image("JPEG", (16, 16)))
    comments = [MomentComment(id=new_id(), author="bob", ts=float(i), text=f"c{i} " + "x" * 400) for i in range(60)]
    images = [{"file": new_id(), "media_type": "image/jpeg", "thumbnail": thumb} for _ in range(3)]
    big = Moment(id=new_id(), author="alice", ts=1.0, text="big", comments=comments, images=images)
    small = [Moment(id=new_id(), author="alice", ts=float(i), text="y" * 1500) for i in range(20)]
    page = MomentReply(id="r", moments=small)
    limit = 16384
    fitted = fit(page, limit)
    assert len(encode(fitted)) <= limit and fitted.more and fitted.moments == small[: len(fitted.moments)]
    assert len(fitted.moments) >= 9
    alone = fit(MomentReply(id="r", moments=[big, *small]), limit)
    [one] = alone.moments
    assert alone.more and len(encode(alone)) <= limit and one.comments == comments[-len(one.comments) :]
    assert [i.thumbnail for i in one.images] == [thumb] * 3  # the comments went first
    bare = fit(MomentReply(id="r", moments=[big.model_copy(update={"comments": []})]), len(thumb) + 600)
    assert [bool(i.thumbnail) for i in bare.moments[0].images] == [True, False, False] and not bare.more
    assert fit(page, 10**6) is page


def test_the_help_and_the_usage_errors_say_imcli_moments_as_it_is_typed(tmp_path: Path) -> None:
    """``imcli moments [USER]`` is the feed; ``feed`` is the hidden command that reads it, and no
    line a person reads names it: the help's usage said ``COMMAND [ARGS]...`` (as if a command were
    needed) and sent to ``imcli moments feed --help``, a usage error said ``usage: imcli moments feed
    [OPTIONS] [USER]; more: imcli moments feed --help``."""
    from typer.testing import CliRunner

    from imcli.cli.app import app

    env = {"IMCLI_CONFIG_DIR": str(tmp_path)}
    shown = CliRunner().invoke(app, ["moments", "--help"], env=env, prog_name="imcli")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[:2] == [
        "Usage: imcli moments [USER] [OPTIONS]",
        "   or: imcli moments COMMAND [ARGS]...",
    ]
    assert "feed" not in shown.stdout.replace("the feed", "")  # the word a person reads, not the command
    for option in ("--limit", "--before", "--json", "USER", "post", "delete"):
        assert option in shown.stdout, option
    for args in (["moments", "--bogus"], ["moments", "alice", "bob"], ["moments", "--limit", "x"]):
        refused = CliRunner().invoke(app, args, env=env, prog_name="imcli")
        assert refused.exit_code == 2, refused.output
        assert "usage: imcli moments [OPTIONS] [USER]; more: imcli moments --help)" in refused.stderr, refused.stderr
        assert "feed" not in refused.stderr, refused.stderr
