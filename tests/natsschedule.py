"""Every test on a NATS cluster runs on one xdist worker; every other test is handed out one by one.

Each xdist worker that runs a test of ``brokers.ALL`` on NATS starts its own shared three-node cluster
(tests/conftest.py's ``nats_shared``), and test_nats.py starts one of its own: with ``pytest -n auto``
on two cores that was six to nine nats-server processes with JetStream at once, and CI saw requests
unanswered within the wait and queued DMs late. So the controller's scheduler (conftest's
``pytest_xdist_make_scheduler``) makes one work unit of the NATS tests and one unit of each other test;
the NATS unit is first in the collection (``nats_first``), so it starts at once on one worker while the
other worker takes every other test, one at a time, until it joins in.

``--dist loadgroup`` with ``xdist_group`` marks does not work here: pytest-xdist 3.8 names a group by
rewriting ``Node._nodeid``, which pytest 9 no longer has, so the marks silently did nothing.

The controller sees node ids only, so a NATS test is told by its id (``is_nats_test``); on the workers
``nats_first`` checks that the id agrees with the test's ``broker_kind`` parameter, so a renamed
parameter fails the collection instead of spreading the NATS tests again.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from xdist.scheduler import LoadScopeScheduling

NATS_MODULE = "test_nats.py"  # its own cluster per module (its `cluster` fixture): it goes first in the unit
NATS_SCOPE = "the NATS cluster"


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def is_nats_test(nodeid: str) -> bool:
    """test_nats.py's tests, and every test whose parameter ids include ``nats`` (``brokers.ALL``'s
    ``broker_kind``, as in ``test_x[nats]`` or ``test_x[nats-3]``)."""
    if _module(nodeid) == NATS_MODULE:
        return True
    name = nodeid.rsplit("::", 1)[-1]
    if not name.endswith("]") or "[" not in name:
        return False
    return "nats" in name[name.index("[") + 1 : -1].split("-")


class NatsOnOneWorker(LoadScopeScheduling):  # type: ignore[misc]  # xdist ships no type information
    """``--dist loadscope`` with two kinds of scope: every NATS test in one, every other test alone
    (as ``--dist load`` hands them out)."""

    def _split_scope(self, nodeid: str) -> str:
        return NATS_SCOPE if is_nats_test(nodeid) else nodeid


def nats_first(items: list[pytest.Item]) -> None:
    """Reorders ``items`` in place: test_nats.py's tests without its module cluster (some start a cluster
    of their own), then those on that cluster, then the other NATS tests (on the shared cluster), then
    the rest, each part in its order. The NATS unit, the longest (8 to 18 min of the run on one worker),
    is then handed out first, and no two three-node clusters run at once on that worker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_nats = callspec is not None and callspec.params.get("broker_kind") == "nats"
        if on_nats and not is_nats_test(item.nodeid):
            raise pytest.UsageError(f"{item.nodeid} runs on NATS but tests/natsschedule.py does not see it in its id")

    def rank(item: pytest.Item) -> int:
        if not is_nats_test(item.nodeid):
            return 3
        if _module(item.nodeid) != NATS_MODULE:
            return 2
        return 1 if "cluster" in getattr(item, "fixturenames", ()) else 0

    items[:] = sorted(items, key=rank)  # sorted is stable


def scheduler(config: pytest.Config, log: object) -> NatsOnOneWorker | None:
    """The scheduler for ``--dist load`` (what ``-n`` means unless told otherwise); None (xdist's own)
    for any other ``--dist`` asked for on the command line."""
    if config.getoption("dist") != "load":
        return None
    return NatsOnOneWorker(config, log)


__all__: Sequence[str] = ["NatsOnOneWorker", "is_nats_test", "nats_first", "scheduler"]
