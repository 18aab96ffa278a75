"""Changing a workflow under sleeping executions: ctx.patched, versions, non-determinism."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from engine import ploy
from engine.config import Config
from engine.testing import engine_config, running_engine, wait_for_status

RAN: Counter[tuple[str, str]] = Counter()  # (execution id, step) -> runs of its body


def refund_worker(change: str) -> Any:
    """``v1``; ``patched``: a new first step behind ctx.patched; ``unpatched``: the same
    step with no guard (incompatible with v1's histories)."""
    app = ploy()

    def body(ctx: Any, step: str) -> Any:
        def run() -> str:
            RAN[(ctx.execution_id, step)] += 1
            return step
        return run

    @app.workflow("refund")
    async def refund(ctx: Any) -> Any:
        if change == "unpatched" or (change == "patched" and ctx.patched("new-refund-step")):
            await ctx.step.run("refund-check", body(ctx, "refund-check"))
        await ctx.step.run("charge", body(ctx, "charge"))
        await ctx.step.sleep("2s")
        return await ctx.step.run("ship", body(ctx, "ship"))

    return app.build()


def config(kafka: str, prefix: str, state: Path, version: str) -> Config:
    return engine_config(kafka, prefix, state, version=version,
                         workflow={"REFUND": {"name": "refund"}})


async def start_sleeping(kafka: str, prefix: str, state: Path, n: int) -> list[str]:
    """n executions of v1, each asleep after 'charge' when this returns (engine stopped)."""
    async with running_engine(refund_worker("v1"), config(kafka, prefix, state, "v1")) as a:
        ids = [(await a.env.REFUND.trigger({}))["execution_id"] for _ in range(n)]
        for eid in ids:
            await wait_for_status(a, eid, "sleeping", "completed")  # completed: slow host
    return ids


async def test_patched_old_executions_keep_the_old_path_new_ones_take_the_new(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    old = await start_sleeping(kafka, topic_prefix, tmp_path / "state", 50)
    cfg = config(kafka, topic_prefix, tmp_path / "state", "v2")
    async with running_engine(refund_worker("patched"), cfg) as b:
        new = [(await b.env.REFUND.trigger({}))["execution_id"] for _ in range(10)]
        done_old = await asyncio.gather(*(wait_for_status(b, e) for e in old))
        done_new = await asyncio.gather(*(wait_for_status(b, e) for e in new))
    for ex in done_old:
        assert ex.status.value == "completed" and ex.output == "ship"
        assert [s.key for s in ex.steps] == ["charge", "sleep#1", "ship"]
        assert ex.patches == [] and ex.version == "v1"
        assert RAN[(ex.execution_id, "refund-check")] == 0
        assert RAN[(ex.execution_id, "charge")] == 1
    for ex in done_new:
        assert ex.status.value == "completed"
        assert [s.key for s in ex.steps] == ["refund-check", "charge", "sleep#1", "ship"]
        assert ex.patches == ["new-refund-step"] and ex.version == "v2"
        assert RAN[(ex.execution_id, "refund-check")] == 1


async def test_an_unpatched_change_fails_replaying_executions_before_any_wrong_step(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    old = await start_sleeping(kafka, topic_prefix, tmp_path / "state", 10)
    cfg = config(kafka, topic_prefix, tmp_path / "state", "v3")
    async with running_engine(refund_worker("unpatched"), cfg) as b:
        fresh = (await b.env.REFUND.trigger({}))["execution_id"]
        done = await asyncio.gather(*(wait_for_status(b, e) for e in old))
        ok = await wait_for_status(b, fresh)
    for ex in done:
        assert ex.status.value == "failed"
        assert ex.error is not None and ex.error.type == "NonDeterminismError"
        assert ex.error.message.startswith(
            "non-determinism: expected step 'charge' at position 1, found step 'refund-check'")
        assert RAN[(ex.execution_id, "refund-check")] == 0  # the wrong step never ran
        assert RAN[(ex.execution_id, "ship")] == 0
    assert ok.status.value == "completed" and ok.version == "v3"
