"""Where the wave's features meet: flow control, children, erasure, reruns, cancels."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from engine import NonRetryableError, ploy
from engine.errors import AppendError
from engine.log import EventLog
from engine.rerun import rerun
from engine.testing import engine_config, running_engine, wait_for_status

SPANS: list[tuple[float, float]] = []
STATE = {"broken": True}


def worker() -> Any:
    app = ploy()

    @app.workflow("bill")
    async def bill(ctx: Any) -> Any:
        async def work() -> str:
            started = time.monotonic()
            await asyncio.sleep(0.3)
            SPANS.append((started, time.monotonic()))
            return str(ctx.input["customer_id"])

        return await ctx.step.run("work", work)

    @app.workflow("fan")
    async def fan(ctx: Any) -> Any:
        return await asyncio.gather(*(
            ctx.step.invoke(f"b{i}", binding="BILL", input={"customer_id": "c1"})
            for i in range(4)))

    @app.workflow("child")
    async def child(ctx: Any) -> Any:
        if ctx.input.get("sleep"):
            await ctx.step.sleep(ctx.input["sleep"])
        return await ctx.step.run("work", lambda: 7)

    @app.workflow("parent")
    async def parent(ctx: Any) -> Any:
        try:
            got = await ctx.step.invoke("kid", binding="CHILD", input=ctx.input)
        except Exception as exc:
            return {"child ended": str(exc)}

        def after() -> int:
            if STATE["broken"]:
                raise NonRetryableError("broken")
            return int(got) + 1

        return await ctx.step.run("after", after)

    @app.workflow("stuck")
    async def stuck(ctx: Any) -> Any:
        async def hang() -> str:
            await asyncio.sleep(3600)
            return "never"

        return await ctx.step.run("hang", hang)

    return app.build()


LIMIT = {"limit": 1, "key": "input.customer_id"}
BINDINGS = {"BILL": {"name": "bill", "concurrency": LIMIT}, "FAN": "fan", "CHILD": "child",
            "PARENT": "parent", "STUCK": "stuck"}


def config(kafka: str, prefix: str, tmp_path: Path) -> Any:
    return engine_config(kafka, prefix, tmp_path / "state", partitions=4, workflow=BINDINGS,
                         erasure={"key_dir": str(tmp_path / "keys")})


def peak(spans: list[tuple[float, float]]) -> int:
    running = most = 0
    for _, delta in sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]):
        running += delta
        most = max(most, running)
    return most


async def test_flow_control_holds_for_children_and_for_sealed_inputs(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    SPANS.clear()
    async with running_engine(worker(), config(kafka, topic_prefix, tmp_path)) as engine:
        fan = await engine.env.FAN.trigger({})
        assert await fan.result(timeout=30) == ["c1"] * 4
        assert peak(SPANS) == 1  # the children share their key's limit of 1
        sealed = await engine.env.BILL.trigger({"customer_id": "c2"}, subject="u1")
        assert await sealed.result(timeout=15) == "c2"  # admitted, its input opened


async def test_a_rerun_past_an_invoke_replays_the_child_result(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    STATE["broken"] = True
    async with running_engine(worker(), config(kafka, topic_prefix, tmp_path)) as engine:
        source = (await engine.env.PARENT.trigger({}))["execution_id"]
        assert (await wait_for_status(engine, source)).status.value == "failed"
        STATE["broken"] = False
        made = await rerun(engine.runtime, source, "after")
        assert made is not None and made.execution_id is not None
        again = await wait_for_status(engine, made.execution_id, timeout_s=15)
        assert (again.status.value, again.output) == ("completed", 8)
        children = await engine.list_executions(workflow="child")
        assert len(children) == 1  # the rerun did not start a second child


async def test_a_cancelled_childs_notice_survives_a_failed_append_and_a_restart(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = config(kafka, topic_prefix, tmp_path)
    async with running_engine(worker(), cfg) as engine:
        runtime = engine.runtime
        parent = (await engine.env.PARENT.trigger({"sleep": "60s"}))["execution_id"]
        execution = None
        for _ in range(200):
            execution = await engine.get_execution(parent)
            if execution is not None and execution.waiting_for:
                break
            await asyncio.sleep(0.05)
        assert execution is not None and execution.waiting_for
        kid = execution.waiting_for[0].child_id
        assert kid is not None
        await wait_for_status(engine, kid, "sleeping")
        real, calls = runtime.notify_parent, []

        async def flaky(record: dict[str, Any], end: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise AppendError("events", "broker hiccup")
            await real(record, end)

        runtime.notify_parent = flaky  # type: ignore[method-assign]
        assert await runtime.cancel(kid, "operator")
        done = await wait_for_status(engine, parent, timeout_s=15)
        assert "cancelled" in done.output["child ended"] and len(calls) == 2


async def test_an_operators_step_output_is_sealed_for_a_subject(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    async with running_engine(worker(), config(kafka, topic_prefix, tmp_path)) as engine:
        eid = (await engine.env.STUCK.trigger({"email": "alice@example.com"},
                                              subject="u1"))["execution_id"]
        for _ in range(100):
            execution = await engine.get_execution(eid)
            if execution is not None and execution.steps and execution.steps[0].status == "running":
                break
            await asyncio.sleep(0.05)
        assert await engine.runtime.resolve_step(eid, "hang", "complete",
                                                 output={"addr": "ZZZ-PII"}, reason="stuck",
                                                 actor="op")
        done = await wait_for_status(engine, eid, timeout_s=10)
        assert done.output == {"addr": "ZZZ-PII"}  # opened for a read
        partitions = engine.runtime.log.partitions
    log = EventLog(kafka, topic_prefix, partitions)
    try:
        raw = b"".join(value for batch in log.read_until_end(dict.fromkeys(range(partitions), 0))
                       for records in batch.values() for _, value in records)
    finally:
        log.close()
    assert b"alice@example.com" not in raw and b"ZZZ-PII" not in raw


async def test_a_cancel_whose_notice_never_went_out_is_finished_after_a_restart(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    cfg = config(kafka, topic_prefix, tmp_path)
    async with running_engine(worker(), cfg) as engine:
        runtime = engine.runtime
        parent = (await engine.env.PARENT.trigger({"sleep": "60s"}))["execution_id"]
        kid = None
        for _ in range(200):
            execution = await engine.get_execution(parent)
            if execution is not None and execution.waiting_for:
                kid = execution.waiting_for[0].child_id
                break
            await asyncio.sleep(0.05)
        assert kid is not None
        await wait_for_status(engine, kid, "sleeping")

        async def down(record: dict[str, Any], end: Any) -> None:
            raise AppendError("events", "the broker is away")  # as if killed right here

        runtime.notify_parent = down  # type: ignore[method-assign]
        await runtime.cancel(kid, "operator")
        await asyncio.sleep(0.5)
        assert (await engine.get_execution(parent)).status.value == "waiting"  # type: ignore[union-attr]
    async with running_engine(worker(), cfg) as engine:  # the owed notice goes out now
        done = await wait_for_status(engine, parent, timeout_s=15)
        assert "cancelled" in done.output["child ended"]


async def test_a_rerun_reopens_a_wait_its_source_left_open(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    async with running_engine(worker(), config(kafka, topic_prefix, tmp_path)) as engine:
        source = (await engine.env.PARENT.trigger({"sleep": "60s"}))["execution_id"]
        for _ in range(200):
            execution = await engine.get_execution(source)
            if execution is not None and execution.waiting_for:
                break
            await asyncio.sleep(0.05)
        first_child = execution.waiting_for[0].child_id  # type: ignore[union-attr]
        assert await engine.runtime.cancel(source, "op")
        made = await rerun(engine.runtime, source)
        assert made is not None and made.execution_id is not None
        for _ in range(200):  # the rerun opens its own wait on a child of its own
            again = await engine.get_execution(made.execution_id)
            if again is not None and again.waiting_for:
                break
            await asyncio.sleep(0.05)
        assert again is not None
        [waiting] = again.waiting_for
        assert waiting.child_id not in (None, first_child)


async def test_a_cancel_while_an_invoke_opens_ends_the_parent_and_its_child(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    async with running_engine(worker(), config(kafka, topic_prefix, tmp_path)) as engine:
        runtime = engine.runtime
        real, entered = runtime.trigger_child, asyncio.Event()

        async def slow(*args: Any, **kwargs: Any) -> str:
            entered.set()
            await asyncio.sleep(0.5)  # the child's trigger in flight when the cancel lands
            return await real(*args, **kwargs)

        runtime.trigger_child = slow  # type: ignore[method-assign]
        parent = (await engine.env.PARENT.trigger({"sleep": "60s"}))["execution_id"]
        await entered.wait()
        assert await runtime.cancel(parent, "op")
        history: list[Any] = []
        for _ in range(200):
            history = await runtime.history(parent) or []
            if any(e.type == "WorkflowCancelled" for e in history):
                break
            await asyncio.sleep(0.05)
        assert any(e.type == "WorkflowCancelled" for e in history)
        execution = await engine.get_execution(parent)
        assert execution is not None
        [kid] = [s.child_id for s in execution.steps if s.kind == "invoke"]
        assert kid is not None
        assert (await wait_for_status(engine, kid, "cancelled")).status.value == "cancelled"
