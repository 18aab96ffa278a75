"""The worker loop: own partitions, fold them, run their executions.

Start-up (``Runtime.start``):
1. Open each owned partition's view and fold it up to the log's high
   watermark (recovery: read the view's next offset, seek there, fold on).
2. Resume every unfinished execution that is queued or running; sleeping ones
   wait for the timer service.
3. Start the fold thread (consume -> fold -> dispatch to the event loop) and
   the timer service.

The fold thread applies each polled batch of a partition in one WriteBatch
and then hands the applied events to the event loop, which starts runners for
new executions and fired timers and passes cancels on. A corrupt record stops
its partition (paused, reported with topic/partition/offset); the others go on.

Reads are read-your-writes: a query waits until the view has folded every
event this process has had acknowledged on that partition.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from pydantic import BaseModel, ValidationError

from engine.bindings import Env, WorkflowBinding
from engine.builder import Worker, WorkflowDef
from engine.clock import Clock
from engine.config import Config
from engine.errors import (
    CorruptEventError,
    InvalidInputError,
    PayloadTooLargeError,
    UnknownWorkflowError,
)
from engine.events import (
    CancelRequested,
    Event,
    TimerFired,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowTriggered,
)
from engine.execution import ExecutionRunner, to_json
from engine.log import EventLog
from engine.models import Execution, ExecutionStatus, HistoryEntry
from engine.timers import TimerService
from engine.view import PartitionView, build_execution, history_entries

logger = logging.getLogger("ploy.runtime")

ID_NAMESPACE = uuid.UUID("6f1c1d1e-9a43-4b8e-9a55-3e1f0c2b7d10")
RUNNABLE = (ExecutionStatus.QUEUED.value, ExecutionStatus.RUNNING.value)


class Runtime:
    """Runs the executions of the partitions this process owns."""

    def __init__(self, worker: Worker, config: Config, log: EventLog, *,
                 clock: Clock | None = None, max_threads: int = 32):
        self.worker, self.config, self.log = worker, config, log
        self.clock = clock or Clock()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.env = Env({
            name: WorkflowBinding(self, name, binding.name)
            for name, binding in config.workflow.items()
        })
        self.views: dict[int, PartitionView] = {}
        self.epochs: dict[int, int] = {}
        self.stalled: dict[int, CorruptEventError] = {}
        self.runners: dict[str, ExecutionRunner] = {}
        self.pool = ThreadPoolExecutor(max_threads, thread_name_prefix="ploy-step")
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._resume_after: set[str] = set()
        self._waiters: dict[int, list[tuple[int, asyncio.Future[None]]]] = {}
        self._fold_stop = threading.Event()
        self._fold_thread: threading.Thread | None = None
        self._consumer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.timers = TimerService(self)

    @property
    def state_path(self) -> Path:
        return Path(self.config.state_dir) / self.log.topic

    # -- start and stop ---------------------------------------------------------

    async def start(self) -> None:
        """Catch up, resume unfinished executions, then follow the log (see module doc)."""
        self._loop = asyncio.get_running_loop()
        partitions = list(range(self.log.partitions))
        # Step 1. Open and catch up every partition (a single worker owns them all).
        for p in partitions:
            self.views[p] = PartitionView(self.state_path / f"p{p}", self.log.topic, p,
                                          self.log.codec)
            self.epochs[p] = 0
            self._waiters[p] = []
        await asyncio.to_thread(self._catch_up)
        self._consumer = self.log.consumer(group_id=f"{self.log.topic}.worker")
        self._consumer.assign([
            TopicPartition(self.log.topic, p, self.views[p].next_offset)
            for p in partitions if p not in self.stalled
        ])
        # Step 2. Resume what was running when the last worker stopped.
        for view in self.views.values():
            for eid in view.active():
                self._maybe_start(eid)
        # Step 3. Follow the log.
        self._fold_thread = threading.Thread(target=self._fold_loop, name="ploy-fold",
                                             daemon=True)
        self._fold_thread.start()
        self.timers.start()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop starting steps, let running ones finish (up to ``grace_s``), release all."""
        self.stopping = True
        await self.timers.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        self._fold_stop.set()
        if self._fold_thread is not None:
            await asyncio.to_thread(self._fold_thread.join, 5)
        if self._consumer is not None:
            self._consumer.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for view in self.views.values():
            view.close()
        self.views.clear()

    # -- folding ----------------------------------------------------------------

    def _poll(self, timeout_s: float) -> dict[int, list[tuple[int, bytes]]]:
        by_partition: dict[int, list[tuple[int, bytes]]] = {}
        for msg in self._consumer.consume(5000, timeout_s):
            if msg.error() is not None:
                logger.warning("consumer: %s", msg.error())
                continue
            by_partition.setdefault(msg.partition(), []).append((msg.offset(), msg.value()))
        return by_partition

    def _fold(self, partition: int, records: list[tuple[int, bytes]]) -> list[tuple[int, Event]]:
        view = self.views.get(partition)
        if view is None or partition in self.stalled:
            return []
        applied, failure = view.apply(records)
        if failure is not None:
            self.stalled[partition] = failure
            if self._consumer is not None:
                self._consumer.pause([TopicPartition(self.log.topic, partition)])
            logger.error("%s", failure)
        return applied

    def _catch_up(self) -> None:
        """Fold every owned partition up to the end of the log."""
        start = {p: view.next_offset for p, view in self.views.items()}
        stopped = set(self.stalled)
        for batches in self.log.read_until_end(start, stopped=stopped):
            for p, records in batches.items():
                self._fold(p, records)
            stopped.update(self.stalled)

    def _fold_loop(self) -> None:
        assert self._loop is not None
        while not self._fold_stop.is_set():
            try:
                batches = self._poll(0.05)
            except Exception:  # a closed consumer at shutdown
                if self._fold_stop.is_set():
                    return
                raise
            for p, records in batches.items():
                applied = self._fold(p, records)
                self._loop.call_soon_threadsafe(self._on_folded, p, applied)

    def _on_folded(self, partition: int, applied: list[tuple[int, Event]]) -> None:
        """On the event loop: react to what the fold applied, wake waiting readers."""
        for _, event in applied:
            body = event.body
            if isinstance(body, WorkflowTriggered | TimerFired):
                self._maybe_start(event.execution_id)
            elif isinstance(body, CancelRequested):
                self._on_cancel(event.execution_id)
        view = self.views.get(partition)
        waiters = self._waiters.get(partition, [])
        if view is None or not waiters:
            return
        still = []
        for target, future in waiters:
            if view.next_offset > target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._waiters[partition] = still

    # -- running executions --------------------------------------------------------

    def _maybe_start(self, eid: str) -> None:
        if self.stopping:
            return
        if eid in self.runners:
            self._resume_after.add(eid)  # a timer fired while the runner winds down
            return
        view = self.views[self.log.partition_for(eid)]
        record = view.record(eid)
        if record is None or record["status"] not in RUNNABLE:
            return
        workflow = self.worker.workflow(record["workflow"])
        if workflow is None:
            self._fail_unknown(record)
            return
        runner = ExecutionRunner(self, record, view.steps(eid), workflow)
        self.runners[eid] = runner
        task = asyncio.create_task(self._drive(runner), name=f"ploy-exec-{eid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, runner: ExecutionRunner) -> None:
        try:
            await runner.run()
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
            runner.cancel_requested.set()
            return
        record = self.views[self.log.partition_for(eid)].record(eid)
        if record is not None and record["status"] == ExecutionStatus.CANCELLED.value:
            self.log.append_nowait(Event(eid, record["workflow"], self.clock.now(),
                                         WorkflowCancelled(record.get("cancel_reason")),
                                         epoch=self.epoch_of(eid)))

    def epoch_of(self, eid: str) -> int:
        """The epoch this process writes with on ``eid``'s partition."""
        return self.epochs.get(self.log.partition_for(eid), 0)

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
        """
        wf = self._workflow(workflow)
        # Step 1.
        text = self._input_json(wf, input)
        # Step 2.
        if idempotency_key is None:
            eid = uuid.uuid4().hex
        else:
            eid = uuid.uuid5(ID_NAMESPACE, f"{workflow}\x00{idempotency_key}").hex
            # Step 3.
            if await self._record(eid) is not None:
                return eid
        # Step 4.
        await self.log.append(Event(eid, workflow, self.clock.now(),
                                    WorkflowTriggered(text, idempotency_key),
                                    epoch=self.epoch_of(eid)))
        return eid

    def _input_json(self, wf: WorkflowDef, input: Any) -> str:
        if wf.input is not None:
            try:
                if isinstance(input, BaseModel) and not isinstance(input, wf.input):
                    input = input.model_dump()
                model = input if isinstance(input, wf.input) else wf.input.model_validate(input)
            except ValidationError as exc:
                raise InvalidInputError(wf.name, json.loads(exc.json(include_url=False))) from None
            text = model.model_dump_json()
        else:
            text = to_json(input, f"the input of workflow '{wf.name}'")
        if len(text) > self.config.max_payload_bytes:
            raise PayloadTooLargeError("workflow input", len(text), self.config.max_payload_bytes)
        return text

    async def _caught_up(self, partition: int, timeout_s: float = 10.0) -> PartitionView | None:
        """The partition's view once it holds every event this process had acknowledged."""
        view = self.views.get(partition)
        if view is None:
            return None
        target = self.log.high_acked.get(partition, -1)
        if view.next_offset > target or partition in self.stalled:
            return view
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[partition].append((target, future))
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            logger.warning("partition %d: view still behind offset %d after %g s",
                           partition, target, timeout_s)
        return view

    async def _record(self, eid: str) -> dict[str, Any] | None:
        view = await self._caught_up(self.log.partition_for(eid))
        return None if view is None else view.record(eid)

    async def get_execution(self, execution_id: str) -> Execution | None:
        """The execution as the view has it, or None for an unknown id."""
        view = await self._caught_up(self.log.partition_for(execution_id))
        return None if view is None else build_execution(view, execution_id)

    async def history(self, execution_id: str) -> list[HistoryEntry] | None:
        """Every event of the execution with its partition and offset (the audit trail)."""
        view = await self._caught_up(self.log.partition_for(execution_id))
        if view is None or view.record(execution_id) is None:
            return None
        return history_entries(view, execution_id)

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

    async def list_executions(self, *, workflow: str | None = None, status: str | None = None,
                              limit: int = 50, offset: int = 0) -> list[Execution]:
        """Executions newest first, filtered by workflow and status."""
        for p in list(self.views):
            await self._caught_up(p)
        found: list[Execution] = []
        skipped = 0
        for _, eid, view in self._newest():
            record = view.record(eid)
            if record is None or (workflow and record["workflow"] != workflow) or (
                    status and record["status"] != status):
                continue
            if skipped < offset:
                skipped += 1
                continue
            execution = build_execution(view, eid)
            if execution is not None:
                found.append(execution)
            if len(found) >= limit:
                break
        return found

    def _newest(self) -> Iterator[tuple[int, str, PartitionView]]:
        """(created_at, id, view) across every owned partition, newest first."""
        streams = [_newest_of(view) for view in self.views.values()]
        for neg, eid, view in heapq.merge(*streams, key=lambda t: (t[0], t[1])):
            yield -neg, eid, view


def _newest_of(view: PartitionView) -> Iterator[tuple[int, str, PartitionView]]:
    for created, eid in view.newest():
        yield -created, eid, view
