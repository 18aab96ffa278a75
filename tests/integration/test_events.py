"""Event-driven workflows on the real broker: wait for events, send them, invoke children."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import Engine, ploy
from engine.errors import StepFailedError, UnknownExecutionError, WorkflowFailedError
from engine.http import create_app
from engine.models import ExecutionStatus
from engine.testing import engine_config, running_engine

CALLS: dict[str, int] = {}
BAD_WAITS: dict[str, Any] = {
    "no type": lambda step: step.wait_for_event("w"),
    "empty type": lambda step: step.wait_for_event("w", type=" "),
    "match not a dict": lambda step: step.wait_for_event("w", type="t", match=["order_id"]),
    "bad path": lambda step: step.wait_for_event("w", type="t", match={"a..b": 1}),
    "bad timeout": lambda step: step.wait_for_event("w", type="t", timeout="5 parsecs"),
    "unknown binding": lambda step: step.invoke("c", binding="NOPE", input={}),
}


def events_worker() -> Any:
    app = ploy()

    @app.workflow("order")
    async def order(ctx: Any) -> Any:
        await ctx.step.run("reserve", lambda: "ok")
        if ctx.input.get("delay"):
            await ctx.step.sleep(ctx.input["delay"])
        event = await ctx.step.wait_for_event(
            "payment", type="payment.settled", match={"order_id": ctx.input["order_id"]},
            timeout=ctx.input.get("timeout"))
        if event is None:
            return {"paid": None}
        return {"paid": event.data["amount"], "event_id": event.id, "source": event.source}

    @app.workflow("nudged")
    async def nudged(ctx: Any) -> Any:
        first = await ctx.step.wait_for_event("first", type="nudge")
        second = await ctx.step.wait_for_event("second", type="nudge")
        return [first.data, second.data]

    @app.workflow("child")
    async def child(ctx: Any) -> Any:
        def work() -> Any:
            CALLS[ctx.execution_id] = CALLS.get(ctx.execution_id, 0) + 1
            if ctx.input.get("fail"):
                raise ValueError(f"child {ctx.input['n']} failed")
            return ctx.input["n"] * 10

        value = await ctx.step.run("work", work, retries=0)
        if ctx.input.get("sleep"):
            await ctx.step.sleep(ctx.input["sleep"])
        return value

    @app.workflow("parent")
    async def parent(ctx: Any) -> Any:
        kids = ctx.input["kids"]
        try:
            results = await asyncio.gather(*(
                ctx.step.invoke(f"kid-{i}", binding="CHILD", input=kid)
                for i, kid in enumerate(kids)))
        except StepFailedError as exc:
            return {"failed": exc.step, "error": exc.message}
        return {"sum": sum(results)}

    @app.workflow("bad_wait")
    async def bad_wait(ctx: Any) -> Any:
        return await BAD_WAITS[ctx.input["kind"]](ctx.step)

    return app.build()


BINDINGS = {"ORDER": "order", "NUDGED": "nudged", "CHILD": "child", "PARENT": "parent",
            "BAD": "bad_wait"}


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> AsyncIterator[Engine]:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS,
                           backoff={"initial_ms": 10})
    async with running_engine(events_worker(), config) as eng:
        yield eng


async def _waiting(engine: Engine, eid: str, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        execution = await engine.get_execution(eid)
        if execution is not None and execution.status is ExecutionStatus.WAITING:
            return
        assert asyncio.get_running_loop().time() < deadline, execution
        await asyncio.sleep(0.02)


async def test_events_before_and_after_the_wait_with_duplicates_reach_each_execution_once(
        engine: Engine) -> None:
    orders = [f"o-{i}" for i in range(40)]
    early = set(random.Random(3).sample(orders, 20))
    handles = {o: await engine.env.ORDER.trigger({"order_id": o, "delay": "1s"})
               for o in orders}
    for order_id in early:  # before the waits begin: the lookback finds them
        await engine.send_event("payment.settled", {"order_id": order_id, "amount": 1},
                                id=f"pay-{order_id}")
    for order_id in orders:
        if order_id not in early:
            await _waiting(engine, handles[order_id].execution_id)
    late = [o for o in orders if o not in early]
    random.Random(4).shuffle(late)
    for order_id in late + late[:5]:  # and a few duplicates
        await engine.send_event("payment.settled", {"order_id": order_id, "amount": 2},
                                id=f"pay-{order_id}", source="test")
    for order_id, handle in handles.items():
        result = await handle.result(timeout=30)
        assert result["event_id"] == f"pay-{order_id}"
        assert result["paid"] == (1 if order_id in early else 2)
        history = await engine.history(handle.execution_id)
        assert history is not None
        received = [e for e in history if e.type == "EventSent"]
        assert [e.body["id"] for e in received] == [f"pay-{order_id}"]
    counts = [p["events"] for p in (await engine.workers())["partitions"]]
    assert sum(c["delivered"] for c in counts) == 40
    assert sum(c["duplicates"] for c in counts) == 5 * engine.runtime.log.partitions
    assert sum(c["received"] for c in counts) == 40 * engine.runtime.log.partitions


async def test_a_wait_times_out_with_none_and_shows_what_it_waits_for(engine: Engine) -> None:
    handle = await engine.env.ORDER.trigger({"order_id": "never", "timeout": "1s"})
    await _waiting(engine, handle.execution_id)
    execution = await engine.get_execution(handle.execution_id)
    assert execution is not None
    [waiting] = execution.waiting_for
    assert (waiting.step, waiting.event_type, waiting.match) == (
        "payment", "payment.settled", {"order_id": "never"})
    assert waiting.until is not None and waiting.until > execution.created_at
    assert await handle.result(timeout=20) == {"paid": None}
    done = await engine.get_execution(handle.execution_id)
    assert done is not None
    assert [s.status for s in done.steps if s.kind == "wait"] == ["timed_out"]


async def test_send_event_to_one_execution_and_two_waits_never_get_the_same_event(
        engine: Engine) -> None:
    handle = await engine.env.NUDGED.trigger({})
    other = await engine.env.NUDGED.trigger({})
    await engine.env.NUDGED.send_event(handle.execution_id, "nudge", {"n": 1}, id="a")
    await engine.env.NUDGED.send_event(handle.execution_id, "nudge", {"n": 1}, id="a")  # repeat
    await engine.env.NUDGED.send_event(handle.execution_id, "nudge", {"n": 2}, id="b")
    assert await handle.result(timeout=20) == [{"n": 1}, {"n": 2}]
    await _waiting(engine, other.execution_id)  # a targeted event reached no one else
    with pytest.raises(UnknownExecutionError, match="no execution 'nope'"):
        await engine.env.NUDGED.send_event("nope", "nudge", {})
    with pytest.raises(UnknownExecutionError):  # an execution of another workflow
        await engine.env.ORDER.send_event(other.execution_id, "nudge", {})
    assert await engine.cancel(other.execution_id, "test over")
    ended = await engine.get_execution(other.execution_id)
    assert ended is not None and ended.status is ExecutionStatus.CANCELLED


async def test_children_in_parallel_one_fails_and_a_replay_starts_no_second_child(
        engine: Engine) -> None:
    ok = await engine.env.PARENT.trigger({"kids": [{"n": 1}, {"n": 2}, {"n": 3}]})
    assert await ok.result(timeout=30) == {"sum": 60}
    parent = await engine.get_execution(ok.execution_id)
    assert parent is not None
    children = [s.child_id for s in parent.steps if s.kind == "invoke"]
    assert len(children) == 3
    for child_id in children:
        assert child_id is not None
        child = await engine.get_execution(child_id)
        assert child is not None and child.parent_id == ok.execution_id
        assert CALLS[child_id] == 1
    bad = await engine.env.PARENT.trigger({"kids": [{"n": 1}, {"n": 2, "fail": True}]})
    result = await bad.result(timeout=30)
    assert result["failed"] == "kid-1" and "child 2 failed" in result["error"]


async def test_cancel_of_a_parent_cancels_its_running_child(engine: Engine) -> None:
    handle = await engine.env.PARENT.trigger({"kids": [{"n": 5, "sleep": "1h"}]})
    await _waiting(engine, handle.execution_id)
    parent = await engine.get_execution(handle.execution_id)
    assert parent is not None
    [child_id] = [s.child_id for s in parent.steps if s.kind == "invoke"]
    assert child_id is not None
    assert await engine.cancel(handle.execution_id, "stop")
    for _ in range(200):
        child = await engine.get_execution(child_id)
        if child is not None and child.status is ExecutionStatus.CANCELLED:
            break
        await asyncio.sleep(0.05)
    assert child is not None and child.status is ExecutionStatus.CANCELLED


@pytest.mark.parametrize(("kind", "error"), [
    ("no type", "missing 1 required keyword-only argument: 'type'"),
    ("empty type", "an event type must be a non-empty string"),
    ("match not a dict", "match must be a dict of dotted paths to values"),
    ("bad path", "match key 'a..b' is not a dotted path"),
    ("bad timeout", "5 parsecs"),
    ("unknown binding", "unknown binding 'NOPE'"),
])
async def test_a_bad_wait_fails_the_execution_clearly_and_records_no_wait(
        engine: Engine, kind: str, error: str) -> None:
    handle = await engine.env.BAD.trigger({"kind": kind})
    with pytest.raises(WorkflowFailedError, match=re.escape(error)):
        await handle.result(timeout=20)
    history = await engine.history(handle.execution_id)
    assert history is not None
    assert [e.type for e in history] == ["WorkflowTriggered", "WorkflowStarted",
                                         "WorkflowFailed"]


async def test_bad_events_are_refused_and_nothing_is_appended(engine: Engine) -> None:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as c:
        before = dict(engine.runtime.log.high_acked)
        for body, code in [
            ({"data": {}}, 422),  # no type
            ({"type": "", "data": {}}, 422),
            ({"type": "t", "data": {}, "execution_id": "nope"}, 404),
            ({"type": "t", "data": "x" * 2_000_000}, 413),
            ({"type": "t\u0000x"}, 422),
            ({"type": "ploy.execution.ended", "data": {"execution_id": "x"}}, 422),
        ]:
            response = await c.post("/__ploy/api/events", json=body)
            assert response.status_code == code, (body, response.text)
        assert dict(engine.runtime.log.high_acked) == before
        sent = await c.post("/__ploy/api/events", json={"type": "t", "data": {"k": 1}})
        assert sent.status_code == 202
        assert len(sent.json()["offsets"]) == engine.runtime.log.partitions


async def test_a_kafka_topic_of_cloudevents_feeds_200_waiting_orders_each_its_own_event_once(
        kafka: str, topic_prefix: str, state_dir: Path) -> None:
    from confluent_kafka import Producer

    from connectors.testing import running_connectors
    from tests.integration.test_connectors_source import create_topic

    topic = f"{topic_prefix}.payments"
    create_topic(kafka, topic)
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS,
                           sources=[{"topic": topic, "event": "*", "format": "cloudevents"}])
    orders = [f"{topic_prefix}-o{i}" for i in range(200)]
    rng = random.Random(7)
    async with running_engine(events_worker(), config) as engine:
        async with running_connectors(engine):
            # Half wait at once, half after a sleep: events land before and after waits begin.
            handles = {o: await engine.env.ORDER.trigger(
                {"order_id": o, "delay": "1500ms" if i % 2 else None})
                for i, o in enumerate(orders)}
            sends = orders + rng.sample(orders, 40)  # 40 duplicates (same source and id)
            rng.shuffle(sends)
            producer = Producer({"bootstrap.servers": kafka})
            for order_id in sends:
                producer.produce(topic, key=order_id.encode(), value=json.dumps({
                    "specversion": "1.0", "id": f"pay-{order_id}", "source": "payments-svc",
                    "type": "payment.settled", "data": {"order_id": order_id, "amount": 3},
                }).encode())
            assert producer.flush(20) == 0
            for order_id, handle in handles.items():
                result = await handle.result(timeout=60)
                assert result == {"paid": 3, "event_id": f"pay-{order_id}",
                                  "source": "payments-svc"}
            for handle in list(handles.values())[:20]:
                history = await engine.history(handle.execution_id)
                assert history is not None
                assert len([e for e in history if e.type == "EventSent"]) == 1


async def test_the_cli_sends_events_and_shows_waits_and_a_rebuild_is_byte_identical(
        kafka: str, topic_prefix: str, state_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from engine.app import serving_api
    from engine.log import EventLog
    from engine.rebuild import rebuild
    from tests.integration.test_cli_e2e import dump, ploy

    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS,
                           backoff={"initial_ms": 10})
    async with running_engine(events_worker(), config) as engine:
        async with serving_api(engine) as url:
            waiting = await engine.env.ORDER.trigger({"order_id": "cli-1", "timeout": "1h"})
            await _waiting(engine, waiting.execution_id)
            code, out, err = await asyncio.to_thread(
                ploy, capsys, "status", waiting.execution_id, "--url", url)
            assert code == 0, err
            assert "status     waiting" in out
            assert 'waiting    payment: event payment.settled {"order_id": "cli-1"} until' in out
            code, out, err = await asyncio.to_thread(
                ploy, capsys, "send-event", "payment.settled", "--url", url,
                "--data", '{"order_id": "cli-1", "amount": 9}', "--id", "cli-pay")
            assert (code, out.strip()) == (0, "cli-pay"), err
            assert (await waiting.result(timeout=20))["paid"] == 9
            code, _, err = await asyncio.to_thread(
                ploy, capsys, "send-event", "x", "--url", url, "--execution", "nope")
            assert code == 2 and "no execution 'nope'" in err
            code, _, err = await asyncio.to_thread(
                ploy, capsys, "send-event", "x", "--url", url, "--data", "{bad")
            assert code == 2 and "--data is not valid JSON" in err
            parent = await engine.env.PARENT.trigger({"kids": [{"n": 1}, {"n": 2}]})
            assert await parent.result(timeout=30) == {"sum": 30}
            timed_out = await engine.env.ORDER.trigger({"order_id": "t-1", "timeout": 200})
            assert await timed_out.result(timeout=20) == {"paid": None}
    topic = f"{topic_prefix}.events"
    state_path = state_dir / topic
    before = dump(state_path, topic)
    log = EventLog(kafka, topic_prefix)
    try:
        rebuild(log, state_path)
    finally:
        log.close()
    assert dump(state_path, topic) == before


async def test_a_restart_while_a_parent_waits_starts_no_second_child(
        kafka: str, topic_prefix: str, state_dir: Path) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS)
    async with running_engine(events_worker(), config) as engine:
        handle = await engine.env.PARENT.trigger({"kids": [{"n": 4, "sleep": "1500ms"}]})
        await _waiting(engine, handle.execution_id)
    async with running_engine(events_worker(), config) as engine:  # same state, restarted
        assert await engine.env.PARENT.result(handle.execution_id, timeout=30) == {"sum": 40}
        parent = await engine.get_execution(handle.execution_id)
        assert parent is not None
        [child_id] = [s.child_id for s in parent.steps if s.kind == "invoke"]
        assert child_id is not None and CALLS[child_id] == 1
        page = await engine.list_page(workflow="child", limit=500)
        assert [e.execution_id for e in page.executions].count(child_id) == 1
        history = await engine.history(child_id)
        assert history is not None
        assert [e.type for e in history].count("WorkflowTriggered") == 1


async def test_the_order_events_example(kafka: str, topic_prefix: str, state_dir: Path) -> None:
    from engine.app import load_app

    example = Path(__file__).parents[2] / "examples" / "order-events"
    worker, _ = load_app(example)
    config = engine_config(kafka, topic_prefix, state_dir,
                           workflow={"ORDER": "order", "SHIPPING": "shipping"})
    async with running_engine(worker, config) as engine:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787",
                                     timeout=30) as c:
            paid_first = await c.post("/payments", json={"order_id": "o-2", "amount": 5})
            assert paid_first.status_code == 200, paid_first.text
            created = (await c.post("/orders", json={"order_id": "o-1", "amount": 5})).json()
            eid = created["execution_id"]
            await _waiting(engine, eid)
            status = (await c.get(f"/orders/{eid}")).json()
            assert status["status"] == "waiting"
            assert status["waiting_for"][0]["match"] == {"order_id": "o-1"}
            await c.post("/payments", json={"order_id": "o-1", "amount": 5})
            result = await engine.env.ORDER.result(eid, timeout=30)
            assert result["status"] == "shipped" and result["tracking"].startswith("TRACK-")
            # A payment sent before its order existed predates the order: not received.
            early = (await c.post("/orders", json={"order_id": "o-2", "amount": 5})).json()
            await _waiting(engine, early["execution_id"])


async def test_the_dashboard_links_parent_and_child_and_shows_what_a_wait_received(
        engine: Engine) -> None:
    parent = await engine.env.PARENT.trigger({"kids": [{"n": 1}]})
    assert await parent.result(timeout=30) == {"sum": 10}
    execution = await engine.get_execution(parent.execution_id)
    assert execution is not None
    [child_id] = [s.child_id for s in execution.steps if s.kind == "invoke"]
    assert child_id is not None
    order = await engine.env.ORDER.trigger({"order_id": "dash-1"})
    await _waiting(engine, order.execution_id)
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as c:
        page = (await c.get(f"/__ploy/executions/{parent.execution_id}")).text
        assert f'href="/__ploy/executions/{child_id}" data-testid="child-link"' in page
        page = (await c.get(f"/__ploy/executions/{child_id}")).text
        assert f'href="/__ploy/executions/{parent.execution_id}"' in page and "Started by" in page
        page = (await c.get(f"/__ploy/executions/{order.execution_id}")).text
        assert 'data-testid="waiting-for"' in page and "payment.settled" in page
        await engine.send_event("payment.settled", {"order_id": "dash-1", "amount": 4})
        await order.result(timeout=20)
        page = (await c.get(f"/__ploy/executions/{order.execution_id}")).text
        assert 'data-testid="step-output"' in page and "dash-1" in page
