"""Flow control: ``concurrency: {limit, key}`` of a workflow, cluster-wide.

A limit counts executions that hold a slot: from the moment one is admitted
(it starts running) to its end; a sleeping or waiting execution keeps its slot. The
others stay ``queued`` and are admitted as slots free up: higher ``priority``
first (a number at a path of the input, default 0), then in trigger order
(trigger time, then id).

Cluster-wide without a coordinator: ``trigger`` places every execution of one
key value on one partition (:meth:`FlowControl.place` picks its id so that it
hashes to the partition of ``concurrency:<workflow>:<value>``; with an
idempotency key the choice is a function of the key, so it still names one
execution). The owner of that partition then sees every execution of the key
and decides alone, from its view:

1. On the first admission after it (re)claims a partition, it reads the
   partition's unfinished executions of limited workflows: running and
   sleeping ones hold slots, queued ones wait, oldest first.
2. A queued execution asking to start is admitted if it is at the head of
   its key's queue and a slot is free; else it waits, and a ``WorkflowLog``
   line on it says why (once), so the reason is in its history and its logs.
3. When the fold applies the end of an execution that held a slot (or a
   cancel of a queued one), the slot is freed and the head of the queue starts.

Nothing here is kept only in memory that the view does not say: after a
restart or a partition move, step 1 rebuilds it.
"""

from __future__ import annotations

import bisect
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.config import Concurrency, Config
from engine.models import ExecutionStatus

if TYPE_CHECKING:
    from engine.view import PartitionView

logger = logging.getLogger("ploy.flow")

QUEUED = ExecutionStatus.QUEUED.value
HOLDING = (ExecutionStatus.RUNNING.value, ExecutionStatus.SLEEPING.value,
           ExecutionStatus.WAITING.value)  # a sleeping or waiting execution keeps its slot
WHY_POSITION = "flow.concurrency"  # the log position of the line saying why it waits
_PLACE_NS = uuid.UUID("0d3c1c5e-5b8a-4f0e-8d7e-3a51f7b2c4a9")
_MAX_PLACE_TRIES = 10_000  # ids tried before giving up placement (never reached: ~P tries)

Group = tuple[str, str]  # (workflow, key value)
Place = tuple[float, int, str]  # a queued execution: (-priority, created_at, id), first first


