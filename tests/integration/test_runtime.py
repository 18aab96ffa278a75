"""The workflow runtime on a real broker: replay, retries, timeouts, sleep, parallel, cancel."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from engine import ManualClock, NonRetryableError, StepFailedError, ploy
from engine.config import Config
from engine.errors import InvalidInputError, UnknownBindingError
from engine.testing import engine_config, running_engine, wait_for_status


class Item(BaseModel):
    product_id: str
    quantity: int
    price: float


class OrderInput(BaseModel):
    order_id: str
    user_id: str
    items: list[Item]
    amount: float


class OrderOutput(BaseModel):
    order_id: str
    payment_id: str
    tracking_number: str
    completed_at: str


CALLS: Counter[str] = Counter()


def order_worker(clock: ManualClock) -> Any:
    """The seed's Full Example, business functions stubbed locally."""
    stock = {"p1": 5, "p2": 1}
    app = ploy()

    @app.workflow("order_processing", input=OrderInput, output=OrderOutput)
    async def order_processing(ctx: Any) -> dict[str, Any]:
        ctx.log("Starting order processing", {"orderId": ctx.input.order_id})

        def check() -> dict[str, bool]:
            CALLS["check-inventory"] += 1
            for item in ctx.input.items:
                if stock[item.product_id] < item.quantity:
                    raise ValueError(f"Insufficient stock for {item.product_id}")
            return {"available": True}

        await ctx.step.run("check-inventory", check)

        async def reserve() -> None:
            CALLS["reserve-inventory"] += 1

        await ctx.step.run("reserve-inventory", reserve)
        payment = None
        for attempt in range(3):
            async def pay() -> dict[str, str]:
                CALLS["payment"] += 1
                return {"id": "pay_1", "status": "succeeded"}

            payment = await ctx.step.run(f"payment-attempt-{attempt}", pay,
                                         input={"amount": ctx.input.amount})
            if payment["status"] == "succeeded":
                break
            await ctx.step.sleep("5s")
        shipment = await ctx.step.run("create-shipment",
                                      lambda: {"trackingNumber": "TRACK_1"})
        await ctx.step.run("send-confirmation", lambda: None)
        await ctx.step.sleep("24h")
        await ctx.step.run("send-followup", lambda: CALLS.update(["followup"]))
        assert payment is not None
        return {"order_id": ctx.input.order_id, "payment_id": payment["id"],
                "tracking_number": shipment["trackingNumber"],
                "completed_at": "2026-11-25T00:00:00Z"}

    return app.build()


def cfg(kafka: str, topic_prefix: str, state_dir: Path, **fields: Any) -> Config:
    return engine_config(kafka, topic_prefix, state_dir, backoff={"initial_ms": 20},
                         **fields)


ORDER = {"order_id": "o-1", "user_id": "u-1", "amount": 30.0,
         "items": [{"product_id": "p1", "quantity": 2, "price": 15.0}]}


