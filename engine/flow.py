"""Flow control of a workflow, cluster-wide: ``concurrency``, ``rate`` and ``debounce``.

- ``concurrency: {limit, key}`` counts executions that hold a slot: from the
  moment one is admitted (it starts running) to its end; a sleeping or waiting
  execution keeps its slot.
- ``rate: {limit, period, key}`` counts starts: at most ``limit`` per key value
  in any ``period`` (a sliding window, ``engine.ratelimit``).
- ``debounce: {period, key}`` lets the last trigger of a burst of one key value
  run and cancels the earlier ones (``engine.debounce``).

Executions not yet admitted stay ``queued`` and are admitted when every limit
set allows: higher ``priority`` first (a number at a path of the input, default
0), then in trigger order (trigger time, then id).

Cluster-wide without a coordinator: ``trigger`` places every execution of one
key value on one partition (:meth:`FlowControl.place` picks its id so that it
hashes to the partition of ``concurrency:<workflow>:<value>``; with an
idempotency key the choice is a function of the key, so it still names one
execution). The owner of that partition then sees every execution of the key
and decides alone, from its view:

1. On the first admission after it (re)claims a partition, it reads the
   partition's unfinished executions of limited workflows: running and
   sleeping ones hold slots, queued ones wait, oldest first; waiting
   debounced triggers form bursts; and the starts within each rate's period
   (of running executions and of those that ended since) fill the windows.
2. A queued execution asking to start first passes the debounce, if any (it
   is superseded, waits for its period, or goes on); it is then admitted if it
   is at the head of its key's queue, a slot is free and the rate window
   allows a start; else it waits, and a ``WorkflowLog`` line on it says why
   (once per reason), so the reason is in its history and its logs.
3. When the fold applies the end of an execution that held a slot (or a
   cancel of a queued one), the slot is freed and the head of the queue
   starts; when a rate window or a debounce period frees, a wake-up scheduled
   on the event loop admits the next.

Nothing here is kept only in memory that the view does not say: after a
restart or a partition move, step 1 rebuilds it, and step 2, asked again for
every unfinished execution, schedules the wake-ups again.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from engine.clock import Clock
from engine.config import Config, Debounce, Rate, WorkflowBinding
from engine.debounce import Burst, Trigger
from engine.durations import format_duration
from engine.erasure import KeyStore, Opener
from engine.models import ExecutionStatus
from engine.ratelimit import Window

if TYPE_CHECKING:
    from engine.view import PartitionView

logger = logging.getLogger("ploy.flow")

QUEUED = ExecutionStatus.QUEUED.value
HOLDING = (ExecutionStatus.RUNNING.value, ExecutionStatus.SLEEPING.value,
           ExecutionStatus.WAITING.value)  # a sleeping or waiting execution keeps its slot
# The log positions of the lines saying why an execution waits: one line per reason.
WHY_POSITION = "flow.concurrency"
RATE_POSITION = "flow.rate"
DEBOUNCE_POSITION = "flow.debounce"
_PLACE_NS = uuid.UUID("0d3c1c5e-5b8a-4f0e-8d7e-3a51f7b2c4a9")
_MAX_PLACE_TRIES = 10_000  # ids tried before giving up placement (never reached: ~P tries)
_LATE_S = 0.002  # a wake-up comes a hair after its time: the loop may wake a hair early

Group = tuple[str, str]  # (workflow, key value)
Place = tuple[float, int, str]  # a queued execution: (-priority, created_at, id), first first
Wake = tuple[str, str, str]  # ("rate" | "tidy", workflow, value) or ("debounce", id, "")


class Keyed(Protocol):
    """What names a key value and a priority (``Rules``, or one ``Concurrency``)."""

    @property
    def key(self) -> str | None: ...

    @property
    def priority(self) -> str | None: ...


@dataclass(frozen=True)
class Rules:
    """The flow controls of one workflow (its binding's), as admission reads them: one
    key and one priority (``Config`` checks that those set agree)."""

    key: str | None
    priority: str | None
    slots: int | None  # concurrency's limit
    rate: Rate | None
    debounce: Debounce | None

    @classmethod
    def of(cls, binding: WorkflowBinding) -> Rules | None:
        """The rules of a binding, or None when it sets no flow control (nothing waits)."""
        limit, rate, debounce = binding.concurrency, binding.rate, binding.debounce
        if limit is None and rate is None and debounce is None:
            return None
        key = next((c.key for c in (limit, rate, debounce) if c is not None), None)
        priority = (limit.priority if limit is not None else None) or (
            rate.priority if rate is not None else None)
        return cls(key, priority, None if limit is None else limit.limit, rate, debounce)


def key_value(limit: Keyed, input_json: str) -> str:
    """The value of the limit's key in an execution's input (``""`` when the path is
    missing: such executions share one group)."""
    if limit.key is None:
        return ""
    try:
        value: Any = json.loads(input_json)
    except ValueError:  # a sealed input whose subject was erased: one group
        return ""
    for part in limit.key.split(".")[1:]:
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def place(limit: Keyed, record: dict[str, Any], input_json: str) -> Place:
    """Where a queued execution stands: higher ``priority`` first, then trigger order
    (``input_json``: its input, opened if sealed)."""
    priority = 0.0
    if limit.priority is not None:
        try:
            value: Any = json.loads(input_json)
        except ValueError:  # erased
            value = None
        for part in limit.priority.split(".")[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            priority = float(value)
    return (-priority, int(record["created_at"]), record["id"])


@dataclass
class _Partition:
    """The slots, queues, windows and bursts of one partition under one claim epoch."""

    partition: int
    epoch: int
    holding: dict[Group, set[str]] = field(default_factory=dict)  # admitted, not ended
    queues: dict[Group, list[Place]] = field(default_factory=dict)
    group_of: dict[str, Group] = field(default_factory=dict)  # queued or holding
    explained: dict[str, set[str]] = field(default_factory=dict)  # id -> why, not yet folded
    windows: dict[Group, Window] = field(default_factory=dict)
    bursts: dict[Group, Burst] = field(default_factory=dict)
    burst_of: dict[str, Group] = field(default_factory=dict)
    passed: set[str] = field(default_factory=set)  # debounced, its period over: queued
    superseded: set[str] = field(default_factory=set)  # cancelled, not yet folded
    wakes: dict[Wake, tuple[asyncio.TimerHandle, Callable[[], None]]] = field(
        default_factory=dict)

    def close(self) -> None:
        for handle, _ in self.wakes.values():
            handle.cancel()
        self.wakes.clear()


class FlowControl:
    """Admission of the executions of limited workflows, per owned partition."""

    def __init__(self, config: Config, partition_for: Callable[[str], int],
                 start: Callable[[str], None],
                 explain: Callable[[str, str, str, str], None], *,
                 supersede: Callable[[str, str], None] | None = None,
                 clock: Clock | None = None, keys: KeyStore | None = None):
        """``start(eid)`` starts an admitted execution; ``explain(eid, workflow, text,
        position)`` records why a queued one waits; ``supersede(eid, reason)`` ends a
        debounced one that a later trigger replaced."""
        self.config = config
        self.partition_for = partition_for
        self.start = start
        self.explain = explain
        self.supersede = supersede or (lambda eid, reason: None)
        self.clock = clock or Clock()
        self.keys = keys  # opens a data subject's sealed input (engine.erasure)
        self._partitions: dict[int, _Partition] = {}
        self._rules: dict[str, Rules | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def stop(self) -> None:
        """Cancel every wake-up (the runtime stops; a new claim schedules them again)."""
        for state in self._partitions.values():
            state.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe, self._loop = None, None

    def _input(self, record: dict[str, Any]) -> str:
        """The input's JSON, opened if a subject's key sealed it ("[erased]" if erased)."""
        return Opener(self.keys, record["id"]).text(record["input"])

    def rules_of(self, workflow: str) -> Rules | None:
        """The workflow's flow controls (looked up once: every start asks)."""
        if workflow not in self._rules:
            binding = self.config.binding_for(workflow)
            self._rules[workflow] = (None if binding is None
                                     else Rules.of(self.config.workflow[binding]))
        return self._rules[workflow]

    def place(self, workflow: str, input_json: str, eid: str) -> str:
        """The execution id to use: ``eid`` itself, or for a limited workflow the first of
        ``eid``, uuid5(eid, 1), uuid5(eid, 2) ... on the partition of its key value."""
        rules = self.rules_of(workflow)
        if rules is None:
            return eid
        target = self.partition_for(f"concurrency:{workflow}:{key_value(rules, input_json)}")
        candidate = eid
        for n in range(1, _MAX_PLACE_TRIES):
            if self.partition_for(candidate) == target:
                return candidate
            candidate = uuid.uuid5(_PLACE_NS, f"{eid}\x00{n}").hex
        return eid

    def admit(self, partition: int, epoch: int, view: PartitionView,
              record: dict[str, Any]) -> bool:
        """Whether the execution of ``record`` may run now (steps 1 and 2)."""
        rules = self.rules_of(record["workflow"])
        if rules is None:
            return True
        state = self._state(partition, epoch, view)
        eid = record["id"]
        group = state.group_of.get(eid) or (record["workflow"],
                                           key_value(rules, self._input(record)))
        holding = state.holding.setdefault(group, set())
        if eid in holding:
            return True
        if record["status"] != QUEUED:
            self._hold(state, group, eid)  # it runs already (a fired sleep, a resume)
            return True
        if rules.debounce is not None and eid not in state.group_of and not self._debounced(
                state, view, record, rules.debounce, group):
            return False
        queue = state.queues.setdefault(group, [])
        if eid not in state.group_of:
            bisect.insort(queue, place(rules, record, self._input(record)))
            state.group_of[eid] = group
        admitted = self._admit_heads(state, group, rules)
        for other in admitted:
            if other != eid:
                self.start(other)  # older ones first: they pass admit() as holding
        if eid in admitted:
            return True
        self._explain_queued(state, view, record, rules, group)
        return False

    def triggered(self, partition: int, epoch: int, view: PartitionView, offset: int,
                  eid: str) -> None:
        """The fold applied ``eid``'s trigger at ``offset`` (on a partition this process
        owns): a debounced one joins its burst now, in log order, so the trigger it
        supersedes is the one right before it even if that one's start was deferred."""
        record = view.record(eid)
        rules = None if record is None else self.rules_of(record["workflow"])
        if record is None or rules is None or rules.debounce is None or (
                record["status"] != QUEUED):
            return
        state = self._state(partition, epoch, view)
        if eid in state.burst_of or eid in state.group_of or eid in state.superseded:
            return
        group = (record["workflow"], key_value(rules, self._input(record)))
        burst = state.bursts.setdefault(group, Burst(rules.debounce))
        burst.add(Trigger(offset, eid, int(record["created_at"])))
        state.burst_of[eid] = group
        self._supersede_earlier(state, burst, group)

    def started(self, partition: int, eid: str, at: int) -> None:
        """The fold applied ``eid``'s ``WorkflowStarted`` at ``at``: its time in the
        rate window is the one on the log from now on."""
        state = self._partitions.get(partition)
        group = None if state is None else state.group_of.get(eid)
        if state is not None and group is not None and group in state.windows:
            state.windows[group].started(eid, at)

    def release(self, partition: int, eid: str, queued_only: bool = False) -> None:
        """Step 3: ``eid`` ended (or was cancelled while queued): start the next ones.

        ``queued_only``: a cancel request, which frees no slot of a running execution
        (its step in flight finishes first; its ``WorkflowCancelled`` frees the slot).
        """
        state = self._partitions.get(partition)
        if state is None:
            return
        self._forget_trigger(state, eid)
        group = state.group_of.get(eid)
        if group is None:
            state.explained.pop(eid, None)  # a debounced one that never queued
            return
        if queued_only and eid in state.holding.get(group, ()):
            return
        del state.group_of[eid]
        state.explained.pop(eid, None)
        state.holding.get(group, set()).discard(eid)
        queue = state.queues.get(group, [])
        queue[:] = [entry for entry in queue if entry[2] != eid]
        self._admit_later(state, group)
        self._tidy(state, group)

    # -- admission ------------------------------------------------------------------

    def _admit_heads(self, state: _Partition, group: Group, rules: Rules) -> list[str]:
        """Take the first queued executions of ``group`` while a slot is free and the rate
        window allows; if the window is what stops them, wake up when it frees."""
        holding, queue = state.holding.setdefault(group, set()), state.queues.get(group, [])
        admitted = []
        while queue and (rules.slots is None or len(holding) < rules.slots):
            head = queue[0][2]
            if rules.rate is not None:
                window = state.windows.setdefault(group, Window(rules.rate))
                now = self.clock.now()
                wait = window.wait_ms(now)
                if wait > 0:
                    self._wake(state, ("rate", *group), now + wait,
                               lambda: self._admit_later(state, group))
                    break
                window.started(head, now)
            queue.pop(0)
            holding.add(head)
            admitted.append(head)
        return admitted

    def _admit_later(self, state: _Partition, group: Group) -> None:
        """Admit what a freed slot or window lets start (under the claim that is still
        current), and start it."""
        rules = self.rules_of(group[0])
        if rules is not None and self._partitions.get(state.partition) is state:
            for head in self._admit_heads(state, group, rules):
                self.start(head)

    def _tidy(self, state: _Partition, group: Group) -> None:
        """Forget a key value that nothing holds or waits on (a million customers do not
        each keep an entry); its rate window once no start of it counts any more."""
        if state.holding.get(group) or state.queues.get(group):
            return
        state.holding.pop(group, None)
        state.queues.pop(group, None)
        window = state.windows.get(group)
        recent = [] if window is None else window.recent(self.clock.now())
        if not recent:
            state.windows.pop(group, None)
        elif window is not None:
            self._wake(state, ("tidy", *group), recent[-1] + window.rate.period_ms,
                       lambda: self._tidy(state, group))

    def _explain_queued(self, state: _Partition, view: PartitionView,
                        record: dict[str, Any], rules: Rules, group: Group) -> None:
        """Say once (per reason) why a queued execution waits: a full concurrency limit,
        else the rate window."""
        holding, queue = state.holding.get(group, set()), state.queues.get(group, [])
        key = _which(rules.key, group)
        if rules.slots is not None and len(holding) >= rules.slots:
            self._explain(state, view, record, WHY_POSITION, (
                f"queued: concurrency limit {rules.slots} of {key} reached "
                f"({len(holding)} running, {len(queue)} queued)"))
        elif rules.rate is not None:
            window = state.windows.setdefault(group, Window(rules.rate))
            now = self.clock.now()
            recent = len(window.recent(now))
            self._explain(state, view, record, RATE_POSITION, (
                f"queued: rate limit {rules.rate.limit} per "
                f"{format_duration(rules.rate.period_ms)} of {key} reached ({recent} "
                f"started in the last {format_duration(rules.rate.period_ms)}, {len(queue)} "
                f"queued; the next may start at {_iso(now + window.wait_ms(now))})"))

    def _explain(self, state: _Partition, view: PartitionView, record: dict[str, Any],
                 position: str, text: str) -> None:
        eid = record["id"]
        told = state.explained.setdefault(eid, set())
        if position not in told and position not in _logged(view, record):
            told.add(position)
            self.explain(eid, record["workflow"], text, position)

    # -- debounce ---------------------------------------------------------------------

    def _debounced(self, state: _Partition, view: PartitionView, record: dict[str, Any],
                   debounce: Debounce, group: Group) -> bool:
        """Whether a queued debounced execution has passed its debounce (it may queue
        for the other limits): no later trigger came within its period, and the period
        is over. Earlier triggers it supersedes are ended here."""
        eid = record["id"]
        if eid in state.passed:
            return True
        if eid in state.superseded:
            return False
        if eid not in state.burst_of:
            trigger = _trigger(view, record)
            if trigger is None:
                return False  # not folded yet (acknowledged only): the fold asks again
            state.bursts.setdefault(group, Burst(debounce)).add(trigger)
            state.burst_of[eid] = group
        burst = state.bursts[group]
        self._supersede_earlier(state, burst, group)
        if eid not in burst:
            return False
        due = burst.due_at(eid)
        if self.clock.now() < due:
            self._wake(state, ("debounce", eid, ""), due, lambda: self.start(eid))
            self._explain(state, view, record, DEBOUNCE_POSITION, (
                f"queued: debounced for {format_duration(debounce.period_ms)} on "
                f"{_which(debounce.key, group)}: "
                f"starts at {_iso(due)} unless a later trigger of it comes first"))
            return False
        self._forget_trigger(state, eid)
        state.passed.add(eid)
        return True

    def _supersede_earlier(self, state: _Partition, burst: Burst, group: Group) -> None:
        for it, later in burst.superseded():
            del state.burst_of[it.id]
            state.superseded.add(it.id)
            self._cancel_wake(state, ("debounce", it.id, ""))
            self.supersede(it.id, (
                f"debounced: superseded by execution {later.id}, a later trigger of "
                f"{_which(burst.debounce.key, group)} "
                f"within {format_duration(burst.debounce.period_ms)} (the last trigger "
                "of a burst runs, with its input)"))

    def _forget_trigger(self, state: _Partition, eid: str) -> None:
        """A debounced execution ended (superseded, or cancelled while it waited)."""
        state.passed.discard(eid)
        state.superseded.discard(eid)
        self._cancel_wake(state, ("debounce", eid, ""))
        group = state.burst_of.pop(eid, None)
        if group is not None:
            state.bursts[group].remove(eid)
            if not state.bursts[group].triggers:
                del state.bursts[group]

    # -- wake-ups and the state of a claim -------------------------------------------

    def _wake(self, state: _Partition, name: Wake, at: int, then: Callable[[], None]) -> None:
        """Call ``then()`` on the event loop once the clock reaches ``at`` (the one wake-up
        of ``name``: a new one replaces it). In memory only: after a restart, step 2
        schedules it again."""
        def fire() -> None:
            if state.wakes.get(name, (None,))[0] is handle:
                del state.wakes[name]
                then()

        self._cancel_wake(state, name)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a clock moved ahead by command (ManualClock) wakes all
            self._subscribe(loop)
        delay = max(at - self.clock.now(), 0) / 1000 + _LATE_S
        handle = loop.call_later(delay, fire)
        state.wakes[name] = (handle, then)

    def _subscribe(self, loop: asyncio.AbstractEventLoop) -> None:
        def advanced() -> None:  # on any thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._clock_advanced)

        if self._unsubscribe is not None:
            self._unsubscribe()
        self._loop = loop
        self._unsubscribe = self.clock.on_advance(advanced)

    def _clock_advanced(self) -> None:
        """Look at every wake-up now: each checks again and waits on if it is early."""
        for state in list(self._partitions.values()):
            for name, (handle, then) in list(state.wakes.items()):
                if state.wakes.get(name, (None,))[0] is handle:
                    handle.cancel()
                    del state.wakes[name]
                    then()

    @staticmethod
    def _cancel_wake(state: _Partition, name: Wake) -> None:
        entry = state.wakes.pop(name, None)
        if entry is not None:
            entry[0].cancel()

    def _hold(self, state: _Partition, group: Group, eid: str) -> None:
        state.holding.setdefault(group, set()).add(eid)
        state.group_of[eid] = group

    def _state(self, partition: int, epoch: int, view: PartitionView) -> _Partition:
        """Step 1: the partition's slots, queues, bursts and windows, read from its view
        once per claim."""
        state = self._partitions.get(partition)
        if state is not None and state.epoch == epoch:
            return state
        if state is not None:
            state.close()
        state = self._partitions[partition] = _Partition(partition, epoch)
        for eid in view.active():
            record = view.record(eid)
            rules = None if record is None else self.rules_of(record["workflow"])
            if record is None or rules is None:
                continue
            group = (record["workflow"], key_value(rules, self._input(record)))
            if record["status"] in HOLDING:
                self._hold(state, group, eid)
                self._count_start(state, rules, group, record)
            elif record["status"] == QUEUED and rules.debounce is not None:
                trigger = _trigger(view, record)  # all of a burst, before any is decided
                if trigger is not None:
                    state.bursts.setdefault(group, Burst(rules.debounce)).add(trigger)
                    state.burst_of[eid] = group
            elif record["status"] == QUEUED:
                queue = state.queues.setdefault(group, [])
                bisect.insort(queue, place(rules, record, self._input(record)))
                state.group_of[eid] = group
        self._recent_ended(state, view)
        return state

    def _recent_ended(self, state: _Partition, view: PartitionView) -> None:
        """Step 1 for rates: the starts of executions that ended within the longest
        period (one that ended before it started before it, so counts no more)."""
        periods = [b.rate.period_ms for b in self.config.workflow.values() if b.rate]
        if not periods:
            return
        for eid in view.ended_since(self.clock.now() - max(periods)):
            record = view.record(eid)
            rules = None if record is None else self.rules_of(record["workflow"])
            if record is not None and rules is not None:
                group = (record["workflow"], key_value(rules, self._input(record)))
                self._count_start(state, rules, group, record)

    def _count_start(self, state: _Partition, rules: Rules, group: Group,
                     record: dict[str, Any]) -> None:
        if rules.rate is not None and record["started_at"] is not None:
            window = state.windows.setdefault(group, Window(rules.rate))
            window.started(record["id"], int(record["started_at"]))


def _trigger(view: PartitionView, record: dict[str, Any]) -> Trigger | None:
    """Where a debounced execution's trigger is on the log (its first event), if folded."""
    first = next(iter(view.history(record["id"])), None)
    return None if first is None else Trigger(first[0], record["id"],
                                              int(record["created_at"]))


def _which(key: str | None, group: Group) -> str:
    """The key value for people: ``input.customer_id='c1'`` (or the whole workflow)."""
    return f"{key}={group[1]!r}" if key else f"workflow '{group[0]}'"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _logged(view: PartitionView, record: dict[str, Any]) -> list[str | None]:
    return view.log_positions(record["id"]) if record["logs"] else []
