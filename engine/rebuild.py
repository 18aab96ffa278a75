"""Rebuild the view from the log: empty RocksDB, then refold from offset 0.

The view is a pure function of the log (invariant 1), so an operator can drop
it at any time and fold the topic again, e.g. after a fold change or a lost
disk. ``ploy rebuild`` runs :func:`rebuild`; tests and benchmarks call it too.

A worker holds each partition's RocksDB lock while it runs. Deleting the
directory under it would not fail on Linux (the lock is advisory) and would
silently wreck the worker's state, so the lock is checked before anything is
deleted: a held lock is a :class:`~engine.errors.StateLockedError`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict

from engine.collector import rare_collections
from engine.errors import CorruptEventError, PloyError, RebuildError, StateLockedError
from engine.log import EventLog
from engine.skips import apply_or_skip
from engine.view import PartitionView

__all__ = ["clear_state", "fold_through", "rebuild"]

Progress = Callable[[int, int], None]
"""``on_progress(events folded so far, events to fold)``."""


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
    workers: int | None = None,
    retention_ms: int | None = None,
) -> tuple[int, float]:
    """Delete the view of ``log.topic`` under ``state_path`` and refold every partition.

    1. Check that no process holds a partition's RocksDB, then delete the view.
    2. Check each partition's low watermark: above 0, records were deleted and
       the view cannot be rebuilt. The high watermarks give the progress total,
       an estimate only (the embedded broker reports them late).
    3. Read every partition from offset 0 to its end (partition EOF) and fold
       each polled batch of a partition in one WriteBatch (``PartitionView.apply``).
       Partitions are independent (each its own RocksDB), so with ``workers``
       above 1 (default: one per CPU) groups of them fold in parallel processes:
       the fold is CPU-bound Python, and one process folds on one core.

    Args:
        log: The event log (its topic and partition count name the view).
        state_path: ``<state_dir>/<prefix>.events``, as ``Runtime.state_path``.
        on_progress: Called after each folded batch with (done, estimated total).
        workers: Processes that fold in parallel (default: one per CPU, at most
            one per partition).
        retention_ms: The ``retention`` of ploy.yaml (``engine.retention``): the live
            view's, so that the rebuilt one is byte-identical to it.

    Returns:
        (events folded, seconds taken).

    Raises:
        StateLockedError: A running worker holds the view; nothing was deleted.
        RebuildError: Records below the low watermark are gone.
        CorruptEventError: A record does not decode or the fold refuses it, and
            no operator skipped it (``ploy skip``); the view is left at that offset.
    """
    started = time.perf_counter()
    # Step 1.
    clear_state(state_path)
    # Step 2.
    total = 0
    for p in range(log.partitions):
        low, high = log.watermarks(p)
        if low > 0:
            raise RebuildError(log.topic, p, low)
        total += high
    workers = max(1, min(workers or os.cpu_count() or 1, log.partitions))
    groups = [list(range(log.partitions))[i::workers] for i in range(workers)]
    if on_progress is not None:
        on_progress(0, total)
    # Step 3.
    if workers == 1:
        done = _fold(log, state_path, groups[0], lambda n: _report(on_progress, n, total),
                     retention_ms=retention_ms)
    else:
        done = _fold_in_processes(log, state_path, groups, on_progress, total, retention_ms)
    if on_progress is not None:
        on_progress(done, done)
    return done, time.perf_counter() - started


def _report(on_progress: Progress | None, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, max(done, total))


def fold_through(log: EventLog, state_path: Path, last: Mapping[int, int],
                 on_progress: Progress | None = None) -> int:
    """Fold each partition ``p`` of ``last`` from offset 0 through offset ``last[p]`` into
    a new view at ``state_path`` (``ploy view --as-of``: the view as the log stood then).

    The same fold loop as :func:`rebuild`, stopped at a point of the log; a
    partition whose last offset is below 0 is left empty. Returns events folded.
    """
    partitions = sorted(p for p, o in last.items() if o >= 0)
    return _fold(log, state_path, partitions, lambda n: _report(on_progress, n, n), last)


def _fold(log: EventLog, state_path: Path, partitions: list[int],
          folded: Callable[[int], None], last: Mapping[int, int] | None = None,
          retention_ms: int | None = None) -> int:
    """Fold ``partitions`` from offset 0 to their end (or through ``last[p]``);
    ``folded(total so far)`` per batch."""
    # No write-ahead log: a rebuild that dies starts over (see PartitionView).
    views = {p: PartitionView(state_path / f"p{p}", log.topic, p, log.codec, wal=False,
                              retention_ms=retention_ms)
             for p in partitions}
    done = 0
    stopped: set[int] = set()  # partitions folded through their last offset
    try:
        with rare_collections():
            for batches in log.read_until_end(dict.fromkeys(views, 0), stopped=stopped):
                for p, records in batches.items():
                    if last is not None:
                        records = _through(records, last[p], p, stopped)
                    applied, failure = apply_or_skip(log, views[p], records)
                    done += len(applied)
                    if failure is not None:
                        raise failure
                folded(done)
    finally:
        for view in views.values():
            view.close()
    return done


def _through(records: list[tuple[int, bytes]], last: int, partition: int,
             stopped: set[int]) -> list[tuple[int, bytes]]:
    """The records up to offset ``last``; the partition is done once it is reached."""
    if records and records[-1][0] >= last:
        stopped.add(partition)
        return [r for r in records if r[0] <= last]
    return records


def _fold_in_processes(log: EventLog, state_path: Path, groups: list[list[int]],
                       on_progress: Progress | None, total: int,
                       retention_ms: int | None = None) -> int:
    # spawn, not fork: a forked librdkafka client (its threads) is not safe to use.
    context = multiprocessing.get_context("spawn")
    queue: Any = context.Queue()
    prefix = log.topic.removesuffix(".events")
    args = (log.bootstrap_servers, prefix, log.partitions, log.extra, str(state_path),
            retention_ms)
    procs = [context.Process(target=_child, args=(*args, group, i, queue), daemon=True)
             for i, group in enumerate(groups)]
    for proc in procs:
        proc.start()
    counts = [0] * len(groups)
    finished = 0
    try:
        while finished < len(procs):
            kind, index, value = queue.get(timeout=600)
            if kind == "error":
                raise CorruptEventError(*value) if len(value) == 4 else PloyError(value[0])
            counts[index] = value
            finished += kind == "done"
            _report(on_progress, sum(counts), total)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return sum(counts)


def _child(servers: str, prefix: str, partitions: int, extra: dict[str, Any], state: str,
           retention_ms: int | None, group: list[int], index: int, queue: Any) -> None:
    """A rebuild process: fold one group of partitions, report counts on ``queue``."""
    log = EventLog(servers, prefix, partitions, extra=extra)
    try:
        done = _fold(log, Path(state), group, lambda n: queue.put(("progress", index, n)),
                     retention_ms=retention_ms)
        queue.put(("done", index, done))
    except CorruptEventError as exc:
        queue.put(("error", index, (exc.topic, exc.partition, exc.offset, exc.cause)))
    except Exception as exc:  # reported to the parent, which raises
        queue.put(("error", index, (f"{type(exc).__name__}: {exc}",)))
    finally:
        log.close()
