"""Sinks follow partition ownership: each event goes out once per cluster, across a kill -9.

A lifecycle (topic) sink and a webhook sink on several workers of one group,
on the real broker, with a local receiver on 127.0.0.1: every lifecycle
event of every execution is on the outbound topic once (counted by
CloudEvents id) and reaches the receiver, once except a request in flight
when a worker dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from connectors.cloudevents import lifecycle_type
from connectors.lifecycle import LifecycleSink
from connectors.positions import SinkPositions
from connectors.tail import EventTail, Position
from connectors.testing import read_topic, running_connectors
from connectors.webhooks import CONCURRENCY, EVENT_ID_HEADER, WebhookSink
from engine import ploy
from engine.events import Event, PartitionClaimed, WorkflowTriggered
from engine.log import EventLog
from engine.testing import engine_config, running_engine, wait_for_status

HERE = Path(__file__).parent
SECRET = "whsec-ownership"

WORKER = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from engine import ploy

    OUT = Path(os.environ["SIDE_EFFECTS"])
    app = ploy()

    @app.workflow("work")
    async def work(ctx):
        def step(name):
            def body():
                time.sleep(0.02)
                with OUT.open("a") as f:
                    f.write(f"{ctx.execution_id} {name} {os.getpid()}\\n")
                return name
            return body
        await ctx.step.run("one", step("one"))
        await ctx.step.sleep(200)
        await ctx.step.run("two", step("two"))
        ctx.log("done", {"n": ctx.input["n"]})
        return await ctx.step.run("three", step("three"))

    worker = app.build()
''')


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 204 and counts event ids."""

    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event_id = self.headers.get(EVENT_ID_HEADER, "")
                assert json.loads(body)["id"] == event_id
                with receiver.lock:
                    receiver.ids[event_id] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self) -> Counter[str]:
        with self.lock:
            return Counter(self.ids)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    yield got
    got.server.shutdown()
    got.server.server_close()


def lifecycle_ids(kafka: str, prefix: str) -> dict[str, list[str]]:
    """The ids of the events a sink must publish (not fenced, not internal), by execution."""
    log = EventLog(kafka, prefix)
    tail = EventTail(log, "test-expected", Position({}, {}))
    by_execution: dict[str, list[str]] = {}
    try:
        deadline = time.monotonic() + 30
        while not tail.caught_up():
            assert time.monotonic() < deadline, "the events topic was not read to its end"
            for record in tail.poll(0.2):
                if not record.fenced and lifecycle_type(record.event) is not None:
                    by_execution.setdefault(record.event.execution_id, []).append(
                        record.event.event_id)
    finally:
        tail.close()
        log.close()
    return by_execution


def claimants(kafka: str, prefix: str) -> dict[int, str]:
    """The worker of each partition's latest claim on the log."""
    log = EventLog(kafka, prefix)
    tail = EventTail(log, "test-claims", Position({}, {}))
    latest: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 30
        while not tail.caught_up():
            assert time.monotonic() < deadline, "the events topic was not read to its end"
            for record in tail.poll(0.2):
                if isinstance(record.event.body, PartitionClaimed):
                    latest[record.partition] = record.event.body.worker
    finally:
        tail.close()
        log.close()
    return latest


def published(kafka: str, topic: str) -> list[dict[str, Any]]:
    return [json.loads(r.value or b"") for r in read_topic(kafka, topic)]


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def completed(events: list[dict[str, Any]]) -> set[str]:
    return {e["subject"] for e in events if e["type"] == "dev.ploy.workflow.completed"}


# -- three worker processes, one killed -----------------------------------------------------------


