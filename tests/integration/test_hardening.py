"""Edges of the runtime found by an adversarial review, each on the real broker.

Faults are injected through a wrapper around the engine's own log (never a mock
of the Kafka client): an append that fails once, or always, for one event type.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaError, Producer
from pydantic import BaseModel

from engine import Engine, ploy
from engine.app import serving_api
from engine.errors import (
    AppendError,
    InvalidInputError,
    PartitionStalledError,
    PayloadTooLargeError,
)
from engine.events import Event
from engine.http import create_app
from engine.log import EventLog
from engine.rebuild import rebuild
from engine.skips import operator
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView


class Text(BaseModel):
    text: str


def hardening_worker(effects: Counter[str], release: threading.Event) -> Any:  # noqa: C901
    app = ploy()

    @app.workflow("echo", input=Text)
    async def echo(ctx: Any) -> Any:
        return await ctx.step.run("echo", lambda: {"text": ctx.input.text})

    @app.workflow("untyped")
    async def untyped(ctx: Any) -> Any:
        return ctx.input

    @app.workflow("big_output")
    async def big_output(ctx: Any) -> Any:
        return {"text": "é" * 600_000}

    @app.workflow("big_step")
    async def big_step(ctx: Any) -> Any:
        return await ctx.step.run("big", lambda: "é" * 600_000, retries=0)

    @app.workflow("surrogates")
    async def surrogates(ctx: Any) -> Any:
        value = await ctx.step.run("lone", lambda: {"x": "a\ud800b"})
        if ctx.input.get("fail"):
            raise ValueError("bad \udfff text")
        return value

    @app.workflow("deep_step")
    async def deep_step(ctx: Any) -> Any:
        def deep() -> Any:
            value: Any = 1
            for _ in range(300):
                value = [value]
            return value

        return await ctx.step.run("deep", deep, retries=0)

    @app.workflow("names")
    async def names(ctx: Any) -> Any:
        if ctx.input["case"] == "hash":
            await ctx.step.run("a#2", lambda: "first")
            await ctx.step.run("a", lambda: "second")
            return await ctx.step.run("a", lambda: "third")
        await ctx.step.run("p[0]", lambda: "step")
        return await ctx.step.parallel("p", [lambda: "branch"])

    @app.workflow("logs")
    async def logs(ctx: Any) -> Any:
        ctx.log("1")

        def inside() -> int:
            ctx.log("2")
            return 2

        await ctx.step.run("inside", inside)
        ctx.log("3")
        await ctx.step.sleep("100ms")  # the runner ends; the timer resumes it by replay
        ctx.log("4")
        return "done"

    @app.workflow("hang")
    async def hang(ctx: Any) -> Any:
        def stuck() -> None:
            effects["hang"] += 1
            release.wait(60)

        try:
            await ctx.step.run("stuck", stuck, timeout="300ms", retries=0)
        except Exception:
            return "timed out"
        return "returned"

    @app.workflow("quick")
    async def quick(ctx: Any) -> Any:
        return await ctx.step.run("q", lambda: effects.update(["quick"]) or "ok")

    @app.workflow("branches")
    async def branches(ctx: Any) -> Any:
        async def slow() -> int:
            await asyncio.sleep(0.05)
            effects["slow"] += 1
            return 10

        def flaky() -> int:
            effects["flaky"] += 1
            if effects["flaky"] == 1:
                raise ConnectionError("try again")
            return 1

        both = await ctx.step.parallel("p", [slow, flaky])
        return await ctx.step.run("after", lambda: effects.update(["after"]) or sum(both))

    @app.workflow("large_end")
    async def large_end(ctx: Any) -> Any:
        await ctx.step.run("q", lambda: effects.update(["large_end"]) or "ok")
        return "x" * 70_000  # over BATCH_RECORD_BYTES: it cannot share a record batch

    @app.workflow("bounded")
    async def bounded(ctx: Any) -> Any:
        await ctx.step.run("a", lambda: 1)
        try:  # the user's own timeout around a step
            await asyncio.wait_for(ctx.step.run("b", lambda: effects.update(["b"]) or 2), 0.1)
        except TimeoutError:
            pass

        def c() -> int:
            effects["c_at_ms"] = int(time.monotonic() * 1000)
            return 3

        return await ctx.step.run("c", c)

    @app.workflow("waiting")
    async def waiting(ctx: Any) -> Any:
        async def until_released() -> str:
            ctx.log("inside, on the loop")
            joined = threading.Thread(target=ctx.log, args=("inside, from a thread it joins",))
            joined.start()
            joined.join()
            while not release.is_set():
                await asyncio.sleep(0.01)
            return "released"

        def from_a_thread() -> int:
            ctx.log("inside, from its thread")
            return 1

        await ctx.step.run("thread", from_a_thread)
        return await ctx.step.run("wait", until_released)

    @app.workflow("gap")
    async def gap(ctx: Any) -> Any:
        a = await ctx.step.run("a", lambda: effects.update(["gap_a"]) or 1)
        await asyncio.sleep(0.3)  # the handler's own await: a's completion goes alone

        def b() -> int:
            effects["gap_b"] += 1
            if effects["gap_b"] == 1:
                raise ConnectionError("the first call fails; retries=1 allows one more")
            return a + 1

        return await ctx.step.run("b", b, retries=1)

    @app.workflow("two_steps")
    async def two_steps(ctx: Any) -> Any:
        a = await ctx.step.run("a", lambda: effects.update(["a"]) or 1)
        return await ctx.step.run("b", lambda: effects.update(["b"]) or a + 1)

    @app.workflow("nap")
    async def nap(ctx: Any) -> Any:
        await ctx.step.sleep(50)
        return await ctx.step.run("after", lambda: effects.update(["after"]) or "rested")

    @app.workflow("nap_end")
    async def nap_end(ctx: Any) -> Any:
        await ctx.step.sleep(50)
        return "rested"

    return app.build()


BINDINGS = {"ECHO": "echo", "UNTYPED": "untyped", "BIG_OUTPUT": "big_output",
            "BIG_STEP": "big_step", "SURROGATES": "surrogates", "DEEP_STEP": "deep_step",
            "NAMES": "names", "LOGS": "logs", "HANG": "hang", "QUICK": "quick",
            "TWO_STEPS": "two_steps", "BRANCHES": "branches", "LARGE_END": "large_end",
            "BOUNDED": "bounded", "WAITING": "waiting", "GAP": "gap", "NAP": "nap",
            "NAP_END": "nap_end"}


@pytest.fixture
def effects() -> Counter[str]:
    return Counter()


@pytest.fixture
def release() -> Any:
    event = threading.Event()
    yield event
    event.set()  # hung step threads end with the test


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path, effects: Counter[str],
                 release: threading.Event) -> AsyncIterator[Engine]:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS,
                           backoff={"initial_ms": 10})
    async with running_engine(hardening_worker(effects, release), config) as eng:
        yield eng


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as c:
        yield c


def fail_appends(engine: Engine, event_type: str, *, times: int | None = 1,
                 permanent: bool = False, late: bool = False, step: str | None = None,
                 delay_s: float = 0.2) -> list[Event]:
    """Make the engine's log refuse ``times`` appends of ``event_type`` (of ``step``, if
    named; None: every one), as the producer refuses a record: where it is handed over,
    whichever way it comes. ``late``: in its delivery report ``delay_s`` later, as the
    broker's answer comes (what follows it goes to the broker meanwhile); an event that
    goes in one record batch with others is refused with all of them, as a broker does."""
    log = engine.runtime.log
    real: Callable[..., Any] = log._produce  # noqa: SLF001
    real_batch: Callable[..., Any] = log._produce_batch  # noqa: SLF001
    refused: list[Event] = []

    def hit(event: Event) -> bool:
        return (event.type == event_type and (step is None or event.body.step == step)  # type: ignore[union-attr]
                and (times is None or len(refused) < times))

    def refuse_late(callbacks: list[Any]) -> None:
        error = KafkaError(KafkaError._MSG_TIMED_OUT)  # noqa: SLF001
        for callback in callbacks:
            threading.Timer(delay_s, callback, (error, None)).start()

    def produce(event: Event, on_delivery: Any, *args: Any) -> int:
        if hit(event):
            refused.append(event)
            if not late:
                raise AppendError(log.topic, "injected: the broker refused", permanent)
            refuse_late([on_delivery])
            return log.partition_for(event.execution_id)
        partition: int = real(event, on_delivery, *args)
        return partition

    def produce_batch(events: list[tuple[Event, bool]], values: list[bytes],
                      callbacks: list[Any], partition: int) -> Any:
        first = next((i for i, (event, _) in enumerate(events) if hit(event)), None)
        if first is None:
            return real_batch(events, values, callbacks, partition)
        refused.append(events[first][0])
        if not late:  # the producer takes those before it, and refuses it and what follows
            if first:
                real_batch(events[:first], values[:first], callbacks[:first], partition)
            error = AppendError(log.topic, "injected: the broker refused", permanent)
            return [(i, error) for i in range(first, len(events))]
        refuse_late(callbacks)  # the record batch, whole
        return []

    log._produce = produce  # type: ignore[method-assign]  # noqa: SLF001
    log._produce_batch = produce_batch  # type: ignore[method-assign]  # noqa: SLF001
    return refused


def delay_acks(engine: Engine, event_type: str, step: str, delay_s: float) -> None:
    """Have the delivery report of the next ``event_type`` of ``step`` come ``delay_s`` late
    (the event itself goes to the broker at once)."""
    log = engine.runtime.log
    real: Callable[..., Any] = log._resolved_on  # noqa: SLF001
    real_send_all: Callable[..., Any] = log.send_all
    armed = [True]

    def send_all(events: list[tuple[Event, bool]]) -> Any:
        late = [armed[0] and event.type == event_type and event.body.step == step  # type: ignore[union-attr]
                for event, _ in events]
        if not any(late):
            return real_send_all(events)
        armed[0] = False

        def resolved_on(loop: Any, waiter: Any) -> Any:
            delivered = real(loop, waiter)
            return lambda err, msg: threading.Timer(delay_s, delivered, (err, msg)).start()

        log._resolved_on = resolved_on  # type: ignore[method-assign]  # noqa: SLF001
        try:
            return real_send_all(events)
        finally:
            log._resolved_on = real  # type: ignore[method-assign]  # noqa: SLF001

    log.send_all = send_all  # type: ignore[method-assign]


# -- 1. a failed final append ------------------------------------------------------------


@pytest.mark.parametrize("end", ["WorkflowCompleted", "WorkflowFailed"])
async def test_a_failed_end_append_is_resumed_not_left_running(engine: Engine, end: str) -> None:
    refused = fail_appends(engine, end)
    binding = engine.env.SURROGATES
    eid = (await binding.trigger({"fail": end == "WorkflowFailed"}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert len(refused) == 1
    assert done.status.value == ("completed" if end == "WorkflowCompleted" else "failed")


async def test_an_output_the_broker_always_refuses_fails_the_execution_clearly(
        engine: Engine) -> None:
    fail_appends(engine, "WorkflowCompleted", times=None, permanent=True)
    eid = (await engine.env.ECHO.trigger({"text": "hi"}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert done.status.value == "failed"
    assert done.error is not None and "the output was refused" in done.error.message


async def test_a_step_runs_only_once_the_completion_before_it_is_acknowledged(
        engine: Engine, effects: Counter[str]) -> None:
    """The handler goes on with a step's value before its completion is acknowledged
    (it goes to the broker with what follows), but the next step's function waits for
    it: a refused completion stops the run before the next step runs, and nothing of
    the run follows it on the log."""
    refused = fail_appends(engine, "StepCompleted", late=True)
    eid = (await engine.env.TWO_STEPS.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert (done.status.value, done.output) == ("completed", 2)
    assert [e.body.step for e in refused] == ["a"]  # type: ignore[union-attr]
    assert (effects["a"], effects["b"]) == (2, 1)  # a again (never recorded); b once
    history = await engine.runtime.history(eid)
    assert history is not None
    steps = [(e.type, e.body["step"]) for e in history if e.type.startswith("Step")]
    # b's start went with a's completion, in one record batch: refused with it.
    assert steps.count(("StepCompleted", "a")) == steps.count(("StepCompleted", "b")) == 1
    assert steps.index(("StepCompleted", "b")) > steps.index(("StepCompleted", "a"))
    assert history[-1].type == "WorkflowCompleted"


async def test_a_step_that_takes_time_shows_as_running_with_its_log_lines(
        engine: Engine, release: threading.Event) -> None:
    """A start and a log line are held to go to the broker with what follows, but only
    until the event loop's next turn: a step that takes time is on the log as running
    (and a line it logs, in order after its start) while it runs."""
    eid = (await engine.env.WAITING.trigger({}))["execution_id"]
    deadline = time.monotonic() + 10
    while True:
        execution = await engine.runtime.get_execution(eid)
        assert execution is not None
        steps = {s.key: s.status for s in execution.steps}
        if steps.get("wait") == "running" and len(execution.logs) == 3:
            break
        assert time.monotonic() < deadline, (steps, execution.logs)
        await asyncio.sleep(0.02)
    assert execution.status.value == "running"
    release.set()
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert (done.status.value, done.output) == ("completed", "released")
    history = await engine.runtime.history(eid)
    assert history is not None
    order = [e.body.get("step") or e.body.get("message") for e in history
             if e.type in ("StepStarted", "WorkflowLog")]
    assert order == ["thread", "inside, from its thread", "wait", "inside, on the loop",
                     "inside, from a thread it joins"]


@pytest.mark.parametrize("binding", ["TWO_STEPS", "QUICK"])
async def test_a_start_refused_at_once_stops_the_run_before_its_step_runs(
        engine: Engine, effects: Counter[str], binding: str) -> None:
    """A held start that the producer refuses when it is handed over is not lost
    silently: the run stops before the step's function runs, and resumes by replay
    (TWO_STEPS: b's start goes with a's completion; QUICK: the first step's start, with
    the workflow's, just before its function's thread)."""
    step = "b" if binding == "TWO_STEPS" else "q"
    refused = fail_appends(engine, "StepStarted", step=step)
    eid = (await engine.env[binding].trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert done.status.value == "completed"
    assert len(refused) == 1
    assert effects["b" if binding == "TWO_STEPS" else "quick"] == 1  # once, after the replay
    history = await engine.runtime.history(eid)
    assert history is not None
    steps = [(e.type, e.body["step"]) for e in history if e.type.startswith("Step")]
    assert steps.count(("StepCompleted", step)) == 1
    assert ("StepStarted", step) in steps


async def test_nothing_of_a_run_follows_an_append_refused_late(
        engine: Engine, effects: Counter[str]) -> None:
    """a's completion goes alone (the handler awaits between the steps) and is refused
    late, as b starts: b's start, held meanwhile, must not reach the log after the gap
    (a replay would take it for an attempt of b that ran, and b would lose a retry)."""
    refused = fail_appends(engine, "StepCompleted", step="a", late=True, delay_s=0.1)
    eid = (await engine.env.GAP.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=20)
    assert len(refused) == 1
    assert (done.status.value, done.output) == ("completed", 2)
    assert effects["gap_b"] == 2  # attempt 1 failed, attempt 2 (its one retry) succeeded


@pytest.mark.parametrize(("binding", "late"), [("NAP", True), ("NAP", False),
                                               ("NAP_END", True), ("NAP_END", False)])
async def test_a_refused_timer_firing_is_fired_again_and_nothing_of_the_run_goes_before_it(
        engine: Engine, effects: Counter[str], binding: str, late: bool) -> None:
    """A timer's firing refused (late, as the broker answers; or at once): the execution
    resumes only once a firing is on the log (the schedule fires it again), so the
    step after the sleep runs once and the end lands once, both after the one
    TimerFired."""
    refused = fail_appends(engine, "TimerFired", late=late, delay_s=0.1)
    eid = (await engine.env[binding].trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert (done.status.value, done.output) == ("completed", "rested")
    assert len(refused) == 1
    assert effects["after"] == (1 if binding == "NAP" else 0)
    history = await engine.runtime.history(eid)
    assert history is not None
    types = [e.type for e in history]
    assert types.count("TimerFired") == 1 and types.count("WorkflowCompleted") == 1
    fired = types.index("TimerFired")
    assert types[:fired] == ["WorkflowTriggered", "WorkflowStarted", "SleepScheduled"]
    if binding == "NAP_END":
        assert types[fired:] == ["TimerFired", "WorkflowCompleted"]
    else:
        assert [(e.type, e.body.get("step")) for e in history[fired + 1:]] == [
            ("StepStarted", "after"), ("StepCompleted", "after"), ("WorkflowCompleted", None)]


@pytest.mark.parametrize("binding", ["QUICK", "LARGE_END"])
async def test_the_end_never_lands_without_the_last_step_s_completion(
        engine: Engine, effects: Counter[str], binding: str) -> None:
    """The last step's completion and the end go in one record batch: refused, both are
    (the step runs again, by replay), never the end alone; an end too large to share the
    batch waits for the completion's acknowledgement first."""
    refused = fail_appends(engine, "StepCompleted", late=True)
    eid = (await engine.env[binding].trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert done.status.value == "completed"
    assert effects[binding.lower()] == 2
    assert len(refused) == 1
    history = await engine.runtime.history(eid)
    assert history is not None
    types = [e.type for e in history]
    assert types.count("StepCompleted") == types.count("WorkflowCompleted") == 1
    assert types.index("StepCompleted") < types.index("WorkflowCompleted")


async def test_a_branch_s_refused_completion_stops_the_run_whatever_the_others_await(
        engine: Engine, effects: Counter[str]) -> None:
    """One branch's completion is refused while another branch waits on its own append:
    the refusal is not lost with that wait; the run stops before the next step and the
    replay runs the branch again."""
    delay_acks(engine, "StepFailed", "p[1]", 0.4)  # flaky's failure, answered late
    refused = fail_appends(engine, "StepCompleted", late=True, step="p[0]", delay_s=0.1)
    eid = (await engine.env.BRANCHES.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert (done.status.value, done.output) == ("completed", 11)
    assert [e.body.step for e in refused] == ["p[0]"]  # type: ignore[union-attr]
    assert effects["slow"] == 2 and effects["after"] == 1
    history = await engine.runtime.history(eid)
    assert history is not None
    completed = [e.body["step"] for e in history if e.type == "StepCompleted"]
    assert sorted(completed) == ["after", "p[0]", "p[1]"]
    assert completed[-1] == "after"


async def test_a_user_timeout_around_a_step_does_not_cancel_the_wait_for_an_append(
        engine: Engine, effects: Counter[str]) -> None:
    """A step waits for the previous completion's acknowledgement; the user's own
    timeout around it ends that wait: the next step's function still runs only once the
    completion is acknowledged."""
    delay_acks(engine, "StepCompleted", "a", 0.5)
    started = time.monotonic()
    eid = (await engine.env.BOUNDED.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid, timeout_s=15)
    assert (done.status.value, done.output) == ("completed", 3)
    assert effects["b"] == 0  # timed out while it waited for a's acknowledgement
    assert effects["c_at_ms"] / 1000 - started >= 0.5


# -- 2. sizes in bytes -------------------------------------------------------------------


async def test_sizes_are_checked_in_encoded_bytes(engine: Engine,
                                                  client: httpx.AsyncClient) -> None:
    wide = "é" * 450_001  # 450,001 characters, 900,002 bytes: over the 900,000 limit
    response = await client.post("/__ploy/api/trigger/ECHO", json={"input": {"text": wide}})
    assert response.status_code == 413, response.text
    assert "workflow input is 900013 bytes" in response.json()["error"]
    with pytest.raises(PayloadTooLargeError, match="1200011 bytes"):
        await engine.env.ECHO.trigger({"text": "é" * 600_000})
    assert await engine.runtime.list_executions() == []  # nothing appended

    eid = (await engine.env.BIG_OUTPUT.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == "failed" and done.error is not None
    assert "workflow output is" in done.error.message and "over the limit" in done.error.message

    eid = (await engine.env.BIG_STEP.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == "failed"
    assert "bytes, over the limit" in done.steps[0].attempts[0].error.message  # type: ignore[union-attr]

    response = await client.post("/__ploy/api/trigger/ECHO",
                                 json={"input": {"text": "x"}, "idempotency_key": "k" * 2000})
    assert response.status_code == 413 and "idempotency key" in response.json()["error"]


# -- 3. text that no UTF-8 encoder takes ---------------------------------------------------


async def test_a_lone_surrogate_input_is_a_422_and_appends_nothing(
        engine: Engine, client: httpx.AsyncClient) -> None:
    body = '{"input": {"text": "a\\ud800b"}}'
    for binding in ("ECHO", "UNTYPED"):
        response = await client.post(f"/__ploy/api/trigger/{binding}", content=body,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "lone surrogate" in response.text
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        await engine.env.UNTYPED.trigger({"text": "a\ud800b"})
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        await engine.env.ECHO.trigger({"text": "a\ud800b"})
    response = await client.post("/__ploy/api/trigger/ECHO", content=(
        '{"input": {"text": "x"}, "idempotency_key": "\\udc00"}'),
        headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert await engine.runtime.list_executions() == []


@pytest.mark.parametrize("fail", [False, True])
async def test_a_lone_surrogate_from_user_code_ends_the_run_and_reads_back(
        engine: Engine, client: httpx.AsyncClient, fail: bool) -> None:
    eid = (await engine.env.SURROGATES.trigger({"fail": fail}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == ("failed" if fail else "completed")
    assert done.steps[0].output == {"x": "a\ufffdb"}
    if fail:
        assert done.error is not None and done.error.message == "bad \\udfff text"
    for path in (f"/__ploy/api/executions/{eid}", f"/__ploy/api/executions/{eid}/history",
                 f"/__ploy/executions/{eid}"):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)


# -- 4. claims that fail are tried again -------------------------------------------------


async def test_a_failed_partition_claim_is_retried_and_reported_until_it_lands(
        kafka: str, topic_prefix: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = ploy()

    @app.workflow("one")
    async def one(ctx: Any) -> Any:
        return await ctx.step.run("s", lambda: 1)

    config = engine_config(kafka, topic_prefix, state_dir, workflow={"ONE": "one"})
    engine = Engine(app.build(), config, scale_out=True)
    blocked = threading.Event()
    blocked.set()
    refused: list[int] = []
    real = EventLog.append

    async def append(log: EventLog, event: Event, partition: int | None = None
                     ) -> tuple[int, int]:
        if event.type == "PartitionClaimed" and blocked.is_set():
            refused.append(event.body.partition)  # type: ignore[union-attr]
            raise AppendError(log.topic, "injected: claim refused")
        result: tuple[int, int] = await real(log, event, partition)
        return result

    monkeypatch.setattr(EventLog, "append", append)
    await engine.start()
    try:
        deadline = time.monotonic() + 30
        while len(set(refused)) < config.kafka.partitions:
            assert time.monotonic() < deadline, refused
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)),
                                     base_url="http://127.0.0.1:8787") as client:
            health = (await client.get("/__ploy/api/health")).json()
            assert health["status"] == "degraded"
            assert health["claiming"] == list(range(config.kafka.partitions))
            eid = (await engine.env.ONE.trigger({}))["execution_id"]
            blocked.clear()  # the broker takes claims again
            done = await wait_for_status(engine, eid, timeout_s=30)
            assert done.status.value == "completed"
            deadline = time.monotonic() + 15  # each partition's retry comes in its backoff
            while (health := (await client.get("/__ploy/api/health")).json())["claiming"]:
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.1)
            assert health["status"] == "ok"
        assert set(refused) == set(range(config.kafka.partitions))
    finally:
        await engine.stop()


# -- 5. a corrupt record: a 503 for new triggers, and an audited way past it -------------


async def test_a_corrupt_record_stops_triggers_until_an_operator_skips_it(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path, effects: Counter[str],
        release: threading.Event) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS)
    worker = hardening_worker(effects, release)
    async with running_engine(worker, config) as engine:
        log = engine.runtime.log
        eid = (await engine.env.QUICK.trigger({}))["execution_id"]
        partition = log.partition_for(eid)
        await wait_for_status(engine, eid)
        producer = Producer({"bootstrap.servers": kafka})
        corrupt_at: list[int] = []
        producer.produce(log.topic, value=b"not an event", key=eid.encode(), partition=partition,
                         on_delivery=lambda err, msg: corrupt_at.append(msg.offset()))
        producer.flush(10)
        deadline = time.monotonic() + 10
        while partition not in engine.runtime.stalled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # A trigger routed there fails clearly instead of being accepted and lost.
        stuck = [f"k{i}" for i in range(40) if
                 log.partition_for(_id_for(engine, "quick", f"k{i}")) == partition][:2]
        with pytest.raises(PartitionStalledError):
            await engine.env.QUICK.trigger({}, idempotency_key=stuck[0])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)),
                                     base_url="http://127.0.0.1:8787") as client:
            response = await client.post("/__ploy/api/trigger/QUICK",
                                         json={"input": {}, "idempotency_key": stuck[0]})
            assert response.status_code == 503, response.text
            assert f"ploy skip --partition {partition} --offset {corrupt_at[0]}" in (
                response.json()["error"])
            # The operator skips it, with a reason; the partition folds on and runs again.
            # Only the record the partition is stopped at can be skipped, with a reason.
            url = f"/__ploy/api/partitions/{partition}/skip"
            response = await client.post(url, json={"offset": corrupt_at[0] - 1, "reason": "x"})
            assert response.status_code == 409 and response.json()["stalled_at"] == corrupt_at[0]
            response = await client.post(url, json={"offset": corrupt_at[0], "reason": " "})
            assert response.status_code == 422 and "reason" in response.text
            async with serving_api(engine) as base:
                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "engine.cli", "skip", "--url", base,
                    "--partition", str(partition), "--offset", str(corrupt_at[0]),
                    "--reason", "a test producer wrote garbage",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 0, err
            assert f"skipped partition {partition} offset {corrupt_at[0]}" in out.decode()
        deadline = time.monotonic() + 15
        while partition in engine.runtime.stalled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        after = (await engine.env.QUICK.trigger({}, idempotency_key=stuck[1]))["execution_id"]
        assert (await wait_for_status(engine, after)).status.value == "completed"
        report = {r["partition"]: r for r in await engine.runtime.partitions_report()}
        skipped = report[partition]["skipped"]
        assert [(s["offset"], s["actor"], s["reason"]) for s in skipped] == [
            (corrupt_at[0], f"local:{operator()}", "a test producer wrote garbage")]
        views = engine.runtime.views
        before = {p: list(views[p].dump()) for p in views}
    # A rebuild from offset 0 takes the same skip and writes the same bytes.
    rebuilt = tmp_path / "rebuilt"
    log = EventLog(kafka, topic_prefix)
    try:
        rebuild(log, rebuilt, workers=1)
    finally:
        log.close()
    for p, dump in before.items():
        view = PartitionView(rebuilt / f"p{p}", log.topic, p)
        try:
            assert list(view.dump()) == dump
        finally:
            view.close()


