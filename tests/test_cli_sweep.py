"""Every parameter of every command, fed hostile values, against a real embedded broker (issue: "an
issue that names one bad input stands for its whole class").

The command tree is walked from the Typer app, not listed: a command, argument or option added later
is swept too. Each parameter gets the values of its kind (text, a whole number, a number, a path):
empty, blank, 100 kB, NUL and other control characters, U+2028, a bidi override, a lone surrogate (a
byte that is not UTF-8, as a shell passes it), ``-``-prefixed values, the MQTT wildcards and ``$SYS``,
path traversal, absolute paths, a directory, a FIFO, ``/dev/zero``, numbers out of range, negative,
``nan``. The other required arguments get ordinary values (``bob``, ``team``, a real file id), so a
hostile value reaches as deep as the command lets it.

For each run: no traceback; exit 0, or exactly one ``Error: <what> (<what to do>)`` line with exit 1
(the command refused) or 2 (the command line could not be read); no hang (a time limit per call);
the broker still answers afterwards; and every PUBLISH and SUBSCRIBE that reached the broker from a
user obeys the topic contract (a topic the contract parses, sent as its own sender; a filter of
names and wildcards), whatever was typed.

Commands that run until stopped (serve, workers, presence, listen) and every special file (a FIFO,
``/dev/zero``, a directory) run as a subprocess with a memory limit: a read that never ends must
not take the test process with it. The rest run in this process (Typer's runner), much faster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imcli.broker import publish_checks
from imcli.broker.accounts import AccountStore
from imcli.broker.acl import Access
from imcli.broker.limits import Limits
from imcli.broker.server import BrokerSettings
from imcli.broker.topic_access import TopicAccess
from imcli.cli.app import app
from imcli.cli.common import LOCAL_PATHS
from imcli.core.rules import SERVICE_ACCOUNTS
from imcli.core.text import quoted, safe
from imcli.core.topics import Topics
from imcli.serve.host import BackgroundServer, ServeInfo
from tests.clitree import COMMANDS, ROOT
from tests.rawmqtt import connect_raw, password_of

FORM = re.compile(r"Error: \S.* \(\S.*\)")
RUNS_UNTIL_STOPPED = {"serve", "workers", "presence", "listen"}
CALL_SECONDS = 30.0  # a generous bound per call: a request waits IMCLI_REQUEST_TIMEOUT (3 s) for a worker
SUBPROCESS_MEMORY = 1 << 30  # bytes of address space a subprocess may take (a read of /dev/zero stops there)

# ---------------------------------------------------------------- the values

LONG = "x" * 100_000
TEXT = [
    "",
    "   ",
    "\t",
    LONG,
    "a\x00b",  # in this process only: no argv carries a NUL
    "a\x1b[2Jb\x07",
    "a\nb",
    "a\rb",
    "\x7f\x85\x9b",
    "a\u2028b",
    "\u202eevil\u202c",
    "\ufeff",
    "a\udcffb",  # a byte that is not UTF-8, as Python hands argv over
    "-",
    "-x",
    "--",
    "+",
    "#",
    "a/b",
    "+/#",
    "$SYS",
    "$SYS/broker/load",
    "../../etc/passwd",
    "/etc/passwd",
    "@",
    "#team/+",
    "@bob/dm",
    "nan",
    "-1",
    "9" * 40,
    "\uff21\uff2c\uff29\uff23\uff25",  # ALICE in full width
    "\u0430lice",  # with a Cyrillic a
]
# a refused number is quoted in its error line: a bidi override, a blank letter and a pile of combining
# marks must come out as their escapes there (imcli.core.text.quoted), as in every line
HOSTILE_NUMBERS = ["\u202e12", "\u3164", "1" + "\u0301" * 12, "1\x1b[2J"]
INT = ["", " ", "-1", "0", "-0", "2147483648", "9" * 40, "1e3", "0x10", "nan", "1.5", "٣", "+5", "1_000", "-9" * 20,
       *HOSTILE_NUMBERS]  # fmt: skip
FLOAT = ["", "nan", "inf", "-inf", "1e400", "-1", "0", "-0", "1e308", "1e-320", "9" * 400, "0x1p3", "٣",
         *HOSTILE_NUMBERS]  # fmt: skip
# The paths are made per run inside the test's directory: these tests run as root in CI and here, where
# `--data-dir /` or `get -o ../../../../etc/passwd` would write where they say. The working directory is
# four levels down in it, so `../../../x` (path traversal) and a relative or empty path stay inside.
DIR, FIFO, MISSING = "<dir>", "<fifo>", "<missing>"  # absolute: a directory, a FIFO, /…/no/such/dir/file
SPECIAL = {DIR, FIFO, "/dev/zero", "/dev/null", "/dev/stdin"}
PATHS = [
    "",
    " ",
    DIR,
    FIFO,
    MISSING,
    "/dev/zero",
    "/dev/null",
    "/dev/stdin",
    "../../../escaped",
    "../../../escaped/../../../escaped",
    "a" * 100_000,
    "a\udcffb",
    "a\x00b",
    "-",
    "-x",
    "~nosuchuser/x",
    "a\nb",
    "d\x1b[31m\u202e[bold]x\u3164",  # shown as typed, inert: `serve --data-dir`'s start-up line, errors
]


def kind_of(path: tuple[str, ...], param: Any) -> str:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kinds = typing.get_args(annotation) or (annotation,)
    if (path[-1:] and (path[-1], param.name) in LOCAL_PATHS) or Path in kinds or list[Path] in kinds:
        return "path"
    if bool in kinds:
        return "flag"
    if float in kinds:
        return "float"
    if int in kinds:
        return "int"
    return "text"


VALUES = {"text": TEXT, "int": INT, "float": FLOAT, "path": PATHS}


# ---------------------------------------------------------------- the walk


# the root's own options (--account) are swept in front of one command
ROOT_CASES = [(("whoami",), ROOT, p) for p in ROOT.params if kind_of((), p) != "flag" and p.name != "version"]
CASES = [
    *ROOT_CASES,
    *((path, c, p) for path, c in COMMANDS for p in c.params if kind_of(path, p) != "flag"),
]


def case_id(path: tuple[str, ...], command: Any, param: Any) -> str:
    where = " ".join(path) if command is not ROOT else "(root) " + " ".join(path)
    return f"{where} {param.opts[0] if param.param_type_name == 'option' else param.name.upper()}"


def _turns() -> dict[str, int]:
    """Where in its kind's pool each case starts drawing (the first value it takes)."""
    taken: dict[str, int] = {}
    turns = {}
    for c in CASES:
        kind = kind_of(c[0], c[2])
        turns[case_id(*c)] = taken.get(kind, 0)
        taken[kind] = taken.get(kind, 0) + (DRAWN_APART if c[0][0] in RUNS_UNTIL_STOPPED else DRAWN[kind])
    return turns


