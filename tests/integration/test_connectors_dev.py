"""``ploy dev`` restarted on the same state directory gets its executions back from the archive.

Runs the real ``ploy dev`` as a subprocess, twice; each run starts its own
embedded broker, so the second one begins with an empty log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_e2e import SIMPLE, DevServer, http, wait_until_ended

WIRED = "dev_restore" in (Path(__file__).parents[2] / "engine" / "cli.py").read_text()


@pytest.mark.skipif(not WIRED, reason="engine.cli does not call connectors.dev_restore yet")
def test_ploy_dev_restart_keeps_every_execution_and_its_history(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = DevServer(SIMPLE, state, tmp_path / "dev1.out")
    try:
        ids = []
        for route in ("trigger", "trigger", "trigger-failing"):
            status, body = http(f"{server.url}/{route}")
            assert status == 200, body
            ids.append(body["execution_id"])
        before = {eid: wait_until_ended(server.url, eid) for eid in ids}
        histories = {eid: http(f"{server.url}/__ploy/api/executions/{eid}/history")[1]
                     for eid in ids}
    finally:
        assert server.stop() == 0
    assert list((state / "ploy.archive").glob("p*-*-*.avro"))

    again = DevServer(SIMPLE, state, tmp_path / "dev2.out")
    try:
        assert "restored " in again.text()
        for eid in ids:
            status, execution = http(f"{again.url}/__ploy/api/executions/{eid}")
            assert status == 200
            assert json.dumps(execution, sort_keys=True) == json.dumps(before[eid],
                                                                       sort_keys=True)
            assert http(f"{again.url}/__ploy/api/executions/{eid}/history")[1] == histories[eid]
        status, body = http(f"{again.url}/trigger")  # and it goes on from there
        assert status == 200
        assert wait_until_ended(again.url, body["execution_id"])["status"] == "completed"
    finally:
        assert again.stop() == 0
