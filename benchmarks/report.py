"""Tables, target ratios and PNG charts for a benchmark run (charts need the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.brokers import KINDS

BROKER_ORDER = tuple(KINDS)
FAN = [
    ("deliveries_per_s", "deliveries/s"),
    ("deliveries", "delivered"),
    ("expected_deliveries", "expected"),
    ("seconds", "s"),
    ("broker_cpu_us_per_delivery", "broker CPU µs/delivery"),
]
FAN_SCENARIOS = ("fanout", "stream", "rooms", "group")
FAN_TITLES = {
    "fanout": "room fan-out (everyone talks in one room)",
    "stream": "a bot streams into a busy room",
    "rooms": "many rooms at once, everyone talking",
    "group": "a large group, a few talkers",
}
COLUMNS: dict[str, list[tuple[str, str]]] = {
    **{f"{fan}_qos{q}": FAN for fan in FAN_SCENARIOS for q in (1, 0)},
    "dm": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("samples", "samples"),
           ("idle_users", "idle users")],
    "dmflood": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("samples", "samples"),
                ("flood_deliveries_per_s", "flood deliveries/s")],
    "dmbusy": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("samples", "samples"),
               ("flood_deliveries_per_s", "flood deliveries/s"), ("transfers", "file transfers"),
               ("transfer_MBps", "transfer MB/s"), ("transfer_downloads_resumed", "downloads resumed")],
    "capacity": [("users", "users"), ("users_asked", "asked"), ("connects_per_s", "first logins/s"),
                 ("reconnects_per_s", "reconnects/s"), ("connects_retried", "CONNECTs retried"),
                 ("rss_mb_loaded", "broker RSS MB"),
                 ("rss_mb_workers", "workers RSS MB"), ("who_ms_median", "who ms"),
                 ("presence_settled_s", "presence settled s"), ("stall_longest_ms", "longest ping ms"),
                 ("stalls_over_50ms", "pings > 50 ms")],
    "storm": [("users", "users"), ("first_logins_per_s", "first logins/s"), ("restart_s", "restart s"),
              ("all_back_s", "all back s"), ("rejoined", "back"), ("busy_retries", "busy retries"),
              ("stall_longest_ms", "longest ping ms")],
    "churn": [("users", "users"), ("status_changes_per_s", "status/s"), ("roster_consistent", "consistent")],
    "cold": [("imcli_say_ms", "imcli say ms"), ("paho_script_ms", "paho script ms"), ("ratio", "ratio")],
    "files": [(f"{kind}_{size}MiB_MBps", f"{label} {size}M MB/s") for kind, label in
              (("dm", "DM"), ("group", "group"), ("raw", "raw")) for size in (1, 10, 100)]
             + [("rss_growth_MiB", "RSS +MiB"), ("chat_p99_ms_idle", "chat p99 ms"),
                ("chat_p99_ms_transfer", "in transfer"), ("chat_p50_ms_idle", "chat p50 ms"),
                ("chat_p50_ms_transfer", "p50 in transfer")]
             + [(f"{kind}_cpu_ms_per_MiB_{part}", f"{kind} {part} CPU ms/MiB") for kind in ("dm", "group")
                for part in ("broker", "workers", "clients")],
    "devices": [("devices", "devices"), ("reconnects_per_s", "reconnects/s"), ("refusals_per_s", "wrong creds/s"),
                ("reconnects_per_s_under_attack", "reconnects/s under attack"), ("rss_mb_broker", "broker RSS MB"),
                ("credential_checks_per_s", "credential checks/s"), ("argon2_check_ms", "argon2 check ms")],
}  # fmt: skip


def brief(label: str, figures: dict[str, Any]) -> str:
    if "error" in figures:
        return str(figures["error"])
    if label.endswith(("_qos0", "_qos1")):
        return (f"{figures['deliveries_per_s']}/s ({figures['deliveries']} of {figures['expected_deliveries']}, "
                f"{figures['broker_cpu_us_per_delivery']} µs CPU each)")  # fmt: skip
    keys = [k for k, _ in COLUMNS.get(label, [])]
    return ", ".join(f"{k}={figures[k]}" for k in keys if k in figures) or str(figures)


def _get(doc: dict[str, Any], scenario: str, broker: str, key: str) -> float | None:
    value = doc.get(scenario, {}).get(broker, {}).get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sum(broker: float | None, workers: float | None) -> float | None:
    """The embedded default's memory: the broker, and its workers' child process when it has one."""
    return None if broker is None else round(broker + (workers or 0.0), 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


# the figure each scenario is compared by across brokers, and whether higher is better
RATIO_KEYS: dict[str, tuple[str, bool]] = {
    **{f"{fan}_qos{q}": ("deliveries_per_s", True) for fan in FAN_SCENARIOS for q in (1, 0)},
    "dm": ("p99_ms", False),
    "dmflood": ("p99_ms", False),
    "dmbusy": ("p99_ms", False),
    "capacity": ("rss_mb_loaded", False),
    "churn": ("status_changes_per_s", True),
    "storm": ("all_back_s", False),
    "cold": ("imcli_say_ms", False),
}


def ratios(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """Embedded / every other broker, per scenario, from this one run (brokers interleaved)."""
    rows = []
    for scenario, (key, higher) in RATIO_KEYS.items():
        ours = _get(scenarios, scenario, "embedded", key)
        for other in scenarios.get(scenario, {}):
            if other == "embedded":
                continue
            theirs = _get(scenarios, scenario, other, key)
            if ours is not None and theirs is not None:
                better = "higher" if higher else "lower"
                rows.append({"scenario": scenario, "figure": f"{key} ({better} is better)", "embedded": ours,
                             "other": other, "theirs": theirs, "ratio": _ratio(ours, theirs)})  # fmt: skip
    return rows


def targets(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's and issue 21's targets, each as measured in this run (``None`` when a side was not run)."""
    s = scenarios

    def fan(scenario: str, a: str, b: str) -> float | None:
        return _ratio(_get(s, scenario, a, "deliveries_per_s"), _get(s, scenario, b, "deliveries_per_s"))

    def p99(scenario: str) -> float | None:
        return _ratio(_get(s, scenario, "embedded", "p99_ms"), _get(s, scenario, "mosquitto", "p99_ms"))

    rows: list[tuple[str, float | None, str, float]] = [
        ("fan-out QoS 1: embedded / stock amqtt", fan("fanout_qos1", "embedded", "stock"), ">=", 0.9),
        ("fan-out QoS 0: embedded / stock amqtt", fan("fanout_qos0", "embedded", "stock"), ">=", 0.9),
    ]
    for shape in FAN_SCENARIOS:
        rows.append((f"{shape} QoS 1: embedded / Mosquitto", fan(f"{shape}_qos1", "embedded", "mosquitto"), ">=", 0.5))
        rows.append((f"{shape} QoS 0: embedded / Mosquitto", fan(f"{shape}_qos0", "embedded", "mosquitto"), ">=", 0.8))
    rows += [
        ("DM p99: embedded / Mosquitto", p99("dm"), "<=", 2.0),
        ("DM p99 under a room flood: embedded / Mosquitto", p99("dmflood"), "<=", 2.0),
        ("DM p99 under a room flood and file transfers: embedded / Mosquitto", p99("dmbusy"), "<=", 2.0),
        ("capacity: embedded RSS, broker + workers (MB)", _sum(_get(s, "capacity", "embedded", "rss_mb_loaded"),
                                                               _get(s, "capacity", "embedded", "rss_mb_workers")),
         "<=", 400),
        ("capacity: embedded longest PINGREQ round trip (ms)", _get(s, "capacity", "embedded", "stall_longest_ms"),
         "<=", 50),
        # the hold proper, and only the broker loop's own time on a core within a round trip (stallprobe.py)
        ("capacity: hold, the broker loop's longest own stall (ms)",
         _get(s, "capacity", "embedded", "hold_own_stall_longest_ms"), "<=", 50),
        ("capacity: embedded first logins/s", _get(s, "capacity", "embedded", "connects_per_s"), ">=", 1000),
        ("capacity: embedded reconnects/s", _get(s, "capacity", "embedded", "reconnects_per_s"), ">=", 1000),
        ("capacity: embedded who median (ms)", _get(s, "capacity", "embedded", "who_ms_median"), "<=", 200),
        ("storm: all back after a restart, embedded / Mosquitto", _ratio(_get(s, "storm", "embedded", "all_back_s"),
                                                                        _get(s, "storm", "mosquitto", "all_back_s")),
         "info", 0),
        ("cold start: imcli say / paho script (embedded)", _get(s, "cold", "embedded", "ratio"), "<=", 1.5),
        ("devices: reconnects/s after a restart (production argon2)",
         _get(s, "devices", "embedded", "reconnects_per_s"), ">=", 1000),
        ("devices: wrong credentials refused/s", _get(s, "devices", "embedded", "refusals_per_s"), ">=", 1000),
        *_file_targets(s),
    ]  # fmt: skip
    out = []
    for name, value, op, goal in rows:
        met = None
        if value is not None and op != "info":
            met = value >= goal if op == ">=" else value <= goal
        out.append({"target": name, "value": value, "goal": f"{op} {goal:g}" if op != "info" else "", "met": met})
    return out


