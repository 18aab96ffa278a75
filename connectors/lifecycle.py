"""Sink: execution lifecycle -> a Kafka topic, as CloudEvents JSON.

``sinks: [{kind: topic, topic: ploy.lifecycle, workflows: [...], types: [...]}]``

Other teams consume the outbound topic with any Kafka client and no Avro
schema: each record is one structured-mode CloudEvent (see
:mod:`connectors.cloudevents`), keyed by execution id, with the header
``content-type: application/cloudevents+json``, and ``ploy.source.partition``
and ``ploy.source.offset`` naming the event's place in ``<prefix>.events``.
The events of partition ``p`` go to partition ``p`` of the outbound topic
(``p`` modulo its partition count if it has fewer), so one execution's
events stay on one partition, in the order of the log.

Guarantees: every selected event is published exactly once (by CloudEvents
``id``), also in a cluster and across a worker killed at any point:

- Only the owner of a partition publishes it (:mod:`connectors.sink`).
- Its position is committed in Kafka (:mod:`connectors.positions`) after
  the records before it are acknowledged, so whoever publishes the
  partition next starts there.
- What was published after the last commit (a kill between the
  acknowledgement and the commit) is found, not repeated: the next
  publisher reads the outbound and dead-letter partitions from the scan
  marks committed with the position, notes the source offsets already
  there, and skips them.

This rests on plain produce and read, not on Kafka transactions: the
embedded broker shows aborted records to ``read_committed`` consumers, so
an aborted attempt would reach consumers as a duplicate there. What it
needs is that the old publisher of a partition has stopped when the new one
starts: true after a kill, and in a planned handoff (the old owner stops
publishing the partition when it loses it, and the new owner only gets it
after a rebalance). A process frozen past its session that wakes and
publishes before hearing it lost the partition can still repeat events,
with the same CloudEvents ``id``, for consumers to deduplicate.

An event that cannot be published for a reason of its own (Kafka refuses its
record, e.g. too large) goes to ``<topic>.dlq`` instead, with the reason and
the event's place in the log in headers (``ploy.error``, ``ploy.event_id``,
``ploy.source.topic/partition/offset``; its value when the dead-letter topic
takes it), once, by the same rule; and the sink goes on. A broker that does
not answer is no such reason: the sink waits and publishes from its saved
position again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from connectors.cloudevents import CONTENT_TYPE, encode, lifecycle_type, to_cloudevent, utf8
from connectors.kafka import (
    Batch,
    DeadLetter,
    ensure_topic,
    make_producer,
    partitions_of,
    read_to_end,
    send_dead_letters,
)
from connectors.positions import Mark, SinkPositions
from connectors.sink import SinkThread
from connectors.state import StateFile, connectors_dir, int_keys, str_keys
from connectors.tail import EventTail, Position, TailRecord
from engine.config import TopicSink
from engine.log import EventLog

if TYPE_CHECKING:
    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

HEADERS = [("content-type", CONTENT_TYPE.encode())]
H_PARTITION = "ploy.source.partition"
H_OFFSET = "ploy.source.offset"


def load_position(state: StateFile) -> Position:
    saved = state.load()
    return Position(int_keys(saved.get("offsets")), int_keys(saved.get("epochs")))


def position_doc(position: Position) -> dict[str, dict[str, int]]:
    return {"offsets": str_keys(position.offsets), "epochs": str_keys(position.epochs)}


def mirror_file(engine: Engine, file_name: str) -> StateFile | None:
    """The local copy of a sink's positions: only a single worker keeps one (see positions)."""
    if getattr(engine, "scale_out", False):
        return None
    return StateFile(connectors_dir(engine.config) / file_name)


def published_since(log: EventLog, topic: str, partition: int, from_offset: int,
                    source: int, since: int) -> tuple[set[int], int]:
    """Source offsets ``>= since`` of events partition ``source`` already in ``topic``.

    Reads ``topic``'s ``partition`` from ``from_offset`` to its end. Returns
    them and the offset after the last record of ``source`` read (or
    ``from_offset``): a scan mark that stays right.
    """
    found: set[int] = set()
    mark = from_offset
    for offset, headers, _ in read_to_end(log, topic, partition, from_offset):
        if headers.get(H_PARTITION) != str(source).encode():
            continue
        try:
            at = int(headers.get(H_OFFSET, b""))
        except ValueError:
            continue
        if at >= since:
            found.add(at)
        else:
            mark = offset + 1
    return found, mark


@dataclass
class _Partition:
    """What the sink knows about one partition it publishes."""

    mark: Mark
    done: set[int] = field(default_factory=set)  # source offsets found already published
    pending_scan: int | None = None  # highest outbound offset of this batch (the next mark)
    pending_dlq: int | None = None


