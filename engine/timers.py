"""Due timers -> ``TimerFired``: what wakes a durably sleeping execution.

The fold indexes every pending sleep by wake time (``keys.TIMER``). The
schedule keeps each owned partition's earliest timers in memory, sleeps until
the earliest is due (no polling period), and appends ``TimerFired`` once the
clock reaches ``wake_at``, never before; the fold deletes the timer, and the
runtime resumes the execution by replay.

The firing itself happens off the event loop, in the alarm thread: the loop
hands it each timer a little before it is due (``ARM_AHEAD_MS``), and the
thread appends ``TimerFired`` at the due time. A loop busy with thousands of
running executions delays what the workflow does next, not the timer: the
event, and its timestamp, are on time.
An append that is acknowledged but not yet folded is remembered here, so a
timer is not fired twice by one process; should it be (a crash in between),
the fold ignores the second firing.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterable
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
ARM_AHEAD_MS = 500  # a timer goes to the alarm thread this long before it is due
EARLY_S = 0.001  # the loop's wait may end a hair before the due time: it sleeps a hair more
ALARM_SLACK_S = 0.0001  # the alarm thread wakes this long after the due millisecond begins
# Waking is not firing: the alarm thread then needs the interpreter lock, and a thread
# that waits for it asks the holder to let go only after the switch interval (5 ms by
# default; under load the lock can pass to another waiting thread several times in a
# row). So while a timer is due within NEAR_S, the switch interval is FAST_SWITCH_S,
# and back to what it was after. engine.bench timers, loaded: fired late p50 5 -> 1 ms,
# p99 26 -> 10 ms. 1 ms all the time did as well but cost ~15% more CPU per execution;
# only near a timer, what the fast switching costs is paid then.
NEAR_S = 0.010
FAST_SWITCH_S = 0.0005

Timer = tuple[int, str, str]
"""(wake_at, execution id, sleep key): ordered as the view's timer keys are."""

