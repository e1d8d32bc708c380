"""The benchmark suite: stock amqtt, the embedded default and Mosquitto, side by side.

    python -m benchmarks [--quick]
                         [--only fanout,stream,rooms,group,dm,dmflood,dmbusy,capacity,churn,storm,cold,files,devices]
                         [--brokers stock,embedded,mosquitto,nats] [--repeat N] [--capacity USERS]
                         [--hold SECONDS] [--no-rejoin] [--trace-stalls] [--keep-logs DIR]

Starts each broker itself on a free loopback port (benchmarks/brokers.py), runs each
scenario on every broker in turn (so that the shared machine's noise falls on all of
them alike), prints a table with the ratios the targets are stated in, and writes
``benchmarks/results/<date>.json`` and PNG charts (with the ``bench`` extra installed).
The full run takes about ten minutes on two cores; ``--quick`` runs small sizes in two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import brokers, devices, fanout, files, report, scenarios
from benchmarks.fanout import Shape
from benchmarks.stallprobe import stalls
from benchmarks.storm import storm

SIZES: dict[str, dict[str, int]] = {
    "full": {"members": 50, "messages": 2000, "idle": 1000, "samples": 1000, "capacity": 10000, "churn": 1000,
             "runs": 10, "processes": 4, "flood_listeners": 50, "flood_rate": 200, "storm": 500, "devices": 10000},
    "quick": {"members": 20, "messages": 400, "idle": 200, "samples": 200, "capacity": 1000, "churn": 200,
              "runs": 3, "processes": 2, "flood_listeners": 20, "flood_rate": 100, "storm": 100, "devices": 1000},
    "tiny": {"members": 3, "messages": 30, "idle": 10, "samples": 20, "capacity": 20, "churn": 10,
             "runs": 1, "processes": 2, "flood_listeners": 3, "flood_rate": 10, "storm": 5, "devices": 20},
}  # fmt: skip
# the fan-out shapes of issue 21 (rooms, members, talkers per room, lines each; bot: talkers do not listen)
SHAPES: dict[str, dict[str, Shape]] = {
    "full": {"stream": Shape(1, 50, 1, 2000, bot=True), "rooms": Shape(20, 10, 10, 20), "group": Shape(1, 500, 5, 40)},
    "quick": {"stream": Shape(1, 20, 1, 400, bot=True), "rooms": Shape(10, 5, 5, 20), "group": Shape(1, 100, 3, 20)},
    "tiny": {"stream": Shape(1, 3, 1, 30, bot=True), "rooms": Shape(2, 3, 3, 5), "group": Shape(1, 10, 2, 5)},
}  # fmt: skip
SCENARIOS = (
    "fanout", "stream", "rooms", "group", "dm", "dmflood", "dmbusy", "capacity", "churn", "storm", "cold", "files",
    "devices",
)  # fmt: skip
FILE_SIZES = {"full": [1, 10, 100], "quick": [1, 10], "tiny": [1]}  # MiB, sent to a DM and a group (issue 16)
FILE_GROUP = 20  # members of the group the files go to
FAN_SHAPES = ("stream", "rooms", "group")
# the figure that stands for a scenario when it is repeated (--repeat): the run with its median is kept
KEY_FIGURE = {"dm": "p99_ms", "dmflood": "p99_ms", "dmbusy": "p99_ms", "capacity": "rss_mb_loaded",
              "churn": "status_changes_per_s", "storm": "all_back_s", "cold": "ratio"}  # fmt: skip
# stock amqtt sends every CONNECT the retained messages of every filter on the broker: with
# 10,000 users that is O(users^2) work per storm, so it is measured at a tenth of the size
STOCK_CAPACITY_SHARE = 10
Job = Callable[[brokers.Broker], dict[str, dict[str, Any]]]


def _median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (errors last), with every run's ``key`` beside it."""
    values = [r.get(key) for r in runs]
    ranked = sorted((v, i) for i, v in enumerate(values) if isinstance(v, int | float))
    if not ranked:
        return runs[0]
    chosen = dict(runs[ranked[(len(ranked) - 1) // 2][1]])
    chosen[f"{key}_runs"] = values
    return chosen


def raise_open_files(users: int) -> str | None:
    """Every signed-in user is a file descriptor in the broker (Mosquitto, each NATS node and
    ``imcli serve`` inherit this process's limit) and one in a crowd: raise the limit past
    ``users`` plus room for the helpers, the hard limit too where allowed (root). Returns a
    warning when the limit stays below what the run needs."""
    needed = users + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):  # only a privileged process may raise its hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            soft, hard = needed, needed
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        who = "root without it (a container's)" if os.geteuid() == 0 else "not root"
        return (
            f"only {soft} open files allowed (ulimit -n; the hard limit, which raising needs CAP_SYS_RESOURCE: "
            f"this process is {who}): a broker process holding {users} users needs about {needed}; the capacity "
            "run signs in what each single-process broker's limit lets in and says so (users_asked, capped_by)"
        )
    return None


def storm_skips(name: str) -> str | None:
    """The storm restarts one broker process and signs everyone in again as imcli does after ``imcli
    login``: with a device credential (issue 17), which only the embedded broker issues (Mosquitto's
    users sign in with their password, as deployed). A cluster is not one process to restart."""
    if name.startswith("nats"):
        return (
            "device credentials are the embedded broker's only (issue 17), and a cluster restarts node by node "
            "(its failover is tests/test_nats.py's fault tests), not as one broker"
        )
    return None


def run(
    size: str, only: list[str], names: list[str], repeat: int = 1, capacity_users: int | None = None,
    hold: float = 0.0, rejoin: bool = True, trace_stalls: bool = False,
) -> dict[str, Any]:  # fmt: skip
    s = {**SIZES[size], **({"capacity": capacity_users} if capacity_users else {})}
    # issue 7's room fan-out: everyone in one room talks
    shapes = {"fanout": Shape(1, s["members"], s["members"], s["messages"] // s["members"]), **SHAPES[size]}
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in list(names):
        why = brokers.KINDS[name].missing()
        if why is not None:
            names = [n for n in names if n != name]
            skipped[name] = why
            print(f"{name} column skipped: {why}", file=sys.stderr)
    users_needed = max(s["members"], s["idle"], s["capacity"], s["churn"], s["flood_listeners"],
                       *(shape.users for shape in shapes.values()))  # fmt: skip
    warning = raise_open_files(users_needed)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)

    def each(
        label: str, job: Job, *, users: int = users_needed, production: bool = False, trace: bool = False,
        skip: Callable[[str], str | None] = lambda name: None,
    ) -> None:  # fmt: skip
        """``job`` on every broker in turn, ``repeat`` rounds (A B A B: the machine's noise falls on all alike);
        ``skip(name)``: why ``job`` does not apply to that broker (said in its row, the broker not started)."""
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for round_ in range(repeat):
            for name in names:
                tag = f" #{round_ + 1}" if repeat > 1 else ""
                print(f"  {label + tag:<14} {name:<10}", end="", flush=True)
                if (why := skip(name)) is not None:
                    results.setdefault(label, {})[name] = {"skipped": why}
                    print(f" skipped: {why}", flush=True)
                    continue
                started = time.perf_counter()
                try:
                    with brokers.start(name, users, production=production, trace_stalls=trace) as broker:
                        figures = job(broker)
                except (RuntimeError, TimeoutError, OSError, AssertionError, EOFError) as exc:  # EOF: it hung up
                    figures = {label: {"error": f"{type(exc).__name__}: {exc}"}}
                for sub, got in figures.items():
                    runs.setdefault(sub, {}).setdefault(name, []).append(got)
                line = "; ".join(f"{sub} {report.brief(sub, got)}" for sub, got in figures.items())
                print(f" {time.perf_counter() - started:6.1f}s  {line}", flush=True)
        for sub, per_broker in runs.items():
            key = "deliveries_per_s" if sub.endswith(("qos0", "qos1")) else KEY_FIGURE.get(sub, "")
            for name, all_runs in per_broker.items():
                results.setdefault(sub, {})[name] = _median_run(all_runs, key) if repeat > 1 else all_runs[0]

    fan = [x for x in ("fanout", *FAN_SHAPES) if x in only]
    if fan and not brokers.mosquitto_clients():
        skipped["fan-out"] = "needs mosquitto_sub and mosquitto_pub (package mosquitto-clients)"
        fan = []
    if fan:  # every shape on one start of each broker: a broker's start costs more than a tiny shape

        def fan_all(broker: brokers.Broker) -> dict[str, dict[str, Any]]:
            return {f"{what}_qos{q}": fanout.fan(broker, shapes[what], qos=q) for what in fan for q in (1, 0)}

        each("fan-out", fan_all)
    if "cold" in only:
        each("cold", lambda b: {"cold": scenarios.cold_start(b, s["runs"])})
    if "dm" in only:
        each("dm", lambda b: {"dm": scenarios.dm_latency(b, s["idle"], s["samples"], talk=10.0)})
    if "dmflood" in only and brokers.mosquitto_clients():

        def dm_flood(broker: brokers.Broker) -> dict[str, dict[str, Any]]:
            with fanout.room_flood(broker, s["flood_listeners"], s["flood_rate"]) as flood:
                figures = scenarios.dm_latency(broker, s["idle"], s["samples"], talk=10.0)
            return {"dmflood": {**figures, **flood}}

        each("dmflood", dm_flood)
    if "dmbusy" in only and brokers.mosquitto_clients():

        def dm_busy(broker: brokers.Broker) -> dict[str, dict[str, Any]]:
            with fanout.room_flood(broker, s["flood_listeners"], s["flood_rate"]) as flood:
                moving = files.transfers_running  # started once the crowd is in, stopped with the last DM
                figures = scenarios.dm_latency(broker, s["idle"], s["samples"], talk=10.0,
                                               during=lambda: moving(broker, FILE_SIZES[size][-1]))  # fmt: skip
            return {"dmbusy": {**figures, **flood}}

        each("dmbusy", dm_busy)
    if "capacity" in only:

        def capacity(broker: brokers.Broker) -> dict[str, dict[str, Any]]:
            users = s["capacity"] // STOCK_CAPACITY_SHARE if broker.name == "stock" else s["capacity"]
            with stalls(broker) as probe:
                probe.phase("join")  # then hold, after_hold (the final `who`), leave: each stall says its phase
                try:
                    figures = scenarios.capacity(
                        broker,
                        max(users, 10),
                        s["processes"],
                        hold,
                        on_hold=lambda: probe.phase("hold"),
                        on_hold_end=lambda: probe.phase("after_hold"),
                        rejoin=rejoin,
                        on_leave=lambda: probe.phase("leave"),
                    )
                except (RuntimeError, TimeoutError, OSError, AssertionError, EOFError) as exc:
                    figures = {"error": f"{type(exc).__name__}: {exc}"}  # the probe's figures are kept
            return {"capacity": {**figures, **probe}}

        each("capacity", capacity, trace=trace_stalls)
    if "churn" in only:
        each("churn", lambda b: {"churn": scenarios.churn(b, s["churn"], s["processes"])})
    if "storm" in only:
        each("storm", lambda b: {"storm": storm(b, s["storm"], s["processes"])}, production=True, skip=storm_skips)
    if "files" in only:

        def file_scenario(broker: brokers.Broker) -> dict[str, dict[str, Any]]:
            if broker.name not in ("embedded", "mosquitto"):
                return {"files": {"skipped": "files are measured on the embedded broker and Mosquitto (issue 16)"}}
            return {"files": files.file_transfer(broker, FILE_SIZES[size], FILE_GROUP)}

        each("files", file_scenario, users=max(FILE_GROUP, 2))
    if "devices" in only and "embedded" in names:  # issue 17: the embedded broker only (no other has them)
        print(f"  {'devices':<12} {'embedded':<10}", end="", flush=True)
        started = time.perf_counter()
        try:
            figures = devices.device_reconnects(s["devices"])
        except (RuntimeError, TimeoutError, OSError, AssertionError) as exc:
            figures = {"error": f"{type(exc).__name__}: {exc}"}
        results["devices"] = {"embedded": figures}
        print(f" {time.perf_counter() - started:6.1f}s  {report.brief('devices', figures)}", flush=True)
    return {"scenarios": results, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", default="full")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="smoke test sizes")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    known = tuple(brokers.KINDS)
    parser.add_argument("--brokers", default=",".join(known), help=f"comma-separated subset of {known}")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of each scenario, brokers interleaved (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--capacity", type=int, help="users in the capacity run (default: the size's)")
    parser.add_argument(
        "--hold", type=float, default=0.0,
        help="capacity: seconds everyone stays signed in (PINGREQ every 30 s) with the stall probe on (1800: 30 min)",
    )  # fmt: skip
    parser.add_argument("--no-rejoin", action="store_true", help="capacity: leave out everyone leaving and coming back")
    parser.add_argument(
        "--trace-stalls", action="store_true",
        help="capacity: trace the embedded broker's loop in CPU time (callbacks, rounds, collections over 10 ms; "
        "benchmarks/stalltrace.py), reported for the hold",
    )  # fmt: skip
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR",
        help="copy each broker's logs into DIR as it stops (the NATS nodes', the users file, the workers'); "
        "with it a QoS 1 fan-out listener left short on the NATS cluster is traced there (benchmarks/fanout.py)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    brokers.KEEP_LOGS = args.keep_logs
    only = [x for x in args.only.split(",") if x]
    names = [x for x in args.brokers.split(",") if x]
    unknown = sorted(set(only) - set(SCENARIOS)) + sorted(set(names) - set(brokers.KINDS))
    if unknown:
        parser.error(f"unknown scenario or broker: {', '.join(unknown)}")

    started = time.perf_counter()
    print(f"benchmarks ({args.size}) on {', '.join(names)}: {', '.join(only)}", flush=True)
    outcome = run(
        args.size, only, names, max(args.repeat, 1), args.capacity, args.hold, not args.no_rejoin, args.trace_stalls
    )
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "size": args.size,
        "sizes": {
            **SIZES[args.size],
            **({"capacity": args.capacity} if args.capacity else {}),
            **({"hold_s": args.hold} if args.hold else {}),
        },
        "shapes": {k: vars(v) for k, v in SHAPES[args.size].items()},
        "repeat": args.repeat,
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start, Python {sys.version.split()[0]}",
        **outcome,
    }
    doc["targets"] = report.targets(doc["scenarios"])
    doc["ratios"] = report.ratios(doc["scenarios"])
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    report.print_tables(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y-%m-%d") + ("" if args.size == "full" else f"-{args.size}")
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {path}")
    if not args.no_charts:
        for chart in report.charts(doc, args.out, stem):
            print(f"chart {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
