"""A replay starts from the view, so it waits until the view holds what the last run of
that execution had acknowledged (else it would run a completed step again), and for
nothing else: other executions' appends, acknowledged ahead of the fold under load,
hold no start back.

The fold is held at a point by a record of another process's producer that this
process does not fetch (the fetch is switched off; the broker and the consumer are
real), so this process's later appends are acknowledged and not folded.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from engine import ploy
from engine.errors import AppendError
from engine.events import Event, WorkflowTriggered
from engine.log import EventLog
from engine.runtime import Runtime
from engine.testing import engine_config, running_engine


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def nap_app(ran: Counter[str], release: asyncio.Event) -> Any:
    app = ploy()

    @app.workflow("nap")
    async def nap(ctx: Any) -> None:
        async def a() -> None:
            ran[ctx.execution_id] += 1
            await release.wait()

        await ctx.step.run("a", a)
        await ctx.step.sleep("1h")

    @app.workflow("noop")
    async def noop(ctx: Any) -> None:
        return None

    return app.build()


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The executions whose start waited for the fold (``Runtime._start_when_folded``)."""
    seen: list[str] = []
    wait = Runtime._start_when_folded

    def spy(self: Runtime, eid: str, partition: int, offset: int) -> Coroutine[Any, Any, None]:
        seen.append(eid)
        return wait(self, eid, partition, offset)

    monkeypatch.setattr(Runtime, "_start_when_folded", spy)
    return seen


async def hold_the_fold(kafka: str, topic_prefix: str, no_fetch: dict[str, bool]) -> int:
    """Another process's record that this one does not read: its view stops there."""
    no_fetch["fetch"] = False
    other = EventLog(kafka, topic_prefix)
    try:
        _, offset = await asyncio.to_thread(other.append_sync, Event(
            "from-elsewhere", "noop", 1, WorkflowTriggered("{}")))
    finally:
        other.close()
    return offset


async def test_a_replay_waits_for_what_the_last_run_had_acknowledged(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool],
        deferred: list[str]) -> None:
    ran: Counter[str] = Counter()
    release = asyncio.Event()
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"},
                           partitions=1)
    async with running_engine(nap_app(ran, release), config) as engine:
        runtime, view = engine.runtime, engine.runtime.views[0]
        eid = (await engine.env.NAP.trigger({})).execution_id
        await until(lambda: ran[eid] == 1 and (view.record(eid) or {}).get("status") == "running")
        held_at = await hold_the_fold(kafka, topic_prefix, no_fetch)
        release.set()  # step a completes, the sleep is appended: both acknowledged
        await until(lambda: eid not in runtime.runners)
        assert view.next_offset == held_at  # and neither folded
        runtime._maybe_start(eid)  # noqa: SLF001 - as the fold's next event of it would
        await asyncio.sleep(0.3)
        assert eid not in runtime.runners and ran[eid] == 1
        assert deferred == [eid]
        no_fetch["fetch"] = True
        await until(lambda: (view.record(eid) or {}).get("status") == "sleeping")
        await until(lambda: eid not in runtime.runners)
        assert ran[eid] == 1  # the replay found step a completed
        steps = (await engine.env.NAP.get_execution(eid)).steps
        assert [(s.name, s.status, len(s.attempts)) for s in steps][:1] == [
            ("a", "completed", 1)]
        assert runtime._appended_to == {}  # noqa: SLF001 - nothing kept once folded


async def test_other_executions_appends_hold_no_replay_back(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool],
        deferred: list[str]) -> None:
    ran: Counter[str] = Counter()
    release = asyncio.Event()
    release.set()
    config = engine_config(kafka, topic_prefix, state_dir,
                           workflow={"NAP": "nap", "NOOP": "noop"}, partitions=1)
    async with running_engine(nap_app(ran, release), config) as engine:
        runtime, view = engine.runtime, engine.runtime.views[0]
        eid = (await engine.env.NAP.trigger({})).execution_id
        await until(lambda: (view.record(eid) or {}).get("status") == "sleeping"
                    and eid not in runtime.runners)
        held_at = await hold_the_fold(kafka, topic_prefix, no_fetch)
        others = [await engine.env.NOOP.trigger({}) for _ in range(3)]
        await until(lambda: runtime.log.high_acked.get(0, -1) > held_at)
        assert view.next_offset == held_at  # their appends: acknowledged, not folded
        runtime._maybe_start(eid)  # noqa: SLF001
        assert deferred == []
        no_fetch["fetch"] = True
        for handle in others:
            assert (await handle.result(timeout=10)) is None
        assert ran[eid] == 1
        await until(lambda: not runtime._appended_to)  # noqa: SLF001 - ends forget theirs


