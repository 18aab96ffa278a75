"""Results pushed, not polled: result waiters, the long-poll API, the event stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import Engine, ploy
from engine.errors import WorkflowCancelledError, WorkflowFailedError
from engine.http import create_app
from engine.testing import engine_config, running_engine


def results_worker() -> Any:
    app = ploy()

    @app.workflow("slow")
    async def slow(ctx: Any) -> Any:
        first = await ctx.step.run("first", lambda: 1)
        await ctx.step.sleep(int(ctx.input.get("sleep", 300)))
        second = await ctx.step.run("second", lambda: 2)
        ctx.log("done", {"sum": first + second})
        return {"sum": first + second}

    @app.workflow("fails")
    async def fails(ctx: Any) -> Any:
        await ctx.step.run("boom", lambda: 1 / 0, retries=0)

    return app.build()


BINDINGS = {"SLOW": "slow", "FAILS": "fails"}


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> AsyncIterator[Engine]:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS,
                           backoff={"initial_ms": 10})
    async with running_engine(results_worker(), config) as eng:
        yield eng


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787",
                                 timeout=30) as c:
        yield c


async def test_a_waiter_wakes_with_the_output_when_the_execution_ends(engine: Engine) -> None:
    handle = await engine.env.SLOW.trigger({"sleep": 300})
    assert handle == {"execution_id": handle.execution_id}  # still the seed's shape
    assert await handle.result(timeout=20) == {"sum": 3}
    # An ended execution answers at once; the waiters left nothing behind.
    assert await engine.env.SLOW.result(handle.execution_id, timeout=1) == {"sum": 3}
    assert engine.runtime._watchers == {}  # noqa: SLF001


async def test_a_failed_or_cancelled_execution_raises_and_a_wait_times_out_cleanly(
        engine: Engine) -> None:
    failed = await engine.env.FAILS.trigger({})
    with pytest.raises(WorkflowFailedError, match="ZeroDivisionError|StepFailedError"):
        await failed.result(timeout=20)
    waiting = await engine.env.SLOW.trigger({"sleep": 60_000})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await waiting.result(timeout=0.5)
    assert time.monotonic() - started < 5
    assert engine.runtime._watchers == {}  # noqa: SLF001
    cancel = asyncio.create_task(waiting.result(timeout=20))
    await asyncio.sleep(0.1)
    assert await engine.env.SLOW.cancel(waiting.execution_id, "no longer needed")
    with pytest.raises(WorkflowCancelledError, match="no longer needed"):
        await cancel
    with pytest.raises(KeyError):
        await engine.env.SLOW.result("no-such-execution", timeout=1)


async def test_the_result_long_poll(engine: Engine, client: httpx.AsyncClient) -> None:
    made = await client.post("/__ploy/api/trigger/SLOW", json={"input": {"sleep": 1500}})
    eid = made.json()["execution_id"]
    early = await client.get(f"/__ploy/api/executions/{eid}/result", params={"wait": "100ms"})
    assert early.status_code == 202 and early.json()["status"] in ("queued", "running",
                                                                   "sleeping")
    done = await client.get(f"/__ploy/api/executions/{eid}/result", params={"wait": "30s"})
    assert done.status_code == 200 and done.json()["output"] == {"sum": 3}
    assert (await client.get("/__ploy/api/executions/nope/result")).status_code == 404
    bad = await client.get(f"/__ploy/api/executions/{eid}/result", params={"wait": "soon"})
    assert bad.status_code == 422


def _events(body: str) -> list[tuple[str | None, str | None, str]]:
    """(id, event, data) of each Server-Sent Event in ``body``."""
    found = []
    for block in body.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        found.append((fields.get("id"), fields.get("event"), fields.get("data", "")))
    return found


async def test_the_event_stream_delivers_every_event_in_log_order_and_ends_at_the_end(
        engine: Engine, client: httpx.AsyncClient) -> None:
    made = await client.post("/__ploy/api/trigger/SLOW", json={"input": {"sleep": 300}})
    eid = made.json()["execution_id"]
    streamed = await client.get(f"/__ploy/api/executions/{eid}/events")  # until its end
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    assert events[-1][1] == "end"
    entries = [json.loads(data) for _, name, data in events[:-1]]
    history = (await client.get(f"/__ploy/api/executions/{eid}/history")).json()["events"]
    ended = [e["offset"] for e in history if e["type"] == "WorkflowCompleted"][0]
    assert entries == [e for e in history if e["offset"] <= ended]  # all of them, in order
    assert [int(i) for i, _, _ in events[:-1]] == [e["offset"] for e in entries]
    assert entries[0]["type"] == "WorkflowTriggered"
    assert entries[-1]["type"] == "WorkflowCompleted"
    # A reconnect goes on after the last event it saw.
    third = entries[2]["offset"]
    again = await client.get(f"/__ploy/api/executions/{eid}/events",
                             headers={"Last-Event-ID": str(third)})
    assert [json.loads(d)["offset"] for _, n, d in _events(again.text)[:-1]] == [
        e["offset"] for e in entries[3:]]
    assert (await client.get("/__ploy/api/executions/nope/events")).status_code == 404


async def test_a_waiter_elsewhere_survives_its_owner_restarting(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    worker = results_worker()
    configs = {name: engine_config(kafka, topic_prefix, tmp_path / name, workflow=BINDINGS)
               for name in ("w1", "w2", "q")}
    query = Engine(worker, configs["q"], runs=False)  # folds nothing: asks the owner
    await query.start()
    try:
        async with running_engine(worker, configs["w1"], scale_out=True) as w1:
            deadline = time.monotonic() + 30
            while len(w1.runtime.owned) < w1.runtime.log.partitions:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            handle = await w1.env.SLOW.trigger({"sleep": 8000})
            waiter = asyncio.create_task(
                query.env.SLOW.result(handle.execution_id, timeout=90))
            await asyncio.sleep(0.5)
        assert not waiter.done()  # its owner stopped mid-sleep; the waiter waits on
        async with running_engine(worker, configs["w2"], scale_out=True):
            assert await asyncio.wait_for(waiter, 90) == {"sum": 3}
    finally:
        await query.stop()


async def test_failures_reach_the_terminal_as_they_are_recorded(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """`ploy dev` shows ``ploy.workflow`` lines: a failed attempt and a failed execution."""
    caplog.set_level("INFO", logger="ploy.workflow")
    handle = await engine.env.FAILS.trigger({})
    with pytest.raises(WorkflowFailedError):
        await handle.result(timeout=20)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ploy.workflow"]
    eid = handle.execution_id
    assert ("WARNING", f"[fails {eid}] step 'boom' attempt 1 failed: ZeroDivisionError: "
                       "division by zero (final)") in lines
    assert any(level == "ERROR" and msg.startswith(f"[fails {eid}] failed: StepFailedError")
               for level, msg in lines), lines


async def test_a_trigger_can_wait_for_the_result_in_one_request(
        engine: Engine, client: httpx.AsyncClient) -> None:
    done = await client.post("/__ploy/api/trigger/SLOW", params={"wait": "30s"},
                             json={"input": {"sleep": 50}})
    assert done.status_code == 200
    assert done.json()["status"] == "completed" and done.json()["output"] == {"sum": 3}
    late = await client.post("/__ploy/api/trigger/SLOW", params={"wait": "100ms"},
                             json={"input": {"sleep": 1500}})
    assert late.status_code == 202  # still running: its id, to ask for the result
    eid = late.json()["execution_id"]
    result = await client.get(f"/__ploy/api/executions/{eid}/result", params={"wait": "30s"})
    assert result.status_code == 200 and result.json()["output"] == {"sum": 3}
    failed = await client.post("/__ploy/api/trigger/FAILS", params={"wait": "30s"},
                               json={"input": {}})
    assert failed.status_code == 200 and failed.json()["status"] == "failed"
    bad = await client.post("/__ploy/api/trigger/SLOW", params={"wait": "soon"},
                            json={"input": {}})
    assert bad.status_code == 422 and "wait" in bad.json()["error"]
    listed = await client.get("/__ploy/api/executions", params={"workflow": "slow"})
    assert len(listed.json()["executions"]) == 2  # the refused one started nothing
