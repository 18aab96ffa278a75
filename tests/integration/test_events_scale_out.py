"""Waits, events and children with two scaled-out workers, and a partition move."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine.models import ExecutionStatus
from engine.testing import engine_config, running_engine, wait_for_status
from tests.integration.test_events import BINDINGS, events_worker


async def test_waiters_and_children_across_two_workers_survive_a_partition_move(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    worker = events_worker()
    one = engine_config(kafka, topic_prefix, tmp_path / "one", workflow=BINDINGS)
    two = engine_config(kafka, topic_prefix, tmp_path / "two", workflow=BINDINGS)
    async with running_engine(worker, two, scale_out=True) as b:
        async with running_engine(worker, one, scale_out=True) as a:
            deadline = time.monotonic() + 30
            while len(a.runtime.owned | b.runtime.owned) < 6 or not (
                    a.runtime.owned and b.runtime.owned):
                assert time.monotonic() < deadline, (a.runtime.owned, b.runtime.owned)
                await asyncio.sleep(0.1)
            orders = [f"{topic_prefix}-o{i}" for i in range(30)]
            ids = [(await a.env.ORDER.trigger({"order_id": o}))["execution_id"]
                   for o in orders]
            for eid in ids:
                deadline = time.monotonic() + 30
                while (await b.get_execution(eid)).status is not ExecutionStatus.WAITING:  # type: ignore[union-attr]
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            # Children land on both workers' partitions; the parents hear from each.
            parent = await b.env.PARENT.trigger({"kids": [{"n": i} for i in range(6)]})
            assert await b.env.PARENT.result(parent.execution_id, timeout=60) == {
                "sum": sum(i * 10 for i in range(6))}
            for order_id in orders[:10]:  # half of them while both run
                await a.send_event("payment.settled", {"order_id": order_id, "amount": 1},
                                   id=order_id)
        # a stopped: its partitions move to b, whose fold picks up the waiters.
        for order_id in orders[10:]:
            await b.send_event("payment.settled", {"order_id": order_id, "amount": 2},
                               id=order_id)
        for i, eid in enumerate(ids):
            done = await wait_for_status(b, eid, timeout_s=60)
            assert done is not None and done.status is ExecutionStatus.COMPLETED, done
            assert done.output["paid"] == (1 if i < 10 else 2)
