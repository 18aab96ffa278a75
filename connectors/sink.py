"""The thread a sink runs in: follow the owned partitions of the events topic, drain on stop.

A sink does all its I/O (Kafka, files, HTTP) in plain blocking calls on its
own thread, so it never holds up the engine's event loop. It publishes only
the partitions this process owns, so that in a cluster each event goes out
once, from the owner of its partition (a single worker owns them all). The
engine tells it the owned set (``runtime.on_ownership``); the listener only
stores it, and the sink thread acts on it between steps. The loop:

1. Follow ownership: ``stop_partition(p)`` for each partition no longer
   owned (it finishes what it started there and saves its position, so the
   next owner goes on from there), ``start_partition(p)`` for each newly
   owned one (it loads the position the last publisher saved).
2. ``step()``: poll the tail and act on what came (each sink's own protocol,
   which ends by saving its position).
3. On an error: log it, keep it for :attr:`error`, ``recover()`` (go back to
   the saved position), wait, and go on; the pause doubles up to 30 s.
4. On stop: first drain, i.e. read on until every partition still owned has
   its end seen afresh (the events the runtime appended while it stopped go
   out too), at most ``drain_s``; then stop every partition and ``finish()``.
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
        self.started: set[int] = set()  # the partitions this sink publishes now
        self._wanted: frozenset[int] | None = None  # None: not told yet
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None

    # -- what a sink implements ----------------------------------------------------------------

    def setup(self) -> None:
        """Blocking set-up before the loop (topics, files, the tail)."""

    def start_partition(self, partition: int) -> None:
        """Begin publishing ``partition`` from where its last publisher saved."""
        raise NotImplementedError

    def stop_partition(self, partition: int) -> None:
        """Finish what was started on ``partition``, save its position, stop reading it."""
        raise NotImplementedError

    def step(self) -> None:
        """Poll and act; raises on a failure that ``recover`` can undo."""
        raise NotImplementedError

    def recover(self) -> None:
        """Go back to the last saved position after ``step`` raised."""

    def finish(self) -> None:
        """Close, after every partition stopped."""

    def idle(self) -> bool:
        """Whether nothing remains to do before stopping (besides reading)."""
        return True

    # -- ownership -----------------------------------------------------------------------------

    def on_ownership(self, owned: frozenset[int]) -> None:
        """The engine's listener (called on its event loop): only note the set."""
        self._wanted = owned

    def _follow_ownership(self) -> None:
        wanted = self._wanted
        if wanted is None:
            return
        for p in sorted(self.started - wanted):
            self.stop_partition(p)
            self.started.discard(p)
            logger.info("%s: stopped partition %d (not owned here now)", self.name, p)
        for p in sorted(wanted - self.started):
            self.start_partition(p)
            self.started.add(p)
            logger.debug("%s: publishing partition %d", self.name, p)

    # -- the loop ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.setup)
        self._thread = threading.Thread(target=self._loop, name=f"ploy-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Drain the owned partitions to the end of the log (bounded), then save and close."""
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
                    self._follow_ownership()  # Step 1.
                    self.step()  # Step 2.
                    pause, self.error = 0.5, None
                except Exception as exc:  # Step 3.
                    self.error = f"{type(exc).__name__}: {exc}"
                    logger.warning("%s: %s; going back to the saved position", self.name,
                                   self.error)
                    self.recover()
                    self._stopping.wait(pause)
                    pause = min(pause * 2, MAX_PAUSE_S)
            # Step 4.
            for p in sorted(self.started):
                try:
                    self.stop_partition(p)
                except Exception as exc:
                    logger.warning("%s: stopping partition %d: %s", self.name, p, exc)
            self.started.clear()
        except Exception:
            logger.exception("%s stopped on an unexpected error", self.name)
        finally:
            try:
                self.finish()
            finally:
                self.tail.close()
