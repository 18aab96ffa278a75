"""HTTP: the worker's routes, the engine API and its guard, on one Starlette app.

=========================  ====================================================
``/...``                   the routes of ``ploy().get/post/...`` (``/orders/:id``)
``/__ploy/api/...``        the engine's JSON API (list, get, history, cancel, rerun, as-of, ...)
``/__ploy/``               the dashboard (``engine.dashboard``), behind the same guard
=========================  ====================================================

A user route's request goes through these steps (``_UserRoute.handle``):

1. Validate the path parameters, the query string and the JSON body against
   the route's models (plain dicts without one); a mismatch is a 422 naming
   every field, and the handler is not called.
2. Call the handler with a :class:`RequestContext` (a sync handler runs in
   the thread pool).
3. Validate what it returned against the route's ``response`` model; a
   mismatch is the server's fault: a 500 and a log line.

Whatever goes wrong in a handler is answered with JSON and logged on
``ploy.http``; the server keeps serving. A body over ``http.max_body_bytes`` is
refused with a 413 before or while it streams in.

The engine API and the dashboard can trigger and cancel any execution, so
they are guarded (see :func:`admin_enabled`): with ``PLOY_ADMIN_TOKEN`` set they
need ``Authorization: Bearer <token>`` (the dashboard also takes ``?token=``
once and keeps an HttpOnly cookie); without a token they are served only on a
loopback address, to requests whose ``Host`` is a loopback name (so a web page
cannot reach them by DNS rebinding). Cross-site writes are refused always.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import asof, payloads, rerun
from engine.actions import Actions, Csrf, form_fields
from engine.bindings import workflow_named
from engine.dashboard import DASHBOARD, Dashboard, redirect
from engine.durations import parse_duration
from engine.errors import (
    CommandError,
    InvalidInputError,
    InvalidKeyError,
    NotFoldedHereError,
    NotStalledError,
    OwnerUnavailableError,
    PartitionStalledError,
    PayloadTooLargeError,
    RerunError,
    StepNotResolvableError,
    SubjectErasedError,
    UnknownBindingError,
    UnknownExecutionError,
)
from engine.listing import Cursor
from engine.metrics import CONTENT_TYPE
from engine.models import Execution, ExecutionStatus, ExecutionSummary, HistoryEntry
from engine.tracing import TraceparentMiddleware

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.bindings import Env
    from engine.builder import RouteDef

__all__ = [
    "API",
    "RequestContext",
    "admin_enabled",
    "create_app",
    "is_loopback",
    "starlette_path",
]

logger = logging.getLogger("ploy.http")

API = "/__ploy/api"
METRICS = "/__ploy/metrics"  # also /metrics, unless a route of the app has that path
COOKIE = "ploy_admin"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_SEED_PARAM = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
_STATUSES = [s.value for s in ExecutionStatus]
_OFF = (
    "the engine API and dashboard are off: this server listens on {host}, which is not a "
    "loopback address, and no admin token is set; set PLOY_ADMIN_TOKEN to turn them on "
    "(clients then send 'Authorization: Bearer <token>')"
)

Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


# -- public helpers -------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def _host_of(header: str) -> tuple[str, bool]:
    """The host name of a ``Host`` header, and whether it is a loopback one (asked on
    every engine API request without a token: parsing an address costs ~15 us)."""
    host = urlsplit(f"//{header}").hostname or ""
    return host, is_loopback(host)


def admin_enabled(host: str, token: str | None) -> bool:
    """Whether the engine API and dashboard are served by a server bound to ``host``.

    They can trigger and cancel any execution: with an admin token they are on
    (and need the token); without one, only on a loopback address.
    """
    return bool(token) or is_loopback(host)


def starlette_path(path: str) -> str:
    """The seed's route syntax in Starlette's: ``/orders/:id/status`` -> ``/orders/{id}/status``."""
    if not path.startswith("/"):
        raise ValueError(f"route path {path!r} must start with '/'")
    return _SEED_PARAM.sub(r"{\1}", path)


@dataclass(frozen=True)
class RequestContext:
    """What a route handler receives.

    ``params``, ``query`` and ``body`` are instances of the route's models
    when it declares them, else a dict of strings (params, query) and the
    decoded JSON body or None.
    """

    params: Any
    query: Any
    body: Any
    env: Env
    headers: Headers
    request: Request


def create_app(engine: Engine, *, host: str | None = None) -> Starlette:
    """The ASGI app serving ``engine.worker.routes``, the engine API and the dashboard.

    Args:
        engine: The engine whose bindings the routes use (started before requests).
        host: The address the server listens on, which decides whether the API
            and dashboard are served without a token (default ``config.http.host``).
    """
    http = engine.config.http
    csrf = Csrf(COOKIE)
    admin = _Admin(http.host if host is None else host, http.admin_token, csrf=csrf)
    api = _Api(engine, http.admin_token)
    pages = Dashboard(engine, csrf)
    actions = Actions(engine, pages, csrf)
    routes: list[BaseRoute] = [
        # The router tries routes in order (a pattern match each): the busiest first.
        admin.route(f"{API}/trigger/{{binding}}", api.trigger, write=True),
        admin.route(f"{API}/executions/{{id}}/result", api.result),
        admin.route(f"{API}/executions", api.executions),
        admin.route(f"{API}/executions/{{id}}", api.execution),
        admin.route(f"{API}/executions/{{id}}/history", api.history),
        admin.route(f"{API}/executions/{{id}}/events", api.events),
        admin.route(f"{API}/executions/{{id}}/cancel", api.cancel, write=True),
        admin.route(f"{API}/partitions/{{partition:int}}/skip", api.skip, write=True),
        admin.route(f"{API}/events", api.send_event, write=True),
        admin.route(f"{API}/executions/{{id}}/complete-step", api.complete_step, write=True),
        admin.route(f"{API}/executions/{{id}}/retry-now", api.retry_now, write=True),
        admin.route(f"{API}/workflows", api.workflows),
        admin.route(f"{API}/health", api.health),
        admin.route(f"{API}/workers", api.workers),
        admin.route(f"{API}/schedules", api.schedules),
        admin.route(f"{API}/schedules/{{name}}", api.schedule),
        admin.route(f"{API}/schedules/{{name}}/{{action}}", api.schedule_action, write=True),
        admin.route(METRICS, api.metrics),
        admin.route(f"{API}/changes", api.changes),
        admin.route(f"{API}/as-of", api.as_of),
        admin.route(f"{API}/executions/{{id}}/rerun", api.rerun, write=True),
        admin.route(f"{API}/rerun", api.rerun_many, write=True),
        admin.route(f"{API}/subjects/{{subject}}/erase", api.erase, write=True),
        Route(DASHBOARD, redirect),
        admin.route(f"{DASHBOARD}/", pages.index, page=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}", pages.detail, page=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/cancel", actions.cancel, form=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/rerun", actions.rerun, form=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/send-event", actions.send_event, form=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/complete-step", actions.complete_step,
                    form=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/retry-now", actions.retry_now, form=True),
        admin.route(f"{DASHBOARD}/executions/{{id}}/history.jsonl", pages.history_download,
                    page=True),
        admin.route(f"{DASHBOARD}/workflows", pages.workflows, page=True),
        admin.route(f"{DASHBOARD}/workers", pages.workers, page=True),
        admin.route(f"{DASHBOARD}/schedules", pages.schedules, page=True),
        admin.route(f"{DASHBOARD}/schedules/{{name}}/{{action}}", actions.schedule, form=True),
        admin.route(f"{DASHBOARD}/events", pages.events, page=True),
        admin.route(f"{DASHBOARD}/events", actions.send_any_event, form=True),
        admin.route(f"{DASHBOARD}/workflows/{{binding}}/trigger", actions.trigger_form, page=True),
        admin.route(f"{DASHBOARD}/workflows/{{binding}}/trigger", actions.trigger, form=True),
    ]
    if not any(starlette_path(r.path) == "/metrics" for r in engine.worker.routes):
        routes.append(admin.route("/metrics", api.metrics))  # where scrapers look first
    for route in engine.worker.routes:
        path = starlette_path(route.path)
        if path == DASHBOARD or path.startswith(DASHBOARD + "/"):
            raise ValueError(f"route {route.method} {route.path}: {DASHBOARD} is the engine's")
        routes.append(Route(path, _UserRoute(route, engine).handle, methods=[route.method]))
    return Starlette(
        routes=routes,
        middleware=[Middleware(_BodyLimit, limit=http.max_body_bytes),
                    Middleware(TraceparentMiddleware)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


# -- errors and limits ------------------------------------------------------------


class _TotalJSON(JSONResponse):
    """JSON that always encodes: a lone surrogate in a value is written as its escape."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":"))
        return payloads.utf8(text)


