"""Display names in any script, one resolver for every command that takes a user, and profiles
written by their owner only (issue 18).

Every test runs on the embedded broker and on Mosquitto with its workers (tests/brokers.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imcli.broker.accounts import AccountStore
from imcli.broker.settings import BrokerSettings
from imcli.client import services
from imcli.core.names import is_display_name, label, name_keys, same_name
from imcli.core.wire import Profile, ProfileSet, Topics, decode_as, encode
from imcli.serve.host import BackgroundServer, ServeInfo
from tests import brokers
from tests.conftest import Cli, Proc, Raw, ident
from tests.rawmqtt import password_of, wait_until

broker_kind, broker_under_test, server, users = brokers.BOTH

CliFactory = Callable[[str], Cli]
T = Topics()


@pytest.fixture
def people(users: Callable[..., None], cli_as: CliFactory) -> dict[str, Cli]:
    users("alice", "bob", "carol")
    clis = {name: cli_as(name) for name in ("alice", "bob", "carol")}
    for name, cli in clis.items():
        cli.login(name)
    return clis


# ---------------------------------------------------------------- names, pure


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("alice", "\u0430lice"),  # a Cyrillic a
        ("alice", "ALICE"),
        ("alice", "A\u0399ice"),  # a Greek capital iota for the l
        ("alice", "AIice"),  # a Latin capital I for the l
        ("alice", "\uff41\uff4c\uff49\uff43\uff45"),  # full width: NFKC
        ("alice", "a1ice"),
        ("José", "JOSE\u0301"),  # an accent typed as a combining mark
        ("张三", "张三"),
    ],
)
def test_look_alike_names_are_the_same_name(a: str, b: str) -> None:
    assert same_name(a, b)


@pytest.mark.parametrize(("a", "b"), [("alice", "bob"), ("Ана", "ana"), ("张三", "张四"), ("Zoë", "Zoe")])
def test_different_names_stay_different(a: str, b: str) -> None:
    assert not same_name(a, b)
    assert name_keys(a).isdisjoint(name_keys(b))


@pytest.mark.parametrize("name", ["张三", "José", "Ελένη", "Ана", "Mary Ann", "O'Brien", "a.b-c_d", "x" * 32])
def test_names_in_any_script(name: str) -> None:
    assert is_display_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        " lead",
        "trail ",
        "two  spaces",
        "x" * 33,
        "evil\u202eeman",  # a bidi override
        "zero\u200bwidth",
        "\u3164",  # a Hangul filler: draws nothing
        "line\nfeed",
        "esc\x1b[31m",
        "-dash",
        "e\u0301\u0301\u0301",  # three marks on one letter
        "tab\there",
        "a/b",
        "a#b",
    ],
)
def test_names_that_do_not_draw_as_themselves_are_refused(name: str) -> None:
    assert not is_display_name(name)


def test_a_label_shows_the_account_when_the_name_differs() -> None:
    assert label("zhang", "张三") == "张三 (@zhang)"
    assert label("bob", "bob") == "bob"
    assert label("bob", None) == "bob"


# ---------------------------------------------------------------- names over the wire


def test_any_script_name_is_taken_by_one_and_every_command_resolves_it(people: dict[str, Cli]) -> None:
    alice, bob = people["alice"], people["bob"]
    assert alice("profile", "set", "--name", "张三").exit_code == 0
    taken = bob("rename", "张三")
    assert taken.exit_code == 1 and taken.stderr.startswith("Error: the name '张三' is taken")
    like_alice = bob("rename", "\u0430lice")  # a Cyrillic a: would pass as the account alice
    assert like_alice.exit_code == 1 and "is taken" in like_alice.stderr

    sent = bob("dm", "张三", "你好")
    assert sent.exit_code == 0 and sent.stdout.strip() == "sent to 张三 (@alice)"
    history = alice("history", "@bob", "--json")
    assert [json.loads(line)["text"] for line in history.stdout.splitlines()] == ["你好"]
    mine = bob("history", "@张三", "--json")  # by display name, as dm takes it
    lines = [json.loads(line) for line in mine.stdout.splitlines()]
    assert [(m["from"], m["to"], m.get("to_nick")) for m in lines] == [("bob", "alice", "张三")]
    shown = bob("history", "@张三")
    assert "→ 张三 (@alice)" in shown.stdout

    added = bob("friend", "add", "张三")
    assert added.exit_code == 0 and added.stdout.strip() == "asked 张三 (@alice) to be your friend"
    assert alice("friend", "accept", "@bob").exit_code == 0
    assert [f["name"] for f in json.loads(bob("friend", "list", "--json").stdout)["friends"]] == ["张三"]

    unknown = bob("dm", "nobody-by-that-name", "hi")
    assert unknown.exit_code == 1 and unknown.stderr.startswith("Error: unknown user")


def test_who_all_lists_accounts_never_seen_online(people: dict[str, Cli]) -> None:
    listed = json.loads(people["alice"]("who", "--all", "--json").stdout)
    by_account = {u["account"]: u for u in listed}
    assert {"alice", "bob", "carol"} <= by_account.keys()
    assert by_account["carol"]["state"] == "offline" and by_account["carol"]["since"] == 0
    assert "never online" in people["alice"]("who", "--all").stdout


# ---------------------------------------------------------------- profiles


def test_profile_set_and_show(people: dict[str, Cli]) -> None:
    alice, bob = people["alice"], people["bob"]
    done = alice("profile", "set", "--name", "Ελένη", "--signature", "καλημέρα", "--about", "line one\nline two")
    assert done.exit_code == 0, done.stderr
    shown = json.loads(bob("profile", "show", "ελένη", "--json").stdout)  # resolved by name, any case
    assert (shown["account"], shown["name"], shown["signature"]) == ("alice", "Ελένη", "καλημέρα")
    assert shown["about"] == "line one\nline two"
    text = bob("profile", "show", "alice").stdout.splitlines()
    assert text[0] == "Ελένη (@alice)" and "  “καλημέρα”" in text
    cleared = alice("profile", "set", "--signature", "")
    assert cleared.exit_code == 0
    assert json.loads(bob("profile", "show", "alice", "--json").stdout)["signature"] == ""
    assert json.loads(alice("profile", "show", "--json").stdout)["name"] == "Ελένη"  # one's own by default
    listed = {u["account"]: u for u in json.loads(bob("who", "--all", "--json").stdout)}
    assert listed["alice"]["nick"] == "Ελένη"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--signature", "two\nlines"], "Error: invalid signature"),
        (["--signature", "x" * 121], "Error: invalid signature"),
        (["--about", "bell\x07"], "Error: invalid about text"),
        (["--name", "evil\u202eeman"], "Error: invalid display name"),
        ([], "Error: nothing to change"),
    ],
)
def test_bad_profile_input_is_one_error_line(people: dict[str, Cli], args: list[str], error: str) -> None:
    result = people["alice"]("profile", "set", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_profile_show_of_an_unknown_user_is_an_error(people: dict[str, Cli]) -> None:
    result = people["alice"]("profile", "show", "nobody")
    assert result.exit_code == 1 and result.stderr.startswith("Error: unknown user 'nobody'")


def test_a_profile_is_written_by_its_owner_only(
    people: dict[str, Cli], server: ServeInfo, raw: Callable[..., Raw]
) -> None:
    alice = people["alice"]
    assert alice("profile", "set", "--signature", "the real one").exit_code == 0
    mallory = raw("bob", password_of("bob"), client_id="bob:raw")
    forged = encode(Profile(account="alice", name="alice", signature="forged by bob"))
    mallory.publish(T.profile("alice"), forged, retain=True)  # straight onto alice's record
    mallory.publish(T.profile("bob"), encode(Profile(account="bob", name="bob", signature="self-made")), retain=True)
    # a request names no one: the broker checks its <from> level, the worker changes that account's profile
    mallory.publish(T.request("bob", "corr1"), encode(ProfileSet(signature="bob's own")))
    reader = raw("carol", password_of("carol"), client_id="carol:raw")
    reader.subscribe(T.profile_filter())
    assert wait_until(lambda: services.whois(ident(server, "carol"), "bob").profile.signature == "bob's own", 10)
    records = {p.account: p for p in (decode_as(bytes(m.payload), Profile) for m in reader.silent(1.0))}
    assert records["alice"].signature == "the real one"
    assert records["bob"].signature == "bob's own"
    assert services.whois(ident(server, "carol"), "alice").profile.signature == "the real one"


def test_a_friends_profile_change_reaches_them_as_an_event(
    people: dict[str, Cli], server: ServeInfo, procs: Callable[..., Proc]
) -> None:
    alice, bob = people["alice"], people["bob"]
    assert alice("friend", "add", "bob").exit_code == 0
    assert bob("friend", "accept", "alice").exit_code == 0
    listener = procs("listen", "--json", env={"IMCLI_CONFIG_DIR": str(bob.config_dir)})
    assert wait_until(lambda: "bob" in {u.account for u in services.who(ident(server, "alice"))}, 10)
    assert people["carol"]("profile", "set", "--signature", "not a friend of bob").exit_code == 0
    assert alice("profile", "set", "--signature", "new days").exit_code == 0
    events: list[dict[str, str]] = []
    while not events:
        line = json.loads(listener.line(timeout=20))
        if line["kind"] == "event" and "profile" in line["text"]:
            events.append(line)
    assert events[0]["from"] == "alice"
    assert events[0]["text"] == "alice changed their profile: signature “new days”"


@brokers.EMBEDDED_ONLY  # imcli serve's own restart; Mosquitto keeps retained messages in its persistence file
def test_profiles_survive_a_restart(tmp_path: Path, broker_kind: str) -> None:
    settings = BrokerSettings(data_dir=tmp_path / "durable", port=0)
    with BackgroundServer(settings) as info:
        store = AccountStore(info.data_dir)
        for name in ("alice", "bob"):
            store.add(name, password_of(name))
        services.set_profile(ident(info, "alice"), name="José", signature="hola", about="de Madrid")
        port = info.address.port
    with BackgroundServer(BrokerSettings(data_dir=tmp_path / "durable", port=port)) as info:
        found = services.whois(ident(info, "bob"), "jose\u0301")
        assert (found.profile.account, found.profile.name, found.profile.signature) == ("alice", "José", "hola")
        assert found.profile.about == "de Madrid"


# ---------------------------------------------------------------- avatars, through the files worker


def _png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path, "PNG")
    return path


def test_an_avatar_is_a_file_with_its_thumbnail_in_the_profile(people: dict[str, Cli], tmp_path: Path) -> None:
    alice, bob = people["alice"], people["bob"]
    done = alice("profile", "set", "--avatar", str(_png(tmp_path / "me.png")))
    assert done.exit_code == 0, done.stderr
    shown = json.loads(bob("profile", "show", "alice", "--json").stdout)
    avatar = shown["avatar"]
    assert avatar["media_type"] == "image/png" and avatar["thumbnail"]
    fetched = bob("get", avatar["file"], "--output", str(tmp_path / "got.png"))  # anyone signed in may fetch it
    assert fetched.exit_code == 0, fetched.stderr
    assert (tmp_path / "got.png").read_bytes() == (tmp_path / "me.png").read_bytes()
    assert f"imcli get {avatar['file']}" in bob("profile", "show", "alice").stdout


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: p.write_text("not an image") or p, "is not a PNG, JPEG, GIF or WebP image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(6 << 20)) or p, "more than 5 MiB"),
        (lambda p: p, "Error: no file"),
    ],
)
def test_a_bad_avatar_is_one_error_line(
    people: dict[str, Cli], tmp_path: Path, make: Callable[[Path], Path], error: str
) -> None:
    path = tmp_path / "avatar.png"
    make(path)
    result = people["alice"]("profile", "set", "--avatar", str(path))
    assert result.exit_code == 1 and error in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- imcli chat


@brokers.EMBEDDED_ONLY  # the chat session's logic, over one Listener: the broker is not what is tested
def test_chat_whois_nick_and_dm_by_display_name(
    server: ServeInfo, users: Callable[..., None], broker_kind: str
) -> None:
    from imcli.cli.chat_commands import Note
    from imcli.cli.chat_session import ChatSession
    from imcli.cli.chat_state import ChatState
    from imcli.cli.render import received_line
    from imcli.client.listener import Listener
    from imcli.core.wire import Received

    users("alice", "bob")
    services.set_profile(ident(server, "alice"), signature="在这里")
    with Listener(ident(server, "bob", "laptop"), session="laptop") as listener:
        bob = ChatSession(ident(server, "bob", "laptop"), ChatState(), listener)
        renamed = bob.handle("/nick Bob the Builder")  # a display name with spaces
        assert [o.text for o in renamed] == ["you are now known as Bob the Builder"]
        assert services.rename(ident(server, "alice"), "张三") == "张三"
        whois = [o.text for o in bob.handle("/whois 张三") if isinstance(o, Note)]
        assert whois[0] == "张三 (@alice)" and "  “在这里”" in whois
        bob.handle("/dm 张三")
        assert str(bob.here) == "@alice"
        (echo,) = bob.handle("你好")
        assert isinstance(echo, Received)
        line = received_line(echo, "bob").plain
        assert "Bob the Builder (@bob) → 张三 (@alice): 你好" in line
        missing = bob.handle("/whois nobody")
        assert next(o.text for o in missing if isinstance(o, Note)).startswith("unknown user 'nobody'")


def test_emoji_sequences_through_the_cli_and_hidden_characters_refused_in_one_line(people: dict[str, Cli]) -> None:
    """Issue 18: ZWJ sequences, skin tones, keycaps and flags in a display name, a signature and
    a moment, shown as themselves; a zero-width space or a bidi override is one Error line."""
    alice = people["alice"]
    family, pride, thumb = (
        "\U0001f469\u200d\U0001f469\u200d\U0001f467",
        "\U0001f3f3\ufe0f\u200d\U0001f308",
        "\U0001f44d\U0001f3fd",
    )
    name, signature = f"Ann {family}", f"{pride} {thumb} 1\ufe0f\u20e3 \U0001f1ef\U0001f1f5"
    assert alice("profile", "set", "--name", name, "--signature", signature).exit_code == 0
    shown = json.loads(alice("profile", "show", "--json").stdout)
    assert (shown["name"], shown["signature"]) == (name, signature)
    text = alice("profile", "show").stdout
    assert f"{name} (@alice)" in text and signature in text
    posted = alice("moments", "post", f"family {family}")
    assert posted.exit_code == 0, posted.stderr
    assert json.loads(alice("moments", "--json").stdout)["moments"][0]["text"] == f"family {family}"
    for args, error in (
        (["profile", "set", "--signature", "zero\u200bwidth"], "Error: invalid signature"),
        (["profile", "set", "--name", "evil\u202eeman"], "Error: invalid"),
        (["moments", "post", f"a\u200d{family}"], "Error: invalid moment text"),
    ):
        refused = alice(*args)
        assert refused.exit_code == 1 and refused.stderr.startswith(error), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_a_profile_stored_before_the_avatar_bound_reads_without_its_avatar_and_says_why() -> None:
    """A profile record written before thumbnails were bounded (commit ea1c7fb) with a larger one
    read as malformed as a whole (its signature and about lost, in the presence worker's rebuild and
    every reader's decode): now it reads without the avatar, and ``profile show`` says why."""
    import base64

    from imcli.cli.profile import whois_lines

    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (8000).to_bytes(4, "big") * 2
    big = base64.b64encode(header + bytes(20)).decode()
    record = {
        "type": "profile", "v": 1, "account": "bob", "name": "Bob", "signature": "hi", "about": "me",
        "avatar": {"file": "f" * 24, "media_type": "image/png", "thumbnail": big},
    }  # fmt: skip
    profile = decode_as(json.dumps(record).encode(), Profile)
    assert (profile.signature, profile.about, profile.avatar) == ("hi", "me", None)
    assert "at most 320 pixels a side" in profile.avatar_refused
    # the presence worker answers from its records: the avatar goes on as it came, each reader says why
    from imcli.core.wire import ProfileList

    sent_on = decode_as(encode(ProfileList(id="x", profiles=[profile])), ProfileList).profiles[0]
    assert sent_on.avatar is None and sent_on.avatar_refused == profile.avatar_refused
    assert json.loads(encode(profile.model_copy(update={"avatar": None}))).get("avatar") is None  # cleared since
    lines = whois_lines(services.Whois(sent_on, None))
    assert lines[-1].startswith("  avatar not shown: ") and "320 pixels" in lines[-1], lines
    with pytest.raises(ValueError):  # anything else wrong is still malformed
        decode_as(json.dumps({**record, "signature": 5}).encode(), Profile)
    assert decode_as(json.dumps({**record, "avatar": None}).encode(), Profile).avatar_refused == ""
