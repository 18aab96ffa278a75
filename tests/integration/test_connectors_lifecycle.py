"""Lifecycle sink on a real broker: a plain consumer sees every event, in order, across a kill -9.

Run as a script (``python test_connectors_lifecycle.py APP``) this module is the
worker process that the test kills: an engine with its connectors, until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from connectors.cloudevents import CONTENT_TYPE, lifecycle_type
from connectors.kafka import make_producer
from connectors.tail import EventTail, Position, TailRecord
from connectors.testing import read_topic, running_connectors
from engine import ploy
from engine.codec import default_codec
from engine.events import Event, WorkflowLog, WorkflowTriggered
from engine.log import EventLog
from engine.testing import engine_config, running_engine, wait_for_status

HERE = Path(__file__).parent

WORKER = textwrap.dedent('''
    import os, time
    from engine import ploy

    app = ploy()

    @app.workflow("steps")
    async def steps(ctx):
        total = 0
        for i in range(4):
            def body(i=i):
                time.sleep(ctx.input["delay"])
                with open(os.environ["STEPS_FILE"], "a") as f:
                    f.write(f"{ctx.execution_id} s{i}\\n")
                return i
            total += await ctx.step.run(f"s{i}", body)
            ctx.log("step done", {"i": i})
        return {"total": total}

    worker = app.build()
''')


def log_events(kafka: str, prefix: str) -> dict[str, list[Event]]:
    """Every event of the events topic by execution, in log order."""
    log = EventLog(kafka, prefix)
    codec = default_codec()
    by_execution: dict[str, list[Event]] = defaultdict(list)
    try:
        for batch in log.read_until_end(dict.fromkeys(range(log.partitions), 0)):
            for records in batch.values():
                for _, value in records:
                    event = codec.decode(value)
                    by_execution[event.execution_id].append(event)
    finally:
        log.close()
    return by_execution


def published(kafka: str, topic: str) -> dict[str, list[dict[str, Any]]]:
    """The outbound CloudEvents by subject, in topic order, duplicates kept."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_topic(kafka, topic):
        assert record.headers["content-type"] == CONTENT_TYPE.encode()
        event = json.loads(record.value or b"")
        assert record.key == event["subject"].encode()
        by_subject[event["subject"]].append(event)
    return by_subject


