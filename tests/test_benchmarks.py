"""Smoke test of the benchmark suite's scenario code at tiny sizes (no figure is asserted).

The figures themselves are for docs/PERFORMANCE.md, never for assertions: this only checks
that every scenario runs against the embedded default and reports what it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import SCENARIOS
from benchmarks.brokers import MOSQUITTO_PUB, MOSQUITTO_SUB
from benchmarks.quantile import interval, quantile, ratio_interval

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(330)  # eleven scenarios, each on a broker of its own, on a shared machine
def test_every_scenario_runs_at_tiny_size(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--brokers", "embedded", "--no-charts", "--out", str(tmp_path),
         "--only", ",".join(s for s in SCENARIOS if s != "devices")],  # devices: its own test below
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (written,) = tmp_path.glob("*-tiny.json")
    doc = json.loads(written.read_text())
    scenarios = doc["scenarios"]
    for name in ("dm", "capacity", "churn", "storm"):
        assert "error" not in scenarios[name]["embedded"], scenarios[name]
    assert scenarios["dm"]["embedded"]["samples"] == doc["sizes"]["samples"]
    capacity = scenarios["capacity"]["embedded"]
    assert capacity["joined"] == capacity["rejoined"] == capacity["who_users"] == doc["sizes"]["capacity"]
    assert capacity["stall_longest_ms"] > 0  # the PINGREQ probe ran beside the crowds
    storm = scenarios["storm"]["embedded"]  # production argon2, a restart, everyone back
    assert storm["joined"] == storm["rejoined"] == doc["sizes"]["storm"]
    assert storm["stall_longest_ms"] > 0
    assert scenarios["churn"]["embedded"]["roster_consistent"] is True
    if MOSQUITTO_SUB and MOSQUITTO_PUB:
        expected = doc["sizes"]["members"] * doc["sizes"]["messages"]
        assert scenarios["fanout_qos1"]["embedded"]["deliveries"] == expected
        for shape in ("stream", "rooms", "group"):  # at QoS 1 every line reaches every listener of its room
            figures = scenarios[f"{shape}_qos1"]["embedded"]
            assert figures["deliveries"] == figures["expected_deliveries"] > 0, figures
        dmflood = scenarios["dmflood"]["embedded"]
        assert dmflood["samples"] == doc["sizes"]["samples"] and dmflood["flood_sent"] > 0
        dmbusy = scenarios["dmbusy"]["embedded"]  # the DMs, with a room flood and file transfers meanwhile
        assert dmbusy["samples"] == doc["sizes"]["samples"] and dmbusy["flood_sent"] > 0 and dmbusy["transfers"] > 0
        assert scenarios["cold"]["embedded"]["imcli_say_ms"] > 0
    else:
        assert "fanout" in doc["skipped"]
    assert "target" in run.stdout.lower()


@pytest.mark.timeout(300)
def test_devices_scenario_runs_at_tiny_size(tmp_path: Path) -> None:
    """Issue 17's scenario: devices reconnect with their credentials after a restart (production
    argon2 for passwords, so the broker's start alone takes seconds)."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--only", "devices", "--no-charts", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (written,) = tmp_path.glob("*-tiny.json")
    doc = json.loads(written.read_text())
    figures = doc["scenarios"]["devices"]["embedded"]
    devices = doc["sizes"]["devices"]
    assert figures["reconnected"] == figures["reconnected_under_attack"] == devices, figures
    assert figures["refused"] == devices  # every wrong and unknown credential: CONNACK 4
    assert figures["credential_checks_per_s"] > 0 and figures["argon2_check_ms"] > 0
    assert "devices: reconnects/s" in run.stdout


def test_the_stall_list_keeps_every_phase_and_each_phases_longest() -> None:
    """A 30-minute run's list must not lose the hold's or the leave's stalls behind a noisy join."""
    from benchmarks.stallprobe import _kept

    join = [(float(i), 0.06, "join", 0.0, 0.06) for i in range(40)] + [(40.0, 0.9, "join", 0.9, 0.0)]
    hold, leave = (50.0, 0.07, "hold", 0.01, 0.06), (60.0, 0.5, "leave", 0.5, 0.0)
    kept = _kept([*join, hold, leave])
    assert [stall for stall in kept if stall[2] != "join"] == [hold, leave]
    assert (40.0, 0.9, "join", 0.9, 0.0) in kept  # the join's longest, past its first 25
    assert len([stall for stall in kept if stall[2] == "join"]) == 26
    assert kept == sorted(kept)  # in the order they ended


