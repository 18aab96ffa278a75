"""Schedules: ploy.yaml's ``schedules:`` start executions on a cron or an interval.

Everything a schedule is and did is on the log, under the execution id
``schedule-<name>`` (so on one partition), as ``ScheduleUpdated`` events:
``registered`` (its spec as configured), ``paused`` / ``resumed`` /
``triggered`` (an operator, with actor and reason), ``fired`` (a fire time and
the execution it started) and ``skipped`` (fire times given up, and why). The
fold keeps one record per schedule (``keys.schedule``); the execution a firing
starts is an ordinary ``WorkflowTriggered`` whose idempotency key is
``schedule:<name>:<fire time ISO>``, so its id is a function of the schedule
and the fire time.

Which process fires: the owner of the partition of ``schedule-<name>``. It
fires one fire time at a time (:meth:`Scheduler._fire`):

1. Read the schedule's record from the view (caught up with this process's own
   writes): the last fire time, paused or not, the last execution.
2. With ``overlap: skip``, ask for the last execution; while it has not ended,
   append ``skipped`` (reason ``overlap``) instead of starting one.
3. Trigger with the fire time's idempotency key: a second trigger of that time
   (a former owner's, this one's after a crash) names the same execution and
   starts nothing new.
4. Append ``fired`` and wait until the fold has applied it, so the next look
   reads it from the view, never from memory.

A new owner (after a kill, a rebalance, a restart) starts from what the view
says: fire times after the last recorded one are due. Those more than
``LATE_MS`` late were missed, and ``catchup`` decides: ``skip`` (none),
``once`` (the latest), ``all`` (each, up to ``catchup_limit``, the latest
ones); what is given up is one ``skipped`` event with the count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from engine import keys
from engine.config import FILENAME, Config, ScheduleConfig
from engine.cron import iso
from engine.errors import (
    ConfigError,
    InvalidInputError,
    NotFoldedHereError,
    OwnerUnavailableError,
    PayloadTooLargeError,
    PloyError,
)
from engine.events import Event, ScheduleUpdated
from engine.models import ExecutionStatus

if TYPE_CHECKING:
    from engine.builder import Worker
    from engine.fold import Record, Tx
    from engine.runtime import Runtime
    from engine.view import PartitionView

logger = logging.getLogger("ploy.schedules")

LATE_MS = 2_000  # a fire time later than this is missed: the catch-up policy decides
MAX_WAIT_S = 1.0  # look again at least this often (an operator's pause, a new owner)
RECENT = 10  # actions, executions started, skips kept in the record (all are on the log)
_NAME = re.compile(r"[A-Za-z0-9._-]+")  # as ScheduleConfig.name allows
ACTIONS = ("registered", "paused", "resumed", "triggered", "fired", "skipped")


def schedule_id(name: str) -> str:
    """The execution id a schedule's events are written under (its partition's key)."""
    return f"schedule-{name}"


def fire_key(name: str, fire_at: int) -> str:
    """The idempotency key of the execution a fire time starts."""
    return f"schedule:{name}:{iso(fire_at)}"


def origin_of(idempotency_key: str | None) -> tuple[str, int | None] | None:
    """The schedule and fire time (epoch ms; None for a trigger-now) named by an
    idempotency key of :func:`fire_key` or :meth:`Scheduler.trigger_now`'s shape, so
    that an execution can say what started it; None for any other key."""
    prefix, _, rest = (idempotency_key or "").partition(":")
    name, _, when = rest.partition(":")
    if prefix != "schedule" or not _NAME.fullmatch(name) or not when:
        return None
    if when.startswith("now:"):
        return name, None
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return name, round(moment.timestamp() * 1000)


def spec_of(schedule: ScheduleConfig) -> str:
    """The configured spec as recorded in ``registered`` (a change is registered again)."""
    return json.dumps(schedule.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def check_schedules(config: Config, worker: Worker) -> None:
    """Fail start-up if a schedule's ``input`` does not fit its workflow's input model
    (else each firing would be refused), naming the key and line.

    Raises:
        ConfigError: For the first such schedule.
    """
    for i, schedule in enumerate(config.schedules):
        workflow = worker.workflow(config.workflow[schedule.binding].name)
        if workflow is None or workflow.input is None:
            continue  # an unknown workflow is check_bindings' to report
        try:
            workflow.input.model_validate(schedule.input)
        except ValidationError as exc:
            key = f"schedules.{i}.input"
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "input"
            raise ConfigError(str(config.path or FILENAME), key,
                              f"does not fit the input of workflow '{workflow.name}': "
                              f"{where}: {first['msg']}", config.line_of(key)) from None


# -- the fold's part: pure ------------------------------------------------------------


def fold_update(tx: Tx, event: Event) -> None:
    """Apply a ``ScheduleUpdated`` to its schedule's record (never fenced: operators
    write from any process, and a former owner's ``fired`` is true: its trigger is
    on the log)."""
    body = event.body
    assert isinstance(body, ScheduleUpdated)
    key = keys.schedule(body.schedule)
    # A record folded before a field existed gets it empty (its history is on the log).
    record = {**new_record(body.schedule), **(tx.get(key) or {})}
    spec = json.loads(body.spec) if body.spec else {}
    ts = event.timestamp
    action = body.action
    if action == "registered":
        record["spec"] = spec
        record["registered_at"] = record["registered_at"] or ts
    note = {"action": action, "actor": body.actor, "reason": body.reason, "at": ts}
    if action in ("paused", "resumed"):
        record["paused"] = action == "paused"
        record["pause"] = note if action == "paused" else None
        if action == "resumed":
            record["resumed_at"] = ts
    elif action == "fired":
        record["last_fire_at"] = max(record["last_fire_at"] or 0, spec["fire_at"])
        record["last_execution"] = spec["execution_id"]
        record["fired"] += 1
        _keep(record, "started", {"execution_id": spec["execution_id"],
                                  "fire_at": spec["fire_at"], "by": None, "at": ts})
    elif action == "skipped":
        record["last_fire_at"] = max(record["last_fire_at"] or 0, spec["until"])
        record["skipped"] += spec["count"]
        _keep(record, "skips", {"count": spec["count"], "until": spec["until"],
                                "reason": spec.get("reason"), "running": spec.get("running"),
                                "at": ts})
    elif action == "triggered":
        record["last_execution"] = spec["execution_id"]
        _keep(record, "started", {"execution_id": spec["execution_id"], "fire_at": None,
                                  "by": body.actor, "at": ts})
    if action in ("paused", "resumed", "triggered", "registered"):
        _keep(record, "recent", note)
    record["updated_at"] = ts
    tx.put(key, record)


def _keep(record: Record, field: str, item: dict[str, Any]) -> None:
    """Add ``item`` to one of the record's short lists, keeping the latest RECENT (the
    record is read whole on every look: the log keeps all of them)."""
    record[field] = [*record[field], item][-RECENT:]


def new_record(name: str) -> Record:
    """An empty record. ``recent``: operator actions; ``started``: the executions it
    started (fired, or triggered now ``by`` an actor); ``skips``: fire times given up;
    ``pause``: who paused it, why and when, while it is paused."""
    return {"name": name, "spec": None, "registered_at": None, "paused": False,
            "pause": None, "resumed_at": None, "last_fire_at": None, "last_execution": None,
            "fired": 0, "skipped": 0, "recent": [], "started": [], "skips": [],
            "updated_at": None}


def read(view: PartitionView, name: str) -> Record | None:
    """The schedule's record as the view has it."""
    raw = view.db.get(keys.schedule(name))
    return None if raw is None else json.loads(raw)


