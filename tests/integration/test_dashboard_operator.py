"""The operator's dashboard in headless Chromium (Debian's): find, act, read, watch live.

One engine and one server for the whole module (each test keeps to its own
executions), one browser. Screenshots go to ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, FloatRect, Locator, Page, async_playwright, expect
from pydantic import BaseModel, Field

from engine import Engine, ploy
from engine.http import create_app
from engine.testing import engine_config, running_engine, unique_prefix, wait_for_status
from tests.integration.test_dashboard_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    serving,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed at /usr/bin/chromium"),
]

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

app = ploy()


class Order(BaseModel):
    customer: str = Field(min_length=1)
    quantity: int = Field(ge=1)
    express: bool = False
    note: str = ""


@app.workflow("order", input=Order)
async def order(ctx: Any) -> dict[str, Any]:
    total = await ctx.step.run("price", lambda: {"total": ctx.input.quantity * 3})
    return {"customer": ctx.input.customer, **total}


def pause(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@app.workflow("overnight")
async def overnight(ctx: Any) -> dict[str, Any]:
    await ctx.step.run("prepare", lambda: pause(0.2, {"ready": True}))
    await ctx.step.sleep("24h")
    return {"done": await ctx.step.run("finish", lambda: 1)}


@app.workflow("hostile")
async def hostile(ctx: Any) -> None:
    ctx.log(HOSTILE, {"html": HOSTILE})

    def explode() -> None:
        raise ValueError(HOSTILE)

    await ctx.step.run(HOSTILE, explode, retries=1)


@app.workflow("payment")
async def payment(ctx: Any) -> Any:
    event = await ctx.step.wait_for_event("paid", type="payment.received",
                                          match={"order": ctx.input["order"]}, timeout="1h")
    return None if event is None else event.data


@app.workflow("stuck")
async def stuck(ctx: Any) -> Any:
    async def forever() -> Any:
        await asyncio.sleep(3600)

    return await ctx.step.run("hang", forever)


worker = app.build()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    config = engine_config(kafka, unique_prefix("dash-operator"), tmp_path_factory.mktemp("state"),
                           workflow={"ORDER": "order", "OVERNIGHT": "overnight",
                                     "HOSTILE": "hostile", "PAYMENT": "payment",
                                     "STUCK": "stuck"},
                           backoff={"initial_ms": 10})
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


@asynccontextmanager
async def open_page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; fails the test on a script error or a CSP violation."""
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"script errors on the page: {errors}"


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def run_order(engine: Engine, customer: str) -> str:
    eid: str = (await engine.env.ORDER.trigger({"customer": customer, "quantity": 2}))[
        "execution_id"]
    await wait_for_status(engine, eid, "completed")
    return eid


async def box(locator: Locator) -> FloatRect:
    """Its bounding box, once it is on the page (a live refresh may be swapping it)."""
    await expect(locator).to_be_visible()
    for _ in range(50):
        found = await locator.bounding_box()
        if found is not None:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{locator} has no bounding box")


# -- finding -------------------------------------------------------------------------


async def test_search_by_id_prefix_shows_the_match_and_the_count(
        engine: Engine, base: str, browser: Browser) -> None:
    ids = [await run_order(engine, f"c{i}") for i in range(3)]
    wanted = ids[1]
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/")
        await page.get_by_test_id("filter-id").fill(wanted[:8])
        await page.get_by_test_id("filter-submit").click()
        await expect(page).to_have_url(f"{base}/__ploy/?id={wanted[:8]}")
        rows = page.get_by_test_id("execution-row")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-execution", wanted)
        await expect(page.get_by_test_id("result-count")).to_have_attribute("data-count", "1")
        await screenshot(page, "operator-search")

        # The other filters keep to the URL too, and an error text that nothing has finds none.
        await page.goto(f"{base}/__ploy/?workflow=order&status=completed&last=1h")
        await expect(page.get_by_test_id("result-count")).to_have_attribute("data-count", "3")
        await page.goto(f"{base}/__ploy/?workflow=order&error=no-such-error")
        await expect(page.get_by_test_id("executions-empty")).to_be_visible()

        # A time range: typed in local time, carried in UTC.
        await page.goto(f"{base}/__ploy/?workflow=order")
        await page.get_by_test_id("filter-to").fill("2020-01-01T00:00")
        await page.get_by_test_id("filter-submit").click()
        await expect(page).to_have_url(re.compile(r"workflow=order&to=20(19-12-3|20-01-0)"))
        await expect(page.get_by_test_id("executions-empty")).to_be_visible()
        await expect(page.get_by_test_id("filter-to")).to_have_value("2020-01-01T00:00")
        await page.goto(f"{base}/__ploy/?workflow=order")
        await page.get_by_test_id("filter-last").select_option("15m")
        await expect(page).to_have_url(f"{base}/__ploy/?workflow=order&last=15m")
        await expect(page.get_by_test_id("result-count")).to_have_attribute("data-count", "3")


