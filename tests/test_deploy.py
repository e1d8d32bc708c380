"""deploy/: the files no test can run here (EMQX has no images on this machine; systemd does
not run in it) are parsed and checked against what does run.

- deploy/emqx/acl.conf (Erlang terms) grants exactly what deploy/mosquitto/aclfile grants,
  account by account and topic by topic; the aclfile states imcli/broker/acl.py's rules.
- deploy/emqx/docker-compose.yml describes three clustered EMQX nodes and a workers container
  whose command is a valid ``imcli workers`` command line for the same service accounts.
- deploy/systemd/*.service parse, carry the hardening they claim, and start valid ``imcli``
  commands; ``systemd-analyze verify`` finds nothing wrong with them where it is installed.
- the offline-delivery limits in mosquitto.conf and emqx.conf are the embedded broker's.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from imcli.broker.acl import USER_READ, USER_WRITE, topic_matches
from imcli.broker.limits import Limits
from imcli.cli.app import app
from imcli.cli.workers import password_variable
from imcli.core.topics import DEFAULT_MAX_CHUNK
from imcli.core.wire import RESERVED_NAMES

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MOSQUITTO_ONLY = "$CONTROL/"  # Mosquitto's dynamic-security API: EMQX has no such plugin
PLACEHOLDER = {"%u": "${username}"}


# ---------------------------------------------------------------- Mosquitto's aclfile


@dataclass(frozen=True)
class Rule:
    """One grant or denial: ``who`` is an account, or ``None`` for every account."""

    permission: str  # allow | deny
    who: str | None
    action: str  # publish | subscribe | all
    topic: str


def mosquitto_rules(text: str) -> list[Rule]:
    """aclfile lines as rules, in EMQX's vocabulary: write=publish, read=subscribe, deny."""
    rules, user = [], None
    actions = {"write": "publish", "read": "subscribe", "readwrite": "all"}
    for raw in text.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        match words:
            case ["user", name]:
                user = name
            case ["pattern", access, topic]:
                rules.append(Rule("allow", None, actions[access], _emqx_topic(topic)))
            case ["pattern", topic]:
                rules.append(Rule("allow", None, "all", _emqx_topic(topic)))
            case ["topic", "deny", topic]:
                rules.append(Rule("deny", user, "publish", topic))
            case ["topic", access, topic]:
                rules.append(Rule("allow", user, actions[access], topic))
            case ["topic", topic]:
                rules.append(Rule("allow", user, "all", topic))
            case _:
                raise AssertionError(f"unexpected aclfile line: {raw!r}")
    return rules


def _emqx_topic(pattern: str) -> str:
    for mosquitto, emqx in PLACEHOLDER.items():
        pattern = pattern.replace(mosquitto, emqx)
    return pattern


# ---------------------------------------------------------------- EMQX's acl.conf (Erlang terms)


@dataclass(frozen=True)
class Atom:
    name: str


Term = Atom | str | int | tuple["Term", ...] | list["Term"]
_TOKEN = re.compile(
    r'\s+|%[^\n]*|(?P<punct>[{}\[\],.])|"(?P<string>(?:[^"\\]|\\.)*)"|(?P<atom>[a-z][A-Za-z0-9_@]*)|(?P<int>\d+)'
)


