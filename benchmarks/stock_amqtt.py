"""Stock amqtt 0.12.1 for comparison: its default plugins and anonymous access, nothing of ours.

python -m benchmarks.stock_amqtt    # prints "listening on <port>", runs until SIGTERM
"""

from __future__ import annotations

import asyncio
import signal
import socket

from amqtt.broker import Broker


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    port = _free_port()
    # the default config's plugins (event and packet loggers, anonymous auth, $SYS), loopback only
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}})
    await broker.start()
    print(f"listening on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
