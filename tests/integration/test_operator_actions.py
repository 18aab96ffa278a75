"""Operator actions carry who and why: cancel over the API and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import ploy
from engine.app import serving_api
from engine.cli import main
from engine.http import create_app
from engine.skips import operator
from engine.testing import engine_config, running_engine, wait_for_status


def worker() -> Any:
    app = ploy()

    @app.workflow("nap")
    async def nap(ctx: Any) -> str:
        await ctx.step.sleep("1h")
        return "woke"

    return app.build()


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cancel_with_the_admin_token_is_by_the_token_whatever_the_client_says(
        kafka: str, topic_prefix: str, state_dir: Path) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"},
                           http={"admin_token": "s3cret"})
    async with running_engine(worker(), config) as engine:
        eid = (await engine.env.NAP.trigger({}))["execution_id"]
        await wait_for_status(engine, eid, "sleeping")
        transport = httpx.ASGITransport(app=create_app(engine, host="127.0.0.1"))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            answer = await c.post(f"/__ploy/api/executions/{eid}/cancel",
                                  json={"reason": "duplicate order", "actor": "someone-else"},
                                  headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"cancelled": True}
        execution = await wait_for_status(engine, eid, "cancelled")
        assert (execution.cancel_reason, execution.cancel_actor) == (
            "duplicate order", "admin-token")
        history = await engine.runtime.history(eid) or []
        (asked,) = [e for e in history if e.type == "CancelRequested"]
        assert asked.body == {"reason": "duplicate order", "actor": "admin-token"}


async def test_ploy_cancel_reason_on_loopback_is_by_the_local_user(
        kafka: str, topic_prefix: str, state_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, workflow={"NAP": "nap"})
    async with running_engine(worker(), config) as engine, serving_api(engine) as url:
        eid = (await engine.env.NAP.trigger({}))["execution_id"]
        await wait_for_status(engine, eid, "sleeping")
        code, out, err = await ploy_cli(capsys, "cancel", eid, "--reason", "customer asked",
                                        "--url", url)
        assert code == 0, err
        actor = f"local:{operator()}"
        assert out.strip() == f"cancelled {eid} (by {actor})"
        code, out, err = await ploy_cli(capsys, "status", eid, "--url", url)
        assert code == 0, err
        assert "reason     customer asked" in out and f"cancelled  by {actor}" in out
        code, out, _ = await ploy_cli(capsys, "history", eid, "--url", url)
        assert f'"actor": "{actor}"' in out
        execution = await engine.get_execution(eid)
        assert execution is not None and execution.cancel_actor == actor
