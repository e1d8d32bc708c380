"""Files and images (issue 16): send, list and get through the embedded broker and the files worker."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imcli.client.files import FileConnection
from imcli.client.services import Conversation
from imcli.core.wire import ChatMessage, FileInfo, Topics, decode_as
from imcli.serve.host import ServeInfo
from tests import brokers
from tests.conftest import Cli, ident
from tests.rawmqtt import Raw, password_of

T = Topics()

broker_kind, broker_under_test, server, users = brokers.BOTH


def write(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (different for each seed)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return path


def png(path: Path, width: int = 64, height: int = 48) -> Path:
    from PIL import Image

    Image.new("RGB", (width, height), (200, 30, 30)).save(path, "PNG")
    return path


def logged_in(cli_as: Callable[[str], Cli], users: Callable[..., None], *names: str) -> list[Cli]:
    users(*names)
    clis = [cli_as(n) for n in names]
    for cli, name in zip(clis, names, strict=True):
        cli.login(name)
    return clis


def file_id(output: str) -> str:
    return output.strip().splitlines()[-1].rsplit(": ", 1)[1]


def test_send_to_a_person_and_get_it_back(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    alice, bob = logged_in(cli_as, users, "alice", "bob")
    source = write(tmp_path / "report.bin", 200_000)
    sent = alice("send", "bob", str(source))
    assert sent.exit_code == 0, sent.output
    assert sent.output.startswith("sent report.bin (195.3 KiB) to @bob: ")
    fid = file_id(sent.output)
    listed = bob("files", "--json")
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.output)
    assert entry["id"] == fid and entry["name"] == "report.bin" and entry["size"] == 200_000
    assert entry["sender"] == "alice" and entry["place"] == "@alice"
    out = tmp_path / "got"
    out.mkdir()
    got = bob("get", fid, "-o", str(out))
    assert got.exit_code == 0, got.output
    assert (out / "report.bin").read_bytes() == source.read_bytes()
    again = bob("get", fid, "-o", str(out))
    assert again.exit_code == 1
    assert again.output.startswith("Error: ") and "exists" in again.output and "--force" in again.output
    assert bob("get", fid, "-o", str(out), "--force").exit_code == 0
    # the history lists the file message
    history = bob("history", "@alice", "--json")
    assert history.exit_code == 0, history.output
    [line] = [json.loads(x) for x in history.output.splitlines()]
    assert line["file"]["id"] == fid and line["file"]["name"] == "report.bin" and line["from"] == "alice"
    assert fid in line["text"]


def test_get_says_the_path_as_it_was_given(
    server: ServeInfo,
    users: Callable[..., None],
    cli_as: Callable[[str], Cli],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``imcli get`` says where it wrote the file the way the user named the place: without ``-o``
    the bare name (it said the absolute path there, and the relative one given ``-o``), with a
    directory or a file as typed, relative or absolute."""
    alice, bob = logged_in(cli_as, users, "alice", "bob")
    fid = file_id(alice("send", "bob", str(write(tmp_path / "r.bin", 1000))).output)
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here)
    said = {}
    for args in ([], ["-o", "."], ["-o", "sub"], ["-o", "sub/renamed.bin"], ["-o", str(here / "sub")]):
        got = bob("get", fid, *args, "--force")
        assert got.exit_code == 0, got.output
        said[" ".join(args)] = got.stdout.strip().removesuffix(" (1000 bytes)")
    assert said == {
        "": "saved r.bin",
        "-o .": "saved r.bin",
        "-o sub": "saved sub/r.bin",
        "-o sub/renamed.bin": "saved sub/renamed.bin",
        f"-o {here / 'sub'}": f"saved {here / 'sub' / 'r.bin'}",
    }
    assert (
        (here / "r.bin").read_bytes()
        == (here / "sub" / "renamed.bin").read_bytes()
        == (tmp_path / "r.bin").read_bytes()
    )
    assert not list(here.glob(".*.part")), "no partial file is left beside it"