def erlang_terms(text: str) -> list[Term]:
    """``file:consult/1`` for the subset acl.conf uses: tuples, lists, atoms, strings, integers."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise AssertionError(f"acl.conf: cannot read {text[pos : pos + 30]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind is not None:
            value = m.group(kind)
            tokens.append((kind, bytes(value, "utf-8").decode("unicode_escape") if kind == "string" else value))
    tokens.append(("end", ""))
    terms: list[Term] = []
    i = 0
    while tokens[i][0] != "end":
        term, i = _term(tokens, i)
        if tokens[i] != ("punct", "."):
            raise AssertionError(f"acl.conf: a term must end with '.', got {tokens[i]}")
        terms.append(term)
        i += 1
    return terms


def _term(tokens: list[tuple[str, str]], i: int) -> tuple[Term, int]:
    kind, value = tokens[i]
    if kind == "string":
        return value, i + 1
    if kind == "atom":
        return Atom(value), i + 1
    if kind == "int":
        return int(value), i + 1
    if (kind, value) in (("punct", "{"), ("punct", "[")):
        close = "}" if value == "{" else "]"
        items: list[Term] = []
        i += 1
        while tokens[i] != ("punct", close):
            item, i = _term(tokens, i)
            items.append(item)
            if tokens[i] == ("punct", ","):
                i += 1
            elif tokens[i] != ("punct", close):
                raise AssertionError(f"acl.conf: expected ',' or {close!r}, got {tokens[i]}")
        return (tuple(items) if close == "}" else items), i + 1
    raise AssertionError(f"acl.conf: unexpected {value or 'end of file'!r}")


@dataclass(frozen=True)
class EmqxRule:
    rule: Rule
    retain_only: bool  # {publish, [{retain, true}]}: applies to retained publishes only


def emqx_rules(terms: list[Term]) -> list[EmqxRule]:
    rules = []
    for term in terms:
        assert isinstance(term, tuple), term
        if len(term) == 2:  # {deny, all}: the catch-all
            assert term == (Atom("deny"), Atom("all")), term
            continue
        permission, who, action, topics = term
        assert isinstance(permission, Atom) and permission.name in ("allow", "deny"), term
        if who == Atom("all"):
            account = None
        else:
            assert isinstance(who, tuple) and who[0] == Atom("username") and isinstance(who[1], str), term
            account = who[1]
        retain_only = False
        if isinstance(action, tuple):
            assert action == (Atom("publish"), [(Atom("retain"), Atom("true"))]), action
            action, retain_only = Atom("publish"), True
        assert isinstance(action, Atom) and action.name in ("publish", "subscribe", "all"), term
        assert isinstance(topics, list) and all(isinstance(t, str) for t in topics), term
        rules += [EmqxRule(Rule(permission.name, account, action.name, str(t)), retain_only) for t in topics]
    return rules


@pytest.fixture(scope="module")
def aclfile() -> list[Rule]:
    return mosquitto_rules((DEPLOY / "mosquitto" / "aclfile").read_text())


@pytest.fixture(scope="module")
def acl_conf() -> list[Term]:
    return erlang_terms((DEPLOY / "emqx" / "acl.conf").read_text())


def test_the_aclfile_states_the_embedded_brokers_user_rules(aclfile: list[Rule]) -> None:
    everyone = {(r.action, r.topic) for r in aclfile if r.who is None}
    expected = {("publish", _emqx_topic(f"im/{p}")) for p in USER_WRITE}
    expected |= {("subscribe", _emqx_topic(f"im/{p}")) for p in USER_READ}
    assert everyone == expected


def test_emqx_grants_exactly_what_mosquitto_grants(aclfile: list[Rule], acl_conf: list[Term]) -> None:
    emqx = emqx_rules(acl_conf)
    mosquitto = {r for r in aclfile if not r.topic.startswith(MOSQUITTO_ONLY)}
    assert {r for r in aclfile if r.topic.startswith(MOSQUITTO_ONLY)} <= {
        Rule("allow", "groups", a, t)
        for a in ("publish", "subscribe")
        for t in ("$CONTROL/dynamic-security/v1", "$CONTROL/dynamic-security/v1/response")
    }
    plain = {e.rule for e in emqx if not e.retain_only}
    assert plain == mosquitto, (
        f"only in Mosquitto: {sorted(map(str, mosquitto - plain))}; only in EMQX: {sorted(map(str, plain - mosquitto))}"
    )
    extra = [e.rule for e in emqx if e.retain_only]
    assert extra and all(r.permission == "deny" for r in extra)  # EMQX's extra rules only take away


def test_emqx_checks_each_service_accounts_denials_first(acl_conf: list[Term]) -> None:
    """EMQX stops at the first matching rule, as Mosquitto checks a user's `topic deny` first."""
    rules = [e.rule for e in emqx_rules(acl_conf)]
    first_for_everyone = min(i for i, r in enumerate(rules) if r.who is None and r.permission == "allow")
    service_rules = [i for i, r in enumerate(rules) if r.who is not None]
    assert service_rules and max(service_rules) < first_for_everyone
    assert acl_conf[-1] == (Atom("deny"), Atom("all"))


