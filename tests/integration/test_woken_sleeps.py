"""A plain sleep's execution runs on as its ``TimerFired`` goes out, before the
acknowledgement (``Runtime._wake_fired``); what comes after the sleep waits for it:
the next step's function runs, and the end is acknowledged, only once the timer is on
the log, and nothing of the run goes to the producer before it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import ploy
from engine.errors import AppendError
from engine.events import TimerFired
from engine.testing import engine_config, running_engine
from tests.integration.test_own_appends import assert_rebuild_is_identical

REACHED: list[int] = []  # the handler's code after its sleep (replayable: it may run again)
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
        timers = HeldTimers(engine.runtime, monkeypatch)
        handle = await engine.env.NAP.trigger({"n": 1, "ms": 300})
        await wait_for(lambda: REACHED == [1], "the handler past its sleep")
        await asyncio.sleep(0.3)
        # Woken as the timer went out; the step waits for its acknowledgement.
        assert timers.fired == 1 and RAN == []
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
        timers = HeldTimers(engine.runtime, monkeypatch, refuse=True)
        handle = await engine.env.NAP.trigger({"n": 2, "ms": 200})
        await wait_for(lambda: REACHED == [2], "the handler past its sleep")
        timers.answer()  # refused: the run stops at its step; the schedule fires again
        assert await handle.result(timeout=10) == 2
        assert RAN == [2] and timers.fired == 1
        execution = await engine.env.NAP.get_execution(handle.execution_id)
        assert execution is not None and execution.status == "completed"
        # Nothing of the run that woke on the refused firing reached the log: the step's
        # one start and completion follow the one TimerFired.
        history = [e.type for e in await engine.runtime.history(handle.execution_id) or []]
        assert history == ["WorkflowTriggered", "WorkflowStarted", "SleepScheduled",
                           "TimerFired", "StepStarted", "StepCompleted", "WorkflowCompleted"]
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)