def test_a_p99_is_bounded_only_by_enough_pings() -> None:
    """The order-statistics interval of benchmarks/filesping.py's p99s: a hundred pings bound a p99
    from below only (its upper bound would be past the largest ping); three thousand bound it on
    both sides, a few dozen pings either side of it; the median's interval is the textbook one."""
    pings = [float(i) for i in range(1, 3001)]
    assert interval(pings[:100], 0.99) == (97.0, None)
    low, high = interval(pings, 0.99)
    assert low is not None and high is not None
    assert low < (quantile(pings, 0.99) or 0.0) < high
    assert (low, high) == (2959.0, 2981.0)
    assert interval(pings[:1000], 0.5) == (469.0, 532.0)  # n/2 -+ 1.96 sqrt(n)/2, rounded outwards
    assert ratio_interval((4.0, 6.0), (1.0, 2.0)) == (2.0, 6.0)
    assert ratio_interval((4.0, None), (1.0, 2.0)) == (2.0, None)


def test_the_stall_probe_tells_a_busy_loop_from_a_wait_for_a_core() -> None:
    """``schedstat`` reads the main thread's own time on a core (and waiting for one): a thread that
    computes for 60 ms shows about that much run time; one that sleeps 60 ms shows almost none."""
    import os
    import threading

    from benchmarks.stallprobe import _figures, schedstat

    assert schedstat(None) == (0.0, 0.0)
    assert schedstat(2**22 + 12345) == (0.0, 0.0)  # no such process
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("schedstat(pid) is the process's main thread")
    ran0, _ = schedstat(os.getpid())
    end = time.thread_time() + 0.06
    while time.thread_time() < end:
        pass
    ran1, _ = schedstat(os.getpid())
    time.sleep(0.06)
    ran2, _ = schedstat(os.getpid())
    assert ran1 - ran0 >= 0.055 and ran2 - ran1 < 0.02
    figures = _figures([0.01, 0.3, 0.08], ran=[0.01, 0.02, 0.07])
    assert figures["stalls_over_50ms"] == 2 and figures["own_stalls_over_50ms"] == 1
    assert figures["own_stall_longest_ms"] == 70.0


@pytest.mark.timeout(120)
def test_filesping_reports_each_transfer_and_a_summary_at_tiny_size() -> None:
    """``python -m benchmarks.filesping`` on the embedded broker, one round of two 1 MiB transfers:
    a line for the run (each transfer's p99s and their ratio, the pings' cost to the broker) and a
    summary line (the pooled p99s with their intervals, the per-transfer ratios, the ms added)."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.filesping", "--brokers", "embedded", "--rounds", "1", "--transfers", "2",
         "--mib", "1", "--idle-s", "0.5", "--period-ms", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, summary = (json.loads(line) for line in run.stdout.splitlines())
    assert first["broker"] == "embedded" and first["period_ms"] == 5.0
    assert len(first["transfers"]) == 2 and all(t["idle_pings"] > 50 for t in first["transfers"])
    assert first["ping_cost"]["broker_us_per_ping"] > 0
    assert summary["summary"] is True and summary["transfers"] == len(summary["ratios"]) <= 2
    assert summary["idle_pings"] == first["idle_pings"] and summary["pings"] == first["pings"]
    # what a transfer adds in ms, next to each ratio: the p99 during minus without
    assert summary["added_p99_ms"] == round(summary["transfer_p99"] - summary["idle_p99"], 3)
    assert [t["added_p99_ms"] for t in first["transfers"]] == summary["added_p99_ms_of_transfers"]
    low, high = summary["idle_p99_ci95"]  # about 100 pings per idle phase: bounded from below
    assert low is not None and low <= summary["idle_p99"] and (high is None or high >= summary["idle_p99"])


def test_the_leave_floors_responder_answers_as_a_broker_would() -> None:
    """benchmarks.leavefloor's server (the floor under the broker's CPU per disconnect) answers CONNECT,
    SUBSCRIBE and PINGREQ, waits for a packet's missing bytes, and stops at DISCONNECT."""
    from benchmarks.leavefloor import CONNACK, PINGRESP, answers

    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 0])
    subscribe = bytes([0x82, 8, 0, 7, 0, 3]) + b"a/b" + bytes([1])
    buffer = bytearray(connect + subscribe[:5])
    assert answers(buffer) == (CONNACK, False) and buffer == subscribe[:5]
    buffer += subscribe[5:] + b"\xc0\x00" + b"\xe0\x00" + b"\xc0\x00"
    assert answers(buffer) == (b"\x90\x03\x00\x07\x01" + PINGRESP, True)
    assert buffer == b"\xc0\x00"  # after the DISCONNECT: left unread