def test_three_workers_publish_each_event_once_across_a_worker_kill(
    kafka: str, topic_prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    outbound = f"{topic_prefix}.lifecycle"
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text(textwrap.dedent(f"""\
        kind: worker
        workflow:
          WORK: work
        sinks:
          - {{kind: topic, topic: {outbound}}}
          - {{kind: webhook, url: "{receiver.url}", secret: {SECRET}}}
        """))
    effects = tmp_path / "effects.log"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "PLOY_TOPIC_PREFIX": topic_prefix,
           "PLOY_GROUP_ID": f"{topic_prefix}.workers", "SIDE_EFFECTS": str(effects),
           "PYTHONPATH": str(HERE.parent.parent)}

    def spawn(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(HERE / "workerproc.py"), str(app), "--scale-out"],
            env={**env, "PLOY_STATE_DIR": str(tmp_path / f"state-{name}")})

    ids = [f"exec-{n:03d}" for n in range(150)]

    def trigger() -> None:  # a steady stream, so that the kill lands while sinks publish
        log = EventLog(kafka, topic_prefix)
        for n, eid in enumerate(ids):
            log.append_nowait(Event(eid, "work", int(time.time() * 1000),
                                    WorkflowTriggered(json.dumps({"n": n}))))
            if n % 10 == 9:
                log.flush()
                time.sleep(0.4)
        log.flush()
        log.close()

    def pids() -> set[str]:
        lines = effects.read_text().splitlines() if effects.exists() else []
        return {line.rsplit(" ", 1)[1] for line in lines}

    workers = {name: spawn(name) for name in ("w1", "w2", "w3")}
    triggering = threading.Thread(target=trigger)
    try:
        wait_until(lambda: len(set(claimants(kafka, topic_prefix).values())) == 3, 90,
                   "the three workers to claim partitions")
        triggering.start()
        wait_until(lambda: len(pids()) == 3, 60, "every worker to run steps")
        time.sleep(0.5)
        assert triggering.is_alive()  # the kill lands mid-way: executions still come
        workers["w2"].send_signal(signal.SIGKILL)
        workers["w2"].wait()
        triggering.join()
        wait_until(lambda: completed(published(kafka, outbound)) >= set(ids), 120,
                   "every execution completed on the outbound topic")
        expected = lifecycle_ids(kafka, topic_prefix)
        every = {i for eid in ids for i in expected[eid]}
        wait_until(lambda: set(receiver.received()) >= every, 60,
                   "the receiver got every event")
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    out = published(kafka, outbound)
    counts = Counter(e["id"] for e in out)
    assert set(counts) == every  # every lifecycle event, nothing else
    assert [i for i, n in counts.items() if n > 1] == []  # each exactly once
    for eid in ids:  # in the order of the log for each execution
        assert [e["id"] for e in out if e["subject"] == eid] == expected[eid]
    got = receiver.received()
    assert set(got) == every
    repeated = {i: n for i, n in got.items() if n > 1}
    # Only requests in flight on the killed worker may have gone twice.
    assert len(repeated) <= CONCURRENCY and all(n == 2 for n in repeated.values()), repeated


# -- two engines in one process ------------------------------------------------------------------


def work_worker() -> Any:
    app = ploy()

    @app.workflow("work")
    async def work(ctx: Any) -> Any:
        a = await ctx.step.run("a", lambda: 1)
        await ctx.step.sleep("30ms")
        return a + await ctx.step.run("b", lambda: 2)

    return app.build()


