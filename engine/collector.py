"""CPython's cyclic garbage collector, set for the engine's two kinds of work.

Reference counting frees almost everything the engine makes (events, decoded
records, an execution's futures and coroutines); the cyclic collector only has
cycles to find, such as a failed step's traceback. With CPython's default
thresholds (700, 10, 10) it runs far more often than that needs, and each run
walks every live container of its generations:

- Serving, every in-flight execution's objects live long enough to be promoted
  to the oldest generation, so the whole heap is walked every second or so
  under load: 60-70 ms pauses that collect nothing, about a quarter of the
  engine's CPU per execution (``engine.bench throughput``: 1.56 -> 1.16 ms), and
  the tail of a timer's lateness (the alarm waits for the pause).
- Folding a rebuild, each batch allocates tens of thousands of containers that
  die with it, and the default threshold walks them several times per batch.

So young collections run every :data:`YOUNG_THRESHOLD` allocations instead, and
a serving process moves what it loaded at start (the app, its modules, the
engine's compiled codecs) out of the collector's walks for good.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 50_000
"""Allocations (net of frees) between collections of the youngest generation."""


def tune_for_serving() -> None:
    """Collect rarely from now on, and freeze what is live now. Called once by a
    serving process (``ploy dev``, ``ploy worker``, ``ploy serve``) once its app is
    loaded, before its engine starts: what is reachable then (modules, the app) stays
    reachable until exit, so walking it again and again finds nothing; executions and
    requests, which come and go, are made after it and collected as usual."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def rare_collections(threshold: int = 2 * YOUNG_THRESHOLD) -> Iterator[None]:
    """Collect young objects only every ``threshold`` allocations inside the block
    (a rebuild's fold); the thresholds before it are back after. A block inside or
    beside another (two as-of folds in threads) that finds it set already leaves it."""
    before = gc.get_threshold()
    if before[0] >= threshold:
        yield
        return
    gc.set_threshold(threshold, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
