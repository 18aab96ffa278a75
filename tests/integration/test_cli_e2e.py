"""The ``ploy`` command end to end, as a user runs it.

``ploy dev examples/workflow-simple`` runs as a subprocess with its own embedded
broker (the real user path); the client commands talk to it over HTTP.
``ploy rebuild`` refolds a topic of the session's broker into a byte-identical
view. ``ploy types`` needs no broker: tests/unit/test_typegen.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.app import load_app
from engine.cli import main
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView

ROOT = Path(__file__).resolve().parents[2]
SIMPLE = ROOT / "examples" / "workflow-simple"
ORDER_FLOW = ROOT / "examples" / "order-flow"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


# -- helpers ----------------------------------------------------------------------------


def http(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def ploy(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def wait_until_ended(base: str, eid: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, execution = http(f"{base}/__ploy/api/executions/{eid}")
        if status == 200 and execution["status"] in ("completed", "failed", "cancelled"):
            return execution  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"{eid} still {execution} after {timeout_s} s"
        time.sleep(0.05)


class DevServer:
    """``ploy dev DIR --port 0`` in a subprocess; its URL is read from what it prints."""

    def __init__(self, directory: Path, state_dir: Path, output: Path, command: str = "dev",
                 **env_vars: str):
        env = {k: v for k, v in os.environ.items()
               if k != "KAFKA_BOOTSTRAP_SERVERS" and not k.startswith("PLOY_")}
        env["PLOY_STATE_DIR"] = str(state_dir)
        env.update(env_vars)
        self.output = output
        self._out = output.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", command, str(directory), "--port", "0"],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=directory,
        )
        self.url = self._wait_for_url()

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.text()
            if "press Ctrl-C to stop" in text or "SIGTERM stops" in text:
                match = re.search(r"app\s+(http://\S+?)/\n", text)
                assert match, text
                return match.group(1)
            if self.process.poll() is not None:
                pytest.fail(f"ploy dev exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.process.kill()
        pytest.fail(f"ploy dev printed no URL in {START_TIMEOUT_S} s:\n{self.text()}")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    tmp = tmp_path_factory.mktemp("ploy-dev")
    server = DevServer(SIMPLE, tmp / "state", tmp / "dev.out")
    try:
        yield server
    finally:
        server.stop()


# -- ploy dev + the client commands ------------------------------------------------------


def test_dev_prints_its_urls_and_broker(dev: DevServer) -> None:
    text = dev.text()
    assert f"dashboard  {dev.url}/__ploy/" in text
    assert f"api        {dev.url}/__ploy/api/" in text
    assert re.search(r"kafka\s+127\.0\.0\.1:\d+ \(embedded broker", text), text
    assert dev.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise


def test_trigger_routes_and_read_back(dev: DevServer, capsys: pytest.CaptureFixture[str]) -> None:
    status, ok = http(f"{dev.url}/trigger")
    assert status == 200, ok
    status, bad = http(f"{dev.url}/trigger-failing")
    assert status == 200, bad
    ok_id, bad_id = ok["execution_id"], bad["execution_id"]

    completed = wait_until_ended(dev.url, ok_id)
    failed = wait_until_ended(dev.url, bad_id)
    assert completed["status"] == "completed"
    assert failed["status"] == "failed"

    # ploy status --json is the API's Execution JSON.
    code, out, err = ploy(capsys, "status", ok_id, "--json", "--url", dev.url)
    assert code == 0, err
    execution = json.loads(out)
    assert execution == completed
    assert [s["key"] for s in execution["steps"]] == ["validate", "charge_payment",
                                                      "send_receipt"]
    assert all(s["status"] == "completed" for s in execution["steps"])
    assert execution["output"]["payment_id"] == "pay_order-123"

    code, out, err = ploy(capsys, "status", bad_id, "--json", "--url", dev.url)
    assert code == 0, err
    execution = json.loads(out)
    assert execution["status"] == "failed"
    charge = {s["key"]: s for s in execution["steps"]}["charge_payment"]
    assert charge["status"] == "failed"
    assert [a["attempt"] for a in charge["attempts"]] == [1, 2, 3, 4]  # retries: 3
    assert all("declined" in a["error"]["message"] for a in charge["attempts"])
    assert "send_receipt" not in {s["key"] for s in execution["steps"]}
    assert "charge_payment" in execution["error"]["message"]

    # The readable summary.
    code, out, _ = ploy(capsys, "status", bad_id, "--url", dev.url)
    assert code == 0
    assert "status     failed" in out
    assert re.search(r"charge_payment\s+failed\s+4", out), out
    assert "attempt 4" in out

    # The audit trail: every event with partition, offset, time, type and body.
    code, out, _ = ploy(capsys, "history", bad_id, "--url", dev.url)
    assert code == 0
    lines = out.strip().splitlines()
    assert all(re.match(r"p\d+@\d+  \d{4}-\d\d-\d\dT[\d:.]+Z  \w+", line) for line in lines)
    types = [line.split()[2] for line in lines]
    assert types[0] == "WorkflowTriggered"
    assert types.count("StepFailed") == 4
    assert types[-1] == "WorkflowFailed"
    status, history = http(f"{dev.url}/__ploy/api/executions/{bad_id}/history")
    assert status == 200
    assert [e["type"] for e in history["events"]] == types
    offsets = [e["offset"] for e in history["events"]]
    assert offsets == sorted(offsets)

    # The table, and its filters.
    code, out, _ = ploy(capsys, "list", "--url", dev.url)
    assert code == 0
    assert out.splitlines()[0].split() == ["EXECUTION", "WORKFLOW", "STATUS", "CREATED",
                                           "DURATION"]
    assert ok_id in out and bad_id in out
    code, out, _ = ploy(capsys, "list", "--status", "failed", "--url", dev.url)
    assert bad_id in out and ok_id not in out

    # The user's own status route.
    status, body = http(f"{dev.url}/status/{ok_id}")
    assert status == 200
    assert body["execution"]["status"] == "completed"


def test_trigger_and_cancel_from_the_cli(dev: DevServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ploy(capsys, "trigger", "SIMPLE_FLOW", "--url", dev.url,
                          "--input", '{"order_id": "cli-1", "amount": 5}',
                          "--idempotency-key", "cli-1")
    assert code == 0, err
    eid = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", eid)
    assert wait_until_ended(dev.url, eid)["input"]["order_id"] == "cli-1"
    # Same key, same execution.
    code, out, _ = ploy(capsys, "trigger", "SIMPLE_FLOW", "--url", dev.url,
                        "--input", '{"order_id": "cli-1", "amount": 5}',
                        "--idempotency-key", "cli-1")
    assert (code, out.strip()) == (0, eid)

    code, out, err = ploy(capsys, "cancel", eid, "--url", dev.url)
    assert (code, out.strip(), err) == (0, f"{eid} already finished (completed)", "")

    code, _, err = ploy(capsys, "cancel", "no-such-id", "--url", dev.url)
    assert code == 2
    assert err.strip() == f"ploy: error: no execution 'no-such-id' at {dev.url}"
    code, _, err = ploy(capsys, "status", "no-such-id", "--url", dev.url)
    assert code == 2 and "no execution 'no-such-id'" in err
    code, _, err = ploy(capsys, "history", "no-such-id", "--url", dev.url)
    assert code == 2 and "no execution 'no-such-id'" in err

    code, _, err = ploy(capsys, "trigger", "NOPE", "--url", dev.url)
    assert code == 2
    assert err.startswith("ploy: error: unknown binding 'NOPE'")
    code, _, err = ploy(capsys, "trigger", "SIMPLE_FLOW", "--url", dev.url,
                        "--input", '{"order_id": 1}')
    assert code == 2
    assert err.startswith("ploy: error: invalid input:") and "amount" in err
    assert len(err.strip().splitlines()) == 1


def test_dev_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    server = DevServer(SIMPLE, tmp_path / "state", tmp_path / "dev.out")
    status, _ = http(f"{server.url}/__ploy/api/health")
    assert status == 200
    assert server.stop() == 0
    text = server.text()
    assert "ploy dev: stopped" in text
    assert "Traceback" not in text
    broker_port = re.search(r"kafka\s+127\.0\.0\.1:(\d+)", text)
    assert broker_port is not None
    with pytest.raises(OSError):  # the embedded broker is gone too
        socket.create_connection(("127.0.0.1", int(broker_port.group(1))), timeout=1).close()

    # A second run on the same state dir meets an empty broker: the old view goes.
    again = DevServer(SIMPLE, tmp_path / "state", tmp_path / "dev2.out")
    try:
        assert "cleared the view at" in again.text()
    finally:
        assert again.stop() == 0


def test_order_flow_example(tmp_path: Path) -> None:
    server = DevServer(ORDER_FLOW, tmp_path / "state", tmp_path / "dev.out")
    try:
        order = {"user_id": "u1", "items": [{"product_id": "sku-1", "quantity": 2,
                                             "price": 9.5}]}
        status, created = http(f"{server.url}/orders", "POST", order)
        assert status == 200, created
        eid = created["execution_id"]
        deadline = time.monotonic() + 30
        while True:  # the 24 h sleep: the order waits, durably, after its confirmation
            status, body = http(f"{server.url}/orders/{eid}/status")
            if body["status"] == "sleeping":
                break
            assert body["status"] in ("queued", "running"), body
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, execution = http(f"{server.url}/__ploy/api/executions/{eid}")
        steps = execution["steps"]
        assert [s["key"] for s in steps[:5]] == [
            "check-inventory", "reserve-inventory", "payment-attempt-0", "create-shipment",
            "send-confirmation"]
        assert [s["kind"] for s in steps[5:]] == ["sleep"]
        assert execution["logs"][0]["message"] == "Starting order processing"
    finally:
        assert server.stop() == 0


def test_worker_on_configured_kafka_stops_on_sigterm(
        kafka: str, topic_prefix: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    server = DevServer(SIMPLE, tmp_path / "state", tmp_path / "worker.out", "worker",
                       KAFKA_BOOTSTRAP_SERVERS=kafka, PLOY_TOPIC_PREFIX=topic_prefix)
    try:
        assert f"kafka      {kafka} (configured)" in server.text()
        code, out, err = ploy(capsys, "trigger", "SIMPLE_FLOW", "--url", server.url,
                              "--input", '{"order_id": "w1", "amount": 3}')
        assert code == 0, err
        assert wait_until_ended(server.url, out.strip())["status"] == "completed"
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert "ploy worker: stopped" in server.text()


# -- ploy rebuild ----------------------------------------------------------------------------


def dump(state_path: Path, topic: str) -> dict[str, list[tuple[bytes, bytes]]]:
    views = {}
    for db in sorted(state_path.iterdir()):
        view = PartitionView(db, topic, int(db.name[1:]))
        try:
            views[db.name] = list(view.dump())
        finally:
            view.close()
    return views


async def test_rebuild_gives_a_byte_identical_view(
        kafka: str, topic_prefix: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    worker, _ = load_app(SIMPLE)
    config = engine_config(kafka, topic_prefix, state_dir,
                           workflow={"SIMPLE_FLOW": {"name": "simple_workflow", "retries": 2}},
                           backoff={"initial_ms": 10, "max_ms": 20})
    for var, value in (("KAFKA_BOOTSTRAP_SERVERS", kafka), ("PLOY_TOPIC_PREFIX", topic_prefix),
                       ("PLOY_STATE_DIR", str(state_dir))):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("PLOY_PARTITIONS", raising=False)
    async with running_engine(worker, config) as engine:
        ids = [(await engine.env.SIMPLE_FLOW.trigger(
            {"order_id": f"o{i}", "amount": 1 + i, "card": "0000" if i % 3 == 0 else "4242"}
        ))["execution_id"] for i in range(12)]
        for eid in ids:
            await wait_for_status(engine, eid)
        # A running worker holds the view: rebuild refuses and deletes nothing.
        code, _, err = ploy(capsys, "rebuild", str(SIMPLE))
        assert code == 2
        assert "in use by a running worker" in err and len(err.strip().splitlines()) == 1
        events = sum(engine.runtime.views[p].next_offset for p in engine.runtime.views)

    topic = f"{topic_prefix}.events"
    state_path = state_dir / topic
    before = dump(state_path, topic)
    assert sum(len(v) for v in before.values()) > 0

    code, out, err = ploy(capsys, "rebuild", str(SIMPLE))
    assert code == 0, err
    assert re.fullmatch(rf"rebuilt {events} events in [\d.]+ s \([\d,]+ events/s\)\n", out), out
    assert dump(state_path, topic) == before
