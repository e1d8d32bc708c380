"""Chat latency during a file transfer, variants back to back (issue 16): the bulk threads' priority.

    python -m benchmarks.filesping [--brokers embedded,mosquitto] [--variants normal,idle,nice]
                                   [--rounds 3] [--mib 100]

Each round starts each broker once per variant (``IMCLI_BULK_PRIORITY`` set before it starts, so
that ``imcli serve``'s workers or ``imcli workers`` have it, and for this process's sender and
receiver; ``nice/idle`` is the server's, then the clients'), then measures the room ping
(``benchmarks/roomping.py``) for 3 s without a transfer and during one upload and download of a
``--mib`` file to a DM, as the files scenario does. One JSON line per run: MB/s, the ping's
p50/p90/p99 without and during (ms), how many pings took over 5 ms, CPU ms per MiB of each process.
Variants alternate within a round, so a machine's noise falls on all of them alike.
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
from benchmarks.roomping import RoomPing
from imcli.client.services import Conversation
from imcli.core.bulk import ENV


def _pct(values: list[float], q: int) -> float | None:
    return round(statistics.quantiles(values, n=100)[q - 1], 2) if len(values) >= 10 else None


def one_run(name: str, variant: str, mib: int) -> dict[str, Any]:
    server, _, clients = variant.partition("/")
    before = os.environ.get(ENV)
    os.environ[ENV] = server
    try:
        with brokers.start(name, 2) as broker:
            os.environ[ENV] = clients or server
            folder = Path(broker.workdir.name) / "filesping"
            folder.mkdir()
            source = _source(folder, mib * MIB)
            ping = RoomPing(broker)
            try:
                with ping.phase() as idle:
                    time.sleep(3.0)
                cpu: dict[str, float] = {}
                with ping.phase() as busy:
                    seconds = _send_and_fetch(
                        broker, source, Conversation("dm", "u00001"), "u00001", folder / "copy.bin", cpu
                    )
            finally:
                ping.close()
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
    return {
        "variant": variant, "broker": name, "load": round(os.getloadavg()[0], 1),
        "MBps": round(mib * MIB / seconds / 1e6, 1),
        **{f"idle_p{q}": _pct(idle, q) for q in (50, 90, 99)},
        **{f"transfer_p{q}": _pct(busy, q) for q in (50, 90, 99)},
        "over_5ms": sum(x > 5 for x in busy), "pings": len(busy),
        "cpu_ms_per_MiB": {part: round(used * 1000 / mib, 1) for part, used in cpu.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.filesping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="embedded,mosquitto")
    parser.add_argument("--variants", default="normal,idle,nice")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for name in args.brokers.split(","):
            for variant in args.variants.split(","):
                print(json.dumps(one_run(name, variant, args.mib)), flush=True)


if __name__ == "__main__":
    main()
