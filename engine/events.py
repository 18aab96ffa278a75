"""The event types of the log and their envelope: plain data, no I/O.

Field names and types mirror the newest ``schemas/event.vN.avsc`` one to one; the codec
turns these into Avro and back. User payloads (inputs, outputs, log data) are
JSON text, so the Avro contract never changes with a user's models.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class WorkflowTriggered:
    """An execution was requested, with its validated input."""

    input: str
    idempotency_key: str | None = None
    parent_id: str | None = None  # a child of ctx.step.invoke: its parent (v4)
    parent_step: str | None = None  # ... and the parent's step key
    trace_parent: str | None = None  # W3C traceparent of the triggering request (v4)
    rerun_of: str | None = None  # lineage of a rerun (v4)
    rerun_offset: int | None = None
    subject: str | None = None  # the data subject whose key encrypts its payloads (v4)
    actor: str | None = None  # who asked, for an operator's trigger: a rerun (v4)
    reason: str | None = None  # ... and why
    NAME: ClassVar[str] = "WorkflowTriggered"


@dataclass(frozen=True)
class WorkflowStarted:
    """A worker began running the handler for the first time."""

    worker: str
    version: str | None = None  # the workflow code version (v4)
    NAME: ClassVar[str] = "WorkflowStarted"


@dataclass(frozen=True)
class StepStarted:
    """An attempt of a step began; produced without waiting for the ack."""

    step: str
    attempt: int
    input: str | None = None
    NAME: ClassVar[str] = "StepStarted"


@dataclass(frozen=True)
class StepCompleted:
    """An attempt of a step returned; ``output`` is its JSON result."""

    step: str
    attempt: int
    input: str | None
    output: str
    started_at: int
    NAME: ClassVar[str] = "StepCompleted"


@dataclass(frozen=True)
class StepFailed:
    """An attempt raised: ``retry_at`` when another attempt follows, ``final`` when none will."""

    step: str
    attempt: int
    input: str | None
    error_type: str
    message: str
    traceback: str
    started_at: int
    retry_at: int | None
    final: bool
    NAME: ClassVar[str] = "StepFailed"


@dataclass(frozen=True)
class SleepScheduled:
    """A durable sleep began; its timer fires at ``wake_at``."""

    sleep: str
    duration_ms: int
    wake_at: int
    NAME: ClassVar[str] = "SleepScheduled"


@dataclass(frozen=True)
class TimerFired:
    """The timer of a durable sleep fired; the execution resumes by replay."""

    sleep: str
    wake_at: int
    NAME: ClassVar[str] = "TimerFired"


@dataclass(frozen=True)
class WorkflowLog:
    """``ctx.log``: a message with optional JSON data."""

    level: str
    message: str
    data: str | None = None
    position: str | None = None  # where in the workflow; None before schema v3
    NAME: ClassVar[str] = "WorkflowLog"


@dataclass(frozen=True)
class CancelRequested:
    """``cancel(id)`` was called."""

    reason: str | None = None
    actor: str | None = None  # who asked (v4)
    NAME: ClassVar[str] = "CancelRequested"


@dataclass(frozen=True)
class WorkflowCancelled:
    """The runtime stopped the execution after a cancel."""

    reason: str | None = None
    NAME: ClassVar[str] = "WorkflowCancelled"


@dataclass(frozen=True)
class WorkflowCompleted:
    """The handler returned; ``output`` is its validated JSON result."""

    output: str
    NAME: ClassVar[str] = "WorkflowCompleted"


@dataclass(frozen=True)
class WorkflowFailed:
    """The handler raised, or its output failed validation."""

    error_type: str
    message: str
    traceback: str
    NAME: ClassVar[str] = "WorkflowFailed"


@dataclass(frozen=True)
class PartitionClaimed:
    """A worker claims a partition; the envelope's epoch is the claim's epoch.

    Its execution id is ``partition-<N>``: it belongs to no execution.
    """

    partition: int
    worker: str
    NAME: ClassVar[str] = "PartitionClaimed"


@dataclass(frozen=True)
class RecordSkipped:
    """An operator skips the unreadable record at ``skipped_offset`` (``ploy skip``).

    Its execution id is ``partition-<N>``. The fold, stopped at that offset,
    looks ahead for this event and steps over the record; the event itself is
    the audit trail of who skipped what and why.
    """

    partition: int
    skipped_offset: int
    reason: str
    actor: str
    NAME: ClassVar[str] = "RecordSkipped"


@dataclass(frozen=True)
class PartitionReleased:
    """The owner hands a partition off: ``running`` > 0 while its steps finish, 0 once free.

    The envelope's epoch is the releasing claim's; the next owner waits for
    ``running == 0`` (bounded) before it claims, so no in-flight step is fenced.
    """

    partition: int
    worker: str
    running: int
    NAME: ClassVar[str] = "PartitionReleased"


@dataclass(frozen=True)
class WaitStarted:
    """``ctx.step.wait_for_event`` (or ``ctx.step.invoke``) began waiting durably.

    The fold resolves it against events already on the partition since ``since``
    (the lookback) and against every ``EventSent`` that follows; ``timeout_at``
    is a timer (``TimerFired`` with ``sleep`` = ``wait``) that ends it with no event.
    ``match`` is a JSON object of dotted paths into the event's data -> values.
    """

    wait: str
    event_type: str
    match: str
    since: int
    timeout_at: int | None = None
    child_id: str | None = None  # ctx.step.invoke: the child it waits for
    cancel_child: bool = True  # a cancel of this execution cancels that child
    NAME: ClassVar[str] = "WaitStarted"


@dataclass(frozen=True)
class EventSent:
    """An event for waiting executions: every matching waiter of its partition gets it
    once (``target`` None, appended to every partition), or one execution (``target``).
    ``id`` is its idempotency id: the fold ignores a repeat."""

    id: str
    type: str
    source: str
    time: int
    data: str
    target: str | None = None
    NAME: ClassVar[str] = "EventSent"


@dataclass(frozen=True)
class Patched:
    """``ctx.patched(name)`` took the new branch in this execution."""

    patch: str
    NAME: ClassVar[str] = "Patched"


@dataclass(frozen=True)
class ScheduleUpdated:
    """An operator paused, resumed or changed a schedule."""

    schedule: str
    action: str
    actor: str
    reason: str | None = None
    spec: str | None = None
    NAME: ClassVar[str] = "ScheduleUpdated"


@dataclass(frozen=True)
class StepResolved:
    """An operator completed a step with ``output`` (``action`` "complete") or ended
    its backoff wait (``action`` "retry-now")."""

    step: str
    action: str
    output: str | None
    actor: str
    reason: str | None = None
    NAME: ClassVar[str] = "StepResolved"


@dataclass(frozen=True)
class SubjectErased:
    """An operator destroyed a data subject's key (``ploy erase``)."""

    subject: str
    actor: str
    reason: str
    NAME: ClassVar[str] = "SubjectErased"


