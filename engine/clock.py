"""Time, injectable: the engine reads the wall clock only through a Clock.

Tests of a 24 h sleep swap in a :class:`ManualClock` and advance it; timers
then fire as if the day had passed. Whatever waits for a time on the clock
(the timer schedule) subscribes with :meth:`Clock.on_advance`, so a jump wakes
it at once instead of at the real time it computed before the jump.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Clock:
    """Wall-clock milliseconds since the Unix epoch."""

    def now(self) -> int:
        return self.now_ns() // 1_000_000

    def now_ns(self) -> int:
        """The same clock in nanoseconds (to sleep until a millisecond, not past it)."""
        return time.time_ns()

    def on_advance(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` whenever the clock is moved ahead by command; returns the
        function that unsubscribes it. The wall clock is never moved so: it never calls.
        The callback may be called from any thread."""
        return _nothing


def _nothing() -> None:
    return None


class ManualClock(Clock):
    """Real time plus an offset that only moves forward when told to.

    Durations still measure real time; :meth:`advance` jumps the clock ahead,
    so a 24 h sleep wakes as soon as a test advances 24 h.
    """

    def __init__(self) -> None:
        self.offset_ms = 0
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return super().now_ns() + self.offset_ms * 1_000_000

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` milliseconds."""
        if ms < 0:
            raise ValueError(f"a clock cannot go back ({ms} ms)")
        self.offset_ms += ms
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def on_advance(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe
