"""As of a point of the log: the whole system as it stood then.

The view is a function of the log alone (invariant 1), so the view as of any
point is the fold of the log up to that point. ``ploy view --as-of`` and
``GET /__ploy/api/as-of`` fold each partition from offset 0 through the
point into a scratch view (a temporary directory, deleted afterwards) with
the fold loop of ``ploy rebuild``, and answer ``status``, ``list`` and
``history`` from it exactly as the live view would have then.

A point is, per partition, the last offset included:

- ``p0:120,p1:88``: partition 0 through offset 120, partition 1 through 88;
  the partitions not named are left out (empty).
- ``120``: offset 120 of a topic with one partition.
- a time (ISO-8601, e.g. ``2026-11-28T09:30:00Z``; no zone is UTC): on each
  partition, every record the broker stamped before it (the consumer's
  ``offsets_for_times``), i.e. the log as it stood at that time.

Cost: a refold of the log's prefix, each time (a rebuild's rate, in one
process); meant for audits and investigations, not for dashboards' polling.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, TopicPartition

from engine.errors import CommandError, PloyError
from engine.listing import Page, list_page
from engine.log import EventLog
from engine.models import Execution, ExecutionSummary, HistoryEntry
from engine.rebuild import Progress, fold_through
from engine.view import PartitionView, build_execution, history_entries

__all__ = ["AsOf", "answer", "as_of", "offsets_at", "parse_point", "parse_time", "to_the_end"]

Point = dict[int, int]
"""The last offset included, per partition (-1: nothing of it)."""

_PARTITION_OFFSETS = re.compile(r"^p\d+:\d+(,p\d+:\d+)*$")


def parse_time(text: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 time (UTC if it names no zone) or
    of a number of milliseconds; CommandError otherwise."""
    text = text.strip()
    if text.isdecimal():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"'{text}' is not a time: use ISO-8601 (2026-11-28T09:30:00Z) "
                           "or milliseconds since the epoch") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def offsets_at(log: EventLog, ms: int) -> dict[int, int]:
    """Per partition, the first offset the broker stamped at or after ``ms`` (the
    partition's end if every record is older).

    The consumer's ``offsets_for_times`` gives a hint, checked against the
    records' timestamps around it: the embedded broker's answer can be a record
    off either way.
    """
    consumer = log.consumer(None, **{"enable.partition.eof": True})
    try:
        hints = consumer.offsets_for_times(
            [TopicPartition(log.topic, p, ms) for p in range(log.partitions)],
            timeout=log.connect_timeout_s)
        found = {}
        for tp in hints:
            hint = tp.offset
            if hint < 0:  # every record older: look near the end
                hint = consumer.get_watermark_offsets(tp, timeout=log.connect_timeout_s)[1]
            found[tp.partition] = _first_at(consumer, log.topic, tp.partition, ms, hint)
        return found
    finally:
        consumer.close()


def _first_at(consumer: Consumer, topic: str, partition: int, ms: int, hint: int) -> int:
    """The first offset stamped at or after ``ms``, searched from ``_SLACK`` before ``hint``
    (further back while the first record read is already at or after ``ms``)."""
    start = max(0, hint - _SLACK)
    while True:
        found, first_is_after = _scan(consumer, topic, partition, start, ms)
        if start == 0 or not first_is_after:
            return found
        start = max(0, start - 8 * _SLACK)


def _scan(consumer: Consumer, topic: str, partition: int, start: int,
          ms: int) -> tuple[int, bool]:
    """(first offset from ``start`` stamped at or after ``ms``, else the partition's end;
    whether that is the first record read)."""
    consumer.assign([TopicPartition(topic, partition, start)])
    first = True
    while True:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                return int(cast(int, msg.offset())), False
            raise PloyError(f"reading {topic} partition {partition}: {err}")
        if msg.timestamp()[1] >= ms:
            return int(cast(int, msg.offset())), first
        first = False


