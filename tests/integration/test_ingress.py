"""A burst of triggers is answered before the executions it starts run
(``engine.ingress``); a lone trigger starts its execution as it goes out, and the
execution's first step waits for the trigger's acknowledgement."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import ingress, ploy
from engine.errors import AppendError
from engine.testing import engine_config, running_engine

RAN: list[int] = []
REACHED: list[int] = []  # the handler's code before its step (replayable: it may run again)


def worker() -> Any:
    app = ploy()

    @app.workflow("bump")
    async def bump(ctx: Any) -> Any:
        REACHED.append(ctx.input["n"])
        return await ctx.step.run("bump", lambda: RAN.append(ctx.input["n"]) or ctx.input["n"] + 1)

    return app.build()


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grace no turn of the loop outlasts, so what is held is seen held (and a bound
    that a slow machine does not reach)."""
    monkeypatch.setattr(ingress, "GRACE_S", 0.5)
    monkeypatch.setattr(ingress, "MAX_HOLD_S", 60.0)
    RAN.clear()
    REACHED.clear()


async def test_a_burst_is_answered_first_then_every_execution_runs_once(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"},
                           partitions=2)
    async with running_engine(worker(), config) as engine:
        handles = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(40)))
        # Every trigger is answered. The first went out alone, and its execution started
        # at once (Ingress.lone); none of the others, which met the burst, has started yet.
        first = handles[0].execution_id
        assert set(engine.runtime.runners) <= {first} and RAN in ([], [0])
        for handle in handles[1:]:
            execution = await engine.env.BUMP.get_execution(handle.execution_id)
            assert execution is not None and execution.status == "queued"
        metrics = await engine.runtime.metrics.render(engine.runtime)
        assert "\nploy_executions_held 39\n" in metrics
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
        assert results == [n + 1 for n in range(40)]
        assert sorted(RAN) == list(range(40))  # each step once
        metrics = await engine.runtime.metrics.render(engine.runtime)
        assert "\nploy_executions_held 0\n" in metrics
        assert engine.runtime.ingress.accepting == 0 and not engine.runtime.ingress.holding


async def test_a_held_execution_cancelled_before_it_starts_never_runs(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        handles = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(20)))
        victim = handles[7].execution_id
        assert await engine.env.BUMP.cancel(victim, "changed my mind")
        ended = await asyncio.gather(*(h.result(timeout=20) for h in handles if
                                       h.execution_id != victim))
        assert len(ended) == 19
        execution = await engine.env.BUMP.get_execution(victim)
        assert execution is not None and execution.status == "cancelled"
        assert 7 not in RAN and len(RAN) == 19


