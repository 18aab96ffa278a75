"""Issue 12, point 11: ``ploy dev`` killed with SIGKILL keeps what it acknowledged.

``ploy dev`` keeps its history across restarts in the archive of its state
directory (the embedded broker keeps its log in memory). The archive sink
fsyncs what it read within ``ARCHIVE_SYNC_S`` of reading it, and a restart
closes the files a crash left open instead of deleting them; so every event
that was in the log that long before the kill is restored. The broker dies
with ``ploy dev`` (its death signal), not left running as an orphan.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from connectors.archive import ARCHIVE_SYNC_S
from tests.integration.test_cli_e2e import SIMPLE, DevServer, http, wait_until_ended

EXECUTIONS = 50


def broker_pid(port: int) -> int:
    """The pid of the Tansu process listening on ``port`` (found by its command line)."""
    url = f"tcp://127.0.0.1:{port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"broker" in argv and url in argv:
            return int(entry.name)
    raise AssertionError(f"no broker process on port {port}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its (new) parent


def test_kill_9_of_ploy_dev_loses_no_completed_execution_and_no_broker_outlives_it(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    server = DevServer(SIMPLE, state, tmp_path / "dev1.out")
    try:
        port = int(re.search(r"kafka\s+127\.0\.0\.1:(\d+)", server.text()).group(1))  # type: ignore[union-attr]
        broker = broker_pid(port)
        ids = []
        for _ in range(EXECUTIONS):
            status, body = http(f"{server.url}/trigger")
            assert status == 200, body
            ids.append(body["execution_id"])
        before = {eid: wait_until_ended(server.url, eid) for eid in ids}
        assert {e["status"] for e in before.values()} == {"completed"}
        # The guarantee covers events older than ARCHIVE_SYNC_S; then kill ploy dev
        # alone (not its process group): the broker must go with it.
        time.sleep(ARCHIVE_SYNC_S)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        deadline = time.monotonic() + 5
        while alive(broker):
            assert time.monotonic() < deadline, f"the broker (pid {broker}) outlived ploy dev"
            time.sleep(0.05)
    finally:
        server.stop()
        if "broker" in locals() and alive(broker):
            os.kill(broker, signal.SIGKILL)

    again = DevServer(SIMPLE, state, tmp_path / "dev2.out")
    try:
        missing = []
        for eid in ids:
            status, execution = http(f"{again.url}/__ploy/api/executions/{eid}")
            if status != 200:
                missing.append(eid)
                continue
            assert execution == before[eid]
        assert not missing, f"{len(missing)} of {EXECUTIONS} executions lost:\n{again.text()}"
    finally:
        assert again.stop() == 0
