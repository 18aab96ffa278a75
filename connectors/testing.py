"""Test helpers for connectors, ours and users': run them, read what they wrote.

    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            ...
    records = read_topic(kafka, "ploy.lifecycle")
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors import Connectors, start_connectors
from engine.log import client_config

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ["Record", "read_topic", "running_connectors"]


@asynccontextmanager
async def running_connectors(engine: Engine) -> AsyncIterator[Connectors]:
    """The engine's own connectors if it started them, else ones started here (stopped on exit)."""
    wired = getattr(engine, "connectors", None)
    if isinstance(wired, Connectors):
        yield wired
        return
    connectors = await start_connectors(engine)
    try:
        yield connectors
    finally:
        await connectors.stop()


@dataclass(frozen=True)
class Record:
    """A record as a plain consumer sees it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_topic(bootstrap_servers: str, topic: str, *, timeout_s: float = 20.0) -> list[Record]:
    """Every record of ``topic`` now, read with a plain consumer to each partition's end.

    Records are in order per partition, partitions one after the other. A
    missing topic reads as empty.
    """
    admin = AdminClient(client_config(bootstrap_servers))
    metadata = admin.list_topics(timeout=10)  # all topics: naming one could auto-create it
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return []
    partitions = sorted(found.partitions)
    consumer = Consumer({**client_config(bootstrap_servers), "group.id": f"{topic}.test-reader",
                         "enable.partition.eof": True, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list[Record] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while not set(partitions) <= at_end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {sorted(set(partitions) - at_end)} "
                                   f"did not reach their end in {timeout_s:g} s")
            for msg in consumer.consume(1000, 0.2):
                partition = cast(int, msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                        at_end.add(partition)
                    continue
                at_end.discard(partition)
                headers = {k: v or b"" for k, v in cast(list[tuple[str, bytes | None]],
                                                        msg.headers() or [])}
                records.append(Record(partition, cast(int, msg.offset()), msg.key(),
                                      msg.value(), headers))
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records
