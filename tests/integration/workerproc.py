"""Run a worker app dir as its own process (kill -9 tests): workerproc.py DIR [--scale-out].

Kafka, topic prefix and state dir come from the environment, as for `ploy worker`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from engine.app import Engine, load_app, serve_until_signalled

if __name__ == "__main__":
    logging.basicConfig(level=getattr(logging, os.environ.get("PLOY_LOG", "WARNING")))
    worker, config = load_app(sys.argv[1])
    scale_out = "--scale-out" in sys.argv[2:]
    asyncio.run(serve_until_signalled(Engine(worker, config, scale_out=scale_out)))