def test_the_sweep_walks_every_command_and_parameter() -> None:
    ids = {case_id(*c) for c in CASES}
    assert {"say TEXT", "say --room", "dm USER", "group invite USER", "serve --max-rate", "get --output"} <= ids
    assert {"send ARGS", "moments post --image", "(root) whoami --account", "listen --room"} <= ids
    assert {" ".join(path) for path, _ in COMMANDS} == {" ".join(c[0]) for c in CASES if c[1] is not ROOT} | {
        " ".join(path) for path, c in COMMANDS if all(kind_of(path, p) == "flag" for p in c.params)
    }


# ---------------------------------------------------------------- the broker and what reaches it


@dataclass
class Seen:
    """What users (not the workers' service accounts) sent the broker: PUBLISH topics and SUBSCRIBE filters."""

    publishes: list[tuple[str | None, str]] = field(default_factory=list)
    filters: list[tuple[str | None, str]] = field(default_factory=list)

    def clear(self) -> None:
        self.publishes.clear()
        self.filters.clear()


@dataclass
class Sweep:
    server: ServeInfo
    config: Path  # alice's logged-in profile, copied for each run
    file_id: str
    post_id: str
    seen: Seen
    thread_alive: Callable[[], bool]


TOPICS = Topics()
FILTER_LEVEL = re.compile(r"[A-Za-z0-9_.~-]+|\+|#")


