"""A rolling restart: every worker of a group stopped with SIGTERM, then started again.

On the embedded broker (Tansu 0.6) a member that leaves its group while the
group rebalances stays the group's leader after it is gone, and the members
that join next wait for its assignment, for minutes at times. The workers
therefore leave Tansu's groups without a LeaveGroup (see ``engine.broker``):
the group drops them after ``session.timeout.ms``, a path that clears the
leader. This test stops and starts all three workers twice, since the stranded
group came on some restarts only.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_scale_out import make_app, owners, wait_until, worker_env

PARTITIONS = 6  # engine_config's default topic
CLAIMED_WITHIN_S = 15.0


def ploy_worker(app: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", str(app)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def claimed_by(kafka: str, prefix: str, tmp_path: Path, pids: set[int]) -> int:
    """How many partitions a process of ``pids`` has claimed (read from the log)."""
    return sum(1 for worker in owners(kafka, prefix, tmp_path).values()
               if worker and int(worker.split(":")[1]) in pids)


def test_every_partition_is_claimed_again_within_15_s_after_a_rolling_restart(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    env = {**worker_env(kafka, topic_prefix, tmp_path / "effects.log"),
           "PLOY_STATE_DIR": str(app / ".ploy")}
    log = tmp_path / "workers.log"
    workers = [ploy_worker(app, env, log) for _ in range(3)]
    took: list[float] = []
    try:
        pids = {w.pid for w in workers}
        wait_until(lambda: claimed_by(kafka, topic_prefix, tmp_path, pids) == PARTITIONS,
                   60, "the first three workers to claim every partition")
        for _ in range(2):
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            assert [w.wait(30) for w in workers] == [0, 0, 0], log.read_text()
            workers = [ploy_worker(app, env, log) for _ in range(3)]
            started = time.monotonic()
            pids = {w.pid for w in workers}
            while claimed_by(kafka, topic_prefix, tmp_path, pids) < PARTITIONS:
                assert time.monotonic() - started < CLAIMED_WITHIN_S, (
                    f"partitions still unclaimed {CLAIMED_WITHIN_S} s after the restart "
                    f"(restarts so far took {took} s)")
                time.sleep(0.2)
            took.append(round(time.monotonic() - started, 1))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)
    assert "Traceback" not in log.read_text()
    print(f"every partition claimed again after {took} s")
