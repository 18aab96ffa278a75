"""``ploy view --as-of`` and ``GET /__ploy/api/as-of``: the system as the log stood then."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import ploy
from engine.app import serving_api
from engine.cli import main
from engine.testing import engine_config, running_engine, wait_for_status


def worker() -> Any:
    app = ploy()

    @app.workflow("four")
    async def four(ctx: Any) -> int:
        total = 0
        for name in ("a", "b", "c", "d"):
            total += await ctx.step.run(name, lambda: 1)
        return total

    return app.build()


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_as_of_an_offset_and_a_time(kafka: str, topic_prefix: str, state_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, partitions=3,
                           workflow={"FOUR": "four"})
    async with running_engine(worker(), config) as engine, serving_api(engine) as url:
        early = [(await engine.env.FOUR.trigger({}))["execution_id"] for _ in range(3)]
        for eid in early:
            await wait_for_status(engine, eid, "completed")
        await asyncio.sleep(0.1)
        between = datetime.fromtimestamp(time.time(), UTC).isoformat()
        await asyncio.sleep(0.1)
        late = [(await engine.env.FOUR.trigger({}))["execution_id"] for _ in range(3)]
        for eid in late:
            await wait_for_status(engine, eid, "completed")

        # As of the offset of its 2nd step completion: 2 steps done, still running.
        eid = early[0]
        history = await engine.runtime.history(eid) or []
        second = [e for e in history if e.type == "StepCompleted"][1]
        at = f"p{second.partition}:{second.offset}"
        code, out, err = await ploy_cli(capsys, "view", "--as-of", at, "status", eid,
                                        "--url", url, "--json")
        assert code == 0, err
        then = json.loads(out)
        assert then["execution"]["status"] == "running"
        assert [s["status"] for s in then["execution"]["steps"]] == ["completed", "completed"]
        assert then["history"][-1]["offset"] == second.offset
        assert len(then["history"]) == history.index(second) + 1
        code, out, err = await ploy_cli(capsys, "view", "--as-of", at, "history", eid,
                                        "--url", url)
        assert code == 0, err
        assert out.splitlines()[0] == f"as of {at}" and "StepStarted" in out
        assert "WorkflowCompleted" not in out

        # The whole system as of a time: the executions triggered later are not there.
        code, out, err = await ploy_cli(capsys, "view", "--as-of", between, "list",
                                        "--url", url, "--json")
        assert code == 0, err
        listed = {e["execution_id"]: e["status"] for e in json.loads(out)["executions"]}
        assert listed == dict.fromkeys(early, "completed")
        code, out, err = await ploy_cli(capsys, "view", "--as-of", between, "list",
                                        "--url", url)
        assert code == 0 and all(e in out for e in early) and not any(e in out for e in late)
        code, _, err = await ploy_cli(capsys, "view", "--as-of", between, "status", late[0],
                                      "--url", url)
        assert code == 2 and f"no execution '{late[0]}' as of" in err

        async with httpx.AsyncClient(base_url=f"{url}/__ploy/api") as client:
            now = await client.get("/as-of", params={"at": datetime.now(UTC).isoformat()})
            assert {e["execution_id"] for e in now.json()["executions"]} == {*early, *late}
            for bad in ({}, {"at": "yesterday"}, {"at": "120"}, {"at": "p7:1"},
                        {"at": between, "status": "napping"}):
                answer = await client.get("/as-of", params=bad)
                assert answer.status_code == 422, (bad, answer.text)
                assert "error" in answer.json()