async def test_seed_full_example_completes_with_a_24h_sleep_on_an_injected_clock(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    clock = ManualClock()
    config = cfg(kafka, topic_prefix, state_dir, workflow={"ORDER_FLOW": "order_processing"})
    async with running_engine(order_worker(clock), config, clock=clock) as engine:
        started = await engine.env.ORDER_FLOW.trigger(ORDER)
        eid = started["execution_id"]
        sleeping = await wait_for_status(engine, eid, "sleeping")
        assert [s.key for s in sleeping.steps][-1] == "sleep#1"
        assert "send-followup" not in [s.key for s in sleeping.steps]
        clock.advance(23 * 3600 * 1000)
        await asyncio.sleep(0.3)
        assert (await engine.env.ORDER_FLOW.get_execution(eid)).status == "sleeping"  # type: ignore[union-attr]
        clock.advance(3600 * 1000)
        done = await wait_for_status(engine, eid)
    assert done.status == "completed", done.error
    assert done.output == done.result == {"order_id": "o-1", "payment_id": "pay_1",
                                          "tracking_number": "TRACK_1",
                                          "completed_at": "2026-11-25T00:00:00Z"}
    assert [s.key for s in done.steps] == [
        "check-inventory", "reserve-inventory", "payment-attempt-0", "create-shipment",
        "send-confirmation", "sleep#1", "send-followup"]
    payment = done.steps[2]
    assert payment.input == {"amount": 30.0}
    assert payment.output == {"id": "pay_1", "status": "succeeded"}
    assert all(s.duration_ms is not None and s.duration_ms >= 0 for s in done.steps)
    assert done.steps[5].kind == "sleep" and done.steps[5].duration_ms >= 24 * 3600 * 1000  # type: ignore[operator]
    assert done.logs[0].message == "Starting order processing"
    assert done.logs[0].data == {"orderId": "o-1"}
    assert done.input == ORDER


def flaky_worker(counts: Counter[str]) -> Any:  # noqa: C901 - one workflow per case
    app = ploy()

    @app.workflow("flaky")
    async def flaky(ctx: Any) -> Any:
        def twice_then_ok() -> str:
            counts["twice"] += 1
            if counts["twice"] <= 2:
                raise ConnectionError(f"down {counts['twice']}")
            return "ok"

        return await ctx.step.run("call", twice_then_ok, retries=3)

    @app.workflow("always")
    async def always(ctx: Any) -> Any:
        def fail() -> None:
            counts["always"] += 1
            raise RuntimeError(f"failure {counts['always']}")

        return await ctx.step.run("charge_payment", fail, retries=2)

    @app.workflow("fatal")
    async def fatal(ctx: Any) -> Any:
        def fail() -> None:
            counts["fatal"] += 1
            raise NonRetryableError("card reported stolen")

        return await ctx.step.run("charge", fail, retries=5)

    @app.workflow("slow")
    async def slow(ctx: Any) -> Any:
        async def sometimes_slow() -> str:
            counts["slow"] += 1
            if counts["slow"] == 1:
                await asyncio.sleep(2)
            return "fast enough"

        return await ctx.step.run("call", sometimes_slow, timeout="200ms", retries=1)

    @app.workflow("rollback")
    async def rollback(ctx: Any) -> Any:
        try:
            await ctx.step.run("pay", lambda: 1 / 0, retries=0)
        except StepFailedError as exc:
            await ctx.step.run("release", lambda: "released")
            return {"rolled_back": exc.step}
        return {"rolled_back": None}

    return app.build()


async def test_retries_attempts_and_errors_are_recorded(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    async with running_engine(flaky_worker(counts), cfg(kafka, topic_prefix, state_dir)) as e:
        rt = e.runtime
        ids = {name: await rt.trigger(name, {}) for name in
               ("flaky", "always", "fatal", "slow", "rollback")}
        done = {name: await wait_for_status(e, eid) for name, eid in ids.items()}

    flaky = done["flaky"]
    assert (flaky.status, flaky.output) == ("completed", "ok")
    attempts = flaky.steps[0].attempts
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert [a.error.message if a.error else None for a in attempts] == ["down 1", "down 2", None]
    assert attempts[0].retry_at is not None and attempts[0].retry_at >= attempts[0].ended_at  # type: ignore[operator]
    assert attempts[1].retry_at - attempts[1].ended_at >= 35  # type: ignore[operator]  # backoff doubles

    always = done["always"]
    assert always.status == "failed"
    step = always.steps[0]
    assert (step.key, step.status, len(step.attempts)) == ("charge_payment", "failed", 3)
    assert [a.error.message for a in step.attempts] == ["failure 1", "failure 2", "failure 3"]  # type: ignore[union-attr]
    assert step.attempts[-1].retry_at is None
    assert always.error is not None and always.error.type == "StepFailedError"
    assert "failure 3" in always.error.message and "3 attempts" in always.error.message
    assert counts["always"] == 3

    fatal = done["fatal"]
    assert (fatal.status, len(fatal.steps[0].attempts), counts["fatal"]) == ("failed", 1, 1)
    assert fatal.steps[0].attempts[0].error.type == "NonRetryableError"  # type: ignore[union-attr]

    slow = done["slow"]
    assert (slow.status, slow.output) == ("completed", "fast enough")
    first = slow.steps[0].attempts[0]
    assert first.error is not None and first.error.type == "StepTimeoutError"
    assert "200 ms" in first.error.message

    rollback = done["rollback"]
    assert (rollback.status, rollback.output) == ("completed", {"rolled_back": "pay"})
    assert [s.key for s in rollback.steps] == ["pay", "release"]


def parallel_worker(counts: Counter[str], fail_branch: bool) -> Any:
    app = ploy()

    @app.workflow("fan")
    async def fan(ctx: Any) -> Any:
        def branch(i: int) -> Any:
            def run() -> int:
                counts[f"b{i}"] += 1
                if fail_branch and i == 1:
                    raise NonRetryableError("branch 1 broke")
                time.sleep(0.05 * (3 - i))  # finish out of order
                return i * 10
            return run

        results = await ctx.step.parallel("fetch", [branch(0), branch(1), branch(2)])
        await ctx.step.sleep(10)
        return results

    return app.build()


async def test_parallel_results_in_order_and_replay_skips_completed_branches(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    async with running_engine(parallel_worker(counts, False),
                              cfg(kafka, topic_prefix, state_dir)) as e:
        eid = await e.runtime.trigger("fan", {})
        done = await wait_for_status(e, eid)
    assert (done.status, done.output) == ("completed", [0, 10, 20])
    assert [s.key for s in done.steps] == ["fetch[0]", "fetch[1]", "fetch[2]", "sleep#1"]
    assert counts == Counter({"b0": 1, "b1": 1, "b2": 1})  # the sleep's replay ran none again


async def test_parallel_branch_failure_raises_after_the_others_are_recorded(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    async with running_engine(parallel_worker(counts, True),
                              cfg(kafka, topic_prefix, state_dir)) as e:
        eid = await e.runtime.trigger("fan", {})
        done = await wait_for_status(e, eid)
    assert done.status == "failed"
    assert done.error is not None and "branch 1 broke" in done.error.message
    by_key = {s.key: s for s in done.steps}
    assert (by_key["fetch[0]"].status, by_key["fetch[0]"].output) == ("completed", 0)
    assert (by_key["fetch[2]"].status, by_key["fetch[2]"].output) == ("completed", 20)
    assert by_key["fetch[1]"].status == "failed"


def sleeper_worker(counts: Counter[str]) -> Any:
    app = ploy()

    @app.workflow("nap")
    async def nap(ctx: Any) -> Any:
        await ctx.step.run("before", lambda: counts.update(["before"]))
        await ctx.step.sleep("2s")
        await ctx.step.run("after", lambda: counts.update(["after"]))
        return "woke"

    return app.build()


async def test_sleep_survives_a_restart_and_never_wakes_early(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    worker = sleeper_worker(counts)
    config = cfg(kafka, topic_prefix, state_dir)
    async with running_engine(worker, config) as e:
        eid = await e.runtime.trigger("nap", {})
        asleep = await wait_for_status(e, eid, "sleeping")
    wake_at = asleep.steps[1].wake_at
    assert wake_at is not None
    async with running_engine(worker, config) as e:  # a new worker, same state dir
        assert (await e.runtime.get_execution(eid)).status == "sleeping"  # type: ignore[union-attr]
        done = await wait_for_status(e, eid, timeout_s=10)
    assert done.status == "completed"
    fired = done.steps[1]
    assert fired.ended_at is not None and fired.ended_at >= wake_at
    after = done.steps[2]
    assert after.started_at is not None and after.started_at >= wake_at
    assert counts == Counter({"before": 1, "after": 1})


async def test_cancel_during_sleep_is_immediate_and_no_later_step_runs(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    config = cfg(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(sleeper_worker(counts), config) as e:
        eid = (await e.env.NAP.trigger({}))["execution_id"]
        await wait_for_status(e, eid, "sleeping")
        assert await e.env.NAP.cancel(eid, reason="user") is True
        cancelled = await e.env.NAP.get_execution(eid)
        assert cancelled is not None and cancelled.status == "cancelled"
        await asyncio.sleep(2.5)
        assert await e.env.NAP.cancel(eid) is False  # already over: changes nothing
        final = await e.env.NAP.get_execution(eid)
        history = await e.runtime.history(eid)
    assert final is not None and final.status == "cancelled"
    assert counts == Counter({"before": 1})
    assert final.steps[-1].status == "cancelled"
    types = [h.type for h in history or []]
    assert "CancelRequested" in types and "WorkflowCancelled" in types
    assert "TimerFired" not in types


async def test_cancel_while_a_step_runs_lets_it_finish_and_starts_no_more(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    started = asyncio.Event()
    app = ploy()

    @app.workflow("long")
    async def long(ctx: Any) -> Any:
        async def slow() -> str:
            started.set()
            await asyncio.sleep(0.5)
            return "finished"

        await ctx.step.run("slow", slow)
        await ctx.step.run("next", lambda: "should not run")
        return "done"

    async with running_engine(app.build(), cfg(kafka, topic_prefix, state_dir)) as e:
        eid = await e.runtime.trigger("long", {})
        await asyncio.wait_for(started.wait(), 10)
        assert await e.runtime.cancel(eid, reason="changed my mind") is True
        await asyncio.sleep(1.0)
        final = await e.runtime.get_execution(eid)
        history = await e.runtime.history(eid)
    assert final is not None and final.status == "cancelled"
    assert final.cancel_reason == "changed my mind"
    assert [(s.key, s.status, s.output) for s in final.steps] == [("slow", "completed", "finished")]
    assert history is not None and history[-1].type == "WorkflowCancelled"
    assert history[-1].body["reason"] == "changed my mind"


async def test_bad_input_appends_nothing_and_errors_are_clear(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    app = ploy()

    @app.workflow("typed", input=OrderInput)
    async def typed(ctx: Any) -> Any:
        return None

    @app.workflow("unserializable")
    async def unserializable(ctx: Any) -> Any:
        return await ctx.step.run("obj", lambda: object())

    @app.workflow("parsecs")
    async def parsecs(ctx: Any) -> Any:
        try:
            await ctx.step.sleep("5 parsecs")
        except ValueError as exc:
            return str(exc)
        return "slept"

    config = cfg(kafka, topic_prefix, state_dir, workflow={"TYPED": "typed"})
    async with running_engine(app.build(), config) as e:
        before = {p: v.next_offset for p, v in e.runtime.views.items()}
        with pytest.raises(InvalidInputError, match="order_id") as info:
            await e.env.TYPED.trigger({"user_id": "u", "items": [], "amount": "lots"})
        assert {tuple(err["loc"]) for err in info.value.errors} >= {("order_id",), ("amount",)}
        with pytest.raises(UnknownBindingError, match="NOPE.*TYPED"):
            await e.env.NOPE.trigger({})
        await asyncio.sleep(0.2)
        assert {p: v.next_offset for p, v in e.runtime.views.items()} == before

        bad = await wait_for_status(e, await e.runtime.trigger("unserializable", {}))
        assert bad.status == "failed"
        attempts = bad.steps[0].attempts
        assert len(attempts) == 1  # not retried: the same code fails the same way
        assert attempts[0].error is not None
        assert "the result of step 'obj' is not JSON-serializable" in attempts[0].error.message

        parsed = await wait_for_status(e, await e.runtime.trigger("parsecs", {}))
        assert parsed.status == "completed"
        assert "'5 parsecs'" in parsed.output


async def test_idempotency_key_gives_one_execution(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    config = cfg(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(sleeper_worker(counts), config) as e:
        first = await e.env.NAP.trigger({}, idempotency_key="order-42")
        second = await e.env.NAP.trigger({}, idempotency_key="order-42")
        other = await e.env.NAP.trigger({}, idempotency_key="order-43")
        assert first == second != other
        listed = await e.runtime.list_executions(workflow="nap")
    assert sorted(x.execution_id for x in listed) == sorted(
        {first["execution_id"], other["execution_id"]})


async def test_get_execution_reads_its_own_writes_and_unknown_is_none(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    config = cfg(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(sleeper_worker(counts), config) as e:
        for _ in range(20):
            eid = (await e.env.NAP.trigger({}))["execution_id"]
            execution = await e.env.NAP.get_execution(eid)
            assert execution is not None and execution.execution_id == eid
        assert await e.env.NAP.get_execution("no-such-id") is None


async def test_retry_backoff_is_durable_across_a_restart(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    counts: Counter[str] = Counter()
    app = ploy()

    @app.workflow("later")
    async def later(ctx: Any) -> Any:
        def once_then_ok() -> str:
            counts["call"] += 1
            if counts["call"] == 1:
                raise ConnectionError("try again later")
            return "ok"

        return await ctx.step.run("call", once_then_ok, retries=1)

    worker = app.build()
    config = engine_config(kafka, topic_prefix, state_dir, backoff={"initial_ms": 1500})
    async with running_engine(worker, config) as e:
        eid = await e.runtime.trigger("later", {})
        deadline = asyncio.get_running_loop().time() + 10
        while counts["call"] == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the failure is recorded; stop during the backoff
    async with running_engine(worker, config) as e:
        done = await wait_for_status(e, eid)
    first, second = done.steps[0].attempts
    assert first.retry_at is not None and second.started_at is not None
    assert second.started_at >= first.retry_at  # the restart did not cut the wait short
    assert (done.status, counts["call"]) == ("completed", 2)


async def test_a_failed_append_stops_the_run_and_user_code_cannot_swallow_it(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    caught: list[str] = []
    app = ploy()

    @app.workflow("huge")
    async def huge(ctx: Any) -> Any:
        try:  # 2 MB passes our limit (raised here) but not the producer's 1 MB
            return await ctx.step.run("big", lambda: "x" * 2_000_000)
        except Exception as exc:
            caught.append(type(exc).__name__)
            return "swallowed"

    config = engine_config(kafka, topic_prefix, state_dir, max_payload_bytes=5_000_000)
    async with running_engine(app.build(), config) as e:
        eid = await e.runtime.trigger("huge", {})
        await asyncio.sleep(1.5)
        execution = await e.runtime.get_execution(eid)
    assert caught == []
    assert execution is not None and execution.status == "running"  # not failed, not done
    assert execution.steps[0].attempts[0].ended_at is None  # resumes on a later try
