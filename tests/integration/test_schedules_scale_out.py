"""A schedule in a scaled-out cluster: one worker fires, a new owner takes over after a kill,
and every fire time starts exactly one execution."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from engine import keys
from engine.schedules import schedule_id
from tests.integration.test_scale_out import fold_views, owners, spawn, wait_until, worker_env

WORKER = textwrap.dedent('''
    from engine import ploy

    app = ploy()

    @app.workflow("tick")
    async def tick(ctx):
        return await ctx.step.run("work", lambda: 1)

    worker = app.build()
''')


def make_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text(textwrap.dedent("""\
        kind: worker
        workflow:
          TICK: tick
        schedules:
          - {name: tick, binding: TICK, every: 1s, catchup: all, overlap: allow}
        """))
    return app


def scheduled(kafka: str, prefix: str, tmp_path: Path) -> tuple[dict[str, list[str]], dict]:
    """Fire time -> the execution ids with that key (from every partition), and the
    schedule's record, read by folding the whole log here."""
    views = fold_views(kafka, prefix, tmp_path)
    try:
        by_time: dict[str, list[str]] = {}
        record: dict = {}
        for view in views.values():
            for key, raw in view.dump():
                if key.startswith(keys.EXECUTION):
                    ex = json.loads(raw)
                    fire = (ex["idempotency_key"] or "").removeprefix("schedule:tick:")
                    by_time.setdefault(fire, []).append(ex["id"])
                elif key == keys.schedule("tick"):
                    record = json.loads(raw)
        return by_time, record
    finally:
        for view in views.values():
            view.close()


def test_every_second_for_ten_seconds_two_workers_one_killed_one_execution_per_fire_time(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    env = worker_env(kafka, topic_prefix, tmp_path / "effects")
    workers = {name: spawn(app, env, name) for name in ("w1", "w2")}
    try:
        wait_until(lambda: len(set(owners(kafka, topic_prefix, tmp_path).values()) - {""}) == 2,
                   60, "two workers to claim partitions")
        started = time.time()
        wait_until(lambda: len(scheduled(kafka, topic_prefix, tmp_path)[0]) >= 4, 30,
                   "the schedule to fire")
        partition = _partition_of(kafka, topic_prefix)
        pids = {name: str(proc.pid) for name, proc in workers.items()}

        def firing_worker() -> str | None:
            owner = owners(kafka, topic_prefix, tmp_path)[partition]
            return next((name for name, pid in pids.items() if f":{pid}:" in owner), None)

        wait_until(lambda: firing_worker() is not None, 30, "an owner of the schedule")
        owner = owners(kafka, topic_prefix, tmp_path)[partition]
        victim = firing_worker()
        assert victim is not None
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        killed_at = time.time()
        # The survivor takes the schedule's partition over and catches up what was missed.
        wait_until(lambda: _covers(scheduled(kafka, topic_prefix, tmp_path)[0],
                                   started + 10, killed_at + 2), 60, "ten seconds of firings")
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            proc.wait(30)
    by_time, record = scheduled(kafka, topic_prefix, tmp_path)
    by_time.pop("", None)  # executions of no schedule: none here
    times = sorted(_second(t) for t in by_time)
    firers = _firers(kafka, topic_prefix)
    seen = (times, record, firers, owner)
    assert times == list(range(times[0], times[-1] + 1)), seen  # no fire time missed
    assert all(len(ids) == 1 for ids in by_time.values()), seen  # one execution each
    assert times[-1] - times[0] >= 10, seen
    assert record["fired"] >= len(times) and record["skipped"] == 0, seen
    assert len(set(firers)) == 2 and firers[-1] != owner, seen  # the survivor took over


def _firers(kafka: str, prefix: str) -> list[str]:
    """The worker of each ``fired`` on the log, in order."""
    from engine.codec import Codec
    from engine.events import ScheduleUpdated
    from engine.log import EventLog

    log, codec, out = EventLog(kafka, prefix), Codec(), []
    try:
        partition = log.partition_for(schedule_id("tick"))
        for batch in log.read_until_end({partition: 0}):
            for _, raw in batch.get(partition, []):
                body = codec.decode(raw).body
                if isinstance(body, ScheduleUpdated) and body.action == "fired":
                    out.append(body.actor)
    finally:
        log.close()
    return out


def _partition_of(kafka: str, prefix: str) -> int:
    from engine.log import EventLog

    log = EventLog(kafka, prefix)
    try:
        return log.partition_for(schedule_id("tick"))
    finally:
        log.close()


def _second(iso_time: str) -> int:
    return int(datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp())


def _covers(by_time: dict[str, list[str]], until: float, after_kill: float) -> bool:
    times = {_second(t) for t in by_time if t}
    return bool(times) and max(times) >= max(until, after_kill)


async def test_any_worker_answers_and_pauses_a_schedule_another_one_fires(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    import asyncio

    import httpx

    from engine import ploy
    from engine.http import create_app
    from engine.testing import engine_config, running_engine

    app = ploy()

    @app.workflow("tick")
    async def tick(ctx: object) -> int:
        return 1

    worker = app.build()
    schedules = [{"name": "tick", "binding": "TICK", "every_ms": 1000}]
    one, two = (engine_config(kafka, topic_prefix, tmp_path / name, workflow={"TICK": "tick"},
                              schedules=schedules) for name in ("one", "two"))
    async with running_engine(worker, one, scale_out=True) as a, \
            running_engine(worker, two, scale_out=True) as b:
        partition = a.runtime.log.partition_for(schedule_id("tick"))
        while partition not in a.runtime.owned | b.runtime.owned \
                or not a.runtime.owned or not b.runtime.owned:
            await asyncio.sleep(0.1)
        owner, other = (a, b) if partition in a.runtime.owned else (b, a)
        await asyncio.sleep(2.5)
        here, there = await owner.runtime.schedules.states(), await other.runtime.schedules.states()
        assert here[0]["fired"] >= 1 and there[0]["fired"] >= here[0]["fired"]  # asked the owner
        transport = httpx.ASGITransport(app=create_app(other))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            paused = await http.post("/__ploy/api/schedules/tick/pause",
                                     json={"reason": "quiet"})
        assert paused.status_code == 200 and paused.json()["paused"] is True
        await asyncio.sleep(1.2)  # the owner looks again within a second
        before = (await owner.runtime.schedules.state("tick"))["fired"]
        await asyncio.sleep(2)
        after = await owner.runtime.schedules.state("tick")
        await dashboard_of_the_other(create_app(other))
    assert after["paused"] and after["fired"] == before
    assert after["recent"][-1]["reason"] == "quiet"


async def dashboard_of_the_other(app: Any) -> None:
    """The Schedules page of a process that does not own the schedule's partition reads it
    from the owner (paused by the API above), and its Resume form acts on it there."""
    import re

    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        page = (await http.get("/__ploy/schedules")).text
        assert 'data-paused="true"' in page and "quiet" in page
        assert 'data-testid="schedule-execution"' in page  # the executions it started, linked
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert token is not None
        resumed = await http.post("/__ploy/schedules/tick/resume",
                                  data={"csrf": token.group(1), "reason": "loud"},
                                  headers={"Origin": "http://127.0.0.1"})
        assert resumed.status_code == 303
        page = (await http.get(resumed.headers["location"])).text
        assert 'data-paused="false"' in page and "Resumed" in page
