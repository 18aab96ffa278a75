"""The worker loop: run the executions of the partitions this process owns, answer queries.

Three concerns, each in its module, meet here:
- ``engine.partitions``: the views and the fold thread (which partitions are
  folded, read-your-writes, corrupt records);
- ``engine.ownership``: which partitions this process runs (the consumer
  group, claims on the log, planned handoffs, the lease after a freeze);
- this module: the runners of those partitions' executions (start on a
  trigger, a fired timer or a claim; resume after a failed append; cancel) and
  the client API (trigger, get, history, list, cancel, skip).

A process folds only what it owns (plus every partition on a ``standby``
worker or a read ``replica``). A query about an execution on a partition it
does not fold goes to that partition's owner (``engine.directory``), with the
offset of this process's last acknowledged write there, so the answer reads
its own writes. A single worker (``ploy dev``, tests) owns and folds every
partition, and asks no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engine import payloads
from engine.bindings import Env, WorkflowBinding
from engine.builder import Worker, WorkflowDef
from engine.clock import Clock
from engine.config import Config
from engine.directory import Directory
from engine.errors import (
    CorruptEventError,
    InvalidInputError,
    NotFoldedHereError,
    NotStalledError,
    OwnerUnavailableError,
    PartitionStalledError,
    PayloadTooDeepError,
    SerializationError,
    UnknownWorkflowError,
)
from engine.events import (
    CancelRequested,
    Event,
    RecordSkipped,
    TimerFired,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowTriggered,
    claim_id,
)
from engine.execution import ExecutionRunner, Outcome, to_json
from engine.fold import new_execution
from engine.listing import Cursor, Page, list_page, merge
from engine.log import EventLog
from engine.models import Execution, ExecutionStatus, ExecutionSummary, HistoryEntry
from engine.ownership import Ownership
from engine.partitions import Applied, Partitions
from engine.threads import StepThreads
from engine.timers import TimerSchedule
from engine.view import PartitionView, build_execution, history_entries

logger = logging.getLogger("ploy.runtime")

ID_NAMESPACE = uuid.UUID("6f1c1d1e-9a43-4b8e-9a55-3e1f0c2b7d10")
RUNNABLE = (ExecutionStatus.QUEUED.value, ExecutionStatus.RUNNING.value)
ENDS = (WorkflowCompleted, WorkflowFailed, WorkflowCancelled, CancelRequested)
MAX_WAIT_S = 60.0  # a long-poll or a stream slice at an owner; the asker asks again
Seen = tuple[int, int, Event]  # (partition, offset, event) as the fold applied it


class Runtime:
    """Runs the executions of the partitions this process owns; answers for any."""

    def __init__(self, worker: Worker, config: Config, log: EventLog, *,
                 clock: Clock | None = None, max_threads: int = 32, scale_out: bool = False,
                 runs: bool = True, replica: bool = False, instance_id: str | None = None):
        self.worker, self.config, self.log = worker, config, log
        self.clock = clock or Clock()
        self.scale_out = scale_out
        self.runs = runs  # False: a query process that runs nothing
        self.replica = replica or config.standby  # fold every partition, owned or not
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.env = Env({
            name: WorkflowBinding(self, name, binding.name)
            for name, binding in config.workflow.items()
        })
        self.runners: dict[str, ExecutionRunner] = {}
        self.threads = StepThreads(max_threads)
        self.stopping = False
        self.partitions = Partitions(log, self.state_path, self._on_applied)
        self.ownership = Ownership(
            log, self.partitions, worker_id=self.worker_id, group_id=config.kafka.group_id,
            clock=self.clock, spawn=self._spawn, running_on=self._running_on,
            resume=self._resume, standby=self.replica, instance_id=instance_id)
        self.directory: Directory | None = None
        self.timers = TimerSchedule(self.clock, self._append_fired, self.may_run)
        self._timed: frozenset[int] = frozenset()  # partitions whose timers are scheduled
        self._tasks: set[asyncio.Task[None]] = set()
        # Who waits on an execution's events (a result, a stream): fed by the fold.
        self._watchers: dict[str, list[asyncio.Queue[Seen]]] = {}
        self._resume_after: set[str] = set()
        self._started_on_ack: set[str] = set()  # triggered here; skip its WorkflowTriggered
        self._fired_here: set[tuple[str, str]] = set()  # woken here; skip its TimerFired

    @property
    def state_path(self) -> Path:
        return Path(self.config.state_dir) / self.log.topic

    # The state the runners, timers and connectors read (each owned by its module).
    @property
    def views(self) -> dict[int, PartitionView]:
        return self.partitions.views

    @property
    def stalled(self) -> dict[int, CorruptEventError]:
        return self.partitions.stalled

    @property
    def owned(self) -> set[int]:
        return self.ownership.owned

    @property
    def epochs(self) -> dict[int, int]:
        return self.ownership.epochs

    def may_run(self, partition: int) -> bool:
        """Whether this process may start a step on ``partition`` now."""
        return self.ownership.may_run(partition)

    def epoch_of(self, eid: str) -> int:
        """The epoch this process writes with on ``eid``'s partition."""
        return self.ownership.epoch_of(self.log.partition_for(eid))

    async def ensure_lease(self) -> None:
        await self.ownership.ensure_lease()

    def claiming(self) -> list[int]:
        return self.ownership.claiming()

    def on_ownership(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call ``listener(owned partitions)`` on the event loop now and after each change."""
        self.ownership.on_change(listener)

    # -- start and stop ---------------------------------------------------------

    async def start(self) -> None:
        """Open the views, catch up what this process folds, take ownership, serve.

        1. Open every partition's view; catch up those folded from the start
           (all of them for a single worker, a standby or a replica; none for a
           scaled-out worker, which follows partitions as they are assigned).
        2. Start the fold thread.
        3. Take ownership: a single worker owns every partition and resumes its
           unfinished executions; scaled out, the consumer group assigns them
           and each is claimed before it runs (``engine.ownership``). Then the
           timer service starts.
        """
        everything = range(self.log.partitions)
        single = self.runs and not self.scale_out
        # Step 1.
        self.partitions.open()
        folded = everything if single or self.replica else ()
        # Step 2.
        await self.partitions.start(folded)
        if not single:
            self.directory = Directory(self.log, self.worker_id, self.config.http.admin_token)
            await asyncio.to_thread(self.directory.start)
        # Step 3.
        self.ownership.on_change(self._schedule_timers)
        if single:
            self.ownership.start_single()
        elif self.runs:
            self.ownership.on_change(lambda owned: self._publish())
            self.ownership.start_group()
        if self.runs:
            self.timers.start()
        self._spawn(self.partitions.watch_stalled(lambda: self.stopping), "ploy-watch-stalled")

    def _schedule_timers(self, owned: frozenset[int]) -> None:
        """The timer schedule follows ownership: load what is new, drop what left."""
        for p in sorted(owned - self._timed):
            self.timers.load(p, self.views[p])
        for p in sorted(self._timed - owned):
            self.timers.drop(p)
        self._timed = owned

    async def _append_fired(self, eid: str, workflow: str, sleep_key: str, wake_at: int,
                            partition: int) -> None:
        """Append ``TimerFired``; once acknowledged, resume the execution with the value in
        hand (as a trigger does), not a fold hop later: the fold's ``TimerFired`` then
        starts nothing."""
        _, offset = await self.log.append(Event(
            eid, workflow, self.clock.now(), TimerFired(sleep_key, wake_at),
            epoch=self.ownership.epoch_of(partition)))
        self._spawn(self._resume_fired(eid, sleep_key, partition, offset), f"ploy-woke-{eid}")

    async def _resume_fired(self, eid: str, sleep_key: str, partition: int, offset: int) -> None:
        """Start the runner of a sleep this process just fired, from the view as it stands
        right before the ``TimerFired`` at ``offset`` plus that firing."""
        await self.partitions.folded(partition, offset - 1)
        view = self.views.get(partition)
        if (view is None or view.next_offset > offset or self.stopping or eid in self.runners
                or not self.may_run(partition)):
            return  # the fold got there first (and started it), or it is not ours to run
        record = view.record(eid)
        if record is None or record["sleeping_on"] != sleep_key:
            return  # cancelled meanwhile, say: the fold decides
        workflow = self.worker.workflow(record["workflow"])
        if workflow is None:
            return
        steps = view.steps(eid)
        for step in steps:
            if step["kind"] == "sleep" and step["key"] == sleep_key:
                step["status"] = ExecutionStatus.COMPLETED.value
        self._fired_here.add((eid, sleep_key))
        logged = view.log_positions(eid) if record["logs"] else []
        self._run(ExecutionRunner(self, record, steps, workflow, logged))

    def advertise(self, url: str) -> None:
        """The address of this process's engine API, where others send their queries."""
        if self.directory is not None:
            self.directory.url = url.rstrip("/")
            self._publish()

    def _publish(self) -> None:
        if self.directory is not None and self.runs:
            # What this process can answer for: what it folds, less what it is still
            # catching up on to claim (its view there may not hold the log's end yet).
            views, claiming = self.partitions.views, set(self.ownership.claiming())
            folded = {p: views[p].claim_epoch for p in sorted(self.partitions.following)
                      if p in views and p not in claiming}
            try:
                self.directory.publish(folded)
            except Exception as exc:  # the card is a hint; the next change sends it again
                logger.warning("could not publish this worker's card: %s", exc)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop starting steps, let running ones finish (up to ``grace_s``), release all."""
        self.stopping = True
        self.ownership.stopping = True
        await self.timers.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await self.ownership.stop()
        if self.directory is not None:
            if self.runs:
                try:
                    self.directory.publish({}, alive=False)
                except Exception as exc:
                    logger.debug("the last card: %s", exc)
            await asyncio.to_thread(self.directory.stop)
        await self.partitions.stop()

    # -- what the fold applied ------------------------------------------------------------

    def _on_applied(self, partition: int, applied: Applied) -> None:
        """On the event loop: start what the fold made runnable, pass cancels on."""
        self.timers.on_folded(partition, applied)
        for offset, event in applied:
            watchers = self._watchers.get(event.execution_id)
            if watchers:
                for queue in watchers:
                    queue.put_nowait((partition, offset, event))
            body = event.body
            if isinstance(body, WorkflowTriggered) and event.execution_id in self._started_on_ack:
                self._started_on_ack.discard(event.execution_id)  # trigger() started it
            elif isinstance(body, TimerFired) and (event.execution_id, body.sleep) in (
                    self._fired_here):
                self._fired_here.discard((event.execution_id, body.sleep))  # woken on its ack
            elif isinstance(body, WorkflowTriggered | TimerFired):
                self._maybe_start(event.execution_id)
            elif isinstance(body, CancelRequested):
                self._on_cancel(event.execution_id)

    def _resume(self, partition: int) -> None:
        """Start every unfinished execution of a partition this process now runs
        (sleeping ones wait for their timers)."""
        for eid in self.views[partition].active():
            self._maybe_start(eid)

    def _running_on(self, partition: int, epoch: int | None) -> int:
        """How many of this process's runners run on ``partition`` (under ``epoch``)."""
        return sum(1 for r in self.runners.values() if r.partition == partition
                   and (epoch is None or r.epoch == epoch))

    async def partitions_report(self) -> list[dict[str, Any]]:
        """Who runs each partition (its claim on the log), and how far behind it is.

        Works on any Kafka-protocol broker: ownership comes from the claims in
        the views this process folds and from the owners' cards for the others,
        positions from the offsets the group commits.
        """
        try:
            committed = await asyncio.to_thread(self.log.committed, self.config.kafka.group_id)
        except Exception as exc:  # no group yet, or a broker without the API
            logger.debug("committed offsets: %s", exc)
            committed = {}
        report = []
        for p, view in sorted(self.views.items()):
            folded = self.partitions.folds(p)
            claim = view.claim() if folded else None
            if claim is None and self.directory is not None:
                card = self.directory.owner(p)
                if card is not None:
                    claim = {"worker": card["worker"], "epoch": card["partitions"][str(p)]}
            claim = claim or {}
            position = committed.get(p)
            end = view.next_offset if folded else None
            report.append({
                "partition": p,
                "worker": claim.get("worker"),
                "epoch": claim.get("epoch", 0),
                "fenced_events": claim.get("fenced", 0),
                "end_offset": end,
                "committed_offset": position,
                "lag": None if position is None or end is None else max(end - position, 0),
                "stalled": str(self.stalled[p]) if p in self.stalled else None,
                "skipped": view.skipped() if folded else [],
                "here": p in self.owned,
                "folded_here": folded,
                # Assigned to this process by the group, its claim not (yet) on the log.
                "claiming": p in self.ownership.claiming(),
            })
        return report

    # -- running executions --------------------------------------------------------

    def _maybe_start(self, eid: str) -> None:
        if self.stopping:
            return
        if eid in self.runners:
            self._resume_after.add(eid)  # a timer fired while the runner winds down
            return
        partition = self.log.partition_for(eid)
        if partition not in self.owned or partition in self.stalled:
            return
        view = self.views[partition]
        target = self.log.high_acked.get(partition, -1)
        if view.next_offset <= target:
            # The view lacks events this process has had acknowledged (a runner that
            # just ended, say): replaying from it could run a completed step again.
            self._spawn(self._start_when_folded(eid, partition, target), f"ploy-wait-{eid}")
            return
        record = view.record(eid)
        if record is None or record["status"] not in RUNNABLE:
            return
        workflow = self.worker.workflow(record["workflow"])
        if workflow is None:
            self._fail_unknown(record)
            return
        logged = view.log_positions(eid) if record["logs"] else []
        self._run(ExecutionRunner(self, record, view.steps(eid), workflow, logged))

    async def _start_when_folded(self, eid: str, partition: int, offset: int) -> None:
        await self.partitions.folded(partition, offset)
        self._maybe_start(eid)

    def _run(self, runner: ExecutionRunner) -> None:
        self.runners[runner.id] = runner
        self._spawn(self._drive(runner), f"ploy-exec-{runner.id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """A task the runtime keeps (and awaits at stop); its failure is logged."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", task.get_name(), exc_info=task.exception())

    def resume_later(self, eid: str, delay_s: float = 1.0) -> None:
        """Start ``eid`` again after ``delay_s`` (its run stopped on a failed append)."""
        async def later() -> None:
            deadline = time.monotonic() + delay_s
            while time.monotonic() < deadline:
                if self.stopping:
                    return
                await asyncio.sleep(0.1)
            self._maybe_start(eid)

        self._spawn(later(), f"ploy-resume-{eid}")

    async def _drive(self, runner: ExecutionRunner) -> None:
        try:
            if await runner.run() is Outcome.RETRY_LATER:
                self.resume_later(runner.id)
        except Exception:
            logger.exception("execution %s: the runtime failed to record its end", runner.id)
        finally:
            self.runners.pop(runner.id, None)
            if runner.id in self._resume_after:
                self._resume_after.discard(runner.id)
                self._maybe_start(runner.id)

    def _fail_unknown(self, record: dict[str, Any]) -> None:
        error = UnknownWorkflowError(record["workflow"], list(self.worker.workflows))
        self.log.append_nowait(Event(record["id"], record["workflow"], self.clock.now(),
                                     WorkflowFailed(type(error).__name__, str(error), ""),
                                     epoch=self.epoch_of(record["id"])))

    def _on_cancel(self, eid: str) -> None:
        runner = self.runners.get(eid)
        if runner is not None:
            cancelled = self.views[runner.partition].record(eid) or {}
            runner.cancel_reason = cancelled.get("cancel_reason")
            runner.cancel_requested.set()
            return
        if self.log.partition_for(eid) not in self.owned:
            return  # its owner records the end
        record = self.views[self.log.partition_for(eid)].record(eid)
        if record is not None and record["status"] == ExecutionStatus.CANCELLED.value:
            self.log.append_nowait(Event(eid, record["workflow"], self.clock.now(),
                                         WorkflowCancelled(record.get("cancel_reason")),
                                         epoch=self.epoch_of(eid)))

    # -- the client API (bindings, HTTP, CLI) -----------------------------------------

    def _workflow(self, name: str) -> WorkflowDef:
        workflow = self.worker.workflow(name)
        if workflow is None:
            raise UnknownWorkflowError(name, list(self.worker.workflows))
        return workflow

    async def trigger(self, workflow: str, input: Any, *,
                      idempotency_key: str | None = None) -> str:
        """Validate, then append ``WorkflowTriggered``; return the execution id.

        1. Validate ``input`` against the workflow's input model (nothing is
           appended if it fails).
        2. Derive the id: random, or from the idempotency key so that a second
           trigger with the key names the same execution.
        3. With a key, return the existing execution if the view has it.
        4. Append and wait for the acknowledgement.
        5. If this process runs the partition, start the execution now, with the
           value in hand (as a step goes on after its ack): the fold's
           ``WorkflowTriggered`` then starts nothing. If the fold got there
           first, it has started it already.
        """
        wf = self._workflow(workflow)
        # Step 1.
        text = self._input_json(wf, input)
        if idempotency_key is not None:
            payloads.check_key(idempotency_key)
        # Step 2.
        if idempotency_key is None:
            eid = uuid.uuid4().hex
        else:
            eid = uuid.uuid5(ID_NAMESPACE, f"{workflow}\x00{idempotency_key}").hex
            # Step 3.
            if await self._record(eid) is not None:
                return eid
        # Step 4.
        stalled = self.stalled.get(self.log.partition_for(eid))
        if stalled is not None:  # accepted, it would vanish: nothing folds there
            raise PartitionStalledError(self.log.topic, stalled.partition, stalled.offset)
        event = Event(eid, workflow, self.clock.now(), WorkflowTriggered(text, idempotency_key),
                      epoch=self.epoch_of(eid))
        partition, offset = await self.log.append(event)
        # Step 5.
        view = self.views.get(partition)
        if (view is not None and view.next_offset <= offset and partition in self.owned
                and partition not in self.stalled and not self.stopping
                and eid not in self.runners and eid not in self._started_on_ack
                and view.record(eid) is None):
            assert isinstance(event.body, WorkflowTriggered)
            self._started_on_ack.add(eid)
            self._run(ExecutionRunner(self, new_execution(event, event.body, partition), [], wf))
        return eid

    def _input_json(self, wf: WorkflowDef, input: Any) -> str:
        """The input as JSON text, or InvalidInputError / PayloadTooLargeError (nothing appended).

        Besides the model: valid Unicode (no lone surrogate), bounded bytes and depth.
        """
        if wf.input is not None:
            try:
                if isinstance(input, BaseModel) and not isinstance(input, wf.input):
                    input = input.model_dump()
                model = input if isinstance(input, wf.input) else wf.input.model_validate(input)
            except ValidationError as exc:
                raise InvalidInputError(wf.name, json.loads(exc.json(include_url=False))) from None
            try:
                text = model.model_dump_json()
            except ValueError:  # pydantic refuses a lone surrogate
                text = to_json(model, f"the input of workflow '{wf.name}'")
        else:
            try:
                text = to_json(input, f"the input of workflow '{wf.name}'")
            except SerializationError as exc:
                raise InvalidInputError(wf.name, [{"type": "json", "loc": [],
                                                   "msg": str(exc)}]) from None
        surrogate = payloads.lone_surrogate(text)
        if surrogate is not None:
            raise InvalidInputError(wf.name, [{
                "type": "unicode", "loc": [],
                "msg": f"text contains a lone surrogate ({surrogate}), which is not valid "
                       "Unicode and cannot be encoded as UTF-8"}])
        try:
            payloads.check(text, "workflow input", self.config.max_payload_bytes)
        except PayloadTooDeepError as exc:
            raise InvalidInputError(wf.name, [{"type": "depth", "loc": [],
                                               "msg": str(exc)}]) from None
        return text

    # -- queries: here if this process folds the partition, else at its owner ------------

    async def _local_view(self, partition: int, min_offset: int | None) -> PartitionView | None:
        """The view of ``partition`` once it holds ``min_offset`` (default: every event
        this process had acknowledged there); None if this process does not fold it."""
        return await self.partitions.caught_up(partition, min_offset)

    async def _ask(self, partition: int, path: str, min_offset: int | None = None,
                   timeout_s: float = 10.0, **params: Any) -> tuple[int, Any]:
        """GET ``path`` from the owner of ``partition``, once it holds ``min_offset`` and
        every write this process had acknowledged there (read-your-writes)."""
        if self.directory is None:
            raise OwnerUnavailableError(partition, "this process folds it but is not caught up")
        mine = self.log.high_acked.get(partition)
        wanted = max((o for o in (min_offset, mine) if o is not None), default=None)
        return await self.directory.ask(partition, path,
                                        {"local": 1, "min_offset": wanted, **params},
                                        timeout_s=timeout_s)

    async def _record(self, eid: str) -> dict[str, Any] | None:
        """The execution record (status, workflow, ...), here or at its owner."""
        partition = self.log.partition_for(eid)
        view = await self._local_view(partition, None)
        if view is not None:
            return view.record(eid)
        execution = await self.get_execution(eid)
        if execution is None:
            return None
        return {"id": eid, "workflow": execution.workflow, "status": execution.status.value,
                "ended_at": execution.ended_at, "cancel_reason": execution.cancel_reason}

    async def get_execution(self, execution_id: str, *, local: bool = False,
                            min_offset: int | None = None) -> Execution | None:
        """The execution as its partition's view has it, or None for an unknown id.

        ``local``: answer from this process only (a routed query), else NotFoldedHereError.
        """
        partition = self.log.partition_for(execution_id)
        view = await self._local_view(partition, min_offset)
        if view is not None:
            return await asyncio.to_thread(build_execution, view, execution_id)
        if local:
            raise NotFoldedHereError(partition)
        status, payload = await self._ask(partition, f"/executions/{execution_id}", min_offset)
        if status == 404:
            return None
        if status != 200:
            raise OwnerUnavailableError(partition, f"answered {status}: {payload}")
        return Execution.model_validate(payload)

    async def history(self, execution_id: str, *, local: bool = False,
                      min_offset: int | None = None) -> list[HistoryEntry] | None:
        """Every event of the execution with its partition and offset (the audit trail)."""
        partition = self.log.partition_for(execution_id)
        view = await self._local_view(partition, min_offset)
        if view is not None:
            if view.record(execution_id) is None:
                return None
            return await asyncio.to_thread(history_entries, view, execution_id)
        if local:
            raise NotFoldedHereError(partition)
        status, payload = await self._ask(partition, f"/executions/{execution_id}/history",
                                          min_offset)
        if status == 404:
            return None
        if status != 200:
            raise OwnerUnavailableError(partition, f"answered {status}: {payload}")
        return [HistoryEntry.model_validate(e) for e in payload["events"]]

    async def cancel(self, execution_id: str, reason: str | None = None) -> bool:
        """Append ``CancelRequested``; True if it ended the execution, False if already over."""
        record = await self._record(execution_id)
        if record is None or ExecutionStatus(record["status"]).terminal:
            return False
        await self.log.append(Event(execution_id, record["workflow"], self.clock.now(),
                                    CancelRequested(reason), epoch=self.epoch_of(execution_id)))
        after = await self._record(execution_id)
        return after is not None and after["status"] == ExecutionStatus.CANCELLED.value and (
            after["ended_at"] is not None and after["cancel_reason"] == reason)

    async def skip(self, partition: int, offset: int, reason: str, actor: str) -> int:
        """Append the marker that skips the corrupt record ``partition`` is stopped at
        (see ``engine.skips``); the marker's offset. Only the record the fold stopped
        at can be skipped: a good record is never dropped by a typo."""
        if self.partitions.folds(partition) or self.directory is None:
            failure = self.stalled.get(partition)
            stalled_at = None if failure is None else failure.offset
        else:
            _, health = await self._ask(partition, "/health")
            stalled_at = (health or {}).get("stalled_offsets", {}).get(str(partition))
        if stalled_at != offset:
            raise NotStalledError(partition, offset, stalled_at)
        if not reason.strip():
            raise ValueError("a skip needs a reason (it is kept on the log for the audit)")
        event = Event(claim_id(partition), "", self.clock.now(),
                      RecordSkipped(partition, offset, reason, actor))
        _, at = await self.log.append(event, partition=partition)
        return at

    # -- results pushed, not polled ----------------------------------------------------

    @contextlib.contextmanager
    def _watch(self, execution_id: str) -> Iterator[asyncio.Queue[Seen]]:
        """A queue of the execution's events as the fold applies them (costs nothing idle)."""
        queue: asyncio.Queue[Seen] = asyncio.Queue()
        self._watchers.setdefault(execution_id, []).append(queue)
        try:
            yield queue
        finally:
            queues = self._watchers.get(execution_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._watchers.pop(execution_id, None)

    async def wait_for_end(self, execution_id: str, timeout_s: float, *, local: bool = False,
                           min_offset: int | None = None) -> Execution | None:
        """The execution once it has ended (completed, failed or cancelled); None for an
        unknown id; TimeoutError after ``timeout_s``.

        Where this process folds the partition, the wait is a queue the fold feeds:
        it wakes on the end event, with no polling. Elsewhere it long-polls the
        owner, which waits the same way.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        partition = self.log.partition_for(execution_id)
        while True:
            if self.partitions.folds(partition):
                found = await self._wait_here(execution_id, partition, deadline, min_offset)
                if found is not _MOVED:
                    return found  # type: ignore[return-value]
            if local:
                raise NotFoldedHereError(partition)
            if loop.time() >= deadline:
                raise TimeoutError(f"execution {execution_id} has not ended after "
                                   f"{timeout_s:g} s")
            wait_s = min(deadline - loop.time(), MAX_WAIT_S)
            try:
                status, payload = await self._ask(
                    partition, f"/executions/{execution_id}/result", min_offset,
                    wait=f"{int(wait_s * 1000)}ms", timeout_s=wait_s + 10)
            except OwnerUnavailableError:  # its owner is changing: ask again, until the end
                await asyncio.sleep(0.2)
                continue
            if status == 404:
                return None
            if status == 200:
                return Execution.model_validate(payload)
            if status >= 500:  # the owner stopped mid-wait: ask again, whoever owns it now
                await asyncio.sleep(0.2)
            elif status != 202:  # 202: not ended within the wait; ask again
                raise OwnerUnavailableError(partition, f"answered {status}: {payload}")

    async def _wait_here(self, execution_id: str, partition: int, deadline: float,
                         min_offset: int | None) -> Execution | None | object:
        """``wait_for_end`` on a partition folded here; ``_MOVED`` if it stops being so."""
        loop = asyncio.get_running_loop()
        with self._watch(execution_id) as seen:
            execution = await self.get_execution(execution_id, min_offset=min_offset)
            while execution is not None and not execution.status.terminal:
                if not self.partitions.folds(partition):
                    return _MOVED
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"execution {execution_id} is still "
                                       f"{execution.status.value}")
                try:  # a slice of at most 1 s: then look again whether it is folded here
                    _, _, event = await asyncio.wait_for(seen.get(), min(remaining, 1.0))
                except TimeoutError:
                    continue
                if isinstance(event.body, ENDS):
                    execution = await self.get_execution(execution_id)
            return execution

    async def stream(self, execution_id: str, *, after: int = -1,
                     local: bool = False) -> AsyncGenerator[HistoryEntry, None]:
        """Every event of the execution in log order (those after offset ``after``), then
        each new one as the fold applies it, until its end event."""
        partition = self.log.partition_for(execution_id)
        if await self.get_execution(execution_id, local=local) is None:
            return  # an unknown id has no events
        seen = [after]  # the last offset sent, shared with the helpers
        while True:
            source = (self._stream_here(execution_id, partition, seen)
                      if self.partitions.folds(partition) else None)
            if source is None:
                if local:
                    raise NotFoldedHereError(partition)
                source = self._stream_at_owner(execution_id, seen)
            async for entry in source:
                yield entry
                if entry.type in _END_TYPES:
                    return

    async def _stream_here(self, execution_id: str, partition: int,
                           seen: list[int]) -> AsyncIterator[HistoryEntry]:
        """The history so far, then the fold's feed, while this process folds it."""
        with self._watch(execution_id) as feed:
            for entry in await self.history(execution_id) or []:
                if entry.offset > seen[0]:
                    seen[0] = entry.offset
                    yield entry
            while self.partitions.folds(partition):
                try:
                    p, offset, event = await asyncio.wait_for(feed.get(), 1.0)
                except TimeoutError:
                    continue
                if offset > seen[0]:
                    seen[0] = offset
                    yield _entry(p, offset, event)

    async def _stream_at_owner(self, execution_id: str,
                               seen: list[int]) -> AsyncIterator[HistoryEntry]:
        """The owner's history, followed by asking again every 250 ms (one round)."""
        for entry in await self.history(execution_id) or []:
            if entry.offset > seen[0]:
                seen[0] = entry.offset
                yield entry
        await asyncio.sleep(0.25)

    async def list_executions(self, *, workflow: str | None = None, status: str | None = None,
                              limit: int = 50, offset: int = 0,
                              partitions: Iterable[int] | None = None,
                              local: bool = False) -> list[ExecutionSummary]:
        """Executions newest first, filtered by workflow and status (see :meth:`list_page`)."""
        page = await self.list_page(workflow=workflow, status=status, limit=limit,
                                    offset=offset, partitions=partitions, local=local)
        return page.executions

    async def list_page(self, *, workflow: str | None = None, status: str | None = None,
                        before: Cursor | None = None, limit: int = 50, offset: int = 0,
                        partitions: Iterable[int] | None = None, local: bool = False) -> Page:
        """A page of executions newest first, across partitions, from just after ``before``.

        The partitions folded here are read from their listing indexes, off the
        event loop; the others are asked of their owners (one request per owner,
        each returning its own page from the same cursor) and the pages merged.
        """
        wanted = set(range(self.log.partitions) if partitions is None else partitions)
        here = sorted(p for p in wanted if self.partitions.folds(p))
        elsewhere = sorted(wanted - set(here))
        if elsewhere and local:
            raise NotFoldedHereError(elsewhere[0])
        views = [v for p in here if (v := await self._local_view(p, None)) is not None]
        pages = [await asyncio.to_thread(list_page, views, status=status, workflow=workflow,
                                         before=before, limit=offset + limit)]
        by_owner: dict[str, list[int]] = {}
        for p in elsewhere:
            card = self.directory.owner(p) if self.directory is not None else None
            by_owner.setdefault(card["worker"] if card else f"?{p}", []).append(p)
        for owned in by_owner.values():
            code, payload = await self._ask(
                owned[0], "/executions", partitions=",".join(map(str, owned)),
                workflow=workflow, status=status, limit=offset + limit,
                before=None if before is None else str(before))
            if code != 200:
                raise OwnerUnavailableError(owned[0], f"answered {code}: {payload}")
            pages.append(Page.from_json(payload))
        merged = merge(pages, offset + limit)
        return Page(merged.executions[offset:], merged.next)


_END_TYPES = {"WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled"}
_MOVED = object()  # the partition stopped being folded here during a wait


def _entry(partition: int, offset: int, event: Event) -> HistoryEntry:
    """A history entry of an event the fold just applied (as ``history_entries`` builds)."""
    return HistoryEntry(partition=partition, offset=offset, event_id=event.event_id,
                        timestamp=event.timestamp, type=event.type, epoch=event.epoch,
                        body=dict(vars(event.body)))
