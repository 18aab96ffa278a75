"""Rerun an ended execution from one of its steps, with today's code.

A rerun is a new execution that begins with a copy of its source's events up
to (not including) the first ``StepStarted`` of the step it reruns from, so
replay returns the recorded outputs of the steps before it and the rest runs
with the code deployed now. The source is untouched. Protocol
(:func:`rerun`):

1. Read the source's history; it must have ended (completed, failed or
   cancelled: rerunning a live execution would run its steps twice).
2. Find the cut: the offset of the first ``StepStarted`` of ``from_step``
   (default: of the first step that did not complete; else the source's end
   event, so everything is replayed and only the code after its last step
   runs again).
3. Choose a new id that hashes to the source's partition: the rerun's trigger
   is folded next to the source, which lists it among its reruns (fold rule 8).
4. Append ``WorkflowTriggered(input, rerun_of, rerun_offset=cut)``: the fold
   holds the execution, so no runner starts on a partial copy.
5. Append a copy of each source event before the cut, but its trigger and any
   end event, under the new id, in order, each acknowledged before the next.
6. Append the same trigger again: the fold releases the execution and the
   runtime starts it (replaying the copy).

A rerun whose appender died between steps 4 and 6 stays ``queued`` and held;
cancel it and rerun again. Copies are written with the partition's current
claim epoch, which the fold accepts, so a rerun is made only by a process that
folds the source's partition (a single worker, its owner, a replica): elsewhere
it is refused.

:func:`select` finds the executions a bulk rerun covers (``ploy rerun
--workflow W --status failed --since T``).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from engine import erasure
from engine.errors import RerunError
from engine.events import (
    BODY_TYPES,
    Body,
    CancelRequested,
    Event,
    EventSent,
    TimerFired,
    WaitStarted,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowTriggered,
)
from engine.models import ExecutionStatus, HistoryEntry, StepRecord

if TYPE_CHECKING:
    from engine.runtime import Runtime

__all__ = ["Rerun", "rerun", "select"]

_ENDS = {cls.NAME for cls in (WorkflowCompleted, WorkflowFailed, WorkflowCancelled,
                              CancelRequested)}


@dataclass(frozen=True)
class Rerun:
    """A rerun made (or, in a dry run, that would be made)."""

    source: str
    execution_id: str | None
    from_step: str | None
    rerun_offset: int
    copied: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def cut_point(source: str, history: list[HistoryEntry],
              from_step: str | None) -> tuple[int, str | None]:
    """(offset of the cut, step rerun from) per step 2 of the module docstring."""
    started: dict[str, int] = {}
    completed: set[str] = set()
    for entry in history:
        step = entry.body.get("step")
        if entry.type == "StepStarted":
            started.setdefault(str(step), entry.offset)
        elif entry.type == "StepCompleted":
            completed.add(str(step))
    if from_step is not None:
        if from_step not in started:
            raise RerunError(source, f"it never started a step '{from_step}'", list(started))
        return started[from_step], from_step
    for step, offset in started.items():
        if step not in completed:
            return offset, step
    ends = [e.offset for e in history if e.type in _ENDS]
    return (min(ends) if ends else history[-1].offset + 1), None


def plan(source: str, status: str, history: list[HistoryEntry],
         from_step: str | None) -> tuple[int, str | None, list[HistoryEntry]]:
    """Steps 1 and 2: (cut, the step rerun from, the events to copy)."""
    if not ExecutionStatus(status).terminal:
        raise RerunError(source, f"it is {status}; only an execution that ended can be rerun")
    cut, step = cut_point(source, history, from_step)
    copies = [e for e in history if e.offset < cut and e.type != WorkflowTriggered.NAME
              and e.type not in _ENDS]
    return cut, step, copies


def colocated_id(runtime: Runtime, source: str) -> str:
    """Step 3: a new random id on the source's partition (a few tries per partition)."""
    partition = runtime.log.partition_for(source)
    while True:
        eid = uuid.uuid4().hex
        if runtime.log.partition_for(eid) == partition:
            return eid


