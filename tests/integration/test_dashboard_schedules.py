"""The Schedules page in headless Chromium (Debian's): pause, resume, trigger now, live.

One engine and one server for the whole module, one browser, as in
``test_dashboard_operator``. Screenshots go to ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from engine import Engine, ploy
from engine.errors import OwnerUnavailableError
from engine.http import create_app
from engine.testing import engine_config, running_engine, unique_prefix
from tests.integration.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, serving
from tests.integration.test_dashboard_operator import open_page, screenshot

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed at /usr/bin/chromium"),
]

app = ploy()


@app.workflow("tick")
async def tick(ctx: Any) -> Any:
    return await ctx.step.run("work", lambda: ctx.input)


@app.workflow("slow")
async def slow(ctx: Any) -> int:
    await ctx.step.sleep("3s")
    return 1


worker = app.build()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    config = engine_config(
        kafka, unique_prefix("dash-schedules"), tmp_path_factory.mktemp("state"),
        workflow={"TICK": "tick", "SLOW": "slow"},
        schedules=[{"name": "heartbeat", "binding": "TICK", "every_ms": 1000,
                    "overlap": "allow", "input": {"beat": True}},
                   {"name": "nightly", "binding": "SLOW", "every_ms": 1000, "overlap": "skip"}])
    async with running_engine(worker, config) as eng:
        yield eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def base(engine: Engine) -> AsyncIterator[str]:
    async with serving(create_app(engine)) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def act(page: Page, name: str, verb: str, reason: str) -> None:
    """Open the schedule's ``verb`` form, give the reason, submit."""
    section = page.locator(f'[data-testid="schedule"][data-schedule="{name}"]')
    await section.get_by_test_id(f"schedule-{verb}").locator("summary").click()
    await section.get_by_test_id(f"schedule-{verb}-reason").fill(reason)
    await section.get_by_test_id(f"schedule-{verb}-confirm").click()


async def fired(engine: Engine, name: str) -> int:
    return int((await engine.runtime.schedules.state(name))["fired"])


async def test_pause_resume_and_trigger_now_from_the_page(
        engine: Engine, base: str, browser: Browser) -> None:
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/schedules")
        beat = page.locator('[data-testid="schedule"][data-schedule="heartbeat"]')
        await expect(beat.get_by_test_id("schedule-timing")).to_have_text("every 1s")
        # Live: firings show up without a reload.
        await expect(beat.get_by_test_id("schedule-execution").first).to_be_visible(timeout=5000)

        await act(page, "heartbeat", "pause", "deploy <b>window</b>")
        await expect(page.get_by_test_id("notice")).to_contain_text("Paused")
        await expect(beat.get_by_test_id("schedule-state")).to_have_text("paused")
        await expect(beat.get_by_test_id("schedule-paused-reason")).to_have_text(
            "deploy <b>window</b>")
        await expect(beat.get_by_test_id("schedule-paused-actor")).to_have_text("dashboard:local")
        await expect(beat.get_by_test_id("schedule-next-fire")).to_have_text("none while paused")
        # While paused, its fire times start nothing.
        count = await fired(engine, "heartbeat")
        rows = await beat.get_by_test_id("schedule-execution").count()
        await asyncio.sleep(2.5)
        assert await fired(engine, "heartbeat") == count
        await expect(beat.get_by_test_id("schedule-execution")).to_have_count(rows)
        state = await engine.runtime.schedules.state("heartbeat")
        assert state["paused"] and state["pause"]["actor"] == "dashboard:local"

        # The other schedule's overlapping firings are skipped, and the page says why.
        night = page.locator('[data-testid="schedule"][data-schedule="nightly"]')
        await expect(night.locator('[data-testid="schedule-skip"][data-reason="overlap"]')
                     .first).to_be_visible(timeout=5000)
        await screenshot(page, "schedules-paused")

        await act(page, "heartbeat", "resume", "deploy done")
        await expect(page.get_by_test_id("notice")).to_contain_text("Resumed")
        await expect(beat.get_by_test_id("schedule-state")).to_have_text("active")
        await expect(beat.get_by_test_id("schedule-paused")).to_have_count(0)
        newest = await beat.get_by_test_id("schedule-execution").first.get_attribute(
            "data-execution")
        await expect(beat.get_by_test_id("schedule-execution").first).not_to_have_attribute(
            "data-execution", newest or "", timeout=5000)  # firing again, shown live

        await act(page, "heartbeat", "trigger", "backfill")
        await expect(page.get_by_test_id("notice")).to_contain_text("Triggered now")
        now_row = beat.get_by_test_id("schedule-execution").filter(
            has_text="triggered now by dashboard:local")
        await expect(now_row).to_have_count(1)
        await now_row.locator("a").click()
        await expect(page.get_by_test_id("started-by-schedule")).to_have_text("heartbeat")
        await expect(page.get_by_test_id("schedule-fire-time")).to_have_text("triggered now")
    recent = (await engine.runtime.schedules.state("heartbeat"))["recent"]
    assert [(r["action"], r["actor"], r["reason"]) for r in recent[-3:]] == [
        ("paused", "dashboard:local", "deploy <b>window</b>"),
        ("resumed", "dashboard:local", "deploy done"),
        ("triggered", "dashboard:local", "backfill")]


