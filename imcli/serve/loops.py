"""Which event loop runs the embedded broker: asyncio's own (its selector loop) or uvloop's
(libuv, in C), chosen with ``imcli serve --loop`` or the ``IMCLI_LOOP`` environment variable
(``BackgroundServer`` and the benchmarks' embedded broker read it too).

Both run the same code: the broker's reader hooks its connection's ``data_received``
(imcli/broker/reader.py) in a way both loops honour. docs/PERFORMANCE.md has both loops' figures
and why the default is what it is. asyncio's loop runs on ``livefirst.LiveFirstSelector`` (Linux):
a poll of thousands of ready sockets, a mass leave's, is served a bounded slice a round, live
connections first (docs/PERFORMANCE.md, issue 21, eighth session); ``LIVE_FIRST = False``: the
stdlib's selector (``benchmarks.leave --plain-selector``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from imcli.core.errors import InvalidInput
from imcli.core.text import quoted
from imcli.serve import livefirst

LOOPS = ("asyncio", "uvloop")
DEFAULT_LOOP = "asyncio"
ENV = "IMCLI_LOOP"
LIVE_FIRST = True  # see the module docstring

T = TypeVar("T")


def chosen_loop(name: str | None = None) -> str:
    """``name``, or else ``IMCLI_LOOP``, or else ``DEFAULT_LOOP``, checked: one of ``LOOPS``, and
    uvloop importable if it is the one."""
    loop = name or os.environ.get(ENV) or DEFAULT_LOOP
    if loop not in LOOPS:
        raise InvalidInput(
            f"unknown event loop {quoted(loop)}", "use --loop asyncio or --loop uvloop, in IMCLI_LOOP too"
        )
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            raise InvalidInput("uvloop is not installed", "pip install uvloop, or use --loop asyncio") from exc
    return loop


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner`` makes its loop with (``None``: asyncio's default, as ``asyncio.run``):
    uvloop's, or asyncio's selector loop on ``livefirst.new_selector()``."""
    if chosen_loop(name) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if LIVE_FIRST:
        return _live_first_loop
    return None


def _live_first_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(livefirst.new_selector())


def run(main: Coroutine[Any, Any, T], loop: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop (``chosen_loop``)."""
    try:
        factory = loop_factory(chosen_loop(loop))
    except BaseException:
        main.close()  # never awaited: no warning of it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
