"""Files (issue 16) attacked through raw MQTT clients: fetching, listing and overwriting other
people's files must fail, at the broker (topic ACL) and at the files worker (who may read what)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imcli.client import services
from imcli.client.files import FileConnection, _destination, local_name
from imcli.client.services import Conversation
from imcli.core.text import is_plain, plain_file_name
from imcli.core.topics import chunk
from imcli.core.wire import (
    ErrorReply,
    FileAck,
    FileDelete,
    FileGet,
    FileInfo,
    FileListing,
    FileListRequest,
    FileOffer,
    FileProgress,
    FileReady,
    FileUpload,
    Topics,
    WireModel,
    decode,
    encode,
    new_id,
)
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import ident
from tests.rawmqtt import Raw, password_of

T = Topics()

broker_kind, broker_under_test, server, users = brokers.BOTH


def ask(client: Raw, me: str, request: WireModel) -> object:
    corr = new_id()
    client.publish(T.request(me, corr), encode(request))
    return decode(bytes(client.expect(T.reply(me, corr)).payload))


def final(client: Raw, topic: str) -> object:
    """The first answer on an upload's reply topic that is not a progress report."""
    while True:
        reply = decode(bytes(client.expect(topic, timeout=10).payload))
        if not isinstance(reply, FileProgress):
            return reply


def send(server: ServeInfo, me: str, where: Conversation, path: Path) -> FileInfo:
    with FileConnection(ident(server, me)) as c:
        target = c.target(where)
        info = c.upload(path, target)
        c.post(where, target, info)
    return info


def attacker(raw: Callable[..., Raw], name: str) -> Raw:
    r = raw(name, password_of(name), f"{name}:evil")
    assert r.subscribe(T.reply_filter(name)) == 1
    return r


def test_outsiders_cannot_fetch_list_or_read_a_direct_file(
    broker_kind: str, server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "bob", "carol")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"the plans" * 1000)
    info = send(server, "alice", Conversation("dm", "bob"), secret)
    carol = attacker(raw, "carol")
    # the worker: an id she learnt answers as an unknown one
    reply = ask(carol, "carol", FileGet(file=info.id))
    assert isinstance(reply, ErrorReply) and reply.code == "not_found"
    assert reply.text == f"no file {info.id} (or you may not fetch it)"
    unknown = ask(carol, "carol", FileGet(file="B" * 24))
    assert isinstance(unknown, ErrorReply) and unknown.text == f"no file {'B' * 24} (or you may not fetch it)"
    listing = ask(carol, "carol", FileListRequest())
    assert isinstance(listing, FileListing) and listing.files == []
    with_bob = ask(carol, "carol", FileListRequest(user="bob"))  # her conversation with bob, not alice's
    assert isinstance(with_bob, FileListing) and with_bob.files == []
    # the broker: bob's downloads, and everyone's uploads and acknowledgements, are not hers to read
    snoop = ("im/user/bob/file/+", "im/user/+/file/+", T.upload_filter(), T.fetch_filter())
    if broker_kind == "amqtt":
        assert [carol.subscribe(f) for f in snoop] == [128] * 4
    else:  # Mosquitto grants every SUBSCRIBE (brokers.SUBSCRIBE_GRANTED) and filters each delivery
        carol.subscribe_all(*snoop)
    # bob fetches it while she listens: she sees none of it
    bob = attacker(raw, "bob")
    assert bob.subscribe(T.file_data_filter("bob")) == 1
    get = FileGet(file=info.id)
    assert isinstance(ask(bob, "bob", get), FileReady)
    bob.publish(T.fetch("bob", get.stream), encode(FileAck(offset=0)))
    first = bob.expect(T.file_data("bob", get.stream))
    assert bytes(first.payload)[8:] == secret.read_bytes()[: len(first.payload) - 8]
    # nor may she acknowledge his download to make the worker send more, nor upload as him
    carol.publish(T.fetch("bob", get.stream), encode(FileAck(offset=0)))
    assert carol.silent(1.0, "im/user/") == []


