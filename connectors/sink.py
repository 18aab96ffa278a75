"""The thread a sink runs in: follow the events topic, hand records over, drain on stop.

A sink does all its I/O (Kafka, files, HTTP) in plain blocking calls on its
own thread, so it never holds up the engine's event loop. The loop:

1. ``step()``: poll the tail and act on what came (each sink's own protocol,
   which ends by saving its position).
2. On an error: log it, keep it for :attr:`error`, ``recover()`` (go back to
   the saved position), wait, and go on; the pause doubles up to 30 s.
3. On stop: first drain, i.e. read on until every partition's end is seen
   afresh (the events the runtime appended while it stopped go out too), at
   most ``drain_s``; then ``finish()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from connectors.tail import EventTail

logger = logging.getLogger("ploy.connectors")

MAX_PAUSE_S = 30.0


class SinkThread:
    """Base of the sinks that follow ``<prefix>.events``; subclasses set :attr:`tail`."""

    name = "sink"
    tail: EventTail

    def __init__(self) -> None:
        self.error: str | None = None
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None

    # -- what a sink implements ----------------------------------------------------------------

    def setup(self) -> None:
        """Blocking set-up before the loop (topics, files, the tail)."""

    def step(self) -> None:
        """Poll and act; raises on a failure that ``recover`` can undo."""
        raise NotImplementedError

    def recover(self) -> None:
        """Go back to the last saved position after ``step`` raised."""

    def finish(self) -> None:
        """Save and close, after the drain."""

    def idle(self) -> bool:
        """Whether nothing remains to do before stopping (besides reading)."""
        return True

    # -- the loop ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.setup)
        self._thread = threading.Thread(target=self._loop, name=f"ploy-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Drain to the end of the log (bounded), then save and close."""
        self._drain_until = time.monotonic() + drain_s
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, drain_s + 15)

    def _loop(self) -> None:
        pause = 0.5
        draining = False
        try:
            while True:
                if self._stopping.is_set():
                    if not draining:
                        draining = True
                        self.tail.rewind(self.tail.position)  # see every end afresh
                    elif (self.tail.caught_up() and self.idle()) or (
                            time.monotonic() > self._drain_until):
                        break
                try:
                    self.step()
                    pause, self.error = 0.5, None
                except Exception as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                    logger.warning("%s: %s; going back to the saved position", self.name,
                                   self.error)
                    self.recover()
                    self._stopping.wait(pause)
                    pause = min(pause * 2, MAX_PAUSE_S)
        except Exception:
            logger.exception("%s stopped on an unexpected error", self.name)
        finally:
            try:
                self.finish()
            finally:
                self.tail.close()
