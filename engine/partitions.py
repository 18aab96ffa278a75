"""The partitions this process folds: their views, the fold thread, read-your-writes.

Each partition of the events topic has its own RocksDB view
(``<state_dir>/<prefix>.events/p<N>``). A process folds only the partitions it
*follows*: those it owns, plus every partition on a standby worker or a read
replica. A view it stops following stays on disk, so following it again
(the partition came back) catches up from its own next offset.

The fold thread:
1. Applies pending commands from the event loop: follow a partition (assign
   it at the view's next offset), unfollow one, step over a skipped record.
2. Polls what has arrived, as soon as anything has.
3. Folds each partition's batch in one WriteBatch with its next offset
   (``PartitionView.apply``; a record an operator skipped is stepped over). A
   record that does not fold stops its partition, loudly: it is unassigned
   and reported with topic/partition/offset until ``ploy skip``.
4. Hands what it applied to the event loop (``on_applied``), which also wakes
   the readers waiting for an offset (read-your-writes).

This process's own appends are folded sooner, on the event loop, as soon as
they are acknowledged and their waiters have gone on (``fold_acked``): the
record at a view's next offset is the log's record there, whoever reads it, so
folding the bytes the broker acknowledged gives the view the fetch would,
without waiting for the fetch (a hop of up to ``fetch.wait.max.ms``). Only a run
that starts exactly at the view's next offset is folded; after another writer's
record (a gap), the fetch folds on and the fold thread steps over what is
already in the view. One lock keeps the two folds of a partition in order, and
one queue hands what they applied to the event loop in that order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from engine.errors import CorruptEventError
from engine.events import Event
from engine.log import Acks, EventLog, Wake
from engine.skips import apply_or_skip, find_skip
from engine.view import PartitionView

logger = logging.getLogger("ploy.runtime")

Applied = list[tuple[int, Event]]
LEASE_S = 1.0  # a fold loop silent this long (a frozen process) must re-check its claims
# The fold's fetch wait when this process writes nearly all it folds (``start(alone=True)``):
# the embedded broker answers a fetch with nothing to give only when the wait runs out,
# so at 10 ms (the default, for workers that fold what other workers write) an idle or
# lightly loaded engine asks it 100 times a second. engine.bench peer, alternating:
# broker CPU per execution 1.2-1.5 -> 0.74-0.97 ms, 419-491 -> 469-528 exec/s.
ALONE_FETCH_WAIT_MS = 100


class Partitions:
    """Views of every partition; the fold thread for those followed."""

    def __init__(self, log: EventLog, state_path: Path,
                 on_applied: Callable[[int, Applied], None], retention_ms: int | None = None):
        self.log = log
        self.state_path = state_path
        self.retention_ms = retention_ms  # engine.retention
        self.on_applied = on_applied
        self.views: dict[int, PartitionView] = {}
        self.following: set[int] = set()
        self.stalled: dict[int, CorruptEventError] = {}
        self.lease_broken = False  # set by a gap in the fold loop (a frozen process)
        self.last_poll = time.monotonic()
        self._skips: dict[int, tuple[int, Event, int]] = {}  # stalled partition -> its skip
        self._commands: list[tuple[str, int]] = []  # ("follow" | "unfollow", partition)
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()  # one fold at a time: the fetch's or the acks'
        # What both folds applied, in log order (appended in the fold lock), for the loop.
        self._handoff: collections.deque[tuple[int, Applied]] = collections.deque()
        self._waiters: dict[int, list[tuple[int, asyncio.Future[None]]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- start and stop ----------------------------------------------------------

    def open(self) -> None:
        """Open the view of every partition (cheap; only followed ones are folded)."""
        for p in range(self.log.partitions):
            self.views[p] = PartitionView(self.state_path / f"p{p}", self.log.topic, p,
                                          self.log.codec, retention_ms=self.retention_ms)
            self._waiters[p] = []

    async def start(self, follow: Iterable[int], *, alone: bool = False) -> None:
        """Catch ``follow`` up to the end of the log, then fold on in the fold thread.

        ``alone``: this process writes nearly all its partitions get (a single worker,
        ``ploy dev``) and folds its own appends as they are acknowledged, so the fetch
        only brings what others write (an operator's ``ploy skip``, a connector in
        another process) and may wait longer for it: ``ALONE_FETCH_WAIT_MS``, unless the
        app's Kafka settings name a wait of their own.
        """
        self._loop = asyncio.get_running_loop()
        self.following = set(follow)
        await asyncio.to_thread(self._catch_up, sorted(self.following))
        consumer = self.log.consumer(
            group_id=f"{self.log.topic}.worker",
            defaults={"fetch.wait.max.ms": ALONE_FETCH_WAIT_MS} if alone else None)
        consumer.assign([TopicPartition(self.log.topic, p, self.views[p].next_offset)
                         for p in sorted(self.following) if p not in self.stalled])
        self._consumer = consumer
        self._thread = threading.Thread(target=self._fold_loop, name="ploy-fold", daemon=True)
        self._thread.start()
        self.log.on_acked = self.fold_acked

    async def stop(self) -> None:
        self.log.on_acked = None
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        with self._fold_lock:  # not while a fold writes into them
            for view in self.views.values():
                view.close()
            self.views.clear()

    # -- what is followed -----------------------------------------------------------

    def follow(self, partition: int) -> None:
        """Fold ``partition`` from its view's next offset on (from any thread)."""
        with self._lock:
            self.following.add(partition)
            self._commands.append(("follow", partition))

    def unfollow(self, partition: int) -> None:
        """Stop folding ``partition``; its view stays on disk, warm for a return."""
        with self._lock:
            self.following.discard(partition)
            self._commands.append(("unfollow", partition))

    def folds(self, partition: int) -> bool:
        """Whether this process's view of ``partition`` is kept up to date."""
        return partition in self.following

    # -- read-your-writes -------------------------------------------------------------

    async def folded(self, partition: int, offset: int, timeout_s: float = 30.0) -> None:
        """Return once the view of ``partition`` holds the event at ``offset``."""
        view = self.views[partition]
        if view.next_offset > offset:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (offset, future)
        self._waiters[partition].append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        finally:
            if future.cancelled():  # timed out (or the caller cancelled): none to wake
                with contextlib.suppress(ValueError):
                    self._waiters[partition].remove(waiter)

    async def caught_up(self, partition: int, offset: int | None = None,
                        timeout_s: float = 10.0) -> PartitionView | None:
        """The view once it holds ``offset`` (default: every event this process had
        acknowledged there); None if this process does not fold the partition."""
        view = self.views.get(partition)
        if view is None or partition not in self.following:
            return None
        if partition in self.stalled:
            return view
        target = self.log.high_acked.get(partition, -1) if offset is None else offset
        try:
            await self.folded(partition, target, timeout_s)
        except TimeoutError:
            logger.warning("partition %d: view still behind offset %d after %g s",
                           partition, target, timeout_s)
        return view

    def end_of(self, partition: int) -> int:
        """The offset of the partition's last record (read to its end), -1 if empty.

        Blocking: call it in a thread.
        """
        last = self.views[partition].next_offset - 1
        for batches in self.log.read_until_end({partition: last + 1}):
            for offset, _ in batches.get(partition, []):
                last = max(last, offset)
        return last

    # -- corrupt records ---------------------------------------------------------------

    async def watch_stalled(self, stopping: Callable[[], bool]) -> None:
        """Look ahead on each stopped partition for an operator's skip marker (``ploy skip``)."""
        while not stopping():
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
                if stopping():
                    return
                await asyncio.sleep(0.1)

    # -- the fold thread ------------------------------------------------------------------

    def _catch_up(self, partitions: list[int]) -> None:
        """Fold ``partitions`` up to the end of the log (start-up, before the thread)."""
        start = {p: self.views[p].next_offset for p in partitions}
        stopped = set(self.stalled)
        for batches in self.log.read_until_end(start, stopped=stopped):
            for p, records in batches.items():
                self._fold(p, records)
            stopped.update(self.stalled)

    def _fold(self, partition: int, records: list[tuple[int, bytes]]) -> Applied:
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

    def fold_acked(self, acks: Acks, wake: Wake) -> None:
        """On the producer's thread: have ``wake`` resolve the waiting appends, then fold
        them on the event loop (``_fold_acked_here``) once the coroutines that waited
        have gone on: a step's next append goes to the broker while its last is folded,
        not after. engine.bench peer, alternating: folding on the loop after the
        waiters instead of on this thread before, trigger to result 5.6-6.9 -> 4.7-5.6
        ms, a 1 s sleep at the client 8.1-9.0 -> 7.2-8.0 ms late, 10,000 sleepers
        6.6-6.7 -> 5.3-5.9 s; after the runners too (two turns on, not one), trigger
        to result 4.0-5.4 -> 3.5-3.9 ms, 484-532 -> 448-649 exec/s, and in-process
        (sequential) 3.8-5.4 -> 2.4-3.1 ms.
        """
        loop = self._loop
        if loop is None:
            return

        def after_waiters() -> None:
            # Two turns on: a coroutine that awaits its append through asyncio.shield (a
            # runner does) resumes one turn after the append's future is resolved.
            loop.call_soon(loop.call_soon, self._fold_acked_here, acks)

        wake(loop, after_waiters)

    def _fold_acked_here(self, acks: Acks) -> None:
        """On the event loop: fold this process's acknowledged appends, each partition's
        run that starts at its view's next offset (see the module docstring).

        Anything else is left to the fetch: a record after a gap, a fold that fails
        (the fetch meets the same failure and stops the partition, loudly), and all
        of it while the fold thread holds the lock (a catch-up, a look for a skip
        marker): the event loop never waits for the fold thread.
        """
        if not self._fold_lock.acquire(blocking=False):
            return
        try:
            if self._stop.is_set():
                return
            runs: dict[int, list[tuple[int, bytes]]] = {}
            for partition, offset, value in acks:
                runs.setdefault(partition, []).append((offset, value))
            for p, records in runs.items():
                view = self.views.get(p)
                if view is None or p not in self.following or p in self.stalled:
                    continue
                run = _run_from(view.next_offset, records)
                if not run:
                    continue
                try:  # (applied may be empty: claims; readers of the offset still wake)
                    self._handoff.append((p, view.apply(run)[0]))
                except Exception:  # nothing of it written: the fetch folds it (or stops)
                    logger.debug("partition %d: folding acknowledged appends", p,
                                 exc_info=True)
        finally:
            self._fold_lock.release()
        self._hand_over()

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        consumer = self._consumer
        assert consumer is not None
        assigned = {tp.partition for tp in consumer.assignment()}
        for command, p in commands:
            tp = TopicPartition(self.log.topic, p)
            if command == "follow" and p not in assigned and p not in self.stalled:
                tp.offset = self.views[p].next_offset
                consumer.incremental_assign([tp])
                assigned.add(p)
            elif command == "unfollow" and p in assigned:
                consumer.incremental_unassign([tp])
                assigned.discard(p)
        for p, (offset, marker, at) in list(self._skips.items()):
            del self._skips[p]
            failure, view = self.stalled.get(p), self.views.get(p)
            if failure is None or view is None or failure.offset != offset:
                continue
            with self._fold_lock:
                view.skip(offset, marker, at)
            del self.stalled[p]
            logger.warning("partition %d: skipped the record at offset %d (%s); folding on",
                           p, offset, marker.body)
            if p in self.following:
                consumer.incremental_assign([TopicPartition(self.log.topic, p, offset + 1)])

    def _fold_loop(self) -> None:
        assert self._loop is not None
        last = time.monotonic()
        while not self._stop.is_set():
            # Step 1.
            if self._commands or self._skips:
                self._apply_commands()
            # Step 2.
            try:
                batches = self._poll(0.05)
            except Exception:  # a closed consumer at shutdown
                if self._stop.is_set():
                    return
                raise
            now = time.monotonic()
            if now - last > LEASE_S:
                self.lease_broken = True  # frozen or starved: claims may have moved
            last = self.last_poll = now  # after the flag: a reader sees one or the other
            # Step 3.
            if batches:
                with self._fold_lock:
                    self._fold_polled(batches)

    def _fold_polled(self, batches: dict[int, list[tuple[int, bytes]]]) -> None:
        """Steps 3 and 4 of the fold thread (in the fold lock)."""
        assert self._loop is not None
        if self._stop.is_set():
            return  # stopping: the views may be closed
        folded = False
        for p, records in batches.items():
            if p not in self.following:
                continue  # unfollowed since it was polled: a later follow refetches
            view = self.views[p]
            if records[-1][0] < view.next_offset:
                continue  # this process's own appends, folded on their acknowledgement
            try:
                applied = self._fold(p, records)
            except Exception as exc:  # e.g. a disk error: stop this partition, loudly
                logger.exception("partition %d: the fold failed", p)
                self.stalled[p] = CorruptEventError(self.log.topic, p, view.next_offset,
                                                    f"fold failed: {exc!r}")
                continue
            self._handoff.append((p, applied))
            folded = True
        # Step 4. One wake-up of the event loop per poll, not per partition.
        if folded:
            self._loop.call_soon_threadsafe(self._hand_over)

    def _poll(self, timeout_s: float) -> dict[int, list[tuple[int, bytes]]]:
        """What has arrived, as soon as anything has: wait for one record, then take
        what is queued without waiting (``consume(n, t)`` alone waits the whole ``t``
        unless ``n`` records arrive, which put up to 50 ms on every fold hop)."""
        consumer = self._consumer
        by_partition: dict[int, list[tuple[int, bytes]]] = {}
        first = consumer.poll(timeout_s)
        if first is None:
            return by_partition
        for msg in [first, *consumer.consume(4999, 0)]:
            if msg.error() is not None:
                logger.warning("consumer: %s", msg.error())
                continue
            by_partition.setdefault(msg.partition(), []).append((msg.offset(), msg.value()))
        return by_partition

    def _hand_over(self) -> None:
        """On the event loop: everything either fold applied so far, in log order (a
        fetch's hand-over may come after a later fold of acknowledged appends)."""
        while self._handoff:
            partition, applied = self._handoff.popleft()
            self._applied(partition, applied)

    def _applied(self, partition: int, applied: Applied) -> None:
        """On the event loop: tell the runtime, then wake the readers waiting for an offset
        (they wake even if the runtime failed on it: what it did not start, a reader
        of the offset may)."""
        try:
            self.on_applied(partition, applied)
        except Exception:
            logger.exception("partition %d: handing on what the fold applied", partition)
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


def _run_from(next_offset: int, records: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The records that continue a view at ``next_offset`` without a gap."""
    run: list[tuple[int, bytes]] = []
    for offset, value in records:
        if offset < next_offset:
            continue  # already folded (by the fetch)
        if offset != next_offset:
            break  # another writer's record comes first: the fetch folds on from there
        run.append((offset, value))
        next_offset += 1
    return run
