"""Triggers before starts: a burst of triggers is answered before the work it starts.

One event loop accepts triggers (an HTTP request, a binding's ``trigger``, a
schedule) and runs executions. Started as each trigger is acknowledged, a
burst's executions share the loop with the triggers still arriving, and the
last caller waits for most of the burst's work before its answer. A caller
asked for a durable record that the execution will run, not for the run: an
ingress answers first (Restate's ingress and Inngest's event API answer before
anything runs, too).

So while a burst is being accepted, new executions wait:

1. A burst begins when ``BURST`` triggers are being accepted at once (from the
   call to the acknowledgement). Fewer at once start on the acknowledgement, and
   a lone one as it goes out (``lone``): a lone or sequential caller waits for
   nothing more.
2. During a burst, every execution the fold makes startable by its
   ``WorkflowTriggered`` (this process's triggers, another process's, a
   child's) is held, in log order.
3. The burst ends ``GRACE_S`` after the last trigger in flight was answered
   with none arriving since (the callers of a burst send the next as the last
   is answered), or ``MAX_HOLD_S`` after it began. Then the held executions
   start in log order, ``CHUNK`` per turn of the loop; one that becomes
   startable meanwhile takes its turn after them. Once they are started, new
   ones start on their acknowledgement again.
4. A burst cut short by ``MAX_HOLD_S`` is a steady load, not a burst: no new
   one begins until no trigger has been in flight for ``GRACE_S``, so triggers
   and executions share the loop as they did before (and the callers feel the
   load) instead of the executions falling ever further behind.

Nothing here is durable: a held execution is ``queued`` in the view, and a
restart starts it as it starts any unfinished execution.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger("ploy.runtime")

BURST = 16  # triggers being accepted at once that make a burst
# Quiet after the last answer that ends one: longer than a busy 2-core machine keeps a
# caller off the CPU (the peer workload's bursts of 1,000: 2 ms ended 2 of 4 early,
# 5 and 10 ms none of 8)
GRACE_S = 0.010
MAX_HOLD_S = 1.0  # the longest a burst holds executions, from its beginning
CHUNK = 64  # held executions started per turn of the loop once it ends


class Ingress:
    """Counts the triggers being accepted; holds new executions during a burst."""

    def __init__(self, start: Callable[[str], None]):
        self._start = start
        self.accepting = 0
        self.burst = False
        self._armed = True  # step 4: False from a cut-short burst until a quiet moment
        self._stopped = False
        self._held: list[str] = []  # by the burst under way
        self._starting: list[str] = []  # held by one that ended (and since), being started
        self._quiet: asyncio.TimerHandle | None = None  # step 3: the grace
        self._deadline: asyncio.TimerHandle | None = None  # step 3: MAX_HOLD_S
        self._releasing = False

    def enter(self) -> None:
        """A trigger is being accepted."""
        self.accepting += 1
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if self.accepting >= BURST and self._armed and not self.burst and not self._stopped:
            self.burst = True
            self._deadline = asyncio.get_running_loop().call_later(
                MAX_HOLD_S, self._end, True)

    def leave(self) -> None:
        """A trigger was answered (or failed)."""
        self.accepting -= 1
        if self.accepting == 0 and (self.burst or not self._armed):
            self._quiet = asyncio.get_running_loop().call_later(GRACE_S, self._quiet_moment)

    def _quiet_moment(self) -> None:
        """``GRACE_S`` with no trigger in flight: a burst ends, a steady load is over."""
        self._quiet = None
        self._armed = True
        if self.burst:
            self._end(False)

    @property
    def holding(self) -> bool:
        """Whether a new execution waits (step 2): during a burst, and while the held ones
        are being started (it takes its turn after them)."""
        return self.burst or self._releasing

    @property
    def lone(self) -> bool:
        """Whether the trigger being accepted is the only one: it may start before its
        acknowledgement (``Runtime._append_trigger``). With others, it starts on its
        acknowledgement, when a burst they make is known."""
        return self.accepting == 1 and not self.holding

    @property
    def held(self) -> int:
        """How many executions wait: held by a burst, or not yet started after one."""
        return len(self._held) + len(self._starting)

    def hold(self, eid: str) -> bool:
        """Hold ``eid``'s start (True), or not: start it now (False)."""
        if self.burst:
            self._held.append(eid)
        elif self._releasing:
            self._starting.append(eid)
        else:
            return False
        return True

    def _end(self, cut_short: bool) -> None:
        self._cancel_timers()
        self.burst = False
        if cut_short and self.accepting:
            self._armed = False  # step 4
        self._starting += self._held
        self._held = []
        if self._starting and not self._releasing:
            self._releasing = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        """Start the next ``CHUNK`` held executions, the rest on the next turns. A start
        that fails is logged: the others still start (that one starts on a restart, a
        partition move, or the next event of it)."""
        chunk, self._starting = self._starting[:CHUNK], self._starting[CHUNK:]
        try:
            for eid in chunk:
                try:
                    self._start(eid)
                except Exception:
                    logger.exception("execution %s: starting it after a burst failed", eid)
        finally:
            if self._starting:
                asyncio.get_running_loop().call_soon(self._release)
            else:
                self._releasing = False

    def _cancel_timers(self) -> None:
        for handle in (self._quiet, self._deadline):
            if handle is not None:
                handle.cancel()
        self._quiet = self._deadline = None

    def stop(self) -> None:
        """Forget what is held (a restart starts it from the view); hold nothing more."""
        self._stopped = True
        self._cancel_timers()
        self._held.clear()
        self._starting.clear()
        self.burst = False
