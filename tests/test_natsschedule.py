"""tests/natsschedule.py: under ``pytest -n``, every NATS test runs on one xdist worker, first there,
test_nats.py's before the others (those not on its module cluster first); every other test is a work
unit of its own.

The end-to-end checks run a small suite in a child ``pytest -n 2`` with this project's conftest as a
plugin (``-p tests.conftest``), so what is checked is the hooks the README's ``pytest -n auto`` uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.natsschedule import NATS_SCOPE, NatsOnOneWorker, is_nats_test

ROOT = Path(__file__).resolve().parent.parent

RECORDER = """
import os


def record(request):
    with open(os.environ["RECORD"], "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + " " + request.node.nodeid + "\\n")
"""

BROKERS_MODULE = """
import pytest

from record import record


@pytest.fixture(params=["amqtt", "mosquitto", "nats"]{ids})
def broker_kind(request):
    return request.param


@pytest.mark.parametrize("n", range(4))
def test_on_a_broker(broker_kind, n, request):
    record(request)


def test_without_a_broker(request):
    record(request)
"""

NATS_MODULE = """
import pytest

from record import record


@pytest.fixture(scope="module")
def cluster():
    return "the module's"


def test_one(cluster, request):
    record(request)


def test_two(cluster, request):
    record(request)


def test_on_a_cluster_of_its_own(request):
    record(request)
"""


def run_child(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # this run's xdist worker's
    env = {**outer, "PYTHONPATH": f"{ROOT}{os.pathsep}{where}", "RECORD": str(where / "record.log")}
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=120, check=False)


def write_suite(where: Path, ids: str = "") -> None:
    (where / "record.py").write_text(RECORDER)
    (where / "test_brokers.py").write_text(BROKERS_MODULE.replace("{ids}", ids))
    (where / "test_nats.py").write_text(NATS_MODULE)


@pytest.mark.parametrize(
    ("nodeid", "on_nats"),
    [
        ("tests/test_nats.py::test_room_line_crosses_nodes", True),
        ("tests/test_nats.py::test_host_lists[a-endpoints0]", True),
        ("tests/test_groups.py::test_kick[nats]", True),
        ("tests/test_history.py::test_limit[nats-3]", True),
        ("tests/test_history.py::test_limit[3-nats]", True),
        ("tests/test_groups.py::test_kick[amqtt]", False),
        ("tests/test_groups.py::test_kick[mosquitto]", False),
        ("tests/test_units.py::test_what_mosquitto_and_nats_let_them", False),
        ("tests/test_units.py::test_names[natsy]", False),
        ("tests/test_natsschedule.py::test_x", False),
    ],
)
def test_a_nats_test_is_told_by_its_id(nodeid: str, on_nats: bool) -> None:
    assert is_nats_test(nodeid) is on_nats


def test_every_nats_test_is_one_scope_and_every_other_test_its_own() -> None:
    split = NatsOnOneWorker._split_scope  # the only method it changes; it reads nothing of the instance
    nats = ["tests/test_nats.py::test_one", "tests/test_groups.py::test_kick[nats]"]
    others = ["tests/test_groups.py::test_kick[amqtt]", "tests/test_groups.py::test_kick[mosquitto]"]
    assert {split(None, nodeid) for nodeid in nats} == {NATS_SCOPE}  # type: ignore[arg-type]
    assert [split(None, nodeid) for nodeid in others] == others  # type: ignore[arg-type]


@pytest.mark.slow
def test_under_xdist_the_nats_tests_run_first_on_one_worker(tmp_path: Path) -> None:
    write_suite(tmp_path)
    result = run_child(tmp_path, "-n", "2")
    assert result.returncode == 0, result.stdout + result.stderr

    ran = [line.split(" ", 1) for line in (tmp_path / "record.log").read_text().splitlines()]
    assert len(ran) == 3 + 3 * 4 + 1  # every test once
    nats_workers = {worker for worker, nodeid in ran if is_nats_test(nodeid)}
    assert len(nats_workers) == 1, ran
    (nats_worker,) = nats_workers
    assert nats_worker.startswith("gw"), ran
    on_that_worker = [nodeid for worker, nodeid in ran if worker == nats_worker]
    assert on_that_worker[:7] == [  # test_nats.py's own-cluster tests before its module cluster starts
        "test_nats.py::test_on_a_cluster_of_its_own",
        "test_nats.py::test_one",
        "test_nats.py::test_two",
        *(f"test_brokers.py::test_on_a_broker[nats-{n}]" for n in range(4)),
    ]


@pytest.mark.slow
def test_a_nats_parameter_the_id_does_not_show_fails_the_collection(tmp_path: Path) -> None:
    write_suite(tmp_path, ids=', ids=["embedded", "mosq", "cluster"]')
    result = run_child(tmp_path, "--collect-only")
    assert result.returncode != 0
    assert "runs on NATS but tests/natsschedule.py does not see it in its id" in result.stdout + result.stderr
