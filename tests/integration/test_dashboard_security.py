"""The dashboard's actions and pages against hostile requests and hostile text (no browser).

Forms write only with this process's CSRF token and from the same site; a
cross-site POST without the bearer is refused and appends nothing. Text from
executions (inputs, errors, logs, step names) reaches every page escaped, the
generated trigger form included, and each page runs only its own script.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from engine import Engine
from engine.http import create_app
from engine.testing import engine_config, running_engine, unique_prefix, wait_for_status
from tests.integration.test_dashboard_operator import HOSTILE, worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORIGIN = "http://127.0.0.1:8787"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    config = engine_config(kafka, unique_prefix("dash-security"), tmp_path_factory.mktemp("s"),
                           workflow={"ORDER": "order", "OVERNIGHT": "overnight",
                                     "HOSTILE": "hostile"},
                           # Yearly: it never fires during the tests, only shows and is acted on.
                           schedules=[{"name": "yearly", "binding": "OVERNIGHT",
                                       "cron": "0 0 1 1 *", "input": {"html": HOSTILE}}],
                           backoff={"initial_ms": 10})
    async with running_engine(worker, config) as eng:
        yield eng


@asynccontextmanager
async def client_for(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found is not None, "the page has no CSRF field"
    return found.group(1)


async def sleeping(engine: Engine) -> str:
    eid: str = (await engine.env.OVERNIGHT.trigger({}))["execution_id"]
    await wait_for_status(engine, eid, "sleeping")
    return eid


async def test_a_cross_site_or_tokenless_form_post_is_refused(engine: Engine) -> None:
    eid = await sleeping(engine)
    cancel = f"/__ploy/executions/{eid}/cancel"
    async with client_for(create_app(engine)) as c:
        token = csrf_of((await c.get(f"/__ploy/executions/{eid}")).text)
        form = {"csrf": token, "reason": "from evil"}
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            refused = await c.post(cancel, data=form, headers=headers)
            assert refused.status_code == 403, headers
            assert "cross-site" in refused.json()["error"]
        for bad in ({"reason": "no token"}, {"csrf": "0" * 64, "reason": "forged token"}):
            refused = await c.post(cancel, data=bad, headers={"Origin": ORIGIN})
            assert refused.status_code == 403, bad
            assert "CSRF" in refused.json()["error"]
        trigger = await c.post("/__ploy/workflows/ORDER/trigger",
                               data={"f.customer": "x", "f.quantity": "1"},
                               headers={"Origin": ORIGIN})
        assert trigger.status_code == 403
        for path in (f"/__ploy/executions/{eid}/rerun", f"/__ploy/executions/{eid}/send-event",
                     f"/__ploy/executions/{eid}/complete-step",
                     f"/__ploy/executions/{eid}/retry-now",
                     "/__ploy/events", "/__ploy/schedules/yearly/pause",
                     "/__ploy/schedules/yearly/resume",
                     "/__ploy/schedules/yearly/trigger"):  # every form route: no token, no write
            for headers in ({"Origin": ORIGIN}, {"Origin": "https://evil.example"}):
                refused = await c.post(path, data={"type": "x"}, headers=headers)
                assert refused.status_code == 403, (path, headers)
        assert (await engine.get_execution(eid)).status.value == "sleeping"  # type: ignore[union-attr]
        assert await engine.list_executions(workflow="order") == []
        yearly = await engine.runtime.schedules.state("yearly")
        assert not yearly["paused"] and yearly["started"] == []  # neither paused nor triggered
        assert [r["action"] for r in yearly["recent"]] == ["registered"]

        done = await c.post(cancel, data=form, headers={"Origin": ORIGIN})
        assert done.status_code == 303
    assert (await wait_for_status(engine, eid, "cancelled")).cancel_reason == "from evil"


async def test_with_an_admin_token_a_form_needs_the_login_cookie_and_its_csrf(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    http = engine.config.http.model_copy(update={"admin_token": "s3cret"})
    monkeypatch.setattr(engine, "config", engine.config.model_copy(update={"http": http}))
    eid = await sleeping(engine)
    cancel = f"/__ploy/executions/{eid}/cancel"
    async with client_for(create_app(engine, host="0.0.0.0")) as c:  # noqa: S104
        assert (await c.post(cancel, data={"reason": "x"})).status_code == 403  # no CSRF
        login = await c.get(f"/__ploy/executions/{eid}?token=s3cret")
        assert login.status_code == 303
        token = csrf_of((await c.get(f"/__ploy/executions/{eid}")).text)
        # The token is bound to the session: without the cookie it is worth nothing.
        async with client_for(create_app(engine, host="0.0.0.0")) as stranger:  # noqa: S104
            refused = await stranger.post(cancel, data={"csrf": token, "reason": "x"})
            assert refused.status_code == 403
        done = await c.post(cancel, data={"csrf": token, "reason": "ops"},
                            headers={"Origin": ORIGIN})
        assert done.status_code == 303
    await wait_for_status(engine, eid, "cancelled")


def assert_escaped(html: str, where: str) -> None:
    assert "<img src=x" not in html and "<script>window.__pwned" not in html, where
    assert "&lt;img src=x onerror=" in html, f"{where}: the hostile text is not shown"
    # One data block and the page's own script, which carries this response's nonce.
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert len(scripts) == 2, (where, scripts)
    assert scripts[0] == '<script type="application/json" id="ploy-page">'
    assert re.fullmatch(r'<script nonce="[A-Za-z0-9_-]+">', scripts[1]), (where, scripts)


async def test_hostile_text_is_escaped_on_every_page_and_only_the_own_script_runs(
        engine: Engine) -> None:
    eid = (await engine.env.HOSTILE.trigger({"html": HOSTILE}))["execution_id"]
    await wait_for_status(engine, eid, "failed")
    async with client_for(create_app(engine)) as c:
        detail = await c.get(f"/__ploy/executions/{eid}")
        csp = detail.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce is not None and "script-src 'nonce-" in csp and "unsafe-inline" not in \
            csp.split("script-src")[1].split(";")[0]
        assert f'<script nonce="{nonce.group(1)}">' in detail.text
        assert_escaped(detail.text, "execution page")
        assert detail.text.count("&lt;img src=x onerror=") >= 4  # input, step, error, log
        assert_escaped((await c.get(f"/__ploy/?error={HOSTILE[:12]}")).text, "list")

        token = csrf_of((await c.get("/__ploy/workflows/ORDER/trigger")).text)
        again = await c.post("/__ploy/workflows/ORDER/trigger",
                             data={"csrf": token, "f.customer": HOSTILE, "f.quantity": HOSTILE,
                                   "idempotency_key": HOSTILE},
                             headers={"Origin": ORIGIN})
        assert again.status_code == 422
        assert_escaped(again.text, "trigger form")
        # A schedule's input (ploy.yaml) and an operator's reason (from the API) on its page.
        paused = await c.post("/__ploy/api/schedules/yearly/pause",
                              json={"reason": HOSTILE, "actor": HOSTILE})
        assert paused.status_code == 200
        page = (await c.get("/__ploy/schedules")).text
        assert_escaped(page, "schedules page")
        assert page.count("&lt;img src=x onerror=") >= 4  # input, pause note, actor, action
        token = csrf_of(page)
        resumed = await c.post("/__ploy/schedules/yearly/resume",
                               data={"csrf": token, "reason": "ok"}, headers={"Origin": ORIGIN})
        assert resumed.status_code == 303
        assert not (await engine.runtime.schedules.state("yearly"))["paused"]
        for path in ("/__ploy/schedules/nope/pause", "/__ploy/schedules/yearly/explode"):
            unknown = await c.post(path, data={"csrf": token}, headers={"Origin": ORIGIN})
            assert unknown.status_code == 404, path
        history = await c.get(f"/__ploy/executions/{eid}/history.jsonl")
        assert history.headers["content-type"].startswith("application/x-ndjson")
        assert "attachment" in history.headers["content-disposition"]


async def test_a_cancel_is_one_line_on_the_workflow_log(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ploy.workflow")
    eid = await sleeping(engine)
    assert await engine.cancel(eid, "ops said so")
    lines = [r for r in caplog.records if getattr(r, "ended_execution", None) == eid]
    assert [r.getMessage() for r in lines] == [f"[overnight {eid}] cancelled: ops said so"]
