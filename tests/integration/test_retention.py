"""Retention of the view (engine.retention) on the real broker: finished executions
leave list and status, ``ploy history`` still reads them from the log, running ones
stay, and a rebuild with the same retention is byte-identical."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import ploy
from engine.app import serving_api
from engine.cli import main
from engine.log import EventLog
from engine.rebuild import rebuild
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView

RETENTION_MS = 1000


def worker() -> Any:
    app = ploy()

    @app.workflow("quick")
    async def quick(ctx: Any) -> int:
        return int(await ctx.step.run("one", lambda: ctx.input["n"]))

    @app.workflow("slow")
    async def slow(ctx: Any) -> str:
        await ctx.step.run("before", lambda: 1)
        await ctx.step.sleep("1h")
        return "never here"

    return app.build()


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dump(path: Path, topic: str) -> list[tuple[bytes, bytes]]:
    view = PartitionView(path, topic, 0)
    try:
        return list(view.dump())
    finally:
        view.close()


async def test_finished_executions_leave_the_view_and_the_log_keeps_them(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, partitions=1,
                           workflow={"QUICK": "quick", "SLOW": "slow"}, retention_ms=RETENTION_MS)
    async with running_engine(worker(), config) as engine, serving_api(engine) as url, \
            httpx.AsyncClient(base_url=f"{url}/__ploy/api") as client:
        old = [(await engine.env.QUICK.trigger({"n": n}))["execution_id"] for n in range(3)]
        sleeping = (await engine.env.SLOW.trigger({}))["execution_id"]
        for eid in old:
            await wait_for_status(engine, eid, "completed")
        await wait_for_status(engine, sleeping, "sleeping")
        await asyncio.sleep(RETENTION_MS / 1000 + 0.3)
        # Any later event on the partition removes what ended more than 1 s before it.
        new = (await engine.env.QUICK.trigger({"n": 9}))["execution_id"]
        await wait_for_status(engine, new, "completed")

        listed = {e["execution_id"] for e in (await client.get("/executions")).json()[
            "executions"]}
        assert listed == {new, sleeping}  # the sleeping one is 1.3 s old, and stays
        for eid in old:
            assert await engine.runtime.get_execution(eid) is None
            assert (await client.get(f"/executions/{eid}")).status_code == 404
            code, _, err = await ploy_cli(capsys, "status", eid, "--url", url)
            assert code == 2 and "no execution" in err
        # ... but their history comes from the log, every event with its offset.
        code, out, err = await ploy_cli(capsys, "history", old[0], "--url", url, "--json")
        assert code == 0, err
        events = json.loads(out)["events"]
        assert [e["type"] for e in events] == ["WorkflowTriggered", "WorkflowStarted",
                                               "StepStarted", "StepCompleted",
                                               "WorkflowCompleted"]
        assert json.loads(events[-1]["body"]["output"]) == 0
        code, out, err = await ploy_cli(capsys, "history", old[1], "--url", url)
        assert code == 0 and "WorkflowCompleted" in out, err
        # Its idempotency key again: the same (removed) execution, nothing runs again.
        keyed = (await engine.env.QUICK.trigger({"n": 5}, idempotency_key="k"))["execution_id"]
        await wait_for_status(engine, keyed, "completed")
        await asyncio.sleep(RETENTION_MS / 1000 + 0.3)
        await wait_for_status(engine, (await engine.env.QUICK.trigger({"n": 6}))[
            "execution_id"], "completed")
        assert await engine.runtime.get_execution(keyed) is None
        again = await engine.env.QUICK.trigger({"n": 5}, idempotency_key="k")
        assert again["execution_id"] == keyed
        await asyncio.sleep(0.5)
        assert await engine.runtime.get_execution(keyed) is None
        history = await engine.runtime.history(keyed) or []
        assert [e.type for e in history].count("StepStarted") == 1  # it did not run again
        answer = await client.get("/executions/never-was/history")
        assert answer.status_code == 404

        # As of a point, the log is folded anew (without retention): they are there.
        at = await client.get("/as-of", params={"at": "999999", "id": old[2]})
        assert at.status_code == 200 and at.json()["execution"]["output"] == 2

    topic = f"{topic_prefix}.events"
    log = EventLog(kafka, topic_prefix, 1)
    try:
        rebuild(log, tmp_path / "same", workers=1, retention_ms=RETENTION_MS)
        rebuild(log, tmp_path / "none", workers=1)
    finally:
        log.close()
    live = dump(state_dir / topic / "p0", topic)
    assert dump(tmp_path / "same" / "p0", topic) == live
    assert dump(tmp_path / "none" / "p0", topic) != live  # retention changes the view
