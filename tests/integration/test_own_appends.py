"""A process folds its own appends on their acknowledgement, not a fetch later
(``engine.partitions.Partitions.fold_acked``), and the view stays a pure function of
the log: after another writer's record the fetch folds on, in log order.

The fetch path is switched off by making the fold thread's poll find nothing
(the consumer and the broker are real; only this process stops reading them), so
whatever the view holds meanwhile came from the acknowledgements alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import ploy
from engine.events import Event, WorkflowTriggered
from engine.log import EventLog
from engine.rebuild import rebuild
from engine.testing import engine_config, running_engine
from tests.integration.test_cli_e2e import dump


def steps_worker() -> Any:
    app = ploy()

    @app.workflow("three")
    async def three(ctx: Any) -> Any:
        total = ctx.input["n"]
        for name in ("a", "b", "c"):
            total = await ctx.step.run(name, lambda v=total: v + 1)
        return total

    return app.build()


def assert_rebuild_is_identical(kafka: str, topic_prefix: str, state_dir: Path) -> None:
    """Refold the view from offset 0: the same bytes (the view is a function of the log)."""
    topic = f"{topic_prefix}.events"
    before = dump(state_dir / topic, topic)
    log = EventLog(kafka, topic_prefix)
    try:
        rebuild(log, state_dir / topic)
    finally:
        log.close()
    assert dump(state_dir / topic, topic) == before


async def test_executions_end_and_results_wake_with_no_fetch_at_all(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool]) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"THREE": "three"},
                           partitions=2)
    async with running_engine(steps_worker(), config) as engine:
        no_fetch["fetch"] = False
        handles = [await engine.env.THREE.trigger({"n": n}) for n in range(10)]
        results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
        assert results == [n + 3 for n in range(10)]
        for handle in handles:
            execution = await engine.env.THREE.get_execution(handle.execution_id)
            assert [len(s.attempts) for s in execution.steps] == [1, 1, 1]
        no_fetch["fetch"] = True  # the fetch now brings what is folded already: stepped over
        await asyncio.sleep(0.5)
        assert engine.runtime.stalled == {}
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)


async def test_after_another_writers_record_the_fetch_folds_on_in_log_order(
        kafka: str, topic_prefix: str, state_dir: Path, no_fetch: dict[str, bool]) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"THREE": "three"},
                           partitions=1)
    async with running_engine(steps_worker(), config) as engine:
        runtime = engine.runtime
        view = runtime.views[0]
        no_fetch["fetch"] = False
        other = EventLog(kafka, topic_prefix)  # another process's producer
        try:
            _, foreign = await asyncio.to_thread(other.append_sync, Event(
                "from-elsewhere", "three", 1, WorkflowTriggered('{"n": 100}')))
        finally:
            other.close()
        handle = await engine.env.THREE.trigger({"n": 1})
        await asyncio.sleep(0.3)
        # Its own trigger comes after a record this process has not read: not folded.
        assert view.next_offset == foreign
        assert view.record(handle.execution_id) is None
        no_fetch["fetch"] = True
        assert await handle.result(timeout=10) == 4
        elsewhere = await runtime.wait_for_end("from-elsewhere", 10)
        assert elsewhere is not None and elsewhere.output == 103
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)


async def test_a_failing_fold_of_acknowledgements_loses_no_notification(
        kafka: str, topic_prefix: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One partition's fold of acknowledged appends (on the event loop) fails: the
    others' are still told, and the fetch folds the failed one (nothing of it was
    written)."""
    import threading

    from engine.view import PartitionView

    apply = PartitionView.apply
    failed = []

    def flaky(self: PartitionView, records: Any) -> Any:
        if threading.current_thread().name != "ploy-fold" and self.partition == 1:
            failed.append(self.partition)
            raise OSError("disk hiccup")
        return apply(self, records)

    monkeypatch.setattr(PartitionView, "apply", flaky)
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"THREE": "three"},
                           partitions=2)
    async with running_engine(steps_worker(), config) as engine:
        handles = await asyncio.gather(*(engine.env.THREE.trigger({"n": n}) for n in range(20)))
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
        assert results == [n + 3 for n in range(20)]
        assert failed and engine.runtime.stalled == {}
    monkeypatch.setattr(PartitionView, "apply", apply)
    assert_rebuild_is_identical(kafka, topic_prefix, state_dir)


async def test_readers_of_an_offset_wake_even_when_the_runtime_fails_on_its_fold(
        kafka: str, topic_prefix: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime raising on what a fold applied (a bug) must not leave the readers of
    that offset asleep: an event sent to an ended execution is the last append on its
    partition, so no later fold would wake them; read-your-writes answers at once."""
    from engine.runtime import Runtime

    on_applied = Runtime._on_applied
    failures: list[int] = []
    armed = [False]

    def failing(self: Runtime, partition: int, applied: Any) -> None:
        if armed[0]:
            failures.append(partition)
            raise RuntimeError("injected: the runtime failed on a fold")
        on_applied(self, partition, applied)

    monkeypatch.setattr(Runtime, "_on_applied", failing)
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"THREE": "three"})
    async with running_engine(steps_worker(), config) as engine:
        done = await engine.env.THREE.trigger({"n": 1})
        assert await done.result(timeout=10) == 4
        armed[0] = True
        # The last append to that partition: nothing folded after it would wake a reader.
        await engine.runtime.send_event("nobody.waits", {"n": 1},
                                        execution_id=done.execution_id)
        started = asyncio.get_running_loop().time()
        # (before the event's fold: it comes two turns of the loop after its ack)
        assert await engine.runtime.get_execution(done.execution_id) is not None
        assert asyncio.get_running_loop().time() - started < 2  # not the 10 s read timeout
        assert failures
        armed[0] = False
        handle = await engine.env.THREE.trigger({"n": 10})
        assert await handle.result(timeout=10) == 13
