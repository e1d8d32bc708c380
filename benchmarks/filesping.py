"""Chat latency during file transfers against without, hundreds of pings each, several transfers (issue 16).

    python -m benchmarks.filesping [--brokers embedded,mosquitto] [--variants idle] [--rounds 3]
                                   [--transfers 3] [--mib 100] [--period-ms 5] [--idle-s 3]

Each round starts each broker once per variant (``IMCLI_BULK_PRIORITY`` set before it starts, so
that ``imcli serve``'s workers or ``imcli workers`` have it, and for this process's sender and
receiver; ``nice/idle`` is the server's, then the clients'). On that broker the room ping
(``benchmarks/roomping.py``, its own process, a message every ``--period-ms``) first runs for
``--idle-s`` without a transfer, after as long with no ping at all (what the pings cost the
broker), then ``--transfers`` times: ``--idle-s`` of pings without a transfer, then pings during
one upload and download of a new ``--mib`` file to a DM, as the files scenario does.

One JSON line per run (broker start): MB/s (median of its transfers), the ping's p50/p90/p99
without and during (ms, all of the run's pings), how many pings took over 5 ms, CPU ms per MiB of
each process, each transfer's own p99s and their ratio (``transfers``), and what the pings cost
the broker (``ping_cost``: its CPU per ping, the share of a core, and the share of the broker's
CPU during a transfer that the pings of those seconds would be). Then one ``summary`` line per
broker and variant over all rounds: each p99 with its 95 % confidence interval from order
statistics (``benchmarks/quantile.py``), their ratio with bounds, the median of the per-transfer
ratios, and how many transfers kept their p99 at most 2 x their own idle one. Next to each ratio,
``added_p99_ms`` (and ``added_p50_ms``): the p99 during minus the p99 without, in ms, what a
transfer adds whatever the machine's own idle tail (a long idle tail makes any ratio small).
Variants and brokers alternate within a round, so a machine's noise falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import brokers
from benchmarks.files import MIB, _send_and_fetch, _source
from benchmarks.quantile import interval, quantile, r, ratio_interval
from benchmarks.roomping import RoomPing
from imcli.client.services import Conversation
from imcli.core.bulk import ENV

TARGET = 2.0  # issue 16: a room's chat p99 during a transfer at most 2x without


def _pct(values: list[float], q: int) -> float | None:
    return r(quantile(values, q / 100))


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 2) if top is not None and bottom else None


def _added(top: float | None, bottom: float | None) -> float | None:
    """What a transfer adds to the p99, in ms (during minus without): unlike the ratio, it does not
    shrink when the machine's idle tail is long (issue 16, seventh session)."""
    return round(top - bottom, 3) if top is not None and bottom is not None else None


def one_run(name: str, variant: str, mib: int, transfers: int, period: float, idle_s: float) -> dict[str, Any]:
    server, _, clients = variant.partition("/")
    before = os.environ.get(ENV)
    os.environ[ENV] = server
    idle_all: list[float] = []
    busy_all: list[float] = []
    rows: list[dict[str, Any]] = []
    cpu_sum: dict[str, float] = {}
    seconds_all: list[float] = []
    transfer_wall = transfer_broker_cpu = 0.0
    try:
        with brokers.start(name, 2) as broker:
            os.environ[ENV] = clients or server
            folder = Path(broker.workdir.name) / "filesping"
            folder.mkdir()
            ping = RoomPing(broker, period=period)
            try:
                with ping.phase():  # the broker's and the ping's first messages
                    time.sleep(0.5)
                cost = _ping_cost(broker, ping, idle_s)
                for _ in range(transfers):
                    source = _source(folder, mib * MIB)  # new bytes: the worker answers a file it holds at once
                    with ping.phase() as idle:
                        time.sleep(idle_s)
                    cpu: dict[str, float] = {}
                    with ping.phase() as busy:
                        seconds = _send_and_fetch(
                            broker, source, Conversation("dm", "u00001"), "u00001", folder / "copy.bin", cpu
                        )
                    source.unlink()
                    seconds_all.append(seconds)
                    transfer_wall += seconds
                    transfer_broker_cpu += cpu["broker"]
                    for part, used in cpu.items():
                        cpu_sum[part] = cpu_sum.get(part, 0.0) + used
                    idle_all += idle
                    busy_all += busy
                    rows.append({
                        "MBps": round(mib * MIB / seconds / 1e6, 1),
                        "idle_p99": _pct(idle, 99), "transfer_p99": _pct(busy, 99),
                        "ratio_p99": _ratio(_pct(busy, 99), _pct(idle, 99)),
                        "added_p99_ms": _added(_pct(busy, 99), _pct(idle, 99)),
                        "added_p50_ms": _added(_pct(busy, 50), _pct(idle, 50)),
                        "idle_pings": len(idle), "pings": len(busy), "over_5ms": sum(x > 5 for x in busy),
                    })  # fmt: skip
            finally:
                ping.close()
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
    per_second = cost["broker_cpu_s_per_s"]
    return {
        "variant": variant, "broker": name, "load": round(os.getloadavg()[0], 1),
        "MBps": round(mib * MIB / statistics.median(seconds_all) / 1e6, 1),
        **{f"idle_p{q}": _pct(idle_all, q) for q in (50, 90, 99)},
        **{f"transfer_p{q}": _pct(busy_all, q) for q in (50, 90, 99)},
        "over_5ms": sum(x > 5 for x in busy_all), "pings": len(busy_all), "idle_pings": len(idle_all),
        "cpu_ms_per_MiB": {part: round(used * 1000 / (mib * transfers), 1) for part, used in cpu_sum.items()},
        "period_ms": period * 1000,
        "ratio_p99": _ratio(_pct(busy_all, 99), _pct(idle_all, 99)),
        "added_p99_ms": _added(_pct(busy_all, 99), _pct(idle_all, 99)),
        "transfers": rows,
        "ping_cost": {
            "broker_us_per_ping": cost["broker_us_per_ping"],
            "broker_core_pct": r(per_second * 100, 1),
            # the pings' broker CPU over the transfers' seconds, of all the broker's CPU meanwhile
            "share_of_transfer_pct": r(100 * per_second * transfer_wall / transfer_broker_cpu, 1)
            if transfer_broker_cpu else None,
        },
        "_idle": idle_all, "_busy": busy_all,
    }  # fmt: skip


