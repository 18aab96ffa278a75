"""The worker loop: own partitions, fold them, run their executions.

Start-up (``Runtime.start``):
1. Open each partition's view and fold it to the end of the log (recovery:
   read the view's next offset, seek there, fold on).
2. Start the fold thread (consume -> fold -> dispatch to the event loop).
3. Take ownership: a single worker owns every partition and resumes every
   unfinished execution that is queued or running (sleeping ones wait for the
   timer service); scaled out, the consumer group assigns partitions and each
   is claimed before it is run. Then the timer service starts.

The fold thread applies each polled batch of a partition in one WriteBatch
and then hands the applied events to the event loop, which starts runners for
new executions and fired timers and passes cancels on. A corrupt record stops
its partition (paused, reported with topic/partition/offset); the others go on.

Reads are read-your-writes: a query waits until the view has folded every
event this process has had acknowledged on that partition.

Every process folds every partition (the read view), so any process answers
a query about any execution. Which partitions a process *runs* is ownership:
a single worker (``ploy dev``, tests) owns them all at epoch 0; with
``scale_out`` (``ploy worker``) the consumer group assigns them, and taking a
partition over is:
1. Append ``PartitionClaimed`` with an epoch above the partition's current
   claim, and wait until the fold has applied it (so the view holds every
   event before it).
2. Check that the claim in the view is ours (a concurrent claim may have won;
   then claim again, higher).
3. Resume the partition's unfinished executions; from now on every event this
   process writes there carries the new epoch, and the fold ignores runtime
   events of lower epochs (see ``engine.fold``, rule 5).
On revocation the partition leaves ``owned`` at once; its runners stop at
their next step boundary. A step in flight may still finish and append: if a
new owner has claimed, the fold ignores it. A process that was frozen (its fold
loop saw a gap longer than the lease) checks the tail of the log for newer
claims before it starts another step.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from pydantic import BaseModel, ValidationError

from engine import payloads
from engine.bindings import Env, WorkflowBinding
from engine.builder import Worker, WorkflowDef
from engine.clock import Clock
from engine.config import Config
from engine.errors import (
    AppendError,
    CodecError,
    CorruptEventError,
    InvalidInputError,
    NotStalledError,
    PartitionStalledError,
    PayloadTooDeepError,
    SerializationError,
    UnknownWorkflowError,
)
from engine.events import (
    CancelRequested,
    Event,
    PartitionClaimed,
    PartitionReleased,
    RecordSkipped,
    TimerFired,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowTriggered,
    claim_id,
)
from engine.execution import ExecutionRunner, to_json
from engine.fold import new_execution
from engine.log import EventLog
from engine.models import Execution, ExecutionStatus, ExecutionSummary, HistoryEntry
from engine.skips import apply_or_skip, find_skip
from engine.threads import StepThreads
from engine.timers import TimerService
from engine.view import PartitionView, build_execution, build_summary, history_entries

logger = logging.getLogger("ploy.runtime")

ID_NAMESPACE = uuid.UUID("6f1c1d1e-9a43-4b8e-9a55-3e1f0c2b7d10")
RUNNABLE = (ExecutionStatus.QUEUED.value, ExecutionStatus.RUNNING.value)
LEASE_S = 1.0  # a fold loop silent this long (a frozen process) must re-check its claims
GROUP_SETTINGS = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    # Cooperative: a rebalance revokes only the partitions that move; the others
    # keep running, with no new claim, so none of their steps is fenced and rerun.
    "partition.assignment.strategy": "cooperative-sticky",
}
HANDOFF_S = 60.0  # how long a new owner waits for the old one's steps before it claims
CLAIM_BACKOFF_S = (0.1, 5.0)  # a failed claim is tried again after 0.1 s, 0.2 s, ... 5 s


class Runtime:
    """Runs the executions of the partitions this process owns."""

    def __init__(self, worker: Worker, config: Config, log: EventLog, *,
                 clock: Clock | None = None, max_threads: int = 32, scale_out: bool = False,
                 runs: bool = True):
        self.worker, self.config, self.log = worker, config, log
        self.clock = clock or Clock()
        self.scale_out = scale_out
        self.runs = runs  # False: a query process that folds every partition, runs nothing
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.env = Env({
            name: WorkflowBinding(self, name, binding.name)
            for name, binding in config.workflow.items()
        })
        self.views: dict[int, PartitionView] = {}
        self.owned: set[int] = set()
        self.epochs: dict[int, int] = {}
        self.stalled: dict[int, CorruptEventError] = {}
        self.runners: dict[str, ExecutionRunner] = {}
        self.threads = StepThreads(max_threads)
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._resume_after: set[str] = set()
        self._started_on_ack: set[str] = set()  # triggered here; skip its WorkflowTriggered
        self._waiters: dict[int, list[tuple[int, asyncio.Future[None]]]] = {}
        self._fold_stop = threading.Event()
        self._fold_thread: threading.Thread | None = None
        self._consumer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease_ok = True
        self._last_poll = time.monotonic()
        self._lease_lock: asyncio.Lock | None = None
        self._claiming: dict[int, int] = {}  # partition -> assignment generation
        self._generation = 0
        self._group_stop = threading.Event()
        self._ownership = threading.Lock()  # the group thread revokes, the loop claims
        self._group_thread: threading.Thread | None = None
        self._skips: dict[int, tuple[int, Event, int]] = {}  # stalled partition -> its skip
        self._ownership_listeners: list[Callable[[frozenset[int]], None]] = []
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
        self._lease_lock = asyncio.Lock()
        # Step 2. Follow the log.
        self._fold_thread = threading.Thread(target=self._fold_loop, name="ploy-fold",
                                             daemon=True)
        self._fold_thread.start()
        # Step 3. Resume what was running when the last worker stopped. A single
        # worker on a topic that scaled-out workers claimed claims it back first.
        if self.runs and not self.scale_out:
            for p in partitions:
                if self.views[p].claim_epoch > 0:
                    self._claim_all([p])  # scaled-out workers ran it: claim it back
                    continue
                self.owned.add(p)
                self._resume(p)
            self._ownership_changed()
        elif self.runs:
            self._group_thread = threading.Thread(target=self._group_loop, name="ploy-group",
                                                  daemon=True)
            self._group_thread.start()
        if self.runs:
            self.timers.start()
        self._spawn(self._watch_stalled(), "ploy-watch-stalled")

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
        self._group_stop.set()  # leave the group: the others take over at once
        if self._group_thread is not None:
            await asyncio.to_thread(self._group_thread.join, 10)
        self._fold_stop.set()
        if self._fold_thread is not None:
            await asyncio.to_thread(self._fold_thread.join, 5)
        if self._consumer is not None:
            self._consumer.close()
        for view in self.views.values():
            view.close()
        self.views.clear()

    # -- folding ----------------------------------------------------------------

    def _poll(self, timeout_s: float) -> dict[int, list[tuple[int, bytes]]]:
        """What has arrived, as soon as anything has: wait for one record, then take
        what is queued without waiting (``consume(n, t)`` alone waits the whole ``t``
        unless ``n`` records arrive, which put up to 50 ms on every fold hop)."""
        by_partition: dict[int, list[tuple[int, bytes]]] = {}
        first = self._consumer.poll(timeout_s)
        if first is None:
            return by_partition
        for msg in [first, *self._consumer.consume(4999, 0)]:
            if msg.error() is not None:
                logger.warning("consumer: %s", msg.error())
                continue
            by_partition.setdefault(msg.partition(), []).append((msg.offset(), msg.value()))
        return by_partition

    def _fold(self, partition: int, records: list[tuple[int, bytes]]) -> list[tuple[int, Event]]:
        view = self.views.get(partition)
        if view is None or partition in self.stalled:
            return []
        applied, failure = apply_or_skip(self.log, view, records)
        if failure is not None:
            self.stalled[partition] = failure
            if self._consumer is not None:
                self._consumer.incremental_unassign([TopicPartition(self.log.topic, partition)])
            logger.error("%s", failure)
        return applied

    async def _watch_stalled(self) -> None:
        """Look ahead on each stopped partition for an operator's skip marker (``ploy skip``)."""
        while not self.stopping:
            for p, failure in list(self.stalled.items()):
                if p in self._skips:
                    continue
                try:
                    found = await asyncio.to_thread(find_skip, self.log, p, failure.offset)
                except Exception as exc:  # the broker is away: look again later
                    logger.debug("partition %d: looking for a skip marker: %s", p, exc)
                    continue
                if found is not None:
                    self._skips[p] = (failure.offset, *found)
            for _ in range(20):
                if self.stopping:
                    return
                await asyncio.sleep(0.1)

    def _apply_skips(self) -> None:
        """In the fold thread: step over skipped records and fold on after them."""
        for p, (offset, marker, at) in list(self._skips.items()):
            del self._skips[p]
            failure, view = self.stalled.get(p), self.views.get(p)
            if failure is None or view is None or failure.offset != offset:
                continue
            view.skip(offset, marker, at)
            del self.stalled[p]
            logger.warning("partition %d: skipped the record at offset %d (%s); folding on",
                           p, offset, marker.body)
            self._consumer.incremental_assign([TopicPartition(self.log.topic, p, offset + 1)])

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
        last = time.monotonic()
        while not self._fold_stop.is_set():
            if self._skips:
                self._apply_skips()
            try:
                batches = self._poll(0.05)
            except Exception:  # a closed consumer at shutdown
                if self._fold_stop.is_set():
                    return
                raise
            now = time.monotonic()
            if now - last > LEASE_S:
                self._lease_ok = False  # frozen or starved: claims may have moved
            last = self._last_poll = now  # after the flag: a reader sees one or the other
            for p, records in batches.items():
                try:
                    applied = self._fold(p, records)
                except Exception as exc:  # e.g. a disk error: stop this partition, loudly
                    logger.exception("partition %d: the fold failed", p)
                    view = self.views[p]
                    self.stalled[p] = CorruptEventError(self.log.topic, p, view.next_offset,
                                                        f"fold failed: {exc!r}")
                    continue
                self._loop.call_soon_threadsafe(self._on_folded, p, applied)

    def _on_folded(self, partition: int, applied: list[tuple[int, Event]]) -> None:
        """On the event loop: react to what the fold applied, wake waiting readers."""
        for _, event in applied:
            body = event.body
            if isinstance(body, WorkflowTriggered) and event.execution_id in self._started_on_ack:
                self._started_on_ack.discard(event.execution_id)  # trigger() started it
            elif isinstance(body, WorkflowTriggered | TimerFired):
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

    # -- ownership (scale-out) ---------------------------------------------------------

    def _group_loop(self) -> None:
        """Membership of the consumer group: assignments, heartbeats, committed positions.

        The group consumer fetches nothing (its partitions are paused); the fold
        consumer reads every partition. Committing the fold's position lets
        ``ploy workers`` report each partition's lag.
        """
        consumer = self.log.consumer(self.config.kafka.group_id, **GROUP_SETTINGS)
        consumer.subscribe([self.log.topic], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_revoke)
        last_commit = 0.0
        try:
            while not self._group_stop.is_set():
                consumer.consume(100, 0.1)
                if time.monotonic() - last_commit > 1.0 and self.owned:
                    last_commit = time.monotonic()
                    offsets = [TopicPartition(self.log.topic, p, self.views[p].next_offset)
                               for p in sorted(self.owned) if p in self.views]
                    try:
                        consumer.commit(offsets=offsets, asynchronous=True)
                    except Exception as exc:  # a rebalance in progress; next time
                        logger.debug("commit: %s", exc)
        finally:
            consumer.close()

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        assigned = sorted(tp.partition for tp in partitions)
        logger.info("worker %s assigned partitions %s", self.worker_id, assigned)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._claim_all, assigned)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Does little and always releases: the partitions leave ``owned`` now."""
        revoked = sorted(tp.partition for tp in partitions)
        with self._ownership:
            for p in revoked:
                self.owned.discard(p)
                self._claiming.pop(p, None)
        logger.info("worker %s released partitions %s", self.worker_id, revoked)
        if revoked and self._loop is not None:
            self._loop.call_soon_threadsafe(self._release_all, revoked)
            self._loop.call_soon_threadsafe(self._ownership_changed)

    def _release_all(self, partitions: list[int]) -> None:
        """Hand revoked partitions off: say so on the log at once, and again once
        this process's runners there have stopped (their steps finished), so the
        next owner claims without fencing any acknowledged completion."""
        for p in partitions:
            epoch = self.epochs.get(p)
            view = self.views.get(p)
            if epoch is None or view is None or view.claim_epoch != epoch:
                continue  # never claimed here, or someone claimed it since
            running = self._running_on(p, epoch)
            self._append_release(p, epoch, running)
            if running:
                self._spawn(self._release_when_idle(p, epoch), f"ploy-release-{p}")

    def _running_on(self, partition: int, epoch: int) -> int:
        return sum(1 for r in self.runners.values() if r.partition == partition
                   and r.epoch == epoch)

    async def _release_when_idle(self, partition: int, epoch: int) -> None:
        deadline = time.monotonic() + HANDOFF_S
        while self._running_on(partition, epoch) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if partition not in self.owned and partition not in self._claiming:
            self._append_release(partition, epoch, 0)

    def _append_release(self, partition: int, epoch: int, running: int) -> None:
        event = Event(claim_id(partition), "", self.clock.now(),
                      PartitionReleased(partition, self.worker_id, running), epoch=epoch)
        try:
            self.log.append_nowait(event, partition=partition)
        except Exception as exc:  # the next owner waits out HANDOFF_S at worst
            logger.warning("partition %d: could not append its release: %s", partition, exc)

    def _claim_all(self, partitions: list[int]) -> None:
        for p in partitions:
            self._generation += 1
            self._claiming[p] = self._generation
            self._spawn(self._claim(p, self._generation), f"ploy-claim-{p}")

    async def _claim(self, partition: int, generation: int) -> None:
        """Take a partition over (see the module docstring, steps 1-3), trying again
        with backoff after a failed append or fold until it holds or is revoked."""
        delay = CLAIM_BACKOFF_S[0]
        while self._claiming.get(partition) == generation and not self.stopping:
            try:
                epoch = await self._take(partition, generation)
            except (AppendError, TimeoutError) as exc:
                logger.warning("partition %d: claim failed (%s); trying again in %.1f s",
                               partition, exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, CLAIM_BACKOFF_S[1])
                continue
            if epoch is not None:
                self._own(partition, generation, epoch)
            return

    async def _take(self, partition: int, generation: int) -> int | None:
        """The epoch this process now holds ``partition`` at, or None if it was revoked."""
        view = self.views[partition]
        # The view must hold the log's end before its claim is trusted.
        await self._folded(partition, await asyncio.to_thread(self._end_of, partition))
        claim = view.claim()
        if (claim is not None and claim["worker"] == self.worker_id
                and claim["epoch"] == self.epochs.get(partition) and not claim.get("releasing")):
            return int(claim["epoch"])  # still ours (it came back): no new claim, no fencing
        # A planned handoff: the old owner's steps finish and it releases; a crashed
        # owner never said it was releasing, so its partition is claimed at once.
        deadline = time.monotonic() + HANDOFF_S
        while time.monotonic() < deadline:
            if self._claiming.get(partition) != generation:
                return None  # revoked while waiting
            claim = view.claim() or {}
            own_runners = any(r.partition == partition for r in self.runners.values())
            if not own_runners and not (claim.get("releasing") and not claim.get("released")):
                break
            await asyncio.sleep(0.05)
        epoch = view.claim_epoch + 1
        while True:
            # Step 1.
            event = Event(claim_id(partition), "", self.clock.now(),
                          PartitionClaimed(partition, self.worker_id), epoch=epoch)
            _, offset = await self.log.append(event, partition=partition)
            await self._folded(partition, offset)
            if self._claiming.get(partition) != generation:
                return None  # revoked while claiming
            # Step 2.
            claim = view.claim()
            if claim is not None and (claim["epoch"], claim["worker"]) == (epoch, self.worker_id):
                return epoch
            epoch = view.claim_epoch + 1

    def _end_of(self, partition: int) -> int:
        """The offset of the partition's last record (read to its end), -1 if empty."""
        last = self.views[partition].next_offset - 1
        for batches in self.log.read_until_end({partition: last + 1}):
            for offset, _ in batches.get(partition, []):
                last = max(last, offset)
        return last

    def _own(self, partition: int, generation: int, epoch: int) -> None:
        # Step 3.
        with self._ownership:
            if self._claiming.get(partition) != generation:
                return  # revoked just now
            del self._claiming[partition]
            self.epochs[partition] = epoch
            self.owned.add(partition)
        logger.info("worker %s owns partition %d at epoch %d", self.worker_id, partition, epoch)
        self._resume(partition)
        self._ownership_changed()

    def on_ownership(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call ``listener(owned partitions)`` on the event loop now and after each change
        (a claim landed, a revocation, a partition lost to a newer claim)."""
        self._ownership_listeners.append(listener)
        listener(frozenset(self.owned))

    def _ownership_changed(self) -> None:
        owned = frozenset(self.owned)
        for listener in list(self._ownership_listeners):
            try:
                listener(owned)
            except Exception:
                logger.exception("an ownership listener failed")

    def _resume(self, partition: int) -> None:
        """Start every unfinished execution of a partition this process now runs
        (sleeping ones wait for their timers)."""
        for eid in self.views[partition].active():
            self._maybe_start(eid)

    async def _folded(self, partition: int, offset: int, timeout_s: float = 30.0) -> None:
        view = self.views[partition]
        if view.next_offset > offset:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[partition].append((offset, future))
        await asyncio.wait_for(future, timeout_s)

    def claiming(self) -> list[int]:
        """Partitions the group assigned to this process whose claim has not landed yet."""
        return sorted(self._claiming)

    def may_run(self, partition: int) -> bool:
        """Whether this process may start a step on ``partition`` now."""
        return partition in self.owned and self.views[partition].claim_epoch <= self.epochs.get(
            partition, 0)

    def _lease_fresh(self) -> bool:
        """The fold loop has polled lately and saw no gap (no freeze since the last check)."""
        return self._lease_ok and time.monotonic() - self._last_poll <= LEASE_S

    async def ensure_lease(self) -> None:
        """After a gap in the fold loop, look for newer claims on the log before going on.

        A process frozen (SIGSTOP, a VM pause) past its session may have lost its
        partitions without having heard so yet; a claim on the log is the proof.
        """
        if not self.scale_out or self._lease_fresh():
            return
        assert self._lease_lock is not None
        async with self._lease_lock:
            if self._lease_fresh():
                return
            start = {p: self.views[p].next_offset for p in self.owned}
            lost = await asyncio.to_thread(self._claimed_by_others, start)
            for p in lost:
                self.owned.discard(p)
                logger.warning("worker %s lost partition %d to a newer claim", self.worker_id, p)
            if lost:
                self._ownership_changed()
            self._lease_ok = True
            self._last_poll = max(self._last_poll, time.monotonic())

    def _claimed_by_others(self, start: dict[int, int]) -> set[int]:
        lost: set[int] = set()
        if not start:
            return lost
        for batches in self.log.read_until_end(start):
            for p, records in batches.items():
                for _, raw in records:
                    try:
                        event = self.log.codec.decode(raw)
                    except CodecError:
                        continue
                    if isinstance(event.body, PartitionClaimed) and (
                            event.epoch > self.epochs.get(p, 0)):
                        lost.add(p)
        return lost

    async def partitions_report(self) -> list[dict[str, Any]]:
        """Who runs each partition (its claim on the log), and how far behind it is.

        Works on any Kafka-protocol broker: ownership comes from the claims in
        the view, the owner's position from the offsets its group commits, and
        the end of the log from this process's own read view.
        """
        try:
            committed = await asyncio.to_thread(self.log.committed, self.config.kafka.group_id)
        except Exception as exc:  # no group yet, or a broker without the API
            logger.debug("committed offsets: %s", exc)
            committed = {}
        report = []
        for p, view in sorted(self.views.items()):
            claim = view.claim() or {}
            position = committed.get(p)
            report.append({
                "partition": p,
                "worker": claim.get("worker"),
                "epoch": claim.get("epoch", 0),
                "fenced_events": claim.get("fenced", 0),
                "end_offset": view.next_offset,
                "committed_offset": position,
                "lag": None if position is None else max(view.next_offset - position, 0),
                "stalled": str(self.stalled[p]) if p in self.stalled else None,
                "skipped": view.skipped(),
                "here": p in self.owned,
                # Assigned to this process by the group, its claim not (yet) on the log.
                "claiming": p in self._claiming,
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
        await self._folded(partition, offset)
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

    async def _caught_up(self, partition: int, timeout_s: float = 10.0) -> PartitionView | None:
        """The partition's view once it holds every event this process had acknowledged."""
        view = self.views.get(partition)
        if view is None or partition in self.stalled:
            return view
        target = self.log.high_acked.get(partition, -1)
        try:
            await self._folded(partition, target, timeout_s)
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

    async def skip(self, partition: int, offset: int, reason: str, actor: str) -> int:
        """Append the marker that skips the corrupt record ``partition`` is stopped at
        (see ``engine.skips``); the marker's offset. Only the record the fold stopped
        at can be skipped: a good record is never dropped by a typo."""
        failure = self.stalled.get(partition)
        if failure is None or failure.offset != offset:
            raise NotStalledError(partition, offset, None if failure is None else failure.offset)
        if not reason.strip():
            raise ValueError("a skip needs a reason (it is kept on the log for the audit)")
        event = Event(claim_id(partition), "", self.clock.now(),
                      RecordSkipped(partition, offset, reason, actor))
        _, at = await self.log.append(event, partition=partition)
        return at

    async def list_executions(self, *, workflow: str | None = None, status: str | None = None,
                              limit: int = 50, offset: int = 0) -> list[ExecutionSummary]:
        """Executions newest first, filtered by workflow and status."""
        for p in list(self.views):
            await self._caught_up(p)
        found: list[ExecutionSummary] = []
        skipped = 0
        for _, eid, view in self._newest():
            summary = build_summary(view, eid)  # one read of the record
            if summary is None or (workflow and summary.workflow != workflow) or (
                    status and summary.status != status):
                continue
            if skipped < offset:
                skipped += 1
                continue
            found.append(summary)
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
