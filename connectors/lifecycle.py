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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connectors.cloudevents import CONTENT_TYPE, encode, lifecycle_type, to_cloudevent
from connectors.kafka import Batch, ensure_topic, make_producer
from connectors.sink import SinkThread
from connectors.state import StateFile, connectors_dir, int_keys, str_keys
from connectors.tail import EventTail, Position
from engine.config import TopicSink

if TYPE_CHECKING:
    from engine.app import Engine

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
    4. Save the position (next offset and claim epoch per partition).
    A failure in 2-4 saves nothing: the sink goes back to the saved position
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
        self.published = 0

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
        batch = Batch(self.producer, self.name)
        for record in records:
            event = record.event
            type_name = None if record.fenced else lifecycle_type(event)
            if type_name is None or not self.sink.selects(event.workflow, type_name):
                continue
            value = encode(to_cloudevent(event, self.prefix, type_name))
            batch.produce(self.sink.topic, value, event.execution_id.encode(), headers=HEADERS)
        # Step 3.
        batch.wait()
        # Step 4.
        self.state.save(position_doc(self.tail.position))
        self.saved = self.tail.position.copy()
        self.published += batch.pending

    def recover(self) -> None:
        self.tail.rewind(self.saved)

    def finish(self) -> None:
        self.producer.flush(10)
