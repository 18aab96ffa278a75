"""Follow ``<prefix>.events`` from positions a connector keeps itself.

Sinks read the events topic on their own consumer, assigned every partition
at the offsets they saved (no consumer group: nothing to join, nothing to
commit). Each record is decoded with the engine's codec. A record that does
not decode stops its partition at that offset, reported with topic,
partition and offset, exactly as the fold does: it is never skipped.

Fencing (the fold's rule for scale-out): a ``PartitionClaimed`` with a higher
epoch makes the runtime events of lower epochs on that partition void. The
tail applies the same rule and marks such records ``fenced`` so lifecycle
sinks do not publish what the view ignores; the claim epochs are part of the
saved position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from confluent_kafka import KafkaError, TopicPartition

from connectors.kafka import make_consumer
from engine.errors import CodecError, CorruptEventError
from engine.events import CLIENT_EVENTS, Event, PartitionClaimed
from engine.log import EventLog

logger = logging.getLogger("ploy.connectors")


@dataclass(frozen=True)
class TailRecord:
    """One decoded event and where it is; ``fenced`` when the fold ignores it."""

    partition: int
    offset: int
    event: Event
    fenced: bool


@dataclass
class Position:
    """Where a sink is in the events topic: next offset and claim epoch per partition."""

    offsets: dict[int, int]
    epochs: dict[int, int]

    def copy(self) -> Position:
        return Position(dict(self.offsets), dict(self.epochs))


class EventTail:
    """Reads the events topic from a :class:`Position`, in order per partition."""

    def __init__(self, log: EventLog, name: str, position: Position):
        self.log, self.name = log, name
        self.position = position.copy()  # what has been read (the caller saves its own)
        self.at_end: set[int] = set()
        self.stalled: dict[int, CorruptEventError] = {}
        self._consumer = make_consumer(log, f"{log.topic}.{name}",
                                       **{"enable.partition.eof": True})
        self._assign()

    @property
    def partitions(self) -> range:
        return range(self.log.partitions)

    def _assign(self) -> None:
        self.at_end.clear()
        self._consumer.assign([
            TopicPartition(self.log.topic, p, self.position.offsets.get(p, 0))
            for p in self.partitions if p not in self.stalled
        ])

    def rewind(self, position: Position) -> None:
        """Read again from ``position`` (the last one saved) after a failed attempt."""
        self.position = position.copy()
        self._assign()

    def caught_up(self) -> bool:
        """Whether every readable partition reached its end since the last record."""
        return all(p in self.at_end or p in self.stalled for p in self.partitions)

    def poll(self, timeout_s: float, max_records: int = 1000) -> list[TailRecord]:
        """The next records, in order per partition; advances :attr:`position`."""
        records: list[TailRecord] = []
        for msg in self._consumer.consume(max_records, timeout_s):
            partition = cast(int, msg.partition())
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                    self.at_end.add(partition)
                else:
                    logger.warning("%s reading %s: %s", self.name, self.log.topic, err)
                continue
            if partition in self.stalled:
                continue
            self.at_end.discard(partition)
            offset = cast(int, msg.offset())
            try:
                event = self.log.codec.decode(cast(bytes, msg.value()))
            except CodecError as exc:
                self._stall(CorruptEventError(self.log.topic, partition, offset, str(exc)))
                continue
            records.append(TailRecord(partition, offset, event, self._fenced(partition, event)))
            self.position.offsets[partition] = offset + 1
        return records

    def _fenced(self, partition: int, event: Event) -> bool:
        """The fold's rule: a claim raises the epoch; older runtime events are void."""
        epoch = self.position.epochs.get(partition, 0)
        if isinstance(event.body, PartitionClaimed):
            self.position.epochs[partition] = max(epoch, event.epoch)
            return True  # a claim is no lifecycle event of any execution
        return event.epoch < epoch and not isinstance(event.body, CLIENT_EVENTS)

    def _stall(self, error: CorruptEventError) -> None:
        self.stalled[error.partition] = error
        self._consumer.pause([TopicPartition(self.log.topic, error.partition)])
        logger.error("%s: %s", self.name, error)

    def close(self) -> None:
        self._consumer.close()
