"""Where sinks keep their positions: in Kafka, so whichever worker publishes a
partition next goes on where the last one stopped.

Each sink has a consumer group, ``<prefix>.sink.<name>``, that no process
joins; it is only a place for committed offsets:

- on ``<prefix>.events``, partition ``p``: the next offset of ``p`` the sink
  has to publish (everything before it is published, delivered or
  dead-lettered);
- on ``<prefix>.connectors.marks``, partition ``slot * N + p`` (``N`` the
  events topic's partition count), small numbers that belong with that
  offset and that Kafka's commit metadata would hold if every broker kept it
  (the embedded broker drops it): the claim ``epoch`` in force at the offset
  (for fencing), and where in the sink's own output (``scan``) and
  dead-letter topic (``dlq``) the records it published for ``p`` since then
  begin, so a new owner reads only those to learn what is already out.

:meth:`SinkPositions.commit` writes the offset and its epoch in one commit,
and the scan marks in a second one after it: a crash between the two leaves
older scan marks, which only make the next owner read a little more.

``ploy dev``'s embedded broker keeps committed offsets in memory only, so a
single worker (not ``scale_out``) also writes its positions to
``<state_dir>/<prefix>.connectors/<file>`` (:class:`connectors.state.StateFile`);
a partition with no committed offset in Kafka resumes from there. A
scaled-out worker keeps no such file: Kafka is where the cluster looks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition

from connectors.kafka import ensure_topic, make_consumer
from connectors.state import StateFile, int_keys, str_keys
from engine.log import EventLog

SLOTS = ("epoch", "scan", "dlq")


def marks_topic(prefix: str) -> str:
    """The topic the sinks' marks are committed on (never written to)."""
    return f"{prefix}.connectors.marks"


@dataclass
class Mark:
    """A sink's position in one partition of the events topic, with what goes with it."""

    offset: int = 0
    epoch: int = 0
    scan: int = 0
    dlq: int = 0


class SinkPositions:
    """Committed offsets of the group ``<prefix>.sink.<name>``, read and written by partition."""

    def __init__(self, log: EventLog, prefix: str, name: str, mirror: StateFile | None = None):
        self.log, self.mirror = log, mirror
        self.group = f"{prefix}.sink.{name}"
        self.marks = marks_topic(prefix)
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._mirrored = mirror.load() if mirror is not None else {}

    def setup(self) -> None:
        """Create the marks topic if missing; open the consumer used only for commits."""
        ensure_topic(self.log, self.marks, len(SLOTS) * self.log.partitions)
        self._consumer = make_consumer(self.log, self.group)

    def _marks(self, partition: int) -> list[TopicPartition]:
        n = self.log.partitions
        return [TopicPartition(self.marks, slot * n + partition) for slot in range(len(SLOTS))]

    def load(self, partition: int) -> Mark:
        """Where ``partition`` resumes: Kafka's committed offsets, else the mirror file, else 0."""
        asked = [TopicPartition(self.log.topic, partition), *self._marks(partition)]
        got = self._consumer.committed(asked, timeout=self.log.connect_timeout_s)
        values = [max(tp.offset, 0) if tp.error is None else 0 for tp in got]
        offset, epoch, scan, dlq = values
        if got[0].offset < 0 and self.mirror is not None:  # never committed here
            with self._lock:
                offset = int_keys(self._mirrored.get("offsets")).get(partition, 0)
                epoch = int_keys(self._mirrored.get("epochs")).get(partition, 0)
        return Mark(offset, epoch, scan, dlq)

    def commit(self, partition: int, mark: Mark) -> None:
        """Commit ``mark`` for ``partition``: offset and epoch first, then the scan marks."""
        epoch_tp, scan_tp, dlq_tp = self._marks(partition)
        epoch_tp.offset, scan_tp.offset, dlq_tp.offset = mark.epoch, mark.scan, mark.dlq
        events_tp = TopicPartition(self.log.topic, partition, mark.offset)
        self._consumer.commit(offsets=[events_tp, epoch_tp], asynchronous=False)
        self._consumer.commit(offsets=[scan_tp, dlq_tp], asynchronous=False)
        if self.mirror is not None:
            with self._lock:
                saved = self._mirrored
                offsets = int_keys(saved.get("offsets")) | {partition: mark.offset}
                epochs = int_keys(saved.get("epochs")) | {partition: mark.epoch}
                self._mirrored = {"group": self.group, "offsets": str_keys(offsets),
                                  "epochs": str_keys(epochs)}
                self.mirror.save(self._mirrored)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