def test_same_service_accounts_everywhere(aclfile: list[Rule], acl_conf: list[Term]) -> None:
    mosquitto = {r.who for r in aclfile if r.who is not None}
    emqx = {e.rule.who for e in emqx_rules(acl_conf) if e.rule.who is not None}
    workers = workers_params(compose()["services"]["workers"]["command"])
    run_by_workers = {workers[f"{w}_account"] for w in ("presence", "groups", "archive", "files")}
    assert mosquitto == emqx == run_by_workers == {"presence", "groups", "archive", "files"}
    assert mosquitto <= RESERVED_NAMES  # no user can take a worker's name
    for env_file in (DEPLOY / "emqx" / "workers.env.example", DEPLOY / "systemd" / "workers.env.example"):
        names = {line.split("=", 1)[0] for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#"}
        assert names == {password_variable(a) for a in mosquitto}, env_file


def test_emqx_refuses_retained_chat_on_every_user_write_topic_but_status(acl_conf: list[Term]) -> None:
    refused = [e.rule.topic for e in emqx_rules(acl_conf) if e.retain_only]
    for pattern in USER_WRITE:
        topic = f"im/{pattern}".replace("%u", "alice").replace("+", "x")
        assert any(topic_matches(topic, r) for r in refused) == (not pattern.startswith("status/")), topic


def test_the_emqx_acl_parser_refuses_what_is_not_erlang() -> None:
    assert erlang_terms('{allow, all, publish, ["a/${username}"]}.') == [
        (Atom("allow"), Atom("all"), Atom("publish"), ["a/${username}"])
    ]
    for bad in ('{allow, all, publish, ["a"]}', '{allow, all, publish, ["a"}.', "{allow; all}."):
        with pytest.raises(AssertionError):
            erlang_terms(bad)


# ---------------------------------------------------------------- the EMQX cluster


def compose() -> dict[str, dict[str, dict[str, object]]]:
    loaded = yaml.safe_load((DEPLOY / "emqx" / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def emqx_conf() -> str:
    return (DEPLOY / "emqx" / "emqx.conf").read_text()


def hocon_value(key: str) -> str:
    """One ``key = value`` of emqx.conf inside its block (enough for the keys checked here)."""
    found = re.findall(rf"^\s*{re.escape(key)}\s*=\s*(.+?)\s*$", emqx_conf(), re.MULTILINE)
    assert len(found) == 1, f"{key}: {found}"
    return str(found[0])


def test_compose_describes_a_three_node_emqx_cluster() -> None:
    services = compose()["services"]
    nodes = {name: s for name, s in services.items() if name != "workers"}
    assert len(nodes) == 3
    images = {str(s["image"]) for s in nodes.values()}
    assert len(images) == 1 and re.fullmatch(r"emqx/emqx:5\.\d+\.\d+", images.pop())
    seeds = set(re.findall(r'"(emqx@[^"]+)"', hocon_value("static.seeds")))
    names = set()
    for service in nodes.values():
        env = service["environment"]
        assert isinstance(env, dict)
        name = str(env["EMQX_NODE__NAME"])
        names.add(name)
        host = name.split("@", 1)[1]
        networks = service["networks"]
        assert isinstance(networks, dict)
        assert host == service["hostname"] and host in networks["imcli"]["aliases"]
        assert "EMQX_COOKIE" in str(env["EMQX_NODE__COOKIE"])  # from .env, never in the file
        volumes = service["volumes"]
        assert isinstance(volumes, list)
        assert "./emqx.conf:/opt/emqx/etc/emqx.conf:ro" in volumes
        assert "./acl.conf:/opt/emqx/etc/imcli-acl.conf:ro" in volumes
        ports = service["ports"]
        assert isinstance(ports, list) and all(str(p).startswith("127.0.0.1:") for p in ports)  # loopback only
    assert names == seeds
    assert 'path = "etc/imcli-acl.conf"' in emqx_conf()
    assert hocon_value("discovery_strategy") == "static"


def test_compose_runs_the_three_workers_against_every_node() -> None:
    services = compose()["services"]
    workers = services["workers"]
    params = workers_params(workers["command"])
    nodes = [name for name in services if name != "workers"]
    shared = set.intersection(*(set(services[n]["networks"]["imcli"]["aliases"]) for n in nodes))  # type: ignore[index]
    assert params["host"] in shared  # a reconnect reaches whichever node is up
    assert params["archive"] and not params["dynsec"]  # EMQX has no dynamic-security plugin
    assert params["accounts_file"] is None  # accounts live in EMQX's database
    assert isinstance(workers["depends_on"], dict)  # each node with a healthy condition
    assert sorted(workers["depends_on"]) == sorted(nodes)
    assert workers["env_file"] == ["workers.env"]
    build = workers["build"]
    assert isinstance(build, dict)
    assert (DEPLOY / "emqx" / build["context"] / build["dockerfile"]).is_file()


def test_offline_delivery_limits_match_the_embedded_broker() -> None:
    limits = Limits()
    mosquitto = {}
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and not words[0].startswith("#"):
            mosquitto[words[0]] = words[1]
    assert int(mosquitto["max_queued_messages"]) == limits.max_queued == int(hocon_value("max_mqueue_len"))
    days = limits.session_expiry / 86400
    assert mosquitto["persistent_client_expiration"] == hocon_value("session_expiry_interval") == f"{days:g}d"
    # a queue goes whole before the SUBACK (marked missed): Mosquitto's window has no count limit (0), only
    # a byte bound, so that a worker's retained state never overflows it (deploy/mosquitto/mosquitto.conf)
    assert int(mosquitto["max_inflight_messages"]) == 0 and int(mosquitto["max_inflight_bytes"]) >= 256 << 20
    assert limits.max_queued <= int(hocon_value("max_inflight"))
    # one limit for all there: the embedded broker's for a file's chunks, which the files worker fills
    assert int(mosquitto["message_size_limit"]) == DEFAULT_MAX_CHUNK
    workers = imcli_params(exec_start(DEPLOY / "systemd" / "imcli-workers.service"))
    assert workers["max_payload"] == DEFAULT_MAX_CHUNK


# ---------------------------------------------------------------- systemd units and command lines


def workers_params(command: object) -> dict[str, object]:
    """``imcli workers …`` parsed by the real command: every option known and well-typed."""
    assert isinstance(command, list) and command[:2] == ["imcli", "workers"], command
    return imcli_params([str(word) for word in command[1:]])


def imcli_params(args: list[str]) -> dict[str, object]:
    """Parse ``imcli ARGS`` with the real CLI, without running it; its parameters' values."""
    command = typer.main.get_command(app).commands[args[0]]  # type: ignore[attr-defined]
    with command.make_context(args[0], list(args[1:])) as ctx:
        params = dict(ctx.params)
    help_run = CliRunner().invoke(app, [args[0], "--help"])
    assert help_run.exit_code == 0, help_run.output
    return params


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    # systemd repeats keys (SystemCallFilter=): strict=False keeps the last; values are not interpolated
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def exec_start(path: Path) -> list[str]:
    argv = shlex.split(unit(path)["Service"]["ExecStart"])
    assert Path(argv[0]).name == "imcli", argv
    return argv[1:]


def test_units_start_valid_imcli_commands() -> None:
    assert [p.name for p in UNITS] == ["imcli-serve.service", "imcli-workers.service"]
    serve = imcli_params(exec_start(DEPLOY / "systemd" / "imcli-serve.service"))
    assert serve["bind"] == "127.0.0.1" and serve["registration"] == "closed"
    workers = imcli_params(exec_start(DEPLOY / "systemd" / "imcli-workers.service"))
    assert workers["dynsec"] and workers["archive"]
    assert str(workers["accounts_file"]) == "/etc/mosquitto/imcli/passwd"  # deploy/mosquitto/README.md's path
    for params in (serve, workers):  # everything they write is under the unit's StateDirectory
        written = params.get("data_dir") or params.get("archive_dir")
        assert str(written).startswith("/var/lib/imcli/")


def test_a_wrong_command_line_is_caught() -> None:
    for bad in (["workers", "--no-such-option"], ["workers", "--port", "many"], ["serve", "--bind"]):
        with pytest.raises(Exception, match=r"(?i)option|integer|argument"):
            imcli_params(bad)


@pytest.mark.parametrize("path", UNITS, ids=[p.name for p in UNITS])
def test_units_are_hardened(path: Path) -> None:
    service = unit(path)["Service"]
    assert service["User"] == "imcli" and service["Group"] == "imcli"
    required = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "CapabilityBoundingSet": "", "StateDirectory": "imcli", "UMask": "0077"}  # fmt: skip
    assert {k: service.get(k) for k in required} == required
    assert "imcli" in (DEPLOY / "systemd" / "imcli.sysusers").read_text().split()
    if "workers" in path.name:  # passwords never on the command line
        assert service["EnvironmentFile"] == "/etc/imcli/workers.env"
        assert "--password-stdin" not in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """systemd's own parser, on copies whose ExecStart points at this venv's imcli (it must exist)."""
    imcli = Path(sys.executable).parent / "imcli"  # the venv's console script
    assert imcli.is_file()
    copies = []
    for path in UNITS:
        text = path.read_text().replace("/opt/imcli/venv/bin/imcli", str(imcli))
        text = text.replace("EnvironmentFile=/etc/imcli/", "EnvironmentFile=-/etc/imcli/")
        (tmp_path / path.name).write_text(text)
        copies.append(str(tmp_path / path.name))
    verify = ["systemd-analyze", "verify", "--man=no", *copies]
    result = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# ---------------------------------------------------------------- imcli workers: bad input


@pytest.mark.parametrize(
    ("args", "stdin", "error"),
    [
        (["--presence-account", "same", "--groups-account", "same"], None,
         "Error: the 4 workers need 4 service accounts (give different names)"),
        (["--archive-account", "Bad!"], None, "Error: invalid service account name 'Bad!'"),
        (["--history-days", "0"], None, "Error: invalid --history-days 0"),
        (["--no-archive", "--history-days", "3"], None, "Error: invalid --history-days 3"),
        (["--password-stdin"], "p-presence\np-groups\n", "Error: no password for the service account 'archive'"),
        (["--archive-dir", "{file}/archive"], None, "Error: cannot create the archive directory"),
    ],
)  # fmt: skip
def test_workers_refuse_bad_input_before_connecting(
    args: list[str], stdin: str | None, error: str, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    env = {f"IMCLI_{a.upper()}_PASSWORD": f"p-{a}" for a in ("presence", "groups", "archive", "files")}
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    # port 1: nothing listens there, so getting past the checks would fail differently
    result = CliRunner().invoke(app, ["workers", "--port", "1", *args], input=stdin, env=env)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(error) and len(result.stderr.strip().splitlines()) == 1, result.stderr