_SLACK = 256


def to_the_end(log: EventLog) -> Point:
    """The point after every record (the log as it stands when it is read)."""
    return dict.fromkeys(range(log.partitions), _END)


_END = 2**62


def parse_point(log: EventLog, text: str) -> Point:
    """The point ``text`` names (see the module docstring); CommandError if none."""
    text = text.strip()
    if _PARTITION_OFFSETS.match(text):
        point = dict.fromkeys(range(log.partitions), -1)
        for part in text.split(","):
            p, offset = part[1:].split(":")
            if int(p) >= log.partitions:
                raise CommandError(f"as of {text}: '{log.topic}' has partitions "
                                   f"0..{log.partitions - 1}")
            point[int(p)] = int(offset)
        return point
    if text.isdecimal():
        if log.partitions != 1:
            raise CommandError(f"as of {text}: '{log.topic}' has {log.partitions} partitions; "
                               f"name them, as p0:{text},p1:...")
        return {0: int(text)}
    return {p: first - 1 for p, first in offsets_at(log, parse_time(text)).items()}


class AsOf:
    """Queries on the view as of a point: one scratch view per partition."""

    def __init__(self, log: EventLog, point: Mapping[int, int], path: Path):
        self.log, self.point, self.path = log, dict(point), path
        self.views = {p: PartitionView(path / f"p{p}", log.topic, p, log.codec)
                      for p, last in sorted(point.items()) if last >= 0}

    def _view(self, eid: str) -> PartitionView | None:
        return self.views.get(self.log.partition_for(eid))

    def execution(self, eid: str) -> Execution | None:
        """The execution as it stood (None: not triggered yet, or unknown)."""
        view = self._view(eid)
        return None if view is None else build_execution(view, eid)

    def history(self, eid: str) -> list[HistoryEntry] | None:
        """Its events up to the point (None: not triggered yet, or unknown)."""
        view = self._view(eid)
        if view is None or view.record(eid) is None:
            return None
        return history_entries(view, eid)

    def page(self, *, workflow: str | None = None, status: str | None = None,
             limit: int = 50) -> Page:
        """Executions as they stood, newest first (as ``GET /executions``)."""
        return list_page(list(self.views.values()), status=status, workflow=workflow,
                         limit=limit)

    def close(self) -> None:
        for view in self.views.values():
            view.close()
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def as_of(log: EventLog, point: Mapping[int, int],
          on_progress: Progress | None = None) -> Iterator[AsOf]:
    """Fold ``log`` through ``point`` into a scratch view; yield its queries; delete it."""
    path = Path(tempfile.mkdtemp(prefix="ploy-asof-"))
    try:
        fold_through(log, path, point, on_progress)
        view = AsOf(log, point, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        yield view
    finally:
        view.close()


def answer(log: EventLog, at: str, *, execution_id: str | None = None,
           workflow: str | None = None, status: str | None = None,
           limit: int = 50) -> dict[str, Any] | None:
    """The JSON answer of ``GET /__ploy/api/as-of`` (blocking: run it in a thread).

    With ``execution_id``: ``{at, execution, history}``, or None if it did not
    exist then. Without: ``{at, executions, has_more}``, newest first. ``at``
    is the point folded through, per partition.
    """
    point = parse_point(log, at)
    shown = {str(p): last for p, last in point.items()}
    with as_of(log, point) as view:
        if execution_id is not None:
            execution = view.execution(execution_id)
            if execution is None:
                return None
            history = view.history(execution_id) or []
            return {"at": shown, "execution": execution.model_dump(mode="json"),
                    "history": [e.model_dump(mode="json") for e in history]}
        page = view.page(workflow=workflow, status=status, limit=limit)
        return {"at": shown, "has_more": page.next is not None,
                "executions": [ExecutionSummary.of(e).model_dump(mode="json")
                               for e in page.executions]}
