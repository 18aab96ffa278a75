"""``ploy replay-check``: new code against recorded histories, nothing appended."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from engine.app import load_app
from engine.cli import main
from engine.log import EventLog
from engine.testing import engine_config, running_engine, wait_for_status

V1 = """
    from engine import NonRetryableError, ploy

    app = ploy()


    def boom():
        raise NonRetryableError("no")


    @app.workflow("flow")
    async def flow(ctx):
        a = await ctx.step.run("a", lambda: {"n": ctx.input["n"]})
        if ctx.input["n"] == 2:
            await ctx.step.run("explode", boom)
        if ctx.input["n"] == 3:
            await ctx.step.sleep("1h")
        b = await ctx.step.run("b", lambda: a["n"] + 1)
        c, d = await ctx.step.parallel("fan", [lambda: 1, lambda: 2])
        return b + c + d


    worker = app.build()
"""
SAME_STEPS = V1.replace('lambda: a["n"] + 1', 'lambda: a["n"] + 100')  # bodies may change
RENAMED = V1.replace('"b", lambda', '"b2", lambda')
READS_OTHERWISE = V1.replace("return b + c + d", 'return b["total"] + c + d')


def app(tmp_path: Path, name: str, code: str, kafka: str, prefix: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "worker.py").write_text(textwrap.dedent(code))
    (directory / "ploy.yaml").write_text(
        f"kind: worker\nmain: worker.py\nworkflow: {{FLOW: flow}}\n"
        f"kafka: {{bootstrap_servers: '{kafka}', topic_prefix: {prefix}, partitions: 2}}\n")
    return directory


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_replay_check_reports_the_first_divergent_step(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    v1 = app(tmp_path, "v1", V1, kafka, topic_prefix)
    worker, _ = load_app(v1)
    config = engine_config(kafka, topic_prefix, state_dir, partitions=2,
                           workflow={"FLOW": "flow"})
    async with running_engine(worker, config) as engine:
        ids = {n: (await engine.env.FLOW.trigger({"n": n}))["execution_id"] for n in range(5)}
        for n, eid in ids.items():
            await wait_for_status(engine, eid, {2: "failed", 3: "sleeping"}.get(n, "completed"))
        events = sum(view.next_offset for view in engine.runtime.views.values())

    code, out, err = await ploy_cli(capsys, "replay-check", "--worker", str(v1))
    assert (code, out) == (0, "replayed 5 executions: 5 ok, 0 diverged, 0 failed\n"), err
    same = app(tmp_path, "same", SAME_STEPS, kafka, topic_prefix)
    assert (await ploy_cli(capsys, "replay-check", "--worker", str(same)))[0] == 0

    renamed = app(tmp_path, "renamed", RENAMED, kafka, topic_prefix)
    code, out, _ = await ploy_cli(capsys, "replay-check", "--worker", str(renamed))
    assert code == 1
    lines = out.splitlines()
    assert lines[-1] == "replayed 5 executions: 2 ok, 3 diverged, 0 failed"  # failed, sleeping: ok
    assert sorted(lines[:-1]) == sorted(
        f"DIVERGED {ids[n]} (flow, completed) at step 2: recorded 'b', new code 'b2'"
        for n in (0, 1, 4))

    reads = app(tmp_path, "reads", READS_OTHERWISE, kafka, topic_prefix)
    code, out, _ = await ploy_cli(capsys, "replay-check", "--worker", str(reads), "--json",
                            "--workflow", "FLOW", "--limit", "4")
    verdicts = json.loads(out)
    assert code == 1 and len(verdicts) == 4  # the 4 newest
    assert {v["outcome"] for v in verdicts if v["status"] != "completed"} == {"ok"}
    for v in verdicts:
        if v["status"] == "completed":
            assert v["outcome"] == "failed" and v["error"].startswith("TypeError:")

    log_events = 0
    log = EventLog(kafka, topic_prefix, 2)
    try:
        for batch in log.read_until_end({0: 0, 1: 0}):
            log_events += sum(len(r) for r in batch.values())
    finally:
        log.close()
    assert log_events == events  # nothing was appended

    # In CI, without Kafka: the histories from an export.
    exported = tmp_path / "histories"
    assert (await ploy_cli(capsys, "export", "--out", str(exported), "--dir", str(v1)))[0] == 0
    offline = app(tmp_path, "offline", RENAMED, "127.0.0.1:1", topic_prefix)  # no broker there
    code, out, err = await ploy_cli(capsys, "replay-check", "--worker", str(offline),
                                    "--histories", str(exported))
    assert code == 1, err
    assert out.splitlines()[-1] == "replayed 5 executions: 2 ok, 3 diverged, 0 failed"


OUTPUT_CHANGED = V1.replace("return b + c + d", "return b + c + d + 1")  # same steps


async def test_outputs_and_a_shadow_consumer_on_the_live_log(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    v1 = app(tmp_path, "v1", V1, kafka, topic_prefix)
    worker, _ = load_app(v1)
    config = engine_config(kafka, topic_prefix, state_dir, partitions=2,
                           workflow={"FLOW": "flow"})
    changed = app(tmp_path, "changed", OUTPUT_CHANGED, kafka, topic_prefix)
    renamed = app(tmp_path, "renamed", RENAMED, kafka, topic_prefix)
    async with running_engine(worker, config) as engine:
        first = (await engine.env.FLOW.trigger({"n": 1}))["execution_id"]
        await wait_for_status(engine, first, "completed")
        # Same steps, another output: only --outputs tells.
        assert (await ploy_cli(capsys, "replay-check", "--worker", str(changed)))[0] == 0
        code, out, _ = await ploy_cli(capsys, "replay-check", "--worker", str(changed),
                                      "--outputs")
        assert code == 1
        assert f"DIVERGED {first} (flow, completed): output: recorded 5, new code 6" in out

        shadow = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "replay-check", "--follow", "--worker",
             str(renamed)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        try:
            assert shadow.stdout is not None
            assert "following " in shadow.stdout.readline()
            later = (await engine.env.FLOW.trigger({"n": 4}))["execution_id"]
            await wait_for_status(engine, later, "completed")
            deadline = time.monotonic() + 30
            seen: list[str] = []
            # The history and the live log, in partition order: wait for both.
            while not all(any(eid in line for line in seen) for eid in (first, later)):
                assert time.monotonic() < deadline, "".join(seen)
                seen.append(await asyncio.to_thread(shadow.stdout.readline))
            assert any(f"DIVERGED {first} " in line for line in seen)
            assert f"DIVERGED {later} (flow, completed) at step 2: recorded 'b', new code 'b2'" \
                in "".join(seen)
        finally:
            shadow.send_signal(signal.SIGINT)
            rest = shadow.communicate(timeout=30)[0]
        assert shadow.returncode == 1, rest
        assert "stopped: 2 diverged or failed" in rest
