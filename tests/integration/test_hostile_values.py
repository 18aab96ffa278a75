"""Numbers the log cannot hold (an event's times are 64-bit): a sleep or timeout of
more than 100 years, a ``since`` beyond the year 9999. Each fails the workflow with a
clear error at the call that gave it, and what the run had done before stays
recorded: the step before it is completed, on the log and in the view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import execution, ploy
from engine.app import Engine
from engine.testing import engine_config, running_engine, wait_for_status

YEARS_200_MS = 200 * 365 * 86_400_000


def hostile_app() -> Any:
    app = ploy()

    @app.workflow("hostile")
    async def hostile(ctx: Any) -> None:
        await ctx.step.run("a", lambda: 1)  # its completion is held for the next append
        how = ctx.input["how"]
        if how == "sleep":
            await ctx.step.sleep(ctx.input["value"])
        elif how == "since":
            await ctx.step.wait_for_event("e", type="t", since=ctx.input["value"])
        else:
            await ctx.step.wait_for_event("e", type="t", timeout=ctx.input["value"])

    return app.build()


async def ran_a_then_failed(engine: Engine, how: str, value: Any) -> str:
    """Trigger; return the failure's message once the execution failed, after checking
    that step ``a`` is completed in the view and on the log before the end."""
    eid = (await engine.env.HOSTILE.trigger({"how": how, "value": value})).execution_id
    done = await wait_for_status(engine, eid)
    assert done.status.value == "failed"
    assert [(s.name, s.status, len(s.attempts)) for s in done.steps] == [("a", "completed", 1)]
    history = [e.type for e in await engine.history(eid) or []]
    assert history[-2:] == ["StepCompleted", "WorkflowFailed"]
    assert done.error is not None
    return f"{done.error.type}: {done.error.message}"


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> Any:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"HOSTILE": "hostile"})
    async with running_engine(hostile_app(), config) as running:
        yield running


@pytest.mark.parametrize("value", [YEARS_200_MS, "73000d", "9" * 5000],
                         ids=["200 years in ms", "73000d", "5000 digits"])
async def test_a_sleep_beyond_100_years_fails_clearly(engine: Engine, value: Any) -> None:
    message = await ran_a_then_failed(engine, "sleep", value)
    assert message.startswith("DurationError: invalid duration ")
    assert "longer than 100 years" in message


async def test_a_wait_timeout_beyond_100_years_fails_clearly(engine: Engine) -> None:
    message = await ran_a_then_failed(engine, "timeout", 10**20)
    assert "longer than 100 years" in message


async def test_a_since_beyond_the_year_9999_fails_clearly(engine: Engine) -> None:
    message = await ran_a_then_failed(engine, "since", 10**19)
    assert message == ("ValueError: since must be ms since the epoch of a time in the years "
                       "1 to 9999, got 10000000000000000000")


async def test_an_event_the_log_cannot_encode_loses_nothing_held_before_it(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last guard, should a check upstream miss a value: the encoding refuses the
    sleep's event before anything is handed to the producer, the handler gets the error,
    and the step completion held to go with it still goes out, with the end."""
    monkeypatch.setattr(execution, "parse_duration", lambda value: 10**20)
    message = await ran_a_then_failed(engine, "sleep", 1000)
    assert message.startswith("ValueError: SleepScheduled of execution ")
    assert "cannot be written to the log" in message
