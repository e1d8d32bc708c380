"""What every imcli command shares: the one error handler and the common options. The
options become an identity in :mod:`imcli.client.identity`.

Heavy modules (paho, pydantic, Rich) are imported inside the helpers that need them, so
importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from imcli.cli.say import is_text
from imcli.core.errors import ImcliError, InvalidInput
from imcli.core.text import quoted, safe

if TYPE_CHECKING:
    from imcli.broker.accounts import AccountStore


def print_error(exc: ImcliError) -> None:
    """The one way users see an expected failure: ``Error: <what> (<what to do>)`` on stderr, one
    line: what it quotes (a worker's or a broker's words, a certificate's names, what was typed)
    is ``safe``."""
    from rich.console import Console
    from rich.text import Text

    error = Text("Error: ", style="bold red") + Text(safe(str(exc)))
    Console(stderr=True, highlight=False, soft_wrap=True).print(error)


class CliGroup(TyperGroup):
    """Every command group: an ImcliError becomes one red line and exit code 1, never a traceback;
    a usage error (a missing argument, an unknown option) one line with the usage, exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ImcliError as exc:
            print_error(exc)
            raise typer.Exit(1) from exc

    def main(  # type: ignore[override]
        self, args: Any = None, prog_name: str | None = None, standalone_mode: bool = True, **kwargs: Any
    ) -> Any:
        tidy_help(self)
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **kwargs)
        # Typer 0.29 vendors click as typer._click; its usage errors are not re-exported (BadParameter is)
        from typer._click import exceptions as click

        try:
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.NoArgsIsHelpError as exc:  # `imcli group`: the help, as Typer shows it
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            print_error(usage_error(exc))
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            print_error(InvalidInput(_sentence(exc.format_message()), "see --help"))
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


_TYPE_NAMES = {"<str>": "TEXT", "<int>": "N", "<float>": "NUMBER", "<path>": "PATH", "<list[str]>": "TEXT"}
_BRACKET = re.compile(r"\[[^\]]*\]")
_KEEP = str.maketrans({" ": "\u00a0", "-": "\u2011"})  # while wrapping only: click breaks at spaces and hyphens
_UNKEEP = str.maketrans({"\u00a0": " ", "\u2011": "-"})


def _formatter_class() -> type:
    from typer._click.formatting import HelpFormatter  # Typer 0.29 vendors click

    class TidyFormatter(HelpFormatter):
        """Wraps help without splitting a bracket (``[default: 1883]``, ``[env var: IMCLI_PORT]``)."""

        def write_dl(self, rows: Any, *args: Any, **kwargs: Any) -> None:
            start = len(self.buffer)
            kept = [(a, _BRACKET.sub(lambda m: m.group().translate(_KEEP), b)) for a, b in rows]
            super().write_dl(kept, *args, **kwargs)
            self.buffer[start:] = [part.translate(_UNKEEP) for part in self.buffer[start:]]

    return TidyFormatter


def tidy_help(command: Any) -> None:
    """Help as a person reads it. Typer 0.29 shows arguments as ``{user} <str>`` and values as
    ``<int>``: here ``USER``, ``--port N``; a bracket never wraps in two; ``{default_data_dir}`` in
    a help string is the real default. Typer has no setting for these, so each command's context
    class and each parameter's public help hooks are replaced here, once."""
    if getattr(command, "_tidy", False):
        return
    command._tidy = True
    context = command.context_class
    command.context_class = type("TidyContext", (context,), {"formatter_class": _formatter_class()})
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            piece = (param.metavar if param.required else f"[{param.metavar}]") + ("..." if param.nargs != 1 else "")
            param.get_usage_pieces = lambda ctx, piece=piece: [piece]
            param.display_type_rich = lambda ctx: ""
        else:
            shown = param.display_type_rich
            param.display_type_rich = lambda ctx, shown=shown: _TYPE_NAMES.get(t := shown(ctx), t.strip("<>").upper())
        param.process_value = _finite(
            param.process_value,
            local_paths=(command.name, param.name) in LOCAL_PATHS,
            numbers=_number_kinds(param),
        )
        if param.help and "{default_data_dir}" in param.help:
            from imcli.client.config import default_data_dir

            home = str(Path.home())
            where = str(default_data_dir())
            param.help = param.help.replace(
                "{default_data_dir}", "~" + where[len(home) :] if where.startswith(home + "/") else where
            )
    if command.help and not command.short_help:  # `imcli --help` lists each command's first sentence whole
        command.short_help = " ".join(command.help.split("\n\n")[0].split())
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


