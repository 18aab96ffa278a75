"""The timer schedule on a real view (RocksDB in tmp_path), its appends folded as the
runtime folds them: no broker needed, the clock injected."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path

import pytest

from engine import timers
from engine.clock import ManualClock
from engine.codec import default_codec
from engine.events import (
    Body,
    CancelRequested,
    Event,
    SleepScheduled,
    TimerFired,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.timers import TimerSchedule
from engine.view import PartitionView

CODEC = default_codec()
HOUR = 3600 * 1000


class Rig:
    """One partition's view, a schedule on it, and an append that folds what it appends."""

    def __init__(self, path: Path, *, window: int = 10_000, fold_appends: bool = True):
        self.clock = ManualClock()
        self.view = PartitionView(path, "t", 0)
        self.offset = itertools.count()
        self.fired: list[tuple[str, str, str, int, int, int]] = []  # ..., clock at append
        self.failures = 0  # appends to fail before the next succeeds
        self.fold_appends = fold_appends
        self.allowed = True
        self.loop = asyncio.get_running_loop()
        self.schedule = TimerSchedule(self.clock, self.append_fired, lambda p: self.allowed,
                                      window=window)

    def fold(self, *events: tuple[str, Body]) -> None:
        records = [(next(self.offset), CODEC.encode(Event(eid, "wf", self.clock.now(), body)))
                   for eid, body in events]
        applied, failure = self.view.apply(records)
        assert failure is None
        self.schedule.on_folded(0, applied)

    def started_with_one(self, in_ms: int) -> int:
        """The schedule started on a view with one sleeper ("e1") due in ``in_ms``."""
        wake_at = self.clock.now() + in_ms
        self.sleeper("e1", wake_at)
        self.schedule.load(0, self.view)
        self.schedule.start()
        return wake_at

    def sleeper(self, eid: str, wake_at: int, sleep: str = "sleep#1") -> None:
        self.fold((eid, WorkflowTriggered("{}")), (eid, WorkflowStarted("w")),
                  (eid, SleepScheduled(sleep, 1, wake_at)))

    def append_fired(self, eid: str, workflow: str, sleep: str, wake_at: int,
                     partition: int, done: timers.Done) -> None:
        """The schedule's ``fire``, called in its alarm thread: the fold on the loop."""
        if self.failures:
            self.failures -= 1
            self.loop.call_soon_threadsafe(done, ConnectionError("broker away"))
            return
        self.fired.append((eid, workflow, sleep, wake_at, partition, self.clock.now()))
        if self.fold_appends:
            self.loop.call_soon_threadsafe(self.fold, (eid, TimerFired(sleep, wake_at)))
        self.loop.call_soon_threadsafe(done, None)

    async def settle(self, seconds: float = 0.15) -> None:
        await asyncio.sleep(seconds)


