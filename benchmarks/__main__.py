"""The benchmark suite: stock amqtt, the embedded default and Mosquitto, side by side.

    python -m benchmarks [--quick] [--only fanout,dm,capacity,churn,cold,files,devices]
                         [--brokers stock,embedded,mosquitto,nats]

Starts each broker itself on a free loopback port (benchmarks/brokers.py), runs each
scenario on every broker in turn (so that the shared machine's noise falls on all of
them alike), prints a table with the ratios the targets are stated in, and writes
``benchmarks/results/<date>.json`` and PNG charts (with the ``bench`` extra installed).
The full run takes about ten minutes on two cores; ``--quick`` runs small sizes in two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import brokers, devices, files, report, scenarios

SIZES: dict[str, dict[str, int]] = {
    "full": {"members": 50, "messages": 2000, "idle": 1000, "samples": 1000, "capacity": 10000, "churn": 1000,
             "runs": 10, "processes": 4, "devices": 10000},
    "quick": {"members": 20, "messages": 400, "idle": 200, "samples": 200, "capacity": 1000, "churn": 200,
              "runs": 3, "processes": 2, "devices": 1000},
    "tiny": {"members": 3, "messages": 30, "idle": 10, "samples": 20, "capacity": 20, "churn": 10,
             "runs": 1, "processes": 2, "devices": 20},
}  # fmt: skip
SCENARIOS = ("fanout", "dm", "capacity", "churn", "cold", "files", "devices")
FILE_SIZES = {"full": [1, 10, 100], "quick": [1, 10], "tiny": [1]}  # MiB, sent to a DM and a group (issue 16)
FILE_GROUP = 20  # members of the group the files go to
BROKERS = ("stock", "embedded", "mosquitto", "nats")
# stock amqtt sends every CONNECT the retained messages of every filter on the broker: with
# 10,000 users that is O(users^2) work per storm, so it is measured at a tenth of the size
STOCK_CAPACITY_SHARE = 10


def run(size: str, only: list[str], names: list[str], capacity_users: int | None = None) -> dict[str, Any]:
    s = {**SIZES[size], **({"capacity": capacity_users} if capacity_users else {})}
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    if "mosquitto" in names and not brokers.mosquitto_available():
        names = [n for n in names if n != "mosquitto"]
        skipped["mosquitto"] = "mosquitto, mosquitto_passwd, mosquitto_sub or mosquitto_pub not installed"
        print("Mosquitto column skipped: mosquitto (and mosquitto-clients) not installed", file=sys.stderr)
    if "nats" in names and not brokers.nats_available():
        names = [n for n in names if n != "nats"]
        skipped["nats"] = "nats-server not installed"
        print("NATS column skipped: nats-server not installed", file=sys.stderr)
    users_needed = max(s["members"], s["idle"], s["capacity"], s["churn"])

    def each(label: str, job: Callable[[brokers.Broker], dict[str, Any]], *, users: int = users_needed) -> None:
        for name in names:
            print(f"  {label:<12} {name:<10}", end="", flush=True)
            started = time.perf_counter()
            try:
                with brokers.start(name, users) as broker:
                    figures = job(broker)
            except (RuntimeError, TimeoutError, OSError, AssertionError) as exc:
                figures = {"error": f"{type(exc).__name__}: {exc}"}
            results.setdefault(label, {})[name] = figures
            print(f" {time.perf_counter() - started:6.1f}s  {report.brief(label, figures)}", flush=True)

    if "fanout" in only or "cold" in only:
        if brokers.MOSQUITTO_SUB is None or brokers.MOSQUITTO_PUB is None:
            skipped["fanout"] = "needs mosquitto_sub and mosquitto_pub (package mosquitto-clients)"
        else:

            def fan_and_cold(broker: brokers.Broker) -> dict[str, Any]:
                out: dict[str, Any] = {}
                if "fanout" in only:
                    out["qos1"] = scenarios.fanout(broker, s["members"], s["messages"], qos=1)
                    out["qos0"] = scenarios.fanout(broker, s["members"], s["messages"], qos=0)
                if "cold" in only:
                    out["cold"] = scenarios.cold_start(broker, s["runs"])
                return out

            each("fanout+cold", fan_and_cold)
            for name, figures in results.pop("fanout+cold", {}).items():
                for key, label in (("qos1", "fanout_qos1"), ("qos0", "fanout_qos0"), ("cold", "cold")):
                    if key in figures or "error" in figures:
                        results.setdefault(label, {})[name] = figures.get(key, figures)
    if "dm" in only:
        each("dm", lambda b: scenarios.dm_latency(b, s["idle"], s["samples"], talk=10.0))
    if "capacity" in only:

        def capacity(broker: brokers.Broker) -> dict[str, Any]:
            users = s["capacity"] // STOCK_CAPACITY_SHARE if broker.name == "stock" else s["capacity"]
            return scenarios.capacity(broker, max(users, 10), s["processes"])

        each("capacity", capacity)
    if "churn" in only:
        each("churn", lambda b: scenarios.churn(b, s["churn"], s["processes"]))
    if "files" in only:

        def file_scenario(broker: brokers.Broker) -> dict[str, Any]:
            if broker.name not in ("embedded", "mosquitto"):
                return {"skipped": "files are measured on the embedded broker and Mosquitto (issue 16)"}
            return files.file_transfer(broker, FILE_SIZES[size], FILE_GROUP)

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
    parser.add_argument("--brokers", default=",".join(BROKERS), help=f"comma-separated subset of {BROKERS}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--capacity", type=int, help="users in the capacity run (default: the size's)")
    args = parser.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    names = [x for x in args.brokers.split(",") if x]
    unknown = sorted(set(only) - set(SCENARIOS)) + sorted(set(names) - set(BROKERS))
    if unknown:
        parser.error(f"unknown scenario or broker: {', '.join(unknown)}")

    started = time.perf_counter()
    print(f"benchmarks ({args.size}) on {', '.join(names)}: {', '.join(only)}", flush=True)
    outcome = run(args.size, only, names, args.capacity)
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "size": args.size,
        "sizes": {**SIZES[args.size], **({"capacity": args.capacity} if args.capacity else {})},
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start, Python {sys.version.split()[0]}",
        **outcome,
    }
    doc["targets"] = report.targets(doc["scenarios"])
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
