"""``ploy replay-check``: run new workflow code against recorded histories, appending nothing.

Before new code takes partitions, check that it would replay what the log
recorded: each execution is replayed by the new handler with a runner that
only reads. ``ctx.step.run``/``parallel``/``sleep`` return the recorded
outcome of the recorded step at the same position, and never run a step's
function; ``ctx.log`` and ``ctx.env`` do nothing and nothing is appended.
An execution *diverges* at the first position where the new code asks for
another step than the one recorded there (a step renamed, added, removed or
moved), or when the new code ends while recorded steps remain. It *fails*
when the new code raises where the recorded run did not (a recorded output
it no longer reads, say). Replay stops, with no verdict against the code,
where the history stops (a step still running, a sleep still pending).
An execution whose data subject's key was erased (``engine.erasure``) cannot
be replayed: its verdict is ``erased``, which fails no check.

The histories come from a scratch fold of the whole log (as ``ploy view
--as-of``), so a running worker is neither read from nor disturbed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel

from engine.builder import Worker, WorkflowDef
from engine.context import Context
from engine.durations import parse_duration
from engine.erasure import PREFIX, KeyStore, Opener
from engine.errors import StepFailedError, SubjectErasedError
from engine.events import Event, RecordSkipped, claim_id
from engine.execution import Suspend, child_result, received_event, to_json
from engine.listing import list_page
from engine.log import EventLog
from engine.skips import apply_or_skip
from engine.view import PartitionView
from engine.waits import WAIT_KINDS

__all__ = ["Verdict", "check_execution", "follow", "replay_check"]

logger = logging.getLogger("ploy.replay")

REPLAY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Verdict:
    """How one recorded execution replays on the new code.

    ``outcome``: ``ok``, ``diverged`` (at step position ``position``: the recorded
    key ``recorded``, the key the new code asked for ``asked``, None when the
    new code ended there), ``failed`` (``error``: what the new code raised), or
    ``erased`` (its payloads are unreadable: not replayed).
    """

    execution_id: str
    workflow: str
    status: str
    outcome: str
    position: int | None = None
    recorded: str | None = None
    asked: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Diverged(BaseException):
    def __init__(self, position: int, recorded: str | None, asked: str | None):
        self.position, self.recorded, self.asked = position, recorded, asked


class _HistoryEnds(BaseException):
    """The recorded run stops here (a step running, a sleep pending): no verdict beyond."""


class _NoEnv:
    """``ctx.env`` on replay: triggering other workflows would append."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"ctx.env.{name}: replay-only, nothing may be appended")


