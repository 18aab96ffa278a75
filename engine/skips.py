"""The way past a corrupt record: an operator's skip marker, found by looking ahead.

A record the fold cannot read stops its partition (invariant 6: never skipped
silently). ``ploy skip --partition P --offset O --reason ...`` is the way on:

1. It asks a running engine (``POST /__ploy/api/partitions/P/skip``, which
   refuses any offset but the one P is stopped at) to append
   ``RecordSkipped(P, O, reason, actor)`` to partition P, after the corrupt
   record: the log itself records who skipped what and why.
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

from engine.errors import CodecError, CorruptEventError
from engine.events import Event, RecordSkipped
from engine.log import EventLog
from engine.view import PartitionView

__all__ = ["apply_or_skip", "find_skip", "operator"]


def operator() -> str:
    """Who runs this process, for the audit trail of an operator's action: ``user@host``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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