def test_nobody_writes_into_someone_elses_upload(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "bob", "carol")
    data = b"A" * 40_000
    alice = attacker(raw, "alice")
    offer = FileOffer(name="a.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest(), room="lobby")
    start = ask(alice, "alice", offer)
    assert isinstance(start, FileUpload) and start.offset == 0
    carol = attacker(raw, "carol")
    evil = b"X" * 16_000
    # on alice's upload topic the broker drops it (with a notice); on her own, the worker ignores it
    carol.publish(T.upload("alice", start.upload), chunk(0, evil))
    carol.publish(T.upload("carol", start.upload), chunk(0, evil))
    # alice's offer again shows the worker still has nothing of hers
    again = ask(alice, "alice", offer)
    assert isinstance(again, FileUpload) and again.upload == start.upload and again.offset == 0
    # and her own bytes make the file, whose sha256 matches
    for offset in range(0, len(data), 16_000):
        alice.publish(T.upload("alice", start.upload), chunk(offset, data[offset : offset + 16_000]))
    ready = final(alice, T.reply("alice", start.upload))
    assert isinstance(ready, FileReady) and ready.file.size == len(data)
    # a chunk claiming more bytes than offered, or a wrong digest, never becomes a file
    bad = FileOffer(name="b.bin", size=10, sha256="0" * 64, room="lobby")
    up = ask(alice, "alice", bad)
    assert isinstance(up, FileUpload)
    alice.publish(T.upload("alice", up.upload), chunk(0, b"0123456789"))
    refused = final(alice, T.reply("alice", up.upload))
    assert isinstance(refused, ErrorReply) and "sha256" in refused.text


def test_a_kicked_member_cannot_fetch_the_groups_files(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "bob", "carol")
    services.group_request(ident(server, "alice"), "create", "team", private=True)
    services.group_request(ident(server, "alice"), "invite", "team", user="bob")
    before = tmp_path / "before.txt"
    before.write_bytes(b"before" * 100)
    first = send(server, "alice", Conversation("group", "team"), before)
    bob = attacker(raw, "bob")
    assert isinstance(ask(bob, "bob", FileGet(file=first.id)), FileReady)
    services.group_request(ident(server, "alice"), "kick", "team", user="bob")
    after = tmp_path / "after.txt"
    after.write_bytes(b"after" * 100)
    second = send(server, "alice", Conversation("group", "team"), after)
    for info in (first, second):
        reply = ask(bob, "bob", FileGet(file=info.id))
        assert isinstance(reply, ErrorReply) and reply.code == "not_found"
    listing = ask(bob, "bob", FileListRequest(group="team"))
    assert isinstance(listing, ErrorReply) and listing.code == "not_found"
    everything = ask(bob, "bob", FileListRequest())
    assert isinstance(everything, FileListing) and everything.files == []
    # a non-member cannot offer files to the group either
    carol = attacker(raw, "carol")
    offer = FileOffer(name="x", size=1, sha256="0" * 64, group="team")
    refused = ask(carol, "carol", offer)
    assert isinstance(refused, ErrorReply) and refused.code == "not_found"


def test_a_room_file_is_for_every_signed_in_user(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "dave")
    note = tmp_path / "note.txt"
    note.write_bytes(b"hello room" * 10)
    info = send(server, "alice", Conversation("room", "lobby"), note)
    dave = attacker(raw, "dave")
    assert isinstance(ask(dave, "dave", FileGet(file=info.id)), FileReady)
    anonymous = raw(None, None)
    assert anonymous.rc == 5


BAD_FILE_NAMES = [
    "a/b", "../up", "a\\b", "..\\up", ".", "..",  # paths
    "bell\x07", "two\nlines", "cr\rhere", "esc\x1b[2J", "nul\x00", "\x85nel",  # controls
    "\u202etxt.exe", "rtl\u2067x", "zero\u200bwidth", "a\u200db", "\u2028sep", "\u2029par", "\ufeffbom",
    "unassigned\u0378",
]  # fmt: skip
GOOD_FILE_NAMES = ["\U0001f469\u200d\U0001f469\u200d\U0001f467.png", "日本 語.txt", "x.tar.gz", "..hidden", "a b"]


def worker_takes(name: str) -> bool:  # the files worker's rule for an offered name (imcli/files/worker.py)
    return "/" not in name and "\\" not in name and is_plain(name) and name not in (".", "..")


@pytest.mark.parametrize("name", [*BAD_FILE_NAMES, "../../.bashrc", "a/../../b", "x\x1b]52;c;cm0=\x07", "[bold]x"])
def test_a_fetched_file_lands_in_its_directory_under_a_plain_name(tmp_path: Path, name: str) -> None:
    """The name a file message claims (``/open`` takes it from one; a raw client writes any) never
    leaves the download directory, and never puts a control, an escape or a bidi override on disk."""
    info = FileInfo.model_construct(id="f" * 24, name=name, size=1, sha256="0" * 64)
    dest = _destination(tmp_path, info)
    assert dest.parent == tmp_path, dest
    assert worker_takes(dest.name) and worker_takes(local_name(info)), dest.name
    assert _destination(None, info).parent == Path(".")  # the name alone: here, as imcli get says it (835ee5b)


# a name on disk that is not UTF-8 reaches Python with lone surrogates (os.fsdecode), which
# st.characters never draws by itself
LOCAL_NAME_CHARS = st.characters(exclude_characters="\x00/") | st.sampled_from("\udcff\udc80\ud800")


@given(st.text(LOCAL_NAME_CHARS, min_size=1, max_size=255))
def test_any_local_file_name_becomes_one_the_worker_takes(name: str) -> None:
    """What ``imcli send`` offers for any name a file can have on Linux (any character but NUL and
    '/') is a name the files worker takes, and a name it already takes is left as it is."""
    offered = plain_file_name(name)
    assert worker_takes(offered) and len(offered) == len(name)
    if worker_takes(name):
        assert offered == name
    for bad in BAD_FILE_NAMES:
        assert worker_takes(plain_file_name(bad))
    for good in GOOD_FILE_NAMES:
        assert plain_file_name(good) == good


def test_file_names_that_are_paths_or_do_not_draw_as_themselves_are_refused(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw]
) -> None:
    """A raw client offers names that no CLI would: the files worker refuses each (on either
    broker), and takes file names with emoji sequences and spaces."""
    users("mallory")
    mallory = attacker(raw, "mallory")
    for name in BAD_FILE_NAMES:
        offer = FileOffer(name=name, size=3, sha256=hashlib.sha256(name.encode()).hexdigest(), room="lobby")
        reply = ask(mallory, "mallory", offer)
        assert isinstance(reply, ErrorReply), (name, reply)
        assert reply.code == "invalid" and reply.text == f"invalid file name {name!r}", reply
        assert reply.hint is not None and "control characters" in reply.hint
    for name in GOOD_FILE_NAMES:  # one content: the same unfinished upload, renamed (not 5 uploads in flight)
        offer = FileOffer(name=name, size=3, sha256=hashlib.sha256(b"abc").hexdigest(), room="lobby")
        assert isinstance(ask(mallory, "mallory", offer), FileUpload), name


def test_nobody_but_the_sender_deletes_a_file(
    broker_kind: str, server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "bob", "carol")
    shared = tmp_path / "shared.txt"
    shared.write_bytes(b"ours" * 1000)
    info = send(server, "alice", Conversation("dm", "bob"), shared)
    for name in ("bob", "carol"):  # bob may read it, carol may not: neither may delete it
        client = attacker(raw, name)
        client.publish(T.request("alice", new_id()), encode(FileDelete(file=info.id)))  # as alice: the ACL drops it
        reply = ask(client, name, FileDelete(file=info.id))
        assert isinstance(reply, ErrorReply) and reply.code == "not_found"
        assert reply.text == f"no file {info.id} of yours"
    with FileConnection(ident(server, "bob")) as c:
        c.download(info.id, tmp_path / "back.txt", force=False)
        assert [f.id for f in c.listing(None)[0]] == [info.id]
    assert (tmp_path / "back.txt").read_bytes() == shared.read_bytes()