class _EngineJSON(_TotalJSON):
    """The engine's own answers, rendered by orjson (~5x cheaper than json.dumps) where it
    can: their payloads hold no NaN or infinity (recorded with allow_nan=False), which
    orjson would write as null. A user route's value may, so it is rendered strictly."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # a lone surrogate, an int over 64 bits, a key not a string
            return super().render(content)


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return _EngineJSON(payload, status_code=status, headers=headers)


class _Reject(Exception):  # noqa: N818 - a response to send, not an error
    """Ends a request early with ``response`` (bad input, unknown id)."""

    def __init__(self, status: int, payload: Any):
        super().__init__(status)
        self.response = _json(status, payload)


def _errors(exc: ValidationError, *, include_input: bool = True) -> list[Any]:
    """Pydantic's errors as JSON-safe data."""
    errors: list[Any] = json.loads(exc.json(include_url=False, include_input=include_input))
    return errors


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _json(404, {"error": "not found", "path": request.url.path})
    if exc.status_code == 405:
        return _json(405, {"error": "method not allowed", "path": request.url.path},
                     headers=exc.headers)
    return _json(exc.status_code, {"error": exc.detail}, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # Handlers answer their own errors; this is the last resort for a bug in this module.
    return _json(500, {"error": "internal error"})


class _BodyTooLarge(Exception):  # noqa: N818 - a signal out of ``receive``
    pass


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes: by Content-Length, or as they stream.

    Before answering 413 it reads and drops up to ``DRAIN_BYTES`` more of the
    body, so that a client still uploading gets the answer instead of a reset
    connection; a bigger upload is cut off.
    """

    DRAIN_BYTES = 1 << 20

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.limit):
            if length.strip().isdigit() and int(length) <= self.limit + self.DRAIN_BYTES:
                await self._drain(receive)
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body", False):
                        await self._drain(receive)
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _drain(self, receive: Receive) -> None:
        budget = self.DRAIN_BYTES
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _json(413, {"error": f"request body over the limit of {self.limit} bytes",
                               "limit": self.limit}, headers={"Connection": "close"})
        await response(scope, receive, send)


# -- the worker's routes ------------------------------------------------------------


class _UserRoute:
    """The endpoint of one ``RouteDef`` (see the module docstring for its steps)."""

    def __init__(self, route: RouteDef, engine: Engine):
        self.route, self.engine = route, engine
        self.label = f"{route.method} {route.path}"

    async def handle(self, request: Request) -> Response:
        route = self.route
        try:
            # Step 1.
            params = _validate(route.params, dict(request.path_params), "path parameters")
            query = _validate(route.query, dict(request.query_params), "query parameters")
            body = await _read_body(request, route.body)
        except _Reject as reject:
            return reject.response
        # Step 2.
        try:
            ctx = RequestContext(params, query, body, self.engine.env, request.headers, request)
            if inspect.iscoroutinefunction(route.handler):
                result = await route.handler(ctx)
            else:
                result = await run_in_threadpool(route.handler, ctx)
            if inspect.isawaitable(result):
                result = await result
        except (HTTPException, _BodyTooLarge):
            raise
        except InvalidInputError as exc:
            return _json(422, {"error": str(exc), "details": exc.errors})
        except InvalidKeyError as exc:
            return _json(422, {"error": str(exc)})
        except PayloadTooLargeError as exc:
            return _json(413, {"error": str(exc)})
        except PartitionStalledError as exc:
            logger.error("%s: %s", self.label, exc)
            return _json(503, {"error": str(exc)})
        except UnknownBindingError as exc:
            logger.error("%s: %s", self.label, exc)
            return _json(500, {"error": str(exc)})
        except Exception:
            logger.exception("%s: the handler raised", self.label)
            return _json(500, {"error": "internal error"})
        # Step 3.
        return self._respond(result)

    def _respond(self, result: Any) -> Response:
        if isinstance(result, Response):
            return result
        model = self.route.response
        if model is not None:
            if isinstance(result, BaseModel) and not isinstance(result, model):
                result = result.model_dump()
            try:
                result = result if isinstance(result, model) else model.model_validate(result)
            except ValidationError as exc:
                # The handler's data is not the client's: keep its values out of the answer.
                details = _errors(exc, include_input=False)
                logger.error("%s: the response does not match %s: %s",
                             self.label, model.__name__, details)
                return _json(500, {"error": "response validation failed", "details": details})
        try:
            return _TotalJSON(to_jsonable_python(result))  # NaN: refused, as below
        except Exception:
            logger.exception("%s: the handler returned a value that is not JSON", self.label)
            return _json(500, {"error": "internal error"})


def _validate(model: type[BaseModel] | None, data: dict[str, str], what: str) -> Any:
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Reject(422, {"error": f"invalid {what}", "details": _errors(exc)}) from None


async def _read_body(request: Request, model: type[BaseModel] | None) -> Any:
    """The JSON body, validated by ``model``; without a model, None for a non-JSON body."""
    raw = await request.body()
    if not raw.strip():
        if model is None:
            return None
        raise _Reject(422, {"error": "invalid request body", "details": [
            {"type": "missing", "loc": ["body"], "msg": "a JSON request body is required"}]})
    content_type = request.headers.get("content-type", "").lower()
    if model is None and content_type and "json" not in content_type:
        return None  # a form or text body: the handler reads ctx.request itself
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _Reject(422, {"error": f"malformed JSON body: {exc}"}) from None
    surrogate = payloads.lone_surrogate(raw.decode()) if b"\\u" in raw else None
    if surrogate is not None:
        raise _Reject(422, {"error": f"invalid request body: a lone surrogate ({surrogate}) "
                                     "is not valid Unicode"})
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Reject(422, {"error": "invalid request body", "details": _errors(exc)}) from None


# -- the guard of the engine API and the dashboard -------------------------------------


class _Admin:
    """Decides who may use the engine API and the dashboard (module docstring)."""

    def __init__(self, host: str, token: str | None, *, csrf: Csrf | None = None):
        self.host, self.token = host, token or None
        self.csrf = csrf or Csrf(COOKIE)
        self.enabled = admin_enabled(host, self.token)
        # The cookie holds a digest of the token, never the token itself.
        self.cookie = None if self.token is None else hmac.new(
            self.token.encode(), b"ploy-dashboard", hashlib.sha256).hexdigest()

    def route(self, path: str, handler: Endpoint, *, write: bool = False,
              page: bool = False, form: bool = False) -> Route:
        """A Route running ``handler`` behind this guard, with errors answered as JSON.

        ``form``: a dashboard form's POST (see :meth:`refuse_form`).
        """
        write = write or form

        async def endpoint(request: Request) -> Response:
            if page and "token" in request.query_params:
                return self._login(request)
            refused = (await self.refuse_form(request)) if form else self.refuse(request,
                                                                                 write=write)
            if refused is not None:
                return refused
            try:
                return await handler(request)
            except _Reject as reject:
                return reject.response
            except (HTTPException, _BodyTooLarge):
                raise
            except NotFoldedHereError as exc:  # a routed query reached a former owner
                return _json(409, {"error": str(exc), "partition": exc.partition})
            except OwnerUnavailableError as exc:
                return _json(503, {"error": str(exc), "partition": exc.partition})
            except Exception:
                logger.exception("%s %s failed", request.method, request.url.path)
                return _json(500, {"error": "internal error"})

        return Route(path, endpoint, methods=["POST"] if write else ["GET"])

    def refuse(self, request: Request, *, write: bool) -> Response | None:
        """The answer refusing ``request``, or None to let it through."""
        if not self.enabled:
            return _json(403, {"error": _OFF.format(host=self.host)})
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if self.token is not None and scheme.lower() == "bearer" and _same(supplied.strip(),
                                                                          self.token):
            return None  # a page of another site cannot send this header (no CORS here)
        if write and _cross_site(request):
            return _json(403, {"error": "cross-site request refused"})
        if self.token is None:
            host, loopback = _host_of(request.headers.get("host", ""))
            if loopback:
                return None
            return _json(403, {"error": f"Host '{host}' is not a loopback name; without "
                                        "PLOY_ADMIN_TOKEN the engine API answers only "
                                        "localhost and loopback addresses"})
        cookie = request.cookies.get(COOKIE)
        if not write and cookie is not None and self.cookie and _same(cookie, self.cookie):
            return None
        return _json(401, {"error": "unauthorized: send 'Authorization: Bearer <PLOY_ADMIN_TOKEN>'"
                                    f" (or open {DASHBOARD}/?token=<token> once in a browser)"},
                     headers={"WWW-Authenticate": 'Bearer realm="ploy"'})

    async def refuse_form(self, request: Request) -> Response | None:
        """The answer refusing a dashboard form's POST, or None to let it through.

        The bearer header admits it as any write. A browser has no bearer: its form
        must carry this process's CSRF token (``engine.actions.Csrf``), and then its
        session admits it as a read would be, except that it may not come from
        another site: an open loopback server, or the cookie of a token login.
        """
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if self.token is not None and scheme.lower() == "bearer" and _same(supplied.strip(),
                                                                          self.token):
            return None
        if not self.enabled or _cross_site(request):
            return self.refuse(request, write=True)
        fields = await form_fields(request)
        if not self.csrf.valid(request, fields.get(self.csrf.FIELD, "")):
            return _json(403, {"error": "the form's CSRF token is missing or stale: reload the "
                                        "dashboard page and submit again"})
        cookie = request.cookies.get(COOKIE)
        if self.token is not None and cookie is not None and self.cookie and _same(cookie,
                                                                                   self.cookie):
            return None
        return self.refuse(request, write=True)

    def _login(self, request: Request) -> Response:
        """``?token=``: keep it in a cookie, then show the page without it in the URL."""
        if self.token is None or not self.enabled:  # no token to keep
            return self.refuse(request, write=False) or RedirectResponse(request.url.path, 303)
        if not _same(request.query_params["token"], self.token):
            return _json(401, {"error": "wrong admin token"})
        query = request.url.remove_query_params("token").query
        response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), 303)
        assert self.cookie is not None
        response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict",
                            path=DASHBOARD, secure=request.url.scheme == "https")
        return response


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _cross_site(request: Request) -> bool:
    """A browser request made by another site's page (CSRF), by Sec-Fetch-Site or Origin."""
    if request.headers.get("sec-fetch-site", "") in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


# -- the engine API ------------------------------------------------------------------------


class _TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Any = None
    idempotency_key: str | None = None
    subject: str | None = None  # the data subject whose key seals its payloads


class _EraseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str
    actor: str | None = None  # who, as the client says: kept only without an admin token


class _CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = None
    actor: str | None = None  # who, as the client says: kept only without an admin token


class _StepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str
    reason: str
    output: Any = None
    actor: str | None = None  # who, as the client says: kept only without an admin token


class _RerunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_step: str | None = None
    dry_run: bool = False
    reason: str | None = None
    actor: str | None = None  # who, as the client says: kept only without an admin token


class _BulkRerunBody(_RerunBody):
    workflow: str | None = None
    status: str | None = None
    since: str | int | None = None  # ISO-8601 or epoch ms
    limit: int = Field(default=1000, ge=1, le=10_000)


class _EventBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    data: Any = None
    id: str | None = None
    source: str | None = None
    execution_id: str | None = None


class _SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    offset: int
    reason: str
    actor: str | None = None  # who, as the client says: kept only without an admin token


class _ScheduleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = None
    actor: str | None = None  # who, as the client says: kept only without an admin token


_SCHEDULE_ACTIONS = {"pause": "paused", "resume": "resumed"}


class _Api:
    """``/__ploy/api``: JSON over the runtime's queries and commands."""

    def __init__(self, engine: Engine, token: str | None = None):
        self.engine = engine
        self.token = token

    async def executions(self, request: Request) -> Response:
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _int_param(q.get("offset"), "offset", 0, 0, None)
        status = q.get("status") or None
        if status is not None and status not in _STATUSES:
            raise _Reject(422, {"error": f"unknown status '{status}'", "statuses": _STATUSES})
        workflow = q.get("workflow") or None
        if workflow is not None:
            workflow = workflow_named(workflow, self.engine.env, self.engine.worker.workflows)
        partitions = _partitions_param(q.get("partitions"), self.engine.runtime.log.partitions)
        try:
            before = Cursor.parse(q["before"]) if q.get("before") else None
        except ValueError as exc:
            raise _Reject(422, {"error": f"before: {exc}"}) from None
        page = await self.engine.list_page(
            workflow=workflow, status=status, before=before, limit=limit, offset=offset,
            partitions=partitions, local=bool(q.get("local")))
        executions = [ExecutionSummary.of(e).model_dump(mode="json") for e in page.executions]
        # ``next``: pass it as ``before`` for the page after this one (a cursor: stable
        # while new executions arrive, unlike ``offset``). None: nothing older.
        return _json(200, {"executions": executions, "limit": limit, "offset": offset,
                           "has_more": page.next is not None,
                           "next": None if page.next is None else str(page.next)})

    async def execution(self, request: Request) -> Response:
        execution = await self._get(request)
        return _json(200, execution.model_dump(mode="json"))

    async def history(self, request: Request) -> Response:
        """Every event of the execution; of one that retention removed from the view too
        (read from its partition of the log: ``engine.retention``)."""
        eid = request.path_params["id"]
        events = await self.engine.history(eid, **_routed(request))
        if events is None:
            raise _Reject(404, {"error": f"unknown execution '{eid}'"})
        return _json(200, {"execution_id": eid,
                           "events": [e.model_dump(mode="json") for e in events]})

    async def result(self, request: Request) -> Response:
        """Long-poll: the execution once it has ended (200), or 202 with it as it stands
        when ``wait`` (default 30 s, at most 60 s) ran out. Woken by the fold of the end
        event, not by polling."""
        eid = request.path_params["id"]
        wait_s = _wait_param(request.query_params.get("wait"))
        routed = _routed(request)
        try:
            execution = await self.engine.runtime.wait_for_end(eid, wait_s, **routed)
        except TimeoutError:
            execution = await self.engine.get_execution(eid, **routed)
            if execution is not None:
                return _json(202, execution.model_dump(mode="json"))
        if execution is None:
            raise _Reject(404, {"error": f"unknown execution '{eid}'"})
        return _json(200, execution.model_dump(mode="json"))

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: every event of the execution in log order (each with its
        offset as the SSE id, so a reconnect with ``Last-Event-ID`` goes on from there),
        then each new one as its partition's fold applies it; ends after the end event."""
        execution = await self._get(request)
        last = request.headers.get("last-event-id") or request.query_params.get("after")
        after = int(last) if last and last.lstrip("-").isdecimal() else -1
        stream = self.engine.runtime.stream(execution.execution_id, after=after)
        return StreamingResponse(_sse(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def skip(self, request: Request) -> Response:
        """Skip the corrupt record a partition is stopped at (``ploy skip``), with who and why.

        The actor is ``admin-token`` when a token guards the API (a client cannot
        name itself then); on an open loopback API it is what the client says.
        """
        partition = request.path_params["partition"]
        body = await _read_body(request, _SkipBody)
        assert isinstance(body, _SkipBody)
        if self.token is not None:
            actor = "admin-token"
        else:
            actor = f"local:{body.actor or 'unknown'}"
        try:
            at = await self.engine.skip(partition, body.offset, body.reason, actor)
        except NotStalledError as exc:
            raise _Reject(409, {"error": str(exc), "stalled_at": exc.stalled_at}) from None
        except ValueError as exc:
            raise _Reject(422, {"error": str(exc)}) from None
        return _json(201, {"partition": partition, "offset": body.offset,
                           "marker_offset": at, "actor": actor})

    async def cancel(self, request: Request) -> Response:
        execution = await self._get(request)
        body = await _read_body(request, _CancelBody) if (await request.body()).strip() else None
        reason = body.reason if isinstance(body, _CancelBody) else None
        actor = self._actor(body.actor if isinstance(body, _CancelBody) else None)
        cancelled = await self.engine.cancel(execution.execution_id, reason, actor)
        return _json(200, {"cancelled": cancelled})

    async def complete_step(self, request: Request) -> Response:
        """Complete a running or retrying step with the operator's output (skip it)."""
        return await self._resolve(request, "complete")

    async def retry_now(self, request: Request) -> Response:
        """End a retrying step's backoff wait: its next attempt starts now."""
        return await self._resolve(request, "retry-now")

    async def _resolve(self, request: Request, action: str) -> Response:
        execution = await self._get(request)
        body = await _read_body(request, _StepBody)
        try:
            done = await self.engine.resolve_step(
                execution.execution_id, body.step, action, output=body.output,
                reason=body.reason, actor=self._actor(body.actor))
        except PayloadTooLargeError as exc:
            raise _Reject(413, {"error": str(exc)}) from None
        except (StepNotResolvableError, SubjectErasedError) as exc:  # (erased: no key to seal)
            raise _Reject(409, {"error": str(exc)}) from None
        except ValueError as exc:  # no reason, an unknown action
            raise _Reject(422, {"error": str(exc)}) from None
        return _json(200, {"resolved": done, "step": body.step, "action": action})

    def _actor(self, claimed: str | None) -> str:
        """Who asks, for the audit trail: ``admin-token`` when a token guards the API (a
        client cannot name itself then), else ``local:<what the client says>`` (the open
        API answers loopback requests only)."""
        return "admin-token" if self.token is not None else f"local:{claimed or 'unknown'}"

    async def trigger(self, request: Request) -> Response:
        """Start an execution: 201 with its id (and where it is in the log).

        With ``?wait=30s`` (at most 60 s) the answer waits for its end, as a
        synchronous call: 200 and the ended execution (the result's answer), or
        202 with its id when the wait ran out (then ask ``.../result``). One
        round trip instead of two for a client that wants the result.
        """
        binding = request.path_params["binding"]
        env = self.engine.env
        if binding not in env:
            known = sorted(env)
            raise _Reject(404, {"error": f"unknown binding '{binding}'", "bindings": known})
        raw_wait = request.query_params.get("wait")
        wait_s = None if raw_wait is None else _wait_param(raw_wait)
        body = await _read_body(request, _TriggerBody)
        try:
            result = await env[binding].trigger(body.input, idempotency_key=body.idempotency_key,
                                                subject=body.subject)
        except InvalidInputError as exc:
            raise _Reject(422, {"error": str(exc), "details": exc.errors}) from None
        except InvalidKeyError as exc:
            raise _Reject(422, {"error": str(exc)}) from None
        except PayloadTooLargeError as exc:
            raise _Reject(413, {"error": str(exc)}) from None
        except PartitionStalledError as exc:
            raise _Reject(503, {"error": str(exc)}) from None
        except ValueError as exc:  # a bad subject
            raise _Reject(422, {"error": str(exc)}) from None
        eid = result["execution_id"]
        runtime = self.engine.runtime
        partition = runtime.log.partition_for(eid)
        # Read-your-writes from anywhere: GET .../executions/{id}?min_offset=<offset>
        # answers once the view holds this trigger.
        offset = runtime.log.high_acked.get(partition)
        started = {"execution_id": eid, "partition": partition, "offset": offset}
        if wait_s is None:
            return _json(201, started)
        # The execution started on the trigger's acknowledgement (a task) runs up to its
        # first wait before this caller's wait is set up: it is what the caller waits for.
        await asyncio.sleep(0)
        # It is started: whatever the wait meets (it ran out, the owner is changing), the
        # answer says so, never an error that would invite a second trigger.
        try:
            execution = await runtime.wait_for_end(eid, wait_s, min_offset=offset)
        except Exception as exc:
            if not isinstance(exc, TimeoutError):
                logger.info("trigger %s: waiting for its end: %s", eid, exc)
            return _json(202, started)
        if execution is None:  # gone already (a retention of 0)
            return _json(202, started)
        return _json(200, execution.model_dump(mode="json"))

    async def erase(self, request: Request) -> Response:
        """Destroy a data subject's key and record who and why (``ploy erase``)."""
        body = await _read_body(request, _EraseBody)
        assert isinstance(body, _EraseBody)
        try:
            erased = await self.engine.erase(request.path_params["subject"],
                                             body.reason, self._actor(body.actor))
        except ValueError as exc:  # a bad subject, no reason
            raise _Reject(422, {"error": str(exc)}) from None
        return _json(200, erased)

    async def send_event(self, request: Request) -> Response:
        """An event for waiting executions: every matching waiter, or ``execution_id`` only."""
        body = await _read_body(request, _EventBody)
        try:
            sent = await self.engine.send_event(body.type, body.data, id=body.id,
                                                source=body.source,
                                                execution_id=body.execution_id)
        except UnknownExecutionError as exc:
            raise _Reject(404, {"error": str(exc)}) from None
        except PayloadTooLargeError as exc:
            raise _Reject(413, {"error": str(exc)}) from None
        except (ValueError, TypeError) as exc:  # a bad type, id, or data
            raise _Reject(422, {"error": str(exc)}) from None
        return _json(202, sent)

    async def workflows(self, request: Request) -> Response:
        config = self.engine.config
        bindings = {
            name: {"workflow": b.name, "retries": config.retries if b.retries is None
                   else b.retries}
            for name, b in config.workflow.items()
        }
        workflows = {
            name: {
                "bindings": [b for b, target in config.workflow.items() if target.name == name],
                "input_schema": wf.input.model_json_schema() if wf.input else None,
                "output_schema": wf.output.model_json_schema() if wf.output else None,
            }
            for name, wf in self.engine.worker.workflows.items()
        }
        return _json(200, {"bindings": bindings, "workflows": workflows})

    async def health(self, request: Request) -> Response:
        return _json(200, self.engine.health())

    async def workers(self, request: Request) -> Response:
        """Who runs each partition (its claim on the log) and how far behind it is."""
        return _json(200, await self.engine.workers())

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format 0.0.4 (``engine.metrics``)."""
        text = await self.engine.runtime.metrics.render(self.engine.runtime)
        return Response(text, headers={"Content-Type": CONTENT_TYPE})

    async def schedules(self, request: Request) -> Response:
        """Every schedule of ploy.yaml as configured and as the log has it."""
        return _json(200, {"schedules": await self.engine.runtime.schedules.states()})

    async def schedule(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            state = await self.engine.runtime.schedules.state(name, **_routed(request))
        except KeyError:
            raise _Reject(404, {"error": f"unknown schedule '{name}'"}) from None
        return _json(200, state)

    async def schedule_action(self, request: Request) -> Response:
        """``pause``, ``resume`` or ``trigger`` (now) a schedule, with who and why (the
        actor as for ``skip``)."""
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in (*_SCHEDULE_ACTIONS, "trigger"):
            raise _Reject(404, {"error": f"unknown schedule action '{action}'",
                                "actions": [*_SCHEDULE_ACTIONS, "trigger"]})
        schedules = self.engine.runtime.schedules
        if self.engine.config.schedule(name) is None:
            raise _Reject(404, {"error": f"unknown schedule '{name}'"})
        raw = (await request.body()).strip()
        body = await _read_body(request, _ScheduleBody) if raw else _ScheduleBody()
        assert isinstance(body, _ScheduleBody)
        actor = "admin-token" if self.token is not None else f"local:{body.actor or 'unknown'}"
        if action == "trigger":
            eid = await schedules.trigger_now(name, actor, body.reason)
            partition = self.engine.runtime.log.partition_for(eid)
            return _json(201, {"execution_id": eid, "partition": partition,
                               "offset": self.engine.runtime.log.high_acked.get(partition)})
        await schedules.update(name, _SCHEDULE_ACTIONS[action], actor, body.reason)
        return _json(200, await schedules.state(name))
    async def changes(self, request: Request) -> Response:
        """Server-Sent Events: ``{"executions": [id, ...]}`` each time the fold here
        changes executions (a burst in one event), so a list can refresh when, and only
        when, something changed. Partitions folded by another process are not seen."""
        return StreamingResponse(_sse_changes(self.engine.runtime.changes()),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def as_of(self, request: Request) -> Response:
        """The system as it stood at ``at`` (``engine.asof``): with ``id``, that execution and
        its history then; else the list then (``workflow``, ``status``, ``limit``)."""
        q = request.query_params
        if not q.get("at"):
            raise _Reject(422, {"error": "at: a point of the log is needed (p0:120,p1:88, an "
                                         "offset of a one-partition topic, or a time)"})
        status = q.get("status") or None
        if status is not None and status not in _STATUSES:
            raise _Reject(422, {"error": f"unknown status '{status}'", "statuses": _STATUSES})
        workflow = q.get("workflow") or None
        if workflow is not None:
            workflow = workflow_named(workflow, self.engine.env, self.engine.worker.workflows)
        limit = _int_param(q.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        try:
            found = await asyncio.to_thread(
                asof.answer, self.engine.runtime.log, q["at"], execution_id=q.get("id"),
                workflow=workflow, status=status, limit=limit,
                keys=self.engine.runtime.key_store)
        except CommandError as exc:
            raise _Reject(422, {"error": str(exc)}) from None
        if found is None:
            raise _Reject(404, {"error": f"no execution '{q.get('id')}' as of {q['at']}"})
        return _json(200, found)

    async def rerun(self, request: Request) -> Response:
        """A new execution replaying the source up to ``from_step``, running the rest with
        today's code (``engine.rerun``); a dry run says what it would copy."""
        execution = await self._get(request)
        body = await _read_body(request, _RerunBody) if (await request.body()).strip() else None
        asked = body if isinstance(body, _RerunBody) else _RerunBody()
        try:
            made = await rerun.rerun(self.engine.runtime, execution.execution_id,
                                     asked.from_step, dry_run=asked.dry_run,
                                     actor=self._actor(asked.actor), reason=asked.reason)
        except RerunError as exc:  # not ended, not folded here: 409; no such step: 422
            code = 409 if exc.steps is None else 422
            raise _Reject(code, {"error": str(exc), "steps": exc.steps}) from None
        assert made is not None  # _get found it
        return _json(200 if asked.dry_run else 201, made.to_json())

    async def rerun_many(self, request: Request) -> Response:
        """Rerun every ended execution of ``workflow`` with ``status`` created since
        ``since`` (newest first, at most ``limit``), or say which (``dry_run``)."""
        body = await _read_body(request, _BulkRerunBody)
        assert isinstance(body, _BulkRerunBody)
        if body.status is not None and body.status not in _STATUSES:
            raise _Reject(422, {"error": f"unknown status '{body.status}'",
                                "statuses": _STATUSES})
        workflow = body.workflow
        if workflow is not None:
            workflow = workflow_named(workflow, self.engine.env, self.engine.worker.workflows)
        try:
            since = None if body.since is None else asof.parse_time(str(body.since))
        except CommandError as exc:
            raise _Reject(422, {"error": f"since: {exc}"}) from None
        sources = await rerun.select(self.engine.runtime, workflow=workflow,
                                     status=body.status, since=since, limit=body.limit)
        made, failed = [], []
        for source in sources:
            try:
                one = await rerun.rerun(self.engine.runtime, source, body.from_step,
                                        dry_run=body.dry_run, actor=self._actor(body.actor),
                                        reason=body.reason)
            except RerunError as exc:
                failed.append({"source": source, "error": str(exc)})
                continue
            if one is not None:
                made.append(one.to_json())
        return _json(200 if body.dry_run else 201,
                     {"dry_run": body.dry_run, "reruns": made, "failed": failed})

    async def _get(self, request: Request) -> Execution:
        eid = request.path_params["id"]
        execution = await self.engine.get_execution(eid, **_routed(request))
        if execution is None:
            raise _Reject(404, {"error": f"unknown execution '{eid}'"})
        return execution


async def _sse(entries: AsyncGenerator[HistoryEntry, None]) -> AsyncIterator[bytes]:
    """History entries as Server-Sent Events, ``event: end`` after the last one."""
    def render(entry: HistoryEntry) -> bytes:
        data = json.dumps(entry.model_dump(mode="json"), separators=(",", ":"))
        # Unnamed events (an EventSource's ``onmessage``); the type is in the data.
        return payloads.utf8(f"id: {entry.offset}\ndata: {data}\n\n")

    async for chunk in _events(entries, render, end=b"event: end\ndata: {}\n\n"):
        yield chunk


async def _sse_changes(changes: AsyncGenerator[list[str], None]) -> AsyncIterator[bytes]:
    """Changed ids as Server-Sent Events (the dashboard's lists refresh on them)."""
    def render(ids: list[str]) -> bytes:
        return payloads.utf8(f"data: {json.dumps({'executions': ids})}\n\n")

    # The browser's EventSource opens at the first bytes, not at the first change.
    async for chunk in _events(changes, render, first=b": listening\n\n"):
        yield chunk


async def _events(items: AsyncGenerator[T, None], render: Callable[[T], bytes], *,
                  first: bytes | None = None, end: bytes | None = None) -> AsyncIterator[bytes]:
    """``items`` as Server-Sent Events; a comment every 15 s keeps proxies open. The
    read in flight is cancelled and awaited before ``items`` closes (aclose of a running
    generator raises)."""
    pending: asyncio.Task[T] | None = None
    try:
        if first is not None:
            yield first
        while True:
            if pending is None:
                pending = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=15)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                if end is not None:
                    yield end
                return
            pending = None
            yield render(item)
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # the generator ends (its finally) before aclose
        await items.aclose()


def _wait_param(raw: str | None) -> float:
    if not raw:
        return 30.0
    try:
        ms = parse_duration(raw)
    except ValueError as exc:
        raise _Reject(422, {"error": f"wait: {exc}"}) from None
    return min(ms / 1000, 60.0)


def _routed(request: Request) -> dict[str, Any]:
    """``local`` and ``min_offset`` of a query another process routed here (its owner)."""
    q = request.query_params
    min_offset = q.get("min_offset")
    return {"local": bool(q.get("local")),
            "min_offset": None if not min_offset else _int_param(min_offset, "min_offset",
                                                                 -1, -1, None)}


def _partitions_param(raw: str | None, count: int) -> list[int] | None:
    if not raw:
        return None
    try:
        found = sorted({int(p) for p in raw.split(",")})
    except ValueError:
        raise _Reject(422, {"error": f"partitions must be numbers separated by commas, "
                                     f"got {raw!r}"}) from None
    if not all(0 <= p < count for p in found):
        raise _Reject(422, {"error": f"partitions must be in 0..{count - 1}"})
    return found


def _int_param(raw: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _Reject(422, {"error": f"'{name}' must be an integer {bound}, got {raw!r}"})
    return value