# the text parameters that also carry local file names, which may be any bytes (a name on disk that
# is not UTF-8 arrives as lone surrogates, and `imcli send` sends it under a name made plain)
LOCAL_PATHS = frozenset({("send", "args")})


_WHOLE = re.compile(r"-?[0-9]+")
_REAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def whole_number(text: str) -> int:
    """The one reading of a whole number typed on the command line or in an IMCLI_* variable: ASCII
    digits, a ``-`` in front for a negative one (each option's own check then says which range it
    takes: ``invalid port -1 (use 0-65535)``). Not what Python's ``int`` also takes: other scripts'
    digits (``٣``), ``1_000``, a ``+``, spaces around; nor what pydantic adds (``1.0``)."""
    if not _WHOLE.fullmatch(text):
        raise typer.BadParameter(f"{quoted(text)} is not a whole number (digits 0-9 only)")
    try:
        return int(text)
    except ValueError:  # longer than int() reads (4,300 digits)
        raise typer.BadParameter(f"{quoted(text)} is too long for a number") from None


def real_number(text: str) -> float:
    """The one reading of a number with a fraction: ASCII digits with an optional ``.`` and exponent
    (``2.5``, ``.5``, ``1e3``), a ``-`` in front. Not ``nan``, ``inf``, other scripts' digits
    (``\\u0661.\\u0665``) or ``1_0``; nor a number too large for a float (``1e400``) or too small to be held as
    written (``1e-320`` is a subnormal, ``1e-400`` would be 0)."""
    import math

    if not _REAL.fullmatch(text):
        raise typer.BadParameter(f"{quoted(text)} is not a number (digits 0-9, a '.', an exponent as in 1e3)")
    value = float(text)
    if not math.isfinite(value):
        raise typer.BadParameter(f"{quoted(text)} is too large a number")
    written_zero = not any(c in "123456789" for c in text.lower().partition("e")[0])
    if (value == 0) != written_zero or 0 < abs(value) < sys.float_info.min:
        raise typer.BadParameter(f"{quoted(text)} is too close to 0 (give 0, or at least {sys.float_info.min:.1e})")
    return value


def _read_number(value: Any, kinds: tuple[Any, ...]) -> Any:
    """A number's text as ``whole_number`` or ``real_number`` reads it, before Typer's own coercion."""
    if isinstance(value, (list, tuple)):
        return type(value)(_read_number(item, kinds) for item in value)
    if not isinstance(value, str):
        return value  # a default, already a number
    if int in kinds:
        return whole_number(value)
    return real_number(value)


def _number_kinds(param: Any) -> tuple[Any, ...]:
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kinds = typing.get_args(annotation) or (annotation,)
    kinds = tuple(k for a in kinds for k in (typing.get_args(a) or (a,)))  # list[int]
    return kinds if (int in kinds or float in kinds) and bool not in kinds else ()


def _finite(process: Any, *, local_paths: bool, numbers: tuple[Any, ...] = ()) -> Any:
    """A parameter's conversion that reads numbers as ``whole_number`` and ``real_number`` do and
    refuses text that is not text: Typer turned ``nan`` into a float like any number (``--max-rate
    nan`` was a traceback far from the option), and takes ``1_000`` and ``1.0`` as whole numbers; an
    argument with bytes that are not UTF-8 (``imcli dm bob $'\xff'``) arrives as lone
    surrogates, which no payload can carry, and was a traceback wherever it reached the wire
    (``dm``, ``group say``, ``profile set``, ``moments post``, ``get``, …). Every parameter of every
    command, since ``tidy_help`` walks them all; a path (``Path``, or one of ``LOCAL_PATHS``) may
    name any file."""

    def finite(ctx: Any, value: Any) -> Any:
        import math

        if numbers:
            value = _read_number(value, numbers)
        value = process(ctx, value)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise typer.BadParameter(f"a finite number is needed, not {item}")
            if isinstance(item, str) and not local_paths and not is_text(item):
                raise typer.BadParameter(f"{quoted(item)} holds bytes that are not UTF-8 text")
        if isinstance(value, Path):
            return _home(value)
        if isinstance(value, (list, tuple)) and any(isinstance(item, Path) for item in value):
            return type(value)(_home(item) if isinstance(item, Path) else item for item in value)
        return value

    return finite


