"""Issue 12, point 9: a source's idempotency key depends on the record only.

Losing the state directory must cost a refold and nothing else: the records
a source reads again name the executions they started before.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from confluent_kafka.admin import AdminClient

from connectors import dev_restore
from connectors.testing import running_connectors
from engine.testing import running_engine, wait_for_status
from tests.integration.test_connectors_source import (
    RUNS,
    Records,
    consumed,
    create_topic,
    order_worker,
    produce,
    source_config,
    triggered_events,
)


def orders(prefix: str, tag: str) -> Records:
    return [(json.dumps({"order_id": f"{prefix}-{tag}{i}", "amount": i}).encode(), [])
            for i in range(5)]


async def test_wiping_the_state_dir_gives_no_second_execution_per_record(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    topic = f"{topic_prefix}.orders"
    create_topic(kafka, topic, 3)
    produce(kafka, topic, orders(topic_prefix, "w"))
    worker = order_worker()
    # `ploy dev` starts through dev_restore (which kept state of its own in the state dir).
    config, _ = dev_restore(source_config(kafka, topic_prefix, state_dir, topic))
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            await consumed(connectors, 5)
            first = await engine.runtime.list_executions(limit=100)
            for execution in first:
                await wait_for_status(engine, execution.execution_id)
    assert len(first) == 5

    # The state directory is lost; the engine starts again on the same broker.
    shutil.rmtree(state_dir)
    state_dir.mkdir()
    config = source_config(kafka, topic_prefix, state_dir, topic)
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            await consumed(connectors, 5)
            again = await engine.runtime.list_executions(limit=100)
    assert sorted(e.execution_id for e in again) == sorted(e.execution_id for e in first)
    assert [RUNS[f"{topic_prefix}-w{i}"] for i in range(5)] == [1] * 5
    keys = triggered_events(kafka, topic_prefix)
    assert len(keys) == len(set(keys)) == 5  # nothing appended for the records read again


async def test_a_topic_created_again_is_read_from_its_start_as_new_records(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    # What the key must still tell apart: offset 0 of a new life of the topic (a topic
    # deleted and created again; the same name on a fresh `ploy dev` broker).
    topic = f"{topic_prefix}.orders"
    create_topic(kafka, topic, 1)
    produce(kafka, topic, orders(topic_prefix, "old"))
    worker = order_worker()
    config = source_config(kafka, topic_prefix, state_dir, topic)
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            await consumed(connectors, 5)
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.delete_topics([topic])[topic].result(10)
    create_topic(kafka, topic, 1)
    produce(kafka, topic, orders(topic_prefix, "new")[:3])
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            source = connectors.sources[0]
            deadline = asyncio.get_running_loop().time() + 30
            while source.triggered < 3:  # the saved offsets (5) are of the old topic
                assert asyncio.get_running_loop().time() < deadline, source.error
                await asyncio.sleep(0.05)
            assert len(await engine.runtime.list_executions(limit=100)) == 8
    assert [RUNS[f"{topic_prefix}-new{i}"] for i in range(3)] == [1] * 3
