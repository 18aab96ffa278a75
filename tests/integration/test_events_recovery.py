"""Kill -9 the worker while 100 executions wait for events; send the events while it is
down; restart: every execution receives its own event, once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from engine.app import Engine, load_app
from engine.codec import default_codec
from engine.events import Event, EventSent, WaitStarted, WorkflowCompleted, WorkflowTriggered
from engine.log import EventLog
from engine.models import ExecutionStatus
from engine.testing import wait_for_status
from tests.integration.test_recovery import start_worker

WORKER = textwrap.dedent('''
    from engine import ploy

    app = ploy()

    @app.workflow("order")
    async def order(ctx):
        await ctx.step.run("reserve", lambda: ctx.input["order_id"])
        event = await ctx.step.wait_for_event(
            "payment", type="payment.settled", match={"order_id": ctx.input["order_id"]})
        return {"paid": event.data["amount"], "id": event.id}

    worker = app.build()
''')


def count(log: EventLog, kind: type) -> int:
    codec, found = default_codec(), 0
    for batch in log.read_until_end(dict.fromkeys(range(log.partitions), 0)):
        for records in batch.values():
            found += sum(isinstance(codec.decode(v).body, kind) for _, v in records)
    return found


def wait_for(log: EventLog, kind: type, n: int, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while count(log, kind) < n:
        assert child.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"fewer than {n} {kind.__name__} after 60 s"
        time.sleep(0.2)


def test_sigkill_while_100_executions_wait_then_events_while_down_are_all_delivered(
    kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text("kind: worker\nworkflow:\n  ORDER: order\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "PLOY_TOPIC_PREFIX": topic_prefix,
           "PLOY_STATE_DIR": str(state_dir), "PYTHONPATH": str(Path(__file__).parents[2])}
    log = EventLog(kafka, topic_prefix)
    ids = [f"order-{i}" for i in range(100)]
    now = int(time.time() * 1000)
    for eid in ids:
        log.append_sync(Event(eid, "order", now, WorkflowTriggered(json.dumps({"order_id": eid}))))

    child = start_worker(app, env)
    try:
        wait_for(log, WaitStarted, 100, child)
        child.send_signal(signal.SIGKILL)
        child.wait()
        # While it is down: each event once to every partition (as send_event does), half
        # of them twice.
        for i, eid in enumerate(ids):
            body = EventSent(f"pay-{eid}", "payment.settled", "test", now,
                             json.dumps({"order_id": eid, "amount": i}))
            for _ in range(1 + i % 2):
                for p in range(log.partitions):
                    log.append_sync(Event(f"event-pay-{eid}", "", int(time.time() * 1000),
                                          body), partition=p)
        child = start_worker(app, env)  # same state dir: catches up and delivers
        wait_for(log, WorkflowCompleted, 100, child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        log.close()
        if child.poll() is None:
            child.kill()

    async def check() -> None:
        worker, config = load_app(app, env=env)
        async with Engine(worker, config) as engine:
            for i, eid in enumerate(ids):
                done = await wait_for_status(engine, eid, timeout_s=60)
                assert done is not None and done.status is ExecutionStatus.COMPLETED, done
                assert done.output == {"paid": i, "id": f"pay-{eid}"}
                history = await engine.history(eid)
                assert history is not None
                assert len([e for e in history if e.type == "EventSent"]) == 1

    asyncio.run(check())