NAME_MAX, PATH_MAX = 255, 4096  # bytes of one component and of a whole path (Linux's limits)


def local_path(name: str | Path) -> Path:
    """A file name as typed, ``~`` and ``~user`` expanded; one error line for what no system call can
    take: a ``~nosuchuser/x`` (the RuntimeError of ``Path.expanduser``), a name too long (the OSError
    ENAMETOOLONG of whatever opens it: ``get -o``, ``--ca``), a NUL (the ValueError of ``open``)."""
    text = str(name)
    if "\x00" in text:
        raise InvalidInput(f"invalid file name {quoted(text)}: it holds a NUL", "give the path without it")
    raw = os.fsencode(text)
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise InvalidInput(
            f"file name too long: {quoted(text)}", f"at most {NAME_MAX} bytes a name and {PATH_MAX - 1} a path"
        )
    try:
        return Path(name).expanduser()
    except RuntimeError:
        raise InvalidInput(
            f"no home directory for {quoted(text.split('/', maxsplit=1)[0])}", "give the path without ~"
        ) from None


def _home(path: Path) -> Path:
    """Every ``Path`` parameter, expanded and checked as it is read (``local_path``: a usage error)."""
    try:
        return local_path(path)
    except InvalidInput as exc:
        raise typer.BadParameter(str(exc)) from None


def usage_error(exc: Any) -> InvalidInput:
    """click's usage error as one line: what is wrong (usage: …; more: … --help)."""
    ctx = exc.ctx
    if ctx is None:
        return InvalidInput(_sentence(exc.format_message()), "see imcli --help")
    param = getattr(exc, "param", None)
    if param is not None and getattr(param, "envvar", None) and getattr(exc, "param_hint", None) is None:
        # click names the option's variable whether the value came from it or not ("'--port' (env var:
        # 'IMCLI_PORT')" for --port abc): named only when the value was read from it
        from typer._click.core import ParameterSource

        opts = " / ".join(f"'{o}'" for o in param.opts)
        came = ctx.get_parameter_source(param.name) if param.name else None
        exc.param_hint = f"{opts} (from {param.envvar})" if came is ParameterSource.ENVIRONMENT else opts
    usage = " ".join([ctx.command_path, *ctx.command.collect_usage_pieces(ctx)])
    return InvalidInput(_sentence(exc.format_message()), f"usage: {usage}; more: {ctx.command_path} --help")


def _sentence(text: str) -> str:
    """click's "Missing argument 'NAME'." as a clause: "missing argument 'NAME'"."""
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def sub_app(help_text: str) -> typer.Typer:
    """A noun's sub-app (``imcli group …``) with the shared error handling."""
    return typer.Typer(cls=CliGroup, help=help_text, no_args_is_help=True, rich_markup_mode=None)


HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="IMCLI_HOST",
        help="Broker host, or a cluster's nodes: a:1883,b:1883,c:1883 [default: profile's, else 127.0.0.1]",
    ),
]
PortOpt = Annotated[
    int | None,
    typer.Option("--port", envvar="IMCLI_PORT", help="Broker port [default: profile's, else 1883]"),
]
TlsOpt = Annotated[
    bool | None,
    typer.Option("--tls/--no-tls", help="Speak TLS to the broker [default: IMCLI_TLS, else profile's, else no]"),
]
CaOpt = Annotated[
    Path | None,
    typer.Option("--ca", help="PEM file of the CA that signed the broker's certificate (implies --tls; IMCLI_CA)"),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="IMCLI_DATA_DIR", help="Broker data directory [default: {default_data_dir}]"),
]


