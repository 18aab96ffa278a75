"""Debounce: of a burst of triggers of one key value, only the last runs.

A trigger of a debounced workflow waits ``period`` (from its trigger's time);
a later trigger of the same key value within that period supersedes it: the
earlier execution ends ``cancelled``, its reason naming the one that
superseded it, and the new one waits its own period. The one no other trigger
followed within its period starts once the period is over, with its own
input, which is the last trigger's (Inngest's semantics).

Every rule reads the log only: the order of triggers is their order on the
partition (every execution of one key value is on one partition, see
``engine.flow``) and the period is measured between trigger timestamps, so an
owner that claims the partition after a restart or a move reaches the same
decisions from its view.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from engine.config import Debounce


class Trigger(NamedTuple):
    """A debounced execution not yet started, where its trigger stands on the log."""

    offset: int
    id: str
    created_at: int


class Burst:
    """The waiting triggers of one key value, in log order."""

    def __init__(self, debounce: Debounce):
        self.debounce = debounce
        self.triggers: list[Trigger] = []

    def __contains__(self, eid: object) -> bool:
        return any(t.id == eid for t in self.triggers)

    def add(self, trigger: Trigger) -> None:
        if trigger.id not in self:
            bisect.insort(self.triggers, trigger)

    def remove(self, eid: str) -> None:
        self.triggers = [t for t in self.triggers if t.id != eid]

    def superseded(self) -> list[tuple[Trigger, Trigger]]:
        """Take out each trigger followed within its period by a later one: (it, the
        one that superseded it)."""
        period = self.debounce.period_ms
        pairs = [(it, later) for it, later in zip(self.triggers, self.triggers[1:],
                                                  strict=False)
                 if later.created_at - it.created_at < period]
        for it, _ in pairs:
            self.remove(it.id)
        return pairs

    def due_at(self, eid: str) -> int:
        """When ``eid`` may start if no trigger follows it: its trigger time + period."""
        trigger = next(t for t in self.triggers if t.id == eid)
        return trigger.created_at + self.debounce.period_ms
