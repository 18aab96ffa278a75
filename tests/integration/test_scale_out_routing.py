"""Each worker folds only what it owns; any process answers for any execution.

Three worker processes share the partitions. A process that does not fold an
execution's partition asks its owner (found through the workers' cards), with
the offset of the trigger, so a query right after a trigger on another
process reads it. One worker is killed mid-way: everything completes, and no
step whose completion was acknowledged runs again.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from engine.app import Engine, load_app
from engine.testing import wait_for_status
from tests.integration.test_scale_out import (
    assert_acknowledged_steps_ran_once,
    make_app,
    spawn,
    worker_env,
)


async def _cards(reader: Engine, count: int, timeout_s: float = 60) -> dict[str, str]:
    """worker id -> API URL, once ``count`` workers own every partition between them."""
    directory = reader.runtime.directory
    assert directory is not None
    deadline = time.monotonic() + timeout_s
    while True:
        cards = {c["worker"]: c for c in directory.cards.values() if c.get("alive")}
        owners = directory.owners()
        if (len(owners) == reader.runtime.log.partitions and len(cards) == count
                and all(c.get("url") for c in cards.values())
                and len({o["worker"] for o in owners.values()}) == count):
            return {w: c["url"] for w, c in cards.items()}
        assert time.monotonic() < deadline, cards
        await asyncio.sleep(0.2)


SERVES: list[subprocess.Popen[bytes]] = []


async def _ploy_serve(app: Path, env: dict[str, str], tmp_path: Path) -> str:
    """Start `ploy serve` on a free port; its base URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    SERVES.append(subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(app), "--port", str(port)],
        env={**env, "PLOY_STATE_DIR": str(tmp_path / "serve")}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                if (await http.get(f"{url}/__ploy/api/health")).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ploy serve did not answer"
            await asyncio.sleep(0.2)


def test_three_workers_any_process_answers_right_after_trigger_and_survives_a_kill(
        kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    app = make_app(tmp_path)
    effects = tmp_path / "effects.log"
    env = worker_env(kafka, topic_prefix, effects)
    workers = {name: spawn(app, env, name) for name in ("w1", "w2", "w3")}

    async def run() -> list[Any]:
        worker, config = load_app(app, env={**env, "PLOY_STATE_DIR": str(tmp_path / "q")})
        # A query-only process: it folds nothing and asks the owners.
        async with Engine(worker, config, runs=False) as reader:
            assert reader.runtime.partitions.following == set()
            urls = list((await _cards(reader, 3)).values())
            ids: list[str] = []
            async with httpx.AsyncClient(timeout=30) as http:
                for n in range(300):
                    made = await http.post(f"{urls[n % 3]}/__ploy/api/trigger/WORK",
                                           json={"input": {"n": n}})
                    assert made.status_code == 201, made.text
                    body = made.json()
                    ids.append(body["execution_id"])
                    # Another worker, right away: it asks the owner, which answers once it
                    # has folded the trigger.
                    seen = await http.get(
                        f"{urls[(n + 1) % 3]}/__ploy/api/executions/{body['execution_id']}",
                        params={"min_offset": body["offset"]})
                    assert seen.status_code == 200, seen.text
                    assert seen.json()["workflow"] == "work"
                # `ploy serve`: routes, API and dashboard that fold nothing, asking the owners.
                serve = await _ploy_serve(app, env, tmp_path)
                try:
                    for eid in ids[:12]:
                        seen = await http.get(f"{serve}/__ploy/api/executions/{eid}")
                        assert seen.status_code == 200, seen.text
                    listed = await http.get(f"{serve}/__ploy/api/executions",
                                            params={"workflow": "work", "limit": 100})
                    assert listed.status_code == 200, listed.text
                    page = listed.json()
                    assert len(page["executions"]) == 100 and page["next"]
                    rest = await http.get(f"{serve}/__ploy/api/executions",
                                          params={"limit": 500, "before": page["next"]})
                    assert rest.status_code == 200, rest.text
                    listed_ids = [e["execution_id"] for e in page["executions"]] + [
                        e["execution_id"] for e in rest.json()["executions"]]
                    assert sorted(listed_ids) == sorted(ids)  # every partition, once each
                    dashboard = await http.get(f"{serve}/__ploy/executions/{ids[0]}")
                    assert dashboard.status_code == 200
                finally:
                    serve_proc = SERVES.pop()
                    serve_proc.send_signal(signal.SIGTERM)
                    serve_proc.wait(30)
            workers["w2"].send_signal(signal.SIGKILL)
            workers["w2"].wait()
            return [await wait_for_status(reader, eid, timeout_s=120) for eid in ids]

    try:
        done = asyncio.run(run())
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            proc.wait(30)
    assert Counter(d.status.value for d in done) == Counter({"completed": 300})
    assert_acknowledged_steps_ran_once(done, effects)