def _file_targets(s: dict[str, Any]) -> list[tuple[str, float | None, str, float]]:
    """Issue 16's: end-to-end throughput of the largest file against raw MQTT on Mosquitto, the
    broker's memory growth during it, and a room's chat p99 during it against without."""
    measured = s.get("files", {})
    sizes = [n for n in (100, 10, 1) if any(f"dm_{n}MiB_MBps" in f for f in measured.values())]
    if not sizes:
        return []
    n = sizes[0]
    raw = _get(s, "files", "mosquitto", f"raw_{n}MiB_MBps")
    rows: list[tuple[str, float | None, str, float]] = []
    for broker in ("embedded", "mosquitto"):
        for kind in ("dm", "group"):
            ratio = _ratio(_get(s, "files", broker, f"{kind}_{n}MiB_MBps"), raw)
            rows.append((f"files {n} MiB to a {kind}: {broker} / raw Mosquitto", ratio, ">=", 0.5))
        rows.append(
            (f"files {n} MiB: {broker} broker RSS growth (MiB)", _get(s, "files", broker, "rss_growth_MiB"), "<=", 32)
        )
        rows.append((f"files {n} MiB: {broker} room chat p99, transfer / none",
                     _ratio(_get(s, "files", broker, "chat_p99_ms_transfer"),
                            _get(s, "files", broker, "chat_p99_ms_idle")), "<=", 2.0))  # fmt: skip
    return rows