async def test_a_lone_trigger_starts_its_execution_at_once(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        for n in range(3):
            handle = await engine.env.BUMP.trigger({"n": n})
            # Started with the answer, not after a grace: its runner is there already.
            assert handle.execution_id in engine.runtime.runners
            assert await handle.result(timeout=10) == n + 1


async def until(check: Any, timeout_s: float = 5.0) -> None:
    """Wait until ``check()`` holds; AssertionError if it does not within ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached in time")


def _acks_held(runtime: Any, monkeypatch: pytest.MonkeyPatch,
               refuse: bool = False) -> asyncio.Event:
    """Appends answered only once the returned event is set: acknowledged (the record
    went to the broker at once), or with ``refuse`` refused (it never went)."""
    send, gate = runtime.log.send, asyncio.Event()
    loop = asyncio.get_running_loop()

    def held(event: Any, partition: int | None = None) -> asyncio.Future[tuple[int, int]]:
        sent, answer = None if refuse else send(event, partition), loop.create_future()

        async def answer_later() -> None:
            await gate.wait()
            if sent is None:
                answer.set_exception(AppendError(runtime.log.topic, "refused (test)"))
            else:
                answer.set_result(await sent)

        asyncio.ensure_future(answer_later())
        return answer

    monkeypatch.setattr(runtime.log, "send", held)
    return gate


async def test_a_lone_triggers_execution_runs_no_step_before_the_trigger_is_acknowledged(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        gate = _acks_held(engine.runtime, monkeypatch)
        trigger = asyncio.ensure_future(engine.env.BUMP.trigger({"n": 5}))
        for _ in range(50):
            await asyncio.sleep(0.01)
        # The handler ran up to its step, which waits for the trigger's acknowledgement.
        assert REACHED == [5] and RAN == [] and not trigger.done()
        gate.set()
        handle = await trigger
        assert await handle.result(timeout=10) == 6
        assert RAN == [5]


async def test_a_lone_trigger_the_broker_refuses_leaves_no_execution(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        send = runtime.log.send
        gate = _acks_held(runtime, monkeypatch, refuse=True)
        trigger = asyncio.ensure_future(engine.env.BUMP.trigger({"n": 7}))
        await until(lambda: REACHED == [7])
        eid = next(iter(runtime.runners))
        gate.set()
        with pytest.raises(AppendError, match="refused"):
            await trigger
        await until(lambda: eid not in runtime.runners)
        # Its runner stopped at its step, which never ran; nothing was started for it,
        # and the retry a stopped run gets finds no execution to run.
        assert eid not in runtime.runners and RAN == []
        assert eid not in runtime._started_on_ack
        await asyncio.sleep(1.3)
        assert RAN == [] and eid not in runtime.runners
        # Nothing of the run was written (its start, before its step): the partition
        # folds on, and knows no such execution.
        assert runtime.stalled == {}
        assert await engine.env.BUMP.get_execution(eid) is None
        monkeypatch.setattr(runtime.log, "send", send)
        assert (await engine.env.BUMP.trigger({"n": 8})).execution_id in runtime.runners


async def test_a_burst_of_triggers_that_fail_leaves_no_burst_behind(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        send = runtime.log.send

        def refused(event: Any, partition: int | None = None) -> asyncio.Future[Any]:
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(  # every trigger of the burst in flight
                0.01, future.set_exception, AppendError(runtime.log.topic, "refused"))
            return future

        monkeypatch.setattr(runtime.log, "send", refused)
        failed = await asyncio.gather(*(engine.env.BUMP.trigger({"n": n}) for n in range(30)),
                                      return_exceptions=True)
        assert all(isinstance(f, AppendError) for f in failed)
        assert runtime.ingress.accepting == 0 and runtime.ingress.holding  # the grace runs
        await asyncio.sleep(1.0)
        assert not runtime.ingress.holding
        monkeypatch.setattr(runtime.log, "send", send)
        handle = await engine.env.BUMP.trigger({"n": 1})
        assert handle.execution_id in runtime.runners  # started on its acknowledgement
        assert await handle.result(timeout=10) == 2


async def test_a_refused_lone_trigger_whose_caller_gave_up_may_be_sent_again(
        kafka: str, topic_prefix: str, state_dir: Path, long_grace: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller stops waiting (its own timeout, say) before the broker refuses the
    trigger: sent again with the same key, the execution starts and runs."""
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"BUMP": "bump"})
    async with running_engine(worker(), config) as engine:
        runtime = engine.runtime
        send = runtime.log.send
        gate = _acks_held(runtime, monkeypatch, refuse=True)
        caller = asyncio.ensure_future(engine.env.BUMP.trigger({"n": 4}, idempotency_key="k"))
        await until(lambda: REACHED == [4])
        eid = next(iter(runtime.runners))
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        await until(lambda: eid not in runtime.runners)
        assert eid not in runtime.runners and eid not in runtime._started_on_ack
        monkeypatch.setattr(runtime.log, "send", send)
        handle = await engine.env.BUMP.trigger({"n": 4}, idempotency_key="k")
        assert handle.execution_id == eid
        assert await handle.result(timeout=10) == 5
        assert RAN == [4]
