"""Pure parts of the audit features: times, rerun cut points, the replay-only runner."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.asof import parse_time
from engine.errors import CommandError, RerunError, StepFailedError
from engine.models import HistoryEntry
from engine.replaycheck import ReplayRunner, _Diverged, _HistoryEnds
from engine.rerun import plan


def test_times_are_iso_8601_utc_unless_zoned_or_epoch_ms() -> None:
    assert parse_time("2026-11-28T09:30:00Z") == 1795858200000
    assert parse_time("2026-11-28T09:30:00") == 1795858200000
    assert parse_time("2026-11-28T10:30:00+01:00") == 1795858200000
    assert parse_time("1795858200000") == 1795858200000
    with pytest.raises(CommandError, match="'yesterday' is not a time"):
        parse_time("yesterday")


def entry(offset: int, type_: str, **body: Any) -> HistoryEntry:
    return HistoryEntry(partition=0, offset=offset, event_id=str(offset), timestamp=offset,
                        type=type_, epoch=0, body=body)


HISTORY = [
    entry(0, "WorkflowTriggered", input="{}"),
    entry(1, "WorkflowStarted", worker="w"),
    entry(2, "StepStarted", step="a", attempt=1),
    entry(3, "StepCompleted", step="a", attempt=1, input=None, output="1", started_at=2),
    entry(4, "StepStarted", step="b", attempt=1),
    entry(5, "StepFailed", step="b", attempt=1, input=None, error_type="E", message="m",
          traceback="", started_at=4, retry_at=None, final=True),
    entry(6, "WorkflowFailed", error_type="E", message="m", traceback=""),
]


def test_a_rerun_cuts_at_the_first_start_of_its_step_and_copies_what_came_before() -> None:
    cut, step, copies = plan("s", "failed", HISTORY, "b")
    assert (cut, step, [c.offset for c in copies]) == (4, "b", [1, 2, 3])
    assert plan("s", "failed", HISTORY, None)[:2] == (4, "b")  # the first step not completed
    with pytest.raises(RerunError, match="never started a step 'c'") as info:
        plan("s", "failed", HISTORY, "c")
    assert info.value.steps == ["a", "b"]
    with pytest.raises(RerunError, match="it is running"):
        plan("s", "running", HISTORY, "b")


def step(key: str, status: str = "completed", output: str = "1") -> dict[str, Any]:
    error = {"type": "E", "message": "m", "traceback": ""}
    return {"key": key, "kind": "step", "status": status, "output": output,
            "attempts": [{"attempt": 1, "error": None if status == "completed" else error}]}


def replay(runner: ReplayRunner, *names: str) -> list[Any]:
    async def go() -> list[Any]:
        return [await runner.run_step(n, lambda: None, input=None, retries=None, timeout=None)
                for n in names]

    return asyncio.run(go())


def test_the_replay_runner_answers_from_the_record_in_order() -> None:
    assert replay(ReplayRunner([step("a"), step("a#2", output="2")], True), "a", "a") == [1, 2]
    with pytest.raises(_Diverged) as info:
        replay(ReplayRunner([step("a"), step("b")], True), "a", "c")
    assert (info.value.position, info.value.recorded, info.value.asked) == (1, "b", "c")
    with pytest.raises(_Diverged):  # a step the ended run never made
        replay(ReplayRunner([step("a")], True), "a", "b")
    with pytest.raises(_HistoryEnds):  # a live run: no verdict beyond its history
        replay(ReplayRunner([step("a")], False), "a", "b")
    with pytest.raises(StepFailedError):
        replay(ReplayRunner([step("a", "failed")], True), "a")