class ReplayRunner:
    """A ``StepRunner`` that answers from the recorded steps, in their recorded order."""

    def __init__(self, steps: list[dict[str, Any]], ended: bool,
                 patches: list[str] | None = None):
        self.steps, self.ended = steps, ended
        self.patches = set(patches or [])
        self.at = 0
        self._occurrences: dict[str, int] = {}
        self._sleeps = 0

    def _key(self, name: str) -> str:
        n = self._occurrences.get(name, 0) + 1
        self._occurrences[name] = n
        return name if n == 1 else f"{name}#{n}"

    def _next(self, key: str) -> dict[str, Any]:
        """The recorded step at this position, which must be ``key``."""
        if self.at >= len(self.steps):
            if self.ended:  # the recorded run made no such step
                raise _Diverged(self.at, None, key)
            raise _HistoryEnds
        step = self.steps[self.at]
        if step["key"] != key:
            raise _Diverged(self.at, step["key"], key)
        self.at += 1
        return step

    async def run_step(self, name: str, fn: Callable[[], Any], *, input: Any,
                       retries: int | None, timeout: int | str | None) -> Any:
        return _outcome(self._next(self._key(name)))

    async def sleep(self, duration: int | str) -> None:
        parse_duration(duration, limit=None)  # (as the runner: limited only where written)
        self._sleeps += 1
        if self._next(f"sleep#{self._sleeps}")["status"] != "completed":
            raise _HistoryEnds

    async def parallel(self, name: str, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Branches start together, so their recorded order among themselves is free."""
        key = self._key(name)
        wanted = {f"{key}[{i}]" for i in range(len(fns))}
        found = self.steps[self.at:self.at + len(fns)]
        if {s["key"] for s in found} != wanted:
            if len(found) < len(fns) and not self.ended:
                raise _HistoryEnds
            recorded = ",".join(s["key"] for s in found) or None
            raise _Diverged(self.at, recorded, ",".join(sorted(wanted)))
        self.at += len(fns)
        by_key = {s["key"]: s for s in found}
        return [_outcome(by_key[f"{key}[{i}]"]) for i in range(len(fns))]

    async def wait_for_event(self, name: str, event_type: str, match: dict[str, Any] | None,
                             timeout: int | str | None, since: Any) -> Any:
        try:
            return received_event(self._next_wait(self._key(name)))
        except Suspend:
            raise _HistoryEnds from None

    async def invoke(self, name: str, binding: str, input: Any, timeout: int | str | None,
                     cancel_with_parent: bool) -> Any:
        key = self._key(name)
        try:
            return child_result(key, self._next_wait(key))
        except Suspend:
            raise _HistoryEnds from None

    def _next_wait(self, key: str) -> dict[str, Any]:
        """Like :meth:`_next`, but waits opened together (``asyncio.gather`` of invokes)
        are recorded in the order their appends landed: any of the run of waits here."""
        for j in range(self.at, len(self.steps)):
            if self.steps[j]["kind"] not in WAIT_KINDS:
                break
            if self.steps[j]["key"] == key:
                self.steps[self.at], self.steps[j] = self.steps[j], self.steps[self.at]
                break
        return self._next(key)

    def log(self, message: str, data: Any, level: str) -> None:
        pass

    def patched(self, name: str) -> bool:
        """As the engine answers (``engine.versioning``): the recorded marker, else the
        old branch while the history goes on past here, else the new one."""
        return name in self.patches or (self.at >= len(self.steps) and not self.ended)


def _outcome(step: dict[str, Any]) -> Any:
    """The recorded value of a step, its StepFailedError, or the end of the history."""
    if step["status"] == "completed":
        return json.loads(step["output"])
    last = step["attempts"][-1] if step["attempts"] else None
    if step["status"] == "failed" and last is not None and last["error"]:
        err = last["error"]
        raise StepFailedError(step["key"], last["attempt"], err["type"], err["message"])
    raise _HistoryEnds


def _opened(opener: Opener, record: dict[str, Any], steps: list[dict[str, Any]]
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record and steps of a data subject's execution with what replay reads opened
    (its input, step outputs, error messages, children's notices)."""
    return {**record, "input": opener.open(record["input"])}, [_opened_step(opener, s)
                                                               for s in steps]


def _opened_step(opener: Opener, step: dict[str, Any]) -> dict[str, Any]:
    if step["kind"] == "step":
        output = step["output"]
        attempts = [{**a, "error": a["error"] and {
            **a["error"], "message": opener.open(a["error"]["message"])}}
            for a in step["attempts"]]
        return {**step, "output": output and opener.open(output), "attempts": attempts}
    event = step.get("event")
    if step["kind"] in WAIT_KINDS and event and PREFIX in event["data"]:
        data = json.loads(event["data"])
        data.update(json.loads(opener.open(data.pop("sealed"))))
        return {**step, "event": {**event, "data": json.dumps(data)}}
    return step


async def check_execution(view: PartitionView, eid: str, workflow: WorkflowDef,
                          keys: KeyStore | None = None, outputs: bool = False) -> Verdict:
    """Replay one recorded execution on ``workflow``'s handler; its verdict."""
    record = view.record(eid)
    assert record is not None
    status = record["status"]
    ended = status in ("completed", "failed", "cancelled")
    steps = view.steps(eid)
    if record.get("subject") is not None:
        try:
            record, steps = _opened(Opener(keys, eid), record, steps)
        except SubjectErasedError:
            return Verdict(eid, record["workflow"], status, "erased")
    runner = ReplayRunner(steps, ended and status != "cancelled", record.get("patches") or [])
    verdict = Verdict(eid, record["workflow"], status, "ok")
    try:
        data = json.loads(record["input"])
        ctx: Context[Any, Any] = Context(
            input=workflow.input.model_validate(data) if workflow.input else data,
            env=_NoEnv(), execution_id=eid, workflow=workflow.name, runner=runner)
        result = await asyncio.wait_for(workflow.handler(ctx), REPLAY_TIMEOUT_S)
    except _HistoryEnds:
        return verdict
    except _Diverged as d:
        return Verdict(eid, record["workflow"], status, "diverged", d.position, d.recorded,
                       d.asked)
    except Exception as exc:
        if status in ("failed", "cancelled"):
            return verdict  # the recorded run did not complete either
        return Verdict(eid, record["workflow"], status, "failed",
                       error=f"{type(exc).__name__}: {exc}")
    if status == "completed" and runner.at < len(steps):
        return Verdict(eid, record["workflow"], status, "diverged", runner.at,
                       steps[runner.at]["key"], None)
    if outputs and status == "completed":
        return _compare_output(verdict, workflow, record["output"], result)
    return verdict


def _compare_output(verdict: Verdict, workflow: WorkflowDef, recorded: str | None,
                    result: Any) -> Verdict:
    """``--outputs``: the new code's output (computed from the recorded step outputs)
    against the recorded one, both as the JSON the engine records."""
    try:
        new = _as_recorded(workflow, result)
    except Exception as exc:  # the new output no longer validates or serializes
        return replace(verdict, outcome="failed", error=f"output: {type(exc).__name__}: {exc}")
    old = None if recorded is None else json.loads(recorded)
    if new == old:
        return verdict
    return replace(verdict, outcome="diverged",
                   error=f"output: recorded {_compact(old)}, new code {_compact(new)}")


def _as_recorded(workflow: WorkflowDef, result: Any) -> Any:
    """The output as JSON values, validated by the workflow's output model as a run does."""
    if workflow.output is not None:
        if isinstance(result, BaseModel) and not isinstance(result, workflow.output):
            result = result.model_dump()
        model = result if isinstance(result, workflow.output) else (
            workflow.output.model_validate(result))
        return json.loads(model.model_dump_json())
    return json.loads(to_json(result, "the output"))


def _compact(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


async def replay_check(views: list[PartitionView], worker: Worker, *,
                       workflow: str | None = None, limit: int = 1000,
                       keys: KeyStore | None = None, outputs: bool = False) -> list[Verdict]:
    """Replay the ``limit`` newest executions (of ``workflow``) on ``worker``'s code
    (``keys`` opens data subjects' payloads)."""
    page = list_page(views, workflow=workflow, limit=limit)
    verdicts = []
    for summary in page.executions:
        view = next(v for v in views if v.record(summary.execution_id) is not None)
        definition = worker.workflow(summary.workflow)
        if definition is None:
            verdicts.append(Verdict(summary.execution_id, summary.workflow,
                                    summary.status.value, "failed",
                                    error=f"the new code has no workflow '{summary.workflow}'"))
            continue
        verdicts.append(await check_execution(view, summary.execution_id, definition, keys,
                                              outputs))
    return verdicts


CHECKED_AT = ("completed", "failed", "cancelled", "sleeping", "waiting")  # a run's resting points


async def follow(log: EventLog, worker: Worker, scratch: Path, report: Callable[[Verdict], None],
                 stopping: Callable[[], bool], *, workflow: str | None = None,
                 keys: KeyStore | None = None, outputs: bool = False) -> int:
    """``replay-check --follow``: a shadow consumer of the live log. It folds the log from
    offset 0 into scratch views under ``scratch`` (its own consumer: no group, no commit,
    nothing appended) and replays each execution on the new code whenever the fold leaves
    it at a resting point (ended, sleeping, waiting), reporting every verdict that is not
    ``ok`` once, as it happens. Runs until ``stopping()``; returns how many diverged or
    failed."""
    from confluent_kafka import TopicPartition  # a consumer of its own, assigned by hand

    views = {p: PartitionView(scratch / f"p{p}", log.topic, p, log.codec)
             for p in range(log.partitions)}
    consumer = log.consumer(f"{log.topic}.replay-check")  # never commits (CONSUMER_FIXED)
    consumer.assign([TopicPartition(log.topic, p, 0) for p in views])
    seen: dict[str, int] = {}  # execution id -> events when last checked
    bad = 0
    try:
        while not stopping():
            messages = await asyncio.to_thread(consumer.consume, 1000, 0.5)
            by_partition: dict[int, list[tuple[int, bytes]]] = {}
            for msg in messages:
                if msg.error() is None:
                    by_partition.setdefault(cast(int, msg.partition()), []).append(
                        (cast(int, msg.offset()), cast(bytes, msg.value())))
            for p, records in by_partition.items():
                applied, failure = apply_or_skip(log, views[p], records)
                if failure is not None:
                    logger.warning("replay-check: %s; stepping over it", failure)
                    views[p].skip(failure.offset, *_no_marker(failure.offset))
                for eid in dict.fromkeys(e.execution_id for _, e in applied):
                    verdict = await _check_resting(views[p], eid, worker, workflow, keys,
                                                   outputs, seen)
                    if verdict is not None and verdict.outcome not in ("ok", "erased"):
                        bad += 1
                        report(verdict)
    finally:
        consumer.close()
        for view in views.values():
            view.close()
    return bad


async def _check_resting(view: PartitionView, eid: str, worker: Worker, workflow: str | None,
                         keys: KeyStore | None, outputs: bool,
                         seen: dict[str, int]) -> Verdict | None:
    """Replay ``eid`` if the fold left it at a resting point not checked yet."""
    record = view.record(eid)
    if record is None or record["status"] not in CHECKED_AT or seen.get(eid) == record["events"]:
        return None
    if workflow is not None and record["workflow"] != workflow:
        return None
    seen[eid] = record["events"]
    definition = worker.workflow(record["workflow"])
    if definition is None:
        return Verdict(eid, record["workflow"], record["status"], "failed",
                       error=f"the new code has no workflow '{record['workflow']}'")
    return await check_execution(view, eid, definition, keys, outputs)


def _no_marker(offset: int) -> tuple[Event, int]:
    """A skip of an unreadable record in the scratch view only (no operator's marker)."""
    marker = Event(claim_id(0), "", 0, RecordSkipped(0, offset, "replay-check", "replay-check"))
    return marker, offset
