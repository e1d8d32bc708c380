"""``imcli say``'s fast path (imcli/cli/main.py, issue 7).

The console script reads the plain form of ``say`` itself and sends it without Typer or
pydantic. These tests hold it to that promise: it reads exactly what Typer's ``say`` reads
or steps aside (over generated argument lists), its bytes are the ``ChatMessage`` the rest
of imcli sends, it reaches a real broker and fails like every command, and it imports none
of the heavy libraries.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imcli.cli import say as fast_say
from imcli.cli.app import app
from imcli.cli.say import SayArgs, parse_say
from imcli.core.topics import chat_line
from imcli.core.wire import ChatMessage, decode_as, encode
from imcli.serve.host import ServeInfo
from tests.conftest import Cli, Raw

# what people type, and what must send the parser back to Typer
NOT_UTF8 = "h\udcff"  # the byte 0xff in argv or the environment, as Python decodes it
TEXTS = ["hi", "-", "", "x y", "héllo", "@bob look", "say", "dev", "1883", NOT_UTF8]
OPTIONS = ["--room", "-r", "--host", "--port"]
VALUES = ["dev", "Bad Room", "h2", "1884", "08", "0", "99999", "+5", "", "-x", "lobby", NOT_UTF8]
JUNK = ["--", "--help", "-h", "-rdev", "--ro", "--ROOM", "-x", "-5", "-r=dev"]


@st.composite
def arguments(draw: st.DrawFn) -> list[str]:
    """Mostly plain ``say`` forms (a text, each option at most once, in any order), some of
    them spoilt by a repeated option, a second text or an argument only Typer knows."""
    pieces = [[draw(st.sampled_from(TEXTS))]]
    for option, value in draw(st.dictionaries(st.sampled_from(OPTIONS), st.sampled_from(VALUES), max_size=3)).items():
        pieces.append([f"{option}={value}"] if draw(st.booleans()) else [option, value])
    pieces += [[extra] for extra in draw(st.lists(st.sampled_from([*JUNK, *TEXTS, *OPTIONS, *VALUES]), max_size=1))]
    return [arg for piece in draw(st.permutations(pieces)) for arg in piece]


ENVIRONMENTS = st.fixed_dictionaries(
    {},
    optional={
        "IMCLI_HOST": st.sampled_from(["h1", "", NOT_UTF8]),
        "IMCLI_PORT": st.sampled_from(["1999", "abc", "", "0012"]),
    },
)


def typer_reads(argv: list[str], env: dict[str, str]) -> SayArgs | None:
    """What Typer's ``say`` command passes on for ``argv``, or ``None`` if Typer refuses it."""
    seen: list[SayArgs] = []

    def record(args: SayArgs) -> str:
        seen.append(args)
        return "room"

    with patch.object(fast_say, "run_say", record):
        result = CliRunner().invoke(app, argv, env={"IMCLI_HOST": None, "IMCLI_PORT": None, **env})
    return seen[0] if result.exit_code == 0 and seen else None


@settings(max_examples=400, deadline=None)
@given(arguments(), ENVIRONMENTS)
def test_the_fast_path_reads_what_typer_reads_or_steps_aside(args: list[str], env: dict[str, str]) -> None:
    argv = ["say", *args]
    fast = parse_say(argv, env)
    if fast is not None:
        assert typer_reads(argv, env) == fast, argv


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["say", "hi"], {}, SayArgs("hi")),
        (["say", "-"], {}, SayArgs("-")),
        (["say", "hi", "-r", "dev"], {}, SayArgs("hi", room="dev")),
        (["say", "--room=dev", "two words", "--port", "1884"], {}, SayArgs("two words", room="dev", port=1884)),
        (["say", "hi", "--host", "h2"], {"IMCLI_HOST": "h1", "IMCLI_PORT": "1999"}, SayArgs("hi", None, "h2", 1999)),
    ],
)
def test_the_plain_forms_take_the_fast_path(argv: list[str], env: dict[str, str], expected: SayArgs) -> None:
    assert parse_say(argv, env) == expected
    assert typer_reads(argv, env) == expected


@pytest.mark.parametrize(
    "argv",
    [[], ["dm", "bob", "hi"], ["say"], ["say", "--help"], ["say", "a", "b"], ["say", "-r", "x", "-r", "y", "hi"]],
)
def test_everything_else_goes_to_typer(argv: list[str]) -> None:
    assert parse_say(argv, {}) is None


