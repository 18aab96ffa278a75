"""``/metrics``: Prometheus text that parses, and counters that match what ran."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine import NonRetryableError, ploy
from engine.http import create_app
from engine.testing import engine_config, running_engine, wait_for_status


def metrics_worker() -> Any:
    app = ploy()
    tries: dict[str, int] = {}

    @app.workflow("pay")
    async def pay(ctx: Any) -> Any:
        def flaky() -> int:
            tries[ctx.execution_id] = tries.get(ctx.execution_id, 0) + 1
            if tries[ctx.execution_id] == 1:
                raise RuntimeError("first attempt fails")
            return 1

        await ctx.step.run("charge", flaky)
        if ctx.input.get("nap"):
            await ctx.step.sleep("1h")
        return 1

    @app.workflow("refuse")
    async def refuse(ctx: Any) -> Any:
        def no() -> None:
            raise NonRetryableError("no")

        await ctx.step.run("no", no)

    return app.build()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_count_the_executions_run(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"PAY": "pay", "REFUSE": "refuse"},
                        backoff={"initial_ms": 10})
    async with running_engine(metrics_worker(), cfg) as engine:
        paid = [(await engine.env.PAY.trigger({}))["execution_id"] for _ in range(5)]
        refused = [(await engine.env.REFUSE.trigger({}))["execution_id"] for _ in range(2)]
        napping = (await engine.env.PAY.trigger({"nap": True}))["execution_id"]
        for eid in paid + refused:
            await wait_for_status(engine, eid)
        await wait_for_status(engine, napping, "sleeping")
        await asyncio.sleep(0.3)  # the fold of the last end events
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            response = await http.get("/metrics")
            also = await http.get("/__ploy/metrics")
            foreign = await http.get("/metrics", headers={"host": "example.com"})
    assert response.status_code == 200 and also.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert foreign.status_code == 403  # the engine API's guard
    got = samples(response.text)
    wf = (("workflow", "pay"),)
    assert got[("ploy_executions_triggered_total", wf)] == 6
    assert got[("ploy_executions_started_total", wf)] == 6
    assert got[("ploy_executions_completed_total", wf)] == 5
    assert got[("ploy_executions_failed_total", (("workflow", "refuse"),))] == 2
    assert ("ploy_executions_failed_total", wf) not in got
    assert got[("ploy_step_retries_total", (("step", "charge"), ("workflow", "pay")))] == 6
    done = (("outcome", "completed"), ("step", "charge"), ("workflow", "pay"))
    assert got[("ploy_step_duration_seconds_count", done)] == 6
    assert got[("ploy_step_duration_seconds_bucket", (("le", "+Inf"), *done))] == 6
    failed = (("outcome", "failed"), ("step", "charge"), ("workflow", "pay"))
    assert got[("ploy_step_duration_seconds_count", failed)] == 6
    assert sum(v for (name, _), v in got.items() if name == "ploy_timers_pending") == 1
    assert {name for name, _ in got} >= {"ploy_partition_lag", "ploy_fenced_events_total",
                                         "ploy_executions_running"}
