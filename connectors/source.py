"""Source: the records of a topic trigger executions of a binding's workflow, or are
events for waiting executions.

``sources: [{topic: orders.created, binding: ORDER_FLOW, format: json}]``
``sources: [{topic: payments, event: payment.settled, format: json}]`` (or ``event: "*"``
with format cloudevents: each CloudEvent's own type)

Formats (the record's value becomes the workflow input):
- ``json``: the value is the input as JSON.
- ``cloudevents``: the CloudEvent's ``data``, in structured mode (content type
  ``application/cloudevents+json``) or the Kafka binary binding (``ce_*``
  headers, the value is ``data``).
- ``avro``: the Confluent wire format, magic byte 0 + a 4-byte big-endian
  schema id + the Avro body; the writer schema is ``<schema_dir>/<id>.avsc``.

Exactly one execution per record: the idempotency key is
``<topic>:<partition>:<offset>@<topic id>``, made of the record's coordinates
only, so a record read again (a restart before the offsets were saved, a
re-consume from offset 0 after the state directory was lost) names the
execution it already started and appends nothing. The topic id is the one
Kafka gave the topic when it was created: a topic created again under the same
name (or on a fresh ``ploy dev`` broker) starts again at offset 0, and its
records are new records, not the old ones. A record that cannot be an input (not
JSON, not a CloudEvent, unknown schema, rejected by the workflow's input
model, too large) goes to the dead-letter topic with the reason in headers,
and the source moves on: nothing is dropped silently.

An event source sends each record as an event (``Runtime.send_event``) whose
source and id are the CloudEvent's (format cloudevents: a producer's retry is
one event), or ``kafka://<topic>`` and the record's coordinates as above: a
record read again is the same event, which the fold ignores.

Offsets are this source's own (``assign``, no consumer group), stored in the
state directory with the topic id after the batch's triggers and dead letters
are acknowledged; saved offsets of another topic id are dropped.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import KafkaError, TopicPartition
from fastavro import parse_schema, schemaless_reader

from connectors.cloudevents import NotACloudEventError, data_of, event_of, header_map, utf8
from connectors.kafka import (
    DeadLetter,
    Headers,
    ensure_topic,
    make_consumer,
    make_producer,
    partitions_of,
    send_dead_letters,
    topic_id_of,
)
from connectors.state import StateFile, connectors_dir, int_keys, str_keys
from engine.config import SourceConfig
from engine.errors import (
    InvalidInputError,
    InvalidKeyError,
    PayloadTooLargeError,
    SerializationError,
)

if TYPE_CHECKING:
    from confluent_kafka import Message

    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

BATCH = 500
METADATA_EVERY_S = 10.0
RETRY_PAUSE_S = 1.0
# What a record may be rejected for: reasons of the record, never of the broker.
REJECTED = (InvalidInputError, PayloadTooLargeError, SerializationError, InvalidKeyError,
            ValueError)  # (ValueError: an event's type or data the engine refuses)
# Headers a dead letter carries besides the record's own.
H_ERROR, H_TOPIC, H_PARTITION, H_OFFSET = (
    "ploy.error", "ploy.source.topic", "ploy.source.partition", "ploy.source.offset")

Decoder = Callable[[bytes | None, dict[str, str]], Any]


class InvalidRecordError(ValueError):
    """A record that cannot be a workflow input; the message is the reason."""


def decode_json(value: bytes | None, headers: dict[str, str]) -> Any:
    if value is None:
        raise InvalidRecordError("the record has no value")
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRecordError(f"the value is not JSON: {exc}") from None


def decode_cloudevent(value: bytes | None, headers: dict[str, str]) -> Any:
    try:
        return data_of(value, headers)
    except NotACloudEventError as exc:
        raise InvalidRecordError(str(exc)) from None


def decode_cloudevent_whole(value: bytes | None, headers: dict[str, str]) -> Any:
    """(attributes, data): an event source needs the CloudEvent's id, source and type."""
    try:
        return event_of(value, headers)
    except NotACloudEventError as exc:
        raise InvalidRecordError(str(exc)) from None


