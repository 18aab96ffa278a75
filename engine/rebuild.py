"""Rebuild the view from the log: empty RocksDB, then refold from offset 0.

The view is a pure function of the log (invariant 1), so an operator can drop
it at any time and fold the topic again, e.g. after a fold change or a lost
disk. ``ploy rebuild`` runs :func:`rebuild`; tests and benchmarks call it too.

A worker holds each partition's RocksDB lock while it runs. Deleting the
directory under it would not fail on Linux (the lock is advisory) and would
silently wreck the worker's state, so the lock is checked before anything is
deleted: a held lock is a :class:`StateLockedError`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from rocksdict import Options, Rdict

from engine.errors import PloyError
from engine.log import EventLog
from engine.view import PartitionView

__all__ = ["RebuildError", "StateLockedError", "clear_state", "rebuild"]

Progress = Callable[[int, int], None]
"""``on_progress(events folded so far, events to fold)``."""

_POLL_S = 0.5
_BATCH = 5000


class StateLockedError(PloyError):
    """A partition's RocksDB is open in a running process (a worker or ``ploy dev``)."""

    def __init__(self, path: Path, cause: str):
        self.path, self.cause = path, cause
        super().__init__(
            f"the view at {path} is in use by a running worker (RocksDB lock held); "
            "stop it first"
        )


class RebuildError(PloyError):
    """The log cannot give back the whole view."""

    def __init__(self, topic: str, partition: int, problem: str):
        self.topic, self.partition, self.problem = topic, partition, problem
        super().__init__(f"cannot rebuild topic '{topic}' partition {partition}: {problem}")


def _check_unlocked(db_path: Path) -> None:
    """Open and close the partition's RocksDB: fails if another handle holds its lock."""
    options = Options(raw_mode=True)
    options.create_if_missing(False)
    try:
        Rdict(str(db_path), options).close()
    except Exception as exc:  # rocksdict raises a bare Exception with RocksDB's message
        if "lock" in str(exc).lower():
            raise StateLockedError(db_path, str(exc)) from None
        raise


def clear_state(state_path: Path) -> bool:
    """Delete one topic's view (``<state_dir>/<prefix>.events``) unless a process holds it.

    Returns:
        Whether there was anything to delete.

    Raises:
        StateLockedError: A partition's RocksDB is open elsewhere; nothing was deleted.
    """
    if not state_path.exists():
        return False
    for db_path in sorted(state_path.glob("p*")):
        if (db_path / "CURRENT").is_file():
            _check_unlocked(db_path)
    shutil.rmtree(state_path)
    return True


def rebuild(
    log: EventLog,
    state_path: Path,
    on_progress: Progress | None = None,
    *,
    stall_timeout_s: float = 30.0,
) -> tuple[int, float]:
    """Delete the view of ``log.topic`` under ``state_path`` and refold every partition.

    1. Check that no process holds a partition's RocksDB, then delete the view.
    2. Read each partition's watermarks: the refold ends at the high watermark
       taken here; a low watermark above 0 means records were deleted and the
       view cannot be rebuilt.
    3. Assign every partition from offset 0 and fold each polled batch of a
       partition in one WriteBatch (``PartitionView.apply``), until every view
       reaches its target.

    Args:
        log: The event log (its topic and partition count name the view).
        state_path: ``<state_dir>/<prefix>.events``, as ``Runtime.state_path``.
        on_progress: Called after each folded batch with (done, total).
        stall_timeout_s: Give up when no record arrives for this long.

    Returns:
        (events folded, seconds taken).

    Raises:
        StateLockedError: A running worker holds the view; nothing was deleted.
        RebuildError: Records below the low watermark are gone, or the log
            stopped delivering records before the target.
        CorruptEventError: A record does not decode or the fold refuses it;
            the view is left at that offset.
    """
    started = time.perf_counter()
    # Step 1.
    clear_state(state_path)
    # Step 2.
    targets: dict[int, int] = {}
    for p in range(log.partitions):
        low, high = log.watermarks(p)
        if low > 0:
            raise RebuildError(log.topic, p, f"the log starts at offset {low}, not 0 "
                               "(records were deleted by retention)")
        targets[p] = high
    total = sum(targets.values())
    views = {p: PartitionView(state_path / f"p{p}", log.topic, p, log.codec) for p in targets}
    consumer = log.consumer()
    done = 0
    try:
        # Step 3.
        consumer.assign([TopicPartition(log.topic, p, 0) for p in targets if targets[p] > 0])
        if on_progress is not None:
            on_progress(0, total)
        last_record = time.monotonic()
        while any(views[p].next_offset < high for p, high in targets.items()):
            batches = _poll(consumer, targets)
            if not batches:
                if time.monotonic() - last_record > stall_timeout_s:
                    p = next(p for p, h in targets.items() if views[p].next_offset < h)
                    raise RebuildError(log.topic, p, f"no record for {stall_timeout_s:g} s at "
                                       f"offset {views[p].next_offset} of {targets[p]}")
                continue
            last_record = time.monotonic()
            for p, records in batches.items():
                applied, failure = views[p].apply(records)
                done += len(applied)
                if failure is not None:
                    raise failure
            if on_progress is not None:
                on_progress(done, total)
    finally:
        consumer.close()
        for view in views.values():
            view.close()
    return done, time.perf_counter() - started


def _poll(consumer: Any, targets: dict[int, int]) -> dict[int, list[tuple[int, bytes]]]:
    """One polled batch by partition, without records past the targets."""
    batches: dict[int, list[tuple[int, bytes]]] = {}
    for msg in consumer.consume(_BATCH, _POLL_S):
        partition, offset = msg.partition(), msg.offset()
        if msg.error() is not None or offset >= targets[partition]:
            continue
        batches.setdefault(partition, []).append((offset, msg.value()))
    return batches
