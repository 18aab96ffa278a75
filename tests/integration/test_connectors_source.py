"""Source connector on a real broker: topic records -> executions, once each; dead letters."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from fastavro import parse_schema, schemaless_writer
from pydantic import BaseModel

from connectors import Connectors
from connectors.kafka import partitions_of
from connectors.source import H_ERROR, H_OFFSET, H_PARTITION, H_TOPIC, TopicSource
from connectors.state import connectors_dir
from connectors.testing import read_topic, running_connectors
from engine import ploy
from engine.codec import default_codec
from engine.config import Config
from engine.events import WorkflowTriggered
from engine.log import EventLog
from engine.testing import engine_config, running_engine, wait_for_status

RUNS: Counter[str] = Counter()


class Order(BaseModel):
    order_id: str
    amount: float


def order_worker() -> Any:
    app = ploy()

    @app.workflow("order_flow", input=Order)
    async def order_flow(ctx: Any) -> dict[str, Any]:
        RUNS[ctx.input.order_id] += 1
        return {"order_id": ctx.input.order_id}

    return app.build()


def create_topic(kafka: str, topic: str, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(10)


Records = list[tuple[bytes | None, list[tuple[str, bytes]]]]


def produce(kafka: str, topic: str, records: Records) -> None:
    """A plain confluent-kafka producer, as another team would have it."""
    producer = Producer({"bootstrap.servers": kafka})
    for i, (value, headers) in enumerate(records):
        producer.produce(topic, value=value, key=f"k{i}".encode(),
                         headers=headers)  # type: ignore[arg-type]
    assert producer.flush(20) == 0


def source_config(kafka: str, prefix: str, state_dir: Path, topic: str, fmt: str = "json",
                  **extra: Any) -> Config:
    return engine_config(kafka, prefix, state_dir, workflow={"ORDER_FLOW": "order_flow"},
                         partitions=3,
                         sources=[{"topic": topic, "binding": "ORDER_FLOW", "format": fmt,
                                   **extra}])


async def consumed(connectors: Connectors, total: int, timeout_s: float = 30.0) -> TopicSource:
    """Wait until the (only) source saved offsets past ``total`` records."""
    source = connectors.sources[0]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while sum(source.offsets.values()) < total:
        assert asyncio.get_running_loop().time() < deadline, (source.offsets, source.error)
        await asyncio.sleep(0.05)
    return source


def triggered_events(kafka: str, prefix: str) -> list[str]:
    log = EventLog(kafka, prefix, 3)
    try:
        codec = default_codec()
        keys = []
        for batch in log.read_until_end(dict.fromkeys(range(log.partitions), 0)):
            for records in batch.values():
                for _, value in records:
                    event = codec.decode(value)
                    if isinstance(event.body, WorkflowTriggered):
                        keys.append(event.body.idempotency_key or "")
        return keys
    finally:
        log.close()


INVALID = [
    (b"{not json", "not JSON"),
    (json.dumps({"order_id": "x"}).encode(), "amount"),
    (json.dumps({"order_id": "y", "amount": "lots"}).encode(), "amount"),
    (json.dumps([1, 2]).encode(), "invalid input"),
    (None, "no value"),
]


async def test_100_json_records_become_100_executions_once_and_5_invalid_go_to_the_dlq(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    topic = f"{topic_prefix}.orders.created"
    create_topic(kafka, topic)
    records: Records = []
    for i in range(100):
        records.append((json.dumps({"order_id": f"{topic_prefix}-o{i}", "amount": i}).encode(),
                        []))
        if i % 20 == 10:
            records.append((INVALID[i // 20][0], [("trace", b"t%d" % i)]))
    produce(kafka, topic, records)
    config = source_config(kafka, topic_prefix, state_dir, topic)
    worker = order_worker()

    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            source = await consumed(connectors, len(records))
            assert (source.triggered, source.dead_lettered) == (100, 5)
            done = await engine.runtime.list_executions(limit=1000)
            for execution in done:
                await wait_for_status(engine, execution.execution_id)
    assert len(done) == 100
    assert sorted(RUNS[f"{topic_prefix}-o{i}"] for i in range(100)) == [1] * 100

    dead = read_topic(kafka, f"{topic}.dlq")
    assert len(dead) == 5
    by_value = {r.value: r for r in dead}
    for value, reason in INVALID:
        letter = by_value[value]
        assert reason in letter.headers[H_ERROR].decode()
        assert letter.headers[H_TOPIC] == topic.encode()
        source_partition = int(letter.headers[H_PARTITION])
        source_offset = int(letter.headers[H_OFFSET])
        original = [r for r in read_topic(kafka, topic)
                    if (r.partition, r.offset) == (source_partition, source_offset)]
        assert original and original[0].value == value
        assert letter.headers["trace"].startswith(b"t")  # the record's own headers stay

    # Restart and consume the topic again from offset 0: no execution starts twice.
    (connectors_dir(config) / f"source-{topic}.json").unlink()
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            await consumed(connectors, len(records))
            again = await engine.runtime.list_executions(limit=1000)
    assert len(again) == 100
    assert sorted(RUNS[f"{topic_prefix}-o{i}"] for i in range(100)) == [1] * 100
    keys = triggered_events(kafka, topic_prefix)
    assert len(keys) == len(set(keys)) == 100  # not one WorkflowTriggered appended twice
    assert all(k.startswith(f"{topic}:") for k in keys)


async def test_a_restart_resumes_from_the_saved_offsets(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    topic = f"{topic_prefix}.orders"
    create_topic(kafka, topic, 1)
    config = source_config(kafka, topic_prefix, state_dir, topic)
    worker = order_worker()
    first: Records = [(json.dumps({"order_id": f"{topic_prefix}-a{i}", "amount": 1}).encode(), [])
             for i in range(5)]
    produce(kafka, topic, first)
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            await consumed(connectors, 5)
    produce(kafka, topic, [(json.dumps({"order_id": f"{topic_prefix}-b", "amount": 2}).encode(),
                            [])])
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            source = await consumed(connectors, 6)
            assert source.triggered == 1  # only the new record was read
            assert len(await engine.runtime.list_executions(limit=100)) == 6


AVRO_SCHEMA = {"type": "record", "name": "OrderCreated", "namespace": "shop",
               "fields": [{"name": "order_id", "type": "string"},
                          {"name": "amount", "type": "double"}]}


async def test_cloudevents_binary_and_structured_and_confluent_avro_each_trigger(
    kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path
) -> None:
    ce_topic, avro_topic = f"{topic_prefix}.ce", f"{topic_prefix}.avro"
    create_topic(kafka, ce_topic, 1)
    create_topic(kafka, avro_topic, 1)
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "7.avsc").write_text(json.dumps(AVRO_SCHEMA))

    binary = (json.dumps({"order_id": "bin", "amount": 1.5}).encode(), [
        ("ce_specversion", b"1.0"), ("ce_id", b"e-1"), ("ce_source", b"/shop"),
        ("ce_type", b"shop.order.created"), ("content-type", b"application/json")])
    structured = (json.dumps({
        "specversion": "1.0", "id": "e-2", "source": "/shop", "type": "shop.order.created",
        "datacontenttype": "application/json", "data": {"order_id": "struct", "amount": 2.5},
    }).encode(), [("content-type", b"application/cloudevents+json; charset=utf-8")])
    not_ce: tuple[bytes | None, list[tuple[str, bytes]]] = (
        json.dumps({"order_id": "plain", "amount": 1}).encode(), [])
    produce(kafka, ce_topic, [binary, structured, not_ce])
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(AVRO_SCHEMA), {"order_id": "avro", "amount": 3.5})
    produce(kafka, avro_topic, [(b"\x00" + struct.pack(">I", 7) + body.getvalue(), []),
                                (b"\x00" + struct.pack(">I", 8) + body.getvalue(), [])])

    config = engine_config(
        kafka, topic_prefix, state_dir, workflow={"ORDER_FLOW": "order_flow"}, partitions=3,
        sources=[{"topic": ce_topic, "binding": "ORDER_FLOW", "format": "cloudevents"},
                 {"topic": avro_topic, "binding": "ORDER_FLOW", "format": "avro",
                  "schema_dir": schemas}])
    async with running_engine(order_worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            for source in connectors.sources:
                deadline = asyncio.get_running_loop().time() + 30
                while sum(source.offsets.values()) < (3 if source.source.topic == ce_topic
                                                       else 2):
                    assert asyncio.get_running_loop().time() < deadline, source.error
                    await asyncio.sleep(0.05)
            executions = await engine.runtime.list_executions(limit=10)
            inputs = {}
            for execution in executions:
                done = await wait_for_status(engine, execution.execution_id)
                assert done.status == "completed"
                inputs[done.input["order_id"]] = done.input
    assert inputs == {"bin": {"order_id": "bin", "amount": 1.5},
                      "struct": {"order_id": "struct", "amount": 2.5},
                      "avro": {"order_id": "avro", "amount": 3.5}}
    ce_dead = read_topic(kafka, f"{ce_topic}.dlq")
    assert [r.value for r in ce_dead] == [not_ce[0]]
    assert b"not a CloudEvent" in ce_dead[0].headers[H_ERROR]
    avro_dead = read_topic(kafka, f"{avro_topic}.dlq")
    assert len(avro_dead) == 1 and b"no writer schema 8" in avro_dead[0].headers[H_ERROR]


async def test_a_missing_topic_is_waited_for_and_not_created(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    topic = f"{topic_prefix}.later"
    config = source_config(kafka, topic_prefix, state_dir, topic)
    async with running_engine(order_worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            await asyncio.sleep(1.2)
            assert partitions_of(engine.runtime.log, topic) is None
            assert "does not exist (yet)" in (connectors.sources[0].error or "")
            create_topic(kafka, topic, 2)
            produce(kafka, topic, [(json.dumps({"order_id": f"{topic_prefix}-late",
                                                "amount": 1}).encode(), [])])
            source = await consumed(connectors, 1)
            assert source.triggered == 1 and source.error is None
