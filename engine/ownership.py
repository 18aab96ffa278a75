"""Which partitions this process runs: the consumer group, claims on the log, handoffs.

A single worker (``ploy dev``, tests) owns every partition at epoch 0 and joins
no group. Scaled out (``ploy worker``), the consumer group assigns partitions
(cooperative-sticky: a rebalance revokes only what moves) and taking one over is:

1. Follow the partition (fold it) and wait until its view holds the end of the
   log, so the claim in the view is current.
2. If the current claim is this process's own and was never released (the
   partition came back), keep it: no new claim, nothing fenced.
3. If the old owner is handing off (it appended ``PartitionReleased`` with
   steps still running), wait for its final release, at most ``HANDOFF_S``; an
   owner that crashed released nothing and is claimed over at once.
4. Append ``PartitionClaimed`` with an epoch above the current claim, wait until
   the fold applied it, and check that it won (a concurrent claim may have; then
   claim again, higher). A failed append or fold is tried again with backoff.
5. Own it: resume its unfinished executions; every event written there carries
   the new epoch, and the fold ignores runtime events of lower epochs.

On revocation the partition leaves ``owned`` at once and its runners stop at
their next step boundary; once those in flight have finished the process
appends ``PartitionReleased`` and stops folding it (unless it is a standby). A
process that was frozen (its fold loop saw a gap longer than the lease) reads
the tail of the log for newer claims before it starts another step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from confluent_kafka import TopicPartition

from engine.broker import group_leave_strands_group
from engine.clock import Clock
from engine.errors import AppendError, CodecError
from engine.events import Event, PartitionClaimed, PartitionReleased, claim_id
from engine.log import EventLog
from engine.partitions import LEASE_S, Partitions

logger = logging.getLogger("ploy.runtime")

GROUP_SETTINGS = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    # Cooperative: a rebalance revokes only the partitions that move; the others
    # keep running, with no new claim, so none of their steps is fenced and rerun.
    "partition.assignment.strategy": "cooperative-sticky",
}
HANDOFF_S = 60.0  # how long a new owner waits for the old one's steps before it claims
CLAIM_BACKOFF_S = (0.1, 5.0)  # a failed claim is tried again after 0.1 s, 0.2 s, ... 5 s

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Ownership:
    """The owned partitions, their claim epochs, and the protocol that changes them."""

    def __init__(self, log: EventLog, partitions: Partitions, *, worker_id: str, group_id: str,
                 clock: Clock, spawn: Spawn, running_on: Callable[[int, int | None], int],
                 resume: Callable[[int], None], standby: bool = False,
                 instance_id: str | None = None):
        self.log, self.partitions = log, partitions
        self.worker_id, self.group_id, self.clock = worker_id, group_id, clock
        self._spawn, self._running_on, self._resume = spawn, running_on, resume
        self.standby = standby  # keep folding partitions that moved away (fast failover)
        self.instance_id = instance_id  # static membership (group.instance.id), if any
        self.scale_out = False
        self.stopping = False
        self.owned: set[int] = set()
        self.epochs: dict[int, int] = {}
        self._claiming: dict[int, int] = {}  # partition -> assignment generation
        self._generation = 0
        self._listeners: list[Callable[[frozenset[int]], None]] = []
        self._lock = threading.Lock()  # the group thread revokes, the loop claims
        self._lease_lock = asyncio.Lock()
        self._group_stop = threading.Event()
        self._group_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- start and stop -------------------------------------------------------------

    def start_single(self) -> None:
        """Own every partition (one worker). A partition that scaled-out workers
        claimed is claimed back first, so their events are fenced from here on."""
        self._loop = asyncio.get_running_loop()
        for p in range(self.log.partitions):
            self.epochs.setdefault(p, 0)
            if self.partitions.views[p].claim_epoch > 0:
                self.claim_all([p])
                continue
            self.owned.add(p)
            self._resume(p)
        self._changed()

    def start_group(self) -> None:
        """Join the consumer group; its assignments are claimed as they come."""
        self._loop = asyncio.get_running_loop()
        self.scale_out = True
        self._group_thread = threading.Thread(target=self._group_loop, name="ploy-group",
                                              daemon=True)
        self._group_thread.start()

    async def stop(self) -> None:
        """Leave the group: the others take over at once."""
        self.stopping = True
        self._group_stop.set()
        if self._group_thread is not None:
            await asyncio.to_thread(self._group_thread.join, 10)

    # -- queries ---------------------------------------------------------------------

    def may_run(self, partition: int) -> bool:
        """Whether this process may start a step on ``partition`` now."""
        view = self.partitions.views.get(partition)
        return (partition in self.owned and view is not None
                and view.claim_epoch <= self.epochs.get(partition, 0))

    def epoch_of(self, partition: int) -> int:
        """The epoch this process writes with on ``partition``."""
        return self.epochs.get(partition, 0)

    def claiming(self) -> list[int]:
        """Partitions the group assigned to this process whose claim has not landed yet."""
        return sorted(self._claiming)

    def on_change(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call ``listener(owned partitions)`` on the event loop now and after each change
        (a claim landed, a revocation, a partition lost to a newer claim)."""
        self._listeners.append(listener)
        listener(frozenset(self.owned))

    def _changed(self) -> None:
        owned = frozenset(self.owned)
        for listener in list(self._listeners):
            try:
                listener(owned)
            except Exception:
                logger.exception("an ownership listener failed")

    # -- the group thread ---------------------------------------------------------------

    def _group_loop(self) -> None:
        """Membership of the consumer group: assignments, heartbeats, committed positions.

        The group consumer fetches nothing (its partitions are paused); the fold
        consumer reads what this process follows. Committing the fold's position
        lets ``ploy workers`` report each partition's lag.
        """
        consumer = self.log.consumer(self.group_id, **GROUP_SETTINGS)
        leave = self._leaves_with_request(consumer)
        if self.instance_id is not None and leave:  # a broker whose groups behave
            consumer.close()
            consumer = self.log.consumer(self.group_id, **GROUP_SETTINGS,
                                         **{"group.instance.id": self.instance_id})
        consumer.subscribe([self.log.topic], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_revoke)
        last_commit = 0.0
        views = self.partitions.views
        try:
            while not self._group_stop.is_set():
                consumer.consume(100, 0.1)
                if time.monotonic() - last_commit > 1.0 and self.owned:
                    last_commit = time.monotonic()
                    offsets = [TopicPartition(self.log.topic, p, views[p].next_offset)
                               for p in sorted(self.owned) if p in views]
                    try:
                        consumer.commit(offsets=offsets, asynchronous=True)
                    except Exception as exc:  # a rebalance in progress; next time
                        logger.debug("commit: %s", exc)
        finally:
            if leave:
                consumer.close()  # LeaveGroup: the others take over at once
            else:
                # Hand off as close() would (it calls on_revoke), then drop the consumer
                # unclosed: librdkafka destroys it without a LeaveGroup, and the group
                # drops this member after session.timeout.ms (see engine.broker).
                self._on_revoke(consumer, consumer.assignment())
                del consumer

    def _leaves_with_request(self, consumer: Any) -> bool:
        """False on a broker that strands a group when a member leaves it mid-rebalance."""
        try:
            cluster_id = consumer.list_topics(timeout=self.log.connect_timeout_s).cluster_id
        except Exception as exc:  # the broker is away: the group loop will say so
            logger.debug("cluster id: %s", exc)
            return True
        return not group_leave_strands_group(cluster_id)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)
        assigned = sorted(tp.partition for tp in partitions)
        logger.info("worker %s assigned partitions %s", self.worker_id, assigned)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.claim_all, assigned)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Does little and always releases: the partitions leave ``owned`` now."""
        revoked = sorted(tp.partition for tp in partitions)
        with self._lock:
            for p in revoked:
                self.owned.discard(p)
                self._claiming.pop(p, None)
        logger.info("worker %s released partitions %s", self.worker_id, revoked)
        if revoked and self._loop is not None:
            self._loop.call_soon_threadsafe(self._release_all, revoked)
            self._loop.call_soon_threadsafe(self._changed)

    # -- handing off --------------------------------------------------------------------

    def _release_all(self, partitions: list[int]) -> None:
        """Hand revoked partitions off: say so on the log at once, and again once
        this process's runners there have stopped (their steps finished), so the
        next owner claims without fencing any acknowledged completion."""
        for p in partitions:
            epoch = self.epochs.get(p)
            view = self.partitions.views.get(p)
            if epoch is None or view is None or view.claim_epoch != epoch:
                self._unfollow(p)
                continue  # never claimed here, or someone claimed it since
            running = self._running_on(p, epoch)
            self._append_release(p, epoch, running)
            self._spawn(self._release_when_idle(p, epoch, running), f"ploy-release-{p}")

    async def _release_when_idle(self, partition: int, epoch: int, running: int) -> None:
        """Release once this process's steps there have finished; keep folding (and
        answering queries about) the partition until its next owner has claimed it,
        since the group may take seconds to assign it on."""
        deadline = time.monotonic() + HANDOFF_S
        while running and self._running_on(partition, epoch) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if partition in self.owned or partition in self._claiming:
            return  # it came back
        if running:
            self._append_release(partition, epoch, 0)
        view = self.partitions.views[partition]
        while view.claim_epoch <= epoch and not self.stopping:
            if partition in self.owned or partition in self._claiming:
                return
            await asyncio.sleep(0.1)
        self._unfollow(partition)

    def _unfollow(self, partition: int) -> None:
        if not self.standby and partition not in self.owned and partition not in self._claiming:
            self.partitions.unfollow(partition)
            self._changed()  # what this process folds changed: its card says so

    def _append_release(self, partition: int, epoch: int, running: int) -> None:
        event = Event(claim_id(partition), "", self.clock.now(),
                      PartitionReleased(partition, self.worker_id, running), epoch=epoch)
        try:
            self.log.append_nowait(event, partition=partition)
        except Exception as exc:  # the next owner waits out HANDOFF_S at worst
            logger.warning("partition %d: could not append its release: %s", partition, exc)

    # -- claiming -----------------------------------------------------------------------

    def claim_all(self, partitions: list[int]) -> None:
        for p in partitions:
            self._generation += 1
            self._claiming[p] = self._generation
            self.partitions.follow(p)
            self._spawn(self._claim(p, self._generation), f"ploy-claim-{p}")
        if partitions:
            self._changed()  # folded here from now on

    async def _claim(self, partition: int, generation: int) -> None:
        """Take a partition over (steps 1-5 of the module docstring), trying again
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
        partitions = self.partitions
        view = partitions.views[partition]
        # Step 1.
        await partitions.folded(partition, await asyncio.to_thread(partitions.end_of, partition))
        # Step 2.
        claim = view.claim()
        if (claim is not None and claim["worker"] == self.worker_id
                and claim["epoch"] == self.epochs.get(partition) and not claim.get("releasing")):
            return int(claim["epoch"])
        # Step 3.
        deadline = time.monotonic() + HANDOFF_S
        while time.monotonic() < deadline:
            if self._claiming.get(partition) != generation:
                return None  # revoked while waiting
            claim = view.claim() or {}
            own_runners = self._running_on(partition, None) > 0
            if not own_runners and not (claim.get("releasing") and not claim.get("released")):
                break
            await asyncio.sleep(0.05)
        # Step 4.
        epoch = view.claim_epoch + 1
        while True:
            event = Event(claim_id(partition), "", self.clock.now(),
                          PartitionClaimed(partition, self.worker_id), epoch=epoch)
            _, offset = await self.log.append(event, partition=partition)
            await partitions.folded(partition, offset)
            if self._claiming.get(partition) != generation:
                return None  # revoked while claiming
            claim = view.claim()
            if claim is not None and (claim["epoch"], claim["worker"]) == (epoch, self.worker_id):
                return epoch
            epoch = view.claim_epoch + 1

    def _own(self, partition: int, generation: int, epoch: int) -> None:
        # Step 5.
        with self._lock:
            if self._claiming.get(partition) != generation:
                return  # revoked just now
            del self._claiming[partition]
            self.epochs[partition] = epoch
            self.owned.add(partition)
        logger.info("worker %s owns partition %d at epoch %d", self.worker_id, partition, epoch)
        self._resume(partition)
        self._changed()

    # -- the lease after a freeze ---------------------------------------------------------

    def _lease_fresh(self) -> bool:
        """The fold loop has polled lately and saw no gap (no freeze since the last check)."""
        partitions = self.partitions
        return not partitions.lease_broken and time.monotonic() - partitions.last_poll <= LEASE_S

    async def ensure_lease(self) -> None:
        """After a gap in the fold loop, look for newer claims on the log before going on.

        A process frozen (SIGSTOP, a VM pause) past its session may have lost its
        partitions without having heard so yet; a claim on the log is the proof.
        """
        if not self.scale_out or self._lease_fresh():
            return
        async with self._lease_lock:
            if self._lease_fresh():
                return
            views = self.partitions.views
            start = {p: views[p].next_offset for p in self.owned}
            lost = await asyncio.to_thread(self._claimed_by_others, start)
            for p in lost:
                self.owned.discard(p)
                logger.warning("worker %s lost partition %d to a newer claim", self.worker_id, p)
            if lost:
                self._changed()
            self.partitions.lease_broken = False
            self.partitions.last_poll = max(self.partitions.last_poll, time.monotonic())

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
