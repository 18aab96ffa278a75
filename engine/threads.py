"""Where synchronous step functions run: daemon threads, with slots that time-outs give back.

A Python thread cannot be stopped from outside, so a sync step that hangs past
its ``timeout`` keeps its thread. In a fixed pool (``ThreadPoolExecutor``)
thirty-two such calls would take every thread, and every other execution's
steps would wait behind them; the pool's exit hook would also hold the
process at shutdown until they return. Here instead:

- at most ``limit`` calls run at once, counted by slots on the event loop;
- a call whose awaiting coroutine gives up (the attempt timed out, the
  execution was cancelled or the worker stops) gives its slot back at once:
  its thread is *abandoned*, finishes on its own, and its result is dropped;
- threads are daemons, reused while idle, started when none is idle, so an
  abandoned thread never holds a slot, a step or the process's exit.

A sync step with no ``timeout`` that never returns holds its slot for good:
give blocking calls a timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ploy.runtime")

_IDLE_S = 30.0  # an idle thread ends after this long


class StepThreads:
    """Runs sync callables on daemon threads, at most ``limit`` counted at once."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self.abandoned = 0  # calls whose caller stopped waiting (still running, or done)
        self._slots: asyncio.Semaphore | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no submit has counted on yet

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a thread, in the caller's context (contextvars); its result or error."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            context = contextvars.copy_context()

            def job() -> None:
                try:
                    outcome: tuple[Any, BaseException | None] = (context.run(fn), None)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
                    outcome = (None, exc)
                try:
                    loop.call_soon_threadsafe(_settle, future, *outcome)
                except RuntimeError:  # abandoned, and its loop has closed since: drop it
                    pass

            self._submit(job)
            try:
                return await future
            except asyncio.CancelledError:
                if not future.done():
                    self.abandoned += 1
                    logger.warning("a sync step function is still running after its caller "
                                   "stopped waiting; its thread is left to finish (%d so far)",
                                   self.abandoned)
                raise

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=(job,), name="ploy-step", daemon=True).start()

    def _work(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=_IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():  # nobody counted on this thread: end it
                            self._idle -= 1
                            return


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return  # abandoned: the caller stopped waiting
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