async def test_an_execution_names_the_schedule_and_fire_time_that_started_it(
        engine: Engine, base: str, browser: Browser) -> None:
    state = await engine.runtime.schedules.state("nightly")
    fired_one = next(s for s in state["started"] if s["fire_at"] is not None)
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{fired_one['execution_id']}")
        await expect(page.get_by_test_id("started-by-schedule")).to_have_text("nightly")
        fire_time = page.get_by_test_id("schedule-fire-time").locator("time")
        await expect(fire_time).to_have_attribute("data-ms", str(fired_one["fire_at"]))
        await screenshot(page, "schedules-started-by")
        await page.get_by_test_id("started-by-schedule").click()
        await expect(page).to_have_url(f"{base}/__ploy/schedules#schedule-nightly")
        await expect(page.locator('[data-testid="schedule"][data-schedule="nightly"]')
                     ).to_be_visible()


async def test_a_pause_by_someone_else_reaches_the_open_page(
        engine: Engine, base: str, browser: Browser) -> None:
    async with open_page(browser) as page:
        async with page.expect_response(lambda r: r.url.endswith("/__ploy/api/changes")):
            await page.goto(f"{base}/__ploy/schedules")
        night = page.locator('[data-testid="schedule"][data-schedule="nightly"]')
        await expect(night).to_have_attribute("data-paused", "false")
        async with httpx.AsyncClient(base_url=base) as api:
            paused = await api.post("/__ploy/api/schedules/nightly/pause",
                                    json={"reason": "quota", "actor": "ann"})
            assert paused.status_code == 200
            await expect(night).to_have_attribute("data-paused", "true", timeout=3000)
            await expect(night.get_by_test_id("schedule-paused-actor")).to_have_text("local:ann")
            await api.post("/__ploy/api/schedules/nightly/resume", json={"actor": "ann"})
            await expect(night).to_have_attribute("data-paused", "false", timeout=3000)


async def test_a_schedule_whose_owner_does_not_answer_is_shown_with_why(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.runtime.schedules.state

    async def state(name: str, **kwargs: Any) -> dict[str, Any]:
        if name == "nightly":
            raise OwnerUnavailableError(3, "no process answers")
        return await real(name, **kwargs)

    monkeypatch.setattr(engine.runtime.schedules, "state", state)
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        page = await http.get("/__ploy/schedules")
    assert page.status_code == 200
    assert 'data-schedule="nightly" data-paused="unknown"' in page.text
    assert "no process answers" in page.text and 'data-testid="schedule-unavailable"' in page.text
    assert 'data-schedule="heartbeat" data-paused="false"' in page.text  # the others still show