# -- live ----------------------------------------------------------------------------


async def test_the_list_shows_a_trigger_within_a_second_without_a_reload(
        engine: Engine, base: str, browser: Browser) -> None:
    async with open_page(browser) as page:
        async with page.expect_response(lambda r: r.url.endswith("/__ploy/api/changes")):
            await page.goto(f"{base}/__ploy/?workflow=order")  # and its push stream opens
        eid = (await engine.env.ORDER.trigger({"customer": "live", "quantity": 1}))[
            "execution_id"]
        row = page.locator(f'[data-testid="execution-row"][data-execution="{eid}"]')
        await expect(row).to_be_visible(timeout=1000)
        await expect(row.get_by_test_id("status-badge")).to_have_text("completed",
                                                                      timeout=5000)


# -- actions -------------------------------------------------------------------------


async def test_cancel_with_a_reason_from_the_page(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.OVERNIGHT.trigger({}))["execution_id"]
    await wait_for_status(engine, eid, "sleeping")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await page.get_by_test_id("cancel").locator("summary").click()
        await page.get_by_test_id("cancel-reason-input").fill("customer <b>asked</b>")
        await page.get_by_test_id("cancel-confirm").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("Cancelled")
        await expect(page.get_by_test_id("execution-status")).to_have_text("cancelled")
        await expect(page.get_by_test_id("cancel-reason")).to_have_text("customer <b>asked</b>")
        await expect(page.get_by_test_id("cancel-actor")).to_have_text("dashboard:local")
        await expect(page.get_by_test_id("cancel")).to_have_count(0)
        await screenshot(page, "operator-cancelled")
    execution = await wait_for_status(engine, eid, "cancelled")
    assert execution.cancel_reason == "customer <b>asked</b>"
    assert execution.cancel_actor == "dashboard:local"


async def test_complete_a_stuck_step_from_the_page(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.STUCK.trigger({}))["execution_id"]
    await wait_for_status(engine, eid, "running")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await page.get_by_test_id("complete-step").locator("summary").click()
        await page.get_by_test_id("complete-step-key").select_option("hang")
        await page.get_by_test_id("complete-step-output").fill('{"skipped": true}')
        await page.get_by_test_id("complete-step-reason").fill("the provider is down")
        await page.get_by_test_id("complete-step-confirm").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("completed with your output")
        await expect(page.get_by_test_id("execution-status")).to_have_text("completed",
                                                                           timeout=10_000)
        await page.reload()
        await expect(page.get_by_test_id("step-resolved")).to_have_text(
            "completed by dashboard:local: the provider is down")
        await screenshot(page, "operator-step-completed")
    execution = await wait_for_status(engine, eid, "completed")
    assert execution.output == {"skipped": True}


async def test_rerun_from_a_step_from_the_page(
        engine: Engine, base: str, browser: Browser) -> None:
    source = await run_order(engine, "again")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{source}")
        await page.get_by_test_id("rerun").locator("summary").click()
        await page.get_by_test_id("rerun-step").select_option("price")
        await page.get_by_test_id("rerun-confirm").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("rerun")
        await expect(page.get_by_test_id("rerun-of")).to_have_text(source[:12])
        await expect(page.get_by_test_id("execution-status")).to_have_text("completed",
                                                                         timeout=10_000)
        assert page.url.split("/executions/")[1].split("?")[0] != source
        await screenshot(page, "operator-rerun")


