"""The dashboard in headless Chromium (Debian's), served by uvicorn over a running engine.

Screenshots go to ``artifacts/`` at the repository root (gitignored), for people
and CI to look at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright, expect
from starlette.applications import Starlette

from engine import Engine, ploy
from engine.http import create_app
from engine.testing import engine_config, running_engine, wait_for_status

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed at /usr/bin/chromium "
                              "(apt-get install chromium; browsers are never downloaded)"),
]


app = ploy()
charges: dict[str, int] = {}


@app.workflow("checkout")
async def checkout(ctx: Any) -> dict[str, Any]:
    await ctx.step.run("validate", lambda: {"valid": True}, input={"order": ctx.input["order"]})

    def charge() -> None:
        charges[ctx.execution_id] = charges.get(ctx.execution_id, 0) + 1
        raise RuntimeError(f"card declined on attempt {charges[ctx.execution_id]}")

    await ctx.step.run("charge_payment", charge, retries=2)
    return {"never": "reached"}


def pause(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@app.workflow("fulfil")
async def fulfil(ctx: Any) -> dict[str, Any]:
    ctx.log("fulfilling", {"note": ctx.input["note"]})
    stock = await ctx.step.run("reserve", lambda: pause(0.04, {"reserved": 2}))
    payment = await ctx.step.run("charge", lambda: pause(0.12, {"paid": True}))
    shipment = await ctx.step.run("ship", lambda: pause(0.07, {"tracking": "T-1"}))
    return {**stock, **payment, **shipment}


@app.workflow("nap")
async def nap(ctx: Any) -> dict[str, Any]:
    await ctx.step.run("before", lambda: 1)
    await ctx.step.sleep(1500)
    return {"after": await ctx.step.run("after", lambda: 2)}


worker = app.build()


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> AsyncIterator[Engine]:
    config = engine_config(kafka, topic_prefix, state_dir,
                           workflow={"CHECKOUT": "checkout", "FULFIL": "fulfil", "NAP": "nap"},
                           backoff={"initial_ms": 10})
    async with running_engine(worker, config) as eng:
        yield eng


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """A real uvicorn server on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", ws="none"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@asynccontextmanager
async def open_page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"script errors on the page: {errors}"


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_failed_step_shows_every_attempt_and_its_error(
        engine: Engine, browser: Browser) -> None:
    result = await engine.env.CHECKOUT.trigger({"order": "o-1"})
    eid = result["execution_id"]
    await wait_for_status(engine, eid, "failed")

    async with serving(create_app(engine)) as base, open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await expect(page.get_by_test_id("execution-status")).to_have_text("failed")
        step = page.locator('[data-testid="step-row"][data-step="charge_payment"]')
        await expect(step).to_have_attribute("data-status", "failed")
        await expect(step.get_by_test_id("step-status")).to_have_text("failed")

        attempts = page.locator('[data-testid="attempt-row"][data-step="charge_payment"]')
        await expect(attempts).to_have_count(3)
        for n in (1, 2, 3):
            row = attempts.nth(n - 1)
            await expect(row).to_have_attribute("data-attempt", str(n))
            await expect(row.get_by_test_id("attempt-error")).to_have_text(
                f"RuntimeError: card declined on attempt {n}")
        # The first two attempts name their retry time; the last one is final.
        await expect(attempts.nth(0).get_by_test_id("attempt-retry-at")).not_to_contain_text(
            "final")
        await expect(attempts.nth(2).get_by_test_id("attempt-retry-at")).to_have_text(
            "none (final)")
        await expect(page.get_by_test_id("execution-error")).to_contain_text(
            "step 'charge_payment' failed after 3 attempts")

        traces = page.locator('[data-testid="attempt-trace"][data-step="charge_payment"]')
        traceback = traces.nth(0).get_by_test_id("attempt-traceback")
        await traceback.locator("summary").first.click()
        # The user's own frame and the exception first; the engine's frames are one click away.
        frames = traceback.get_by_test_id("user-frames")
        await expect(frames).to_contain_text("in charge")
        await expect(frames).to_contain_text("card declined on attempt 1")
        await expect(frames).not_to_contain_text("engine/execution.py")
        # The same failure on the next attempts is not repeated.
        await expect(traces.nth(1).get_by_test_id("same-traceback")).to_have_text(
            "Traceback: the same as attempt #1.")
        await screenshot(page, "dashboard-failed-step")


