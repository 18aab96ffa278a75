"""Flow control per key on the embedded broker: concurrency limits (never more than the
limit running, queued in order, all done), rate limits and debounce."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

from engine import ManualClock, ploy
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


def starts_of(histories: dict[str, Any]) -> list[int]:
    """The WorkflowStarted times of executions, from their histories (the log)."""
    return sorted(e.timestamp for h in histories.values() for e in h or []
                  if e.type == "WorkflowStarted")


def most_in_a_window(starts: list[int], period_ms: int) -> int:
    """The most starts in any half-open interval [s, s + period_ms)."""
    return max((sum(1 for t in starts if s <= t < s + period_ms) for s in starts), default=0)


async def test_rate_two_per_second_per_customer(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    rate = {"limit": 2, "period_ms": 1000, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"BILL": {"name": "bill", "rate": rate}})
    async with running_engine(limited_worker(), cfg) as engine:
        ids = [(await engine.env.BILL.trigger({"customer_id": "c1", "hold": 0.01}))[
            "execution_id"] for _ in range(10)]
        other = (await engine.env.BILL.trigger({"customer_id": "c2"}))["execution_id"]
        done = [await wait_for_status(engine, eid, timeout_s=30) for eid in [*ids, other]]
        histories = {eid: await engine.history(eid) for eid in ids}
    assert {d.status.value for d in done} == {"completed"}
    starts = starts_of(histories)
    assert len(starts) == 10
    assert most_in_a_window(starts, 1000) == 2, starts
    assert starts[-1] - starts[0] >= 4000  # 10 starts at 2 per second: 4 s at least
    assert_in_order([(d.started_at or 0, d.created_at) for d in done[:10]])
    waited = [d for d in done if any(log.message.startswith(
        "queued: rate limit 2 per 1s of input.customer_id='c1' reached") for log in d.logs)]
    assert len(waited) >= 7  # all but the first two, unless one raced the window
    assert done[-1].started_at is not None and done[-1].started_at < starts[-1]  # c2 apart


def echo_worker() -> Any:
    app = ploy()

    @app.workflow("notify")
    async def notify(ctx: Any) -> Any:
        return await ctx.step.run("send", lambda: ctx.input)

    return app.build()


async def test_debounce_runs_the_last_trigger_once(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    debounce = {"period_ms": 500, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"NOTIFY": {"name": "notify", "debounce": debounce}})
    async with running_engine(echo_worker(), cfg) as engine:
        warm = await engine.env.NOTIFY.trigger({"customer_id": "c0"})  # a new topic's first
        await wait_for_status(engine, warm["execution_id"])  # append is slow: not in a burst
        ids = [(await engine.env.NOTIFY.trigger({"customer_id": "c1", "n": n}))["execution_id"]
               for n in range(5)]
        done = [await wait_for_status(engine, eid) for eid in ids]
    assert [d.status.value for d in done] == ["cancelled"] * 4 + ["completed"], [
        (d.created_at, d.started_at, d.cancel_reason, d.logs) for d in done]
    assert done[-1].output == {"customer_id": "c1", "n": 4}
    assert [log.message.split(": starts at")[0] for log in done[-1].logs] == [
        "queued: debounced for 500ms on input.customer_id='c1'"]  # why it waited, once
    assert done[-1].started_at is not None and done[-1].started_at >= done[-1].created_at + 500
    for d, later in zip(done, ids[1:], strict=False):  # each names the one that came next
        assert d.cancel_reason == (
            f"debounced: superseded by execution {later}, a later trigger of "
            "input.customer_id='c1' within 500ms (the last trigger of a burst runs, with "
            "its input)"), d.cancel_reason
        assert d.started_at is None


async def test_a_restart_while_rate_queued_still_starts_them(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    rate = {"limit": 1, "period_ms": 1000, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"BILL": {"name": "bill", "rate": rate}})
    async with running_engine(limited_worker(), cfg) as a:
        ids = [(await a.env.BILL.trigger({"customer_id": "c", "hold": 0.01}))["execution_id"]
               for _ in range(3)]
        await wait_for_status(a, ids[0])
        queued = [await a.runtime.get_execution(eid) for eid in ids[1:]]
        assert [q and q.status.value for q in queued] == ["queued", "queued"]
    async with running_engine(limited_worker(), cfg) as b:  # the window: from the view
        done = [await wait_for_status(b, eid, timeout_s=30) for eid in ids]
        histories = {eid: await b.history(eid) for eid in ids}
    assert {d.status.value for d in done} == {"completed"}
    assert most_in_a_window(starts_of(histories), 1000) == 1, starts_of(histories)


async def test_debounce_holds_across_a_restart(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    debounce = {"period_ms": 500, "key": "input.customer_id"}
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state",
                        workflow={"NOTIFY": {"name": "notify", "debounce": debounce}})
    async with running_engine(echo_worker(), cfg) as a:
        warm = await a.env.NOTIFY.trigger({"customer_id": "c0"})
        await wait_for_status(a, warm["execution_id"])
        ids = [(await a.env.NOTIFY.trigger({"customer_id": "c1", "n": n}))["execution_id"]
               for n in range(3)]  # stopped within the period: none has run
    async with running_engine(echo_worker(), cfg) as b:  # the burst: from the view
        done = [await wait_for_status(b, eid) for eid in ids]
    assert [d.status.value for d in done] == ["cancelled"] * 2 + ["completed"]
    assert done[-1].output == {"customer_id": "c1", "n": 2}
    assert [(d.cancel_reason or "").split()[4] for d in done[:2]] == [f"{ids[1]},", f"{ids[2]},"]


async def test_rate_and_concurrency_both_hold(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    key = "input.customer_id"
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"BILL": {
        "name": "bill", "concurrency": {"limit": 1, "key": key},
        "rate": {"limit": 3, "period_ms": 1000, "key": key}}})
    async with running_engine(limited_worker(), cfg) as engine:
        ids = [(await engine.env.BILL.trigger({"customer_id": "c", "hold": 0.1}))[
            "execution_id"] for _ in range(5)]
        done = [await wait_for_status(engine, eid, timeout_s=30) for eid in ids]
        histories = {eid: await engine.history(eid) for eid in ids}
    assert {d.status.value for d in done} == {"completed"}
    assert max_overlap([(d.started_at or 0, d.ended_at or 0) for d in done]) == 1
    assert most_in_a_window(starts_of(histories), 1000) == 3, starts_of(histories)


async def test_an_hour_of_debounce_and_rate_under_a_manual_clock(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    cfg = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={
        "NOTIFY": {"name": "notify", "debounce": {"period_ms": 3_600_000}},
        "BILL": {"name": "bill", "rate": {"limit": 1, "period_ms": 3_600_000}}})
    app = ploy()

    @app.workflow("notify")
    async def notify(ctx: Any) -> Any:
        return ctx.input

    @app.workflow("bill")
    async def bill(ctx: Any) -> Any:
        return ctx.input

    async with running_engine(app.build(), cfg, clock=clock) as engine:
        notify = [(await engine.env.NOTIFY.trigger({"n": n}))["execution_id"] for n in range(2)]
        bills = [(await engine.env.BILL.trigger({}))["execution_id"] for _ in range(2)]
        await wait_for_status(engine, bills[0])
        await asyncio.sleep(0.3)
        assert (await wait_for_status(engine, bills[1], "queued")).status.value == "queued"
        assert (await wait_for_status(engine, notify[1], "queued")).status.value == "queued"
        clock.advance(3_600_000)  # wakes the waiting flow controls at once
        done = [await wait_for_status(engine, eid, timeout_s=10) for eid in [*notify, *bills]]
    assert [d.status.value for d in done] == ["cancelled", "completed", "completed", "completed"]
