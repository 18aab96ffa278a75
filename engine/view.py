"""The materialized view: one RocksDB per partition, and the queries on it.

A partition's fold and its next offset are written in one WriteBatch, so a
crash at any point leaves the view exactly at some offset: on restart the
worker reads that offset, seeks there and folds on, never applying an event
twice nor losing one. The offset never moves backwards: records below it are
already in the view and are skipped.

Queries read only the keys they answer from: each scan is bounded above by an
iterator upper bound at its keyspace's end (RocksDB otherwise walks on over
the deleted keys that follow), and the listing indexes are kept in newest-first
order so that a page is a forward scan from the cursor (see ``engine.keys``).
The queries are blocking RocksDB reads: call them off the event loop
(``asyncio.to_thread``) when they may be long.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import orjson
from rocksdict import BlockBasedOptions, Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from engine import fold, keys
from engine.codec import Codec, default_codec
from engine.errors import CodecError, CorruptEventError, InvalidTransitionError
from engine.events import Event
from engine.listing import DEFAULT_LIMIT, Cursor, Page
from engine.models import (
    Attempt,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    ExecutionSummary,
    HistoryEntry,
    LogEntry,
    StepRecord,
    WaitInfo,
    loads,
)


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    # A Bloom filter per table file: the fold's reads of records that do not exist yet
    # (every trigger reads its execution first) skip the files that cannot hold them.
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    return opts


class PartitionView:
    """The folded state of one partition of the events topic."""

    def __init__(self, path: Path, topic: str, partition: int, codec: Codec | None = None,
                 *, wal: bool = True, retention_ms: int | None = None):
        """Open (or create) the partition's RocksDB at ``path``.

        ``wal=False`` writes without RocksDB's write-ahead log, for a rebuild: a
        process that dies loses its last unflushed batches, but each batch and its
        next offset share a memtable, so the view is still exactly at some offset.
        :meth:`close` flushes.
        """
        self.path, self.topic, self.partition = path, topic, partition
        self.retention_ms = retention_ms  # finished executions leave (engine.retention)
        self.codec = codec or default_codec()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), _options())
        self._write_options: WriteOptions | None = None
        if not wal:
            self._write_options = WriteOptions()
            # A property at run time; rocksdict's stubs declare a method.
            self._write_options.disable_wal = True  # type: ignore[method-assign,assignment]
        raw = self.db.get(keys.NEXT_OFFSET)
        self.next_offset = 0 if raw is None else keys.read_u64(raw)
        self.claim_epoch = self._claim_epoch()
        if self.db.get(keys.INDEXES) != keys.INDEXES_VERSION:
            self._build_indexes()

    def _build_indexes(self) -> None:
        """Give a view folded before the listing indexes (or the index of ended
        executions, ``engine.retention``) existed its indexes (once).

        The indexes are a function of the execution records alone (the fold's
        rules 7 and 9), so this writes the bytes a refold from offset 0 would write.
        An empty view only gets the version marker, which every view carries.
        """
        batch = WriteBatch(raw_mode=True)
        oldest_end: int | None = None
        ends = self.db.get(keys.RETENTION) is None  # a view folded before that index
        for key, value in self._scan(keys.EXECUTION):
            ex = orjson.loads(value)
            eid = key[len(keys.EXECUTION):].decode()
            for status in (None, ex["status"]):
                for index in keys.listing_keys(ex["workflow"], status, ex["created_at"], eid):
                    batch.put(index, b"")
            if ex["ended_at"] is not None and ends:
                batch.put(keys.ended(ex["ended_at"], eid), b"")  # engine.retention, rule 1
                at = ex["ended_at"]
                oldest_end = at if oldest_end is None else min(oldest_end, at)
        if oldest_end is not None:
            batch.put(keys.RETENTION, json.dumps({"after": "", "next_at": oldest_end},
                                                 sort_keys=True, separators=(",", ":")).encode())
        batch.put(keys.INDEXES, keys.INDEXES_VERSION)
        self.db.write(batch)

    def apply(
        self, records: Iterable[tuple[int, bytes]]
    ) -> tuple[list[tuple[int, Event]], CorruptEventError | None]:
        """Fold ``(offset, value)`` records in one WriteBatch: (what was applied, the stop).

        A record that does not decode, or that the fold refuses, stops the
        batch there: what precedes it is committed, and the returned
        CorruptEventError names its topic, partition and offset. Nothing after
        it is folded; the caller stops the partition (never skips the record).
        """
        tx = fold.Tx(self.db.get, self._range, self.retention_ms)
        applied: list[tuple[int, Event]] = []
        next_offset = self.next_offset
        failure: CorruptEventError | None = None
        for offset, raw in records:
            if offset < next_offset:
                continue  # already in the view
            try:
                event = self.codec.decode(raw)
                changed = fold.apply(tx, event, self.partition, offset, raw)
            except (CodecError, InvalidTransitionError) as exc:
                failure = CorruptEventError(self.topic, self.partition, offset, str(exc))
                break
            if changed:  # claims and fenced events start nothing
                applied.append((offset, event))
            elif tx.woken:  # an EventSent: once per execution it woke, under that id
                applied += [(offset, replace(event, execution_id=eid)) for eid in tx.woken]
            tx.woken.clear()
            next_offset = offset + 1
        if next_offset != self.next_offset:
            batch = WriteBatch(raw_mode=True)
            for key, value in tx.encoded():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
            for start, stop in tx.ranges:  # after the writes: it removes them too
                batch.delete_range(start, stop)
            batch.put(keys.NEXT_OFFSET, keys.u64(next_offset))
            self.db.write(batch, self._write_options)
            self.next_offset = next_offset
            claim = tx.get(keys.CLAIM)  # decoded already by the fold: no second read
            self.claim_epoch = 0 if claim is None else int(claim["epoch"])
        return applied, failure

    def skip(self, offset: int, marker: Event, marker_offset: int) -> None:
        """Step over the unreadable record at ``offset`` (the fold stopped there), as the
        operator's ``RecordSkipped`` marker at ``marker_offset`` says: the skip and the
        next offset in one WriteBatch. A rebuild meets the same marker and writes the
        same bytes (invariant 1)."""
        if offset != self.next_offset:
            raise ValueError(f"partition {self.partition} is at offset {self.next_offset}, "
                             f"not at the skipped record's offset {offset}")
        batch = WriteBatch(raw_mode=True)
        record = fold.skip_record(offset, marker, marker_offset)
        batch.put(keys.skipped(offset), json.dumps(record, sort_keys=True).encode())
        batch.put(keys.NEXT_OFFSET, keys.u64(offset + 1))
        self.db.write(batch)
        self.next_offset = offset + 1

    def skipped(self) -> list[dict[str, Any]]:
        """Every record an operator skipped on this partition, oldest first."""
        return [json.loads(v) for _, v in self._scan(keys.SKIPPED)]

    # -- queries ---------------------------------------------------------

    def claim(self) -> dict[str, Any] | None:
        """The partition's current claim (epoch, worker, offset, fenced), or None."""
        raw = self.db.get(keys.CLAIM)
        return None if raw is None else cast(dict[str, Any], orjson.loads(raw))

    def _claim_epoch(self) -> int:
        claim = self.claim()
        return 0 if claim is None else int(claim["epoch"])

    def event_stats(self) -> dict[str, int]:
        """Events for waiters this partition folded: received, duplicates, delivered,
        dropped_unmatched (kept for the retention and never delivered)."""
        raw = self.db.get(keys.EVENT_STATS)
        return {"received": 0, "duplicates": 0, "delivered": 0, "dropped_unmatched": 0,
                **({} if raw is None else orjson.loads(raw))}

    def gone(self, eid: str) -> bool:
        """Whether retention removed ``eid`` from this view (the log still has it)."""
        return self.db.get(keys.gone(eid)) is not None

    def record(self, eid: str) -> dict[str, Any] | None:
        """The raw execution record (for the runtime), or None."""
        raw = self.db.get(keys.execution(eid))
        return None if raw is None else cast(dict[str, Any], orjson.loads(raw))

    def _items(self, from_key: bytes, backwards: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Raw-mode iteration: keys and values are bytes."""
        return cast(Iterator[tuple[bytes, bytes]],
                    iter(self.db.items(from_key=from_key, backwards=backwards)))

    def _range(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every key in [start, stop) (the fold's scans of its lookups)."""
        bound = ReadOptions()
        bound.set_iterate_upper_bound(stop)
        yield from cast(Iterator[tuple[bytes, bytes]],
                        iter(self.db.items(from_key=start, read_opt=bound)))

    def _scan(self, prefix: bytes, from_key: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every key with ``prefix`` (from ``from_key`` on, if given). The upper bound
        stops RocksDB at the prefix's end: without it, the seek past the last match
        walks every deleted key that follows (10,000 fired timers: 1.7 ms per
        ``steps()`` of a waking sleeper). Never set a lower bound: rocksdict's
        ``set_iterate_lower_bound`` replaces the upper bound."""
        bound = ReadOptions()
        bound.set_iterate_upper_bound(keys.end_of(prefix))
        items = self.db.items(from_key=from_key or prefix, read_opt=bound)
        yield from cast(Iterator[tuple[bytes, bytes]], iter(items))

    def step(self, eid: str, key: str) -> dict[str, Any] | None:
        """One step record (kind ``step``), or None."""
        raw = self.db.get(keys.step(eid, key))
        return None if raw is None else cast(dict[str, Any], orjson.loads(raw))

    def steps(self, eid: str) -> list[dict[str, Any]]:
        """Step and sleep records of an execution, in the order they began."""
        found = [orjson.loads(v) for _, v in self._scan(keys.prefix_of(keys.STEP, eid))]
        found += [orjson.loads(v) for _, v in self._scan(keys.prefix_of(keys.SLEEP, eid))]
        return sorted(found, key=lambda r: r["seq"])

    def logs(self, eid: str) -> list[dict[str, Any]]:
        return [orjson.loads(v) for _, v in self._scan(keys.prefix_of(keys.LOG, eid))]

    def log_positions(self, eid: str) -> list[str | None]:
        """Where each recorded log line of ``eid`` was logged (None: before schema v3)."""
        return [orjson.loads(v).get("position")
                for _, v in self._scan(keys.prefix_of(keys.LOG, eid))]

    def reruns(self, eid: str) -> list[str]:
        """Ids of the reruns of ``eid`` (``ploy rerun``), in the order they were triggered."""
        return [v.decode() for _, v in self._scan(keys.prefix_of(keys.RERUN, eid))]

    def history(self, eid: str) -> Iterator[tuple[int, bytes]]:
        """(offset, raw record) of every event of an execution, in log order."""
        for key, value in self._scan(keys.prefix_of(keys.HISTORY, eid)):
            yield keys.read_u64(key[-8:]), value

    def owed(self) -> list[str]:
        """Ids of cancelled executions whose children and parent are not told yet (the
        runtime tells them, then appends the end; ``keys.OWED``)."""
        return [k[len(keys.OWED):].decode() for k, _ in self._scan(keys.OWED)]

    def active(self) -> list[str]:
        """Ids of every execution that has not finished."""
        return [k[len(keys.ACTIVE):].decode() for k, _ in self._scan(keys.ACTIVE)]

    def ended_since(self, since: int) -> list[str]:
        """Ids of the executions that ended at or after ``since``, oldest end first (a
        bounded scan of the index of ended executions): with the unfinished ones, every
        execution that may have started since then (``engine.flow``'s rate windows)."""
        start = keys.ENDED + keys.u64(max(since, 0))
        return [key[len(keys.ENDED) + 8:].decode() for key, _ in self._scan(keys.ENDED, start)]

    def due_timers(self, now: int, limit: int = 10_000) -> list[tuple[int, str, str]]:
        """(wake_at, execution id, sleep key) of timers due at ``now``, oldest first."""
        due: list[tuple[int, str, str]] = []
        for key, _ in self._scan(keys.TIMER):
            wake_at, eid, sleep = keys.parse_timer(key)
            if wake_at > now or len(due) >= limit:
                break
            due.append((wake_at, eid, sleep))
        return due

    def timers(self, after: tuple[int, str, str] | None = None,
               limit: int = 10_000) -> list[tuple[int, str, str]]:
        """(wake_at, execution id, sleep key) of pending timers, earliest first: the
        ``limit`` first after ``after`` (exclusive), or from the start. A bounded scan
        that seeks past every timer at or before ``after``, fired ones included."""
        start = None if after is None else keys.timer(*after) + keys.SEP
        found: list[tuple[int, str, str]] = []
        for key, _ in self._scan(keys.TIMER, start):
            if len(found) >= limit:
                break
            found.append(keys.parse_timer(key))
        return found

    def has_timer(self, wake_at: int, eid: str, sleep_key: str) -> bool:
        """Whether this timer is still pending (one point read)."""
        return self.db.get(keys.timer(wake_at, eid, sleep_key)) is not None

    def page(self, status: str | None = None, workflow: str | None = None,
             before: Cursor | None = None, limit: int = DEFAULT_LIMIT) -> Page:
        """Executions of this partition newest first, filtered by status and workflow,
        from just after ``before``: at most ``limit``, and the cursor of the next page.

        Reads one listing index from the cursor on (a seek, then a forward scan
        bounded at the index's end) and one execution record per execution
        returned. A status filter reads the index of that status only: a
        terminal status's index never holds a deleted key; the index of a
        transient one (queued, running, sleeping) holds the deleted keys of
        executions that left it, until RocksDB compacts them away.
        """
        if limit < 1:
            raise ValueError(f"a page holds at least one execution (limit={limit})")
        if status is not None:
            status = ExecutionStatus(status).value  # a clear error for a status that is none
        prefix = keys.listing_prefix(status, workflow)
        start = None if before is None else (
            keys.listing(prefix, before.created_at, before.execution_id) + keys.SEP)
        found: list[ExecutionSummary] = []
        more = False
        for key, _ in self._scan(prefix, start):
            if len(found) >= limit:
                more = True
                break
            _, eid = keys.parse_listing(prefix, key)
            summary = build_summary(self, eid)
            # The fold may have moved it since the index was read: list it where it is now.
            if summary is None or (status is not None and summary.status != status):
                continue
            found.append(summary)
        return Page(found, Cursor.of(found[-1]) if more else None)

    def dump(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value, in key order (for the byte-identical rebuild check)."""
        yield from self._items(b"")

    def close(self) -> None:
        self.db.close()

    def destroy(self) -> None:
        """Close and delete this partition's state (a rebuild starts from nothing)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def build_execution(view: PartitionView, eid: str,
                    record: dict[str, Any] | None = None) -> Execution | None:
    """The full Execution model of ``eid`` from one partition's view (``record``: its
    record, if the caller has read it already)."""
    ex = record if record is not None else view.record(eid)
    if ex is None:
        return None
    output = loads(ex["output"])
    steps = [_step_record(s) for s in view.steps(eid)]
    return Execution(
        execution_id=ex["id"],
        workflow=ex["workflow"],
        status=ExecutionStatus(ex["status"]),
        input=loads(ex["input"]),
        output=output,
        result=output,
        error=ErrorInfo(**ex["error"]) if ex["error"] else None,
        steps=steps,
        logs=[LogEntry(**{**entry, "data": loads(entry["data"])}) for entry in view.logs(eid)],
        partition=ex["partition"],
        events=ex["events"],
        idempotency_key=ex["idempotency_key"],
        created_at=ex["created_at"],
        started_at=ex["started_at"],
        ended_at=ex["ended_at"],
        updated_at=ex["updated_at"],
        duration_ms=_duration(ex["started_at"] or ex["created_at"], ex["ended_at"]),
        cancel_reason=ex["cancel_reason"],
        version=ex.get("version"),
        patches=ex.get("patches", []),
        parent_id=ex.get("parent_id"),
        parent_step=ex.get("parent_step"),
        waiting_for=[_wait_info(s) for s in steps if s.kind in ("wait", "invoke")
                     and s.status == ExecutionStatus.WAITING.value],
        cancel_actor=ex.get("cancel_actor"),
        rerun_of=ex.get("rerun_of"),
        rerun_offset=ex.get("rerun_offset"),
        rerun_actor=ex.get("rerun_actor"),
        rerun_reason=ex.get("rerun_reason"),
        reruns=view.reruns(eid),
        subject=ex.get("subject"),
    )


def _wait_info(step: StepRecord) -> WaitInfo:
    asked = step.input or {}
    return WaitInfo(step=step.key, event_type=asked.get("type", ""), match=asked.get("match", {}),
                    since=asked.get("since", 0), until=step.wake_at, child_id=step.child_id)


def build_summary(view: PartitionView, eid: str) -> ExecutionSummary | None:
    """The ExecutionSummary of ``eid`` from its execution record only (no step or log scan)."""
    ex = view.record(eid)
    if ex is None:
        return None
    return ExecutionSummary(
        execution_id=ex["id"],
        workflow=ex["workflow"],
        status=ExecutionStatus(ex["status"]),
        created_at=ex["created_at"],
        started_at=ex["started_at"],
        ended_at=ex["ended_at"],
        duration_ms=_duration(ex["started_at"] or ex["created_at"], ex["ended_at"]),
        steps=ex["seq"],  # the fold numbers steps and sleeps alike from it
        error=ex["error"]["message"] if ex["error"] else None,
    )


def _duration(start: int | None, end: int | None) -> int | None:
    return None if start is None or end is None else end - start


def _step_record(rec: dict[str, Any]) -> StepRecord:
    if rec["kind"] in ("wait", "invoke"):
        event = rec["event"]
        received = None if event is None else {**event, "data": loads(event["data"])}
        return StepRecord(
            key=rec["key"], name=rec["key"], kind=rec["kind"], seq=rec["seq"],
            status=rec["status"], input={"type": rec["event_type"], "match": rec["match"],
                                         "since": rec["since"], "timeout_at": rec["wake_at"]},
            output=received, started_at=rec["started_at"], ended_at=rec["ended_at"],
            wake_at=rec["wake_at"], child_id=rec["child_id"],
            duration_ms=_duration(rec["started_at"], rec["ended_at"]),
        )
    if rec["kind"] == "sleep":
        return StepRecord(
            key=rec["key"], name="sleep", kind="sleep", seq=rec["seq"], status=rec["status"],
            input={"duration_ms": rec["duration_ms"]}, started_at=rec["started_at"],
            ended_at=rec["ended_at"], wake_at=rec["wake_at"],
            duration_ms=_duration(rec["started_at"], rec["ended_at"]),
        )
    attempts = [
        Attempt(
            attempt=a["attempt"], started_at=a["started_at"], ended_at=a["ended_at"],
            duration_ms=_duration(a["started_at"], a["ended_at"]),
            error=ErrorInfo(**a["error"]) if a["error"] else None, retry_at=a["retry_at"],
        )
        for a in rec["attempts"]
    ]
    return StepRecord(
        key=rec["key"], name=rec["key"], seq=rec["seq"], status=rec["status"],
        input=loads(rec["input"]), output=loads(rec["output"]),
        error=ErrorInfo(**rec["error"]) if rec["error"] else None, attempts=attempts,
        started_at=rec["started_at"], ended_at=rec["ended_at"],
        duration_ms=_duration(rec["started_at"], rec["ended_at"]), resolved=rec.get("resolved"),
    )


def history_entries(view: PartitionView, eid: str) -> list[HistoryEntry]:
    """The audit trail of ``eid``: every event with its offset, as on the log."""
    entries = []
    for offset, raw in view.history(eid):
        event = view.codec.decode(raw)
        entries.append(HistoryEntry(
            partition=view.partition, offset=offset, event_id=event.event_id,
            timestamp=event.timestamp, type=event.type, epoch=event.epoch,
            body=dict(vars(event.body)),
        ))
    return entries