Body = (
    WorkflowTriggered
    | WorkflowStarted
    | StepStarted
    | StepCompleted
    | StepFailed
    | SleepScheduled
    | TimerFired
    | WorkflowLog
    | CancelRequested
    | WorkflowCancelled
    | WorkflowCompleted
    | WorkflowFailed
    | PartitionClaimed
    | RecordSkipped
    | PartitionReleased
    | WaitStarted
    | EventSent
    | Patched
    | ScheduleUpdated
    | StepResolved
    | SubjectErased
)

BODY_TYPES: dict[str, type[Body]] = {
    cls.NAME: cls
    for cls in (
        WorkflowTriggered,
        WorkflowStarted,
        StepStarted,
        StepCompleted,
        StepFailed,
        SleepScheduled,
        TimerFired,
        WorkflowLog,
        CancelRequested,
        WorkflowCancelled,
        WorkflowCompleted,
        WorkflowFailed,
        PartitionClaimed,
        RecordSkipped,
        PartitionReleased,
        WaitStarted,
        EventSent,
        Patched,
        ScheduleUpdated,
        StepResolved,
        SubjectErased,
    )
}

# Events of a partition, not of an execution (written under ``claim_id``).
PARTITION_EVENTS = (PartitionClaimed, RecordSkipped, PartitionReleased)

# What clients append (any process may): never fenced by epoch.
CLIENT_EVENTS = (WorkflowTriggered, CancelRequested, StepResolved)


def claim_id(partition: int) -> str:
    """The execution id a partition's claims are written under."""
    return f"partition-{partition}"


class _RandomIds:
    """Ids of 32 hex digits from the operating system's CSPRNG (as ``uuid4().hex``),
    drawn 4 KiB at a time: one system call per 256 ids instead of one per id.

    Why: os.urandom lets go of the interpreter lock for its system call, and on a
    busy event loop each such call hands the lock to another thread and waits to
    get it back (measured: ~150 us a call under load, a quarter of the loop's time).
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Start afresh; in a forked child: never the parent's bytes (nor its lock)."""
        self._lock = threading.Lock()
        self._bytes = b""
        self._at = 0

    def next(self) -> str:
        with self._lock:
            if self._at + 16 > len(self._bytes):
                self._bytes, self._at = os.urandom(4096), 0
            chunk = self._bytes[self._at:self._at + 16]
            self._at += 16
        return chunk.hex()


_random_ids = _RandomIds()
os.register_at_fork(after_in_child=_random_ids.forget)


def new_execution_id() -> str:
    """A random execution id, 32 hex digits: unique, and not guessable from others."""
    return _random_ids.next()


def new_event_id() -> str:
    """A random id, 32 hex digits; consumers of the log deduplicate on it."""
    return _random_ids.next()


@dataclass(frozen=True)
class Event:
    """The envelope: who, when, which writer epoch, and one body."""

    execution_id: str
    workflow: str
    timestamp: int
    body: Body
    epoch: int = 0
    event_id: str = field(default_factory=new_event_id)

    @property
    def type(self) -> str:
        """The body's type name, as in the schema."""
        return self.body.NAME