def contract_breaches(seen: Seen) -> list[str]:
    """What users sent that the topic contract does not have."""
    breaches = []
    for user, topic in seen.publishes:
        parsed = TOPICS.parse(topic)
        if parsed is None or (parsed.sender is not None and parsed.sender != user):
            breaches.append(f"{user} published to {topic[:200]!r}")
    for user, topic_filter in seen.filters:
        levels = topic_filter.split("/")
        if not all(FILTER_LEVEL.fullmatch(level) for level in levels) or "#" in levels[:-1]:
            breaches.append(f"{user} subscribed to {topic_filter[:200]!r}")
    return breaches


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    base = tmp_path_factory.mktemp("sweep")
    limits = Limits(publish_rate=1e6, publish_burst=10**6, max_groups=10**5, group_rate=10**5, max_connections=1000)
    seen = Seen()
    decide = publish_checks.decide_publish
    check = TopicAccess.check

    def recording_decide(access: Any, sender: str | None, topic: str, *args: Any, **kwargs: Any) -> Any:
        if sender not in SERVICE_ACCOUNTS:
            seen.publishes.append((sender, topic))
        return decide(access, sender, topic, *args, **kwargs)

    def recording_check(self: TopicAccess, username: str | None, topic: str, access: Access) -> bool:
        if access is Access.SUBSCRIBE and username not in SERVICE_ACCOUNTS:
            seen.filters.append((username, topic))
        return check(self, username, topic, access)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish_checks, "decide_publish", recording_decide)
        patch.setattr(TopicAccess, "check", recording_check)
        server = BackgroundServer(BrokerSettings(data_dir=base / "data", port=0, limits=limits))
        with server as info:
            store = AccountStore(info.data_dir)
            for name in ("alice", "bob"):
                store.add(name, password_of(name))
            runner = CliRunner()
            config = base / "alice"

            def alice(*args: str, input: str | None = None) -> Any:
                result = runner.invoke(app, list(args), input=input, env={"IMCLI_CONFIG_DIR": str(config)})
                assert result.exit_code == 0, (args, result.output, result.exception)
                return result

            where = ["--host", info.address.host, "--port", str(info.address.port)]
            alice("login", "alice", *where, "--password-stdin", input=password_of("alice") + "\n")
            runner.invoke(app, ["login", "bob", *where, "--password-stdin"], input=password_of("bob") + "\n",
                          env={"IMCLI_CONFIG_DIR": str(base / "bob")})  # fmt: skip
            alice("group", "create", "team")
            alice("group", "invite", "team", "bob")
            alice("friend", "add", "bob")
            runner.invoke(app, ["friend", "accept", "alice"], env={"IMCLI_CONFIG_DIR": str(base / "bob")})
            (base / "note.txt").write_text("a note\n")
            alice("send", "bob", str(base / "note.txt"))
            import json

            file_id = json.loads(alice("files", "--json").stdout)[0]["id"]
            alice("moments", "post", "hello")
            post_id = json.loads(alice("moments", "feed", "--json").stdout)["moments"][0]["id"]
            seen.clear()
            yield Sweep(info, config, file_id, post_id, seen, server._thread.is_alive)


# ---------------------------------------------------------------- one run


@dataclass
class Outcome:
    code: int | None  # None: still running when stopped (a command that runs until stopped)
    stdout: str
    stderr: str
    exception: BaseException | None = None


class Hang(BaseException):  # not an Exception: Typer's runner must not catch it
    pass


