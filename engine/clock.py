"""Time, injectable: the engine reads the wall clock only through a Clock.

Tests of a 24 h sleep swap in a :class:`ManualClock` and advance it; timers
then fire as if the day had passed.
"""

from __future__ import annotations

import time


class Clock:
    """Wall-clock milliseconds since the Unix epoch."""

    def now(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock(Clock):
    """Real time plus an offset that only moves forward when told to.

    Durations still measure real time; :meth:`advance` jumps the clock ahead,
    so a 24 h sleep wakes as soon as a test advances 24 h.
    """

    def __init__(self) -> None:
        self.offset_ms = 0

    def now(self) -> int:
        return super().now() + self.offset_ms

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` milliseconds."""
        if ms < 0:
            raise ValueError(f"a clock cannot go back ({ms} ms)")
        self.offset_ms += ms