async def test_send_an_event_to_a_waiting_execution_from_the_page(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.PAYMENT.trigger({"order": "o-9"}))["execution_id"]
    await wait_for_status(engine, eid, "waiting")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await expect(page.get_by_test_id("waiting-for")).to_contain_text("payment.received")
        await page.get_by_test_id("send-event").locator("summary").click()
        await expect(page.get_by_test_id("event-type")).to_have_value("payment.received")
        await page.get_by_test_id("event-data").fill('{"order": "o-9", "amount": 7}')
        await page.get_by_test_id("event-send").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("Event sent")
        await expect(page.get_by_test_id("execution-status")).to_have_text("completed",
                                                                         timeout=10_000)
        await expect(page.get_by_test_id("execution-output")).to_contain_text('"amount": 7')
        await screenshot(page, "operator-event-sent")


async def test_trigger_from_the_generated_form_shows_errors_by_field(
        engine: Engine, base: str, browser: Browser) -> None:
    before = len(await engine.list_executions(workflow="order", limit=500))
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/workflows")
        await page.locator('[data-testid="trigger-link"][data-binding="ORDER"]').click()
        form = page.get_by_test_id("trigger-form")
        await form.locator('[name="f.customer"]').fill("ada")
        await form.locator('[name="f.quantity"]').fill("0")  # the model wants >= 1
        await page.get_by_test_id("trigger-submit").click()
        quantity = page.locator('[data-testid="field"][data-field="quantity"]')
        await expect(quantity.get_by_test_id("field-error")).to_contain_text(
            "greater than or equal to 1")
        customer = page.locator('[data-testid="field"][data-field="customer"]')
        await expect(customer.get_by_test_id("field-error")).to_have_count(0)
        await expect(form.locator('[name="f.customer"]')).to_have_value("ada")  # kept
        await screenshot(page, "operator-trigger-invalid")
        assert len(await engine.list_executions(workflow="order", limit=500)) == before

        await form.locator('[name="f.quantity"]').fill("4")
        await form.locator('[name="f.express"]').check()
        await page.get_by_test_id("trigger-submit").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("Triggered")
        await expect(page.get_by_test_id("execution-status")).to_have_text("completed",
                                                                         timeout=10_000)
        await expect(page.get_by_test_id("execution-input")).to_contain_text('"express": true')
        await expect(page.get_by_test_id("execution-output")).to_contain_text('"total": 12')
    assert len(await engine.list_executions(workflow="order", limit=500)) == before + 1


# -- reading ---------------------------------------------------------------------------


