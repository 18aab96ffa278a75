"""Due timers -> ``TimerFired``: what wakes a durably sleeping execution.

The fold indexes every pending sleep by wake time (``keys.TIMER``), so finding
what is due is one ordered scan from the start of that keyspace. The service
appends ``TimerFired`` once the clock reaches ``wake_at``, never before; the
fold deletes the timer, and the runtime resumes the execution by replay.
An append that is acknowledged but not yet folded is remembered here, so a
timer is not fired twice by one process; should it be (a crash in between),
the fold ignores the second firing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from engine.events import Event, TimerFired

if TYPE_CHECKING:
    from engine.runtime import Runtime

logger = logging.getLogger("ploy.timers")

POLL_S = 0.05


class TimerService:
    """Fires the due timers of every partition the runtime owns."""

    def __init__(self, runtime: Runtime, poll_s: float = POLL_S):
        self.runtime = runtime
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._fired: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ploy-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.fire_due()
            except Exception:
                logger.exception("timer service")
            await asyncio.sleep(self.poll_s)

    async def fire_due(self) -> int:
        """Append ``TimerFired`` for every due timer not already fired; return how many."""
        runtime = self.runtime
        now = runtime.clock.now()
        due: list[tuple[int, str, str]] = []
        for p in list(runtime.owned):
            if runtime.may_run(p):
                due.extend(runtime.views[p].due_timers(now))
        pending = {(eid, sleep) for _, eid, sleep in due}
        self._fired &= pending  # forget timers the fold has since deleted
        appends = []
        fired = []
        for wake_at, eid, sleep in due:
            if (eid, sleep) in self._fired:
                continue
            self._fired.add((eid, sleep))
            fired.append((eid, sleep))
            record = runtime.views[runtime.log.partition_for(eid)].record(eid)
            workflow = record["workflow"] if record else ""
            appends.append(runtime.log.append(Event(
                eid, workflow, runtime.clock.now(), TimerFired(sleep, wake_at),
                epoch=runtime.epoch_of(eid))))
        results = await asyncio.gather(*appends, return_exceptions=True)
        for key, result in zip(fired, results, strict=True):
            if isinstance(result, BaseException):
                self._fired.discard(key)  # not appended: try again next round
                logger.warning("timer %s of %s: %s", key[1], key[0], result)
        return len(appends)