# -- the runtime's part ----------------------------------------------------------------


class Scheduler:
    """Fires the schedules whose partition this process runs; answers operators."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        return self.runtime.config

    def start(self) -> None:
        if self.config.schedules and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ploy-schedules")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        """Look at every owned schedule, then sleep until the earliest next fire time."""
        runtime = self.runtime
        while not runtime.stopping:
            now = runtime.clock.now()
            wake = now + int(MAX_WAIT_S * 1000)
            for schedule in self.config.schedules:
                try:
                    wake = min(wake, await self._look(schedule))
                except PloyError as exc:  # no owner answers, a stalled partition: next look
                    logger.warning("schedule %s: %s; trying again", schedule.name, exc)
                except Exception:
                    logger.exception("schedule %s: firing failed; trying again", schedule.name)
            self._wake.clear()
            delay = max(wake - runtime.clock.now(), 0) / 1000
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _look(self, schedule: ScheduleConfig) -> int:
        """Fire what is due of ``schedule`` if this process runs its partition; the time
        (epoch ms) to look again."""
        runtime = self.runtime
        now = runtime.clock.now()
        later = now + int(MAX_WAIT_S * 1000)
        partition = runtime.log.partition_for(schedule_id(schedule.name))
        if not runtime.may_run(partition) or partition in runtime.stalled:
            return later
        view = await runtime.partitions.caught_up(partition)
        if view is None:
            return later
        record = read(view, schedule.name)
        if record is None or record["spec"] != json.loads(spec_of(schedule)):
            await self._append(schedule, "registered", "config", None, spec_of(schedule))
            return now
        if record["paused"]:
            return later
        due, missed, until = self._due(schedule, record, now)
        if missed:
            await self._append(schedule, "skipped", runtime.worker_id, "catchup",
                               json.dumps({"count": missed, "until": until, "reason": "catchup"}))
        for fire_at in due:
            if runtime.stopping or not runtime.may_run(partition):
                break
            await self._fire(schedule, fire_at)
        return schedule.timing.next_after(runtime.clock.now())

    def _baseline(self, record: Record) -> int:
        """Fire times after this one are due: the last one given (fired or skipped), else
        the registration; a resume gives up the times of the pause."""
        base = record["last_fire_at"] or record["registered_at"] or 0
        return max(int(base), int(record["resumed_at"] or 0))

    def _due(self, schedule: ScheduleConfig, record: Record,
             now: int) -> tuple[list[int], int, int]:
        """The fire times to fire now (oldest first), how many due ones the policy gives
        up, and a time at or after the last of those (the new baseline for them)."""
        keep = schedule.catchup_limit if schedule.catchup == "all" else 1
        times, count = schedule.timing.between(self._baseline(record), now, keep)
        if not times:
            return [], 0, 0
        latest = times[-1]
        if schedule.catchup == "skip" and now - latest > LATE_MS:
            times = []
        return times, count - len(times), times[0] - 1 if times else latest

    async def _fire(self, schedule: ScheduleConfig, fire_at: int) -> None:
        """Steps 1-4 of the module docstring for one fire time."""
        runtime = self.runtime
        partition = runtime.log.partition_for(schedule_id(schedule.name))
        # Step 1.
        view = await runtime.partitions.caught_up(partition)
        record = None if view is None else read(view, schedule.name)
        if record is None or (record["last_fire_at"] or 0) >= fire_at:
            return
        # Step 2.
        last = record["last_execution"]
        if schedule.overlap == "skip" and last is not None and await self._running(last):
            await self._append(schedule, "skipped", runtime.worker_id, "overlap", json.dumps(
                {"count": 1, "until": fire_at, "reason": "overlap", "running": last}))
            return
        # Step 3.
        workflow = self.config.workflow[schedule.binding].name
        try:
            eid = await runtime.trigger(workflow, schedule.input,
                                        idempotency_key=fire_key(schedule.name, fire_at))
        except (InvalidInputError, PayloadTooLargeError) as exc:  # recorded, not retried
            logger.error("schedule %s: trigger at %s refused: %s", schedule.name,
                         iso(fire_at), exc)
            await self._append(schedule, "skipped", runtime.worker_id, str(exc), json.dumps(
                {"count": 1, "until": fire_at, "reason": "refused"}))
            return
        # Step 4.
        await self._append(schedule, "fired", runtime.worker_id, None,
                           json.dumps({"fire_at": fire_at, "execution_id": eid}))

    async def _running(self, eid: str) -> bool:
        """Whether ``eid`` has not ended (asked of its partition's owner if need be)."""
        try:
            record = await self.runtime._record(eid)  # noqa: SLF001 - the runtime's own query
        except OwnerUnavailableError:
            return True  # cannot tell yet: do not start a second one
        return record is not None and not ExecutionStatus(record["status"]).terminal

    async def _append(self, schedule: ScheduleConfig, action: str, actor: str,
                      reason: str | None, spec: str | None) -> int:
        """Append a ``ScheduleUpdated`` and wait until this process's fold applied it (when
        it folds the partition); its offset."""
        runtime = self.runtime
        sid = schedule_id(schedule.name)
        workflow = self.config.workflow[schedule.binding].name
        event = Event(sid, workflow, runtime.clock.now(),
                      ScheduleUpdated(schedule.name, action, actor, reason, spec),
                      epoch=runtime.epoch_of(sid))
        partition, offset = await runtime.log.append(event)
        if action in ("fired", "skipped"):
            count = json.loads(spec or "{}").get("count", 1)
            runtime.metrics.schedule(action, schedule.name, count)
        if runtime.partitions.folds(partition):
            await runtime.partitions.folded(partition, offset)
        return offset

    # -- what operators call (API, CLI) ----------------------------------------------------

    def _schedule(self, name: str) -> ScheduleConfig:
        schedule = self.config.schedule(name)
        if schedule is None:
            raise KeyError(name)
        return schedule

    async def state(self, name: str, *, local: bool = False,
                    min_offset: int | None = None) -> dict[str, Any]:
        """The schedule as configured and as the log has it (paused, last and next fire),
        here or at its partition's owner, once it holds ``min_offset`` and this process's
        own writes there."""
        schedule = self._schedule(name)
        runtime = self.runtime
        partition = runtime.log.partition_for(schedule_id(name))
        view = await runtime.partitions.caught_up(partition, min_offset)
        if view is not None:
            record = read(view, name)
        elif local:
            raise NotFoldedHereError(partition)
        else:
            status, payload = await runtime._ask(partition, f"/schedules/{name}")  # noqa: SLF001
            if status != 200:
                raise OwnerUnavailableError(partition, f"answered {status}: {payload}")
            return payload  # type: ignore[no-any-return]
        return self._describe(schedule, record)

    def _describe(self, schedule: ScheduleConfig, record: Record | None) -> dict[str, Any]:
        record = record or new_record(schedule.name)
        paused = bool(record["paused"])
        base = max(self._baseline(record), self.runtime.clock.now())
        return {
            "name": schedule.name,
            "binding": schedule.binding,
            "workflow": self.config.workflow[schedule.binding].name,
            "cron": schedule.cron,
            "every_ms": schedule.every_ms,
            "timezone": schedule.timezone,
            "catchup": schedule.catchup,
            "catchup_limit": schedule.catchup_limit,
            "overlap": schedule.overlap,
            "paused": paused,
            "last_fire_at": record["last_fire_at"],
            "last_execution": record["last_execution"],
            "next_fire_at": None if paused else schedule.timing.next_after(base),
            "fired": record["fired"],
            "skipped": record["skipped"],
            "recent": record["recent"],
            "pause": record.get("pause"),
            "started": record.get("started", []),
            "skips": record.get("skips", []),
        }

    async def states(self) -> list[dict[str, Any]]:
        return [await self.state(s.name) for s in self.config.schedules]

    async def update(self, name: str, action: str, actor: str, reason: str | None) -> None:
        """Pause or resume ``name`` (an operator's action, on the log with who and why)."""
        if action not in ("paused", "resumed"):
            raise ValueError(f"unknown schedule action {action!r}")
        await self._append(self._schedule(name), action, actor, reason, None)
        self._wake.set()

    async def trigger_now(self, name: str, actor: str, reason: str | None) -> str:
        """Start one execution of ``name`` now, outside its timing; its id. It counts
        as the schedule's last execution for ``overlap: skip``."""
        schedule = self._schedule(name)
        workflow = self.config.workflow[schedule.binding].name
        key = f"schedule:{name}:now:{uuid.uuid4().hex}"
        eid = await self.runtime.trigger(workflow, schedule.input, idempotency_key=key)
        await self._append(schedule, "triggered", actor, reason,
                           json.dumps({"execution_id": eid}))
        return eid

