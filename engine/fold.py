"""The fold: (current view, event) -> writes. Pure: no RocksDB, no Kafka.

The view is a function of the log alone (invariant 1): every value written
here comes from the event and the state before it, never from a clock or a
random source, so refolding from offset 0 gives the same bytes.

Rules the fold keeps:
1. ``WorkflowTriggered`` creates the execution; a second one for the same id
   (an idempotency key used twice) changes nothing but the audit trail.
2. Any other event for an execution the partition has never seen is an
   ``InvalidTransitionError``: the log is not ours or is damaged.
3. Once an execution is terminal its status never changes again. Events that
   arrive after that (a step that was running when a cancel landed) are still
   recorded on their step and in the history.
4. Every event of an execution is kept in its history, under its offset.
5. Fencing. ``PartitionClaimed`` with an epoch above the partition's current
   claim becomes the claim; any other claim is ignored. A runtime event (step,
   sleep, timer, log, end of an execution) whose epoch is below the current
   claim was written by a former owner that lost the partition (a zombie):
   it is ignored, counted in the claim as ``fenced``, and changes nothing else.
   Client events (trigger, cancel) come from any process and are never fenced.
   The log orders claims, so this holds on any Kafka-protocol broker, with no
   reliance on transactions or read_committed.
6. ``PartitionReleased`` of the current claim marks it ``releasing`` (the
   owner's steps still finish) and then ``released`` (the next owner may claim
   without fencing any of them). ``RecordSkipped`` changes nothing here: the
   view applies it where the skipped record stands (``PartitionView.skip``).
7. Listing indexes. Every execution has a key in the index of all executions
   and of its workflow (written once), and in the index of its status and of
   its (workflow, status) (moved when the status changes: the old key deleted,
   the new one put, in the same batch). The move is computed once per batch
   from the status before the batch and the status after it, so an execution
   that passes through several statuses inside one batch leaves no deleted
   keys behind in the indexes of the statuses it only passed through.
8. Reruns (``engine.rerun``). A ``WorkflowTriggered`` with ``rerun_of`` creates
   an execution that records its source and offset and is ``held`` (the
   runtime does not run it) while the copy of the source's events that it
   begins with is appended; the same trigger, repeated after the copy,
   releases it (rule 1 otherwise). The source's partition (a rerun's id is
   chosen to hash there) lists it under ``r:<source>``.
9. Retention (``engine.retention``). A finished execution is indexed by its end
   time; with a retention, each event folded removes the executions that ended
   more than the retention before its timestamp, and the events of a removed
   execution are ignored after that.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from orjson import OPT_SORT_KEYS, dumps, loads

from engine import keys, retention, schedules, waits
from engine.errors import InvalidTransitionError
from engine.events import (
    CLIENT_EVENTS,
    CancelRequested,
    Event,
    EventSent,
    PartitionClaimed,
    PartitionReleased,
    Patched,
    RecordSkipped,
    ScheduleUpdated,
    SleepScheduled,
    StepCompleted,
    StepFailed,
    StepResolved,
    StepStarted,
    SubjectErased,
    TimerFired,
    WaitStarted,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.models import ExecutionStatus

Record = dict[str, Any]
Scan = Callable[[bytes, bytes], Iterable[tuple[bytes, bytes]]]
"""``scan(start, stop)``: the stored raw (key, value) pairs in [start, stop), in key order."""
_UNREAD: Any = object()

QUEUED = ExecutionStatus.QUEUED.value
RUNNING = ExecutionStatus.RUNNING.value
SLEEPING = ExecutionStatus.SLEEPING.value
WAITING = ExecutionStatus.WAITING.value
TERMINAL = {s.value for s in ExecutionStatus if s.terminal}


class Tx:
    """Pending writes over a read function: the fold's only door to state.

    Records are kept decoded until :meth:`encoded`, so a batch that touches
    one execution a hundred times parses and serializes it once; a key read
    and found missing is remembered too (the claim is looked up per event).
    A key holds a JSON record (:meth:`put`) or raw bytes (:meth:`put_raw`),
    never both: ``engine.keys`` gives each keyspace one kind.
    """

    __slots__ = ("_read", "_scan", "_records", "_raw", "_scanned", "_scanned_keys", "_began",
                 "woken", "retention_ms", "ranges")

    def __init__(self, read: Callable[[bytes], bytes | None], scan: Scan | None = None,
                 retention_ms: int | None = None):
        self._read = read
        self._scan = scan
        self.retention_ms = retention_ms  # engine.retention: None keeps every execution
        self.ranges: list[tuple[bytes, bytes]] = []  # range deletes, applied after the writes
        self._records: dict[bytes, Record | None] = {}  # decoded; None: absent or deleted
        self._raw: dict[bytes, bytes | None] = {}  # raw values; None deletes
        self._scanned: dict[bytes, bytes | None] = {}  # the raw writes of keys.SCANNED spaces
        self._scanned_keys: list[bytes] = []  # ... their keys, sorted (a scan bisects)
        self._began: dict[str, str | None] = {}  # execution id -> status before the batch
        self.woken: list[str] = []  # executions an event woke (engine.waits), for the runtime

    def touch(self, eid: str, status: str | None) -> None:
        """Note the status ``eid`` had before this batch (None: it did not exist)."""
        self._began.setdefault(eid, status)

    def status_before(self, eid: str) -> str | None:
        """The status ``eid`` had before this batch, if the batch touched it."""
        return self._began.get(eid)

    def is_new(self, eid: str) -> bool:
        """Whether this batch created ``eid`` (touched, and absent from the view before it).
        The view then holds none of its keys: the fold writes them all after the trigger."""
        return self._began.get(eid, "") is None

    def get(self, key: bytes, new: bool = False) -> Record | None:
        """The JSON record at ``key``, with this batch's writes applied. ``new``: the key
        belongs to an execution this batch created (:meth:`is_new`), so the view cannot
        hold it and is not read (a rebuild creates every execution: one read fewer each)."""
        records = self._records
        record = records.get(key, _UNREAD)
        if record is not _UNREAD or new:
            return None if record is _UNREAD else cast("Record | None", record)
        raw = self._read(key)
        record = None if raw is None else loads(raw)
        records[key] = record
        return cast("Record | None", record)

    def put(self, key: bytes, record: Record) -> None:
        self._records[key] = record

    def put_raw(self, key: bytes, value: bytes) -> None:
        self._raw[key] = value
        if key[:2] in keys.SCANNED:
            self._note_scanned(key, value)

    def _note_scanned(self, key: bytes, value: bytes | None) -> None:
        if key not in self._scanned:
            insort(self._scanned_keys, key)
        self._scanned[key] = value

    def raw(self, key: bytes) -> bytes | None:
        """The raw value at ``key``, with this batch's writes applied."""
        if key in self._raw:
            return self._raw[key]
        return self._read(key)

    def scan(self, prefix: bytes, start: bytes | None = None,
             stop: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """Raw (key, value) pairs with ``prefix`` in [start, stop), in key order, with this
        batch's writes applied. Only the ``keys.SCANNED`` keyspaces (what the fold looks
        up by prefix: kept events, waiters) can be scanned."""
        assert prefix[:2] in keys.SCANNED, prefix
        lo, hi = start or prefix, stop or keys.end_of(prefix)
        found = dict(self._scan(lo, hi)) if self._scan is not None else {}
        pending = self._scanned_keys
        for i in range(bisect_left(pending, lo), bisect_left(pending, hi)):
            key = pending[i]
            value = self._scanned[key]
            if value is None:
                found.pop(key, None)
            else:
                found[key] = value
        return sorted(found.items())

    def first(self, prefix: bytes, after: bytes, stop: bytes, n: int) -> list[bytes]:
        """The first ``n`` keys in (``after``, ``stop``) of the scanned keyspace ``prefix``,
        with this batch's writes applied; read lazily from ``after`` on, so a scan never
        walks what was deleted before it (the caller deletes in key order)."""
        assert prefix[:2] in keys.SCANNED, prefix
        lo = max(prefix, after + b"\x00")
        pending = self._scanned_keys
        i, end = bisect_left(pending, lo), bisect_left(pending, stop)
        stored = (k for k, _ in self._scan(lo, stop)) if self._scan is not None else iter(())
        found: list[bytes] = []
        stored_key = next(stored, None)
        while len(found) < n:
            if i < end and (stored_key is None or pending[i] <= stored_key):
                candidate = pending[i]  # written in this batch: its value decides
                i += 1
                if candidate == stored_key:
                    stored_key = next(stored, None)
                if self._scanned[candidate] is not None:
                    found.append(candidate)
            elif stored_key is not None:
                found.append(stored_key)  # not written in this batch (else pending had it)
                stored_key = next(stored, None)
            else:
                break
        return found

    def delete_range(self, start: bytes, stop: bytes) -> None:
        """Delete every key in [start, stop), in the store and as written by this batch:
        the view applies range deletes after the batch's writes."""
        self.ranges.append((start, stop))

    def delete(self, key: bytes, new: bool = False) -> None:
        """Delete ``key``. ``new``: it belongs to an execution this batch created, so only
        this batch put it: the put is dropped and no tombstone is written."""
        if new:
            self._raw.pop(key, None)
            self._records.pop(key, None)
        else:
            self._raw[key] = None
            self._records[key] = None
        if key[:2] in keys.SCANNED:
            self._note_scanned(key, None)

    def encoded(self) -> Iterator[tuple[bytes, bytes | None]]:
        """Every write as bytes (``None`` deletes), deterministic JSON, listing indexes included.

        Raw writes and deletes come first, then the records: a record put after a
        delete of its key is written. JSON is compact with sorted keys (orjson:
        non-ASCII text as UTF-8, not escaped).
        """
        self._index()
        yield from self._raw.items()
        for key, value in self._records.items():
            if value is not None:
                yield key, dumps(value, option=OPT_SORT_KEYS)

    def _index(self) -> None:
        """Rule 7: move each touched execution's listing keys from its status before the
        batch to its status now."""
        raw = self._raw
        for eid, before in self._began.items():
            ex = self.get(keys.execution(eid))
            if ex is None or ex["status"] == before:
                continue
            workflow, created = ex["workflow"], ex["created_at"]
            if before is None:
                for key in keys.listing_keys(workflow, None, created, eid):
                    raw[key] = b""
            else:
                for key in keys.listing_keys(workflow, before, created, eid):
                    self.delete(key)
            for key in keys.listing_keys(workflow, ex["status"], created, eid):
                raw[key] = b""
        self._began.clear()


def apply(tx: Tx, event: Event, partition: int, offset: int, raw: bytes) -> bool:
    """Fold one event (found at ``partition``/``offset`` as ``raw``) into ``tx``.

    Returns False for an event that changes no execution (a claim, or fenced); a
    schedule's update counts as a change of ``schedule-<name>``.
    Then, with a retention, remove the executions that ended long enough before
    it (``engine.retention``); an event the fold refuses removes none.
    """
    changed = _apply(tx, event, partition, offset, raw)
    retention.expire(tx, event.timestamp)
    return changed


def _apply(tx: Tx, event: Event, partition: int, offset: int, raw: bytes) -> bool:
    eid = event.execution_id
    body = event.body
    if isinstance(body, PartitionReleased):
        _released(tx, event, body)
        return False
    if isinstance(body, RecordSkipped | SubjectErased):
        return False  # audit records (their modules read them from the log)
    if isinstance(body, ScheduleUpdated):
        schedules.fold_update(tx, event)  # the schedule's record; no execution changes,
        return True  # but passed on (as ``schedule-<name>``) so the change feed tells pages
    if isinstance(body, EventSent):
        waits.event_sent(tx, event, offset, raw)
        return False  # the executions it woke are in ``tx.woken``
    if _fenced(tx, event, offset):
        return False
    eid_key = eid.encode()
    ex_key = keys.EXECUTION + eid_key
    ex = tx.get(ex_key)
    if ex is None and retention.is_gone(tx, eid):
        return False  # removed from the view by retention: the log keeps its events
    tx.touch(eid, None if ex is None else ex["status"])
    if isinstance(body, WorkflowTriggered):
        if ex is None:
            ex = new_execution(event, body, partition)
            tx.put_raw(keys.ACTIVE + eid_key, b"")
            tx.put_raw(keys.CREATED + keys.u64(event.timestamp) + eid_key, b"")
            if body.rerun_of is not None:
                _rerun_begins(tx, ex, body, offset)
        elif body.rerun_of is not None and ex.get("held"):
            del ex["held"]  # rule 8: the copy is complete
    elif ex is None:
        raise InvalidTransitionError(eid, None, event.type)
    else:
        _FOLDS[type(body)](tx, ex, event)
    ex["events"] += 1
    ex["updated_at"] = event.timestamp
    tx.put(ex_key, ex)
    tx.put_raw(keys.HISTORY + eid_key + keys.SEP + keys.u64(offset), raw)
    return True


def _rerun_begins(tx: Tx, ex: Record, body: WorkflowTriggered, offset: int) -> None:
    """Rule 8: a rerun records its source, is held while its copy is appended, and is
    listed among its source's reruns."""
    ex.update(rerun_of=body.rerun_of, rerun_offset=body.rerun_offset, held=True)
    if body.actor is not None:  # who asked and why (written only when known)
        ex.update(rerun_actor=body.actor, rerun_reason=body.reason)
    tx.put_raw(keys.rerun(body.rerun_of or "", offset), ex["id"].encode())


def _fenced(tx: Tx, event: Event, offset: int) -> bool:
    """Rule 5: apply a claim, or say whether a former owner's event is to be ignored."""
    claim = tx.get(keys.CLAIM)
    epoch = 0 if claim is None else int(claim["epoch"])
    if isinstance(event.body, PartitionClaimed):
        if event.epoch > epoch:
            fenced = 0 if claim is None else claim["fenced"]
            tx.put(keys.CLAIM, {"epoch": event.epoch, "worker": event.body.worker,
                                "offset": offset, "fenced": fenced})
        return True
    if event.epoch >= epoch or isinstance(event.body, CLIENT_EVENTS):
        return False
    assert claim is not None
    claim["fenced"] += 1
    tx.put(keys.CLAIM, claim)
    return True


def _released(tx: Tx, event: Event, body: PartitionReleased) -> None:
    """Rule 6: only the current claim's own owner can release it."""
    claim = tx.get(keys.CLAIM)
    if claim is None or event.epoch != claim["epoch"] or body.worker != claim["worker"]:
        return
    claim["releasing"] = True
    claim["released"] = body.running == 0
    tx.put(keys.CLAIM, claim)


def skip_record(offset: int, marker: Event, marker_offset: int) -> Record:
    """The view's record of an operator's skip of the unreadable record at ``offset``."""
    body = marker.body
    assert isinstance(body, RecordSkipped)
    return {"offset": offset, "reason": body.reason, "actor": body.actor,
            "marker_offset": marker_offset, "timestamp": marker.timestamp}


def new_execution(event: Event, body: WorkflowTriggered, partition: int) -> Record:
    record = _new_execution(event, body, partition)
    if body.trace_parent is not None:  # engine.tracing: the parent of the execution's spans
        record["trace_parent"] = body.trace_parent
    return record


def _new_execution(event: Event, body: WorkflowTriggered, partition: int) -> Record:
    return {
        "id": event.execution_id,
        "workflow": event.workflow,
        "status": QUEUED,
        "input": body.input,
        "output": None,
        "error": None,
        "idempotency_key": body.idempotency_key,
        "partition": partition,
        "created_at": event.timestamp,
        "started_at": None,
        "ended_at": None,
        "updated_at": event.timestamp,
        "events": 0,
        "seq": 0,
        "logs": 0,
        "sleeping_on": None,
        "waits": [],
        "cancel_reason": None,
        "parent_id": body.parent_id,
        "parent_step": body.parent_step,
        # engine.erasure: only an execution with a data subject has the key, so the
        # records of all others keep their bytes
        **({} if body.subject is None else {"subject": body.subject}),
    }


def _run(ex: Record, ts: int) -> None:
    """queued/sleeping -> running; a terminal execution stays as it is (and one still
    waiting for an event, a parallel branch's step notwithstanding, stays waiting)."""
    if ex["status"] in (QUEUED, SLEEPING) or (ex["status"] == WAITING
                                               and not waits.open_waits(ex)):
        ex["status"] = RUNNING
    if ex["started_at"] is None:
        ex["started_at"] = ts


def _finish(tx: Tx, ex: Record, status: str, ts: int) -> bool:
    """Make ``ex`` terminal; False when it already was (rule 3)."""
    if ex["status"] in TERMINAL:
        return False
    ex["status"] = status
    ex["ended_at"] = ts
    tx.delete(keys.active(ex["id"]), tx.is_new(ex["id"]))
    retention.ended(tx, ex["id"], ts)
    if ex["sleeping_on"] is not None:
        sleep_key = keys.sleep(ex["id"], ex["sleeping_on"])
        sleep = tx.get(sleep_key)
        if sleep is not None:
            tx.delete(keys.timer(sleep["wake_at"], ex["id"], sleep["key"]))
            sleep.update(status=status, ended_at=ts)
            tx.put(sleep_key, sleep)
        ex["sleeping_on"] = None
    waits.end_all(tx, ex, status, ts)
    return True


def _started(tx: Tx, ex: Record, event: Event) -> None:
    assert isinstance(event.body, WorkflowStarted)
    _run(ex, event.timestamp)
    if event.body.version is not None:
        ex["version"] = event.body.version


def _patched(tx: Tx, ex: Record, event: Event) -> None:
    """``ctx.patched``: the execution took the new branch of a change (engine.versioning)."""
    assert isinstance(event.body, Patched)
    patches = ex.setdefault("patches", [])
    if event.body.patch not in patches:
        patches.append(event.body.patch)


def _step(tx: Tx, ex: Record, key: str, input_: str | None, ts: int) -> tuple[bytes, Record]:
    """The step record of ``key`` (a new one if there is none yet), and its view key."""
    eid = ex["id"]
    step_key = keys.step(eid, key)
    step = tx.get(step_key, tx.is_new(eid))
    if step is None:
        step = {
            "key": key,
            "kind": "step",
            "seq": ex["seq"],
            "status": RUNNING,
            "input": input_,
            "output": None,
            "error": None,
            "attempts": [],
            "started_at": ts,
            "ended_at": None,
        }
        ex["seq"] += 1
    return step_key, step


def _attempt(step: Record, n: int, started_at: int) -> Record:
    for attempt in step["attempts"]:
        if attempt["attempt"] == n:
            return attempt  # type: ignore[no-any-return]
    attempt = {"attempt": n, "started_at": started_at, "ended_at": None, "error": None,
               "retry_at": None}
    step["attempts"].append(attempt)
    return attempt


def _step_started(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, StepStarted)
    _run(ex, event.timestamp)
    step_key, step = _step(tx, ex, body.step, body.input, event.timestamp)
    step["status"] = RUNNING
    _attempt(step, body.attempt, event.timestamp)
    tx.put(step_key, step)


def _step_completed(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, StepCompleted)
    _run(ex, event.timestamp)
    step_key, step = _step(tx, ex, body.step, body.input, body.started_at)
    attempt = _attempt(step, body.attempt, body.started_at)
    attempt["ended_at"] = event.timestamp
    step.update(status="completed", output=body.output, ended_at=event.timestamp, error=None)
    if step.get("resolved", {}).get("action") == "complete":
        del step["resolved"]  # the attempt returned before the operator's output reached it
    tx.put(step_key, step)


def _step_failed(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, StepFailed)
    _run(ex, event.timestamp)
    step_key, step = _step(tx, ex, body.step, body.input, body.started_at)
    attempt = _attempt(step, body.attempt, body.started_at)
    error = {"type": body.error_type, "message": body.message, "traceback": body.traceback}
    attempt.update(ended_at=event.timestamp, error=error, retry_at=body.retry_at)
    step["error"] = error
    if body.final:
        step.update(status="failed", ended_at=event.timestamp)
    else:
        step["status"] = "retrying"
    tx.put(step_key, step)


def _step_resolved(tx: Tx, ex: Record, event: Event) -> None:
    """An operator completed a running or retrying step with an output, or ended its
    backoff wait (the next attempt is due now). Anything else (a finished execution, a
    step that already ended) changes nothing: the event stays in the history."""
    body = event.body
    assert isinstance(body, StepResolved)
    step_key = keys.step(ex["id"], body.step)
    step = tx.get(step_key)
    if ex["status"] in TERMINAL or step is None or step["status"] not in (RUNNING, "retrying"):
        return
    resolved = {"action": body.action, "actor": body.actor, "reason": body.reason,
                "at": event.timestamp}
    if body.action == "complete" and body.output is not None:
        step.update(status="completed", output=body.output, ended_at=event.timestamp,
                    error=None, resolved=resolved)
    elif body.action == "retry-now" and step["status"] == "retrying" and step["attempts"]:
        step["attempts"][-1]["retry_at"] = event.timestamp
        step["resolved"] = resolved
    else:
        return
    tx.put(step_key, step)


def _sleep_scheduled(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, SleepScheduled)
    key = keys.sleep(ex["id"], body.sleep)
    if tx.get(key, tx.is_new(ex["id"])) is not None:
        return
    tx.put(key, {
        "key": body.sleep,
        "kind": "sleep",
        "seq": ex["seq"],
        "status": SLEEPING,
        "duration_ms": body.duration_ms,
        "wake_at": body.wake_at,
        "started_at": event.timestamp,
        "ended_at": None,
    })
    ex["seq"] += 1
    if ex["status"] in TERMINAL:
        return
    ex["status"] = SLEEPING
    ex["sleeping_on"] = body.sleep
    tx.put_raw(keys.timer(body.wake_at, ex["id"], body.sleep), b"")


def _timer_fired(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, TimerFired)
    key = keys.sleep(ex["id"], body.sleep)
    sleep = tx.get(key)
    if sleep is not None and sleep["kind"] in waits.WAIT_KINDS:
        if sleep["status"] == WAITING:  # else an event came first, or a cancel
            waits.timed_out(tx, ex, sleep, event.timestamp)
        return
    if sleep is None or sleep["status"] != SLEEPING:
        return  # a duplicate firing, or a sleep a cancel already ended
    sleep.update(status="completed", ended_at=event.timestamp)
    tx.put(key, sleep)
    tx.delete(keys.timer(sleep["wake_at"], ex["id"], body.sleep))
    if ex["sleeping_on"] == body.sleep:
        ex["sleeping_on"] = None
        _run(ex, event.timestamp)


def _log(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, WorkflowLog)
    seq = ex["logs"]
    tx.put(keys.log(ex["id"], seq), {
        "seq": seq,
        "timestamp": event.timestamp,
        "level": body.level,
        "message": body.message,
        "data": body.data,
        "position": body.position,
    })
    ex["logs"] = seq + 1


def _cancel_requested(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, CancelRequested)
    tells = bool(ex.get("parent_id") or waits.open_waits(ex))
    if _finish(tx, ex, ExecutionStatus.CANCELLED.value, event.timestamp):
        if tells:  # its children and its parent are owed word of it until its end is folded
            tx.put_raw(keys.OWED + ex["id"].encode(), b"")
        ex["cancel_reason"] = body.reason
        if body.actor is not None:  # v4: who asked (absent from records cancelled before)
            ex["cancel_actor"] = body.actor


def _cancelled(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, WorkflowCancelled)
    if ex.get("parent_id") or ex["status"] == ExecutionStatus.CANCELLED.value:
        tx.delete(keys.OWED + ex["id"].encode())  # the runtime told them, then wrote this
    if _finish(tx, ex, ExecutionStatus.CANCELLED.value, event.timestamp):
        ex["cancel_reason"] = body.reason


def _completed(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, WorkflowCompleted)
    if _finish(tx, ex, ExecutionStatus.COMPLETED.value, event.timestamp):
        ex["output"] = body.output


def _failed(tx: Tx, ex: Record, event: Event) -> None:
    body = event.body
    assert isinstance(body, WorkflowFailed)
    if _finish(tx, ex, ExecutionStatus.FAILED.value, event.timestamp):
        ex["error"] = {"type": body.error_type, "message": body.message,
                       "traceback": body.traceback}


_FOLDS: dict[type, Callable[[Tx, Record, Event], None]] = {
    WorkflowStarted: _started,
    StepStarted: _step_started,
    StepCompleted: _step_completed,
    StepFailed: _step_failed,
    SleepScheduled: _sleep_scheduled,
    TimerFired: _timer_fired,
    WorkflowLog: _log,
    CancelRequested: _cancel_requested,
    WorkflowCancelled: _cancelled,
    WorkflowCompleted: _completed,
    WorkflowFailed: _failed,
    WaitStarted: waits.wait_started,
    Patched: _patched,
    StepResolved: _step_resolved,
}