def run_here(args: list[str], env: dict[str, str]) -> Outcome:
    def alarm(*_: object) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
    try:
        result = CliRunner().invoke(app, args, input="", env=env)
    except Hang:
        pytest.fail(f"no answer within {CALL_SECONDS:g}s: imcli {short(args)}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout, result.stderr, exception)


# `python -m imcli` under a limit of its address space (set in the child: the test process has threads)
LIMITED = (
    f"import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, ({SUBPROCESS_MEMORY}, {SUBPROCESS_MEMORY})); "
    "runpy.run_module('imcli', run_name='__main__', alter_sys=True)"
)


# what a command that runs until stopped says once it runs (then it is stopped: the value was taken)
READY = ("imcli serve: listening on", "listening as ")


def run_apart(args: list[str], env: dict[str, str], *, until_stopped: bool) -> Outcome:
    """``python -m imcli`` with a memory limit; one that runs until stopped is stopped once it says it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LIMITED, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "COLUMNS": "200"},
    )
    out: list[bytes] = []
    err: list[bytes] = []
    pumps = [
        threading.Thread(target=lambda s=s, to=to: to.extend(s), daemon=True)
        for s, to in ((proc.stdout, out), (proc.stderr, err))
    ]
    for pump in pumps:
        pump.start()

    def said() -> str:
        return b"".join(err).decode(errors="replace")

    seconds = 20.0 if until_stopped else CALL_SECONDS
    deadline = time.monotonic() + seconds
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if until_stopped and any(r in said() or r in b"".join(out).decode(errors="replace") for r in READY):
                break
            time.sleep(0.1)
        running = proc.poll() is None
        if running:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"imcli {short(args)}: did not stop on SIGTERM; stderr {said()[-2000:]!r}")
    finally:
        for pump in pumps:
            pump.join(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if running and not until_stopped:
        pytest.fail(f"no answer within {seconds:g}s: imcli {short(args)}; stderr {said()[-2000:]!r}")
    return Outcome(None if running else proc.returncode, b"".join(out).decode(errors="replace"), said())


def short(args: list[str]) -> str:
    return " ".join(repr(a[:40] + "…") if len(a) > 40 else repr(a) if not a.isprintable() or not a else a for a in args)


def judge(outcome: Outcome, args: list[str]) -> None:
    what = f"imcli {short(args)}"
    assert outcome.exception is None, f"{what}: {outcome.exception!r}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, f"{what}: {outcome.stderr[-3000:]}"
    raw = [line for line in (outcome.stdout + outcome.stderr).split("\n") if safe(line) != line]
    assert not raw, f"{what}: a line that safe() would change reached the terminal: {raw[:3]!r}"
    if outcome.code in (0, None):
        return
    lines = outcome.stderr.strip().splitlines()
    assert outcome.code in (1, 2), f"{what}: exit {outcome.code}; {outcome.stderr[-2000:]!r}"
    assert len(lines) == 1 and FORM.fullmatch(lines[0]), f"{what} (exit {outcome.code}): {outcome.stderr[-2000:]!r}"


# ---------------------------------------------------------------- the arguments around the value


def filler(path: tuple[str, ...], param: Any, sweep: Sweep, note: Path) -> list[str]:
    """An ordinary value for a required argument that is not the one swept."""
    name = param.name
    if name == "args":  # send: a recipient, then a file
        return ["bob", str(note)]
    if name == "name":
        return ["team"] if path[0] == "group" else ["carol"]
    return {
        "user": ["bob"],
        "text": ["hi"],
        "post": [sweep.post_id],
        "file_id": [sweep.file_id],
        "key": ["dm-policy"],
        "value": ["anyone"],
        "label": ["cron"],
        "nick": ["Carol"],
    }.get(name, ["x"])


def around(path: tuple[str, ...], command: Any, param: Any, value: str, sweep: Sweep, note: Path) -> list[list[str]]:
    """The command lines that put ``value`` in ``param``'s place (send's list: as recipient and as file)."""
    if command is ROOT:
        return [["--account", value, *path]] if "--account" in param.opts else [[param.opts[0], value, *path]]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    fixed: list[str] = []
    if path[0] == "serve":
        fixed = ["--port", "0"] if param.name != "port" else []
        fixed += ["--data-dir", str(note.parent / "serve-data")] if param.name != "data_dir" else []
    elif path[0] in ("workers", "presence"):
        fixed = ["--host", sweep.server.address.host] if param.name != "host" else []
        fixed += ["--port", str(sweep.server.address.port)] if param.name != "port" else []
        fixed += ["--password-stdin"]
    if param.param_type_name == "option":
        positional = [v for p in arguments if p.required for v in filler(path, p, sweep, note)]
        return [[*path, *positional, *fixed, f"{param.opts[0]}", value]]
    if param.name == "args":
        return [[*path, *fixed, "--", value, str(note)], [*path, *fixed, "--", "bob", value]]
    positional = []
    for p in arguments:
        positional += [value] if p is param else filler(path, p, sweep, note) if p.required else []
    return (
        [[*path, *fixed, "--", *positional]]
        if value.startswith("-") and value != "-"
        else [[*path, *fixed, *positional]]
    )


# values a case draws from its kind's pool: every value for every parameter is IMCLI_SWEEP=all (about
# 3,000 runs, most of an hour on two loaded cores); by default a few, a different few for each parameter
# and the same ones on every run: the cases of a kind take the pool's values in turn, so every value of
# every pool is drawn by some case
DRAWN = {"text": 8, "int": 6, "float": 5, "path": 7}
DRAWN_APART = 3  # serve, workers, presence, listen: a subprocess each time


def sample(case: str, path: tuple[str, ...], kind: str) -> list[str]:
    values = VALUES[kind]
    if os.environ.get("IMCLI_SWEEP") == "all":
        return values
    turn = TURNS[case]
    drawn = DRAWN_APART if path[0] in RUNS_UNTIL_STOPPED else DRAWN[kind]
    return list(dict.fromkeys(values[(turn + i) % len(values)] for i in range(drawn)))


TURNS = _turns()


def test_every_value_is_drawn() -> None:
    for kind, values in VALUES.items():
        drawn = {v for c in CASES if kind_of(c[0], c[2]) == kind for v in sample(case_id(*c), c[0], kind)}
        assert drawn == set(values), (kind, set(values) - drawn)


def materialise(value: str, where: Path) -> str:
    if value == MISSING:
        return str(where.parent / "no" / "such" / "dir" / "file")
    if value == DIR:
        where.mkdir(exist_ok=True)
        return str(where)
    if value == FIFO:
        fifo = where.with_suffix(".fifo")
        if not fifo.exists():
            os.mkfifo(fifo)
        return str(fifo)
    return value


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("path", "command", "param"), CASES, ids=[case_id(*c) for c in CASES])
def test_every_hostile_value_of_every_parameter(
    path: tuple[str, ...], command: Any, param: Any, sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty or relative path is the working directory's: `admin invite --data-dir ''`, `get` without -o
    work = tmp_path / "a" / "b" / "c" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # subprocesses start here too
    note = tmp_path / "note.txt"
    note.write_text("a note\n")
    kind = kind_of(path, param)
    failures: list[str] = []
    for raw_value in sample(case_id(path, command, param), path, kind):
        value = materialise(raw_value, tmp_path / "special")
        apart = path[0] in RUNS_UNTIL_STOPPED or raw_value in SPECIAL
        if apart and "\x00" in value:
            continue  # no argv carries a NUL
        for args in around(path, command, param, value, sweep, note):
            config = tmp_path / "config"
            shutil.rmtree(config, ignore_errors=True)
            shutil.copytree(sweep.config, config)
            env = {
                "IMCLI_CONFIG_DIR": str(config),
                "IMCLI_DATA_DIR": str(tmp_path / "admin-data"),
                "IMCLI_REQUEST_TIMEOUT": "3",
                "IMCLI_PASSWORD": password_of("alice"),
                "IMCLI_PREVIEW": "off",
            }
            sweep.seen.clear()
            if apart:
                outcome = run_apart(args, env, until_stopped=path[0] in RUNS_UNTIL_STOPPED)
            else:
                outcome = run_here(args, env)
            try:
                judge(outcome, args)
            except AssertionError as exc:
                failures.append(str(exc).split("\nassert")[0])
            failures += [f"imcli {short(args)}: {b}" for b in contract_breaches(sweep.seen)]
    assert sweep.thread_alive(), "the broker's thread ended"
    probe = connect_raw(sweep.server.address.host, sweep.server.address.port, "bob", "", password_of("bob"))
    try:
        assert probe.rc == 0, "the broker no longer lets bob in"
    finally:
        probe.close()
    assert not failures, "\n".join(failures)


def test_the_recorder_sees_what_a_command_sends(sweep: Sweep, tmp_path: Path) -> None:
    """The contract check can fail: ``say`` reaches the broker and is recorded as alice's PUBLISH."""
    config = tmp_path / "config"
    shutil.copytree(sweep.config, config)
    sweep.seen.clear()
    outcome = run_here(["say", "--room", "ops", "hello"], {"IMCLI_CONFIG_DIR": str(config)})
    assert outcome.code == 0, outcome.stderr
    assert ("alice", "im/room/ops/alice") in sweep.seen.publishes
    assert not contract_breaches(sweep.seen)
    assert contract_breaches(Seen(publishes=[("alice", "im/room/+/alice")], filters=[("alice", "im/#/x")])) == [
        "alice published to 'im/room/+/alice'",
        "alice subscribed to 'im/#/x'",
    ]