async def test_timeline_draws_one_bar_per_step_in_order(
        engine: Engine, browser: Browser) -> None:
    note = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    result = await engine.env.FULFIL.trigger({"note": note})
    eid = result["execution_id"]
    execution = await wait_for_status(engine, eid, "completed")
    durations = {s.key: s.duration_ms or 0 for s in execution.steps}

    async with serving(create_app(engine)) as base, open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await expect(page.get_by_test_id("execution-status")).to_have_text("completed")
        bars = page.get_by_test_id("timeline-bar")
        await expect(bars).to_have_count(3)
        keys = [await bars.nth(i).get_attribute("data-step") for i in range(3)]
        assert keys == ["reserve", "charge", "ship"]

        boxes = []
        for i in range(3):
            box = await bars.nth(i).bounding_box()
            assert box is not None and box["width"] > 0
            boxes.append(box)
        for before, after in zip(boxes, boxes[1:], strict=False):
            assert after["x"] >= before["x"] + before["width"] - 1  # steps run one after another
        # Drawn to scale: the longest step has the widest bar.
        longest = max(durations, key=lambda key: durations[key])
        assert max(range(3), key=lambda i: boxes[i]["width"]) == keys.index(longest)

        await expect(page.get_by_test_id("step-row")).to_have_count(3)
        await expect(page.get_by_test_id("log-message")).to_have_text("fulfilling")
        # The untrusted input is shown as text and never runs.
        await expect(page.get_by_test_id("execution-input")).to_contain_text("<script>")
        assert await page.evaluate("window.__pwned") is None
        await screenshot(page, "dashboard-timeline")


async def test_executions_list_refreshes_itself(engine: Engine, browser: Browser) -> None:
    first = (await engine.env.FULFIL.trigger({"note": "first"}))["execution_id"]
    await wait_for_status(engine, first, "completed")

    async with serving(create_app(engine)) as base, open_page(browser) as page:
        await page.goto(f"{base}/__ploy/")
        rows = page.get_by_test_id("execution-row")
        await expect(rows).to_have_count(1)
        second = (await engine.env.CHECKOUT.trigger({"order": "o-2"}))["execution_id"]
        new_row = page.locator(f'[data-testid="execution-row"][data-execution="{second}"]')
        await expect(new_row).to_be_visible(timeout=10_000)
        await expect(new_row.get_by_test_id("status-badge")).to_have_text("failed",
                                                                          timeout=15_000)
        await expect(rows.first).to_have_attribute("data-execution", second)  # newest first

        await page.get_by_test_id("filter-workflow").select_option("fulfil")
        await expect(page).to_have_url(f"{base}/__ploy/?workflow=fulfil")  # empty filters stay out
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-execution", first)
        await screenshot(page, "dashboard-executions")

        await rows.first.get_by_test_id("execution-link").click()
        await expect(page.get_by_test_id("execution-id")).to_have_text(first)


async def test_an_execution_page_follows_its_event_stream_not_a_poll(
        engine: Engine, browser: Browser) -> None:
    eid = (await engine.env.NAP.trigger({}))["execution_id"]
    await wait_for_status(engine, eid, "sleeping")
    async with serving(create_app(engine)) as base, open_page(browser) as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        await page.goto(f"{base}/__ploy/executions/{eid}")
        detail = page.get_by_test_id("execution")
        await expect(detail).to_have_attribute("data-status", "sleeping")
        # The timer fires, the steps run: the page shows it without a reload.
        await expect(page.get_by_test_id("execution")).to_have_attribute(
            "data-status", "completed", timeout=15_000)
        await expect(page.get_by_test_id("step-row")).to_have_count(3)
    assert any(f"/__ploy/api/executions/{eid}/events?after=" in url for url in requests)
    page_loads = [u for u in requests if u.endswith(f"/__ploy/executions/{eid}")]
    # The first load, then one refresh per burst of events: no 2-second poll while it slept.
    assert len(page_loads) <= 6, page_loads