def test_get_force_overwrites_only_a_regular_file(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    """``--force`` replaced whatever had the name: ``imcli get ID -o /dev/null --force`` (run as
    root) put a regular file where the device was; a fifo or a socket went the same way. Only a
    regular file (or a link, which is replaced, never followed) is overwritten; anything else is
    one error line and stays as it was."""
    alice, bob = logged_in(cli_as, users, "alice", "bob")
    fid = file_id(alice("send", "bob", str(write(tmp_path / "r.bin", 1000))).output)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = bob("get", fid, "-o", str(fifo), "--force")
    assert refused.exit_code == 1
    assert refused.stderr == f"Error: {fifo} is not a regular file (give -o a file or a directory)\n"
    assert fifo.is_fifo() and not list(tmp_path.glob(".*.part"))
    (tmp_path / "real").write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    assert bob("get", fid, "-o", str(link), "--force").exit_code == 0
    assert not link.is_symlink() and link.read_bytes() == (tmp_path / "r.bin").read_bytes()
    assert (tmp_path / "real").read_bytes() == b"old"


def test_same_content_is_kept_once(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    (alice,) = logged_in(cli_as, users, "alice")
    source = write(tmp_path / "a.bin", 50_000, seed=3)
    copy = tmp_path / "b.bin"
    copy.write_bytes(source.read_bytes())
    assert alice("send", "--room", "lobby", str(source)).exit_code == 0
    assert alice("send", "--room", "dev", str(copy)).exit_code == 0
    blobs = [p for p in (server.data_dir / "files" / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [hashlib.sha256(source.read_bytes()).hexdigest()]
    assert len(json.loads(alice("files", "--json").output)) == 2


def test_image_gets_a_thumbnail_in_its_message(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], tmp_path: Path
) -> None:
    users("alice", "bob")
    watcher = raw("bob", password_of("bob"), "bob:watch")
    watcher.subscribe(T.dm_filter("bob"))
    picture = png(tmp_path / "holiday.dat")  # a PNG by content, whatever its name says
    with FileConnection(ident(server, "alice")) as c:
        where = Conversation("dm", "bob")
        target = c.target(where)
        info = c.upload(picture, target)
        c.post(where, target, info)
    assert (info.mime, info.width, info.height) == ("image/png", 64, 48)
    message = decode_as(bytes(watcher.expect(T.dm("bob", "alice")).payload), ChatMessage)
    assert message.file is not None and message.file.id == info.id and message.file.thumb
    import base64

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(message.file.thumb))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 160


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p, "no file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b""), p)[1], "is empty"),
        (lambda p: (p.write_bytes(b"x"), p.chmod(0), p)[2], "cannot read"),
    ],
)
def test_bad_files_give_one_error_line(
    users: Callable[..., None],
    cli_as: Callable[[str], Cli],
    tmp_path: Path,
    make: Callable[[Path], Path],
    words: str,
) -> None:
    if words == "cannot read" and os.geteuid() == 0:
        pytest.skip("root reads anything")
    (alice,) = logged_in(cli_as, users, "alice")
    path = make(tmp_path / "thing")
    result = alice("send", "--room", "lobby", str(path))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ") and words in result.output