# ---------------------------------------------------------------- numbers: one reading for every one

# what Python's int() or float() (or pydantic, under Typer) also takes, and a person typing a count,
# a port or a rate does not mean: other scripts' digits, digit groups, signs and spaces, hex, a
# fraction for a whole number; nan, inf, a float that overflows or cannot be held as written
NOT_WHOLE = ["\u0663", "1_000", "+5", " 7", "7 ", "1.0", "1e3", "0x10", "", "\uff17", "nan", "--1", *HOSTILE_NUMBERS]
NOT_REAL = [
    "nan",
    "inf",
    "-inf",
    "\u0661.\u0665",
    "1_0.5",
    "1e-320",
    "1e-400",
    "1e400",
    "0x1p3",
    " 1.5",
    "",
    "1.5.",
    "e3",
    *HOSTILE_NUMBERS,
]
NUMBER_CASES = [c for c in CASES if kind_of(c[0], c[2]) in ("int", "float")]


@pytest.mark.parametrize(("path", "command", "param"), NUMBER_CASES, ids=[case_id(*c) for c in NUMBER_CASES])
def test_every_number_parameter_reads_ascii_digits_only(
    path: tuple[str, ...], command: Any, param: Any, tmp_path: Path
) -> None:
    """Every whole-number and number option of every command refuses, as it reads the command line and
    before anything else runs, what only Python's wider readings take: one ``Error:`` line naming the
    option and the value, exit 2."""
    values = NOT_WHOLE if kind_of(path, param) == "int" else NOT_REAL
    positional = [v for p in command.params if p.param_type_name == "argument" and p.required for v in
                  ({"args": ["bob", "note.txt"], "user": ["bob"]}.get(p.name, ["x"]))]  # fmt: skip
    failures = []
    for value in values:
        args = [*path, param.opts[0], value, *positional]
        result = CliRunner().invoke(app, args, env={"IMCLI_CONFIG_DIR": str(tmp_path)})
        lines = result.stderr.strip().splitlines()
        if not (
            result.exit_code == 2
            and len(lines) == 1
            and FORM.fullmatch(lines[0])
            and param.opts[0] in lines[0]
            and quoted(value)[:21] in lines[0]
        ):
            failures.append(f"imcli {short(args)}: exit {result.exit_code}, {result.stderr.strip()[-500:]!r}")
    assert not failures, "\n".join(failures)


