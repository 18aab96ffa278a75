"""Follow ``<prefix>.events`` on the partitions a sink publishes, from positions it keeps.

Sinks read the events topic on their own consumer, assigned the partitions
they publish (those this process owns, see :mod:`connectors.sink`) at the
offsets they resume from (no consumer group join: the engine's group decides
ownership; the sink only follows it). Each record is decoded with the
engine's codec. A record that does not decode stops its partition at that
offset, reported with topic, partition and offset, exactly as the fold does:
it is never skipped.

Fencing (the fold's rule for scale-out): a ``PartitionClaimed`` with a higher
epoch makes the runtime events of lower epochs on that partition void. The
tail applies the same rule and marks such records ``fenced`` so lifecycle
sinks do not publish what the view ignores. A sink resumes a partition with
the claim epoch in force at its resume offset (:meth:`EventTail.epoch_at`
tells it for any offset read since), so it fences exactly as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


@dataclass
class _Claims:
    """The claims read on one partition since ``base_offset``: the epoch at any offset."""

    base_offset: int
    base_epoch: int
    seen: list[tuple[int, int]] = field(default_factory=list)  # (offset, epoch), in order

    def epoch_at(self, offset: int) -> int:
        epoch = self.base_epoch
        for at, claimed in self.seen:
            if at < offset:
                epoch = max(epoch, claimed)
        return epoch


# A fetch answered once 256 KiB are there or after 200 ms (the archive's reads).
BATCHED_FETCH = {"fetch.wait.max.ms": 200, "fetch.min.bytes": 256 * 1024}


def _batched(log: EventLog) -> dict[str, int]:
    """``BATCHED_FETCH``, but what the user set in ``kafka.config`` wins."""
    return {k: v for k, v in BATCHED_FETCH.items() if k not in log.extra}


class EventTail:
    """Reads the events topic from a :class:`Position`, in order per partition.

    With ``position`` every partition of the topic is followed from there (a
    partition it does not name from offset 0); without, none is until
    :meth:`add` names it. ``batched``: a reader for which a fraction of a second
    does not matter (the archive) fetches in batches (``BATCHED_FETCH``): far
    fewer fetch requests for the broker to answer under load.
    """

    def __init__(self, log: EventLog, name: str, position: Position | None = None, *,
                 batched: bool = False):
        self.log, self.name = log, name
        self.position = Position({}, {})  # what has been read (the caller saves its own)
        self.at_end: set[int] = set()
        self.stalled: dict[int, CorruptEventError] = {}
        self._claims: dict[int, _Claims] = {}
        self._consumer = make_consumer(log, f"{log.topic}.{name}",
                                       **{"enable.partition.eof": True,
                                          **(_batched(log) if batched else {})})
        if position is not None:
            for p in range(log.partitions):
                self._follow(p, position.offsets.get(p, 0), position.epochs.get(p, 0))
            self._assign()

    @property
    def partitions(self) -> list[int]:
        """The partitions followed now."""
        return sorted(self.position.offsets)

    def add(self, partition: int, offset: int, epoch: int) -> None:
        """Follow ``partition`` from ``offset``, where claim ``epoch`` is in force."""
        self.stalled.pop(partition, None)
        self._follow(partition, offset, epoch)
        self._assign()

    def remove(self, partition: int) -> None:
        """Stop following ``partition`` (records of it already fetched are dropped)."""
        self.position.offsets.pop(partition, None)
        self.position.epochs.pop(partition, None)
        self._claims.pop(partition, None)
        self.stalled.pop(partition, None)
        self._assign()

    def epoch_at(self, partition: int, offset: int) -> int:
        """The claim epoch in force at ``offset`` (an offset read since the partition's start)."""
        claims = self._claims.get(partition)
        return 0 if claims is None else claims.epoch_at(offset)

    def forget_before(self, partition: int, offset: int) -> None:
        """Drop what :meth:`epoch_at` keeps about offsets below ``offset`` (saved there)."""
        claims = self._claims.get(partition)
        if claims is None or offset <= claims.base_offset:
            return
        self._claims[partition] = _Claims(offset, claims.epoch_at(offset),
                                          [c for c in claims.seen if c[0] >= offset])

    def _follow(self, partition: int, offset: int, epoch: int) -> None:
        self.position.offsets[partition] = offset
        self.position.epochs[partition] = epoch
        self._claims[partition] = _Claims(offset, epoch)

    def _assign(self) -> None:
        self.at_end.clear()
        self._consumer.assign([
            TopicPartition(self.log.topic, p, o)
            for p, o in sorted(self.position.offsets.items()) if p not in self.stalled
        ])

    def rewind(self, position: Position) -> None:
        """Read again from ``position`` (the last one saved) after a failed attempt.

        Only the partitions followed now move; the epochs known at the
        earlier offsets come back with them.
        """
        for p in self.partitions:
            if p in position.offsets:
                offset = position.offsets[p]
                self.position.offsets[p] = offset
                self.position.epochs[p] = position.epochs.get(p, self.epoch_at(p, offset))
                claims = self._claims[p]
                claims.seen = [c for c in claims.seen if c[0] < offset]
        self._assign()

    def caught_up(self) -> bool:
        """Whether every readable partition reached its end since the last record."""
        return all(p in self.at_end or p in self.stalled for p in self.partitions)

    def poll(self, timeout_s: float, max_records: int = 1000) -> list[TailRecord]:
        """The next records, in order per partition; advances :attr:`position`."""
        records: list[TailRecord] = []
        if not self.position.offsets:
            return records
        for msg in self._consumer.consume(max_records, timeout_s):
            partition = cast(int, msg.partition())
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                    self.at_end.add(partition)
                else:
                    logger.warning("%s reading %s: %s", self.name, self.log.topic, err)
                continue
            offset = cast(int, msg.offset())
            expected = self.position.offsets.get(partition)
            if partition in self.stalled or expected is None or offset < expected:
                continue  # not followed (any more), or read already
            self.at_end.discard(partition)
            try:
                event = self.log.codec.decode(cast(bytes, msg.value()))
            except CodecError as exc:
                self._stall(CorruptEventError(self.log.topic, partition, offset, str(exc)))
                continue
            records.append(TailRecord(partition, offset, event,
                                      self._fenced(partition, offset, event)))
            self.position.offsets[partition] = offset + 1
        return records

    def _fenced(self, partition: int, offset: int, event: Event) -> bool:
        """The fold's rule: a claim raises the epoch; older runtime events are void."""
        epoch = self.position.epochs.get(partition, 0)
        if isinstance(event.body, PartitionClaimed):
            self.position.epochs[partition] = max(epoch, event.epoch)
            self._claims[partition].seen.append((offset, event.epoch))
            return True  # a claim is no lifecycle event of any execution
        return event.epoch < epoch and not isinstance(event.body, CLIENT_EVENTS)

    def _stall(self, error: CorruptEventError) -> None:
        self.stalled[error.partition] = error
        self._consumer.pause([TopicPartition(self.log.topic, error.partition)])
        logger.error("%s: %s", self.name, error)

    def close(self) -> None:
        self._consumer.close()