class AvroDecoder:
    """The Confluent wire format with writer schemas from a local directory."""

    def __init__(self, schema_dir: Path):
        self.schema_dir = schema_dir

    def __call__(self, value: bytes | None, headers: dict[str, str]) -> Any:
        if value is None or len(value) < 5 or value[0] != 0:
            start = value[:1].hex() if value else "empty"
            raise InvalidRecordError(f"not the Confluent Avro wire format (magic byte 0 + "
                                     f"4-byte schema id); the value starts {start}")
        (schema_id,) = struct.unpack(">I", value[1:5])
        schema = self._schema(schema_id)
        try:
            return schemaless_reader(io.BytesIO(value[5:]), schema, None)
        except Exception as exc:  # fastavro raises many types on bad bodies
            raise InvalidRecordError(f"the Avro body does not match schema {schema_id}: "
                                     f"{type(exc).__name__}: {exc}") from None

    @cache  # noqa: B019 - one decoder per source, for the life of the process
    def _schema(self, schema_id: int) -> Any:
        path = self.schema_dir / f"{schema_id}.avsc"
        try:
            return parse_schema(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InvalidRecordError(f"no writer schema {schema_id}: {path} does not exist"
                                     ) from None
        except Exception as exc:
            raise InvalidRecordError(f"writer schema {path} is not an Avro schema: {exc}"
                                     ) from None


def decoder_for(source: SourceConfig) -> Decoder:
    if source.format == "avro":
        assert source.schema_dir is not None  # the config requires it
        return AvroDecoder(source.schema_dir)
    if source.format == "cloudevents":
        return decode_cloudevent if source.event is None else decode_cloudevent_whole
    return decode_json


class TopicSource:
    """One ``sources:`` entry, run as a task on the engine's event loop.

    Each batch:
    1. Poll up to ``BATCH`` records of the topic (every partition, from the saved offsets).
    2. Decode each record's value into an input, or a reason it cannot be one.
    3. Trigger the decoded ones concurrently with the key ``topic:partition:offset``;
       an input the workflow rejects becomes a reason too.
    4. Produce each record with a reason to the dead-letter topic and wait for the acks.
    5. Save the next offsets. A failure of the broker in 3 or 4 saves nothing: the
       batch is read again after a pause, and its triggers that went through are
       recognised by their keys.
    """

    def __init__(self, engine: Engine, source: SourceConfig):
        self.engine, self.source = engine, source
        self.name = f"source {source.topic}"
        self.workflow = (None if source.binding is None
                         else engine.config.workflow[source.binding].name)
        self.decode = decoder_for(source)
        self.state = StateFile(connectors_dir(engine.config) / f"source-{source.topic}.json")
        saved = self.state.load()
        self.offsets = int_keys(saved.get("offsets"))
        self.topic_id: str | None = saved.get("topic_id")
        self.log = engine.runtime.log
        self.error: str | None = None
        self.triggered = 0
        self.dead_lettered = 0
        self._consumer = make_consumer(self.log, f"{engine.config.kafka.group_id}.source."
                                       f"{source.topic}")
        self._producer = make_producer(self.log)
        self._partitions = 0
        self._dlq_ready = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def key(self, partition: int, offset: int) -> str:
        """The idempotency key of a record: where it is, and nothing of this process's state."""
        key = f"{self.source.topic}:{partition}:{offset}"
        return key if self.topic_id is None else f"{key}@{self.topic_id}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"ploy-{self.name}")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Finish the batch in hand (its offsets are saved), then stop."""
        self._stopping.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=grace_s)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=2)
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._consumer.close()
        self._producer.flush(5)

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = RETRY_PAUSE_S
        checked = 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() - checked > METADATA_EVERY_S or not self._partitions:
                    checked = time.monotonic()
                    await self._follow_partitions()
                if not self._partitions:
                    await self._sleep(1.0)
                    continue
                messages = await asyncio.to_thread(self._consumer.consume, BATCH, 0.2)
                await self._handle(messages)
                pause, self.error = RETRY_PAUSE_S, None
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: %s; reading again from the saved offsets in %g s",
                               self.name, self.error, pause)
                await self._sleep(pause)
                pause = min(pause * 2, 30.0)
                await asyncio.to_thread(self._assign, range(self._partitions))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _follow_partitions(self) -> None:
        """Assign the topic's partitions; ones added later are picked up too."""
        count = await asyncio.to_thread(partitions_of, self.log, self.source.topic)
        if count is None:
            if self.error is None:
                self.error = f"topic '{self.source.topic}' does not exist (yet)"
                logger.warning("%s: %s; waiting for it", self.name, self.error)
            return
        topic_id = await asyncio.to_thread(topic_id_of, self.log, self.source.topic)
        if topic_id is not None and topic_id != self.topic_id:
            if self.topic_id is not None:
                logger.warning("%s: the topic was created again (id %s, was %s); reading it "
                               "from the start", self.name, topic_id, self.topic_id)
                self.offsets, self._partitions = {}, 0
            self.topic_id = topic_id
        if count > self._partitions:
            new = range(self._partitions, count)
            await asyncio.to_thread(self._assign, new, incremental=self._partitions > 0)
            self._partitions = count

    def _assign(self, partitions: range, *, incremental: bool = False) -> None:
        tps = [TopicPartition(self.source.topic, p, self.offsets.get(p, -2)) for p in partitions]
        if incremental:
            self._consumer.incremental_assign(tps)
        else:
            self._consumer.assign(tps)

    async def _handle(self, messages: list[Message]) -> None:
        # Step 1.
        records = []
        for msg in messages:
            err = msg.error()
            if err is None:
                records.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001
                logger.warning("%s: %s", self.name, err)
        if not records:
            return
        # Step 2.
        reasons: dict[int, str] = {}
        inputs: dict[int, Any] = {}
        for i, msg in enumerate(records):
            try:
                inputs[i] = self.decode(msg.value(), header_map(msg.headers()))
            except InvalidRecordError as exc:
                reasons[i] = str(exc)
        # Step 3.
        results = await asyncio.gather(*(
            self._deliver(records[i], value) for i, value in inputs.items()),
            return_exceptions=True)
        for i, result in zip(inputs, results, strict=True):
            if isinstance(result, REJECTED):
                reasons[i] = str(result)
            elif isinstance(result, BaseException):
                raise result
        # Step 4.
        if reasons:
            rejected = [(records[i], reason) for i, reason in reasons.items()]
            await asyncio.to_thread(self._dead_letter, rejected)
        # Step 5.
        offsets = dict(self.offsets)
        for msg in records:
            offsets[cast(int, msg.partition())] = cast(int, msg.offset()) + 1
        await asyncio.to_thread(self.state.save, {"offsets": str_keys(offsets),
                                                  "topic_id": self.topic_id})
        self.offsets = offsets
        self.triggered += len(inputs) - sum(i in reasons for i in inputs)
        self.dead_lettered += len(reasons)

    async def _deliver(self, msg: Message, value: Any) -> None:
        """Trigger the binding's workflow with the record, or send it as an event."""
        key = self.key(cast(int, msg.partition()), cast(int, msg.offset()))
        if self.workflow is not None:
            await self.engine.runtime.trigger(self.workflow, value, idempotency_key=key)
            return
        event_type, event_id, data = self.source.event, key, value
        source = f"kafka://{self.source.topic}"
        if self.source.format == "cloudevents":
            attributes, data = value
            event_id, source = str(attributes["id"]), str(attributes["source"])
            if event_type == "*":
                event_type = str(attributes["type"])
        assert event_type is not None  # the config requires binding or event
        await self.engine.runtime.send_event(event_type, data, id=event_id, source=source)

    def _dead_letter(self, rejected: list[tuple[Message, str]]) -> None:
        topic = self.source.dead_letters
        if not self._dlq_ready:
            ensure_topic(self.log, topic, 1)
            self._dlq_ready = True
        letters = []
        for msg, reason in rejected:
            original = cast(list[tuple[str, bytes | None]], msg.headers() or [])
            headers: Headers = [(k, v or b"") for k, v in original]
            headers += [
                (H_ERROR, utf8(reason)),  # the reason may quote the input, in any text
                (H_TOPIC, self.source.topic.encode()),
                (H_PARTITION, str(msg.partition()).encode()),
                (H_OFFSET, str(msg.offset()).encode()),
            ]
            letters.append(DeadLetter(msg.key(), msg.value(), headers))
            logger.warning("%s: partition %s offset %s to %s: %s", self.name, msg.partition(),
                           msg.offset(), topic, reason)
        send_dead_letters(self._producer, self.name, topic, letters)