@pytest.mark.timeout(120)
def test_chunkwait_counts_chunks_and_pings_at_tiny_size() -> None:
    """``python -m benchmarks.chunkwait`` (the broker in this process): one 2 MiB transfer, up and
    down, is 9 chunks each way, 8 of 262,136 bytes and one of 64 (below ``reader.BULK``, not a file's
    chunk to the rule nor to the count); the pings are counted and their waits measured."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.chunkwait", "--mib", "2", "--transfers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (line,) = (json.loads(text) for text in run.stdout.splitlines() if text.startswith("{"))
    assert line["rule"] is True and line["chunks"] == 16
    assert line["pings"] > 0 and 0 <= line["pings_behind_a_later_chunk"] <= line["pings"]
    assert line["chunk_cpu_ms_median"] > 0


@pytest.mark.timeout(120)
def test_chatpath_splits_each_pings_way_and_counts_the_chunks_it_waited_behind() -> None:
    """``python -m benchmarks.chatpath`` (the broker in this process): one 2 MiB transfer, up and
    down, is 8 chunks of 262,136 bytes each way handled and written (the 64-byte rest is no chunk);
    the pings with and without it are split into their stages, and of the chunks' work, what began
    while a ping was readable is counted."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.chatpath", "--mib", "2", "--transfers", "1", "--idle-s", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (line,) = (json.loads(text) for text in run.stdout.splitlines() if text.startswith("{"))
    assert line["hold"] is True
    busy = line["transfer"]
    late_steps, steps, _ = busy["chunks_handled_while_chat_waited"]
    late_writes, writes, _ = busy["chunks_written_while_chat_waited"]
    # a connection's copies held for chat go out joined in one write (fanout.Deliveries): 16 chunks
    # handled, 15 writes in a CI run of the ninth session; at least one write per receiving connection
    # (the files worker's, the downloader's), at most one per chunk
    assert steps == 16 and 2 <= writes <= steps and 0 <= late_steps <= steps and 0 <= late_writes <= writes
    assert line["idle"]["pings"] >= 20 and len(line["idle"]["to_listener"]) == 3
    assert busy["pings"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("at_once", [False, True])
def test_idlewait_splits_the_loops_handlings_and_counts_the_writers_batches(at_once: bool) -> None:
    """``python -m benchmarks.idlewait`` (the broker in this process): 1 s of room pings; every ping's
    handling is timed (CPU, run queue, the rest), and the journal's writer kept every ping's row,
    whether rows are handed over after the round (as the broker does) or at once (``--at-once``);
    with ``--reference`` a fixed piece of Python is timed beside it."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.idlewait", "--seconds", "1", *(["--at-once", "--reference"] * at_once)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (line,) = (json.loads(text) for text in run.stdout.splitlines() if text.startswith("{"))
    assert line["at_once"] is at_once
    assert line["pings"] >= 20 and line["callbacks"] >= line["pings"] // 2
    assert 0 < line["writer_batches"] <= line["pings"] + 5
    assert 0 <= line["writer_batches_begun_during_a_callback"] <= line["writer_batches"]
    assert all(len(line[k]) == 3 for k in ("cpu_ms_p50_p99_sum", "run_queue_ms_p50_p99_sum", "blocked_ms_p50_p99_sum"))
    if at_once:  # with --reference: the fixed piece of Python ran meanwhile, every 5 ms
        assert line["reference_cpu_ms"]["runs"] >= 20 and len(line["reference_cpu_ms"]["cpu_ms_p50_p99_max"]) == 3
    else:
        assert "reference_cpu_ms" not in line


@pytest.mark.timeout(120)
def test_chunkcost_gives_a_cpu_figure_per_mib_and_the_loops_callbacks() -> None:
    """``python -m benchmarks.chunkcost`` (the broker in this process): one 2 MiB transfer, up and
    down; the loop thread's CPU per MiB is part of the process's, and the callbacks are counted."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.chunkcost", "--mib", "2", "--transfers", "1", "--callbacks"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (line,) = (json.loads(text) for text in run.stdout.splitlines() if text.startswith("{"))
    assert 0 < line["loop_ms_per_MiB"] <= line["process_ms_per_MiB"]
    assert line["callbacks"] > 0 and line["by_kind"] and len(line["longest_us"]) <= 12


@pytest.mark.timeout(120)
def test_linecost_gives_every_line_and_a_cpu_figure_per_kind() -> None:
    """``python -m benchmarks.linecost`` (the embedded broker in this process): one round of 20 room
    lines and 20 DMs, each copy arrived, and a CPU figure per line for the loop thread and the process."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.linecost", "--brokers", "embedded", "--rounds", "1",
         "--lines", "20", "--rate", "100", "--idle-s", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [json.loads(text) for text in run.stdout.splitlines() if text.startswith("{")]
    (one,) = (line for line in lines if line.get("round") == 0)
    for kind in ("room", "dm"):
        assert one[kind]["lines"] == 20 and one[kind]["copies"] == 20  # one listener, one recipient
    (summary,) = (line for line in lines if line.get("summary") == "embedded")
    for figure in ("loop_us_per_room_line", "loop_us_per_dm", "process_us_per_room_line", "process_us_per_dm"):
        assert isinstance(summary[figure], float)


def test_the_stall_trace_names_a_long_callback_and_a_round_of_many_short_ones(tmp_path: Path) -> None:
    """benchmarks/stalltrace.py (``--trace-stalls``): a task step that holds the CPU is written with
    its coroutine and where it then waits; a round of many short callbacks, none long alone, is
    written with its callbacks by kind; the quick ones are not written at all, only counted in the
    profile of every kind."""
    import asyncio

    from benchmarks.stalltrace import Tracer, read

    def burn(seconds: float) -> None:
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass

    async def hog() -> None:
        burn(0.03)
        await asyncio.sleep(0.01)

    async def main() -> None:
        await hog()
        loop = asyncio.get_running_loop()
        for _ in range(40):  # one round: 40 callbacks of 0.5 ms each
            loop.call_soon(burn, 0.0005)
        await asyncio.sleep(0.01)

    path = tmp_path / "stalls.jsonl"
    with path.open("a", encoding="utf-8") as out:
        tracer = Tracer(out, ms=10.0)
        tracer.install()
        try:
            asyncio.run(main())
        finally:
            tracer.uninstall()
        tracer.profile()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    callbacks = [r for r in records if r["what"] == "callback"]
    assert len(callbacks) == 1 and callbacks[0]["name"].startswith("task ")
    assert [step.split(":")[0].rsplit(".", 1)[-1] for step in callbacks[0]["name"].split(" > ")] == [
        "main",
        "hog",
        "sleep",
    ]
    assert callbacks[0]["cpu_ms"] >= 30
    rounds = [r for r in records if r["what"] == "round"]
    assert len(rounds) == 2
    many = next(r for r in rounds if r["callbacks"] >= 40)
    assert many["by_kind"][0][0].endswith("burn") and many["by_kind"][0][2] == 40
    figures = read(path)
    assert figures["trace_callbacks"] == 1 and figures["trace_rounds"] == 2
    assert figures["trace_callback_longest_ms"] == callbacks[0]["cpu_ms"]
    profile = figures["trace_kinds_by_longest"]
    assert isinstance(profile, list)
    kinds = {name.rsplit(".", 1)[-1]: (longest, calls) for name, longest, calls, _ in profile}
    assert kinds["burn"][1] == 40 and kinds["burn"][0] < 10


@pytest.mark.parametrize("first_answer", [b"", b"\x20\x02\x00\x03"], ids=["closed-before-connack", "connack-3"])
def test_the_crowd_tries_a_refused_connect_again_and_counts_it(
    first_answer: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker that closes (or refuses with CONNACK 3) each user's first CONNECT and accepts the second:
    everyone joins, nobody is counted as refused, and the retries are counted (docs/SCALING.md: nats-server
    closes a second CONNECT while it still stores the first session)."""
    import asyncio

    from benchmarks.crowd import Crowd, options
    from imcli.core.framing import decode_length

    seen: dict[str, int] = {}

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        while data := await reader.read(4096):
            buffer += data
            while (header := decode_length(buffer, 1)) is not None and header[1] + header[0] <= len(buffer):
                length, start = header
                kind, body = buffer[0] >> 4, bytes(buffer[start : start + length])
                del buffer[: start + length]
                if kind == 1:  # CONNECT: the client id follows the 10-byte variable header
                    cid = body[12 : 12 + int.from_bytes(body[10:12], "big")].decode()
                    seen[cid] = seen.get(cid, 0) + 1
                    if seen[cid] == 1:
                        writer.write(first_answer)
                        writer.close()
                        return
                    writer.write(b"\x20\x02\x00\x00")
                elif kind == 3:  # PUBLISH at QoS 1 (the retained status): PUBACK its packet id
                    at = 2 + int.from_bytes(body[:2], "big")
                    writer.write(b"\x40\x02" + body[at : at + 2])
                elif kind == 8:  # SUBSCRIBE: granted QoS 1
                    writer.write(b"\x90\x03" + body[:2] + b"\x01")
        writer.close()

    handlers: list[asyncio.Task[None]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await client(reader, writer)
        finally:
            await writer.wait_closed()

    async def run() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            crowd = Crowd(options().parse_args(["--port", str(port), "--count", "3"]))
            await crowd.join()
            await asyncio.gather(*(c.disconnect() for c in crowd.clients.values()))
            await asyncio.gather(*handlers)

    asyncio.run(run())
    joined = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert seen == {f"u0000{i}:bench": 2 for i in range(3)}
    assert (joined["ok"], joined["refused"], joined["retried"]) == (3, 0, 3)
    assert joined["closed_retried"] == (3 if first_answer == b"" else 0)


def test_a_brokers_logs_are_kept_on_request_as_it_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--keep-logs``: each NATS node's log and the users file are copied out before the temporary
    folder goes (issue 20: a shortfall could not be traced, the logs went with it)."""
    import tempfile

    from benchmarks import brokers
    from tests.natscluster import NatsNode, keep_logs

    work = tempfile.TemporaryDirectory(prefix="keep-test-")
    users = Path(work.name) / "imcli-users.conf"
    users.write_text("accounts {}\n")
    nodes = [NatsNode(f"nats-{i}", Path(work.name) / f"nats-{i}", users) for i in (1, 2, 3)]
    for node in nodes:
        node.workdir.mkdir()
        node.log_path.write_text(f'{node.name}: Unknown account "IM" for remote subject "im.user.q1.reply.*"\n')
    broker = brokers.Broker("nats", 1, [], work, has_presence=True)
    broker.keep_logs = lambda dest: keep_logs(nodes, dest, "bench-nats", (users,))
    kept = tmp_path / "kept"
    monkeypatch.setattr(brokers, "KEEP_LOGS", kept)
    broker.stop()
    assert not Path(work.name).exists()
    (folder,) = kept.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["imcli-users.conf", "nats-1.log", "nats-2.log", "nats-3.log"]
    assert "nats-3: Unknown account" in (folder / "nats-3.log").read_text()


def test_without_keep_logs_a_brokers_folder_goes_with_it(tmp_path: Path) -> None:
    import tempfile

    from benchmarks import brokers

    work = tempfile.TemporaryDirectory(prefix="keep-test-")
    kept: list[Path] = []

    def keep(dest: Path) -> Path:
        kept.append(dest)
        return dest

    broker = brokers.Broker("nats", 1, [], work, has_presence=True, keep_logs=keep)
    assert brokers.KEEP_LOGS is None
    broker.stop()
    assert not Path(work.name).exists() and kept == []
