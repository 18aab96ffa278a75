"""Schedules on a real broker: firings, catch-up after downtime, overlap, operator actions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from engine import ploy
from engine.app import Engine
from engine.config import Config
from engine.cron import iso
from engine.http import create_app
from engine.testing import engine_config, running_engine, wait_for_status


def tick_worker() -> Any:
    app = ploy()

    @app.workflow("tick")
    async def tick(ctx: Any) -> Any:
        return await ctx.step.run("work", lambda: ctx.input)

    @app.workflow("slow")
    async def slow(ctx: Any) -> Any:
        await ctx.step.sleep("3s")
        return 1

    return app.build()


def config(kafka: str, prefix: str, state: Path, *schedules: dict[str, Any]) -> Config:
    return engine_config(kafka, prefix, state, workflow={"TICK": "tick", "SLOW": "slow"},
                         schedules=list(schedules))


async def fired(engine: Engine, name: str) -> dict[str, str]:
    """Fire time (ISO) -> execution id, for every execution the schedule started."""
    page = await engine.list_executions(limit=500)
    out: dict[str, str] = {}
    for summary in page:
        execution = await engine.get_execution(summary.execution_id)
        assert execution is not None
        key = execution.idempotency_key or ""
        if key.startswith(f"schedule:{name}:"):
            fire_time = key.removeprefix(f"schedule:{name}:")
            assert fire_time not in out  # one execution per fire time
            out[fire_time] = execution.execution_id
    return out


def seconds(fire_times: list[str]) -> list[int]:
    from datetime import datetime

    return sorted(int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp())
                  for t in fire_times if ":now:" not in t)


async def test_catch_up_after_downtime_follows_each_policy(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    cfg = config(kafka, topic_prefix, tmp_path / "state",
                 {"name": "all", "binding": "TICK", "every_ms": 1000, "catchup": "all",
                  "overlap": "allow", "input": {"n": 1}},
                 {"name": "once", "binding": "TICK", "every_ms": 1000, "catchup": "once"},
                 {"name": "skip", "binding": "TICK", "every_ms": 1000, "catchup": "skip"})
    worker = tick_worker()
    async with running_engine(worker, cfg):
        await asyncio.sleep(2.5)
    down_from = time.time()
    await asyncio.sleep(5)
    async with running_engine(worker, cfg) as engine:
        back_at = time.time()
        await asyncio.sleep(2.5)
        all_ = seconds(list(await fired(engine, "all")))
        once = seconds(list(await fired(engine, "once")))
        skip = seconds(list(await fired(engine, "skip")))
        states = {s["name"]: s for s in await engine.runtime.schedules.states()}
        counted = engine.runtime.metrics.counters
        some = await wait_for_status(engine, next(iter((await fired(engine, "all")).values())))
    gap = [s for s in range(int(down_from) + 1, int(back_at) - 2)]  # surely missed times
    assert len(gap) >= 2
    # all: every second, none twice, none missing
    assert all_ == list(range(all_[0], all_[-1] + 1)) and set(gap) <= set(all_)
    assert states["all"]["skipped"] == 0
    # once: of the missed times only the latest ran
    assert len([s for s in once if s in gap]) <= 1
    assert states["once"]["skipped"] >= len(gap) - 1
    # skip: none of the missed times ran
    assert not set(gap) & set(skip) and states["skip"]["skipped"] >= len(gap)
    assert counted["ploy_schedule_skipped"][(("schedule", "skip"),)] >= len(gap)  # /metrics
    assert counted["ploy_schedule_fired"][(("schedule", "all"),)] >= len(gap)
    assert some.output == {"n": 1}


async def test_overlap_skip_pause_resume_and_trigger_now_over_the_api(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    cfg = config(kafka, topic_prefix, tmp_path / "state",
                 {"name": "slow", "binding": "SLOW", "every_ms": 1000, "overlap": "skip"})
    async with running_engine(tick_worker(), cfg) as engine:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            await asyncio.sleep(2.5)  # the first runs for 3 s: the next ones are skipped
            runs = await fired(engine, "slow")
            assert len(runs) == 1
            listed = (await http.get("/__ploy/api/schedules")).json()["schedules"]
            assert listed[0]["name"] == "slow" and listed[0]["skipped"] >= 1
            assert listed[0]["last_execution"] == next(iter(runs.values()))
            paused = await http.post("/__ploy/api/schedules/slow/pause",
                                     json={"reason": "maintenance", "actor": "ann"})
            assert paused.status_code == 200 and paused.json()["paused"] is True
            await wait_for_status(engine, next(iter(runs.values())), timeout_s=10)
            await asyncio.sleep(1.5)
            assert len(await fired(engine, "slow")) == 1  # paused: nothing new
            now = await http.post("/__ploy/api/schedules/slow/trigger",
                                  json={"reason": "backfill", "actor": "ann"})
            assert now.status_code == 201
            manual = now.json()["execution_id"]
            assert (await engine.get_execution(manual)) is not None
            resumed = await http.post("/__ploy/api/schedules/slow/resume", json={})
            assert resumed.json()["paused"] is False
            state = (await http.get("/__ploy/api/schedules/slow")).json()
            unknown = await http.post("/__ploy/api/schedules/nope/pause", json={})
    assert [(r["action"], r["actor"], r["reason"]) for r in state["recent"]] == [
        ("registered", "config", None), ("paused", "local:ann", "maintenance"),
        ("triggered", "local:ann", "backfill"), ("resumed", "local:unknown", None)]
    assert state["last_execution"] == manual and state["next_fire_at"] is not None
    assert unknown.status_code == 404


def test_fire_keys_name_the_schedule_and_the_time() -> None:
    from engine.schedules import fire_key

    assert fire_key("nightly", 1_800_000_000_000) == f"schedule:nightly:{iso(1_800_000_000_000)}"


async def test_the_cli_lists_pauses_resumes_and_triggers_now(
    kafka: str, topic_prefix: str, tmp_path: Path, capsys: Any
) -> None:
    from engine.app import serving_api
    from engine.cli import main

    cfg = config(kafka, topic_prefix, tmp_path / "state",
                 {"name": "daily", "binding": "TICK", "cron": "0 9 * * mon-fri",
                  "timezone": "Europe/Paris"})
    async with running_engine(tick_worker(), cfg) as engine, serving_api(engine) as url:
        async def ploy_(*argv: str) -> tuple[int, str]:
            code = await asyncio.to_thread(main, ["schedule", *argv, "--url", url])
            return code, capsys.readouterr().out

        code, out = await ploy_("pause", "daily", "--reason", "holiday")
        assert code == 0 and out == "daily paused\n"
        code, out = await ploy_("list")
        assert "daily" in out and "0 9 * * mon-fri" in out and "paused" in out
        code, out = await ploy_("trigger-now", "daily")
        done = await wait_for_status(engine, out.strip())
        assert done.status.value == "completed"
        code, out = await ploy_("resume", "daily")
        assert out == "daily resumed\n"
        code = await asyncio.to_thread(main, ["schedule", "pause", "nope", "--url", url])
        assert code == 2 and "unknown schedule 'nope'" in capsys.readouterr().err


async def test_an_input_the_workflow_refuses_fails_start_up_with_key_and_line(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    import pytest
    from pydantic import BaseModel

    from engine.config import load_config
    from engine.errors import ConfigError

    class Order(BaseModel):
        order_id: str

    app = ploy()

    @app.workflow("order", input=Order)
    async def order(ctx: Any) -> Any:
        return 1

    (tmp_path / "ploy.yaml").write_text(
        "workflow:\n  ORDER: order\nschedules:\n"
        "  - name: o\n    binding: ORDER\n    every: 1m\n    input: {id: 1}\n")
    cfg = load_config(tmp_path, env={"KAFKA_BOOTSTRAP_SERVERS": kafka,
                                     "PLOY_TOPIC_PREFIX": topic_prefix})
    with pytest.raises(ConfigError) as caught:
        async with running_engine(app.build(), cfg):
            pass
    assert (caught.value.key, caught.value.line) == ("schedules.0.input", 7)
    assert "does not fit the input of workflow 'order': order_id: Field required" in str(
        caught.value)
