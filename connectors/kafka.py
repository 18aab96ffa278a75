"""The Kafka plumbing the connectors share: producers, topics, acknowledged batches.

Every connector produces with the engine's producer settings (idempotent,
``acks=all``), so the records of one partition keep their order, and waits for
the acknowledgement of a batch before it moves its own position on.

A record refused for a reason of its own (too large, invalid) would be refused
again however often it is produced; a connector that went back to its saved
position for it would never get past it. So a :class:`Batch` can hand such
refusals back (``keep_refused``) and the connector sends them to its
dead-letter topic (:func:`send_dead_letters`) and goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from connectors.errors import DeliveryError
from engine.log import (
    CONSUMER_DEFAULTS,
    CONSUMER_FIXED,
    PRODUCER_DEFAULTS,
    PRODUCER_FIXED,
    EventLog,
    client_config,
)

Headers = list[tuple[str, bytes]]

# Refusals of one record (its size, its content), not of the broker or the network.
RECORD_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
                           KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG})
H_DROPPED = "ploy.value.dropped"


def make_producer(log: EventLog) -> Producer:
    """A producer with the engine's settings on the engine's Kafka."""
    return Producer({
        **PRODUCER_DEFAULTS,
        **client_config(log.bootstrap_servers, log.extra),
        **PRODUCER_FIXED,
    })


def make_consumer(log: EventLog, group_id: str, **overrides: Any) -> Consumer:
    """A consumer for ``assign()`` (no group join, no commits): offsets are ours to keep."""
    return Consumer({
        **CONSUMER_DEFAULTS,
        **client_config(log.bootstrap_servers, log.extra),
        "group.id": group_id,
        **overrides,
        **CONSUMER_FIXED,
    })


def partitions_of(log: EventLog, topic: str) -> int | None:
    """How many partitions ``topic`` has, or None if it does not exist (yet).

    Asks for the metadata of every topic: a request naming a missing topic
    makes brokers with ``auto.create.topics.enable`` (Tansu, Kafka's default)
    create it, with their default partition count.
    """
    admin = AdminClient(client_config(log.bootstrap_servers, log.extra))
    try:
        metadata = admin.list_topics(timeout=log.connect_timeout_s)
    except KafkaException:
        return None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        return None
    return len(found.partitions)


def topic_id_of(log: EventLog, topic: str) -> str | None:
    """The id Kafka gave ``topic`` when it was created, or None if the broker has none.

    The id tells two lives of one topic name apart: a topic deleted and created
    again, or the same name on a fresh broker (``ploy dev``), gets a new id, so
    its offsets start again at 0 without naming the old records. Ask only for a
    topic that exists (a describe names the topic, which may create it).
    """
    admin = AdminClient(client_config(log.bootstrap_servers, log.extra))
    try:
        found = admin.describe_topics(TopicCollection([topic]))[topic].result(
            log.connect_timeout_s)
    except KafkaException:
        return None
    topic_id = getattr(found, "topic_id", None)
    text = str(topic_id) if topic_id is not None else ""
    return text if text.strip("A=") else None  # all zeros: a broker without topic ids


def ensure_topic(log: EventLog, topic: str, partitions: int,
                 config: Mapping[str, str] | None = None) -> int:
    """Create ``topic`` if it is missing; return its partition count."""
    existing = partitions_of(log, topic)
    if existing is not None:
        return existing
    admin = AdminClient(client_config(log.bootstrap_servers, log.extra))
    new = NewTopic(topic, partitions, 1, config=dict(config or {}))
    try:
        admin.create_topics([new])[topic].result(log.connect_timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    deadline = time.monotonic() + log.connect_timeout_s
    while (count := partitions_of(log, topic)) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the metadata may trail the creation by a moment
    return count or partitions


class Batch:
    """Records produced together; :meth:`wait` returns once every one is acknowledged.

    With ``keep_refused``, a record refused for a reason of its own
    (``RECORD_ERRORS``) is no error of the batch: its ``tag`` and the reason
    are in :attr:`refused` for the caller to dead-letter.

    The delivery callbacks run inside ``flush``, on the waiting thread.
    """

    def __init__(self, producer: Producer, connector: str, *, keep_refused: bool = False):
        self.producer, self.connector, self.keep_refused = producer, connector, keep_refused
        self.pending = 0
        self.errors: list[str] = []
        self.refused: list[tuple[Any, str]] = []
        self.delivered: list[tuple[int, int]] = []
        self.acked: list[tuple[Any, int, int]] = []  # (tag, partition, offset)
        self._lock = threading.Lock()

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, *,
                headers: Headers | None = None, partition: int | None = None,
                tag: Any = None) -> None:
        """Queue one record; a full local queue is drained first, never dropped."""
        kwargs: dict[str, Any] = {"value": value, "key": key, "headers": headers,
                                  "on_delivery": lambda err, msg: self._delivered(err, msg, tag)}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                break
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                error = exc.args[0]
                if self.keep_refused and error.code() in RECORD_ERRORS:
                    self.refused.append((tag, f"'{topic}' refused the record: {error.str()}"))
                    return
                raise DeliveryError(self.connector, f"produce to '{topic}': {error}") from None
        self.pending += 1

    def _delivered(self, err: KafkaError | None, msg: Any, tag: Any) -> None:
        with self._lock:
            if err is not None and self.keep_refused and err.code() in RECORD_ERRORS:
                self.refused.append((tag, f"'{msg.topic()}' refused the record: {err.str()}"))
            elif err is not None:
                self.errors.append(f"'{msg.topic()}': {err.str()}")
            else:
                where = (cast(int, msg.partition()), cast(int, msg.offset()))
                self.delivered.append(where)
                self.acked.append((tag, *where))

    def wait(self, timeout_s: float = 30.0) -> None:
        """Block until every record is acknowledged.

        Raises:
            DeliveryError: A record was refused or not acknowledged in time.
        """
        if self.pending == 0:
            return
        left = self.producer.flush(timeout_s)
        if left:
            raise DeliveryError(self.connector, f"{left} records not acknowledged within "
                                f"{timeout_s:g} s")
        if self.errors:
            raise DeliveryError(self.connector, f"{len(self.errors)} records refused, first "
                                f"{self.errors[0]}")


def read_to_end(log: EventLog, topic: str, partition: int, offset: int, *,
                timeout_s: float = 30.0) -> Iterator[tuple[int, dict[str, bytes], bytes | None]]:
    """``(offset, headers, value)`` of ``topic``'s ``partition`` from ``offset`` to its end.

    The end is where the broker's fetch says the partition ends (partition
    EOF), not a ListOffsets answer taken before: the embedded broker answers
    ListOffsets late for batched writes.

    Raises:
        DeliveryError: The end was not reached within ``timeout_s``.
    """
    consumer = make_consumer(log, f"{topic}.reader", **{"enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                        return
                    continue
                headers = {k: v or b"" for k, v in cast(list[tuple[str, bytes | None]],
                                                        msg.headers() or [])}
                yield cast(int, msg.offset()), headers, msg.value()
            if time.monotonic() > deadline:
                raise DeliveryError(f"reader of {topic}", f"partition {partition} did not reach "
                                    f"its end in {timeout_s:g} s")
    finally:
        consumer.close()


@dataclass(frozen=True)
class DeadLetter:
    """A record for a dead-letter topic; its headers say what it was and why it is here."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def send_dead_letters(producer: Producer, connector: str, topic: str,
                      letters: list[DeadLetter], *, partition: int | None = None) -> int:
    """Produce ``letters`` to ``topic`` (which the caller made sure exists) and wait.

    A letter whose value is refused too (too large for the dead-letter topic as
    well) goes again without its value and with ``ploy.value.dropped`` saying
    why, so that nothing can hold a connector back.

    Returns:
        The highest offset acknowledged (-1 if none).

    Raises:
        DeliveryError: The broker did not acknowledge (not a refusal of a record).
    """
    batch = Batch(producer, connector, keep_refused=True)
    for letter in letters:
        batch.produce(topic, letter.value, letter.key, headers=letter.headers, tag=letter,
                      partition=partition)
    batch.wait()
    acked = [offset for _, offset in batch.delivered]
    if batch.refused:
        again = Batch(producer, connector)
        for letter, reason in batch.refused:
            again.produce(topic, None, letter.key, headers=[
                *letter.headers, (H_DROPPED, reason.encode("utf-8", "replace"))],
                partition=partition)
        again.wait()
        acked += [offset for _, offset in again.delivered]
    return max(acked, default=-1)