@settings(max_examples=300)
@given(
    st.text(min_size=1),
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    st.floats(min_value=1e9, max_value=4e9, allow_nan=False),
)
def test_chat_line_is_the_chat_message_to_the_byte(text: str, message_id: str, ts: float) -> None:
    line = chat_line(text, message_id=message_id, ts=ts)
    message = ChatMessage(text=text, id=message_id, ts=ts)
    assert line == encode(message)
    assert decode_as(line, ChatMessage) == message


# ---------------------------------------------------------------- the console script, as a process


def imcli(config: Path, *args: str, stdin: str = "", code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "imcli", *args]
    env = {**os.environ, "IMCLI_CONFIG_DIR": str(config)}
    return subprocess.run(command, env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_say_reaches_the_room_as_the_signed_in_user(
    server: ServeInfo, users: Callable[..., None], raw: Callable[..., Raw], cli_as: Callable[[str], Cli]
) -> None:
    users("alice", "bob")
    alice = cli_as("alice")
    alice.login("alice")
    bob = raw("bob", client_id="bob:phone")
    assert bob.subscribe("im/room/+/+") == 1

    sent = imcli(alice.config_dir, "say", "hello from the fast path", "-r", "dev")
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, "sent to dev\n", "")
    got = bob.expect("im/room/dev/alice")
    assert decode_as(bytes(got.payload), ChatMessage).text == "hello from the fast path"

    piped = imcli(alice.config_dir, "say", "-", stdin="piped line\n")
    assert (piped.returncode, piped.stdout) == (0, "sent to lobby\n")
    assert decode_as(bytes(bob.expect("im/room/lobby/alice").payload), ChatMessage).text == "piped line"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("say", "hi", "-r", "Bad"), "Error: invalid room name 'Bad'"),
        (("say", ""), "Error: empty message"),
        (("say", "x" * 20000), "Error: message too long"),
        (("say", "hi", "--port", "1"), "Error: cannot reach the broker"),
    ],
)
def test_say_fails_with_one_line(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli], args: tuple[str, ...], message: str
) -> None:
    users("alice")
    alice = cli_as("alice")
    alice.login("alice")
    result = imcli(alice.config_dir, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("say", "hi", "--host", NOT_UTF8), {}),
        (("say", "hi", "-r", NOT_UTF8), {}),
        (("say", NOT_UTF8), {}),
        (("say", "hi"), {"IMCLI_HOST": NOT_UTF8}),
        (("dm", "bob", "hi", "--host", NOT_UTF8), {}),
    ],
)
def test_an_argument_that_is_not_text_is_a_usage_error_on_every_path(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    """The fast ``say`` steps aside for what Typer refuses: one line, exit code 2, as every command."""
    with patch.dict(os.environ, env):
        result = imcli(tmp_path / "nobody", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: invalid value for"), result.stderr
    assert "not UTF-8 text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_say_without_a_login_says_so(tmp_path: Path) -> None:
    result = imcli(tmp_path / "nobody", "say", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: not logged in"), result.stderr


HEAVY = ("typer", "click", "pydantic", "pydantic_core", "rich", "prompt_toolkit", "amqtt", "sqlite3")
REPORT_MODULES = f"""
import atexit, sys
heavy = {HEAVY!r}
atexit.register(lambda: print(sorted({{m.split('.')[0] for m in sys.modules}} & set(heavy)), file=sys.stderr))
sys.argv = ["imcli", *sys.argv[1:]]
from imcli.cli.main import main
main()
"""


def test_say_imports_nothing_it_does_not_use(
    server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]
) -> None:
    users("alice")
    alice = cli_as("alice")
    alice.login("alice")
    said = imcli(alice.config_dir, "say", "hi", code=REPORT_MODULES)
    assert (said.returncode, said.stdout, said.stderr) == (0, "sent to lobby\n", "[]\n")
    # the check can fail: a command that goes through Typer reports what it loaded
    helped = imcli(alice.config_dir, "say", "--help", code=REPORT_MODULES)
    assert helped.returncode == 0
    assert "typer" in helped.stderr.splitlines()[-1]
