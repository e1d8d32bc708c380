"""Where the slow chat pings during a file transfer go, on the embedded broker (issue 16).

    python -m benchmarks.filestail [--mib 100] [--rounds 1] [--slow-ms 5] [--top 12] [--period-ms 10]

``benchmarks/filesping.py`` with the broker in this process, as ``benchmarks/dmtail.py`` runs it
(``serve_forever``: the workers, the files worker among them, in their child process, the collector
tuned by imcli/broker/gcpause.py) and dmtail's probe on its event loop (every callback of 2 ms or
more and every collection, wall clock and the thread's CPU time). The room ping
(``benchmarks/roomping.py``, its own process) runs 3 s without a transfer, then during one upload
and download of a ``--mib`` file to a DM, made by a process of their own (``--client``, the
sender's and the receiver's bulk threads at ``IMCLI_BULK_PRIORITY``). Each ping slower than
``--slow-ms`` is matched with what the loop did meanwhile (dmtail's ``_explain``): a collection,
a callback that used the CPU (which one), or one that took wall time but little CPU (it waited for
a core). Also the loop's rounds of 1 ms or more (``longest_rounds_by_cpu``: a chat packet that
arrives as a round starts waits for all of it, on a machine with a core to spare its CPU time), and
the CPU per MiB moved of the broker's process (its loop, its journal's thread, the probe), of the
workers' child and of the transfer's process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.brokers import REPO, _children, cpu_seconds
from benchmarks.dmtail import _explain, _LoopProbe
from benchmarks.files import MIB, _identity, _source
from benchmarks.filesping import _pct
from benchmarks.memory import _Here, serve_here
from benchmarks.roomping import PERIOD, RoomPing

ROUND_MS = 1.0  # the loop's rounds kept (their callbacks' wall time; dmtail keeps 20 ms and more)
_RECURSIVE = ("re/_parser.py", "re/_compiler.py")  # a regular expression's compilation: its caller says more


class _SlowStacks:
    """Samples the event loop's stack whenever one callback has run for ``after_ms`` or more: what the
    slow callbacks were doing (the interpreter's switch interval is lowered meanwhile so that this
    thread gets its turn inside a long callback)."""

    def __init__(self, probe: _LoopProbe, loop_thread: int, after_ms: float = 2.0) -> None:
        self._probe, self._thread, self._after = probe, loop_thread, after_ms / 1000
        self.samples: dict[float, collections.Counter[str]] = {}  # callback's start (perf_counter) -> stacks
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _SlowStacks:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        sys.setswitchinterval(self._interval)

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            since = self._probe.running_since
            if since and time.perf_counter() - since >= self._after:
                frame = sys._current_frames().get(self._thread)
                if frame is not None and self._probe.running_since == since:
                    where = [f for f in traceback.extract_stack(frame)[-60:] if not f.filename.endswith(_RECURSIVE)]
                    stack = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where[-24:]))
                    self.samples.setdefault(since, collections.Counter())[stack] += 1

    def report(self, offset: float, top: int) -> list[dict[str, object]]:
        """The slowest callbacks sampled (most samples first), each with its start (epoch) and stacks."""
        ordered = sorted(self.samples.items(), key=lambda kv: -sum(kv[1].values()))[:top]
        return [
            {"started": round(since + offset, 4), "samples": sum(stacks.values()), "stacks": stacks.most_common(3)}
            for since, stacks in ordered
        ]


def _loop_meanwhile(
    pings: list[tuple[float, float]], every: list[tuple[float, float]], slow_ms: float
) -> list[dict[str, float]]:
    """For each ping over ``slow_ms`` (sent on perf_counter's clock, ms): how many milliseconds of its
    way the broker's loop spent in callbacks, in how many, and the longest; a loop that was mostly
    idle meanwhile did not hold the ping (its clients or the scheduler did)."""
    out = []
    for sent, ms in pings:
        if ms < slow_ms:
            continue
        end = sent + ms / 1000
        inside = [(e, w) for e, w in every if e - w / 1000 < end and e > sent]
        out.append({
            "ms": round(ms, 2),
            "loop_busy_ms": round(sum(w for _, w in inside), 2),
            "callbacks": len(inside),
            "longest_ms": round(max((w for _, w in inside), default=0.0), 2),
        })  # fmt: skip
    return out


def _rounds(rounds: list[tuple[float, float, float, int, list[tuple[str, float, int]]]], top: int) -> dict[str, object]:
    """The loop's rounds of ``ROUND_MS`` or more during the transfer: a chat packet that arrives as one
    starts waits for all of its callbacks; their CPU is that wait on a machine with a core to spare."""
    cpu = sorted((r[2] for r in rounds), reverse=True)
    return {
        f"rounds_over_{ROUND_MS:g}ms_wall": len(rounds),
        "round_cpu_ms_over": {f"{ms:g}": sum(c >= ms for c in cpu) for ms in (1, 2, 5, 10)},
        "longest_rounds_by_cpu": [
            {"wall_ms": round(wall, 2), "cpu_ms": round(c, 2), "callbacks": n,
             "by_kind": [(what, round(k, 2), m) for what, k, m in kinds]}
            for _, wall, c, n, kinds in sorted(rounds, key=lambda r: -r[2])[:top]
        ],
    }  # fmt: skip


def _client(port: int, source: Path) -> dict[str, float]:
    """The sender's upload and post, then the receiver's download (``benchmarks/files.py``'s
    ``_send_and_fetch``, in this process of its own): seconds and this process's CPU seconds."""
    from imcli.client.files import FileConnection
    from imcli.client.services import Conversation

    here: Any = _Here(port)
    where = Conversation("dm", "u00001")
    started, cpu = time.perf_counter(), time.process_time()
    with FileConnection(_identity(here, "u00000"), "bench-send") as sender:
        target = sender.target(where)
        info = sender.upload(source, target)
        sender.post(where, target, info)
    with FileConnection(_identity(here, "u00001"), "bench-get") as getter:
        copy = source.with_name("copy.bin")
        getter.download(info.id, copy, force=True)
    if copy.stat().st_size != source.stat().st_size:
        raise AssertionError("the copy differs in size")
    copy.unlink()
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def _transfer(port: int, source: Path) -> dict[str, float]:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.filestail", "--client", str(port), "--source", str(source)],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(run.stdout)
    return result


def measure(mib: int, rounds: int, slow_ms: float, top: int, period: float = PERIOD) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    probe = _LoopProbe(rounds=True, slow_round_ms=ROUND_MS)
    loop_thread = threading.get_ident()  # serve_here runs the broker's loop in this thread
    with tempfile.TemporaryDirectory(prefix="bench-filestail-") as tmp:

        def drive(port: int) -> None:
            ping = RoomPing(_Here(port), stamps=True, period=period)  # type: ignore[arg-type]
            workers = _children(os.getpid())[0]
            offset = time.time() - time.perf_counter()  # ping stamps are perf_counter's, the probe's epoch
            try:
                for _ in range(rounds):
                    # new bytes each round: the worker would answer a file it holds at once (no upload)
                    source = _source(Path(tmp), mib * MIB)
                    with ping.phase() as idle:
                        time.sleep(3.0)
                    probe.callbacks.clear()
                    probe.collections.clear()
                    probe.rounds.clear()
                    probe.every = []
                    before = (time.process_time(), cpu_seconds(workers))
                    with ping.phase() as busy, _SlowStacks(probe, loop_thread) as stacks:
                        client = _transfer(port, source)
                    broker_cpu, workers_cpu = time.process_time() - before[0], cpu_seconds(workers) - before[1]
                    pings = [(sent + offset, ms / 1000) for sent, ms in busy]
                    result: dict[str, object] = {
                        "load": round(os.getloadavg()[0], 1),
                        "MBps": round(mib * MIB / client["seconds"] / 1e6, 1),
                        **{f"idle_p{q}": _pct([ms for _, ms in idle], q) for q in (50, 90, 99)},
                        **{f"transfer_p{q}": _pct([ms for _, ms in busy], q) for q in (50, 90, 99)},
                        "cpu_ms_per_MiB": {
                            "broker": round(broker_cpu * 1000 / mib, 2),
                            "workers": round(workers_cpu * 1000 / mib, 2),
                            "clients": round(client["cpu"] * 1000 / mib, 2),
                        },
                        **_explain(pings, probe, slow_ms, top),
                        "slow_pings": _loop_meanwhile(busy, probe.every, slow_ms),
                        **_rounds(probe.rounds, top),
                        "slow_callback_stacks": stacks.report(offset, top),
                    }  # fmt: skip
                    print(json.dumps(result, indent=1), flush=True)
                    results.append(result)
            finally:
                ping.close()

        probe.install()
        serve_here(2, "bench-filestail-", drive)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.filestail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slow-ms", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--period-ms", type=float, default=PERIOD * 1000, help="milliseconds between two chat pings")
    parser.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)  # the transfer's process
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(_client(args.client, args.source)))
        return
    measure(args.mib, args.rounds, args.slow_ms, args.top, args.period_ms / 1000)


if __name__ == "__main__":
    main()
