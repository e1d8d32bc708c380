"""How long a broker keeps a connected client waiting: a PINGREQ every 10 ms, timed to its PINGRESP.

    python -m benchmarks.stallprobe --port P      # "ready" once connected; at the end of stdin, one JSON line
                                                  # ("phase NAME" on stdin: figures for what follows too)

A broker answers PINGREQ at once, so a slow answer is the broker (its event loop, a garbage
collection, the machine) not attending: the longest round trip over a run bounds from above
the longest stall of the broker's loop, the collector's pauses included. The probe is its own
process (its round trips include its own scheduling, which is why Mosquitto's column is the
yardstick of the machine's noise in the same run).

Given the broker's pid (``--pid``; ``stalls`` passes it), each round trip is also split by the
broker's main thread (its event loop) from the kernel's ``/proc/<pid>/schedstat``: the time it ran
on a core and the time it waited for one. A round trip over 50 ms in which the loop ran 50 ms or
more is the broker's own stall (``own_stalls_over_50ms``, ``own_stall_longest_ms``); one in which it
mostly waited for a core is the machine's load (a 2-core machine shared with test runs), which the
plain figures cannot tell apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

from benchmarks.brokers import REPO, Broker
from benchmarks.mqttload import LoadClient

PERIOD = 0.01


def _figures(rtts: list[float], prefix: str = "", ran: list[float] | None = None) -> dict[str, object]:
    ordered = sorted(rtts)
    figures: dict[str, object] = {
        f"{prefix}stall_longest_ms": round(ordered[-1] * 1000, 1),
        f"{prefix}stall_p99_ms": round(ordered[max(int(len(ordered) * 0.99) - 1, 0)] * 1000, 1),
        f"{prefix}stalls_over_50ms": sum(1 for r in ordered if r > 0.05),
    }
    if ran:  # the broker's loop thread's own CPU within each round trip (``schedstat``)
        figures[f"{prefix}own_stall_longest_ms"] = round(max(ran) * 1000, 1)
        figures[f"{prefix}own_stalls_over_50ms"] = sum(1 for r in ran if r >= 0.05)
    return figures


def schedstat(pid: int | None) -> tuple[float, float]:
    """Seconds the main thread of ``pid`` has run on a core and waited for one ((0, 0) if unknown)."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            run, wait, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run) / 1e9, int(wait) / 1e9


async def probe(port: int, password: str, pid: int | None = None) -> dict[str, object]:
    client = LoadClient()
    rc = await client.connect("127.0.0.1", port, "probe", password, "probe:stall")
    if rc != 0:
        return {"error": f"probe refused: {rc}"}
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = asyncio.ensure_future(reader.readline())
    rtts: list[float] = []
    ran: list[float] = []  # the broker's loop thread on a core during each round trip (``--pid``)
    phases: dict[str, list[float]] = {}  # a line "phase NAME" on stdin: later round trips count for NAME too
    phase_ran: dict[str, list[float]] = {}
    phase: list[float] | None = None
    phase_own: list[float] | None = None
    phase_name = ""
    longest = longest_at = longest_wall = 0.0
    over: list[tuple[float, float, str, float, float]] = []  # (wall clock, seconds, phase, ran, waited) over 50 ms
    started = time.time()
    next_ping = time.perf_counter()
    while True:
        if line.done():
            words = line.result().decode().split()
            if not words:  # end of stdin
                break
            if words[0] == "phase" and len(words) == 2:
                phase, phase_name = phases.setdefault(words[1], []), words[1]
                phase_own = phase_ran.setdefault(words[1], [])
            line = asyncio.ensure_future(reader.readline())
            continue
        ran0, waited0 = schedstat(pid)
        sent = time.perf_counter()
        pong = asyncio.ensure_future(client.ping())
        await asyncio.wait({pong, line}, return_when=asyncio.FIRST_COMPLETED)
        if not pong.done():
            # a command came first: the round trip goes on (a PINGREQ is answered in order)
            await asyncio.wait({pong}, timeout=600)
            if not pong.done():
                pong.cancel()
                break
        rtt = time.perf_counter() - sent
        ran1, waited1 = schedstat(pid)
        own = min(ran1 - ran0, rtt)
        if rtt > longest:
            longest, longest_at, longest_wall = rtt, time.time() - started, time.time()
        rtts.append(rtt)
        if pid is not None:
            ran.append(own)
        if rtt > 0.05:
            over.append((time.time(), rtt, phase_name, own, waited1 - waited0))
        if phase is not None:
            phase.append(rtt)
        if phase_own is not None and pid is not None:
            phase_own.append(own)
        next_ping = max(next_ping + PERIOD, time.perf_counter())
        await asyncio.sleep(max(0.0, next_ping - time.perf_counter()))
    line.cancel()
    await client.disconnect()
    if not rtts:
        return {"samples": 0}
    figures: dict[str, object] = {
        "samples": len(rtts),
        **_figures(rtts, ran=ran),
        "stall_longest_at_s": round(longest_at, 1),
        "stall_longest_utc": time.strftime("%H:%M:%S", time.gmtime(longest_wall)),
        # when each stall over 50 ms ended, how long it was and in which phase (with --pid: how long
        # the broker's loop ran and waited for a core within it): the first 25 of each phase and its 5
        # longest (a noisy join must not hide the hold's or the leave's)
        "stalls_over_50ms_utc_ms": [
            f"{time.strftime('%H:%M:%S', time.gmtime(wall))} {rtt * 1000:.1f} {name or '-'}"
            + (f" ran {own * 1000:.1f} waited {waited * 1000:.1f}" if pid is not None else "")
            for wall, rtt, name, own, waited in _kept(over)
        ],
    }
    for name, times in phases.items():
        if times:
            figures.update({f"{name}_samples": len(times), **_figures(times, f"{name}_", phase_ran.get(name))})
    return figures


def _kept(over: list[tuple[float, float, str, float, float]]) -> list[tuple[float, float, str, float, float]]:
    """Of the stalls over 50 ms, the first 25 of each phase and its 5 longest, in the order they ended."""
    kept: set[int] = set()
    for name in dict.fromkeys(stall[2] for stall in over):
        mine = [i for i, stall in enumerate(over) if stall[2] == name]
        kept.update(mine[:25])
        kept.update(sorted(mine, key=lambda i: -over[i][1])[:5])
    return [over[i] for i in sorted(kept)]


class Probe(dict[str, object]):
    """The probe's figures (filled in when the block ends); ``phase(name)`` starts a named phase:
    its round trips are reported again as ``<name>_stall_longest_ms`` and so on."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__()
        self.proc = proc

    def phase(self, name: str) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.write(f"phase {name}\n")
            self.proc.stdin.flush()


@contextlib.contextmanager
def stalls(broker: Broker) -> Iterator[Probe]:
    """Probe ``broker`` while the block runs; the probe's figures are added to the yielded dict."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.stallprobe", "--port", str(broker.port), "--pid", str(broker.pid)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    figures = Probe(proc)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "ready": connected (a first login may wait for its password check)
    if first.strip() != "ready" and first:
        figures.update(json.loads(first))  # refused: the error is the figure
    try:
        yield figures
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            line = proc.stdout.readline()
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            line = ""
        proc.stdout.close()
        if line:
            figures.update({k: v for k, v in json.loads(line).items() if k != "samples"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--pid", type=int, help="the broker's process: split each round trip by its loop's CPU")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(probe(args.port, args.password, args.pid))), flush=True)


if __name__ == "__main__":
    main()