async def test_a_history_row_opens_to_pretty_json(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = await run_order(engine, "history")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        row = page.locator('[data-testid="event-row"][data-type="StepCompleted"]')
        await expect(row.locator("summary")).to_contain_text("step price")
        await expect(row.get_by_test_id("event-json")).not_to_be_visible()
        await row.locator("summary").click()
        pretty = row.get_by_test_id("event-json")
        await expect(pretty).to_be_visible()
        text = await pretty.inner_text()
        assert '\n  "body": {\n' in text and '"output": {\n      "total": 6\n' in text, text
        await screenshot(page, "operator-history")
        async with page.expect_download() as download_info:
            await page.get_by_test_id("history-download").click()
        lines = Path(await (await download_info.value).path()).read_text().splitlines()
        assert [json.loads(line)["type"] for line in lines][0] == "WorkflowTriggered"


async def test_a_24h_sleep_and_a_200ms_step_are_both_visible_on_one_timeline(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.OVERNIGHT.trigger({}))["execution_id"]
    await wait_for_status(engine, eid, "sleeping")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/executions/{eid}")
        step = page.locator('[data-testid="timeline-bar"][data-step="prepare"]')
        sleep = page.locator('[data-testid="timeline-bar"][data-kind="sleep"]')
        track, step_box, sleep_box = [await box(x) for x in (step.locator(".."), step, sleep)]
        assert step_box["width"] > track["width"] * 0.3, (step_box, track)  # not 1 px at zero
        assert sleep_box["width"] > track["width"] * 0.1, (sleep_box, track)
        await expect(page.get_by_test_id("timeline-break")).to_have_text(
            re.compile(r"^(1d|23h 59m)$"))  # its real length, written on it
        await expect(page.get_by_test_id("timeline-now").first).to_be_visible()
        await expect(page.get_by_test_id("timeline-note")).to_contain_text("so far")
        await screenshot(page, "operator-timeline-24h")
        await page.get_by_test_id("zoom-in").click()
        assert (await box(step))["width"] > step_box["width"] * 1.8
        await screenshot(page, "operator-timeline-24h-zoomed")


# -- pages -----------------------------------------------------------------------------


async def test_the_workflows_and_workers_pages(
        engine: Engine, base: str, browser: Browser) -> None:
    await run_order(engine, "counted")
    failed = (await engine.env.HOSTILE.trigger({}))["execution_id"]
    await wait_for_status(engine, failed, "failed")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/workflows")
        hostile = page.locator('[data-testid="workflow"][data-workflow="hostile"]')
        hour = hostile.locator('[data-testid="activity"][data-window="last hour"]')
        await expect(hour.get_by_test_id("failure-rate")).to_have_text("100.0% failed")
        order_hour = page.locator('[data-testid="workflow"][data-workflow="order"] '
                                  '[data-testid="activity"][data-window="last hour"]')
        assert int(await order_hour.get_attribute("data-total") or 0) >= 1
        await expect(page.locator('[data-testid="trigger-link"]')).to_have_count(5)
        await screenshot(page, "operator-workflows")

        await page.goto(f"{base}/__ploy/workers")
        rows = page.get_by_test_id("partition-row")
        await expect(rows).to_have_count(engine.runtime.log.partitions)
        await expect(rows.first).to_contain_text("(this process)")
        await expect(page.get_by_test_id("health")).to_have_text("ok")
        await screenshot(page, "operator-workers")


# -- hostile text ------------------------------------------------------------------------


async def test_hostile_text_never_runs_and_the_csp_blocks_other_scripts(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.HOSTILE.trigger({"html": HOSTILE}))["execution_id"]
    await wait_for_status(engine, eid, "failed")
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    page = await context.new_page()
    blocked: list[str] = []
    errors: list[str] = []
    page.on("console", lambda msg: blocked.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        for path in (f"/__ploy/executions/{eid}", "/__ploy/?workflow=hostile"):
            await page.goto(base + path)
            await expect(page.locator("main")).to_contain_text("<img src=x")  # shown as text
            assert await page.evaluate("window.__pwned") is None, path
        # The step name, the error and the log line, as text, on the execution page.
        await page.goto(f"{base}/__ploy/executions/{eid}")
        await expect(page.get_by_test_id("step-name")).to_have_text(HOSTILE)
        await expect(page.get_by_test_id("log-message")).to_have_text(HOSTILE)
        await expect(page.get_by_test_id("execution-error")).to_contain_text(HOSTILE)
        await screenshot(page, "operator-hostile")
        # The trigger form echoes what was typed, escaped.
        await page.goto(f"{base}/__ploy/workflows/ORDER/trigger")
        await page.locator('[name="f.customer"]').fill(HOSTILE)
        await page.get_by_test_id("trigger-submit").click()  # quantity missing: shown again
        await expect(page.get_by_test_id("form-error")).to_be_visible()
        await expect(page.locator('[name="f.customer"]')).to_have_value(HOSTILE)
        assert await page.evaluate("window.__pwned") is None
        # A script the page did not bring (no nonce) is refused by the CSP.
        await page.evaluate("""() => { const s = document.createElement("script");
            s.textContent = "window.__injected = 1"; document.body.append(s); }""")
        assert await page.evaluate("window.__injected") is None
        assert blocked, "the CSP did not report the refused script"
        assert errors == []
    finally:
        await context.close()


async def test_the_events_page_sends_to_every_matching_waiter(
        engine: Engine, base: str, browser: Browser) -> None:
    eid = (await engine.env.PAYMENT.trigger({"order": "o-10"}))["execution_id"]
    await wait_for_status(engine, eid, "waiting")
    async with open_page(browser) as page:
        await page.goto(f"{base}/__ploy/events")
        await page.get_by_test_id("event-type").fill("payment.received")
        await page.get_by_test_id("event-data").fill('{"order": "o-10", "amount": 1}')
        await page.get_by_test_id("event-send").click()
        await expect(page.get_by_test_id("notice")).to_contain_text("Event sent")
        await screenshot(page, "operator-events")
    assert (await wait_for_status(engine, eid, "completed")).output == {"order": "o-10",
                                                                         "amount": 1}
