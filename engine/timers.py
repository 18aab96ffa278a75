"""Due timers -> ``TimerFired``: what wakes a durably sleeping execution.

The fold indexes every pending sleep by wake time (``keys.TIMER``). The
schedule keeps each owned partition's earliest timers in memory, sleeps until
the earliest is due (no polling period), and appends ``TimerFired`` once the
clock reaches ``wake_at``, never before; the fold deletes the timer, and the
runtime resumes the execution by replay.
An append that is acknowledged but not yet folded is remembered here, so a
timer is not fired twice by one process; should it be (a crash in between),
the fold ignores the second firing.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from typing import TYPE_CHECKING

from engine.clock import Clock
from engine.events import Event, SleepScheduled, TimerFired, WaitStarted

if TYPE_CHECKING:
    from engine.view import PartitionView

logger = logging.getLogger("ploy.timers")

WINDOW = 10_000  # timers of one partition read into memory at a time; later ones wait on disk
MAX_WAIT_S = 1.0  # look again at least this often (a wall clock set ahead; a may_fire that changed)
RETRY_S = 0.5  # a TimerFired append that failed is tried again after this
INLINE_READS = 64  # due timers checked against the view on the event loop itself (~10 us each)
EARLY_S = 0.001  # asyncio may wake a hair before the wall clock's due time: sleep a hair more

Timer = tuple[int, str, str]
"""(wake_at, execution id, sleep key): ordered as the view's timer keys are."""

AppendFired = Callable[[str, str, str, int, int], Awaitable[object]]
"""``append_fired(execution_id, workflow, sleep_key, wake_at, partition)``: append
``TimerFired`` and wait for its acknowledgement (raise if it was not appended)."""


class _Partition:
    """One owned partition's timers: the earliest ones in a heap, the later ones on disk.

    Invariant: every pending timer at or before ``horizon`` is in ``known`` (unless it
    is being fired); with ``complete`` every pending timer is. ``known`` may also hold
    timers that have since fired or been cancelled: they are dropped when reached.
    """

    def __init__(self, view: PartitionView):
        self.view = view
        self.heap: list[Timer] = []
        self.known: set[Timer] = set()
        self.loaded = False  # the first scan has returned
        self.scanning = False  # a scan is under way: what the fold adds meanwhile is kept
        self.complete = False
        self.horizon: Timer | None = None  # the last timer the scans read

    def add(self, timer: Timer) -> None:
        if timer not in self.known:
            self.known.add(timer)
            heapq.heappush(self.heap, timer)

    def covers(self, timer: Timer) -> bool:
        """Whether ``timer`` belongs in memory (else a later scan reads it from disk)."""
        return not self.loaded or self.scanning or self.complete or (
            self.horizon is not None and timer <= self.horizon)

    def peek(self) -> Timer | None:
        """The earliest pending timer, or None when there is none or a scan must come first."""
        while self.heap and self.heap[0] not in self.known:
            heapq.heappop(self.heap)
        if not self.loaded or self.needs_scan():
            return None
        return self.heap[0] if self.heap else None

    def needs_scan(self) -> bool:
        if not self.loaded:
            return True
        if self.complete:
            return False
        return not self.heap or (self.horizon is not None and self.heap[0] > self.horizon)

    def pop(self) -> Timer:
        timer = heapq.heappop(self.heap)
        self.known.discard(timer)
        return timer

    def scanned(self, found: list[Timer], window: int) -> None:
        for timer in found:
            self.add(timer)
        self.loaded, self.scanning = True, False
        if len(found) < window:
            self.complete, self.horizon = True, None
        else:
            self.horizon = found[-1]
        self.trim(window)

    def trim(self, window: int) -> None:
        """Past twice ``window`` in memory, keep the ``window`` earliest: the rest are on
        disk, read when reached (a million sleepers do not all live in memory)."""
        if not self.complete or self.scanning or len(self.known) <= 2 * window:
            return
        kept = heapq.nsmallest(window, self.known)
        self.known, self.heap = set(kept), kept  # sorted: a valid heap
        self.complete, self.horizon = False, kept[-1]


