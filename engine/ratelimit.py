"""Rate limits: at most ``limit`` executions of one key value start per ``period``.

The window slides: a start at time ``t`` is allowed when fewer than ``limit``
executions of its key value started in ``(t - period, t]``, so no half-open
interval ``[s, s + period)`` ever holds more than ``limit`` starts. (Inngest's
throttle is a GCRA, which for a burst of ``limit`` gives the same bound; a log
of the recent starts is exact and has nothing to tune.)

A start is an execution's ``WorkflowStarted``: the window is rebuilt from the
view (``started_at`` of the running executions and of those that ended within
the period) when an owner claims the partition, so it survives restarts and
moves; between two claims the owner adds the starts it admits and corrects
each to its ``WorkflowStarted``'s time once folded (``engine.flow``).
"""

from __future__ import annotations

from engine.config import Rate


class Window:
    """The recent starts of one key value (execution id -> start time, ms)."""

    def __init__(self, rate: Rate):
        self.rate = rate
        self.starts: dict[str, int] = {}

    def started(self, eid: str, at: int) -> None:
        """``eid`` started at ``at`` (a later time wins: the one on the log, once folded,
        is at or after the time it was admitted)."""
        self.starts[eid] = max(self.starts.get(eid, at), at)

    def recent(self, now: int) -> list[int]:
        """The start times within the period before ``now``, oldest first (older ones
        are forgotten: they can never count again)."""
        since = now - self.rate.period_ms
        self.starts = {eid: at for eid, at in self.starts.items() if at > since}
        return sorted(self.starts.values())

    def wait_ms(self, now: int) -> int:
        """0 if one more may start at ``now``; else how long until one may."""
        recent = self.recent(now)
        if len(recent) < self.rate.limit:
            return 0
        # The oldest starts must leave the window until limit - 1 remain.
        return recent[len(recent) - self.rate.limit] + self.rate.period_ms - now
