"""A plain sleep's execution is replayed as its ``TimerFired`` goes out, before the
acknowledgement (``Runtime._wake_fired``), and its sleep returns once the log has the
firing and the view what the log has before it: nothing after the sleep runs, and
nothing of the run goes to the producer, before that; a cancel written before the
firing ends the run at its sleep, as it does when the firing is waited for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import ploy
from engine.errors import AppendError
from engine.events import CancelRequested, Event, TimerFired
from engine.log import EventLog
from engine.testing import engine_config, running_engine
from tests.integration.test_own_appends import assert_rebuild_is_identical

REACHED: list[int] = []  # the handler's code after its sleep
RAN: list[int] = []  # the step after the sleep


def worker() -> Any:
    app = ploy()

    @app.workflow("nap")
    async def nap(ctx: Any) -> Any:
        await ctx.step.sleep(ctx.input["ms"])
        REACHED.append(ctx.input["n"])
        return await ctx.step.run("after", lambda: RAN.append(ctx.input["n"]) or ctx.input["n"])

    return app.build()


class HeldTimers:
    """``TimerFired`` appends answered only once ``answer()`` is called: acknowledged (the
    record went to the broker at once), or refused (it never went)."""

    def __init__(self, runtime: Any, monkeypatch: pytest.MonkeyPatch, refuse: bool = False):
        self.fired = 0
        self._answers: list[Any] = []
        self._open = False
        real = runtime.log.append_from_thread

        def held(event: Any, loop: asyncio.AbstractEventLoop, done: Any) -> None:
            if not isinstance(event.body, TimerFired) or self._open:
                real(event, loop, done)
                return
            self.fired += 1

            def later(error: AppendError | None, offset: int) -> None:  # on the loop
                if self._open:
                    done(error, offset)
                else:
                    self._answers.append(lambda: done(error, offset))

            if refuse:
                error = AppendError(runtime.log.topic, "refused (test)")
                loop.call_soon_threadsafe(later, error, -1)
            else:
                real(event, loop, later)

        monkeypatch.setattr(runtime.log, "append_from_thread", held)

    def answer(self) -> None:
        self._open = True
        for answer in self._answers:
            answer()


@pytest.fixture(autouse=True)
def _clear() -> None:
    REACHED.clear()
    RAN.clear()


async def wait_for(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def test_the_step_after_a_woken_sleep_waits_for_its_timer_on_the_log(
        kafka: str, topic_prefix: str, state_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        timers = HeldTimers(runtime, monkeypatch)
        handle = await engine.env.NAP.trigger({"n": 1, "ms": 300})
        await wait_for(lambda: timers.fired == 1 and handle.execution_id in runtime.runners,
                       "woken as its timer went out")
        await asyncio.sleep(0.3)
        assert REACHED == [] and RAN == []  # at its sleep, until the firing is answered
        timers.answer()
        assert await handle.result(timeout=10) == 1
        assert RAN == [1]
        history = [e.type for e in await engine.runtime.history(handle.execution_id) or []]
        assert history.count("TimerFired") == 1
        assert history.index("TimerFired") < history.index("StepStarted")
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)


async def test_a_woken_sleep_whose_timer_is_refused_wakes_again_and_runs_its_step_once(
        kafka: str, topic_prefix: str, state_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        timers = HeldTimers(runtime, monkeypatch, refuse=True)
        handle = await engine.env.NAP.trigger({"n": 2, "ms": 200})
        await wait_for(lambda: timers.fired == 1 and handle.execution_id in runtime.runners,
                       "woken as its timer went out")
        timers.answer()  # refused: the run stops at its sleep; the schedule fires again
        assert await handle.result(timeout=10) == 2
        assert REACHED == RAN == [2] and timers.fired == 1
        execution = await engine.env.NAP.get_execution(handle.execution_id)
        assert execution is not None and execution.status == "completed"
        # Nothing of the run that woke on the refused firing reached the log: the step's
        # one start and completion follow the one TimerFired.
        history = [e.type for e in await engine.runtime.history(handle.execution_id) or []]
        assert history == ["WorkflowTriggered", "WorkflowStarted", "SleepScheduled",
                           "TimerFired", "StepStarted", "StepCompleted", "WorkflowCompleted"]
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)


async def test_a_cancel_written_before_the_firing_ends_the_woken_run_at_its_sleep(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool]) -> None:
    """The cancel comes from another process's producer, and this process's fetch is off:
    its view lacks the cancel when the timer fires (after it, on the log) and wakes the
    run. The sleep returns only once the fold has the cancel: the run ends cancelled,
    and nothing after the sleep ran."""
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        other = EventLog(kafka, topic_prefix)
        try:
            handle = await engine.env.NAP.trigger({"n": 3, "ms": 2000})
            await wait_for(lambda: handle.execution_id not in runtime.runners, "asleep")
            no_fetch["fetch"] = False
            await asyncio.sleep(0.3)  # (a poll under way still brings what arrives during it)
            _, cancel_at = await asyncio.to_thread(other.append_sync, Event(
                handle.execution_id, "nap", 1, CancelRequested("from elsewhere", "test")))
        finally:
            other.close()
        await wait_for(lambda: handle.execution_id in runtime.runners, "woken by its timer")
        await asyncio.sleep(0.3)
        assert REACHED == [] and RAN == []  # the woken run waits at its sleep
        no_fetch["fetch"] = True
        history: list[Any] = []
        for _ in range(2000):  # the run writes the end: its children and parent are told
            history = await runtime.history(handle.execution_id) or []
            if history and history[-1].type == "WorkflowCancelled":
                break
            await asyncio.sleep(0.01)
        execution = await engine.env.NAP.get_execution(handle.execution_id)
        assert execution is not None and execution.status == "cancelled"
        fired = next(e for e in history if e.type == "TimerFired")
        assert fired.offset > cancel_at  # the firing came after the cancel on the log
        assert history[-1].type == "WorkflowCancelled"
        assert "StepStarted" not in [e.type for e in history]
        assert REACHED == [] and RAN == []
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)
