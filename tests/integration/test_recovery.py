"""Kill -9 the worker process mid-workflow; restart; count side effects outside the engine."""

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

from engine.app import Engine, load_app
from engine.events import Event, WorkflowTriggered
from engine.log import EventLog
from engine.models import Execution
from engine.testing import wait_for_status

HERE = Path(__file__).parent

WORKER = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from engine import ploy

    SIDE_EFFECTS = Path(os.environ.get("SIDE_EFFECTS", os.devnull))

    def mark(line):
        with SIDE_EFFECTS.open("a") as f:
            f.write(line + "\\n")
            f.flush()
            os.fsync(f.fileno())

    app = ploy()

    @app.workflow("five")
    async def five(ctx):
        results = []
        for i in range(1, 6):
            def body(i=i):
                mark(f"start s{i}")
                time.sleep(0.4)
                mark(f"end s{i}")
                return i
            results.append(await ctx.step.run(f"s{i}", body))
        return results

    worker = app.build()
''')


def start_worker(app: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE / "workerproc.py"), str(app)], env=env)


def wait_for_line(path: Path, line: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while line not in lines(path):
        assert child.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"no '{line}' after 60 s"
        time.sleep(0.02)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_mid_workflow_then_restart_runs_each_completed_step_once(
    kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "worker.py").write_text(WORKER)
    (app / "ploy.yaml").write_text("kind: worker\nworkflow:\n  FIVE: five\n")
    effects = tmp_path / "effects.log"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "PLOY_TOPIC_PREFIX": topic_prefix,
           "PLOY_STATE_DIR": str(state_dir), "SIDE_EFFECTS": str(effects),
           "PYTHONPATH": str(HERE.parent.parent)}

    log = EventLog(kafka, topic_prefix)  # a plain producer triggers it
    eid = "exec-five"
    log.append_sync(Event(eid, "five", int(time.time() * 1000), WorkflowTriggered("{}")))
    log.close()

    child = start_worker(app, env)
    try:
        wait_for_line(effects, "start s3", child)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert "end s3" not in lines(effects)
        child = start_worker(app, env)  # same state dir: catches up and resumes
        wait_for_line(effects, "end s5", child)
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0  # graceful stop
    finally:
        if child.poll() is None:
            child.kill()

    async def read() -> Execution | None:
        worker, config = load_app(app, env=env)
        async with Engine(worker, config) as engine:
            return await wait_for_status(engine, eid, timeout_s=30)

    done = asyncio.run(read())
    starts = Counter(line.split()[1] for line in lines(effects) if line.startswith("start"))
    assert done is not None and done.status == "completed", done
    assert done.output == [1, 2, 3, 4, 5]
    assert len(done.steps[2].attempts) == 2  # the killed attempt and its rerun
    assert starts["s1"] == starts["s2"] == 1  # acknowledged before the kill: never again
    assert starts["s3"] == 2  # in flight at the kill: run again
    assert starts["s4"] == starts["s5"] == 1