def _id_for(engine: Engine, workflow: str, key: str) -> str:
    import uuid

    from engine.runtime import ID_NAMESPACE

    return uuid.uuid5(ID_NAMESPACE, f"{workflow}\x00{key}").hex


# -- 6. user step names cannot reach the engine's keys -----------------------------------


@pytest.mark.parametrize("case", ["hash", "bracket"])
async def test_step_names_with_the_engines_key_syntax_are_refused(engine: Engine,
                                                                  case: str) -> None:
    eid = (await engine.env.NAMES.trigger({"case": case}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == "failed"
    assert done.error is not None and "reserved for the engine" in done.error.message
    assert done.steps == []  # nothing ran under a key it could share


# -- 8. log lines inside a step survive a replay -----------------------------------------


async def test_log_lines_are_kept_in_order_across_a_replay(engine: Engine) -> None:
    eid = (await engine.env.LOGS.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == "completed"
    assert [entry.message for entry in done.logs] == ["1", "2", "3", "4"]


# -- 10. hung sync steps do not take everyone's threads ----------------------------------


async def test_hung_sync_steps_starve_nobody_and_stop_does_not_wait_for_them(
        kafka: str, topic_prefix: str, state_dir: Path, effects: Counter[str],
        release: threading.Event) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow=BINDINGS)
    engine = Engine(hardening_worker(effects, release), config)
    await engine.start()
    try:
        hung = [(await engine.env.HANG.trigger({}))["execution_id"] for _ in range(32)]
        await asyncio.sleep(0.2)  # the pool's 32 threads are all hung before the other 8 come
        hung += [(await engine.env.HANG.trigger({}))["execution_id"] for _ in range(8)]
        for eid in hung:
            assert (await wait_for_status(engine, eid)).output == "timed out"
        assert effects["hang"] == 40  # all 40 started, though 32 threads were "the pool"
        started = time.monotonic()
        eid = (await engine.env.QUICK.trigger({}))["execution_id"]
        assert (await wait_for_status(engine, eid, timeout_s=10)).status.value == "completed"
        assert time.monotonic() - started < 5
    finally:
        started = time.monotonic()
        await engine.stop()
        assert time.monotonic() - started < 5  # the 40 abandoned threads hold nothing


# -- 13. deep JSON -------------------------------------------------------------------------


async def test_deeply_nested_payloads_are_refused_where_they_enter(
        engine: Engine, client: httpx.AsyncClient) -> None:
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    response = await client.post("/__ploy/api/trigger/UNTYPED", json={"input": deep})
    assert response.status_code == 422 and "levels deep" in response.text
    assert await engine.runtime.list_executions() == []
    eid = (await engine.env.DEEP_STEP.trigger({}))["execution_id"]
    done = await wait_for_status(engine, eid)
    assert done.status.value == "failed"
    assert "levels deep" in done.steps[0].attempts[0].error.message  # type: ignore[union-attr]
    assert (await client.get(f"/__ploy/api/executions/{eid}")).status_code == 200
    shallow: Any = 1
    for _ in range(90):
        shallow = [shallow]
    eid = (await engine.env.UNTYPED.trigger(shallow))["execution_id"]
    assert (await wait_for_status(engine, eid)).status.value == "completed"
    assert (await client.get(f"/__ploy/api/executions/{eid}")).status_code == 200


# -- 7. a rebalance neither re-claims kept partitions nor fences moved ones' steps -------


async def test_a_worker_joining_reruns_no_step_kept_or_moved(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    runs: Counter[str] = Counter()
    app = ploy()

    @app.workflow("long")
    async def long(ctx: Any) -> Any:
        async def work() -> str:
            runs[ctx.execution_id] += 1
            await asyncio.sleep(5)
            return "done"

        await ctx.step.run("work", work)
        return await ctx.step.run("after", lambda: "after")

    worker = app.build()
    configs = [engine_config(kafka, topic_prefix, tmp_path / name, workflow={"LONG": "long"})
               for name in ("a", "b")]
    async with running_engine(worker, configs[0], scale_out=True) as a:
        deadline = time.monotonic() + 30
        while len(a.runtime.owned) < 6:
            assert time.monotonic() < deadline, a.runtime.owned
            await asyncio.sleep(0.05)
        before = dict(a.runtime.epochs)
        ids = [(await a.env.LONG.trigger({}))["execution_id"] for _ in range(18)]
        while sum(runs.values()) < len(ids):  # every step is in flight
            await asyncio.sleep(0.05)
        async with running_engine(worker, configs[1], scale_out=True) as b:
            done = [await wait_for_status(b, eid, timeout_s=60) for eid in ids]
            moved = b.runtime.owned
            kept = a.runtime.owned
            assert moved and kept and not moved & kept, (moved, kept)
            assert {p: a.runtime.epochs[p] for p in kept} == {p: before[p] for p in kept}
            for p in kept:
                claim = a.runtime.views[p].claim()
                assert claim is not None and claim["fenced"] == 0
            for p in moved:  # taken over after the old owner released it: nothing fenced
                claim = b.runtime.views[p].claim()
                assert claim is not None and claim["worker"] == b.runtime.worker_id
                assert claim["fenced"] == 0, claim
    assert {d.status.value for d in done} == {"completed"}
    assert runs == Counter({eid: 1 for eid in ids})  # no step ran twice, kept or moved