PIPED_WIDTH = 4096  # columns of a table written to a pipe or a file: a name is never cut ("report.…")


def console() -> Any:
    """Standard output as Rich writes it: on a terminal, to its width; piped, tables as wide as their
    rows (Rich would cut every column to fit 80), so ``imcli files | grep report`` finds the file."""
    from rich.console import Console

    piped = not sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=True, width=PIPED_WIDTH if piped else None)


def err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def not_answered(what: str) -> None:
    """A list shown without what a worker should have added to it says so, on standard error (a list
    without signatures looked like one where nobody had any)."""
    err_console().print(f"({what} not shown: the presence worker did not answer)", style="dim")


def check_tls_options(cert: Path | None, key: Path | None) -> None:
    """``imcli serve``'s --tls-cert/--tls-key: both or neither, and a pair that loads."""
    if (cert is None) != (key is None):
        raise InvalidInput("--tls-cert and --tls-key go together", "give both PEM files, or neither")
    if cert is not None and key is not None:
        from imcli.broker.server import check_tls_files

        try:
            check_tls_files(cert, key)
        except ValueError as exc:
            raise InvalidInput(f"unusable TLS certificate: {exc}", "give a PEM certificate and its key") from exc


def ask_password(from_stdin: bool, *, confirm: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise InvalidInput(
                "no password on stdin", "give it as the first line of stdin, or leave out --password-stdin to be asked"
            )
        return line
    env = os.environ.get("IMCLI_PASSWORD")
    if env:
        return env
    if not sys.stdin.isatty():
        raise InvalidInput("no password given", "type it at a terminal, set IMCLI_PASSWORD or use --password-stdin")
    if confirm:
        return ask_new_password()
    value: str = typer.prompt("Password", hide_input=True)
    return value


NEW_PASSWORD_TRIES = 3


def ask_new_password(label: str = "Password") -> str:
    """A new password typed twice at the terminal: its length is checked before it is asked again,
    and after three tries that fail (too short, or two that differ) the command gives up."""
    from imcli.broker.accounts import check_password

    for left in range(NEW_PASSWORD_TRIES - 1, -1, -1):
        first: str = typer.prompt(label, hide_input=True)
        try:
            check_password(first)
        except InvalidInput as exc:
            problem = str(exc)
        else:
            if typer.prompt("Repeat it", hide_input=True) == first:
                return first
            problem = "the two passwords differ"
        if left:
            typer.echo(f"{problem}; try again ({left} {'tries' if left > 1 else 'try'} left)", err=True)
    raise InvalidInput(f"{problem}, {NEW_PASSWORD_TRIES} times", "run the command again when you have one in mind")


def account_store(data_dir: Path | None) -> AccountStore:
    from imcli.broker.accounts import AccountStore
    from imcli.client.config import default_data_dir

    return AccountStore((data_dir or default_data_dir()).expanduser())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> float:
    """``30m``, ``2h``, ``3d`` ago; or a local date/time (``2026-11-23``, ``2026-11-23 09:30``, ``09:30`` today)."""
    import datetime as dt

    value = text.strip()
    if value[:-1].isascii() and value[:-1].isdigit() and value[-1:] in _UNITS:
        ago = int(value[:-1]) * _UNITS[value[-1]]  # any size: longer ago than 1970 is since the start
        return now - ago if ago < now else 0.0
    today = dt.datetime.fromtimestamp(now).date()
    for fmt, on_today in (("%H:%M", True), ("%Y-%m-%d", False), ("%Y-%m-%d %H:%M", False), ("%Y-%m-%dT%H:%M", False)):
        try:
            parsed = dt.datetime.strptime(value, fmt)
        except ValueError:
            continue
        if on_today:
            parsed = dt.datetime.combine(today, parsed.time())
        try:
            return max(0.0, parsed.timestamp())  # a date before 1970: since the start
        except (ValueError, OverflowError, OSError):  # year 1: before any local time the platform knows
            return 0.0
    raise InvalidInput(f"invalid time {quoted(text)}", "give a duration (30m, 2h, 3d) or a time (2026-11-23 09:30)")