class TimerSchedule:
    """Appends ``TimerFired`` for the due timers of the partitions this process owns.

    The runtime tells it what it owns and what the fold applied; it never reads
    the runtime. Protocol:
    1. ``load(partition, view)`` when a claim lands: the partition's earliest
       timers (up to ``window``) are read from the view, off the event loop, by
       one bounded scan; later ones are read a window at a time once reached.
    2. ``on_folded(partition, applied)`` after each fold batch: a
       ``SleepScheduled`` adds its timer (waking the schedule if it is the
       earliest), a ``TimerFired`` removes it. A timer that ended otherwise (a
       cancel) is dropped when reached: before firing, the view is asked
       whether the timer is still pending.
    3. One task sleeps until the earliest wake time (or until woken: a new
       earlier timer, a load, a :class:`~engine.clock.ManualClock` advanced).
       When the clock reaches a timer's ``wake_at``, never before, and
       ``may_fire(partition)`` holds, it calls ``append_fired``; an append that
       fails is tried again after ``RETRY_S``. A timer whose append was
       acknowledged is not fired again by this process until the fold has
       applied that ``TimerFired``.
    4. ``drop(partition)`` on revocation: its timers are forgotten.
    """

    def __init__(self, clock: Clock, append_fired: AppendFired,
                 may_fire: Callable[[int], bool], *, window: int = WINDOW):
        self.clock = clock
        self.append_fired = append_fired
        self.may_fire = may_fire
        self.window = window
        self._parts: dict[int, _Partition] = {}
        # (execution id, sleep key) -> (partition, acknowledged): fired, not yet folded
        self._in_flight: dict[tuple[str, str], tuple[int, bool]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._firing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- what the runtime calls (on the event loop) ------------------------------------

    def load(self, partition: int, view: PartitionView) -> None:
        """Step 1: schedule the timers of a partition this process now owns."""
        self._parts[partition] = _Partition(view)
        self._forget_acknowledged(partition)
        self.kick()

    def drop(self, partition: int) -> None:
        """Step 4: forget a partition this process no longer owns."""
        self._parts.pop(partition, None)
        self._forget_acknowledged(partition)

    def on_folded(self, partition: int, applied: Iterable[tuple[int, Event]]) -> None:
        """Step 2: follow the timers the fold just added or fired."""
        part = self._parts.get(partition)
        if part is None:
            return
        earliest = part.heap[0] if part.heap else None
        for _, event in applied:
            body = event.body
            if isinstance(body, SleepScheduled | WaitStarted):
                timer = _timer_of(event.execution_id, body)
                if timer is not None and part.covers(timer):
                    part.add(timer)
            elif isinstance(body, TimerFired):
                self._in_flight.pop((event.execution_id, body.sleep), None)
                part.known.discard((body.wake_at, event.execution_id, body.sleep))
        part.trim(self.window)
        if part.heap and (earliest is None or part.heap[0] < earliest):
            self.kick()

    def kick(self) -> None:
        """Look at the schedule again now (e.g. after ``may_fire`` may have changed)."""
        self._wake.set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.clock.on_advance(self._kick_threadsafe)
        self._task = asyncio.create_task(self._run(), name="ploy-timers")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = [t for t in (self._task, *self._firing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    # -- the task ------------------------------------------------------------------

    def _kick_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.kick)

    def _forget_acknowledged(self, partition: int) -> None:
        """Acknowledged firings of ``partition``: a new claim has folded the log past
        them, so a timer still pending now was not fired (a fenced append, say)."""
        for key, (p, acked) in list(self._in_flight.items()):
            if p == partition and acked:
                del self._in_flight[key]

    async def _run(self) -> None:
        """Step 3."""
        while True:
            self._wake.clear()
            try:
                scanned_all = await self._scan()
                delay = self._fire_due()
                if scanned_all and any(p.needs_scan() for p in self._parts.values()):
                    delay = 0  # a partition fired its whole window: read the next one now
            except Exception:
                logger.exception("timer schedule")
                delay = RETRY_S
            timeout = MAX_WAIT_S if delay is None else min(delay + EARLY_S, MAX_WAIT_S)
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _scan(self) -> bool:
        """Read the next window of timers of every partition that has reached its horizon;
        False if a scan failed (it is tried again after ``RETRY_S``)."""
        ok = True
        for partition, part in list(self._parts.items()):
            if not part.needs_scan():
                continue
            part.scanning = True
            try:
                found = await asyncio.to_thread(part.view.timers, part.horizon, self.window)
            except Exception:  # e.g. a view closed under the scan by a revocation
                logger.exception("partition %d: reading its timers", partition)
                part.scanning = False
                ok = False
                continue
            if self._parts.get(partition) is part:  # not dropped or reloaded meanwhile
                part.scanned(found, self.window)
        return ok

    def _fire_due(self) -> float | None:
        """Start firing every due timer; the seconds until the next one is due (None: none)."""
        now = self.clock.now()
        earliest: int | None = None
        due: list[tuple[int, PartitionView, Timer]] = []
        for partition, part in self._parts.items():
            if not self.may_fire(partition):
                continue  # looked at again after MAX_WAIT_S or a kick
            while (timer := part.peek()) is not None:
                if timer[0] > now:
                    earliest = timer[0] if earliest is None else min(earliest, timer[0])
                    break
                part.pop()
                key = (timer[1], timer[2])
                if key in self._in_flight:
                    continue  # fired already: folded soon, or tried again after a failure
                self._in_flight[key] = (partition, False)
                due.append((partition, part.view, timer))
        if due:
            task = asyncio.create_task(self._fire(due), name="ploy-timers-fire")
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)
        return None if earliest is None else (earliest - now) / 1000

    async def _fire(self, due: list[tuple[int, PartitionView, Timer]]) -> None:
        """Append ``TimerFired`` for each timer still pending; try the failures again later."""
        try:
            if len(due) <= INLINE_READS:  # a few point reads: no thread hop, which under load
                ready = _still_pending(due)  # waits behind the pool's other work
            else:
                ready = await asyncio.to_thread(_still_pending, due)
        except Exception as exc:  # a view closed meanwhile: try again after RETRY_S
            logger.warning("timers: reading the view: %s", exc)
            for partition, _, timer in due:
                self._retry_later(partition, timer)
            return
        for partition, _, timer in due:
            if (partition, timer) not in ready:
                self._in_flight.pop((timer[1], timer[2]), None)  # fired or cancelled: gone
        items = list(ready.items())
        results = await asyncio.gather(*(
            self.append_fired(timer[1], workflow, timer[2], timer[0], partition)
            for (partition, timer), workflow in items), return_exceptions=True)
        for ((partition, timer), _), result in zip(items, results, strict=True):
            key = (timer[1], timer[2])
            if isinstance(result, BaseException):
                logger.warning("timer %s of %s: %s", timer[2], timer[1], result)
                self._retry_later(partition, timer)
            elif key in self._in_flight:
                self._in_flight[key] = (partition, True)

    def _retry_later(self, partition: int, timer: Timer) -> None:
        def retry() -> None:
            self._in_flight.pop((timer[1], timer[2]), None)
            part = self._parts.get(partition)
            if part is not None:
                part.add(timer)
                self.kick()

        asyncio.get_running_loop().call_later(RETRY_S, retry)


def _timer_of(eid: str, body: SleepScheduled | WaitStarted) -> Timer | None:
    """The timer a sleep or a wait with a timeout sets (a wait's ``TimerFired`` times it out)."""
    if isinstance(body, SleepScheduled):
        return body.wake_at, eid, body.sleep
    return None if body.timeout_at is None else (body.timeout_at, eid, body.wait)


def _still_pending(due: list[tuple[int, PartitionView, Timer]]) -> dict[tuple[int, Timer], str]:
    """(partition, timer) -> workflow of each due timer the view still has (blocking reads)."""
    ready: dict[tuple[int, Timer], str] = {}
    for partition, view, timer in due:
        if view.has_timer(*timer):
            record = view.record(timer[1])
            ready[partition, timer] = record["workflow"] if record else ""
    return ready