def test_an_environment_variable_is_read_as_the_option_is(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["who"], env={"IMCLI_CONFIG_DIR": str(tmp_path), "IMCLI_PORT": "1_883"})
    assert result.exit_code == 2, result.stderr
    assert "'1_883' is not a whole number" in result.stderr
    # the error names where the value came from: the variable when it did, only the option when not
    assert result.stderr.startswith("Error: invalid value for '--port' (from IMCLI_PORT): "), result.stderr
    given = CliRunner().invoke(
        app, ["who", "--port", "1_883"], env={"IMCLI_CONFIG_DIR": str(tmp_path), "IMCLI_PORT": "1"}
    )
    assert given.stderr.startswith("Error: invalid value for '--port': '1_883' "), given.stderr


def test_what_the_number_readings_take() -> None:
    import typer

    from imcli.cli.common import real_number, whole_number

    assert [whole_number(t) for t in ("0", "-0", "007", "-3", "65535", "9" * 40)] == [0, 0, 7, -3, 65535, 10**40 - 1]
    assert [real_number(t) for t in ("0", "0e5", ".5", "5.", "1e3", "-2.5", "2.3e-308", "1.5E+2")] == [
        0.0, 0.0, 0.5, 5.0, 1000.0, -2.5, 2.3e-308, 150.0,
    ]  # fmt: skip
    with pytest.raises(typer.BadParameter, match="too long"):
        whole_number("9" * 5000)
    with pytest.raises(typer.BadParameter, match="too large"):
        real_number("9" * 400)


@pytest.mark.parametrize("value", [*HOSTILE_NUMBERS, "x" * 100_000, "1e-320\u3164", "\u0301"])
def test_a_refused_number_is_quoted_inert_and_short(value: str) -> None:
    """The number readings quote what they refuse as ``quoted`` does: ``safe`` (``repr`` left a blank
    letter and any pile of combining marks as they are) and cut (``repr`` quoted 100 kB whole)."""
    import typer

    from imcli.cli.common import real_number, whole_number
    from imcli.core.text import QUOTED_MAX

    for read in (whole_number, real_number):
        with pytest.raises(typer.BadParameter) as refused:
            read(value)
        message = refused.value.message
        assert safe(message) == message, message
        assert len(message) < QUOTED_MAX * 6 + 100, len(message)  # an escape is at most 6 characters


