"""A burst of triggers is answered before the executions it starts run
(``engine.ingress``); a lone trigger starts its execution on its acknowledgement."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import ingress, ploy
from engine.errors import AppendError
from engine.testing import engine_config, running_engine

RAN: list[int] = []


def worker() -> Any:
    app = ploy()

    @app.workflow("bump")
    async def bump(ctx: Any) -> Any:
        return await ctx.step.run("bump", lambda: RAN.append(ctx.input["n"]) or ctx.input["n"] + 1)

    return app.build()


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grace no turn of the loop outlasts, so what is held is seen held (and a bound
    that a slow machine does not reach)."""
    monkeypatch.setattr(ingress, "GRACE_S", 0.5)
    monkeypatch.setattr(ingress, "MAX_HOLD_S", 60.0)
    RAN.clear()


async def test_a_burst_is_answered_first_then_every_execution_runs_once(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"},
                           partitions=2)
    async with running_engine(worker(), config) as engine:
        handles = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(40)))
        # Every trigger is answered, and none of the burst's executions has started yet.
        assert not engine.runtime.runners and RAN == []
        for handle in handles:
            execution = await engine.env.BUMP.get_execution(handle.execution_id)
            assert execution is not None and execution.status == "queued"
        metrics = await engine.runtime.metrics.render(engine.runtime)
        assert "\nploy_executions_held 40\n" in metrics
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
        assert results == [n + 1 for n in range(40)]
        assert sorted(RAN) == list(range(40))  # each step once
        metrics = await engine.runtime.metrics.render(engine.runtime)
        assert "\nploy_executions_held 0\n" in metrics
        assert engine.runtime.ingress.accepting == 0 and not engine.runtime.ingress.holding


async def test_a_held_execution_cancelled_before_it_starts_never_runs(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        handles = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(20)))
        victim = handles[7].execution_id
        assert await engine.env.BUMP.cancel(victim, "changed my mind")
        ended = await asyncio.gather(*(h.result(timeout=20) for h in handles if
                                       h.execution_id != victim))
        assert len(ended) == 19
        execution = await engine.env.BUMP.get_execution(victim)
        assert execution is not None and execution.status == "cancelled"
        assert 7 not in RAN and len(RAN) == 19


async def test_a_lone_trigger_starts_its_execution_on_its_acknowledgement(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        for n in range(3):
            handle = await engine.env.BUMP.trigger({"n": n})
            # Started with the answer, not after a grace: its runner is there already.
            assert handle.execution_id in engine.runtime.runners
            assert await handle.result(timeout=10) == n + 1


async def test_a_burst_of_triggers_that_fail_leaves_no_burst_behind(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        append = runtime.log.append

        async def refused(event: Any, partition: int | None = None) -> tuple[int, int]:
            await asyncio.sleep(0.01)  # every trigger of the burst is in flight
            raise AppendError(runtime.log.topic, "the broker refused it")

        monkeypatch.setattr(runtime.log, "append", refused)
        failed = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(30)),
                                      return_exceptions=True)
        assert all(isinstance(f, AppendError) for f in failed)
        assert runtime.ingress.accepting == 0 and runtime.ingress.holding  # the grace runs
        await asyncio.sleep(1.0)
        assert not runtime.ingress.holding
        monkeypatch.setattr(runtime.log, "append", append)
        handle = await engine.env.BUMP.trigger({"n": 1})
        assert handle.execution_id in runtime.runners  # started on its acknowledgement
        assert await handle.result(timeout=10) == 2