def _ping_cost(broker: brokers.Broker, ping: RoomPing, seconds: float) -> dict[str, float]:
    """The broker's CPU for the pings: ``seconds`` with them against as long with none (its own
    upkeep: keep-alives, the collector's ticks). Per ping in µs, and in CPU seconds per second."""
    start = brokers.cpu_seconds(broker.pid)
    time.sleep(seconds)
    quiet = brokers.cpu_seconds(broker.pid) - start
    start = brokers.cpu_seconds(broker.pid)
    with ping.phase() as pings:
        time.sleep(seconds)
    busy = brokers.cpu_seconds(broker.pid) - start
    extra = max(0.0, busy - quiet)
    return {
        "broker_us_per_ping": round(extra * 1e6 / len(pings), 1) if pings else float("nan"),
        "broker_cpu_s_per_s": extra / seconds,
    }


def summary(broker: str, variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over every run of one broker and variant: each p99 with its 95 % interval, their ratio with
    bounds, and the per-transfer ratios (the unit that a stall's run of slow pings cannot inflate)."""
    idle = [x for run in runs for x in run["_idle"]]
    busy = [x for run in runs for x in run["_busy"]]
    idle_ci, busy_ci = interval(idle, 0.99), interval(busy, 0.99)
    ratios = [t["ratio_p99"] for run in runs for t in run["transfers"] if t["ratio_p99"] is not None]
    low, high = ratio_interval(busy_ci, idle_ci)
    return {
        "summary": True, "broker": broker, "variant": variant, "runs": len(runs), "transfers": len(ratios),
        "idle_pings": len(idle), "pings": len(busy),
        "idle_p50": _pct(idle, 50), "transfer_p50": _pct(busy, 50),
        "idle_p99": _pct(idle, 99), "idle_p99_ci95": [r(idle_ci[0]), r(idle_ci[1])],
        "transfer_p99": _pct(busy, 99), "transfer_p99_ci95": [r(busy_ci[0]), r(busy_ci[1])],
        "ratio_p99": _ratio(_pct(busy, 99), _pct(idle, 99)), "ratio_p99_bounds95": [r(low), r(high)],
        "ratio_median_of_transfers": r(statistics.median(ratios)) if ratios else None,
        "ratios": ratios,
        "added_p99_ms": _added(_pct(busy, 99), _pct(idle, 99)),
        "added_p50_ms": _added(_pct(busy, 50), _pct(idle, 50)),
        "added_p99_ms_of_transfers": [t["added_p99_ms"] for run in runs for t in run["transfers"]],
        "transfers_at_most_2x": sum(x <= TARGET for x in ratios),
        "over_5ms_pct": r(100 * sum(x > 5 for x in busy) / len(busy), 2) if busy else None,
        "ping_broker_core_pct": r(statistics.median(run["ping_cost"]["broker_core_pct"] for run in runs), 1),
        "ping_share_of_transfer_pct": r(
            statistics.median(s for run in runs if (s := run["ping_cost"]["share_of_transfer_pct"]) is not None), 1
        ) if any(run["ping_cost"]["share_of_transfer_pct"] is not None for run in runs) else None,
        "MBps_median": r(statistics.median(t["MBps"] for run in runs for t in run["transfers"]), 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.filesping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="embedded,mosquitto")
    parser.add_argument("--variants", default="idle", help="IMCLI_BULK_PRIORITY values: normal,idle,nice,nice/idle")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=3, help="transfers per broker start")
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--period-ms", type=float, default=5.0, help="milliseconds between two chat pings")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of pings without a transfer, each time")
    args = parser.parse_args()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for name in args.brokers.split(","):
            for variant in args.variants.split(","):
                run = one_run(name, variant, args.mib, args.transfers, args.period_ms / 1000, args.idle_s)
                runs.setdefault((name, variant), []).append(run)
                print(json.dumps({k: v for k, v in run.items() if not k.startswith("_")}), flush=True)
    for (name, variant), done in runs.items():
        print(json.dumps(summary(name, variant, done)), flush=True)


if __name__ == "__main__":
    main()