def key_value(limit: Concurrency, input_json: str) -> str:
    """The value of the limit's key in an execution's input (``""`` when the path is
    missing: such executions share one group)."""
    if limit.key is None:
        return ""
    value: Any = json.loads(input_json)
    for part in limit.key.split(".")[1:]:
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def place(limit: Concurrency, record: dict[str, Any]) -> Place:
    """Where a queued execution stands: higher ``priority`` first, then trigger order."""
    priority = 0.0
    if limit.priority is not None:
        value: Any = json.loads(record["input"])
        for part in limit.priority.split(".")[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            priority = float(value)
    return (-priority, int(record["created_at"]), record["id"])


@dataclass
class _Partition:
    """The slots and queues of one partition under one claim epoch."""

    epoch: int
    holding: dict[Group, set[str]] = field(default_factory=dict)
    queues: dict[Group, list[Place]] = field(default_factory=dict)
    group_of: dict[str, Group] = field(default_factory=dict)
    explained: set[str] = field(default_factory=set)  # told why they wait (not yet folded)


class FlowControl:
    """Admission of the executions of limited workflows, per owned partition."""

    def __init__(self, config: Config, partition_for: Callable[[str], int],
                 start: Callable[[str], None],
                 explain: Callable[[str, str, str], None]):
        """``start(eid)`` starts an admitted execution; ``explain(eid, workflow, text)``
        records why a queued one waits."""
        self.config = config
        self.partition_for = partition_for
        self.start = start
        self.explain = explain
        self._partitions: dict[int, _Partition] = {}
        self._limits: dict[str, Concurrency | None] = {}

    def limit_of(self, workflow: str) -> Concurrency | None:
        """The workflow's limit (looked up once: every start asks)."""
        if workflow not in self._limits:
            self._limits[workflow] = self.config.concurrency_for(workflow)
        return self._limits[workflow]

    def place(self, workflow: str, input_json: str, eid: str) -> str:
        """The execution id to use: ``eid`` itself, or for a limited workflow the first of
        ``eid``, uuid5(eid, 1), uuid5(eid, 2) ... on the partition of its key value."""
        limit = self.limit_of(workflow)
        if limit is None:
            return eid
        target = self.partition_for(f"concurrency:{workflow}:{key_value(limit, input_json)}")
        candidate = eid
        for n in range(1, _MAX_PLACE_TRIES):
            if self.partition_for(candidate) == target:
                return candidate
            candidate = uuid.uuid5(_PLACE_NS, f"{eid}\x00{n}").hex
        return eid

    def admit(self, partition: int, epoch: int, view: PartitionView,
              record: dict[str, Any]) -> bool:
        """Whether the execution of ``record`` may run now (steps 1 and 2)."""
        limit = self.limit_of(record["workflow"])
        if limit is None:
            return True
        state = self._state(partition, epoch, view)
        eid = record["id"]
        group = state.group_of.get(eid) or (record["workflow"],
                                           key_value(limit, record["input"]))
        holding = state.holding.setdefault(group, set())
        if eid in holding:
            return True
        if record["status"] != QUEUED:
            self._hold(state, group, eid)  # it runs already (a fired sleep, a resume)
            return True
        queue = state.queues.setdefault(group, [])
        if eid not in state.group_of:
            bisect.insort(queue, place(limit, record))
            state.group_of[eid] = group
        admitted = self._admit_heads(state, group, limit)
        for other in admitted:
            if other != eid:
                self.start(other)  # older ones first: they pass admit() as holding
        if eid in admitted:
            return True
        if eid not in state.explained and WHY_POSITION not in _logged(view, record):
            state.explained.add(eid)
            key = f"{limit.key}={group[1]!r}" if limit.key else f"workflow '{group[0]}'"
            self.explain(eid, record["workflow"],
                         f"queued: concurrency limit {limit.limit} of {key} reached "
                         f"({len(holding)} running, {len(queue)} queued)")
        return False

    def release(self, partition: int, eid: str, queued_only: bool = False) -> None:
        """Step 3: ``eid`` ended (or was cancelled while queued): start the next ones.

        ``queued_only``: a cancel request, which frees no slot of a running execution
        (its step in flight finishes first; its ``WorkflowCancelled`` frees the slot).
        """
        state = self._partitions.get(partition)
        if state is None:
            return
        group = state.group_of.get(eid)
        if group is None or (queued_only and eid in state.holding.get(group, ())):
            return
        del state.group_of[eid]
        state.explained.discard(eid)
        state.holding.get(group, set()).discard(eid)
        queue = state.queues.get(group, [])
        queue[:] = [entry for entry in queue if entry[2] != eid]
        limit = self.limit_of(group[0])
        if limit is not None:
            for head in self._admit_heads(state, group, limit):
                self.start(head)

    def _admit_heads(self, state: _Partition, group: Group, limit: Concurrency) -> list[str]:
        """Take the oldest queued executions of ``group`` into its free slots."""
        holding, queue = state.holding.setdefault(group, set()), state.queues.get(group, [])
        admitted = []
        while queue and len(holding) < limit.limit:
            head = queue.pop(0)[2]
            holding.add(head)
            admitted.append(head)
        return admitted

    def _hold(self, state: _Partition, group: Group, eid: str) -> None:
        state.holding.setdefault(group, set()).add(eid)
        state.group_of[eid] = group

    def _state(self, partition: int, epoch: int, view: PartitionView) -> _Partition:
        """Step 1: the partition's slots and queues, read from its view once per claim."""
        state = self._partitions.get(partition)
        if state is not None and state.epoch == epoch:
            return state
        state = self._partitions[partition] = _Partition(epoch)
        for eid in view.active():
            record = view.record(eid)
            limit = None if record is None else self.limit_of(record["workflow"])
            if record is None or limit is None:
                continue
            group = (record["workflow"], key_value(limit, record["input"]))
            if record["status"] in HOLDING:
                self._hold(state, group, eid)
            elif record["status"] == QUEUED:
                bisect.insort(state.queues.setdefault(group, []), place(limit, record))
                state.group_of[eid] = group
        return state


def _logged(view: PartitionView, record: dict[str, Any]) -> list[str | None]:
    return view.log_positions(record["id"]) if record["logs"] else []