# ---------------------------------------------------------------- topics a pattern ACL lets through

# Mosquitto's `pattern write im/room/+/%u` lets mallory publish (and retain) on a room level that is no
# room name: every client must treat such a topic alike. They ignore it (it is no conversation a
# person could answer in): imcli listen and chat (Listener), the archive (history) and the web page.
NONSENSE_ROOMS = [
    "im/room/\u2028/mallory",
    "im/room/\u202eevil/mallory",
    "im/room/Lobby/mallory",
    "im/room/ /mallory",
    "im/room//mallory",
    "im/room/a\x00b/mallory",
    "im/room/" + "a" * 33 + "/mallory",
    "im/room/lobby/mallory/extra",
    "im/room/-x/mallory",
    "im/room/\uff4c\uff4f\uff42\uff42\uff59/mallory",  # full-width lobby
    "im/room/\u0430/mallory",  # a Cyrillic a
    "im/group/\u2028/msg/mallory",
    "im/user/\u2028/dm/mallory",
]


def test_every_client_ignores_a_room_topic_that_is_no_room_alike(tmp_path: Path) -> None:
    from imcli.client.listener import to_received
    from imcli.core.mqtt import Message

    for topic in NONSENSE_ROOMS:
        assert TOPICS.parse(topic) is None, topic  # the workers' Service base and the archive: not theirs
        assert to_received(TOPICS, Message(topic, b"hello", 1, False)) is None, topic  # listen, chat
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the web page's parser is not checked")
    script = Path(__file__).parent.parent / "imcli/web/static/app.js"
    text = script.read_text()
    head = text[text.index("  const PREFIX") : text.index("  const REQUEST_TIMEOUT")]
    names = text[text.index("  const NAME") : text.index("  const CONNACK")]
    parser = text[text.index("  const T = {") : text.index("  // ---", text.index("  const T = {"))]
    program = f"{head}{names}{parser}\nconst topics = JSON.parse(process.argv[1]);\n"
    program += "console.log(JSON.stringify(topics.map((t) => T.parse(t))));\n"
    import json

    out = subprocess.run(
        [node, "-e", program, json.dumps([*NONSENSE_ROOMS, "im/room/lobby/mallory"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    parsed = json.loads(out)
    assert parsed[-1] == {"kind": "room", "name": "lobby", "from": "mallory"}  # the check can fail
    assert parsed[:-1] == [None] * len(NONSENSE_ROOMS), dict(zip(NONSENSE_ROOMS, parsed, strict=True))


def test_paths_as_typed_are_shown_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``imcli serve``'s and ``imcli workers``' start-up lines show the directories as typed, through
    ``safe`` and as no Rich markup: an ESC, a bidi override or ``[bold]`` in ``--data-dir`` reached
    the terminal as they were (or vanished, as markup)."""
    from imcli.cli.render import shown
    from imcli.cli.workers import _stores

    monkeypatch.chdir(tmp_path)
    hostile = "d\x1b[31m\u202e[bold]x"
    outcome = run_apart(["serve", "--port", "0", "--data-dir", hostile], {}, until_stopped=True)
    lines = [line.split(None, 1) for line in outcome.stdout.splitlines()]
    assert [words[1] for words in lines if words[:1] == ["data"]] == [safe(hostile)], outcome.stdout
    assert (
        _stores(Path(hostile), None, Path(hostile))
        == f"; archive in {shown(hostile)}; no files; moments in {shown(hostile)}"
    )


def test_an_error_line_quotes_a_long_value_cut(sweep: Sweep, tmp_path: Path) -> None:
    """A value of 100 kB is quoted cut, and no hint repeats it whole (``not logged in as …``: the
    hint said ``run 'imcli login <all of it>'``)."""
    config = tmp_path / "config"
    shutil.copytree(sweep.config, config)
    for value in (LONG, "\u202e" * 5000, "a\x1b[2J" * 1000):
        outcome = run_here(["--account", value, "whoami"], {"IMCLI_CONFIG_DIR": str(config)})
        [line] = outcome.stderr.strip().splitlines()
        assert outcome.code == 1 and FORM.fullmatch(line) and len(line) < 500, (outcome.code, line[:1000])
        assert "not logged in as " in line and safe(line) == line, line[:1000]
