"""The worker loop: run the executions of the partitions this process owns, answer queries.

Three concerns, each in its module, meet here:
- ``engine.partitions``: the views and the fold thread (which partitions are
  folded, read-your-writes, corrupt records);
- ``engine.ownership``: which partitions this process runs (the consumer
  group, claims on the log, planned handoffs, the lease after a freeze);
- this module: the runners of those partitions' executions (start on a
  trigger, a fired timer or a claim; resume after a failed append; cancel) and
  the writes of the client API (trigger, cancel, skip);
- ``engine.queries``: its reads (get, history, list, wait for the end, stream),
  here or at the partition's owner.

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
import contextvars
import dataclasses
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import (
    Callable,
    Coroutine,
)
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engine import erasure, payloads, waits
from engine.bindings import Env, WorkflowBinding
from engine.builder import Worker, WorkflowDef
from engine.clock import Clock
from engine.config import Config
from engine.directory import Directory
from engine.errors import (
    AppendError,
    CorruptEventError,
    InvalidInputError,
    InvalidKeyError,
    NotStalledError,
    PartitionStalledError,
    PayloadTooDeepError,
    SerializationError,
    StepNotResolvableError,
    UnknownExecutionError,
    UnknownWorkflowError,
)
from engine.events import (
    CancelRequested,
    Event,
    EventSent,
    RecordSkipped,
    StepResolved,
    SubjectErased,
    TimerFired,
    WaitStarted,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
    claim_id,
    new_execution_id,
)
from engine.execution import (
    CHILD_ENDED,
    ExecutionRunner,
    Outcome,
    check_event_type,
    to_json,
)
from engine.flow import FlowControl
from engine.fold import new_execution
from engine.ingress import Ingress
from engine.log import EventLog
from engine.metrics import Metrics
from engine.models import ExecutionStatus
from engine.ownership import Ownership
from engine.partitions import Applied, Partitions
from engine.queries import ENDS, ChangeFeed, Queries, Seen
from engine.schedules import Scheduler
from engine.threads import StepThreads
from engine.timers import TimerSchedule
from engine.tracing import Tracing
from engine.view import PartitionView

logger = logging.getLogger("ploy.runtime")
user_log = logging.getLogger("ploy.workflow")  # what the terminal of `ploy dev` shows

ID_NAMESPACE = uuid.UUID("6f1c1d1e-9a43-4b8e-9a55-3e1f0c2b7d10")
RUNNABLE = (ExecutionStatus.QUEUED.value, ExecutionStatus.RUNNING.value)
RESERVED_EVENT_PREFIX = "ploy."  # event types only the engine sends (CHILD_ENDED)
# TimerFired appends unanswered up to which a sleep wakes before its acknowledgement.
# Beyond, many are due at once and the loop, not the round trip, is what they wait for:
# waking on the acknowledgement costs less. engine.bench sleepers (10,000 due at once),
# alternating with the code before early wakes: every one woken early, 4.5-5.9 s against
# 3.7-5.4 s; with this bound (and one wake-up of the loop per batch), 3.5-4.5 against
# 3.4-4.8 s.
WAKE_EARLY_AT_MOST = 8


class Runtime(Queries):
    """Runs the executions of the partitions this process owns; answers for any
    (the queries, result waiters and event streams are in ``engine.queries``)."""

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
        }, self)
        self.runners: dict[str, ExecutionRunner] = {}
        self.key_store = erasure.KeyStore(config.key_dir)  # data subjects' keys
        self.threads = StepThreads(max_threads)
        self.stopping = False
        self.partitions = Partitions(log, self.state_path, self._on_applied,
                                     config.retention_ms)
        self.ownership = Ownership(
            log, self.partitions, worker_id=self.worker_id, group_id=config.kafka.group_id,
            clock=self.clock, spawn=self._spawn, running_on=self._running_on,
            resume=self._resume, standby=self.replica, instance_id=instance_id)
        self.directory: Directory | None = None
        self.timers = TimerSchedule(self.clock, self._fire_timer, self.may_run)
        self.schedules = Scheduler(self)
        self.metrics = Metrics()
        self.tracing = Tracing(config.otel)
        self.flow = FlowControl(config, log.partition_for, self._maybe_start, self._explain_wait,
                                supersede=self._supersede, clock=self.clock,
                                keys=self.key_store)
        self._timed: frozenset[int] = frozenset()  # partitions whose timers are scheduled
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start
        # Who waits on an execution's events (a result, a stream): fed by the fold.
        self._watchers: dict[str, list[asyncio.Queue[Seen]]] = {}
        self._end_watchers: dict[str, list[asyncio.Queue[Seen]]] = {}  # result waiters
        self._listers: list[ChangeFeed] = []  # live lists (queries.Queries.changes)
        self._resume_after: set[str] = set()
        self._started_on_ack: set[str] = set()  # triggered here; skip its WorkflowTriggered
        self._fired_here: set[tuple[str, str]] = set()  # woken here; skip its TimerFired
        self._firings = 0  # TimerFired appends handed over, not answered yet (on the loop)
        self._fired: list[_Firing] = []  # handed over by the alarm thread, for the loop
        self._fired_lock = threading.Lock()
        # Execution -> the last offset a run of it here had acknowledged, while the view
        # may not hold it yet (None: a run that stopped with appends unanswered, or whose
        # last were ones nobody waits for). A replay waits for that fold, so that it
        # never runs a completed step again.
        self._appended_to: dict[str, int | None] = {}
        self._deferred: set[str] = set()  # starts waiting for that fold (one each)
        self.ingress = Ingress(self._start_held)  # a burst of triggers is answered first

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
        self._loop = asyncio.get_running_loop()
        everything = range(self.log.partitions)
        single = self.runs and not self.scale_out
        # Step 1.
        self.partitions.open()
        folded = everything if single or self.replica else ()
        # Step 2.
        await self.partitions.start(folded, alone=single)
        if not single:
            self.directory = Directory(self.log, self.worker_id, self.config.http.admin_token)
            await asyncio.to_thread(self.directory.start)
        # Step 3.
        self.ownership.on_change(self._ownership_changed)
        if single:
            self.ownership.start_single()
        elif self.runs:
            self.ownership.on_change(lambda owned: self._publish())
            self.ownership.start_group()
        if self.runs:
            self.timers.start()
            self.schedules.start()
        self._spawn(self.partitions.watch_stalled(lambda: self.stopping), "ploy-watch-stalled")

    def _ownership_changed(self, owned: frozenset[int]) -> None:
        """The timer schedule follows ownership (load what is new, drop what left), and
        what this process noted of its runs on partitions it no longer owns is gone."""
        for p in sorted(owned - self._timed):
            self.timers.load(p, self.views[p])
        for p in sorted(self._timed - owned):
            self.timers.drop(p)
        self._timed = owned
        for eid in [e for e in self._appended_to if self.log.partition_for(e) not in owned]:
            del self._appended_to[eid]  # its next owner replays it from its own view

    def _fire_timer(self, eid: str, workflow: str, sleep_key: str, wake_at: int,
                    partition: int, done: Callable[[BaseException | None], None]) -> None:
        """From the alarm thread (``engine.timers``): append ``TimerFired`` now.

        The event loop replays a plain sleep's execution as the append goes out
        (``_wake_fired``), and its sleep returns once the append is acknowledged and
        the view holds what the log has before it (``_settle_woken``). Any other (a
        wait's timeout, which races its event on the log; many due at once) resumes
        once the append is acknowledged, from the view as of right before it
        (``_resume_acked``). Either way the fold's ``TimerFired`` then starts nothing;
        if the fetch's fold got there first, it started it."""
        loop = self._loop
        assert loop is not None
        event = Event(eid, workflow, self.clock.now(), TimerFired(sleep_key, wake_at),
                      epoch=self.ownership.epoch_of(partition))
        firing = _Firing(event, partition)

        def acked(error: AppendError | None, offset: int) -> None:
            self._firings -= 1
            firing.acked = (error, offset)
            try:
                if error is None:
                    self.tracing.slept(self.views.get(partition), eid, workflow, sleep_key,
                                       self.clock.now())
                if firing.woken is not None:
                    if error is not None:  # its run stops; the next firing's fold may start it
                        self._fired_here.discard((eid, sleep_key))
                    self._settle_woken(firing, error, offset)
                elif firing.looked and error is None:
                    self._resume_acked(firing, offset)
            finally:
                done(error)  # (an error: the schedule tries again)

        self.log.append_from_thread(event, loop, acked)  # (it raises: tried again, too)
        with self._fired_lock:  # one wake-up of the loop for the firings of one moment
            self._fired.append(firing)
            if len(self._fired) > 1:
                return
        loop.call_soon_threadsafe(self._wake_all_fired)

    def _wake_all_fired(self) -> None:
        with self._fired_lock:
            fired, self._fired = self._fired, []
        self._firings += len(fired)
        for firing in fired:
            try:
                self._wake_fired(firing)
            except Exception:  # (its acknowledgement resumes it)
                logger.exception("waking execution %s", firing.event.execution_id)

    def _wake_fired(self, firing: _Firing) -> None:
        """Replay a plain sleep's execution from its view as its ``TimerFired`` goes out,
        while the firing makes its round trip (see ``_fire_timer``). Only if the view
        holds the run's own earlier appends, as for a start (``_maybe_start``); in any
        doubt the acknowledgement resumes it."""
        firing.looked = True
        if firing.acked is not None:  # acknowledged already (rare): resumed as acknowledged
            error, offset = firing.acked
            if error is None:
                self._resume_acked(firing, offset)
            return
        if self._firings > WAKE_EARLY_AT_MOST:
            return  # many due at once: each resumes on its acknowledgement
        eid, partition = firing.event.execution_id, firing.partition
        view = self.views.get(partition)
        if view is None or not self._may_resume(eid, partition):
            return
        mark = self._appended_to.get(eid, -1)
        if mark is not None and view.next_offset > mark:  # (else the ack path waits for it)
            self._resume_timed(view, firing)

    def _settle_woken(self, firing: _Firing, error: AppendError | None, offset: int) -> None:
        """Answer the runner a firing woke: its sleep returns once the view holds what the
        log has before the firing (a cancel written first has reached the runner then)."""
        woken, partition = firing.woken, firing.partition
        assert woken is not None
        view = self.views.get(partition)
        if error is not None or view is None or view.next_offset >= offset:
            _settle(woken, error, partition, offset)
            return

        async def when_folded() -> None:
            try:
                with contextlib.suppress(TimeoutError):  # (a stalled or lost partition)
                    await self.partitions.folded(partition, offset - 1)
            finally:  # (cancelled too, at a stop: the runner must not wait for ever)
                view = self.views.get(partition)
                folded = view is not None and view.next_offset >= offset
                _settle(woken, None if folded else AppendError(
                    self.log.topic, f"partition {partition} is not folded up to the firing "
                    f"at offset {offset}"), partition, offset)

        self._spawn(when_folded(), f"ploy-woken-{firing.event.execution_id}")

    def _resume_acked(self, firing: _Firing, offset: int) -> None:
        """A fired timer ``_wake_fired`` did not wake: resume it from the view as of right
        before its ``TimerFired``, unless the fold got there first (and started it)."""
        view = self.views.get(firing.partition)
        if view is None or view.next_offset > offset:
            return
        if view.next_offset < offset:  # the view lacks records before it: once it has them
            eid = firing.event.execution_id
            self._spawn(self._resume_folded(firing, offset), f"ploy-woke-{eid}")
        elif self._may_resume(firing.event.execution_id, firing.partition):
            self._resume_timed(view, firing, acked=True)

    async def _resume_folded(self, firing: _Firing, offset: int) -> None:
        await self.partitions.folded(firing.partition, offset - 1)
        self._resume_acked(firing, offset)  # (the view is as of right before it, or past it)

    def _may_resume(self, eid: str, partition: int) -> bool:
        return not (self.stopping or eid in self.runners or not self.may_run(partition)
                    or partition in self.stalled)

    def _resume_timed(self, view: PartitionView, firing: _Firing, acked: bool = False) -> None:
        """Start the runner of an execution whose sleep (or wait, once ``acked``) this
        process fired, from ``view`` plus that firing: acknowledged, or on its way (then
        the runner follows it)."""
        eid = firing.event.execution_id
        body = firing.event.body
        assert isinstance(body, TimerFired)
        record = view.record(eid)
        if record is None:
            return
        opened = waits.open_waits(record)
        if record["sleeping_on"] != body.sleep and (not acked or body.sleep not in opened):
            return  # cancelled meanwhile, or an event came first (a wait's timeout races
            # its event: on the log, not before)
        if [w for w in opened if w != body.sleep]:
            return  # parallel waits: it runs once the fold has ended the last of them
        workflow = self.worker.workflow(record["workflow"])
        if workflow is None:
            return
        steps = view.steps(eid)
        for step in steps:
            if step["key"] == body.sleep and step["kind"] == "sleep":
                step["status"] = ExecutionStatus.COMPLETED.value
            elif step["key"] == body.sleep and step["kind"] in waits.WAIT_KINDS:
                step["status"] = waits.TIMED_OUT
        after = None
        if not acked:
            assert self._loop is not None
            firing.woken = self._loop.create_future()
            after = (firing.woken, body)
        self._fired_here.add((eid, body.sleep))
        self._run_recorded(view, record, workflow, steps, after)

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
        await self.schedules.stop()
        await self.timers.stop()
        self.flow.stop()
        self.ingress.stop()
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
        if self.tracing.tracer is not None and partition in self.owned:
            self._trace_waits(partition, applied)
        self.metrics.observe(applied)
        self._tell_listers(applied)
        for offset, event in applied:
            if self._appended_to:
                self._folded_to(event.execution_id, offset, event)
            watchers = self._watchers.get(event.execution_id)
            if watchers:
                for queue in watchers:
                    queue.put_nowait((partition, offset, event))
            if isinstance(event.body, ENDS):
                for queue in self._end_watchers.get(event.execution_id, ()):
                    queue.put_nowait((partition, offset, event))
            self._tell_flow(partition, offset, event)
            self._act_on(partition, event)

    def _act_on(self, partition: int, event: Event) -> None:
        """Start what an applied event made runnable; pass a cancel or a resolution on."""
        body, eid = event.body, event.execution_id
        if isinstance(body, WorkflowTriggered):
            if eid in self._started_on_ack:
                self._started_on_ack.discard(eid)  # trigger() started it
            elif not self.ingress.hold(eid):  # (a burst of triggers: once it is answered)
                self._maybe_start(eid)
        elif isinstance(body, TimerFired) and (eid, body.sleep) in self._fired_here:
            self._fired_here.discard((eid, body.sleep))  # woken on its ack
        elif isinstance(body, TimerFired | WaitStarted | EventSent):
            self._maybe_start(eid)  # (a wait its event ended: runnable)
        elif isinstance(body, CancelRequested):
            self._on_cancel(eid)
        elif isinstance(body, StepResolved):
            self._on_resolved(partition, eid, body)

    def _tell_flow(self, partition: int, offset: int, event: Event) -> None:
        """Flow control follows the fold: slots freed by ends, starts for rates, triggers
        for debounce (``engine.flow``)."""
        body = event.body
        if isinstance(body, WorkflowCompleted | WorkflowFailed | WorkflowCancelled
                      | CancelRequested):
            self.flow.release(partition, event.execution_id,
                              queued_only=isinstance(body, CancelRequested))
        if isinstance(body, WorkflowStarted):
            self.flow.started(partition, event.execution_id, event.timestamp)  # rates
        elif isinstance(body, WorkflowTriggered) and partition in self.owned:
            self.flow.triggered(partition, self.ownership.epoch_of(partition),
                                self.views[partition], offset, event.execution_id)

    def _trace_waits(self, partition: int, applied: Applied) -> None:
        """The spans of the waits the fold ended (an event received, a timeout), once."""
        for eid in dict.fromkeys(e.execution_id for _, e in applied
                                 if isinstance(e.body, TimerFired | WaitStarted | EventSent)):
            self.tracing.waited(self.views.get(partition), eid)

    def _on_resolved(self, partition: int, eid: str, body: StepResolved) -> None:
        """Pass an operator's action the fold took on to the step's runner, if it runs here
        (else the next replay reads it from the view)."""
        runner = self.runners.get(eid)
        if runner is None:
            return
        step = self.views[partition].step(eid, body.step)
        resolved = None if step is None else step.get("resolved")
        if resolved is not None and resolved["action"] == body.action and (
                body.action != "complete" or step["output"] == body.output):  # type: ignore[index]
            runner.resolve(body.step, body.action, body.output)

    def _resume(self, partition: int) -> None:
        """Start every unfinished execution of a partition this process now runs
        (sleeping ones wait for their timers), and finish the cancels whose children or
        parent were not told yet (a crash came between the cancel and its end)."""
        view = self.views[partition]
        for eid in view.active():
            self._maybe_start(eid)
        for eid in view.owed():
            record = view.record(eid)
            if record is not None and eid not in self.runners:
                end = WorkflowCancelled(record.get("cancel_reason"))
                self._spawn(self.record_end(record, end), f"ploy-end-{eid}")

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
                "events": view.event_stats() if folded else None,
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
        target = self._appended_to.get(eid, -1)
        if target is None:  # a run cut short: what this process had acknowledged there,
            target = self.log.high_acked.get(partition, -1)  # fixed now (not chased)
            self._appended_to[eid] = target
        if view.next_offset <= target:
            # The view lacks events of this execution that this process has had
            # acknowledged (a run that just ended, say): replaying from it could run a
            # completed step again. Only its own: other executions' acknowledgements,
            # ahead of the fold under load, are no reason to wait.
            if eid not in self._deferred:
                self._deferred.add(eid)
                self._spawn(self._start_when_folded(eid, partition, target),
                            f"ploy-wait-{eid}")
            return
        if eid in self._appended_to:
            del self._appended_to[eid]  # (the view holds it)
        record = view.record(eid)
        if record is None or record["status"] not in RUNNABLE or record.get("held"):
            return  # held: a rerun whose copy of its source is being appended (engine.rerun)
        workflow = self.worker.workflow(record["workflow"])
        if workflow is None:
            self._fail_unknown(record)
            return
        if not self.flow.admit(partition, self.ownership.epoch_of(partition), view, record):
            return  # queued behind a flow control (engine.flow): started on a release/wake
        # Only its trigger folded (a new execution, a held start): no steps to read.
        steps = view.steps(eid) if record["events"] > 1 else []
        self._run_recorded(view, record, workflow, steps)

    def _start_held(self, eid: str) -> None:
        """Start an execution held during a burst of triggers (``engine.ingress``), unless
        something started it meanwhile (a partition claimed, a flow control's release)."""
        if eid not in self.runners:
            self._maybe_start(eid)

    def _run_recorded(self, view: PartitionView, record: dict[str, Any], workflow: WorkflowDef,
                      steps: list[dict[str, Any]],
                      after: tuple[asyncio.Future[tuple[int, int]], TimerFired] | None = None
                      ) -> None:
        """Run an execution from what ``view`` recorded of it (its steps, its log positions);
        ``after``: a firing on its way, which the run follows."""
        logged = view.log_positions(record["id"]) if record["logs"] else []
        self._run(ExecutionRunner(self, record, steps, workflow, logged, after=after))

    async def _start_when_folded(self, eid: str, partition: int, offset: int) -> None:
        try:
            await self.partitions.folded(partition, offset)
        except TimeoutError:  # (a stalled or lost partition: _maybe_start says no)
            logger.warning("execution %s waits for partition %d's view to reach offset %d",
                           eid, partition, offset)
        finally:
            self._deferred.discard(eid)
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
            self._appended(runner.id, runner.acked_to if runner.settled else None)
            if runner.id in self._resume_after:
                self._resume_after.discard(runner.id)
                self._maybe_start(runner.id)

    def _appended(self, eid: str, offset: int | None) -> None:
        """Note the last offset a run of ``eid`` (or an end or a resolution the runtime
        wrote) had acknowledged; None: the run's last appends are not all known to be
        acknowledged (a replay then waits for all this process had acknowledged on the
        partition by then)."""
        partition = self.log.partition_for(eid)
        if partition not in self.owned:
            self._appended_to.pop(eid, None)  # its next owner replays it from its view
            return
        if offset is None:
            record = self.views[partition].record(eid)  # (rare: a run cut short)
            if record is None or ExecutionStatus(record["status"]).terminal:
                self._appended_to.pop(eid, None)  # ended: nothing replays it
            else:
                self._appended_to[eid] = None  # forgotten when its end is folded
            return
        known = self._appended_to.get(eid)
        if known is not None and known > offset:
            offset = known  # the end a cancelled run had the runtime write
        view = self.views.get(partition)
        if view is None or view.next_offset > offset:
            self._appended_to.pop(eid, None)  # the view holds it already
        else:
            self._appended_to[eid] = offset

    def _folded_to(self, eid: str, offset: int, event: Event) -> None:
        """The fold applied ``event`` of ``eid`` at ``offset``: a replay need not wait for
        what it had acknowledged up to there, nor for anything once it ended."""
        known = self._appended_to.get(eid, -1)
        if (known is not None and 0 <= known <= offset) or (
                eid in self._appended_to and isinstance(event.body, ENDS)):
            del self._appended_to[eid]

    def _explain_wait(self, eid: str, workflow: str, text: str, position: str) -> None:
        """Record on a queued execution why it waits (engine.flow), as a log line."""
        self.log.append_nowait(Event(eid, workflow, self.clock.now(),
                                     WorkflowLog("info", text, None, position),
                                     epoch=self.epoch_of(eid)))

    def _supersede(self, eid: str, reason: str) -> None:
        """End a debounced execution a later trigger superseded (engine.debounce)."""
        record = self.views[self.log.partition_for(eid)].record(eid)
        if (record is not None and record["status"] == ExecutionStatus.QUEUED.value
                and not self.stopping):  # else the next owner decides it again
            user_log.info("[%s %s] cancelled: %s", record["workflow"], eid, reason,
                          extra={"ended_execution": eid})
            self._spawn(self.record_end(record, WorkflowCancelled(reason)), f"ploy-end-{eid}")

    def _fail_unknown(self, record: dict[str, Any]) -> None:
        error = UnknownWorkflowError(record["workflow"], list(self.worker.workflows))
        end = WorkflowFailed(type(error).__name__, str(error), "")
        self._spawn(self.record_end(record, end), f"ploy-end-{record['id']}")

    def _on_cancel(self, eid: str) -> None:
        partition = self.log.partition_for(eid)
        runner = self.runners.get(eid)
        if runner is not None:
            cancelled = self.views[runner.partition].record(eid) or {}
            runner.cancel_reason = cancelled.get("cancel_reason")
            runner.cancel_requested.set()  # its end cancels its children and tells its parent
            return
        if partition not in self.owned:
            return  # its owner records the end
        record = self.views[partition].record(eid)
        if record is not None and record["status"] == ExecutionStatus.CANCELLED.value:
            user_log.warning("[%s %s] cancelled: %s", record["workflow"], eid,
                             record.get("cancel_reason") or "no reason given",
                             extra={"ended_execution": eid})  # the ploy dev terminal shows it
            end = WorkflowCancelled(record.get("cancel_reason"))
            self._spawn(self.record_end(record, end), f"ploy-end-{eid}")

    # -- the client API (bindings, HTTP, CLI) -----------------------------------------

    def _workflow(self, name: str) -> WorkflowDef:
        workflow = self.worker.workflow(name)
        if workflow is None:
            raise UnknownWorkflowError(name, list(self.worker.workflows))
        return workflow

    async def trigger(self, workflow: str, input: Any, *,
                      idempotency_key: str | None = None, subject: str | None = None) -> str:
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
           first, it has started it already. A lone trigger starts it as it goes
           out, ahead of the acknowledgement (``_append_trigger``).

        With a ``subject`` the input is sealed with that subject's key (created on
        its first trigger) before step 4, and so is every payload the execution
        records (``engine.erasure``). During a burst of triggers, and while what it
        held is being started, step 5 is left to the fold, which holds the start until
        the burst is answered and starts it in log order (``engine.ingress``).
        """
        self.ingress.enter()
        try:
            return await self._trigger(workflow, input, idempotency_key, subject)
        finally:
            self.ingress.leave()

    async def _trigger(self, workflow: str, input: Any, idempotency_key: str | None,
                       subject: str | None) -> str:
        wf = self._workflow(workflow)
        # Step 1.
        text = self._input_json(wf, input)
        if idempotency_key is not None:
            payloads.check_key(idempotency_key)
        if subject is not None:
            erasure.check_subject(subject)
        # Step 2.
        if idempotency_key is None:
            eid = self.flow.place(workflow, text, new_execution_id())
        else:
            eid = uuid.uuid5(ID_NAMESPACE, f"{workflow}\x00{idempotency_key}").hex
            eid = self.flow.place(workflow, text, eid)  # a limited workflow: its key's partition
            # Step 3.
            if await self._record(eid) is not None:
                return eid
        # Step 4.
        stalled = self.stalled.get(self.log.partition_for(eid))
        if stalled is not None:  # accepted, it would vanish: nothing folds there
            raise PartitionStalledError(self.log.topic, stalled.partition, stalled.offset)
        if subject is not None:
            payloads.check(text, "workflow input",
                           erasure.plaintext_limit(self.config.max_payload_bytes))
            key = await asyncio.to_thread(self.key_store.ensure, subject)
            text = erasure.seal(key, subject, eid, text)
        body = WorkflowTriggered(text, idempotency_key, subject=subject)
        await self._append_trigger(wf, eid, body, ahead=self.ingress.lone)
        return eid

    async def _append_trigger(self, wf: WorkflowDef, eid: str, body: WorkflowTriggered, *,
                              ahead: bool = False) -> None:
        """Steps 4 and 5 of :meth:`trigger`.

        ``ahead`` (a lone trigger, ``Ingress.lone``) and a workflow with no flow
        control: the execution starts as the trigger goes out, not on its
        acknowledgement. Meanwhile the handler runs its replayable code, which nothing
        outside sees, up to its first step, durable wait or end; its runner follows
        the trigger (``after``): nothing of the run is written, and no step's function
        runs, before the trigger is acknowledged, and if it is refused the run ends
        there. A wait's time counts from the handler's call, as always. Flow control
        decides on the acknowledgement; so does a burst (the ingress), and a child.
        """
        caller = contextvars.copy_context()  # the runner's, not the trigger span's
        with self.tracing.trigger(wf.name, eid, body.trace_parent) as trace_parent:
            body = dataclasses.replace(body, trace_parent=trace_parent)  # engine.tracing
            event = Event(eid, wf.name, self.clock.now(), body, epoch=self.epoch_of(eid))
            partition = self.log.partition_for(eid)
            drawn = body.idempotency_key is None and body.parent_id is None
            if (not ahead or not self._may_start_new(eid, partition, drawn)
                    or self.flow.rules_of(wf.name) is not None):
                partition, offset = await self.log.append(event)
                caller.run(self._start_acked, wf, event, body, partition, offset)
                return
            sent = self.log.send(event)
            runner = ExecutionRunner(self, new_execution(event, body, partition), [], wf,
                                     after=(sent, body))
            self._started_on_ack.add(eid)
            sent.add_done_callback(functools.partial(self._trigger_answered, eid))
            caller.run(self._run, runner)
            await asyncio.shield(sent)

    def _trigger_answered(self, eid: str, sent: asyncio.Future[tuple[int, int]]) -> None:
        """A trigger whose execution started ahead of it was refused: its run ends at its
        first wait, and no fold of it will come to take the mark off (whoever waited)."""
        if sent.cancelled() or sent.exception() is not None:
            self._started_on_ack.discard(eid)

    def _may_start_new(self, eid: str, partition: int, drawn: bool = False) -> bool:
        """Whether this process starts a new execution it triggers (else the fold does).
        ``drawn``: an id just drawn at random, which no view can hold yet (no reads)."""
        view = self.views.get(partition)
        return (view is not None and partition in self.owned and partition not in self.stalled
                and not self.stopping and not self.ingress.holding and eid not in self.runners
                and eid not in self._started_on_ack
                and (drawn or (view.record(eid) is None
                               and not view.gone(eid))))  # gone: retention

    def _start_acked(self, wf: WorkflowDef, event: Event, body: WorkflowTriggered,
                     partition: int, offset: int) -> None:
        """Start a new execution on its trigger's acknowledgement, unless the fold got
        there first, or flow control holds it back."""
        view = self.views.get(partition)
        if view is not None and view.next_offset <= offset and self._may_start_new(
                event.execution_id, partition):
            record = new_execution(event, body, partition)
            if self.flow.admit(partition, self.ownership.epoch_of(partition), view, record):
                self._started_on_ack.add(event.execution_id)
                self._run(ExecutionRunner(self, record, [], wf))

    # -- child executions and events for waiting executions ------------------------------

    @staticmethod
    def child_id(parent_id: str, step_key: str) -> str:
        """The id of the child ``step_key`` of ``parent_id`` starts: the same on every replay."""
        return uuid.uuid5(ID_NAMESPACE, f"{parent_id}\x00child\x00{step_key}").hex

    async def trigger_child(self, workflow: str, input: Any, child_id: str, parent_id: str,
                            parent_step: str, subject: str | None = None) -> str:
        """Start the child of a ``ctx.step.invoke`` (a second trigger of its id changes
        nothing: the fold keeps the first); it inherits its parent's ``subject``. Returns
        the child's id: ``child_id``, or under the child workflow's flow control the id
        placed on its key's partition (a function of ``child_id`` and the input, so a
        replay names the same child)."""
        wf = self._workflow(workflow)
        text = self._input_json(wf, input)
        child_id = self.flow.place(wf.name, text, child_id)
        if subject is not None:  # it is sealed: a third larger (a clear error, not a loop)
            payloads.check(text, "workflow input", erasure.plaintext_limit(
                self.config.max_payload_bytes))
            text = erasure.seal_text(self.key_store, subject, child_id, text)
        stalled = self.stalled.get(self.log.partition_for(child_id))
        if stalled is not None:
            raise PartitionStalledError(self.log.topic, stalled.partition, stalled.offset)
        await self._append_trigger(wf, child_id, WorkflowTriggered(
            text, None, parent_id=parent_id, parent_step=parent_step, subject=subject))
        return child_id

    async def notify_parent(self, record: dict[str, Any], end: Any) -> None:
        """Tell a child's parent how it ended: an event to the parent alone, whose id is
        the child's, so a repeat (a replay reaching the same end) is ignored."""
        status, output, error = _ending(end)
        data = {"execution_id": record["id"], "workflow": record["workflow"], "status": status,
                "output": None if output is None else json.loads(output), "error": error}
        parent = record["parent_id"]
        data = erasure.seal_notice(self.key_store, record.get("subject"), parent, data)
        await self.log.append(Event(parent, "", self.clock.now(), EventSent(
            f"{record['id']}/ended", CHILD_ENDED, f"ploy/{record['workflow']}",
            self.clock.now(), json.dumps(data, separators=(",", ":")), target=parent)))

    async def send_event(self, event_type: str, data: Any = None, *, id: str | None = None,
                         source: str | None = None,
                         execution_id: str | None = None,
                         workflow: str | None = None) -> dict[str, Any]:
        """Append an event for waiting executions: to ``execution_id`` only (of
        ``workflow``, if named), or to every
        partition, where each matching waiter receives it once. ``id`` makes a repeat a
        no-op (default: a new random id). Bad input raises before anything is appended."""
        check_event_type(event_type)
        if event_type.startswith(RESERVED_EVENT_PREFIX):
            raise ValueError(f"event type {event_type!r}: types starting with "
                             f"'{RESERVED_EVENT_PREFIX}' are the engine's own (a child's end)")
        event_id = uuid.uuid4().hex if id is None else id
        source = source or "api"
        for what, value in (("event id", event_id), ("event source", source)):
            payloads.check_key(value)  # bounded, valid Unicode
            if "\x00" in value:
                raise InvalidKeyError(what, "contains NUL")
        text = to_json(data, "event data")
        surrogate = payloads.lone_surrogate(text)
        if surrogate is not None:
            raise ValueError(f"event data contains a lone surrogate ({surrogate}): not valid "
                             "Unicode")
        payloads.check(text, "event data", self.config.max_payload_bytes)
        body = EventSent(event_id, event_type, source, self.clock.now(), text, execution_id)
        if execution_id is not None:
            record = await self._record(execution_id)
            if record is None or workflow not in (None, record["workflow"]):
                raise UnknownExecutionError(execution_id, workflow)
            partition, offset = await self.log.append(Event(execution_id, "", body.time, body))
            return {"id": event_id, "offsets": {str(partition): offset}}
        appended = await asyncio.gather(*(
            self.log.append(Event(f"event-{event_id}", "", body.time, body), partition=p)
            for p in range(self.log.partitions)))
        return {"id": event_id, "offsets": {str(p): o for p, o in appended}}

    async def cancel_children(self, eid: str) -> None:
        """A cancelled parent cancels the children it waits for (unless told not to),
        before its end is written: a crash in between repeats this, never skips it."""
        partition = self.log.partition_for(eid)
        # Its own acknowledged waits (a child's WaitStarted just appended) folded first.
        view = await self.partitions.caught_up(partition)
        if view is None:
            return
        reason = f"its parent execution {eid} was cancelled"
        await asyncio.gather(*(
            self.cancel(step["child_id"], reason) for step in view.steps(eid)
            if step["kind"] == "invoke" and step["cancel_child"]
            and step["status"] not in (waits.RECEIVED, waits.TIMED_OUT)))

    async def record_end(self, record: dict[str, Any], end: Any) -> None:
        """Append an end event the runtime writes itself (an unknown workflow, a cancel of
        an execution with no runner): a cancelled parent first cancels its children, a
        child first tells its parent. Tried again while it fails (the broker away, a
        child's owner not answering), as long as this process runs the execution."""
        eid = record["id"]
        while True:  # once in any case (a cancel during shutdown); again while it runs
            try:
                if isinstance(end, WorkflowCancelled):
                    await self.cancel_children(eid)
                if record.get("parent_id"):
                    await self.notify_parent(record, end)
                _, offset = await self.log.append(Event(eid, record["workflow"], self.clock.now(),
                                                        end, epoch=self.epoch_of(eid)))
                self._appended(eid, offset)
                return
            except Exception as exc:
                if self.stopping or not self.may_run(self.log.partition_for(eid)):
                    logger.warning("execution %s: recording its end: %s (its next owner "
                                   "finishes it)", eid, exc)
                    return
                logger.warning("execution %s: recording its end: %s; trying again in 1 s",
                               eid, exc)
                await asyncio.sleep(1.0)

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

    async def cancel(self, execution_id: str, reason: str | None = None,
                     actor: str | None = None) -> bool:
        """Append ``CancelRequested`` (why, and who asked); True if it ended the execution,
        False if already over."""
        record = await self._record(execution_id)
        if record is None or ExecutionStatus(record["status"]).terminal:
            return False
        await self.log.append(Event(execution_id, record["workflow"], self.clock.now(),
                                    CancelRequested(reason, actor),
                                    epoch=self.epoch_of(execution_id)))
        after = await self._record(execution_id)
        return after is not None and after["status"] == ExecutionStatus.CANCELLED.value and (
            after["ended_at"] is not None and after["cancel_reason"] == reason)

    async def resolve_step(self, execution_id: str, step: str, action: str, *,
                           output: Any = None, reason: str, actor: str) -> bool:
        """An operator completes a running or retrying step with ``output`` (``action``
        "complete": a stuck step is skipped, its call abandoned) or ends its backoff wait
        (``"retry-now"``). Appends ``StepResolved`` with who and why; True if the fold took
        it (False: the step had ended meanwhile).

        Raises:
            UnknownExecutionError: no such execution.
            StepNotResolvableError: a step not in a state for it (nothing appended).
            ValueError: no reason, or an unknown action.
        """
        if action not in ("complete", "retry-now"):
            raise ValueError(f"unknown step action {action!r}: complete or retry-now")
        if not reason or not reason.strip():
            raise ValueError("a reason is required (it is kept on the log for the audit)")
        execution = await self.get_execution(execution_id)
        if execution is None:
            raise UnknownExecutionError(execution_id)
        current = next((s for s in execution.steps if s.kind == "step" and s.key == step), None)
        wanted = ("running", "retrying") if action == "complete" else ("retrying",)
        if execution.status.terminal or current is None or current.status not in wanted:
            state = "no such step" if current is None else f"step is {current.status}"
            raise StepNotResolvableError(action, step, execution_id, state,
                                         execution.status.value, wanted)
        text = None
        if action == "complete":
            text = to_json(output, f"the output of step '{step}'")
            limit = self.config.max_payload_bytes
            if execution.subject is not None:  # sealed: a third larger once sealed
                limit = erasure.plaintext_limit(limit)
            payloads.check(text, f"the output of step '{step}'", limit)
            if execution.subject is not None:  # sealed like every payload of its subject
                text = erasure.seal_text(self.key_store, execution.subject, execution_id, text)
        _, offset = await self.log.append(Event(
            execution_id, execution.workflow, self.clock.now(),
            StepResolved(step, action, text, actor, reason.strip())))
        self._appended(execution_id, offset)  # a replay first folds the operator's output
        after = await self.get_execution(execution_id, min_offset=offset)
        done = next((s for s in after.steps if s.key == step), None) if after else None
        return done is not None and (done.status == "completed" if action == "complete"
                                     else bool(done.attempts) and
                                     done.attempts[-1].retry_at is not None and
                                     done.attempts[-1].retry_at <= self.clock.now())

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

    async def erase(self, subject: str, reason: str, actor: str) -> dict[str, Any]:
        """Destroy ``subject``'s key, then append ``SubjectErased`` (who and why) to
        partition 0 under ``subject-<subject>``: from then on no read, rebuild, export or
        archive can open that subject's payloads. Repeating it is harmless (the key is
        already gone; another audit record is appended)."""
        erasure.check_subject(subject)
        if not reason.strip():
            raise ValueError("an erasure needs a reason (it is kept on the log for the audit)")
        destroyed = await asyncio.to_thread(self.key_store.destroy, subject)
        event = Event(f"subject-{subject}", "", self.clock.now(),
                      SubjectErased(subject, actor, reason))
        partition, offset = await self.log.append(event, partition=0)
        return {"subject": subject, "key_destroyed": destroyed, "partition": partition,
                "offset": offset}


