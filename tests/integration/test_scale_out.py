"""Several workers share the partitions: claims, fencing, failover, queries from anywhere."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from engine import ploy
from engine.app import Engine, load_app
from engine.events import Event, WorkflowTriggered
from engine.http import create_app
from engine.log import EventLog
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView

HERE = Path(__file__).parent


def quick_worker() -> Any:
    app = ploy()

    @app.workflow("quick")
    async def quick(ctx: Any) -> Any:
        a = await ctx.step.run("a", lambda: 1)
        await ctx.step.sleep("50ms")
        return a + await ctx.step.run("b", lambda: 2)

    return app.build()


async def test_two_workers_share_partitions_and_any_process_answers(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    worker = quick_worker()
    one = engine_config(kafka, topic_prefix, tmp_path / "one", workflow={"Q": "quick"})
    two = engine_config(kafka, topic_prefix, tmp_path / "two", workflow={"Q": "quick"})
    async with running_engine(worker, one, scale_out=True) as a, \
            running_engine(worker, two, scale_out=True) as b:
        deadline = time.monotonic() + 30
        while len(a.runtime.owned | b.runtime.owned) < 6 or a.runtime.owned & b.runtime.owned:
            assert time.monotonic() < deadline, (a.runtime.owned, b.runtime.owned)
            await asyncio.sleep(0.1)
        assert a.runtime.owned and b.runtime.owned
        ids = []
        for _ in range(30):
            eid = (await a.env.Q.trigger({}))["execution_id"]
            seen = await a.env.Q.get_execution(eid)  # read-your-writes on any partition
            assert seen is not None
            ids.append(eid)
        done = [await wait_for_status(b, eid) for eid in ids]  # b answers for a's too
        owned_by = {p: "a" for p in a.runtime.owned} | {p: "b" for p in b.runtime.owned}
        ids_of = {"a": a.runtime.worker_id, "b": b.runtime.worker_id}
        await asyncio.sleep(1.5)  # a commit round of each group member
        report = await b.runtime.partitions_report()
        transport = httpx.ASGITransport(app=create_app(b))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            api = (await http.get("/__ploy/api/workers")).json()
    assert {d.status for d in done} == {"completed"}
    assert {d.output for d in done} == {3}
    assert {owned_by[d.partition] for d in done} == {"a", "b"}  # both ran executions
    assert [r["worker"] for r in report] == [ids_of[owned_by[p]] for p in range(6)]
    assert [r["here"] for r in report] == [owned_by[p] == "b" for p in range(6)]
    # b folds only what it owns (each partition's state lives on its owner); what it
    # folds is at the end, and it reports the others' owners from their cards.
    assert [r["folded_here"] for r in report] == [r["here"] for r in report]
    assert all(r["lag"] == 0 for r in report if r["here"]), report
    assert all(r["end_offset"] is None for r in report if not r["here"]), report
    assert api["group"] == f"{topic_prefix}.workers"
    assert [r["worker"] for r in api["partitions"]] == [r["worker"] for r in report]


WORKER = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from engine import ploy

    OUT = Path(os.environ.get("SIDE_EFFECTS", os.devnull))

    def mark(line):
        with OUT.open("a") as f:
            f.write(line + "\\n")

    app = ploy()

    @app.workflow("work")
    async def work(ctx):
        eid = ctx.execution_id
        def step(name, fail_first=False):
            def body():
                time.sleep(0.03)
                mark(f"{eid} {name} {os.getpid()}")
                if fail_first and ctx.input.get("n", 0) % 3 == 0:
                    marks = OUT.read_text().count(f"{eid} {name} ")
                    if marks == 1:
                        raise RuntimeError("first attempt fails")
                return os.getpid()
            return body
        await ctx.step.run("one", step("one"), retries=3)
        await ctx.step.run("two", step("two", fail_first=True), retries=3)
        await ctx.step.sleep(int(ctx.input.get("sleep", 300)))
        return await ctx.step.run("three", step("three"), retries=3)

    @app.workflow("hold")
    async def hold(ctx):
        def slow():
            mark(f"start {ctx.execution_id} {os.getpid()}")
            time.sleep(float(ctx.input["seconds"]))
            mark(f"end {ctx.execution_id} {os.getpid()}")
            return os.getpid()
        first = await ctx.step.run("slow", slow, retries=0)
        await ctx.step.run("after", lambda: mark(f"after {ctx.execution_id} {os.getpid()}"))
        return first

    worker = app.build()
''')


def make_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text(
        "kind: worker\nworkflow:\n  WORK: work\nbackoff: {initial: 20ms}\n")
    return app


def worker_env(kafka: str, prefix: str, effects: Path) -> dict[str, str]:
    """The environment of a worker process of this test's app, group and topic."""
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "PLOY_TOPIC_PREFIX": prefix,
            "PLOY_GROUP_ID": f"{prefix}.workers", "SIDE_EFFECTS": str(effects),
            "PYTHONPATH": str(HERE.parent.parent)}


