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
   call to the acknowledgement). Fewer at once start as before, on the
   acknowledgement: a lone or sequential caller waits for nothing more.
2. During a burst, every execution the fold makes startable by its
   ``WorkflowTriggered`` (from here or from another process) is held, in log
   order.
3. The burst ends ``GRACE_S`` after the last trigger in flight was answered
   with none arriving since (the callers of a burst send the next as the last
   is answered), or ``MAX_HOLD_S`` after its first execution was held, so a
   steady flood of triggers cannot keep executions waiting for good. Then the
   held executions start, ``CHUNK`` per turn of the loop.

Nothing here is durable: a held execution is ``queued`` in the view, and a
restart starts it as it starts any unfinished execution.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

BURST = 16  # triggers being accepted at once that make a burst
GRACE_S = 0.002  # quiet after the last answer that ends one
MAX_HOLD_S = 1.0  # the longest an execution waits for a burst to end
CHUNK = 64  # held executions started per turn of the loop once it ends


class Ingress:
    """Counts the triggers being accepted; holds new executions during a burst."""

    def __init__(self, start: Callable[[str], None]):
        self._start = start
        self.accepting = 0
        self.burst = False
        self._held: list[str] = []
        self._quiet: asyncio.TimerHandle | None = None  # step 3: the grace
        self._deadline: asyncio.TimerHandle | None = None  # step 3: MAX_HOLD_S
        self._releasing = False

    def enter(self) -> None:
        """A trigger is being accepted."""
        self.accepting += 1
        if self.accepting >= BURST:
            self.burst = True
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None

    def leave(self) -> None:
        """A trigger was answered (or failed)."""
        self.accepting -= 1
        if self.accepting == 0 and self.burst:
            self._quiet = asyncio.get_running_loop().call_later(GRACE_S, self._end, False)

    @property
    def holding(self) -> bool:
        """Whether a new execution waits (step 2): during a burst, and while the held
        ones are being started (they keep their order)."""
        return self.burst or bool(self._held)

    def hold(self, eid: str) -> bool:
        """Hold ``eid``'s start (True), or not: start it now (False)."""
        if not self.holding:
            return False
        self._held.append(eid)
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(MAX_HOLD_S, self._end, True)
        return True

    def _end(self, forced: bool) -> None:
        if self.accepting and not forced:
            return  # (a trigger came as the grace ran out)
        self.burst = False
        for handle in (self._quiet, self._deadline):
            if handle is not None:
                handle.cancel()
        self._quiet = self._deadline = None
        if self._held and not self._releasing:
            self._releasing = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        """Start the next ``CHUNK`` held executions, the rest on the next turns."""
        chunk, self._held = self._held[:CHUNK], self._held[CHUNK:]
        for eid in chunk:
            self._start(eid)
        if self._held:
            asyncio.get_running_loop().call_soon(self._release)
        else:
            self._releasing = False

    def stop(self) -> None:
        """Forget what is held (a restart starts it from the view)."""
        for handle in (self._quiet, self._deadline):
            if handle is not None:
                handle.cancel()
        self._quiet = self._deadline = None
        self._held.clear()
        self.burst = False
