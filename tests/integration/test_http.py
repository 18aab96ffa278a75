"""engine.http on a real broker: the worker's routes, the engine API, its guard, the dashboard.

Most tests talk to the ASGI app in process through httpx; one runs a real
uvicorn server and talks to it over TCP.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from engine import Engine, ploy
from engine.config import Config
from engine.http import admin_enabled, create_app, is_loopback, starlette_path
from engine.models import ExecutionSummary
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import build_summary

BODY_LIMIT = 2048
XSS = "<script>alert(1)</script>"


# -- the app under test ------------------------------------------------------------


class OrderIn(BaseModel):
    order_id: str
    amount: float


class NewOrder(BaseModel):
    order_id: str
    amount: float


class Created(BaseModel):
    execution_id: str


class ItemParams(BaseModel):
    id: int


class Paging(BaseModel):
    limit: int = 10
    tag: str = "none"


class StatusParams(BaseModel):
    id: str


app = ploy()


@app.workflow("order", input=OrderIn)
async def order(ctx: Any) -> dict[str, Any]:
    charged = await ctx.step.run("charge", lambda: {"paid": ctx.input.amount})
    return {"ok": True, "paid": charged["paid"]}


@app.workflow("echo")
async def echo(ctx: Any) -> Any:
    ctx.log(f"echoing {ctx.input.get('note', '')}", {"input": ctx.input})
    return await ctx.step.run("echo", lambda: ctx.input)


@app.workflow("slow")
async def slow(ctx: Any) -> str:
    await ctx.step.sleep("1h")
    return "woke"


@app.post("/orders", body=NewOrder, response=Created)
async def create_order(ctx: Any) -> dict[str, str]:
    result = await ctx.env.ORDER.trigger({"order_id": ctx.body.order_id,
                                          "amount": ctx.body.amount})
    return {"execution_id": result["execution_id"]}


@app.get("/orders/:id/status", params=StatusParams)
async def order_status(ctx: Any) -> Any:
    execution = await ctx.env.ORDER.get_execution(ctx.params.id)
    if execution is None:
        return JSONResponse({"error": "no such order"}, status_code=404)
    return {"status": execution.status.value, "result": execution.result}


@app.get("/items/:id", params=ItemParams, query=Paging)
async def item(ctx: Any) -> dict[str, Any]:
    return {"id": ctx.params.id, "limit": ctx.query.limit, "tag": ctx.query.tag}


@app.get("/bad-response", response=Created)
async def bad_response(ctx: Any) -> dict[str, Any]:
    return {"wrong": 1, "secret": "do-not-leak"}


@app.get("/model-response", response=Created)
async def model_response(ctx: Any) -> Created:
    return Created(execution_id="abc")


@app.get("/boom")
async def boom(ctx: Any) -> None:
    raise RuntimeError("kaboom in handler")


@app.get("/sync")
def sync_handler(ctx: Any) -> dict[str, Any]:
    return {"ok": True, "query": ctx.query}


@app.post("/echo")
async def echo_route(ctx: Any) -> dict[str, Any]:
    return {"body": ctx.body, "query": ctx.query, "params": ctx.params}


@app.get("/bad-trigger")
async def bad_trigger(ctx: Any) -> None:
    await ctx.env.ORDER.trigger({"order_id": 1})


@app.get("/unknown-binding")
async def unknown_binding(ctx: Any) -> None:
    await ctx.env.NOPE.trigger({})


worker = app.build()


# -- fixtures and helpers ------------------------------------------------------------


def make_config(kafka: str, topic_prefix: str, state_dir: Path, **http: Any) -> Config:
    return engine_config(
        kafka, topic_prefix, state_dir,
        workflow={"ORDER": "order", "ECHO": "echo", "SLOW": "slow"},
        backoff={"initial_ms": 10}, http={"max_body_bytes": BODY_LIMIT, **http},
    )


@pytest.fixture
async def engine(kafka: str, topic_prefix: str, state_dir: Path) -> AsyncIterator[Engine]:
    async with running_engine(worker, make_config(kafka, topic_prefix, state_dir)) as eng:
        yield eng


@asynccontextmanager
async def client_for(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions stays on: nothing may escape the app as an exception.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as c:
        yield c


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(engine)) as c:
        yield c


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


async def trigger(client: httpx.AsyncClient, binding: str, input: Any, **extra: Any) -> str:
    response = await client.post(f"/__ploy/api/trigger/{binding}", json={"input": input, **extra})
    assert response.status_code == 201, response.text
    eid: str = response.json()["execution_id"]
    return eid


# -- the worker's routes --------------------------------------------------------------------


def test_seed_paths_become_starlette_paths() -> None:
    assert starlette_path("/orders/:id/status") == "/orders/{id}/status"
    assert starlette_path("/a/:x/b/:y_2") == "/a/{x}/b/{y_2}"
    assert starlette_path("/plain") == "/plain"
    with pytest.raises(ValueError, match="must start with '/'"):
        starlette_path("orders")


async def test_route_triggers_a_workflow_and_reads_its_status(
        engine: Engine, client: httpx.AsyncClient) -> None:
    response = await client.post("/orders", json={"order_id": "o-1", "amount": 12.5})
    assert response.status_code == 200, response.text
    eid = response.json()["execution_id"]
    assert set(response.json()) == {"execution_id"}
    await wait_for_status(engine, eid, "completed")

    status = await client.get(f"/orders/{eid}/status")
    assert status.status_code == 200
    assert status.json() == {"status": "completed", "result": {"ok": True, "paid": 12.5}}
    missing = await client.get("/orders/nope/status")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such order"}


async def test_params_and_query_are_validated_models(client: httpx.AsyncClient) -> None:
    ok = await client.get("/items/7", params={"limit": "3", "tag": "x"})
    assert ok.json() == {"id": 7, "limit": 3, "tag": "x"}
    defaults = await client.get("/items/7")
    assert defaults.json() == {"id": 7, "limit": 10, "tag": "none"}
    last_wins = await client.get("/items/7?tag=first&tag=last")
    assert last_wins.json()["tag"] == "last"

    bad_param = await client.get("/items/seven")
    assert bad_param.status_code == 422
    assert bad_param.json()["error"] == "invalid path parameters"
    assert bad_param.json()["details"][0]["loc"] == ["id"]
    assert "url" not in bad_param.json()["details"][0]

    bad_query = await client.get("/items/7", params={"limit": "many"})
    assert bad_query.status_code == 422
    assert bad_query.json()["error"] == "invalid query parameters"
    assert bad_query.json()["details"][0]["loc"] == ["limit"]


async def test_bad_bodies_are_422_and_start_nothing(
        engine: Engine, client: httpx.AsyncClient) -> None:
    wrong_type = await client.post("/orders", json={"order_id": 5, "amount": "lots"})
    assert wrong_type.status_code == 422
    body = wrong_type.json()
    assert body["error"] == "invalid request body"
    assert sorted(tuple(d["loc"]) for d in body["details"]) == [("amount",), ("order_id",)]

    missing = await client.post("/orders", json={"order_id": "o-1"})
    assert missing.status_code == 422
    assert missing.json()["details"][0]["type"] == "missing"

    malformed = await client.post("/orders", content=b'{"order_id": ',
                                  headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    assert malformed.json()["error"].startswith("malformed JSON body")

    empty = await client.post("/orders")
    assert empty.status_code == 422
    assert "required" in empty.json()["details"][0]["msg"]

    not_an_object = await client.post("/orders", json=[1, 2])
    assert not_an_object.status_code == 422

    assert await engine.runtime.list_executions() == []


async def test_routes_without_models_get_plain_data(client: httpx.AsyncClient) -> None:
    response = await client.post("/echo?a=1&a=2&b=x", json={"nested": {"k": [1, 2]}})
    assert response.json() == {"body": {"nested": {"k": [1, 2]}}, "query": {"a": "2", "b": "x"},
                               "params": {}}
    no_body = await client.post("/echo")
    assert no_body.json()["body"] is None
    form = await client.post("/echo", data={"field": "value"})
    assert form.status_code == 200
    assert form.json()["body"] is None  # not JSON: the handler reads ctx.request itself
    sync = await client.get("/sync", params={"q": "1"})
    assert sync.json() == {"ok": True, "query": {"q": "1"}}


async def test_response_mismatch_is_500_and_logged(
        client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ploy.http"):
        response = await client.get("/bad-response")
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "response validation failed"
    assert body["details"][0]["loc"] == ["execution_id"]
    assert "do-not-leak" not in response.text
    assert any("/bad-response" in r.getMessage() and "Created" in r.getMessage()
               for r in caplog.records)

    model = await client.get("/model-response")
    assert model.status_code == 200
    assert model.json() == {"execution_id": "abc"}


async def test_unknown_path_and_method(client: httpx.AsyncClient) -> None:
    response = await client.get("/no/such/thing")
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "path": "/no/such/thing"}
    wrong_method = await client.delete("/orders")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method not allowed"


async def test_body_over_the_limit_is_413(engine: Engine, client: httpx.AsyncClient) -> None:
    big = b"x" * (BODY_LIMIT + 1)
    declared = await client.post("/echo", content=big, headers={"content-type": "text/plain"})
    assert declared.status_code == 413
    assert str(BODY_LIMIT) in declared.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (BODY_LIMIT // 2)

    streamed = await client.post("/echo", content=chunks())  # chunked: no Content-Length
    assert streamed.status_code == 413

    api = await client.post("/__ploy/api/trigger/ECHO",
                            json={"input": {"blob": "z" * BODY_LIMIT}})
    assert api.status_code == 413

    at_limit = await client.post("/echo", content=b"1" * BODY_LIMIT,
                                 headers={"content-type": "application/json"})
    assert at_limit.status_code == 200
    assert await engine.runtime.list_executions() == []


async def test_handler_exception_is_500_and_the_server_goes_on(
        client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ploy.http"):
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
    assert "kaboom" not in response.text
    [record] = [r for r in caplog.records if r.name == "ploy.http"]
    assert record.exc_info is not None
    assert "kaboom in handler" in str(record.exc_info[1])
    assert (await client.get("/sync")).status_code == 200


async def test_engine_errors_raised_in_handlers(client: httpx.AsyncClient) -> None:
    invalid = await client.get("/bad-trigger")
    assert invalid.status_code == 422
    assert "invalid input for workflow 'order'" in invalid.json()["error"]
    assert {tuple(d["loc"]) for d in invalid.json()["details"]} == {("order_id",), ("amount",)}

    unknown = await client.get("/unknown-binding")
    assert unknown.status_code == 500
    assert "unknown binding 'NOPE'" in unknown.json()["error"]
    assert "ORDER" in unknown.json()["error"]


# -- the engine API --------------------------------------------------------------------------


async def test_list_executions_filters_and_pages_newest_first(
        engine: Engine, client: httpx.AsyncClient) -> None:
    echoes = []
    for i in range(3):
        echoes.append(await trigger(client, "ECHO", {"n": i}))
        await asyncio.sleep(0.005)  # distinct created_at: the order is by trigger time
    order_id = await trigger(client, "ORDER", {"order_id": "o", "amount": 1})
    for eid in [*echoes, order_id]:
        await wait_for_status(engine, eid, "completed")

    everything = (await client.get("/__ploy/api/executions")).json()
    assert [e["execution_id"] for e in everything["executions"]] == [order_id, *echoes[::-1]]
    assert everything["limit"] == 50 and everything["offset"] == 0
    assert everything["has_more"] is False

    page1 = (await client.get("/__ploy/api/executions",
                              params={"workflow": "echo", "limit": 2})).json()
    page2 = (await client.get("/__ploy/api/executions",
                              params={"workflow": "echo", "limit": 2, "offset": 2})).json()
    assert [e["execution_id"] for e in page1["executions"]] == echoes[:0:-1]
    assert page1["has_more"] is True
    assert [e["execution_id"] for e in page2["executions"]] == echoes[:1]
    assert page2["has_more"] is False and page2["offset"] == 2

    summary = page2["executions"][0]
    assert summary["workflow"] == "echo" and summary["status"] == "completed"
    assert summary["steps"] == 1 and summary["error"] is None
    assert summary["duration_ms"] >= 0
    assert summary["created_at"] <= summary["started_at"] <= summary["ended_at"]

    by_binding = (await client.get("/__ploy/api/executions",
                                   params={"workflow": "ORDER"})).json()
    assert [e["execution_id"] for e in by_binding["executions"]] == [order_id]
    none_failed = (await client.get("/__ploy/api/executions",
                                    params={"status": "failed"})).json()
    assert none_failed["executions"] == []

    for bad in ({"status": "done"}, {"limit": "0"}, {"limit": "501"}, {"offset": "-1"},
                {"limit": "ten"}):
        response = await client.get("/__ploy/api/executions", params=bad)
        assert response.status_code == 422, bad


async def test_get_execution_and_its_history(
        engine: Engine, client: httpx.AsyncClient) -> None:
    eid = await trigger(client, "ORDER", {"order_id": "o-9", "amount": 3})
    await wait_for_status(engine, eid, "completed")

    response = await client.get(f"/__ploy/api/executions/{eid}")
    assert response.status_code == 200
    execution = response.json()
    assert execution["execution_id"] == eid and execution["status"] == "completed"
    assert execution["input"] == {"order_id": "o-9", "amount": 3.0}
    assert execution["output"] == {"ok": True, "paid": 3.0}
    assert [s["key"] for s in execution["steps"]] == ["charge"]
    assert execution["steps"][0]["attempts"][0]["attempt"] == 1

    history = (await client.get(f"/__ploy/api/executions/{eid}/history")).json()
    assert history["execution_id"] == eid
    events = history["events"]
    offsets = [e["offset"] for e in events]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert events[0]["type"] == "WorkflowTriggered"
    assert events[-1]["type"] == "WorkflowCompleted"
    assert {"StepStarted", "StepCompleted"} <= {e["type"] for e in events}
    assert len(events) == execution["events"]

    for path in ("/__ploy/api/executions/nope", "/__ploy/api/executions/nope/history"):
        missing = await client.get(path)
        assert missing.status_code == 404
        assert missing.json() == {"error": "unknown execution 'nope'"}


async def test_cancel(engine: Engine, client: httpx.AsyncClient) -> None:
    eid = await trigger(client, "SLOW", None)
    await wait_for_status(engine, eid, "sleeping")

    response = await client.post(f"/__ploy/api/executions/{eid}/cancel",
                                 json={"reason": "changed my mind"})
    assert response.status_code == 200
    assert response.json() == {"cancelled": True}
    assert (await wait_for_status(engine, eid, "cancelled")).status.value == "cancelled"
    execution = (await client.get(f"/__ploy/api/executions/{eid}")).json()
    assert execution["cancel_reason"] == "changed my mind"
    page = (await client.get(f"/__ploy/executions/{eid}")).text
    assert 'data-testid="cancel-reason">changed my mind<' in page

    again = await client.post(f"/__ploy/api/executions/{eid}/cancel")
    assert again.json() == {"cancelled": False}
    missing = await client.post("/__ploy/api/executions/nope/cancel")
    assert missing.status_code == 404
    bad = await client.post(f"/__ploy/api/executions/{eid}/cancel", json={"reason": 5})
    assert bad.status_code == 422


async def test_trigger(engine: Engine, client: httpx.AsyncClient) -> None:
    eid = await trigger(client, "ORDER", {"order_id": "o-1", "amount": 2})
    assert (await wait_for_status(engine, eid, "completed")).workflow == "order"

    first = await trigger(client, "ECHO", {"a": 1}, idempotency_key="k-1")
    second = await trigger(client, "ECHO", {"a": 2}, idempotency_key="k-1")
    assert first == second

    unknown = await client.post("/__ploy/api/trigger/NOPE", json={"input": {}})
    assert unknown.status_code == 404
    assert unknown.json()["bindings"] == ["ECHO", "ORDER", "SLOW"]
    assert "NOPE" in unknown.json()["error"]

    invalid = await client.post("/__ploy/api/trigger/ORDER", json={"input": {"order_id": 1}})
    assert invalid.status_code == 422
    assert {tuple(d["loc"]) for d in invalid.json()["details"]} == {("order_id",), ("amount",)}

    for bad in ({"input": {}, "extra": 1}, {"input": {}, "idempotency_key": 7}):
        assert (await client.post("/__ploy/api/trigger/ECHO", json=bad)).status_code == 422
    malformed = await client.post("/__ploy/api/trigger/ECHO", content=b"{nope",
                                  headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    assert len(await engine.runtime.list_executions()) == 2


async def test_workflows_and_health(engine: Engine, client: httpx.AsyncClient) -> None:
    workflows = (await client.get("/__ploy/api/workflows")).json()
    assert workflows["bindings"]["ORDER"] == {"workflow": "order", "retries": 3}
    assert set(workflows["workflows"]) == {"order", "echo", "slow"}
    order_schema = workflows["workflows"]["order"]
    assert order_schema["bindings"] == ["ORDER"]
    assert order_schema["input_schema"]["required"] == ["order_id", "amount"]
    assert workflows["workflows"]["echo"]["input_schema"] is None

    health = (await client.get("/__ploy/api/health")).json()
    assert health["status"] == "ok"
    assert health["topic"] == engine.runtime.log.topic
    assert health["stalled"] == {}
    assert set(health["partitions"]) == {str(p) for p in engine.runtime.views}
    assert all(p["next_offset"] >= 0 for p in health["partitions"].values())


# -- who may use the engine API -----------------------------------------------------------------


def test_admin_enabled_by_host_and_token() -> None:
    for host in ("127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and admin_enabled(host, None), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", ""):
        assert not admin_enabled(host, None), host
        assert admin_enabled(host, "token"), host


async def test_admin_token_is_required_when_set(
        kafka: str, topic_prefix: str, state_dir: Path) -> None:
    config = make_config(kafka, topic_prefix, state_dir, admin_token="s3cret")
    async with running_engine(worker, config) as engine, client_for(create_app(engine)) as c:
        for path in ("/__ploy/api/executions", "/__ploy/api/health", "/__ploy/"):
            response = await c.get(path)
            assert response.status_code == 401, path
            assert "Bearer" in response.json()["error"]
        wrong = await c.get("/__ploy/api/health", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert (await c.get("/__ploy/api/health", headers=auth)).status_code == 200
        assert (await c.get("/__ploy/", headers=auth)).status_code == 200
        created = await c.post("/__ploy/api/trigger/ECHO", json={"input": 1}, headers=auth)
        assert created.status_code == 201
        # A bearer header is proof enough: no page of another site can send it.
        proxied = await c.post("/__ploy/api/trigger/ECHO", json={"input": 2},
                               headers={**auth, "Origin": "https://ploy.example.com"})
        assert proxied.status_code == 201
        assert (await c.get("/sync")).status_code == 200  # the worker's routes stay open

        assert (await c.get("/__ploy/?token=wrong")).status_code == 401
        login = await c.get("/__ploy/?token=s3cret&status=completed")
        assert login.status_code == 303
        assert login.headers["location"] == "/__ploy/?status=completed"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "s3cret" not in cookie
        # The client keeps the cookie: pages and reads work, writes still need the bearer.
        assert (await c.get("/__ploy/")).status_code == 200
        assert (await c.get("/__ploy/api/executions")).status_code == 200
        refused = await c.post("/__ploy/api/trigger/ECHO", json={"input": 1})
        assert refused.status_code == 401


async def test_non_loopback_without_token_turns_the_api_off(
        engine: Engine, kafka: str) -> None:
    async with client_for(create_app(engine, host="0.0.0.0")) as c:  # noqa: S104
        for path in ("/__ploy/api/executions", "/__ploy/api/health", "/__ploy/"):
            response = await c.get(path)
            assert response.status_code == 403, path
            assert "PLOY_ADMIN_TOKEN" in response.json()["error"]
        refused = await c.post("/__ploy/api/trigger/ECHO", json={"input": 1})
        assert refused.status_code == 403
        assert (await c.get("/sync")).status_code == 200
    assert await engine.runtime.list_executions() == []


async def test_without_token_only_loopback_hosts_and_same_site_writes(
        engine: Engine, client: httpx.AsyncClient) -> None:
    rebound = await client.get("/__ploy/api/health", headers={"Host": "evil.example:8787"})
    assert rebound.status_code == 403
    assert "loopback" in rebound.json()["error"]
    assert (await client.get("/__ploy/api/health",
                             headers={"Host": "localhost:8787"})).status_code == 200

    cross = await client.post("/__ploy/api/trigger/ECHO", json={"input": 1},
                              headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    fetch_site = await client.post("/__ploy/api/trigger/ECHO", json={"input": 1},
                                   headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch_site.status_code == 403
    same = await client.post("/__ploy/api/trigger/ECHO", json={"input": 1},
                             headers={"Origin": "http://127.0.0.1:8787"})
    assert same.status_code == 201
    assert len(await engine.runtime.list_executions()) == 1


# -- the dashboard ------------------------------------------------------------------------------


async def test_dashboard_escapes_what_executions_carry(
        engine: Engine, client: httpx.AsyncClient) -> None:
    eid = await trigger(client, "ECHO", {"note": XSS})
    await wait_for_status(engine, eid, "completed")

    page = await client.get(f"/__ploy/executions/{eid}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    assert XSS not in page.text
    assert html.escape(XSS, quote=False) in page.text  # the input, the step output, the log
    assert page.text.count(html.escape(XSS, quote=False)) >= 3
    assert 'data-testid="execution-status"' in page.text

    listing = await client.get("/__ploy/")
    assert listing.status_code == 200
    assert f'data-execution="{eid}"' in listing.text
    assert XSS not in listing.text


async def test_dashboard_pages(engine: Engine, client: httpx.AsyncClient) -> None:
    order_id = await trigger(client, "ORDER", {"order_id": "o-1", "amount": 2})
    echo_id = await trigger(client, "ECHO", {"n": 1})
    await wait_for_status(engine, order_id, "completed")
    await wait_for_status(engine, echo_id, "completed")

    assert (await client.get("/__ploy", follow_redirects=False)).status_code == 307
    filtered = await client.get("/__ploy/", params={"workflow": "order"})
    assert f'data-execution="{order_id}"' in filtered.text
    assert f'data-execution="{echo_id}"' not in filtered.text
    by_status = await client.get("/__ploy/", params={"status": "failed"})
    assert 'data-testid="executions-empty"' in by_status.text

    detail = (await client.get(f"/__ploy/executions/{order_id}")).text
    assert detail.count('data-testid="step-row"') == 1
    assert detail.count('data-testid="timeline-bar"') == 1
    assert detail.count('data-testid="attempt-row"') == 0  # one clean attempt: the step says it all
    assert "1 attempt" in detail
    assert detail.count('data-testid="event-row"') == len(
        await engine.runtime.history(order_id) or [])
    missing = await client.get("/__ploy/executions/nope")
    assert missing.status_code == 404
    assert "No execution with id nope" in missing.text


async def test_a_summary_from_the_record_alone_matches_the_full_execution(
        engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    done = await trigger(client, "ORDER", {"order_id": "o-s", "amount": 1})
    sleeping = await trigger(client, "SLOW", None)
    await wait_for_status(engine, done, "completed")
    await wait_for_status(engine, sleeping, "sleeping")
    runtime = engine.runtime
    for eid in (done, sleeping):
        view = runtime.views[runtime.log.partition_for(eid)]
        full = await runtime.get_execution(eid)
        assert full is not None
        assert build_summary(view, eid) == ExecutionSummary.of(full)
    assert build_summary(view, "nope") is None

    # The list endpoint and page take summaries as well as full executions.
    api_before = (await client.get("/__ploy/api/executions")).json()
    page_before = (await client.get("/__ploy/")).text
    full_list = runtime.list_executions

    async def summaries(**query: Any) -> list[ExecutionSummary]:
        return [ExecutionSummary.of(e) for e in await full_list(**query)]

    monkeypatch.setattr(runtime, "list_executions", summaries)
    assert (await client.get("/__ploy/api/executions")).json() == api_before
    page_after = (await client.get("/__ploy/")).text
    assert _rows(page_after) == _rows(page_before) and len(_rows(page_after)) == 2


def _rows(page: str) -> list[str]:
    """The table rows of the executions page, without the durations (a live one grows)."""
    rows = re.findall(r'<tr data-testid="execution-row".*?</tr>', page, re.S)
    duration = r'<td class="num">(?!\d+</td>)[^<]+(<span[^>]*>[^<]*</span>)?</td>'
    return [re.sub(duration, "", row) for row in rows]


# -- a real server -------------------------------------------------------------------------------


async def test_real_uvicorn_server(engine: Engine) -> None:
    async with serving(create_app(engine)) as base, httpx.AsyncClient(base_url=base) as c:
        created = await c.post("/orders", json={"order_id": "o-tcp", "amount": 4})
        assert created.status_code == 200, created.text
        eid = created.json()["execution_id"]
        await wait_for_status(engine, eid, "completed")
        status = await c.get(f"/orders/{eid}/status")
        assert status.json()["status"] == "completed"

        assert (await c.get("/boom")).status_code == 500
        assert (await c.get("/items/1")).status_code == 200

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"z" * 1024

        assert (await c.post("/echo", content=chunks())).status_code == 413
        listed = (await c.get("/__ploy/api/executions")).json()
        assert [e["execution_id"] for e in listed["executions"]] == [eid]
        page = await c.get(f"/__ploy/executions/{eid}")
        assert page.status_code == 200 and "o-tcp" in page.text
