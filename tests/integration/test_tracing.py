"""OpenTelemetry spans: parented to the request's traceparent, emitted once, never on replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import ploy
from engine.http import create_app
from engine.testing import engine_config, running_engine, wait_for_status
from engine.tracing import Tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def traced_worker() -> Any:
    app = ploy()
    tries = {"n": 0}

    @app.workflow("traced")
    async def traced(ctx: Any) -> Any:
        def flaky() -> int:
            tries["n"] += 1
            if tries["n"] == 1:
                raise RuntimeError("once")
            return 1

        await ctx.step.run("charge", flaky)
        await ctx.step.sleep("100ms")
        return await ctx.step.run("ship", lambda: 2)

    return app.build()


async def test_spans_of_a_triggered_execution_follow_the_request_traceparent(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"T": "traced"},
                        backoff={"initial_ms": 10}, otel=True)
    async with running_engine(traced_worker(), cfg) as engine:
        engine.runtime.tracing = Tracing(True, provider)
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.post("/__ploy/api/trigger/T", json={"input": {}},
                                     headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        eid = answer.json()["execution_id"]
        done = await wait_for_status(engine, eid)
        history = await engine.history(eid)
    assert done.status.value == "completed"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    names = sorted(s.name for s in exporter.get_finished_spans())
    # one span per attempt, none for the replay of 'charge' after the sleep
    assert names == ["ploy.sleep sleep#1", "ploy.step charge", "ploy.step charge",
                     "ploy.step ship", "ploy.trigger traced"]
    trigger = spans["ploy.trigger traced"]
    assert f"{trigger.context.trace_id:032x}" == TRACE
    assert trigger.parent is not None and f"{trigger.parent.span_id:016x}" == PARENT
    for span in exporter.get_finished_spans():
        assert f"{span.context.trace_id:032x}" == TRACE
        if span is not trigger:
            assert span.parent is not None and span.parent.span_id == trigger.context.span_id
            assert span.attributes["ploy.execution_id"] == eid
    failed = [s for s in exporter.get_finished_spans()
              if s.name == "ploy.step charge" and not s.status.is_ok]
    assert len(failed) == 1 and "RuntimeError: once" in (failed[0].status.description or "")
    recorded = next(e for e in history or [] if e.type == "WorkflowTriggered")
    assert recorded.body["trace_parent"] == (
        f"00-{TRACE}-{trigger.context.span_id:016x}-01")


async def test_off_by_default_the_request_traceparent_is_still_recorded(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"T": "traced"})
    async with running_engine(traced_worker(), cfg) as engine:
        assert engine.runtime.tracing.tracer is None
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.post("/__ploy/api/trigger/T", json={"input": {}},
                                     headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        history = await engine.history(answer.json()["execution_id"])
    recorded = next(e for e in history or [] if e.type == "WorkflowTriggered")
    assert recorded.body["trace_parent"] == f"00-{TRACE}-{PARENT}-01"


async def test_one_trace_across_a_worker_restart(kafka: str, topic_prefix: str,
                                                 tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = ploy()

    @app.workflow("slow")
    async def slow(ctx: Any) -> Any:
        await ctx.step.run("before", lambda: 1)
        await ctx.step.sleep("1500ms")
        return await ctx.step.run("after", lambda: 2)

    worker = app.build()
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"S": "slow"},
                        otel=True)
    async with running_engine(worker, cfg) as engine:  # the first worker: trigger, step 1
        engine.runtime.tracing = Tracing(True, provider)
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.post("/__ploy/api/trigger/S", json={"input": {}},
                                     headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        eid = answer.json()["execution_id"]
        await wait_for_status(engine, eid, "sleeping")
    async with running_engine(worker, cfg) as engine:  # restarted: the sleep ends, step 2
        engine.runtime.tracing = Tracing(True, provider)
        done = await wait_for_status(engine, eid)
    assert done.status.value == "completed"
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["ploy.sleep sleep#1", "ploy.step after",
                                             "ploy.step before", "ploy.trigger slow"]
    trigger = next(s for s in spans if s.name == "ploy.trigger slow")
    for span in spans:
        assert f"{span.context.trace_id:032x}" == TRACE
        if span is not trigger:
            assert span.parent is not None and span.parent.span_id == trigger.context.span_id


async def test_a_wait_and_its_timeout_are_spans_of_the_trace(kafka: str, topic_prefix: str,
                                                              tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = ploy()

    @app.workflow("waits")
    async def waits(ctx: Any) -> Any:
        got = await ctx.step.wait_for_event("paid", type="paid", match={"k": 1})
        missed = await ctx.step.wait_for_event("late", type="late", timeout=200)
        return [got.id if got else None, missed]

    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"W": "waits"},
                        otel=True)
    async with running_engine(app.build(), cfg) as engine:
        engine.runtime.tracing = Tracing(True, provider)
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.post("/__ploy/api/trigger/W", json={"input": {}},
                                     headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        eid = answer.json()["execution_id"]
        await wait_for_status(engine, eid, "waiting")
        await engine.send_event("paid", {"k": 1}, id="e-1")
        done = await wait_for_status(engine, eid)
    assert done.output == ["e-1", None]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"ploy.wait paid", "ploy.wait late"} <= set(spans)
    assert spans["ploy.wait paid"].attributes["ploy.event_id"] == "e-1"
    assert spans["ploy.wait late"].attributes["ploy.timed_out"] is True
    trigger = spans["ploy.trigger waits"]
    for name in ("ploy.wait paid", "ploy.wait late"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == trigger.context.span_id
    assert sum(s.name == "ploy.wait paid" for s in exporter.get_finished_spans()) == 1
