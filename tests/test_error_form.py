"""Every expected failure says ``Error: <what happened> (<what to do>)`` in one line (issue 22).

The command tree is walked, not listed: a command added later is walked too. Each command is
run wrong in each way a person runs it wrong (an unknown option, missing arguments, invalid
and unknown names, not logged in, no broker, no password), and whatever fails must fail in
that form, with no traceback.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import Result

from imcli.core.errors import ImcliError, InvalidInput
from imcli.core.mqtt import BrokerAddress
from imcli.serve.host import ServeInfo
from tests.clitree import COMMANDS
from tests.conftest import Cli, password_of

FORM = re.compile(r"Error: \S.* \(\S.*\)")
RUNS_UNTIL_STOPPED = {"serve", "workers", "presence", "listen"}  # walked with wrong options only


def required_arguments(command: object) -> int:
    params: list[Any] = command.params  # type: ignore[attr-defined]
    return sum(1 for p in params if p.param_type_name == "argument" and p.required)


def has_option(command: object, name: str) -> bool:
    return any(name in getattr(p, "opts", ()) for p in command.params)  # type: ignore[attr-defined]


def assert_form(result: Result, what: str) -> None:
    assert "Traceback" not in result.output + result.stderr, f"{what}: {result.stderr}"
    if result.exit_code == 0:
        return
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and FORM.fullmatch(lines[0]), f"{what} (exit {result.exit_code}): {result.stderr!r}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_error_type_requires_a_hint() -> None:
    with pytest.raises(TypeError):
        InvalidInput("something happened")  # type: ignore[call-arg]
    assert str(ImcliError("it broke", "do this")) == "it broke (do this)"


def test_the_walk_reaches_every_command() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"say", "dm", "register", "group invite", "friend add", "admin user add", "config set"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_error_of_every_command_has_the_form(
    path: tuple[str, ...],
    command: object,
    server: ServeInfo,
    users: Callable[..., None],
    cli_as: Callable[[str], Cli],
    tmp_path: Path,
) -> None:
    users("alice")
    env = {"IMCLI_DATA_DIR": str(tmp_path / "admin-data"), "IMCLI_REQUEST_TIMEOUT": "3", "IMCLI_PASSWORD": ""}
    stranger, alice = cli_as("nobody-logged-in"), cli_as("alice")
    alice.login("alice")
    words = list(path)

    usage = stranger(*words, "--no-such-option", env=env)
    assert usage.exit_code == 2
    assert_form(usage, "an unknown option")
    if required_arguments(command):
        missing = stranger(*words, env=env)
        assert missing.exit_code == 2
        assert_form(missing, "no arguments")
    if path[0] in RUNS_UNTIL_STOPPED:
        return

    for name in ("Bad Name", "nobody", ""):
        args = [*words, *[name] * required_arguments(command)]
        assert_form(stranger(*args, env=env, input=""), f"{args}, not logged in")
        assert_form(alice(*args, env=env, input=""), f"{args}, as alice")
        if has_option(command, "--port"):
            down = alice(*args, "--port", str(closed_port()), env=env, input="")
            assert_form(down, f"{args}, no broker")
        if has_option(command, "--password-stdin"):
            assert_form(stranger(*args, "--password-stdin", env=env, input="\n"), f"{args}, empty stdin")
            short = stranger(*args, "--password-stdin", *port_of(server), env=env, input="short\n")
            assert_form(short, f"{args}, a short password")


def text_parameters(command: object) -> list[Any]:
    """The parameters of ``command`` that take text (``str``, or a list of it), paths not among them."""
    found = []
    for param in command.params:  # type: ignore[attr-defined]
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        kinds = typing.get_args(annotation) or (annotation,)
        if (str in kinds or list[str] in kinds) and param.name != "host":  # --host: tests above
            found.append(param)
    return found


NOT_UTF8 = "a\udcffb"  # what `imcli dm bob $'a\xffb'` passes: a byte that is not UTF-8 as a lone surrogate
TEXT_PARAMETERS = [
    (path, c, p) for path, c in COMMANDS if path[0] not in RUNS_UNTIL_STOPPED for p in text_parameters(c)
]


def test_the_walk_finds_the_text_parameters() -> None:
    found = {(" ".join(path), p.name) for path, _, p in TEXT_PARAMETERS}
    assert {("dm", "text"), ("profile set", "signature"), ("get", "file_id"), ("moments post", "text")} <= found


@pytest.fixture
def alice(server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]) -> Cli:
    """alice's CLI, logged in to the test's broker."""
    users("alice")
    cli = cli_as("alice")
    cli.login("alice")
    return cli


TEXT_COMMANDS = [(path, c) for path, c in COMMANDS if path[0] not in RUNS_UNTIL_STOPPED and text_parameters(c)]


@pytest.mark.parametrize(("path", "command"), TEXT_COMMANDS, ids=[" ".join(p) for p, _ in TEXT_COMMANDS])
def test_text_that_is_not_utf8_is_one_error_line_in_every_text_parameter(
    path: tuple[str, ...], command: object, alice: Cli
) -> None:
    """``imcli dm bob $'\xff'``, ``group say``, ``profile set --signature``, ``moments post``, ``get``
    and ``rm`` were tracebacks (pydantic refused or could not encode the lone surrogate): each text
    parameter of each command refuses such text in one line, naming the parameter; ``send``'s file
    names may be any bytes (tests/test_files_attacks.py)."""
    for param in text_parameters(command):
        if param.param_type_name == "argument":
            arguments = [p for p in command.params if p.param_type_name == "argument"]  # type: ignore[attr-defined]
            args = [NOT_UTF8 if p is param else "x" for p in arguments if p.required or p is param]
            args += ["x"] if param.nargs != 1 else []  # send: a recipient, then a file
            result = alice(*path, *args, input="")
        else:
            required = ["x"] * required_arguments(command)
            result = alice(*path, *required, param.opts[0], NOT_UTF8, input="")
        what = f"{' '.join(path)} {param.name}"
        assert result.exit_code != 0, what
        assert_form(result, what)
        assert "\\udcff" in result.stderr, (what, result.stderr)


def number_options(command: object, kind: type) -> list[str]:
    """The options of ``command`` that take a ``kind`` (``float``: Typer takes nan and inf as floats)."""
    found = []
    for param in command.params:  # type: ignore[attr-defined]
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if param.param_type_name == "option" and kind in (typing.get_args(annotation) or (annotation,)):
            found.append(param.opts[0])
    return found


FLOAT_OPTIONS = [(path, c, o) for path, c in COMMANDS for o in number_options(c, float)]


def test_the_walk_finds_the_float_options() -> None:
    assert {("serve", "--max-rate"), ("moments feed", "--before"), ("workers", "--history-days")} <= {
        (" ".join(p), o) for p, _, o in FLOAT_OPTIONS
    }


@pytest.mark.parametrize(
    ("path", "command", "option"), FLOAT_OPTIONS, ids=[f"{' '.join(p)} {o}" for p, _, o in FLOAT_OPTIONS]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_no_float_option_takes_what_is_not_a_finite_number(
    path: tuple[str, ...], command: object, option: str, value: str, cli_as: Callable[[str], Cli], tmp_path: Path
) -> None:
    """``imcli serve --max-rate nan`` was a traceback deep in the limits: a non-finite number is a
    usage error at the option, for every float option of every command (refused before the command
    runs: ``serve`` does not start)."""
    args = [*path, *["x"] * required_arguments(command), option, value]
    result = cli_as("nobody-logged-in")(*args, env={"IMCLI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert_form(result, " ".join(args))
    assert f"'{option}'" in result.stderr


# what a shell can pass: any text but NUL; a byte that is not UTF-8 arrives as a lone surrogate
ARGV_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from("\udcff\udc80"))


@given(ARGV_TEXT)
def test_any_host_text_is_an_address_the_resolver_takes_or_one_error_line(hosts: str) -> None:
    """``--host`` reaches socket.getaddrinfo, which raised UnicodeError (a traceback) on a host
    it cannot encode: a control character (``--host $'\x80'``), a label over 63 characters."""
    try:
        address = BrokerAddress.of(hosts)
    except InvalidInput as exc:
        refused = str(exc)
    else:
        for host, port in address.endpoints:
            host.encode("idna")
            assert 0 < port < 65536
        return
    assert "\n" not in refused and "\r" not in refused  # one line, whatever was typed


@pytest.mark.parametrize("host", ["\x80", "9" * 400, "a..b", "\udcff"])
def test_a_host_the_resolver_cannot_take_is_one_error_line(host: str, alice: Cli) -> None:
    for args in (["say", "hi"], ["who"], ["group", "say", "team", "hi"], ["dm", "bob", "hi"]):
        result = alice(*args, "--host", host)
        assert_form(result, f"{args} --host {host!r}")
        if host == "\udcff":  # not text: a usage error as the option is read
            assert result.exit_code == 2, (args, result.exception)
            assert result.stderr.startswith(
                "Error: invalid value for '--host': '\\udcff' holds"  # given as --host, so not "env var"
            )
        else:
            assert result.exit_code == 1, (args, result.exception)
            assert result.stderr.startswith("Error: invalid host ")


@pytest.mark.parametrize("before", ["-5", "1e300"])
def test_a_time_stamp_out_of_range_is_one_error_line(before: str, alice: Cli) -> None:
    """``moments --before -5`` was a pydantic traceback (the wire's times are 0 to the end of year 9999)."""
    result = alice("moments", "feed", "--before", before)
    assert result.exit_code == 1, result.exception
    assert_form(result, f"--before {before}")
    assert result.stderr.startswith(f"Error: invalid time stamp {float(before):g} ")


@pytest.mark.parametrize(
    "args", [["profile", "set", "--about", "x" * 20000], ["moments", "comment", "a" * 32, "x" * 20000]]
)
def test_a_request_over_the_payload_limit_fails_at_once_saying_so(args: list[str], alice: Cli) -> None:
    """The broker drops a request over its payload limit and says so on the notice topic; the
    asker waited out its timeout and then blamed the workers ("no worker answered within 5s")."""
    result = alice(*args, env={"IMCLI_REQUEST_TIMEOUT": "30"})
    assert result.exit_code == 1, result.exception
    assert_form(result, args[0])
    assert result.stderr.startswith("Error: the broker dropped the request: message of "), result.stderr
    assert "the limit is 16384 bytes (give less text, or a smaller file)" in result.stderr


def port_of(server: ServeInfo) -> list[str]:
    return ["--host", server.address.host, "--port", str(server.address.port)]


@pytest.fixture
def team(server: ServeInfo, users: Callable[..., None], cli_as: Callable[[str], Cli]) -> Callable[[str], Cli]:
    users("alice", "bob")
    for name in ("alice", "bob"):
        cli_as(name).login(name)
    assert cli_as("alice")("group", "create", "team").exit_code == 0
    assert cli_as("alice")("group", "invite", "team", "bob").exit_code == 0
    return cli_as


@pytest.mark.parametrize(
    ("who", "args", "stdin", "error"),
    [
        ("x", ["register", "frank", "--password-stdin"], "\n",
         "Error: no password on stdin (give it as the first line of stdin, or leave out --password-stdin to be asked)"),
        ("x", ["register", "frank", "--password-stdin"], "short\n",
         "Error: password too short (choose one of at least 8 characters)"),
        ("bob", ["group", "kick", "team", "alice"], None,
         "Error: only admins of #team can do that (ask the group's owner or an admin; 'imcli group members NAME' "
         "lists them)"),
        ("alice", ["group", "create", "team"], None, "Error: the group name 'team' is taken (choose another name)"),
        ("alice", ["friend", "add", "nobody"], None,
         "Error: unknown user 'nobody' (check the name with 'imcli who --all')"),
        ("alice", ["group", "invite", "team", "nobody"], None,
         "Error: unknown user 'nobody' (check the name with 'imcli who --all')"),
    ],
)  # fmt: skip
def test_the_errors_named_in_issue_22(
    team: Callable[[str], Cli], server: ServeInfo, who: str, args: list[str], stdin: str | None, error: str
) -> None:
    cli = team(who)
    result = cli(*args, *(port_of(server) if args[0] == "register" else []), input=stdin)
    assert result.exit_code == 1
    assert result.stderr.strip() == error


def test_usage_errors_are_one_line_with_the_usage(cli_as: Callable[[str], Cli]) -> None:
    cli = cli_as("x")
    missing = cli("dm", "bob")
    assert missing.exit_code == 2
    assert missing.stderr.strip() == (
        "Error: missing argument 'TEXT' (usage: root dm [OPTIONS] USER TEXT; more: root dm --help)"
    )
    unknown = cli("frobnicate")
    assert unknown.stderr.strip() == (
        "Error: no such command 'frobnicate' (usage: root [OPTIONS] COMMAND [ARGS]...; more: root --help)"
    )


def test_help_reads_as_a_person_reads_it(cli_as: Callable[[str], Cli]) -> None:
    cli = cli_as("x")
    dm = cli("dm", "--help", env={"COLUMNS": "80"}).stdout
    assert "Usage: root dm [OPTIONS] USER TEXT" in dm
    assert "{" not in dm and "<str>" not in dm and "<bool>" not in dm
    who = cli("who", "--help", env={"COLUMNS": "80"}).stdout
    assert re.search(r"^  --json +Machine-readable output\.$", who, re.MULTILINE), who
    for path in (["serve"], ["say"], ["listen"], ["history"], ["--help"]):
        text = cli(*path, *(["--help"] if path != ["--help"] else []), env={"COLUMNS": "80"}).stdout
        assert not re.search(r" [.,]", text), text  # no stray space before a full stop
        for line in text.splitlines():  # a bracket is never wrapped in two
            assert line.count("[") == line.count("]"), line
        assert "..." not in text.replace("[ARGS]...", ""), text  # no first sentence cut short
    serve = cli("serve", "--help", env={"COLUMNS": "80"}).stdout
    assert "[default: ~/.local/share/imcli/broker]" in serve or "[default: /" in serve
    moments = " ".join(cli("moments", "--help", env={"COLUMNS": "80"}).stdout.split())
    assert "the feed: imcli moments [USER] [--limit N] [--before TS] [--json]" in moments  # README's form


def test_version(cli_as: Callable[[str], Cli]) -> None:
    from importlib.metadata import version

    result = cli_as("x")("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"imcli {version('imcli')}"


def test_password_stdin_reads_the_port_of_a_closed_broker_as_unreachable(cli_as: Callable[[str], Cli]) -> None:
    result = cli_as("x")("login", "alice", "--port", str(closed_port()), "--password-stdin", input=password_of("alice"))
    assert result.exit_code == 1
    assert FORM.fullmatch(result.stderr.strip()), result.stderr


def register_in_a_terminal(server: ServeInfo, config: Path) -> pexpect.spawn[str]:
    env = {**os.environ, "IMCLI_CONFIG_DIR": str(config), "TERM": "dumb", "COLUMNS": "200"}
    env.pop("IMCLI_PASSWORD", None)
    args = ["-m", "imcli", "register", "frank", *port_of(server)]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=30)


def test_register_checks_the_length_first_and_gives_up_after_three_tries(server: ServeInfo, tmp_path: Path) -> None:
    child = register_in_a_terminal(server, tmp_path / "config")
    child.expect("Password: ")
    child.sendline("short")
    child.expect(r"password too short \(choose one of at least 8 characters\); try again \(2 tries left\)")
    child.expect("Password: ")  # asked again at once, not after a second entry
    child.sendline("long-enough-1")
    child.expect("Repeat it: ")
    child.sendline("long-enough-2")
    child.expect(r"the two passwords differ; try again \(1 try left\)")
    child.expect("Password: ")
    child.sendline("long-enough-1")
    child.expect("Repeat it: ")
    child.sendline("long-enough-3")
    child.expect(r"Error: the two passwords differ, 3 times \(run the command again when you have one in mind\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_register_in_a_terminal_with_a_good_password(server: ServeInfo, tmp_path: Path) -> None:
    child = register_in_a_terminal(server, tmp_path / "config")
    child.expect("Password: ")
    child.sendline("short")
    child.expect("Password: ")
    child.sendline("long-enough-1")
    child.expect("Repeat it: ")
    child.sendline("long-enough-1")
    child.expect("registered frank")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# README, "Exit codes": 2 when the command line cannot be read (Typer's parsing, an option's type),
# 1 for whatever the command refuses or fails at once it runs (imcli's own value checks included)
EXIT_CODES = [
    (2, ["frobnicate"]),  # an unknown command
    (2, ["who", "--no-such-option"]),
    (2, ["dm", "bob"]),  # a missing argument
    (2, ["who", "--port", "abc"]),  # a value its option's type refuses
    (2, ["moments", "feed", "--before", "nan"]),
    (2, ["who", "--host", "\udcff"]),
    (2, ["dm", "bob", NOT_UTF8]),
    (1, ["say", "--room", "Bad Room", "hi"]),  # imcli's value checks, once the command runs
    (1, ["history", "#"]),
    (1, ["moments", "feed", "--before", "-5"]),
    (1, ["who", "--host", "\x80"]),
    (1, ["friend", "add", "alice"]),  # a worker's refusal (one cannot be one's own friend)
    (1, ["group", "kick", "nosuchgroup", "bob"]),
    (1, ["who", "--port", "CLOSED"]),  # no broker there (a port closed when the test runs)
]


@pytest.mark.parametrize(("code", "args"), EXIT_CODES, ids=[" ".join(a) for _, a in EXIT_CODES])
def test_the_exit_code_says_whether_the_command_line_could_be_read(code: int, args: list[str], alice: Cli) -> None:
    args = [str(closed_port()) if a == "CLOSED" else a for a in args]
    result = alice(*args, input="")
    assert_form(result, " ".join(args))
    assert result.exit_code == code, (args, result.stderr)


# f-strings that may keep !r: a decoded payload's own type (one of the models' literals), a time stamp (a float)
REPR_KEPT = {"imcli/core/wire.py": 1, "imcli/cli/moments.py": 1}


def test_no_message_quotes_a_value_with_repr() -> None:
    """What a message quotes (an argument, a file name, a variable, a server's word) is ``quoted``:
    ``safe`` and cut. ``{value!r}`` leaves blank letters and piles of combining marks as they are
    and quotes 100 kB whole; print_error's ``safe`` caught the first two, but a message is built
    once, in one way, wherever it ends up. The packages a person's commands run through are read."""
    root = Path(__file__).parent.parent
    found = {}
    for package in ("cli", "client", "core", "serve"):
        for source in sorted((root / "imcli" / package).glob("*.py")):
            name = str(source.relative_to(root))
            count = len(re.findall(r"!r\}", source.read_text()))
            if count != REPR_KEPT.get(name, 0):
                found[name] = count
    assert not found, found
