"""Profile the embedded broker under one scenario with py-spy (``bench`` extra), as quoted in docs.

    python -m benchmarks.profile fanout [--qos 1]     # 50 members, 2,000 messages
    python -m benchmarks.profile stream|rooms|group [--qos 1]   # issue 21's shapes, full size
    python -m benchmarks.profile capacity [--users 3000]

Starts ``imcli serve``, attaches ``py-spy record`` to it (raw collapsed stacks), runs the
scenario and prints the functions with the largest share of the broker's samples, by
self time and inclusive time. py-spy needs ptrace rights over the broker (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import brokers, scenarios
from benchmarks.__main__ import SHAPES
from benchmarks.fanout import fan


def top(raw: Path, count: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        samples = int(n)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples", "-- self"]
    lines += [f"{v / total:6.1%}  {k}" for k, v in own.most_common(count)]
    lines.append("-- inclusive (below the event loop)")
    skip = ("runpy", "typer", "imcli/cli", "asyncio/runners", "base_events.py:6", "threading.py", "__main__")
    lines += [f"{v / total:6.1%}  {k}" for k, v in inclusive.most_common(4 * count) if not any(s in k for s in skip)][
        :count
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("fanout", "stream", "rooms", "group", "capacity"))
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is missing: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as tmp, brokers.start("embedded", max(args.users, 60)) as broker:
        raw = Path(tmp) / "profile.txt"
        recorder = subprocess.Popen(
            [spy, "record", "-p", str(broker.pid), "-r", "100", "-f", "raw", "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if args.scenario == "fanout":
                print(scenarios.fanout(broker, 50, 2000, args.qos))
            elif args.scenario != "capacity":
                print(fan(broker, SHAPES["full"][args.scenario], args.qos))
            else:
                print(scenarios.capacity(broker, args.users, 4))
        finally:
            recorder.send_signal(2)  # py-spy writes its file on SIGINT
            recorder.wait(60)
        print(top(raw, args.top))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
