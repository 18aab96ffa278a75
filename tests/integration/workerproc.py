"""Run a worker app dir as its own process (kill -9 tests): workerproc.py DIR [--scale-out].

Kafka, topic prefix and state dir come from the environment, as for `ploy worker`.
Scaled out, it serves its engine API on a free loopback port, as `ploy worker`
does, so other processes' queries about its partitions reach it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from engine.app import Engine, load_app, serving_api


async def main(directory: str, scale_out: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker, config = load_app(directory)
    async with Engine(worker, config, scale_out=scale_out) as engine:
        if scale_out:
            async with serving_api(engine):
                await stop.wait()
        else:
            await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=getattr(logging, os.environ.get("PLOY_LOG", "WARNING")))
    asyncio.run(main(sys.argv[1], "--scale-out" in sys.argv[2:]))