class LifecycleSink(SinkThread):
    """One ``kind: topic`` sink. Starting a partition:

    1. Load its committed position (offset, epoch, scan marks).
    2. Read the outbound and dead-letter partitions from the scan marks:
       the source offsets found there are published already.
    3. Follow the events partition from the committed offset.

    Each step:

    1. Poll the events topic from the position read so far.
    2. For each event the fold does not ignore (fencing) whose workflow and
       lifecycle type the sink selects and that is not published already,
       produce its CloudEvent, keyed by execution id.
    3. Wait until Kafka acknowledged every one.
    4. Dead-letter the events that could not be published for a reason of
       their own, and wait for those acknowledgements.
    5. Commit each partition's position (next offset, claim epoch, then the
       scan marks).
    A failure in 2-5 commits nothing: the sink starts its partitions afresh
    (as above), so what went out before the failure is not published again.
    """

    def __init__(self, engine: Engine, sink: TopicSink):
        super().__init__()
        self.sink = sink
        self.name = f"topic sink {sink.topic}"
        self.log = engine.runtime.log
        self.prefix = engine.config.kafka.topic_prefix
        self.positions = SinkPositions(self.log, self.prefix, f"topic.{sink.topic}",
                                       mirror_file(engine, f"topic-{sink.topic}.json"))
        self.dead_letter_topic = f"{sink.topic}.dlq"
        self.parts: dict[int, _Partition] = {}
        self.published = 0
        self.dead_lettered = 0

    def setup(self) -> None:
        self.outbound_partitions = ensure_topic(self.log, self.sink.topic, self.log.partitions)
        self.dlq_partitions = partitions_of(self.log, self.dead_letter_topic)
        self.positions.setup()
        self.producer = make_producer(self.log)
        self.tail = EventTail(self.log, f"sink.topic.{self.sink.topic}")

    def start_partition(self, partition: int) -> None:
        # Step 1.
        mark = self.positions.load(partition)
        # Step 2.
        part = _Partition(mark)
        part.done, mark.scan = published_since(self.log, self.sink.topic, self._out(partition),
                                               mark.scan, partition, mark.offset)
        if self.dlq_partitions:
            letters, mark.dlq = published_since(self.log, self.dead_letter_topic,
                                                partition % self.dlq_partitions, mark.dlq,
                                                partition, mark.offset)
            part.done |= letters
        if part.done:
            logger.info("%s: partition %d: %d events published before the last commit; "
                        "not again", self.name, partition, len(part.done))
        # Step 3.
        self.parts[partition] = part
        self.tail.add(partition, mark.offset, mark.epoch)

    def stop_partition(self, partition: int) -> None:
        self.tail.remove(partition)  # every step ends committed: nothing more to save
        self.parts.pop(partition, None)

    def _out(self, partition: int) -> int:
        return partition % self.outbound_partitions

    def step(self) -> None:
        # Step 1.
        records = self.tail.poll(0.2)
        if not records:
            return
        # Step 2.
        batch = Batch(self.producer, self.name, keep_refused=True)
        letters: list[tuple[TailRecord, DeadLetter]] = []
        for record in records:
            event = record.event
            type_name = None if record.fenced else lifecycle_type(event)
            if type_name is None or not self.sink.selects(event.workflow, type_name):
                continue
            if record.offset in self.parts[record.partition].done:
                continue
            try:
                value = encode(to_cloudevent(event, self.prefix, type_name))
            except Exception as exc:  # this event's own trouble: encode is total, a last guard
                letters.append((record, self._letter(record, None,
                                                     f"{type(exc).__name__}: {exc}")))
                continue
            batch.produce(self.sink.topic, value, event.execution_id.encode(),
                          headers=[*HEADERS, *self._source(record)],
                          partition=self._out(record.partition), tag=(record, value))
        # Step 3.
        batch.wait()
        for (record, _), _, offset in batch.acked:
            part = self.parts[record.partition]
            part.pending_scan = max(part.pending_scan or 0, offset)
        letters += [(record, self._letter(record, value, reason))
                    for (record, value), reason in batch.refused]
        # Step 4.
        if letters:
            self._dead_letter(letters)
        # Step 5.
        for p in {r.partition for r in records}:
            self._commit(p)
        self.published += batch.pending - len(batch.refused)
        self.dead_lettered += len(letters)

    def _commit(self, partition: int) -> None:
        part = self.parts[partition]
        offset = self.tail.position.offsets[partition]
        mark = Mark(offset, self.tail.epoch_at(partition, offset), part.mark.scan, part.mark.dlq)
        if part.pending_scan is not None:
            mark.scan = part.pending_scan + 1
        if part.pending_dlq is not None:
            mark.dlq = part.pending_dlq + 1
        self.positions.commit(partition, mark)
        part.mark, part.pending_scan, part.pending_dlq = mark, None, None
        part.done = {o for o in part.done if o >= offset}
        self.tail.forget_before(partition, offset)

    def _source(self, record: TailRecord) -> list[tuple[str, bytes]]:
        return [(H_PARTITION, str(record.partition).encode()),
                (H_OFFSET, str(record.offset).encode())]

    def _letter(self, record: TailRecord, value: bytes | None, reason: str) -> DeadLetter:
        return DeadLetter(record.event.execution_id.encode(), value, [
            *HEADERS,
            ("ploy.error", utf8(reason)),
            ("ploy.event_id", record.event.event_id.encode()),
            ("ploy.source.topic", self.log.topic.encode()),
            *self._source(record),
        ])

    def _dead_letter(self, letters: list[tuple[TailRecord, DeadLetter]]) -> None:
        if not self.dlq_partitions:
            self.dlq_partitions = ensure_topic(self.log, self.dead_letter_topic,
                                               self.log.partitions)
        by_partition: dict[int, list[DeadLetter]] = {}
        for record, letter in letters:
            by_partition.setdefault(record.partition, []).append(letter)
        for p, some in by_partition.items():
            acked = send_dead_letters(self.producer, self.name, self.dead_letter_topic, some,
                                      partition=p % self.dlq_partitions)
            if acked >= 0:
                self.parts[p].pending_dlq = max(acked, self.parts[p].pending_dlq or 0)
        for _, letter in letters:
            logger.warning("%s: event %s to %s: %s", self.name,
                           dict(letter.headers)["ploy.event_id"].decode(),
                           self.dead_letter_topic,
                           dict(letter.headers)["ploy.error"].decode())

    def recover(self) -> None:
        """Start every partition afresh: what a failed step published is found by the scan."""
        for p in list(self.started):
            self.stop_partition(p)
        self.started.clear()

    def finish(self) -> None:
        self.producer.flush(10)
        self.positions.close()