Done = Callable[[BaseException | None], None]
Fire = Callable[[str, str, str, int, int, Done], None]
"""``fire(execution_id, workflow, sleep_key, wake_at, partition, done)``: append
``TimerFired`` now, from the alarm thread, without waiting; ``done(error)`` runs on
the event loop once it is acknowledged (error None) or was not appended."""


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
       ``may_fire(partition)`` holds, the alarm thread calls ``fire``; an append that
       fails is tried again after ``RETRY_S``. A timer whose append was
       acknowledged is not fired again by this process until the fold has
       applied that ``TimerFired``.
    4. ``drop(partition)`` on revocation: its timers are forgotten.
    """

    def __init__(self, clock: Clock, fire: Fire,
                 may_fire: Callable[[int], bool], *, window: int = WINDOW):
        self.clock = clock
        self.fire = fire
        self.may_fire = may_fire
        self.window = window
        self._parts: dict[int, _Partition] = {}
        # (execution id, sleep key) -> (partition, acknowledged): fired, not yet folded
        self._in_flight: dict[tuple[str, str], tuple[int, bool]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._alarm: _Alarm | None = None
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
        self._alarm = _Alarm(self.clock, self._fire_at_alarm)
        self._unsubscribe = self.clock.on_advance(self._kick_threadsafe)
        self._task = asyncio.create_task(self._run(), name="ploy-timers")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._alarm is not None:
            await asyncio.to_thread(self._alarm.stop)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    # -- the task ------------------------------------------------------------------

    def _kick_threadsafe(self) -> None:
        if self._alarm is not None:
            self._alarm.wake()  # a manual clock moved: what is armed may be due
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
                delay = self._arm_due()
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

    def _arm_due(self) -> float | None:
        """Hand the alarm thread every timer due within ``ARM_AHEAD_MS``; the seconds
        until the next one is (None: none)."""
        assert self._alarm is not None
        horizon = self.clock.now() + ARM_AHEAD_MS
        earliest: int | None = None
        armed: list[tuple[int, PartitionView, Timer]] = []
        for partition, part in self._parts.items():
            if not self.may_fire(partition):
                continue  # looked at again after MAX_WAIT_S or a kick
            while (timer := part.peek()) is not None:
                if timer[0] > horizon:
                    earliest = timer[0] if earliest is None else min(earliest, timer[0])
                    break
                part.pop()
                key = (timer[1], timer[2])
                if key in self._in_flight:
                    continue  # fired already: folded soon, or tried again after a failure
                self._in_flight[key] = (partition, False)
                armed.append((partition, part.view, timer))
        if armed:
            self._alarm.arm(armed)
        return None if earliest is None else (earliest - horizon) / 1000

    def _fire_at_alarm(self, partition: int, view: PartitionView, timer: Timer) -> None:
        """In the alarm thread, at the due time: append ``TimerFired`` if the timer is
        still pending and the partition still ours; the loop hears how it went."""
        loop = self._loop
        assert loop is not None
        try:
            if not self.may_fire(partition):
                workflow = None  # moved, or a claim to confirm: the loop arms it again
            else:
                workflow = _still_pending(view, timer)
                if workflow is None:  # fired or cancelled meanwhile: forget it
                    loop.call_soon_threadsafe(self._gone, timer)
                    return
        except Exception as exc:  # a view closed by a revocation, say
            logger.debug("timer %s of %s: %s", timer[2], timer[1], exc)
            workflow = None
        if workflow is None:
            loop.call_soon_threadsafe(self._not_fired, partition, timer)
            return
        try:
            self.fire(timer[1], workflow, timer[2], timer[0], partition,
                      functools.partial(self._fired, partition, timer))
        except Exception as exc:  # not handed to the producer (its queue full, say)
            loop.call_soon_threadsafe(self._fired, partition, timer, exc)

    def _gone(self, timer: Timer) -> None:
        self._in_flight.pop((timer[1], timer[2]), None)

    def _not_fired(self, partition: int, timer: Timer) -> None:
        """Back in the schedule (looked at again after MAX_WAIT_S or a kick)."""
        self._in_flight.pop((timer[1], timer[2]), None)
        part = self._parts.get(partition)
        if part is not None:
            part.add(timer)

    def _fired(self, partition: int, timer: Timer, error: BaseException | None) -> None:
        """On the event loop: how a firing went."""
        key = (timer[1], timer[2])
        if error is not None:
            logger.warning("timer %s of %s: %s", timer[2], timer[1], error)
            self._retry_later(partition, timer)
        elif key in self._in_flight:  # (not if the fold got there first)
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


def _still_pending(view: PartitionView, timer: Timer) -> str | None:
    """The workflow of a due timer the view still has, or None (blocking reads)."""
    if not view.has_timer(*timer):
        return None
    record = view.record(timer[1])
    return record["workflow"] if record else ""


class _SwitchInterval:
    """The interpreter's switch interval: ``FAST_SWITCH_S`` while any alarm of this
    process (one per engine) has a timer due within ``NEAR_S``, else what it was before
    (an app's own setting is kept: it is read, not assumed, each time one comes near)."""

    def __init__(self) -> None:
        self._normal = sys.getswitchinterval()
        self._near: set[object] = set()
        self._lock = threading.Lock()

    def near(self, alarm: object, near: bool) -> None:
        with self._lock:
            was = bool(self._near)
            if near:
                self._near.add(alarm)
            else:
                self._near.discard(alarm)
            if self._near and not was:
                self._normal = sys.getswitchinterval()
                sys.setswitchinterval(FAST_SWITCH_S)
            elif was and not self._near:
                sys.setswitchinterval(self._normal)


_SWITCH = _SwitchInterval()


class _Alarm:
    """The alarm thread: sleeps until the earliest armed timer is due on ``clock``, then
    calls ``fire(partition, view, timer)`` for each due one, never before its time."""

    def __init__(self, clock: Clock,
                 fire: Callable[[int, PartitionView, Timer], None]):
        self.clock = clock
        self.fire = fire
        self._heap: list[tuple[Timer, int, int, PartitionView]] = []
        self._armed = itertools.count()  # ties: never compare two views
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ploy-alarm", daemon=True)
        self._thread.start()

    def arm(self, timers: list[tuple[int, PartitionView, Timer]]) -> None:
        with self._cond:
            for partition, view, timer in timers:
                heapq.heappush(self._heap, (timer, partition, next(self._armed), view))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            _SWITCH.near(self, False)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = self.clock.now()
                    if self._heap and self._heap[0][0][0] <= now:
                        break
                    due_ns = self._heap[0][0][0] * 1_000_000 if self._heap else None
                    wait = MAX_WAIT_S if due_ns is None else min(
                        (due_ns - self.clock.now_ns()) / 1e9 + ALARM_SLACK_S, MAX_WAIT_S)
                    near = wait <= NEAR_S
                    _SWITCH.near(self, near)
                    self._cond.wait(wait if near else wait - NEAR_S)  # far: wake NEAR_S early
                if self._stopped:
                    return
                due = []
                while self._heap and self._heap[0][0][0] <= now:
                    due.append(heapq.heappop(self._heap))
            for timer, partition, _, view in due:
                try:
                    self.fire(partition, view, timer)
                except Exception:
                    logger.exception("timer %s of %s", timer[2], timer[1])
