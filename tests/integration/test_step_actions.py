"""Operator actions on steps: complete a stuck step, end a backoff wait; who and why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import Engine, ploy
from engine.http import create_app
from engine.testing import engine_config, running_engine

ATTEMPTS: dict[str, int] = {}


def stuck_worker() -> Any:
    app = ploy()

    @app.workflow("stuck")
    async def stuck(ctx: Any) -> Any:
        async def forever() -> Any:
            await asyncio.sleep(3600)

        got = await ctx.step.run("hang", forever)
        return await ctx.step.run("after", lambda: {"got": got})

    @app.workflow("flaky")
    async def flaky(ctx: Any) -> Any:
        def attempt() -> Any:
            ATTEMPTS[ctx.execution_id] = ATTEMPTS.get(ctx.execution_id, 0) + 1
            if ATTEMPTS[ctx.execution_id] == 1:
                raise RuntimeError("first attempt fails")
            return "second"

        return await ctx.step.run("flaky", attempt, retries=2)

    return app.build()


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> AsyncIterator[Engine]:
    config = engine_config(kafka, topic_prefix, state_dir,
                           workflow={"STUCK": "stuck", "FLAKY": "flaky"},
                           backoff={"initial_ms": 3_600_000, "max_ms": 3_600_000})
    async with running_engine(stuck_worker(), config) as eng:
        yield eng


async def _step_status(engine: Engine, eid: str, key: str, status: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        execution = await engine.get_execution(eid)
        step = next((s for s in execution.steps if s.key == key), None) if execution else None
        if step is not None and step.status == status:
            return
        assert time.monotonic() < deadline, execution
        await asyncio.sleep(0.02)


async def test_complete_a_stuck_step_and_end_a_backoff_wait_with_who_and_why(
        engine: Engine) -> None:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787",
                                 timeout=30) as c:
        stuck = await engine.env.STUCK.trigger({})
        await _step_status(engine, stuck.execution_id, "hang", "running")
        url = f"/__ploy/api/executions/{stuck.execution_id}"
        for body, code in [({"step": "hang"}, 422),  # no reason
                           ({"step": "nope", "reason": "r"}, 409),
                           ({"step": "hang", "reason": " "}, 422)]:
            response = await c.post(f"{url}/complete-step", json=body)
            assert response.status_code == code, response.text
        response = await c.post(f"{url}/complete-step", json={
            "step": "hang", "output": {"manual": 1}, "reason": "the provider is down",
            "actor": "ops"})
        assert response.status_code == 200 and response.json()["resolved"], response.text
        assert await stuck.result(timeout=15) == {"got": {"manual": 1}}
        done = await engine.get_execution(stuck.execution_id)
        assert done is not None
        hang = next(s for s in done.steps if s.key == "hang")
        assert hang.output == {"manual": 1}
        assert hang.resolved is not None
        assert (hang.resolved["actor"], hang.resolved["reason"]) == (
            "local:ops", "the provider is down")
        history = await engine.history(stuck.execution_id)
        assert history is not None
        resolved = [e for e in history if e.type == "StepResolved"]
        assert [(e.body["action"], e.body["actor"]) for e in resolved] == [
            ("complete", "local:ops")]
        # Once completed, it cannot be completed again.
        again = await c.post(f"{url}/complete-step", json={"step": "hang", "reason": "r"})
        assert again.status_code == 409

        flaky = await engine.env.FLAKY.trigger({})
        await _step_status(engine, flaky.execution_id, "flaky", "retrying")  # waits 1 h
        response = await c.post(f"/__ploy/api/executions/{flaky.execution_id}/retry-now",
                                json={"step": "flaky", "reason": "fixed upstream"})
        assert response.status_code == 200, response.text
        assert await flaky.result(timeout=15) == "second"
        assert ATTEMPTS[flaky.execution_id] == 2
