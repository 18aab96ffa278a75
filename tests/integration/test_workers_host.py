"""Several ``ploy worker`` processes in one directory: each takes its own state slot.

The view is a cache of the log, one RocksDB per partition, open in one process
only. A second worker started where the first runs used to die of RocksDB's
LOCK error and then of a second error while shutting down ("Producer has been
closed"). Now each takes the first free ``<state_dir>/workers/<n>``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.app import Engine, StateSlot
from engine.errors import StateLockedError
from engine.testing import engine_config
from tests.integration.test_scale_out import (
    make_app,
    owners,
    quick_worker,
    wait_until,
    worker_env,
)


def ploy_worker(app: Path, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """``ploy worker APP`` as a user starts it, stdout and stderr to files."""
    with (out.with_suffix(".out")).open("wb") as stdout, \
            (out.with_suffix(".err")).open("wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", str(app)],
                                env=env, stdout=stdout, stderr=stderr)


def test_two_workers_in_one_directory_each_take_a_slot_and_both_run(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    app = make_app(tmp_path)
    env = {**worker_env(kafka, topic_prefix, tmp_path / "effects.log"),
           "PLOY_STATE_DIR": str(app / ".ploy")}
    procs = [ploy_worker(app, env, tmp_path / name) for name in ("w1", "w2")]
    try:
        wait_until(lambda: len(set(owners(kafka, topic_prefix, tmp_path).values()) - {""})
                   == 2, 60, "both workers to claim partitions")
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    outs = [(tmp_path / f"{n}.out").read_text() for n in ("w1", "w2")]
    errs = [(tmp_path / f"{n}.err").read_text() for n in ("w1", "w2")]
    assert codes == [0, 0], errs
    assert not [e for e in errs if "Traceback" in e], errs
    states = sorted(line.split()[-1] for out in outs for line in out.splitlines()
                    if line.strip().startswith("state "))
    assert states == [str(app / ".ploy" / "workers" / "0"), str(app / ".ploy" / "workers" / "1")]


def test_a_slot_is_free_again_once_its_holder_is_gone(tmp_path: Path) -> None:
    first = StateSlot.take(tmp_path)
    second = StateSlot.take(tmp_path)
    assert (first.path.name, second.path.name) == ("0", "1")
    first.release()
    third = StateSlot.take(tmp_path)  # the first free slot wins: a restart finds warm state
    assert third.path.name == "0"
    # A holder that dies (SIGKILL: no cleanup runs) leaves no lock behind.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from engine.app import StateSlot; "
        "StateSlot.take(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"),
        str(tmp_path / "other")], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    taken = StateSlot.take(tmp_path / "other")
    assert taken.path.name == "0"
    for slot in (second, third, taken):
        slot.release()


async def test_a_failed_start_raises_one_clear_error_and_stop_stays_quiet(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Two single workers on one state dir (``ploy dev`` twice): the second gets one
    StateLockedError naming the view; stopping it afterwards raises nothing."""
    config = engine_config(kafka, topic_prefix, tmp_path / "state", workflow={"Q": "quick"})
    worker = quick_worker()
    async with Engine(worker, config):
        second = Engine(worker, config)
        started = time.monotonic()
        with pytest.raises(StateLockedError, match="in use by a running worker"):
            await second.start()
        assert time.monotonic() - started < 15
        await second.stop()  # the CLI's exit stack stops it again: nothing more happens
        await second.stop()