def parallel_app(ran: Counter[str], gate: asyncio.Event) -> Any:
    app = ploy()

    @app.workflow("par")
    async def par(ctx: Any) -> None:
        async def big() -> str:
            ran["p0"] += 1
            await gate.wait()
            return "x" * 9000  # a large output: its completion is waited for alone

        async def small() -> str:
            ran["p1"] += 1
            await gate.wait()
            return "ok"  # its completion is sent and not waited for by this branch

        await ctx.step.parallel("p", [big, small])

        def after() -> int:
            ran["after"] += 1
            return 1

        await ctx.step.run("after", after)

    @app.workflow("noop")
    async def noop(ctx: Any) -> None:
        return None

    return app.build()


async def test_a_parallel_branch_s_acknowledged_completion_holds_the_replay_back(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Branch p[0] waits for its own completion's acknowledgement; p[1]'s is acknowledged
    meanwhile, after another process's record that holds the fold. The run then stops
    (the broker refuses the next step's start once) and resumes by replay 1 s later:
    the replay waits for p[1]'s completion to be folded, and p[1] never runs again."""
    ran: Counter[str] = Counter()
    gate = asyncio.Event()
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"PAR": "par"},
                           partitions=1)
    async with running_engine(parallel_app(ran, gate), config) as engine:
        other = await asyncio.to_thread(EventLog, kafka, topic_prefix)  # (the topic exists)
        try:
            runtime, log = engine.runtime, engine.runtime.log
            view = runtime.views[0]
            loop = asyncio.get_running_loop()
            send_all = log.send_all
            state: dict[str, Any] = {"held_at": None, "refused": False}

            def acknowledged(before: int, count: int) -> None:
                """Block the loop (a busy one) until ``count`` appends after ``before``
                are acknowledged (the producer's thread marks them)."""
                deadline = time.monotonic() + 5
                while log.high_acked.get(0, -1) < before + count:
                    assert time.monotonic() < deadline, "not acknowledged"
                    time.sleep(0.001)

            def sending(items: Any) -> Any:
                steps = [(type(e.body).__name__, getattr(e.body, "step", None))
                         for e, _ in items]
                if ("StepStarted", "after") in steps and not state["refused"]:
                    state["refused"] = True  # refused once: the run stops, RETRY_LATER
                    i = steps.index(("StepStarted", "after"))
                    futures = send_all(items[:i]) if i else []
                    for _ in items[i:]:
                        failed = loop.create_future()
                        failed.set_exception(AppendError(log.topic, "refused for the test"))
                        futures.append(failed)
                    return futures
                before = log.high_acked.get(0, -1)
                futures = send_all(items)
                if ("StepCompleted", "p[0]") in steps and state["held_at"] is None:
                    acknowledged(before, len(items))
                    _, state["held_at"] = other.append_sync(Event(
                        "from-elsewhere", "noop", 1, WorkflowTriggered("{}")), partition=0)
                if ("StepCompleted", "p[1]") in steps:
                    acknowledged(before, len(items))
                return futures

            monkeypatch.setattr(log, "send_all", sending)
            no_fetch["fetch"] = False  # (its own appends are still folded on their ack)
            eid = (await engine.env.PAR.trigger({})).execution_id
            await until(lambda: ran["p0"] == 1 and ran["p1"] == 1)
            gate.set()
            await until(lambda: state["refused"] and eid not in runtime.runners)
            assert view.next_offset == state["held_at"]  # p[1]'s completion: not folded
            assert log.high_acked[0] > state["held_at"]
            await asyncio.sleep(2.0)  # the replay is due after 1 s
            assert ran["p1"] == 1 and eid not in runtime.runners
            no_fetch["fetch"] = True
            await until(lambda: (view.record(eid) or {}).get("status") == "completed")
            assert (ran["p0"], ran["p1"]) == (1, 1)
        finally:
            await asyncio.to_thread(other.close)


async def test_a_wait_for_the_fold_that_times_out_leaves_no_waiter(
        kafka: str, topic_prefix: str, state_dir: Path) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"},
                           partitions=1)
    async with running_engine(nap_app(Counter(), asyncio.Event()), config) as engine:
        partitions = engine.runtime.partitions
        ahead = engine.runtime.views[0].next_offset + 100
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await partitions.folded(0, ahead, timeout_s=0.05)
        assert partitions._waiters[0] == []  # noqa: SLF001
