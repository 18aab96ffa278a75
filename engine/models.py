"""What queries return: an execution with its steps, attempts and logs, or its summary.

Every field is derived from events by the fold (invariant 3): nothing here
lives only in a worker's memory. Times are milliseconds since the Unix epoch,
as written by the event's writer.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.payloads import ERASED, SEALED, scrub


class ExecutionStatus(StrEnum):
    """The life of an execution; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"  # for an event or a child execution (ctx.step.wait_for_event, invoke)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once nothing more will run."""
        return self in _TERMINAL


_TERMINAL = {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}


class ErrorInfo(BaseModel):
    """An exception as recorded: its type name, message and traceback."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    traceback: str = ""


class Attempt(BaseModel):
    """One attempt of a step: when it ran, how it ended, when the next one is due."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    started_at: int | None = None
    ended_at: int | None = None
    duration_ms: int | None = None
    error: ErrorInfo | None = None
    retry_at: int | None = None


class StepRecord(BaseModel):
    """A step (``kind="step"``), durable sleep (``"sleep"``), wait for an event (``"wait"``)
    or child execution (``"invoke"``) of an execution.

    A wait's ``input`` is what it waits for (type, match, since, timeout), its
    ``output`` the event it received (None while waiting or after a timeout: status
    ``timed_out``); an invoke's ``child_id`` is the child execution.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    name: str
    kind: str = "step"
    seq: int
    status: str
    input: Any = None
    output: Any = None
    error: ErrorInfo | None = None
    attempts: list[Attempt] = []
    started_at: int | None = None
    ended_at: int | None = None
    duration_ms: int | None = None
    wake_at: int | None = None
    child_id: str | None = None
    resolved: dict[str, Any] | None = None
    """An operator's action on the step: ``{action, actor, reason, at}`` (``complete``: its
    output is the operator's; ``retry-now``: its backoff wait was ended)."""


class WaitInfo(BaseModel):
    """What a ``waiting`` execution waits for, and until when (None: no timeout)."""

    model_config = ConfigDict(frozen=True)

    step: str
    event_type: str
    match: dict[str, Any] = {}
    since: int
    until: int | None = None
    child_id: str | None = None


class ReceivedEvent(BaseModel):
    """An event as ``ctx.step.wait_for_event`` returns it."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    source: str
    time: int
    """When the sender says it happened, ms since the epoch."""
    data: Any = None


class LogEntry(BaseModel):
    """A ``ctx.log`` call."""

    model_config = ConfigDict(frozen=True)

    seq: int
    timestamp: int
    level: str
    message: str
    data: Any = None


class Execution(BaseModel):
    """The durable record of one execution, as ``get_execution`` returns it."""

    model_config = ConfigDict(frozen=True)

    execution_id: str
    workflow: str
    status: ExecutionStatus
    input: Any = None
    output: Any = None
    result: Any = None
    error: ErrorInfo | None = None
    steps: list[StepRecord] = []
    logs: list[LogEntry] = []
    partition: int
    events: int
    idempotency_key: str | None = None
    created_at: int
    started_at: int | None = None
    ended_at: int | None = None
    updated_at: int
    duration_ms: int | None = None
    cancel_reason: str | None = None
    """The reason given to ``cancel`` (None when none was given or not cancelled)."""
    version: str | None = None
    """The workflow code version that started it (``version:`` in ploy.yaml)."""
    patches: list[str] = []
    """The ``ctx.patched`` changes whose new branch it took."""
    parent_id: str | None = None
    """The execution that started this one with ``ctx.step.invoke``."""
    parent_step: str | None = None
    waiting_for: list[WaitInfo] = []
    """While ``waiting``: each open wait (several for parallel invokes)."""
    cancel_actor: str | None = None
    """Who cancelled it (``admin-token``, ``local:user@host``), when the cancel said so."""
    rerun_of: str | None = None
    """The execution this one reruns (``ploy rerun``), whose events before ``rerun_offset``
    (the source's offset of the step it reruns from) it began with."""
    rerun_offset: int | None = None
    rerun_actor: str | None = None
    """Who started the rerun, and why (``rerun_reason``)."""
    rerun_reason: str | None = None
    reruns: list[str] = []
    """The reruns of this execution, oldest first."""
    subject: str | None = None
    """The data subject whose key seals its payloads (``trigger(..., subject=)``)."""


class ExecutionSummary(BaseModel):
    """An execution as lists show it, read from its execution record alone.

    Building one scans no step or log records, so a page of them costs one
    read per execution however long each has run.
    """

    model_config = ConfigDict(frozen=True)

    execution_id: str
    workflow: str
    status: ExecutionStatus
    created_at: int
    started_at: int | None = None
    ended_at: int | None = None
    duration_ms: int | None = None
    steps: int = 0
    """How many steps and sleeps it has begun (``Execution.steps`` holds both kinds)."""
    error: str | None = None
    """The message of the error it failed with."""

    @classmethod
    def of(cls, execution: Execution | ExecutionSummary) -> ExecutionSummary:
        """The summary of ``execution`` (a summary is returned as it is)."""
        if isinstance(execution, ExecutionSummary):
            return execution
        return cls(
            execution_id=execution.execution_id, workflow=execution.workflow,
            status=execution.status, created_at=execution.created_at,
            started_at=execution.started_at, ended_at=execution.ended_at,
            duration_ms=execution.duration_ms, steps=len(execution.steps),
            error=execution.error.message if execution.error else None,
        )


class HistoryEntry(BaseModel):
    """One event of an execution's audit trail, where it is on the log."""

    model_config = ConfigDict(frozen=True)

    partition: int
    offset: int
    event_id: str
    timestamp: int
    type: str
    epoch: int
    body: dict[str, Any]


def loads(text: str | None) -> Any:
    """User payloads are JSON text in events and records.

    A lone surrogate that a step returned (its JSON escapes it) comes back as
    U+FFFD, so that every answer built from it can be encoded as UTF-8.
    """
    if text is None:
        return None
    if text.startswith(SEALED) or text == ERASED:
        return text  # a subject's sealed payload: engine.erasure opens it, or shows "[erased]"
    value = json.loads(text)
    return scrub(value) if "\\ud" in text or "\\uD" in text else value
