"""The way past a corrupt record: an operator's skip marker, found by looking ahead.

A record the fold cannot read stops its partition (invariant 6: never skipped
silently). ``ploy skip --partition P --offset O --reason ...`` is the way on:

1. It appends ``RecordSkipped(P, O, reason, actor)`` to partition P, after the
   corrupt record: the log itself records who skipped what and why.
2. A fold stopped at O (a worker's, or ``ploy rebuild``'s) looks ahead in the
   partition for that marker (:func:`find_skip`); finding it, the view steps over
   O (``PartitionView.skip``: the skip and the next offset in one WriteBatch) and
   the fold goes on at O + 1.

The decision depends only on the log, so a rebuild from offset 0 takes the same
skip and writes the same bytes (invariant 1).
"""

from __future__ import annotations

import getpass
import socket
import time

from engine.errors import CodecError, CorruptEventError
from engine.events import Event, RecordSkipped, claim_id
from engine.log import EventLog
from engine.view import PartitionView

__all__ = ["apply_or_skip", "find_skip", "operator", "skip_record"]


def operator() -> str:
    """Who runs this process, for the audit trail of an operator's action: ``user@host``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def skip_record(log: EventLog, partition: int, offset: int, reason: str,
                actor: str | None = None) -> int:
    """Append the marker that skips the record at ``partition``/``offset``; its offset."""
    if not reason.strip():
        raise ValueError("a skip needs a reason (it is kept on the log for the audit)")
    if not 0 <= partition < log.partitions:
        raise ValueError(f"partition {partition} is not in 0..{log.partitions - 1}")
    if offset < 0:
        raise ValueError(f"offset {offset} is negative")
    event = Event(claim_id(partition), "", _now_ms(),
                  RecordSkipped(partition, offset, reason, actor or operator()))
    _, at = log.append_sync(event, partition=partition)
    return at


def find_skip(log: EventLog, partition: int, offset: int) -> tuple[Event, int] | None:
    """The first marker after ``offset`` that skips it, with its offset, or None."""
    for batches in log.read_until_end({partition: offset + 1}):
        for at, raw in batches.get(partition, []):
            try:
                event = log.codec.decode(raw)
            except CodecError:
                continue  # another unreadable record: not a marker
            body = event.body
            if (isinstance(body, RecordSkipped) and body.partition == partition
                    and body.skipped_offset == offset):
                return event, at
    return None


def apply_or_skip(log: EventLog, view: PartitionView,
                  records: list[tuple[int, bytes]]) -> tuple[list[tuple[int, Event]],
                                                             CorruptEventError | None]:
    """``view.apply(records)``, stepping over each unreadable record an operator skipped.

    Returns what was applied and the failure still in the way (no marker for it).
    """
    applied, failure = view.apply(records)
    while failure is not None:
        found = find_skip(log, view.partition, failure.offset)
        if found is None:
            break
        view.skip(failure.offset, *found)
        more, failure = view.apply(records)
        applied += more
    return applied, failure


def _now_ms() -> int:
    return int(time.time() * 1000)
