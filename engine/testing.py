"""Test helpers for ploy-engine, for our own tests and for users' tests.

Tests run on a real Kafka wire-protocol broker, never a mock: the embedded
Tansu broker by default, or the Kafka named by ``KAFKA_BOOTSTRAP_SERVERS``.
Tests share one broker and keep apart by a unique topic prefix each.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from engine.app import Engine, serving_api
from engine.broker import EmbeddedBroker, wait_for_kafka
from engine.builder import Worker
from engine.clock import Clock, ManualClock
from engine.config import Config, load_config
from engine.errors import OwnerUnavailableError
from engine.models import Execution

__all__ = [
    "ManualClock",
    "embedded_kafka",
    "engine_config",
    "running_engine",
    "unique_prefix",
    "wait_for_status",
]

# A Kafka that is set up on purpose is given a little longer to answer.
_EXTERNAL_KAFKA_TIMEOUT_S = 15.0
_NOT_TOPIC_SAFE = re.compile(r"[^a-z0-9._-]+")


@contextmanager
def embedded_kafka() -> Iterator[str]:
    """Yield the bootstrap servers of a Kafka to test against.

    Uses ``KAFKA_BOOTSTRAP_SERVERS`` when set (after checking that it answers),
    else starts an :class:`~engine.broker.EmbeddedBroker` and stops it on exit.

    Raises:
        BrokerUnavailableError: The configured Kafka does not answer, or the
            embedded broker cannot start.
    """
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if servers:
        wait_for_kafka(servers, timeout_s=_EXTERNAL_KAFKA_TIMEOUT_S)
        yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


def unique_prefix(name: str = "t") -> str:
    """A short topic prefix that no other call returns, e.g. ``test-trigger-3f9c1a2b7d``.

    ``name`` is lowercased and cut to 24 characters; characters that Kafka topic
    names do not allow become ``-``. The result uses only ``a-z 0-9 . _ -``.
    """
    readable = _NOT_TOPIC_SAFE.sub("-", name.lower()).strip("-._")[:24].rstrip("-._") or "t"
    return f"{readable}-{uuid.uuid4().hex[:10]}"


def engine_config(
    kafka: str, topic_prefix: str, state_dir: Path | str, **fields: Any
) -> Config:
    """A Config for tests: no ploy.yaml, this Kafka, this prefix and state directory.

    ``fields`` replace Config fields, e.g. ``workflow={"FLOW": {"name": "flow"}}``,
    ``backoff={"initial_ms": 10}``, ``partitions`` (sets ``kafka.partitions``).
    """
    config = load_config(None, env={}, bootstrap_servers=kafka, topic_prefix=topic_prefix,
                         state_dir=state_dir)
    data = config.model_dump()
    data["kafka"]["group_id"] = f"{topic_prefix}.workers"  # tests share one broker
    partitions = fields.pop("partitions", None)
    if partitions is not None:
        data["kafka"]["partitions"] = partitions
    workflow = fields.pop("workflow", None)
    if workflow is not None:
        data["workflow"] = {
            name: {"name": value} if isinstance(value, str) else value
            for name, value in workflow.items()
        }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return Config.model_validate(data)


@asynccontextmanager
async def running_engine(
    worker: Worker, config: Config, *, clock: Clock | None = None, scale_out: bool = False
) -> AsyncIterator[Engine]:
    """An Engine started on ``config`` and stopped on exit; scaled out, it also serves its
    engine API on a free loopback port, where the other workers send their queries."""
    engine = Engine(worker, config, clock=clock, scale_out=scale_out)
    await engine.start()
    try:
        if scale_out:  # others ask a scaled-out worker about its partitions: serve the API
            async with serving_api(engine):
                yield engine
        else:
            yield engine
    finally:
        await engine.stop()


async def wait_for_status(
    engine: Engine, execution_id: str, *statuses: str, timeout_s: float = 20.0
) -> Execution:
    """Poll ``get_execution`` until the execution reaches one of ``statuses`` (a partition
    whose owner is changing, so that no process answers for it, counts as not yet)."""
    wanted = set(statuses) or {"completed", "failed", "cancelled"}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            execution = await engine.runtime.get_execution(execution_id)
        except OwnerUnavailableError:  # its partition is moving (a worker died): ask again
            execution = None
        if execution is not None and execution.status.value in wanted:
            return execution
        if asyncio.get_running_loop().time() > deadline:
            status = execution.status.value if execution else "unknown"
            raise TimeoutError(f"execution {execution_id} is {status}, not {sorted(wanted)}, "
                               f"after {timeout_s:g} s")
        await asyncio.sleep(0.02)