@pytest.fixture
async def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Rig] = []

    def make(**kwargs: object) -> Rig:
        r = Rig(tmp_path / f"p{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        await r.schedule.stop()
        r.view.close()


async def test_a_timer_fires_at_its_wake_time_never_before(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    wake_at = r.started_with_one(300)
    await asyncio.sleep(0.2)
    assert r.fired == []
    deadline = time.monotonic() + 2
    while not r.fired and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    (eid, workflow, sleep, at, partition, now), = r.fired
    assert (eid, workflow, sleep, at, partition) == ("e1", "wf", "sleep#1", wake_at, 0)
    assert wake_at <= now < wake_at + 100  # on time, not polled
    assert r.view.record("e1")["status"] == "running"  # type: ignore[index]
    await r.settle()
    assert len(r.fired) == 1


async def test_the_switch_interval_is_short_only_while_a_timer_is_near(rig) -> None:  # type: ignore[no-untyped-def]
    """The alarm thread gets the interpreter lock soon after it wakes (engine.timers);
    an app's own switch interval is what it goes back to."""
    default = sys.getswitchinterval()
    normal = 0.002
    sys.setswitchinterval(normal)
    try:
        await _short_while_near(rig, normal)
    finally:
        sys.setswitchinterval(default)


async def _short_while_near(rig, normal: float) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    r.started_with_one(300)
    await asyncio.sleep(0.15)
    assert sys.getswitchinterval() == normal  # due in 150 ms: not near yet
    seen = set()
    deadline = time.monotonic() + 2
    while not r.fired and time.monotonic() < deadline:
        seen.add(sys.getswitchinterval())
        await asyncio.sleep(0.001)
    assert len(r.fired) == 1
    assert timers.FAST_SWITCH_S in seen
    await r.settle()
    assert sys.getswitchinterval() == normal  # nothing left to fire


async def test_a_manual_clock_advanced_wakes_a_day_long_sleep_at_once(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    r.schedule.load(0, r.view)
    r.schedule.start()
    r.sleeper("e1", r.clock.now() + 24 * HOUR)
    r.clock.advance(23 * HOUR)
    await r.settle()
    assert r.fired == []
    started = time.monotonic()
    r.clock.advance(HOUR)
    while not r.fired and time.monotonic() - started < 2:
        await asyncio.sleep(0.002)
    assert len(r.fired) == 1
    assert time.monotonic() - started < 0.1  # woken by the advance, not after MAX_WAIT_S


async def test_an_earlier_timer_that_arrives_wakes_the_schedule_early(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    r.sleeper("late", r.clock.now() + HOUR)
    r.schedule.load(0, r.view)
    r.schedule.start()
    await r.settle(0.05)
    r.sleeper("soon", r.clock.now() + 150)
    await asyncio.sleep(0.4)
    assert [f[0] for f in r.fired] == ["soon"]


async def test_a_failed_append_is_tried_again_and_fires_once(
        rig, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(timers, "RETRY_S", 0.05)
    r = rig()
    r.failures = 2
    r.sleeper("e1", r.clock.now())
    r.schedule.load(0, r.view)
    r.schedule.start()
    await asyncio.sleep(0.4)
    assert [f[0] for f in r.fired] == ["e1"]
    assert r.failures == 0


async def test_an_acknowledged_firing_is_not_repeated_before_it_is_folded(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(fold_appends=False)
    r.sleeper("e1", r.clock.now())
    r.schedule.load(0, r.view)
    r.schedule.start()
    await r.settle()
    for _ in range(3):
        r.clock.advance(1000)
        r.schedule.kick()
        await r.settle(0.05)
    assert len(r.fired) == 1
    r.fold(("e1", TimerFired("sleep#1", r.fired[0][3])))  # the fold catches up
    r.schedule.kick()
    await r.settle(0.05)
    assert len(r.fired) == 1
    # A new claim of the partition: the view is folded past what was acknowledged.
    r.schedule.load(0, r.view)
    await r.settle(0.05)
    assert len(r.fired) == 1


async def test_a_cancelled_or_dropped_or_unowned_timer_does_not_fire(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    r.sleeper("cancelled", r.clock.now() + 100)
    r.sleeper("kept", r.clock.now() + 100)
    r.schedule.load(0, r.view)
    r.schedule.start()
    r.fold(("cancelled", CancelRequested("no")))
    r.allowed = False  # e.g. a newer claim seen: this process may not fire there now
    r.clock.advance(1000)
    await r.settle()
    assert r.fired == []
    r.allowed = True
    r.schedule.kick()
    await r.settle()
    assert [f[0] for f in r.fired] == ["kept"]
    r.sleeper("dropped", r.clock.now() + 100)
    r.schedule.drop(0)
    r.clock.advance(1000)
    await r.settle()
    assert [f[0] for f in r.fired] == ["kept"]
    assert r.view.has_timer(*r.view.timers()[0])  # still pending: the next owner fires it


async def test_timers_beyond_the_window_are_read_when_reached(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(window=4)
    base = r.clock.now() + 10_000
    for i in range(23):
        r.sleeper(f"e{i:02d}", base + 10 * i)
    r.schedule.load(0, r.view)
    r.schedule.start()
    await r.settle(0.05)
    part = r.schedule._parts[0]
    assert len(part.known) <= 8  # not all 23 in memory
    # Sleeps scheduled after the load, before and beyond the window.
    r.sleeper("early", base - 5000)
    r.sleeper("later", base + 100_000)
    r.clock.advance(200_000)
    deadline = time.monotonic() + 3
    while len(r.fired) < 25 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    names = [f[0] for f in r.fired]
    assert sorted(names) == sorted([f"e{i:02d}" for i in range(23)] + ["early", "later"])
    assert names[:2] == ["early", "e00"]
    assert r.view.timers() == []