@dataclasses.dataclass
class _Firing:
    """A ``TimerFired`` on its way. Its acknowledgement and the look at waking its
    execution (``Runtime._wake_fired``) both run on the event loop, in either order."""

    event: Event
    partition: int
    acked: tuple[AppendError | None, int] | None = None
    looked: bool = False  # _wake_fired has run
    woken: asyncio.Future[tuple[int, int]] | None = None  # its runner's, if it woke one


def _settle(future: asyncio.Future[tuple[int, int]], error: AppendError | None,
            partition: int, offset: int) -> None:
    if future.done():
        return
    if error is None:
        future.set_result((partition, offset))
    else:
        future.set_exception(error)


def _ending(end: Any) -> tuple[str, str | None, dict[str, str] | None]:
    """(status, output JSON, error) of an end event, as a child reports it to its parent."""
    if isinstance(end, WorkflowCompleted):
        return ExecutionStatus.COMPLETED.value, end.output, None
    if isinstance(end, WorkflowFailed):
        return ExecutionStatus.FAILED.value, None, {"type": end.error_type,
                                                    "message": end.message}
    reason = getattr(end, "reason", None)
    return ExecutionStatus.CANCELLED.value, None, {
        "type": "WorkflowCancelled", "message": f"cancelled: {reason}" if reason else "cancelled"}
