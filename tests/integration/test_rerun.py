"""``ploy rerun``: a new execution replays its source up to a step and runs the rest anew."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from engine import NonRetryableError, ploy
from engine.app import serving_api
from engine.cli import main
from engine.testing import engine_config, running_engine, wait_for_status

STEPS = ("s1", "s2", "s3", "s4", "s5")


class Fleet:
    """A worker whose step s3 is broken until fixed; each step body counts its runs in a
    file (a side effect outside the engine)."""

    def __init__(self, counters: Path):
        self.counters, self.broken = counters, True
        counters.mkdir()
        app = ploy()

        @app.workflow("five")
        async def five(ctx: Any) -> list[str]:
            n = ctx.input["n"]
            return [await ctx.step.run(name, lambda name=name: self.body(name, n))
                    for name in STEPS]

        self.worker = app.build()

    def body(self, name: str, n: int) -> str:
        with (self.counters / f"{name}-{n}").open("a") as f:
            f.write("x")
        if name == "s3" and self.broken:
            raise NonRetryableError("s3 is broken")
        return f"{name}:{n}"

    def runs(self, name: str) -> int:
        return sum(p.stat().st_size for p in self.counters.glob(f"{name}-*"))


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def config(kafka: str, prefix: str, state_dir: Path) -> Any:
    return engine_config(kafka, prefix, state_dir, partitions=3, workflow={"FIVE": "five"})


async def test_rerun_from_the_third_of_five_steps_after_a_fix(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(tmp_path / "counters")
    async with (running_engine(fleet.worker, config(kafka, topic_prefix, state_dir)) as engine,
                serving_api(engine) as url):
        source = (await engine.env.FIVE.trigger({"n": 1}))["execution_id"]
        assert (await wait_for_status(engine, source)).status == "failed"
        code, _, err = await ploy_cli(capsys, "rerun", source, "--from-step", "s9", "--url", url)
        assert code == 2 and "never started a step 's9'" in err

        fleet.broken = False  # the fix is deployed
        code, out, err = await ploy_cli(capsys, "rerun", source, "--from-step", "s3",
                                        "--url", url, "--json")
        assert code == 0, err
        (made,) = json.loads(out)["reruns"]
        rerun = await wait_for_status(engine, made["execution_id"])
        assert rerun.status == "completed", rerun.error
        assert rerun.output == [f"{s}:1" for s in STEPS]
        assert [fleet.runs(s) for s in STEPS] == [1, 1, 2, 1, 1]  # s1, s2 did not run again

        before = await engine.get_execution(source)
        assert before is not None and before.status == "failed"  # the source is untouched
        history = await engine.runtime.history(source) or []
        cut = next(e.offset for e in history if e.type == "StepStarted" and e.body["step"] == "s3")
        assert (rerun.rerun_of, rerun.rerun_offset) == (source, cut) == (
            made["source"], made["rerun_offset"])
        assert before.reruns == [rerun.execution_id]
        replayed = await engine.runtime.history(rerun.execution_id) or []
        assert replayed[0].type == "WorkflowTriggered"
        assert replayed[0].body["rerun_of"] == source
        assert [e.body["step"] for e in replayed if e.type == "StepCompleted"] == list(STEPS)
        code, out, _ = await ploy_cli(capsys, "status", source, "--url", url)
        assert f"reruns     {rerun.execution_id}" in out
        code, out, _ = await ploy_cli(capsys, "rerun", rerun.execution_id, "--url", url)
        assert code == 0 and "from (after its last step)" in out  # a completed one: all replayed


async def test_bulk_rerun_of_100_failed_executions_with_a_dry_run_first(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(tmp_path / "counters")
    async with (running_engine(fleet.worker, config(kafka, topic_prefix, state_dir)) as engine,
                serving_api(engine) as url):
        old = (await engine.env.FIVE.trigger({"n": -1}))["execution_id"]
        await wait_for_status(engine, old)
        await asyncio.sleep(0.05)
        since = str(int(time.time() * 1000))
        sources = [(await engine.env.FIVE.trigger({"n": n}))["execution_id"] for n in range(100)]
        for eid in sources:
            assert (await wait_for_status(engine, eid)).status == "failed"
        selection = ("--workflow", "FIVE", "--status", "failed", "--since", since, "--url", url)

        code, out, err = await ploy_cli(capsys, "rerun", *selection, "--dry-run")
        assert code == 0, err
        assert out.count("would rerun ") == 101 and out.endswith("would rerun 100 executions\n")
        assert old not in out
        assert len(await engine.list_executions(limit=500)) == 101  # nothing was started

        fleet.broken = False
        code, out, err = await ploy_cli(capsys, "rerun", *selection, "--json")
        assert code == 0, err
        reruns = json.loads(out)["reruns"]
        assert sorted(r["source"] for r in reruns) == sorted(sources)
        for made in reruns:
            assert (await wait_for_status(engine, made["execution_id"])).status == "completed"
        assert [fleet.runs(s) for s in STEPS] == [101, 101, 201, 100, 100]
        failed = await engine.list_executions(status="failed", limit=500)
        assert len(failed) == 101  # the sources are still failed
