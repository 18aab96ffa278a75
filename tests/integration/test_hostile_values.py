"""Numbers the log cannot hold (an event's times are 64-bit): a sleep or timeout of
more than 100 years, a ``since`` beyond the year 9999. Each fails the workflow with a
clear error at the call that gave it, and what the run had done before stays
recorded: the step before it is completed, on the log and in the view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import codec, execution, ploy
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
        elif how == "log":
            ctx.log("poison")  # held, to go with the next step's start
            await ctx.step.run("b", lambda: 2)
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


@pytest.mark.parametrize("value", [YEARS_200_MS, "73000d"])
async def test_a_sleep_beyond_100_years_fails_clearly(engine: Engine, value: Any) -> None:
    message = await ran_a_then_failed(engine, "sleep", value)
    assert message.startswith("DurationError: invalid duration ")
    assert "longer than 3155760000000 ms (100 years)" in message


async def test_a_wait_timeout_beyond_100_years_fails_clearly(engine: Engine) -> None:
    message = await ran_a_then_failed(engine, "timeout", 10**20)
    assert "longer than 3155760000000 ms (100 years)" in message


@pytest.mark.parametrize("value", [10**19, -1000])
async def test_a_since_outside_1970_to_9999_fails_clearly(engine: Engine, value: int) -> None:
    message = await ran_a_then_failed(engine, "since", value)
    assert message == ("ValueError: since must be a time from 1970 to 9999 (ms since the "
                       f"epoch), got {value}")


async def test_an_event_the_log_cannot_encode_loses_nothing_held_before_it(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last guard, should a check upstream miss a value: the encoding refuses the
    sleep's event before anything is handed to the producer, the handler gets the error,
    and the step completion held to go with it still goes out, with the end."""
    monkeypatch.setattr(execution, "parse_duration", lambda value, limit=None: 10**20)
    monkeypatch.setattr(execution, "within_limit", lambda ms, value, limit=None: ms)
    message = await ran_a_then_failed(engine, "sleep", 1000)
    assert message.startswith("UnencodableEventError: SleepScheduled of execution ")
    assert "cannot be written to the log" in message


async def test_a_wait_recorded_before_the_limit_still_replays(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200-year timeout fits the log, and a version without the limit wrote one: the
    replay finds it recorded, and the limit applies only to what is written anew."""
    monkeypatch.setattr(execution, "within_limit", lambda ms, value, limit=None: ms)
    eid = (await engine.env.HOSTILE.trigger({"how": "timeout", "value": YEARS_200_MS})
           ).execution_id
    await wait_for_status(engine, eid, "waiting")
    monkeypatch.undo()  # this version
    await engine.send_event("t", {}, execution_id=eid)
    done = await wait_for_status(engine, eid)
    assert done.status.value == "completed", done.error


async def test_a_held_event_the_log_cannot_encode_is_dropped_and_the_run_goes_on(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log line held to go with the next append, should its encoding fail: every later
    append would fail with it, so it is dropped (loudly) and the run goes on."""
    encode = codec.Codec.encode

    def refusing(self: codec.Codec, event: Any) -> bytes:
        if getattr(event.body, "message", None) == "poison":
            raise OverflowError("does not fit an Avro long")
        return encode(self, event)

    monkeypatch.setattr(codec.Codec, "encode", refusing)
    eid = (await engine.env.HOSTILE.trigger({"how": "log", "value": 0})).execution_id
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert done.status.value == "completed", done.error
    assert [(s.name, s.status, len(s.attempts)) for s in done.steps] == [
        ("a", "completed", 1), ("b", "completed", 1)]
    assert [line.message for line in done.logs] == []
