"""Sink: execution lifecycle -> a Kafka topic, as CloudEvents JSON.

``sinks: [{kind: topic, topic: ploy.lifecycle, workflows: [...], types: [...]}]``

Other teams consume the outbound topic with any Kafka client and no Avro
schema: each record is one structured-mode CloudEvent (see
:mod:`connectors.cloudevents`), keyed by execution id, with the header
``content-type: application/cloudevents+json``.

Guarantees: every selected event is published at least once, in the order of
the log for each execution (one execution's events are on one partition of
``<prefix>.events``, read in order, and produced in order by an idempotent
producer under the execution id as key). After a crash the sink starts again
from its last saved position, so some events may be published twice; their
CloudEvents ``id`` is the same both times, for consumers to deduplicate.

An event that cannot be published for a reason of its own (Kafka refuses its
record, e.g. too large) goes to ``<topic>.dlq`` instead, with the reason and
the event's place in the log in headers (``ploy.error``, ``ploy.event_id``,
``ploy.source.topic/partition/offset``; its value when the dead-letter topic
takes it), and the sink goes on. A broker that does not answer is no such
reason: the sink waits and publishes from its saved position again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from connectors.cloudevents import CONTENT_TYPE, encode, lifecycle_type, to_cloudevent, utf8
from connectors.kafka import (
    Batch,
    DeadLetter,
    ensure_topic,
    make_producer,
    send_dead_letters,
)
from connectors.sink import SinkThread
from connectors.state import StateFile, connectors_dir, int_keys, str_keys
from connectors.tail import EventTail, Position, TailRecord
from engine.config import TopicSink

if TYPE_CHECKING:
    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

HEADERS = [("content-type", CONTENT_TYPE.encode())]


def load_position(state: StateFile) -> Position:
    saved = state.load()
    return Position(int_keys(saved.get("offsets")), int_keys(saved.get("epochs")))


def position_doc(position: Position) -> dict[str, dict[str, int]]:
    return {"offsets": str_keys(position.offsets), "epochs": str_keys(position.epochs)}


class LifecycleSink(SinkThread):
    """One ``kind: topic`` sink. Each step:

    1. Poll the events topic from the position read so far.
    2. For each event the fold does not ignore (fencing) whose workflow and
       lifecycle type the sink selects, produce its CloudEvent, keyed by
       execution id.
    3. Wait until Kafka acknowledged every one.
    4. Dead-letter the events that could not be published for a reason of
       their own, and wait for those acknowledgements.
    5. Save the position (next offset and claim epoch per partition).
    A failure in 2-5 saves nothing: the sink goes back to the saved position
    and publishes from there again.
    """

    def __init__(self, engine: Engine, sink: TopicSink):
        super().__init__()
        self.sink = sink
        self.name = f"topic sink {sink.topic}"
        self.log = engine.runtime.log
        self.prefix = engine.config.kafka.topic_prefix
        self.state = StateFile(connectors_dir(engine.config) / f"topic-{sink.topic}.json")
        self.saved = load_position(self.state)
        self.dead_letter_topic = f"{sink.topic}.dlq"
        self.published = 0
        self.dead_lettered = 0
        self._dlq_ready = False

    def setup(self) -> None:
        ensure_topic(self.log, self.sink.topic, self.log.partitions)
        self.producer = make_producer(self.log)
        self.tail = EventTail(self.log, f"sink.topic.{self.sink.topic}", self.saved)

    def step(self) -> None:
        # Step 1.
        records = self.tail.poll(0.2)
        if not records:
            return
        # Step 2.
        batch = Batch(self.producer, self.name, keep_refused=True)
        letters: list[DeadLetter] = []
        for record in records:
            event = record.event
            type_name = None if record.fenced else lifecycle_type(event)
            if type_name is None or not self.sink.selects(event.workflow, type_name):
                continue
            try:
                value = encode(to_cloudevent(event, self.prefix, type_name))
            except Exception as exc:  # this event's own trouble: encode is total, a last guard
                letters.append(self._letter(record, None, f"{type(exc).__name__}: {exc}"))
                continue
            batch.produce(self.sink.topic, value, event.execution_id.encode(), headers=HEADERS,
                          tag=(record, value))
        # Step 3.
        batch.wait()
        letters += [self._letter(record, value, reason)
                    for (record, value), reason in batch.refused]
        # Step 4.
        if letters:
            self._dead_letter(letters)
        # Step 5.
        self.state.save(position_doc(self.tail.position))
        self.saved = self.tail.position.copy()
        self.published += batch.pending - len(batch.refused)
        self.dead_lettered += len(letters)

    def _letter(self, record: TailRecord, value: bytes | None, reason: str) -> DeadLetter:
        return DeadLetter(record.event.execution_id.encode(), value, [
            *HEADERS,
            ("ploy.error", utf8(reason)),
            ("ploy.event_id", record.event.event_id.encode()),
            ("ploy.source.topic", self.log.topic.encode()),
            ("ploy.source.partition", str(record.partition).encode()),
            ("ploy.source.offset", str(record.offset).encode()),
        ])

    def _dead_letter(self, letters: list[DeadLetter]) -> None:
        if not self._dlq_ready:
            ensure_topic(self.log, self.dead_letter_topic, 1)
            self._dlq_ready = True
        send_dead_letters(self.producer, self.name, self.dead_letter_topic, letters)
        for letter in letters:
            logger.warning("%s: event %s to %s: %s", self.name,
                           dict(letter.headers)["ploy.event_id"].decode(),
                           self.dead_letter_topic,
                           dict(letter.headers)["ploy.error"].decode())

    def recover(self) -> None:
        self.tail.rewind(self.saved)

    def finish(self) -> None:
        self.producer.flush(10)
