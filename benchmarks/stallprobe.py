"""How long a broker keeps a connected client waiting: a PINGREQ every 10 ms, timed to its PINGRESP.

    python -m benchmarks.stallprobe --port P      # "ready" once connected; at the end of stdin, one JSON line

A broker answers PINGREQ at once, so a slow answer is the broker (its event loop, a garbage
collection, the machine) not attending: the longest round trip over a run bounds from above
the longest stall of the broker's loop, the collector's pauses included. The probe is its own
process (its round trips include its own scheduling, which is why Mosquitto's column is the
yardstick of the machine's noise in the same run).
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


async def probe(port: int, password: str) -> dict[str, object]:
    client = LoadClient()
    rc = await client.connect("127.0.0.1", port, "probe", password, "probe:stall")
    if rc != 0:
        return {"error": f"probe refused: {rc}"}
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ended = asyncio.ensure_future(reader.read())
    rtts: list[float] = []
    longest_at = 0.0
    started = time.time()
    while not ended.done():
        sent = time.perf_counter()
        pong = asyncio.ensure_future(client.ping())
        await asyncio.wait({pong, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not pong.done():
            pong.cancel()
            break
        rtt = time.perf_counter() - sent
        if not rtts or rtt > max(rtts):
            longest_at = time.time() - started
        rtts.append(rtt)
        await asyncio.sleep(max(0.0, PERIOD - rtt))
    await client.disconnect()
    rtts.sort()
    if not rtts:
        return {"samples": 0}
    return {
        "samples": len(rtts),
        "stall_longest_ms": round(rtts[-1] * 1000, 1),
        "stall_longest_at_s": round(longest_at, 1),
        "stall_p99_ms": round(rtts[int(len(rtts) * 0.99) - 1] * 1000, 1),
        "stalls_over_50ms": sum(1 for r in rtts if r > 0.05),
    }


@contextlib.contextmanager
def stalls(broker: Broker) -> Iterator[dict[str, object]]:
    """Probe ``broker`` while the block runs; the probe's figures are added to the yielded dict."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.stallprobe", "--port", str(broker.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    figures: dict[str, object] = {}
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "ready": connected (a first login may wait for its password check)
    if first.strip() != "ready" and first:
        figures.update(json.loads(first))  # refused: the error is the figure
    try:
        yield figures
    finally:
        assert proc.stdin is not None and proc.stdout is not None
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
    args = parser.parse_args()
    print(json.dumps(asyncio.run(probe(args.port, args.password))), flush=True)


if __name__ == "__main__":
    main()