def print_tables(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    for scenario, columns in COLUMNS.items():
        per_broker = doc["scenarios"].get(scenario)
        if not per_broker:
            continue
        fan, _, qos = scenario.rpartition("_qos")
        title = f"{scenario}: {FAN_TITLES[fan]}, QoS {qos}" if fan in FAN_TITLES else scenario
        table = Table(title=title, title_justify="left")
        table.add_column("broker")
        for _, header in columns:
            table.add_column(header, justify="right")
        for broker in [*BROKER_ORDER, *sorted(set(per_broker) - set(BROKER_ORDER))]:
            figures = per_broker.get(broker)
            if figures is None:
                continue
            if "error" in figures or "skipped" in figures:
                table.add_row(broker, str(figures.get("error") or figures.get("skipped")))
                continue
            table.add_row(broker, *(str(figures.get(key, "")) for key, _ in columns))
        console.print(table)
    for what, why in doc.get("skipped", {}).items():
        console.print(f"[yellow]{what} skipped: {why}[/yellow]")
    table = Table(title="embedded / other brokers, this run", title_justify="left")
    for header in ("scenario", "figure", "embedded", "other", "theirs", "ratio"):
        table.add_column(header)
    for row in doc.get("ratios", []):
        table.add_row(*(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in
                        ("scenario", "figure", "embedded", "other", "theirs", "ratio")))  # fmt: skip
    console.print(table)
    table = Table(title=f"targets ({doc['size']} run; ratios from this one run)", title_justify="left")
    for header in ("target", "measured", "goal", "met"):
        table.add_column(header)
    for row in doc["targets"]:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: ""}[row["met"]]
        table.add_row(row["target"], "n/a" if row["value"] is None else f"{row['value']:g}", row["goal"], met)
    console.print(table)
    console.print(f"wall time {doc['wall_s']} s; {doc['machine']}")


def charts(doc: dict[str, Any], out: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts skipped: matplotlib is missing (pip install -e '.[bench]')")
        return []
    s = doc["scenarios"]
    panels = [
        ("fanout_qos1", "deliveries_per_s", "room fan-out QoS 1\ndeliveries/s (higher is better)"),
        ("fanout_qos0", "deliveries_per_s", "room fan-out QoS 0\ndeliveries/s (higher is better)"),
        ("dm", "p99_ms", "DM latency p99, ms\n(lower is better)"),
        ("capacity", "rss_mb_loaded", "broker RSS with the crowd, MB\n(lower is better)"),
        ("capacity", "connects_per_s", "join storm, first logins/s\n(higher is better)"),
        ("capacity", "reconnects_per_s", "rejoin storm, reconnects/s\n(higher is better)"),
        ("churn", "status_changes_per_s", "presence churn status/s\n(higher is better)"),
        ("cold", "ratio", "imcli say / paho script\nwall time (lower is better)"),
    ]
    colours = {
        "stock": "#999999", "embedded": "#2b7bba", "mosquitto": "#e07b39", "nats": "#3a9a5b", "nats-r1": "#8fce9f"
    }  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.6))
    for ax, (scenario, key, title) in zip(axes, panels, strict=True):
        names = [b for b in BROKER_ORDER if _get(s, scenario, b, key) is not None]
        values = [_get(s, scenario, b, key) or 0.0 for b in names]
        ax.bar(names, values, color=[colours.get(n, "#55a868") for n in names])
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"imcli benchmarks, {doc['date']} ({doc['size']}), {doc['machine']}", fontsize=9)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
