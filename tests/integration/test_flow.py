"""Concurrency limits per key: never more than the limit running, queued in order, all done."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

from engine import ploy
from engine.flow import WHY_POSITION
from engine.testing import engine_config, running_engine, wait_for_status


def limited_worker() -> Any:
    app = ploy()

    @app.workflow("bill")
    async def bill(ctx: Any) -> Any:
        async def work() -> str:
            await asyncio.sleep(ctx.input.get("hold", 0.15))
            return ctx.input["customer_id"]

        return await ctx.step.run("work", work)

    return app.build()


def assert_in_order(started_created: list[tuple[int, int]], slack_ms: int = 50) -> None:
    """Admitted in trigger order: no execution starts before an older one, give or take
    the few ms a start may wait for the fold (admission itself is in order)."""
    for started, created in started_created:  # triggered in the same ms: either order
        older = [s for s, c in started_created if c < created]
        assert started >= max(older, default=0) - slack_ms, sorted(started_created)


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in points:  # an end sorts before a start at the same ms
        running += delta
        peak = max(peak, running)
    return peak


async def test_limit_two_per_customer_across_twenty_executions(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    limit = {"limit": 2, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"BILL": {"name": "bill", "concurrency": limit}})
    customers = ["c1", "c2", "c3"]
    async with running_engine(limited_worker(), cfg) as engine:
        ids = [(await engine.env.BILL.trigger({"customer_id": customers[n % 3]}))["execution_id"]
               for n in range(20)]
        done = [await wait_for_status(engine, eid, timeout_s=30) for eid in ids]
        histories = {eid: await engine.history(eid) for eid in ids}
        partitions = {engine.runtime.log.partition_for(eid) for eid in ids}
    assert {d.status.value for d in done} == {"completed"}
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    starts: dict[str, list[tuple[int, int]]] = defaultdict(list)  # customer -> (started, created)
    for d in done:
        events = {e.type: e.timestamp for e in histories[d.execution_id] or []}
        spans[d.output].append((events["WorkflowStarted"], events["WorkflowCompleted"]))
        starts[d.output].append((events["WorkflowStarted"], d.created_at))
    for customer in customers:
        assert max_overlap(spans[customer]) == 2, (customer, sorted(spans[customer]))
        assert_in_order(starts[customer])
    waited = [d for d in done if any(log.message.startswith("queued: concurrency limit 2 of "
                                                            "input.customer_id=")
                                     for log in d.logs)]
    assert len(waited) >= 10  # all but the first two of each customer, unless one had ended
    assert len(partitions) <= 3  # each customer's executions on one partition
    assert WHY_POSITION == "flow.concurrency"


async def test_the_limit_holds_across_two_workers(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    limit = {"limit": 1, "key": "input.customer_id"}
    workflow = {"BILL": {"name": "bill", "concurrency": limit}}
    one = engine_config(kafka, topic_prefix, tmp_path / "one", workflow=workflow)
    two = engine_config(kafka, topic_prefix, tmp_path / "two", workflow=workflow)
    worker = limited_worker()
    async with running_engine(worker, one, scale_out=True) as a, \
            running_engine(worker, two, scale_out=True) as b:
        while len(a.runtime.owned | b.runtime.owned) < 6 or not a.runtime.owned \
                or not b.runtime.owned:
            await asyncio.sleep(0.1)
        ids = []
        for n in range(12):  # triggered from both workers, whoever owns the partition
            engine = (a, b)[n % 2]
            ids.append((await engine.env.BILL.trigger({"customer_id": f"k{n % 4}"}))[
                "execution_id"])
        done = [await wait_for_status(a, eid, timeout_s=30) for eid in ids]
        histories = {eid: await a.history(eid) for eid in ids}
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for d in done:
        events = {e.type: e.timestamp for e in histories[d.execution_id] or []}
        spans[d.output].append((events["WorkflowStarted"], events["WorkflowCompleted"]))
    assert {d.status.value for d in done} == {"completed"}
    assert all(max_overlap(s) == 1 for s in spans.values()), spans


async def test_a_restart_rebuilds_the_slots_and_queue_from_the_view(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    limit = {"limit": 1, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"BILL": {"name": "bill", "concurrency": limit}})
    async with running_engine(limited_worker(), cfg) as a:
        ids = [(await a.env.BILL.trigger({"customer_id": "c"}))["execution_id"]
               for _ in range(6)]
        await wait_for_status(a, ids[0])
    async with running_engine(limited_worker(), cfg) as b:  # the rest were queued
        done = [await wait_for_status(b, eid, timeout_s=30) for eid in ids]
        histories = {eid: await b.history(eid) for eid in ids}
    spans, created = [], []
    for d in done:
        events = {e.type: e.timestamp for e in histories[d.execution_id] or []}
        spans.append((events["WorkflowStarted"], events["WorkflowCompleted"]))
        created.append((events["WorkflowStarted"], d.created_at))
    assert {d.status.value for d in done} == {"completed"}
    assert max_overlap(spans) == 1
    assert_in_order(created)


async def test_priority_orders_the_queue(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    limit = {"limit": 1, "key": "input.customer_id", "priority": "input.priority"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"BILL": {"name": "bill", "concurrency": limit}})
    async with running_engine(limited_worker(), cfg) as engine:
        ids = {p: (await engine.env.BILL.trigger(
            {"customer_id": "c", "priority": p, "hold": 1.0 if p == 0 else 0.05}))[
            "execution_id"] for p in (0, 1, 5, 3)}  # 0 runs first: it found the slot free
        done = {p: await wait_for_status(engine, eid) for p, eid in ids.items()}
    order = sorted(done, key=lambda p: done[p].started_at or 0)
    assert order == [0, 5, 3, 1]