def first_seen(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            out.append(event)
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def start_child(app: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The worker process; returns once its engine and connectors run."""
    ready = Path(env["READY_FILE"])
    ready.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, __file__, str(app)], env=env)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert child.poll() is None, "the worker exited at start"
        assert time.monotonic() < deadline, "the worker did not start in 30 s"
        time.sleep(0.02)
    return child


def test_outbound_topic_has_every_lifecycle_event_in_order_after_a_sigkill(
    kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path
) -> None:
    outbound = f"{topic_prefix}.lifecycle"
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text(
        f"workflow:\n  FLOW: steps\nsinks:\n  - {{kind: topic, topic: {outbound}}}\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "PLOY_TOPIC_PREFIX": topic_prefix,
           "PLOY_STATE_DIR": str(state_dir), "PYTHONPATH": str(HERE.parent.parent),
           "READY_FILE": str(tmp_path / "ready"), "STEPS_FILE": str(tmp_path / "steps")}
    steps = tmp_path / "steps"
    log = EventLog(kafka, topic_prefix)
    ids = [f"exec-{i:02d}" for i in range(20)]
    for i, eid in enumerate(ids):  # executions end 0.2 s to 2.5 s after they start
        delay = json.dumps({"delay": 0.05 + 0.03 * i})
        log.append_sync(Event(eid, "steps", int(time.time() * 1000), WorkflowTriggered(delay)))
    log.close()

    child = start_child(app, env)
    try:
        deadline = time.monotonic() + 60
        while len(lines(steps)) < 24:  # kill it part way: some executions done, not all
            assert child.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "no steps after 60 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert sum(line.endswith(" s3") for line in lines(steps)) < len(ids)
        child = start_child(app, env)
        deadline = time.monotonic() + 60
        while True:
            completed = {s for s, events in published(kafka, outbound).items()
                         if any(e["type"] == "dev.ploy.workflow.completed" for e in events)}
            if completed >= set(ids):
                break
            assert child.poll() is None, "the restarted worker exited"
            assert time.monotonic() < deadline, f"completed after 60 s: {len(completed)}"
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()

    in_log = log_events(kafka, topic_prefix)
    out = published(kafka, outbound)
    for eid in ids:
        expected = [e for e in in_log[eid] if lifecycle_type(e) is not None]
        got = first_seen(out[eid])
        assert [e["id"] for e in got] == [e.event_id for e in expected], eid
        assert [e["type"] for e in got] == [f"dev.ploy.{lifecycle_type(e)}" for e in expected]
        assert got[-1]["data"]["output"] == {"total": 6}
        assert all(e["source"] == f"ploy/{topic_prefix}" and e["specversion"] == "1.0"
                   for e in got)


async def test_workflow_and_type_filters(kafka: str, topic_prefix: str, state_dir: Path) -> None:
    app = ploy()

    @app.workflow("kept")
    async def kept(ctx: Any) -> int:
        await ctx.step.run("one", lambda: 1)
        return 1

    @app.workflow("other")
    async def other(ctx: Any) -> int:
        return 2

    outbound = f"{topic_prefix}.out"
    config = engine_config(kafka, topic_prefix, state_dir, partitions=2,
                           workflow={"KEPT": "kept", "OTHER": "other"},
                           sinks=[{"kind": "topic", "topic": outbound, "workflows": ["kept"],
                                   "types": ["dev.ploy.workflow.completed", "step.completed"]}])
    async with running_engine(app.build(), config) as engine:
        async with running_connectors(engine):
            a = (await engine.env.KEPT.trigger({}))["execution_id"]
            b = (await engine.env.OTHER.trigger({}))["execution_id"]
            await wait_for_status(engine, a)
            await wait_for_status(engine, b)
            deadline = time.monotonic() + 20
            while len(read_topic(kafka, outbound)) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    events = published(kafka, outbound)
    assert set(events) == {a}
    assert [e["type"] for e in events[a]] == ["dev.ploy.step.completed",
                                              "dev.ploy.workflow.completed"]
    step = events[a][0]["data"]
    assert (step["step"], step["output"], step["workflow"]) == ("one", 1, "kept")


def test_a_corrupt_record_stops_its_partition_with_its_offset_and_the_others_go_on(
    kafka: str, topic_prefix: str
) -> None:
    log = EventLog(kafka, topic_prefix, 2)
    try:
        ids = {log.partition_for(f"e{i}"): f"e{i}" for i in range(10)}
        for p in (0, 1):
            log.append_sync(Event(ids[p], "w", 1, WorkflowTriggered("{}")))
        producer = make_producer(log)
        producer.produce(log.topic, value=b"garbage", key=b"x", partition=0)
        assert producer.flush(10) == 0
        for p in (0, 1):
            log.append_sync(Event(ids[p], "w", 2, WorkflowLog("info", "after")))
        tail = EventTail(log, "test", Position({}, {}))
        records: list[TailRecord] = []
        deadline = time.monotonic() + 20
        while not tail.caught_up():
            assert time.monotonic() < deadline
            records += tail.poll(0.2)
        tail.close()
    finally:
        log.close()
    assert [(r.partition, r.offset) for r in records if r.partition == 0] == [(0, 0)]
    assert [(r.partition, r.offset) for r in records if r.partition == 1] == [(1, 0), (1, 1)]
    stalled = tail.stalled[0]
    assert (stalled.topic, stalled.partition, stalled.offset) == (log.topic, 0, 1)
    assert tail.position.offsets == {0: 1, 1: 2}  # saved there, the sink resumes at the record

if __name__ == "__main__":
    import logging

    from engine.app import Engine, load_app

    async def serve(directory: str) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        worker, config = load_app(directory)
        async with Engine(worker, config) as engine, running_connectors(engine):
            Path(os.environ["READY_FILE"]).touch()
            await stop.wait()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(sys.argv[1]))