async def test_two_scaled_out_engines_publish_each_event_once(
    kafka: str, topic_prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    outbound = f"{topic_prefix}.lifecycle"
    sinks = [{"kind": "topic", "topic": outbound},
             {"kind": "webhook", "url": receiver.url, "secret": SECRET}]
    worker = work_worker()
    one = engine_config(kafka, topic_prefix, tmp_path / "one", workflow={"W": "work"},
                        sinks=sinks)
    two = engine_config(kafka, topic_prefix, tmp_path / "two", workflow={"W": "work"},
                        sinks=sinks)
    async with running_engine(worker, one, scale_out=True) as a, \
            running_engine(worker, two, scale_out=True) as b:
        deadline = time.monotonic() + 30
        while len(a.runtime.owned | b.runtime.owned) < 6 or a.runtime.owned & b.runtime.owned:
            assert time.monotonic() < deadline, (a.runtime.owned, b.runtime.owned)
            await asyncio.sleep(0.1)
        ids = [(await a.env.W.trigger({}))["execution_id"] for _ in range(30)]
        deadline = time.monotonic() + 60
        while not completed(await asyncio.to_thread(published, kafka, outbound)) >= set(ids):
            assert time.monotonic() < deadline, "not every execution completed"
            await asyncio.sleep(0.2)
        expected = await asyncio.to_thread(lifecycle_ids, kafka, topic_prefix)
        every = {i for eid in ids for i in expected[eid]}
        deadline = time.monotonic() + 30
        while not (set(receiver.received()) >= every and {e["id"] for e in await asyncio.to_thread(
                published, kafka, outbound)} >= every):
            assert time.monotonic() < deadline, "not every event went out"
            await asyncio.sleep(0.2)
        topic_sinks = [s for e in (a, b) for s in e.connectors.sinks  # type: ignore[union-attr]
                       if isinstance(s, LifecycleSink)]
        assert all(s.published > 0 for s in topic_sinks)  # both owners published
        assert {s.dead_lettered for s in topic_sinks} == {0}
    counts = Counter(e["id"] for e in published(kafka, outbound))
    assert set(counts) == every and set(counts.values()) == {1}
    got = receiver.received()
    assert set(got) == every and set(got.values()) == {1}


# -- a publisher killed between publishing and committing ----------------------------------------


async def test_what_a_publisher_put_out_before_it_committed_goes_out_once(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that publishes and delivers but never gets to commit (as if killed right
    after every acknowledgement): the next publisher finds what is out and goes on."""
    outbound = f"{topic_prefix}.lifecycle"
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"W": "work"}, sinks=[
        {"kind": "topic", "topic": outbound},
        {"kind": "webhook", "url": receiver.url, "secret": SECRET}])
    worker = work_worker()
    with monkeypatch.context() as patched:
        patched.setattr(SinkPositions, "commit", lambda self, partition, mark: None)
        async with running_engine(worker, config) as engine:
            async with running_connectors(engine) as connectors:
                ids = [(await engine.env.W.trigger({}))["execution_id"] for _ in range(12)]
                for eid in ids:
                    await wait_for_status(engine, eid)
                expected = await asyncio.to_thread(lifecycle_ids, kafka, topic_prefix)
                every = {i for eid in ids for i in expected[eid]}
                deadline = time.monotonic() + 30
                while not (set(receiver.received()) >= every and len(
                        await asyncio.to_thread(read_topic, kafka, outbound)) >= len(every)):
                    assert time.monotonic() < deadline, "not every event went out"
                    await asyncio.sleep(0.2)
                hook = next(s for s in connectors.sinks if isinstance(s, WebhookSink))
                while hook.pending:  # every delivery recorded on the journal
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
    # Nothing was committed, and the local copy of the positions is gone too: the
    # next publisher starts at offset 0 of every partition.
    for mirror in (state_dir / f"{topic_prefix}.connectors").glob("*.json"):
        mirror.unlink()
    async with running_engine(worker, config) as engine:
        async with running_connectors(engine) as connectors:
            more = (await engine.env.W.trigger({}))["execution_id"]
            await wait_for_status(engine, more)
            expected = await asyncio.to_thread(lifecycle_ids, kafka, topic_prefix)
            every |= set(expected[more])
            deadline = time.monotonic() + 30
            while not (set(receiver.received()) >= every and len(
                    await asyncio.to_thread(read_topic, kafka, outbound)) >= len(every)):
                assert time.monotonic() < deadline, "the new execution did not go out"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # time enough for any repeat to show
    counts = Counter(e["id"] for e in published(kafka, outbound))
    assert set(counts) == every and set(counts.values()) == {1}
    got = receiver.received()
    assert set(got) == every and set(got.values()) == {1}