async def rerun(runtime: Runtime, source: str, from_step: str | None = None, *,
                dry_run: bool = False, actor: str | None = None,
                reason: str | None = None) -> Rerun | None:
    """Rerun ``source`` from ``from_step`` (the module docstring's protocol).

    Returns:
        The rerun (``execution_id`` None in a dry run); None for an unknown source.

    Raises:
        RerunError: The source has not ended, or never started ``from_step``.
    """
    # Step 1.
    history = await runtime.history(source)
    record = await runtime.get_execution(source)
    if history is None or record is None:
        return None
    # Step 2.
    cut, step, copies = plan(source, record.status.value, history, from_step)
    still_open = _open_at(cut, record.steps, history)
    copies = [e for e in copies if not (e.type == WaitStarted.NAME
                                        and e.body["wait"] in still_open)]
    if dry_run:
        return Rerun(source, None, step, cut, len(copies))
    partition = runtime.log.partition_for(source)
    if not runtime.partitions.folds(partition):
        # Its copies would carry an epoch the owner's fold may fence: the rerun would
        # then run the copied steps again.
        raise RerunError(source, f"this process does not fold partition {partition}; send "
                         "the rerun to the worker that owns it (ploy workers shows it)")
    # Step 3.
    eid = colocated_id(runtime, source)
    trigger = history[0].body
    subject = trigger.get("subject")
    if subject is not None and runtime.key_store.get(subject) is None:
        raise RerunError(source, f"the key of its data subject '{subject}' was erased")
    body = _sealed(runtime, subject, eid, WorkflowTriggered(
        trigger["input"], rerun_of=source, rerun_offset=cut, subject=subject, actor=actor,
        reason=reason))
    workflow = record.workflow
    # Step 4.
    await runtime.log.append(Event(eid, workflow, runtime.clock.now(), body,
                                   epoch=runtime.epoch_of(eid)))
    # Step 5.
    epoch = _epoch(runtime, eid)
    timed_out = {e.body["sleep"] for e in copies if e.type == TimerFired.NAME}
    for entry in copies:
        copied = _addressed(BODY_TYPES[entry.type](**entry.body), eid, timed_out)
        copied = _sealed(runtime, subject, eid, copied)
        await runtime.log.append(Event(eid, workflow, runtime.clock.now(), copied, epoch=epoch))
    # Step 6.
    await runtime.log.append(Event(eid, workflow, runtime.clock.now(), body,
                                   epoch=runtime.epoch_of(eid)))
    return Rerun(source, eid, step, cut, len(copies))


def _open_at(cut: int, steps: list[StepRecord], history: list[HistoryEntry]) -> set[str]:
    """Keys of the source's waits still open at ``cut`` (ended after it, or never): the
    rerun's code opens them again (a new child, a fresh deadline) instead of copying a
    wait for a child or an event that belong to the source."""
    started = {e.body["wait"]: e.offset for e in history if e.type == WaitStarted.NAME}
    fired = {e.body["sleep"]: e.offset for e in history if e.type == TimerFired.NAME}
    still_open = set()
    for step in steps:
        if step.kind not in ("wait", "invoke") or step.key not in started:
            continue
        ended = None
        if step.status == "received" and isinstance(step.output, dict):
            ended = max(started[step.key], int(step.output.get("offset", cut)))
        elif step.status == "timed_out":
            ended = fired.get(step.key)
        if ended is None or ended >= cut:
            still_open.add(step.key)
    return still_open


def _addressed(body: Body, eid: str, timed_out: set[str]) -> Body:
    """A copy that means for the rerun what the original meant for its source.

    An event the source's wait received is sent to the rerun alone, under an id of its
    own (the original's source and id were seen on this partition: a copy as it is
    would be ignored as a repeat, and aimed at the source). A copied wait keeps its
    timeout only if it timed out (its copied TimerFired ends it again); else the event
    copied after it ends it, and a timeout long past could fire first.
    """
    if isinstance(body, EventSent):
        return replace(body, id=f"{body.id}@{eid}", target=eid)
    if isinstance(body, WaitStarted) and body.wait not in timed_out:
        return replace(body, timeout_at=None)
    return body


def _sealed(runtime: Runtime, subject: str | None, eid: str, body: Body) -> Body:
    """A copy sealed anew for the rerun: the history read opened the source's payloads,
    and a sealed value is bound to its execution's id (``engine.erasure``)."""
    return erasure.seal_body(runtime.key_store, subject, eid, body)


def _epoch(runtime: Runtime, eid: str) -> int:
    """The epoch the copies are written with: the partition's current claim (so the fold
    does not fence them), or this process's own if higher."""
    view = runtime.views.get(runtime.log.partition_for(eid))
    return max(runtime.epoch_of(eid), view.claim_epoch if view is not None else 0)


async def select(runtime: Runtime, *, workflow: str | None, status: str | None,
                 since: int | None, limit: int = 1000) -> list[str]:
    """Ids of the ended executions of ``workflow`` with ``status`` created at or after
    ``since``, newest first, at most ``limit`` (a bulk rerun's sources)."""
    found: list[str] = []
    before = None
    while len(found) < limit:
        page = await runtime.list_page(workflow=workflow, status=status, before=before,
                                       limit=min(500, limit))
        for summary in page.executions:
            if since is not None and summary.created_at < since:
                return found  # newest first: the rest are older still
            if summary.status.terminal:
                found.append(summary.execution_id)
        if page.next is None:
            break
        before = page.next
    return found[:limit]