def test_a_file_whose_name_would_not_draw_as_itself_is_sent_under_a_plain_one(
    users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    """A local name with a terminal escape, a tab or a backslash is a file all the same (Linux takes
    any byte but '/'): it goes out under a name everyone sees as it is, not as a refusal."""
    alice, bob = logged_in(cli_as, users, "alice", "bob")
    sent = []
    for name in ("esc\x1b[2J.txt", "tab\tname.txt", "back\\slash.txt", "rtl\u202egnp.exe"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        result = alice("send", "bob", str(path))
        assert result.exit_code == 0, result.output
        sent.append(file_id(result.output))
    listed = {f["id"]: f["name"] for f in json.loads(bob("files", "--json").stdout)}
    assert [listed[i] for i in sent] == ["esc_[2J.txt", "tab_name.txt", "back_slash.txt", "rtl_gnp.exe"]


def test_unknown_id_and_binary_text(users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path) -> None:
    (alice,) = logged_in(cli_as, users, "alice", "bob")[:1]
    result = alice("get", "A" * 24)
    assert result.exit_code == 1 and result.output.startswith("Error: no file ") and result.output.count("\n") == 1
    for command, bad in (("get", ""), ("rm", " "), ("get", "a/b"), ("rm", "x" * 65), ("get", "\x1b[2J")):
        refused = alice(command, bad)
        assert refused.exit_code == 1 and refused.output.startswith("Error: invalid file id "), refused.output
        assert refused.output.count("\n") == 1 and "\x1b[" not in refused.output.replace("\\x1b", "")
    piped = alice("dm", "bob", "-", input=png(tmp_path / "p.png").read_bytes())  # type: ignore[arg-type]
    assert piped.exit_code == 1
    assert piped.output.startswith("Error: the input is not text") and "imcli send" in piped.output


def test_file_info_round_trips() -> None:
    info = FileInfo(id="x" * 24, name="a.txt", size=1, sha256="0" * 64)
    assert FileInfo.model_validate_json(info.model_dump_json()) == info


@brokers.EMBEDDED_ONLY  # the chat's own logic: the broker under it does not matter
def test_chat_sends_numbers_fetches_and_shows_files_in_one_line(
    server: ServeInfo, users: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import queue

    from imcli.cli.chat_files import file_text
    from imcli.cli.chat_session import ChatSession
    from imcli.cli.chat_state import ChatState
    from imcli.client.listener import Listener

    users("alice", "bob")
    picture = png(tmp_path / "cat.png", 300, 200)
    with (
        Listener(ident(server, "alice", "laptop"), session="laptop") as alice_in,
        Listener(ident(server, "bob", "laptop"), session="laptop") as bob_in,
    ):
        alice = ChatSession(ident(server, "alice", "laptop"), ChatState(), alice_in)
        bob = ChatSession(ident(server, "bob", "laptop"), ChatState(), bob_in)
        reports: queue.Queue[str] = queue.Queue()
        alice.files.emit = lambda outs: reports.put(outs[0].text)
        assert alice.handle("/dm bob")[0].text == "now talking in @bob"
        [started] = alice.handle(f"/send {picture}")
        assert started.text.startswith("sending cat.png (") and started.text.endswith(" to @bob…")
        assert reports.get(timeout=15).startswith("sent cat.png (")
        arrived = next(m for m in bob_in if m.file is not None)
        assert arrived.sender == "alice" and arrived.file is not None and arrived.file.thumb
        n = bob.files.number(arrived.file)
        assert file_text(arrived, n) == f"sent cat.png (300x200, {arrived.file.size} bytes) · /get 1 · /open 1"
        done: queue.Queue[str] = queue.Queue()
        bob.files.emit = lambda outs: done.put(outs[0].text)
        monkeypatch.chdir(tmp_path / "..")
        out_dir = tmp_path / "bob-got"
        out_dir.mkdir()
        assert bob.handle(f"/get 1 {out_dir}")[0].text.startswith("fetching cat.png")
        assert done.get(timeout=15) == f"saved {out_dir / 'cat.png'}"
        assert (out_dir / "cat.png").read_bytes() == picture.read_bytes()
        assert bob.handle("/get 2")[0].text == "no file 2 here (files are numbered 1 to 1)"
        assert "no file" in bob.handle("/send /nonexistent/x.png")[0].text


# the embedded broker's 16 KiB for replies: deploy/mosquitto's limit is 256 KiB (the files' chunks fill it),
# which a listing of 100 files (about 30 KiB) never reaches
@brokers.EMBEDDED_ONLY
# 70 uploads one after another: 76 s alone at load 30 on two cores, past 120 beside another worker
@pytest.mark.timeout(300)
def test_a_long_listing_fits_the_payload_limit_newest_first_kept(
    server: ServeInfo, users: Callable[..., None], tmp_path: Path
) -> None:
    users("alice")
    sent = []
    with FileConnection(ident(server, "alice")) as c:
        for i in range(70):  # about 300 bytes each in a listing: more than 16 KiB
            path = tmp_path / f"note-{i:02d}-{'x' * 40}.txt"
            path.write_text(f"note {i}")
            sent.append(c.upload(path, {"room": "lobby"}).id)
            # each upload's offer is a request, and requests share the account's publish rate
            # (Limits: 20/s, bursts of 60): 70 offers as fast as the broker answers them pass it
            # and the 70th is dropped unanswered. Paced under the rate: this test is the listing's.
            time.sleep(1 / 20)
        files, more = c.listing(None)
    assert more and 0 < len(files) < 70
    assert [f.id for f in files] == sent[-len(files) :]  # the newest, oldest first
    assert all(f.thumb is None for f in files)


def test_send_to_a_group_and_list_it_as_a_table(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    alice, bob, carol = logged_in(cli_as, users, "alice", "bob", "carol")
    from imcli.client import services

    services.group_request(ident(server, "alice"), "create", "team", private=True)
    services.group_request(ident(server, "alice"), "invite", "team", user="bob")
    plan = tmp_path / "plan.txt"
    plan.write_text("the plan\n")
    sent = alice("send", "#team", str(plan))
    assert sent.exit_code == 0 and sent.output.startswith("sent plan.txt (9 bytes) to #team: "), sent.output
    long = tmp_path / "the-quarterly-plan-for-every-team-final-version-2026-11.txt"  # wider than 80 columns, all told
    long.write_text("the long plan\n")
    assert alice("send", "#team", str(long)).exit_code == 0
    table = bob("files", "#team")
    assert table.exit_code == 0 and "plan.txt" in table.output and "#team" in table.output
    assert "9 bytes" in table.output and file_id(sent.output) in table.output
    assert long.name in table.output  # piped, a table is never cut to 80 columns (grep finds it)
    outsider = carol("send", "#team", str(plan))
    assert outsider.exit_code == 1 and outsider.output.startswith("Error: no group #team (or it is private)")
    hidden = carol("files", "#team")
    assert hidden.exit_code == 1 and hidden.output.startswith("Error: no group #team (or it is private)")


# textual-image 0.12 calls Pillow's getdata, deprecated in Pillow 13 (shown to nobody outside tests)
@pytest.mark.filterwarnings("ignore:Image.Image.getdata is deprecated:DeprecationWarning")
def test_previews_draw_the_thumbnail_and_stay_off_where_they_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console
    from textual_image.renderable.halfcell import Image as HalfcellImage

    from imcli.cli.chat_files import PREVIEW_CELLS, load_previewer
    from imcli.files.images import examine

    facts = examine(png(tmp_path / "p.png", 320, 200))
    assert facts.thumb is not None
    assert load_previewer() is None  # pytest's stdout is not a terminal
    monkeypatch.setenv("IMCLI_PREVIEW", "off")
    assert load_previewer() is None
    # what a terminal without Sixel or Kitty graphics gets: coloured half-blocks, PREVIEW_CELLS wide
    import base64

    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(facts.thumb)))
    console = Console(record=True, force_terminal=True, color_system="truecolor", width=80)
    console.print(HalfcellImage(picture, width=PREVIEW_CELLS, height="auto"))
    drawn = console.export_text(styles=True)
    assert "▀" in drawn and "38;2;200;30;30" in drawn  # upper half-blocks in the picture's 24-bit colour


@pytest.mark.parametrize(("size", "mode", "kind"), [((7000, 7000), "1", "PNG"), ((400, 10), "L", "JPEG"),
                                                 ((100, 100), "RGB", "PNG"), ((100, 100), "RGB", "GIF")])  # fmt: skip
def test_only_a_thumbnail_the_worker_could_have_made_is_drawn(size: tuple[int, int], mode: str, kind: str) -> None:
    """A file message is anyone's payload: its thumbnail is drawn only if it is a JPEG of at most
    PREVIEW_MAX_SIDE pixels a side, as the files worker makes them; a PNG of 7000 x 7000 one-bit
    pixels fits in THUMB_MAX characters and took 142 MB to draw. The worker's own still draws."""
    import base64

    from PIL import Image, UnidentifiedImageError

    from imcli.cli.chat_files import thumbnail_image
    from imcli.core.wire import THUMB_MAX

    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, kind, optimize=True)
    thumb = base64.b64encode(buf.getvalue()).decode()
    assert len(thumb) <= THUMB_MAX  # a file message may carry it
    with pytest.raises((ValueError, UnidentifiedImageError)):
        thumbnail_image(thumb)


def _b64_image(size: tuple[int, int], mode: str, kind: str) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, kind, optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_no_model_carries_a_thumbnail_a_worker_could_not_have_made(tmp_path: Path) -> None:
    """File messages, profiles and moments are anyone's payload: their thumbnails are refused as they
    are decoded (imcli.core.thumbnail) unless PNG or JPEG (file messages: JPEG) of at most 320 pixels
    a side; a 12 KiB avatar held a PNG of 8000 x 8000 pixels, which the presence worker kept."""
    from pydantic import ValidationError

    from imcli.core.thumbnail import image_size
    from imcli.core.wire import THUMBNAIL_MAX, Avatar, FileInfo
    from imcli.files.images import examine

    worker = examine(png(tmp_path / "p.png", 3200, 2000)).thumb
    assert worker is not None
    file = {"id": "f" * 24, "name": "x.png", "size": 1, "sha256": "0" * 64}
    assert FileInfo.model_validate({**file, "thumb": worker}).thumb == worker
    assert Avatar(file="f" * 24, media_type="image/png", thumbnail=worker).thumbnail == worker
    assert Avatar(file="f" * 24, media_type="image/png", thumbnail=_b64_image((64, 64), "RGB", "PNG"))
    huge = _b64_image((8000, 8000), "1", "PNG")
    assert len(huge) <= THUMBNAIL_MAX
    for thumb in (huge, _b64_image((400, 10), "L", "JPEG"), _b64_image((64, 64), "RGB", "PNG"), "not base64!",
                  worker[:40]):  # fmt: skip
        with pytest.raises(ValidationError):
            FileInfo.model_validate({**file, "thumb": thumb})
    for thumb in (huge, _b64_image((10, 400), "L", "JPEG"), _b64_image((64, 64), "RGB", "GIF")):
        with pytest.raises(ValidationError):
            Avatar(file="f" * 24, media_type="image/png", thumbnail=thumb)
    assert image_size(b"\xff\xd8\xff\xe0\x00\x10") is None  # a header cut short says nothing


def test_a_jpeg_with_a_second_frame_header_is_judged_by_the_larger() -> None:
    """A JPEG may carry several frame headers and a decoder may use any: a small one first and one
    of 8000 x 8000 after it is refused, as the largest (imcli.core.thumbnail; the page's smallImage
    reads them the same way); a frame header of height 0 (its height given later) is refused too."""
    import base64

    from pydantic import ValidationError

    from imcli.core.thumbnail import image_size, small_thumbnail
    from imcli.core.wire import FileInfo

    data = base64.b64decode(_b64_image((64, 64), "L", "JPEG"))
    sof = data.index(b"\xff\xc0")
    length = int.from_bytes(data[sof + 2 : sof + 4], "big")
    frame = bytearray(data[sof : sof + 2 + length])
    assert image_size(data) == ("jpeg", 64, 64)
    frame[5:9] = (8000).to_bytes(2, "big") + (8000).to_bytes(2, "big")
    forged = data[: sof + 2 + length] + bytes(frame) + data[sof + 2 + length :]
    assert image_size(forged) == ("jpeg", 8000, 8000)
    frame[5:9] = (0).to_bytes(2, "big") + (64).to_bytes(2, "big")
    no_height = data[:sof] + bytes(frame) + data[sof + 2 + length :]
    for bad in (forged, no_height):
        b64 = base64.b64encode(bad).decode()
        assert not small_thumbnail(b64)
        with pytest.raises(ValidationError):
            FileInfo.model_validate({"id": "f" * 24, "name": "x.jpg", "size": 1, "sha256": "0" * 64, "thumb": b64})


@given(st.binary(max_size=64))
def test_reading_an_image_header_never_raises(data: bytes) -> None:
    from imcli.core.thumbnail import image_size

    image_size(data)
    image_size(b"\xff\xd8" + data)


def test_the_workers_thumbnail_is_drawn(tmp_path: Path) -> None:
    from imcli.cli.chat_files import thumbnail_image
    from imcli.files.images import examine

    facts = examine(png(tmp_path / "p.png", 3200, 2000))
    assert facts.thumb is not None
    assert thumbnail_image(facts.thumb).size == (160, 100)


def test_file_ids_never_read_as_options() -> None:
    """A url-safe id may start with '-', which ``imcli get ID`` would take for an option (CI saw it)."""
    from imcli.files.worker import unguessable_id

    ids = [unguessable_id(18) for _ in range(5000)]
    assert not any(i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids) and all(len(i) == 24 for i in ids)


def test_the_sender_deletes_a_file_and_its_content_goes_with_the_last_copy(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    alice, bob = logged_in(cli_as, users, "alice", "bob")
    note = tmp_path / "note.txt"
    note.write_text("sent twice\n")
    first = file_id(alice("send", "--room", "lobby", str(note)).output)
    second = file_id(alice("send", "bob", str(note)).output)

    def blobs() -> list[Path]:
        return sorted(tmp_path.rglob("files/blobs/*/*"))

    assert len(blobs()) == 1  # one content, kept once
    gone = alice("rm", first)
    assert gone.exit_code == 0, gone.output
    assert gone.output == f"deleted note.txt ({first}) (the same content sent again is kept for that one)\n"
    listed = bob("files").output
    assert first not in listed and second in listed
    assert len(blobs()) == 1
    refused = bob("get", first, "-o", str(tmp_path / "back.txt"))
    assert refused.exit_code == 1 and refused.output.startswith(f"Error: no file {first} (or you may not fetch it)")
    last = alice("rm", second)
    assert last.exit_code == 0 and last.output == f"deleted note.txt ({second})\n"
    assert blobs() == []
    again = alice("rm", second)
    assert again.exit_code == 1 and again.output.count("\n") == 1
    assert again.output.startswith(f"Error: no file {second} of yours (see your files with 'imcli files')")


def test_a_file_name_with_terminal_controls_is_shown_inert_when_sent_listed_and_deleted(
    users: Callable[..., None], cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    """A name on disk may hold any byte but / and NUL: every line that shows it goes through ``safe``."""
    (alice,) = logged_in(cli_as, users, "alice")
    hostile = tmp_path / "red\x1b[31m\x1b]0;owned\x07\r\n\u2028\u2066\u202eexe.txt<b>"
    hostile.write_text("x\n")
    sent = alice("send", "--room", "lobby", str(hostile))
    assert sent.exit_code == 0, sent.output
    listed = alice("files")
    gone = alice("rm", file_id(sent.output))
    assert gone.exit_code == 0, gone.output
    for result in (sent, listed, gone):
        assert not {"\x1b", "\x07", "\r", "\u2028", "\u2066", "\u202e"} & set(result.output), repr(result.output)
        assert result.output.count("\n") == 1 or result is listed, repr(result.output)  # one line each