def spawn(app: Path, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "workerproc.py"), str(app), "--scale-out"],
        env={**env, "PLOY_STATE_DIR": str(app.parent / f"state-{name}")})


def fold_views(kafka: str, prefix: str, tmp_path: Path) -> dict[int, PartitionView]:
    from tests.integration.foldproc import fold_all

    return fold_all(kafka, prefix, tmp_path / f"probe-{time.monotonic_ns()}")


def owners(kafka: str, prefix: str, tmp_path: Path) -> dict[int, str]:
    """The worker of each partition's current claim, read by folding the log here."""
    views = fold_views(kafka, prefix, tmp_path)
    try:
        return {p: (v.claim() or {}).get("worker", "") for p, v in views.items()}
    finally:
        for v in views.values():
            v.close()


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_three_workers_sigkill_one_every_execution_completes_acked_steps_once(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    effects = tmp_path / "effects.log"
    env = worker_env(kafka, topic_prefix, effects)
    workers = {name: spawn(app, env, name) for name in ("w1", "w2", "w3")}
    try:
        wait_until(lambda: len(set(owners(kafka, topic_prefix, tmp_path).values()) - {""}) == 3,
                   60, "three workers to claim partitions")
        log = EventLog(kafka, topic_prefix)
        ids = [f"exec-{n:03d}" for n in range(300)]
        for n, eid in enumerate(ids):
            log.append_nowait(Event(eid, "work", int(time.time() * 1000),
                                    WorkflowTriggered(f'{{"n": {n}}}')))
        log.flush()
        log.close()
        wait_until(lambda: effects.exists() and len(effects.read_text().splitlines()) > 200,
                   60, "work to start")
        workers["w2"].send_signal(signal.SIGKILL)
        workers["w2"].wait()

        async def read_all() -> list[Any]:
            worker, config = load_app(app, env={**env, "PLOY_STATE_DIR": str(tmp_path / "q")})
            async with Engine(worker, config, runs=False, replica=True) as reader:  # queries only
                return [await wait_for_status(reader, eid, timeout_s=120) for eid in ids]

        done = asyncio.run(read_all())
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            proc.wait(30)
    assert Counter(d.status for d in done) == Counter({"completed": 300})
    assert_acknowledged_steps_ran_once(done, effects)


def assert_acknowledged_steps_ran_once(done: list[Any], effects: Path) -> None:
    """Each step whose every attempt was acknowledged ran exactly once per attempt (the
    side-effect file counts the runs); an interrupted attempt may have run, no more."""
    runs = Counter(tuple(line.split()[:2]) for line in effects.read_text().splitlines())
    for d in done:
        for step in d.steps:
            if step.kind != "step":
                continue
            ran = runs[(d.execution_id, step.key)]
            interrupted = [a for a in step.attempts if a.ended_at is None]
            if not interrupted:  # every attempt acknowledged: each ran exactly once
                assert ran == len(step.attempts), (d.execution_id, step.key, ran, step.attempts)
            else:
                assert ran <= len(step.attempts)


def test_a_frozen_worker_is_fenced_and_starts_no_step_after_it_resumes(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    effects = tmp_path / "effects.log"
    env = worker_env(kafka, topic_prefix, effects)
    workers = [spawn(app, env, "a"), spawn(app, env, "b")]
    by_pid = {str(w.pid): w for w in workers}
    try:
        wait_until(lambda: len(set(owners(kafka, topic_prefix, tmp_path).values()) - {""}) == 2,
                   60, "two workers to claim partitions")
        log = EventLog(kafka, topic_prefix)
        eid = "exec-hold"
        log.append_sync(Event(eid, "hold", int(time.time() * 1000),
                              WorkflowTriggered('{"seconds": 4}')))
        log.close()
        wait_until(lambda: effects.exists() and f"start {eid}" in effects.read_text(), 30,
                   "the step to start")
        frozen_pid = effects.read_text().split()[2]
        frozen = by_pid[frozen_pid]
        other_pid = next(pid for pid in by_pid if pid != frozen_pid)
        frozen.send_signal(signal.SIGSTOP)
        wait_until(lambda: all(w.split(":")[1] == other_pid
                               for w in owners(kafka, topic_prefix, tmp_path).values()),
                   60, "the other worker to claim every partition")
        frozen.send_signal(signal.SIGCONT)
        wait_until(lambda: f"end {eid} {frozen_pid}" in effects.read_text(), 30,
                   "the frozen worker's in-flight step to finish")

        async def read() -> Any:
            worker, config = load_app(app, env={**env, "PLOY_STATE_DIR": str(tmp_path / "q")})
            async with Engine(worker, config, runs=False, replica=True) as reader:
                result = await wait_for_status(reader, eid, timeout_s=60)
                history = await reader.runtime.history(eid) or []
                return result, [(h.offset, h.type, h.epoch, h.body.get("attempt"))
                                for h in history]

        done, history = asyncio.run(read())
        time.sleep(1.0)  # time enough for a zombie to start its next step, were it to
        lines = effects.read_text().splitlines()
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(30)
    assert done.status == "completed"
    slow, after = done.steps
    assert f"end {eid} {frozen_pid}" in lines  # the zombie's step did finish, unrecorded:
    assert slow.attempts[0].ended_at is None, history
    assert [a.ended_at is not None for a in slow.attempts[1:]] == (
        [False] * (len(slow.attempts) - 2) + [True]), history
    # The result is the owner's that ran the recorded attempt: the other worker, unless
    # the frozen one rejoined the group and was given the partition back in time.
    assert done.output in (int(other_pid), int(frozen_pid))
    # Every run of the next step is in the view: none ran fenced, as a zombie would.
    # (The frozen worker may rejoin the group and claim anew; it then runs as an owner.)
    after_runs = [line for line in lines if line.startswith(f"after {eid}")]
    assert len(after_runs) == len(after.attempts) == 1
    views = fold_views(kafka, topic_prefix, tmp_path)
    try:
        claim = views[done.partition].claim()
        assert claim is not None and claim["fenced"] >= 1  # the late completion, ignored
    finally:
        for view in views.values():
            view.close()


def test_a_worker_joining_under_load_takes_partitions_and_nothing_stalls(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    effects = tmp_path / "effects.log"
    env = worker_env(kafka, topic_prefix, effects)
    workers = [spawn(app, env, "w1"), spawn(app, env, "w2")]
    ids: list[str] = []
    try:
        wait_until(lambda: len(set(owners(kafka, topic_prefix, tmp_path).values()) - {""}) == 2,
                   60, "two workers to claim partitions")
        log = EventLog(kafka, topic_prefix)
        joined_at = None
        deadline = time.monotonic() + 60
        while joined_at is None or time.monotonic() < joined_at + 2:
            # A steady stream of executions that each sleep 1 s, until the newcomer has
            # claimed partitions and a little after.
            assert time.monotonic() < deadline, "the third worker never claimed a partition"
            eid = f"exec-{len(ids):03d}"
            log.append_sync(Event(eid, "work", int(time.time() * 1000),
                                  WorkflowTriggered(f'{{"n": {len(ids)}, "sleep": 1000}}')))
            ids.append(eid)
            if len(ids) == 30:
                workers.append(spawn(app, env, "w3"))
            if len(ids) % 20 == 0 and len(workers) == 3 and joined_at is None and str(
                    workers[2].pid) in {w.split(":")[1] for w in owners(
                        kafka, topic_prefix, tmp_path).values() if w}:
                joined_at = time.monotonic()
            time.sleep(0.03)
        log.close()

        async def read() -> tuple[list[Any], set[int]]:
            worker, config = load_app(app, env={**env, "PLOY_STATE_DIR": str(tmp_path / "q")})
            async with Engine(worker, config, runs=False, replica=True) as reader:
                done = [await wait_for_status(reader, eid, timeout_s=90) for eid in ids]
                # Claimed once, at the start, and never since: partitions that stayed put.
                kept = {p for p, v in reader.runtime.views.items()
                        if (v.claim() or {}).get("epoch") == 1}
                return [(d, await reader.runtime.history(d.execution_id)) for d in done], kept

        results, kept = asyncio.run(read())
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(30)
    assert {d.status for d, _ in results} == {"completed"}
    worst = worst_kept = 0
    for _, history in results:
        times = [h.timestamp for h in history or []]
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        worst = max(worst, gap)
        if history and history[0].partition in kept:
            worst_kept = max(worst_kept, gap)
    # No execution waited longer than its own 1 s sleep plus a rebalance (~8 s here).
    assert worst < 12_000, worst
    assert kept, "every partition moved: the newcomer took them all"
    # One whose partition stayed put was not paused by the rebalance at all (cooperative):
    # its longest gap is its 1 s sleep, plus at most 1 s.
    assert worst_kept < 2_000, worst_kept
