"""The dashboard at ``/__ploy/``: the pages an operator reads (README, "Dashboard").

=============================================  =========================================
``/``                                          executions: search, counts, cursor pages
``/executions/{id}``                           one execution: timeline, steps, history
``/executions/{id}/history.jsonl``             its events, to download
``/workflows``, ``/workers``                   workflows and their recent runs; partitions
``/schedules``                                 schedules: state, what they started, actions
=============================================  =========================================

Server-rendered Jinja pages (``templates/`` beside this module) that refresh
their live regions when the server pushes (an execution's event stream, the
fold's change feed). The forms that act (cancel, trigger) are in
``engine.actions``. Everything the pages show from an execution is untrusted
text: Jinja's autoescape escapes it, and the Content-Security-Policy of every
page runs only the page's own script (by nonce). Who may see the pages is
decided by the guard in ``engine.http``, which mounts them.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from engine import asof, payloads, tracebacks
from engine.actions import NOTICES, Csrf
from engine.bindings import workflow_named
from engine.config import ScheduleConfig
from engine.durations import format_duration as short_duration
from engine.errors import CommandError, PloyError
from engine.listing import Cursor
from engine.models import (
    Execution,
    ExecutionStatus,
    ExecutionSummary,
    HistoryEntry,
    loads,
)
from engine.schedules import origin_of
from engine.search import LAST, Filters, Found, activity, find, summary_json
from engine.timeline import timeline

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ["DASHBOARD", "Dashboard", "format_duration", "redirect", "timeline"]

DASHBOARD = "/__ploy"
PAGE_SIZE = 50
REFRESH_MS = 2000
TEMPLATES = Path(__file__).parent / "templates"


def _statuses() -> list[str]:
    """Every execution status, read when asked: a status added to the enum shows up."""
    return [s.value for s in ExecutionStatus]



def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value from an execution is untrusted text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = format_duration
    env.filters["utc"] = _utc
    env.filters["iso"] = _iso
    env.filters["pretty"] = _pretty
    env.filters["compact"] = _compact
    env.filters["short_duration"] = short_duration
    return env


async def redirect(request: Request) -> Response:
    """``/__ploy`` -> ``/__ploy/``."""
    return RedirectResponse(f"{DASHBOARD}/", status_code=307)


class Dashboard:
    """The pages' endpoints (``index``, ``detail``); ``engine.http`` guards and mounts them."""

    def __init__(self, engine: Engine, csrf: Csrf | None = None):
        self.engine = engine
        self.env = _templates()
        self.base = DASHBOARD
        self.csrf = csrf or Csrf("ploy_admin")

    def not_found(self, message: str) -> Response:
        return self.render("message.html", code=404, title="Not found", message=message,
                           live={"live": False, "refresh_ms": REFRESH_MS})

    def render(self, name: str, code: int = 200, **context: Any) -> Response:
        nonce = secrets.token_urlsafe(16)
        context.setdefault("nav", "")
        html = self.env.get_template(name).render(nonce=nonce, base=DASHBOARD, **context)
        return HTMLResponse(payloads.utf8(html), status_code=code, headers={
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                "form-action 'self'; frame-ancestors 'none'"),
            "X-Content-Type-Options": "nosniff",
            # Same-origin: a form's POST then carries its Origin, which the guard checks.
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        })

    async def index(self, request: Request) -> Response:
        """The executions, newest first: filtered, counted, a page at a time (cursor in the URL)."""
        now = self.engine.runtime.clock.now()
        filters = Filters.from_query(request.query_params, _statuses(), now)
        at = request.query_params.get("as_of", "").strip()
        if at:
            return await self._index_as_of(filters, at, now)
        found = await self._find(filters, request.query_params.get("before", ""))
        older = None if found.next is None else filters.query(before=str(found.next))
        return self.render(
            "executions.html", rows=[summary_json(s, now) for s in found.executions],
            found=found, filters=filters, workflows=sorted(self.engine.worker.workflows),
            statuses=_statuses(), last_choices=LAST, older=older,
            paged="before" in request.query_params, newest=filters.query(),
            live=self._live_list(), title="Executions", nav="Executions")

    async def _index_as_of(self, filters: Filters, at: str, now: int) -> Response:
        """The newest executions (of a workflow, a status) as they stood at a point of the
        log (``engine.asof``): read-only, not live."""
        log, keys = self.engine.runtime.log, self.engine.runtime.key_store
        named = workflow_named(filters.workflow, self.engine.env, self.engine.worker.workflows)

        def read() -> list[ExecutionSummary]:
            with asof.as_of(log, asof.parse_point(log, at), keys=keys) as view:
                page = view.page(workflow=named or None, status=filters.status or None,
                                 limit=PAGE_SIZE)
                return [ExecutionSummary.of(e) for e in page.executions]

        try:
            executions = await asyncio.to_thread(read)
        except CommandError as exc:
            return self.not_found(f"Not a point of the log: {exc}")
        return self.render(
            "executions.html", rows=[summary_json(s, now) for s in executions],
            found=Found(executions, None, len(executions), len(executions) < PAGE_SIZE),
            filters=filters, workflows=sorted(self.engine.worker.workflows),
            statuses=_statuses(), last_choices=LAST, older=None, paged=False,
            newest=filters.query(), as_of=at, live={"live": False, "refresh_ms": REFRESH_MS,
                                                     "stream": None},
            title=f"Executions as of {at}", nav="Executions")

    def _live_list(self) -> dict[str, Any]:
        """How a list page keeps up: pushed by the fold where this process folds every
        partition (the change feed sees only those), else re-fetched every REFRESH_MS."""
        runtime = self.engine.runtime
        folds_all = all(runtime.partitions.folds(p) for p in range(runtime.log.partitions))
        return {"live": True, "refresh_ms": REFRESH_MS,
                "stream": f"{DASHBOARD}/api/changes" if folds_all else None}

    async def _find(self, filters: Filters, before_text: str) -> Found:
        """The page of executions the filters select (an exact id is one point read)."""
        try:
            before = Cursor.parse(before_text) if before_text else None
        except ValueError:
            before = None
        named = workflow_named(filters.workflow, self.engine.env, self.engine.worker.workflows)
        if filters.id and before is None:
            exact = await self.engine.get_execution(filters.id)
            if exact is not None:
                summary = ExecutionSummary.of(exact)
                listed = (not filters.status or summary.status.value == filters.status) and (
                    not named or summary.workflow == named)
                hits = [summary] if listed and filters.matches(summary) else []
                return Found(hits, None, len(hits), True)
        return await find(self.engine.list_page, filters, workflow=named or None,
                          before=before, limit=PAGE_SIZE)

    async def detail(self, request: Request) -> Response:
        """One execution: what it is doing or did, how long each part took, why it failed.
        With ``as_of`` (a point of the log, ``p3:120``, or a time): as it stood then."""
        eid = request.path_params["id"]
        at = request.query_params.get("as_of", "").strip()
        if at:
            return await self._detail_as_of(eid, at)
        # The history first: the execution read after it is as new or newer, so the
        # stream from the history's last offset brings whatever the page is missing.
        history = await self.engine.history(eid)
        execution = None if history is None else await self.engine.get_execution(eid)
        if history is None or execution is None:
            return self.not_found(f"No execution with id {eid}.")
        now = self.engine.runtime.clock.now()
        origin = history[0].timestamp if history else execution.created_at
        return self.render(
            "execution.html", ex=execution, elapsed_ms=_elapsed(execution, now),
            notice=NOTICES.get(request.query_params.get("notice", "")),
            csrf=self.csrf.token(request),
            timeline=timeline(execution, now), traces=_traces(execution),
            events=[_event_row(e, origin) for e in history],
            scheduled=self._scheduled(execution),
            live={"live": not execution.status.terminal, "refresh_ms": REFRESH_MS,
                  # Pushed: the page refreshes when the execution's partition folds an event.
                  # Only events after those on this page, so that opening it does not refresh it.
                  "stream": f"{DASHBOARD}/api/executions/{execution.execution_id}/events"
                            f"?after={history[-1].offset if history else -1}"},
            title=f"{execution.workflow} · {execution.execution_id[:12]}")

    async def _detail_as_of(self, eid: str, at: str) -> Response:
        """The execution page as of a point: its partition's log folded into a scratch view
        through that point (``engine.asof``); read-only, not live."""
        log, keys = self.engine.runtime.log, self.engine.runtime.key_store

        def read() -> tuple[Execution | None, list[HistoryEntry]]:
            point = asof.parse_point(log, at)
            with asof.as_of(log, point, keys=keys) as view:
                return view.execution(eid), view.history(eid) or []

        try:
            execution, history = await asyncio.to_thread(read)
        except CommandError as exc:
            return self.not_found(f"Not a point of the log: {exc}")
        if execution is None:
            return self.not_found(f"No execution {eid} as of {at}: it did not exist yet.")
        end = history[-1].timestamp if history else execution.updated_at
        origin = history[0].timestamp if history else execution.created_at
        return self.render(
            "execution.html", ex=execution, elapsed_ms=_elapsed(execution, end), notice=None,
            csrf="", timeline=timeline(execution, end), traces=_traces(execution),
            events=[_event_row(e, origin) for e in history], as_of=at,
            scheduled=self._scheduled(execution),
            live={"live": False, "refresh_ms": REFRESH_MS, "stream": None},
            title=f"{execution.workflow} · {execution.execution_id[:12]} as of {at}")

    def _scheduled(self, execution: Execution) -> dict[str, Any] | None:
        """The schedule and fire time that started ``execution`` (from its idempotency
        key), if a schedule of ploy.yaml for its workflow did; None otherwise."""
        origin = origin_of(execution.idempotency_key)
        if origin is None:
            return None
        name, fire_at = origin
        schedule = self.engine.config.schedule(name)
        if schedule is None or self.engine.config.workflow[schedule.binding].name != (
                execution.workflow):
            return None  # a key of that shape that no schedule of this app made
        return {"name": name, "fire_at": fire_at}

    async def history_download(self, request: Request) -> Response:
        """The execution's events as JSON lines, one history entry a line, as on the log."""
        eid = request.path_params["id"]
        history = await self.engine.history(eid)
        if history is None:
            return self.not_found(f"No execution with id {eid}.")
        lines = "".join(json.dumps(e.model_dump(mode="json"), ensure_ascii=False) + "\n"
                        for e in history)
        filename = re.sub(r"[^A-Za-z0-9_.-]", "_", eid)[:80]
        return Response(payloads.utf8(lines), media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{filename}.history.jsonl"',
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    async def workflows(self, request: Request) -> Response:
        """Every workflow: its bindings (each with its trigger form), schemas and recent runs."""
        now = self.engine.runtime.clock.now()
        config = self.engine.config
        rows = []
        for name, wf in sorted(self.engine.worker.workflows.items()):
            bindings = [(b, config.retries if t.retries is None else t.retries)
                        for b, t in sorted(config.workflow.items()) if t.name == name]
            rows.append({
                "name": name, "bindings": bindings,
                "input_schema": wf.input.model_json_schema() if wf.input else None,
                "output_schema": wf.output.model_json_schema() if wf.output else None,
                "activity": await activity(self.engine.list_page, name, now),
            })
        return self.render("workflows.html", workflows=rows, title="Workflows", nav="Workflows",
                           live=self._live_list())

    async def workers(self, request: Request) -> Response:
        """Who runs each partition, how far behind it is, and what stopped it."""
        report = await self.engine.workers()
        return self.render("workers.html", report=report, health=self.engine.health(),
                           title="Workers and partitions", nav="Workers",
                           live={"live": True, "refresh_ms": REFRESH_MS})


    async def schedules(self, request: Request) -> Response:
        """Every schedule of ploy.yaml: its timing and policies, paused or not (by whom and
        why), its last and next fire time, the executions it started and the fire times
        it gave up; with Pause, Resume and Trigger now. Live like the Workflows page: the
        fold's change feed carries each schedule's updates and the executions it starts."""
        rows = await asyncio.gather(*(self._schedule_row(s)
                                      for s in self.engine.config.schedules))
        return self.render("schedules.html", schedules=rows, csrf=self.csrf.token(request),
                           notice=NOTICES.get(request.query_params.get("notice", "")),
                           title="Schedules", nav="Schedules", live=self._live_list())

    async def _schedule_row(self, schedule: ScheduleConfig) -> dict[str, Any]:
        """One schedule as its partition's owner has it (``Scheduler.state`` asks the owner
        when that is another process); the error instead when no owner answers."""
        try:
            state = await self.engine.runtime.schedules.state(schedule.name)
        except PloyError as exc:
            return {"config": schedule, "state": None, "error": str(exc), "started": []}
        started = await asyncio.gather(*(self._started(s) for s in reversed(state["started"])))
        return {"config": schedule, "state": state, "error": None, "started": started}

    async def _started(self, item: dict[str, Any]) -> dict[str, Any]:
        """An execution a schedule started, with its status now (None: not known here, or
        removed by retention)."""
        try:
            execution = await self.engine.get_execution(item["execution_id"])
        except PloyError:
            execution = None
        return {**item, "status": None if execution is None else execution.status.value}

    async def events(self, request: Request) -> Response:
        """Send an event to waiting executions; what each partition did with events so far."""
        report = await self.engine.workers()
        return self.render("events.html", report=report, csrf=self.csrf.token(request),
                           notice=NOTICES.get(request.query_params.get("notice", "")),
                           title="Events", nav="Events",
                           live={"live": False, "refresh_ms": 0})


def _elapsed(execution: Execution | ExecutionSummary, now: int) -> int | None:
    """Duration so far: the final one when ended, else since the start."""
    if execution.duration_ms is not None:
        return execution.duration_ms
    if execution.status.terminal:
        return None
    return max(now - (execution.started_at or execution.created_at), 0)


_PAYLOADS = ("input", "output", "data")  # JSON text inside events: decoded for display
_UNSUMMARIZED = {"traceback", "started_at"}  # in the expanded event only


def _event_row(entry: HistoryEntry, origin: int) -> dict[str, Any]:
    """An event for display: a one-line summary, its time since the execution's first
    event, how long a step's attempt took, and the whole entry (payloads decoded)."""
    body = {key: _decoded(key, value) for key, value in entry.body.items()}
    started = body.get("started_at")
    return {"offset": entry.offset, "partition": entry.partition, "timestamp": entry.timestamp,
            "type": entry.type, "epoch": entry.epoch, "since_ms": entry.timestamp - origin,
            "took_ms": entry.timestamp - started if isinstance(started, int) else None,
            "summary": _summary(body, entry.timestamp),
            "entry": {**entry.model_dump(mode="json"), "body": body}}


def _decoded(key: str, value: Any) -> Any:
    if key in _PAYLOADS and isinstance(value, str):
        try:
            return loads(value)
        except ValueError:
            return value
    return value


def _summary(body: dict[str, Any], at: int) -> str:
    """``step charge · attempt 2 · retry_at in 2.00 s``: the fields that are set, short."""
    parts = []
    for key, value in body.items():
        if value is None or value == "" or key in _UNSUMMARIZED:
            continue
        if isinstance(value, bool):
            parts.append(key if value else "")
        elif key.endswith("_at") and isinstance(value, int):
            parts.append(f"{key} {'in ' + format_duration(value - at) if value >= at else 'at'}"
                         f"{'' if value >= at else ' ' + _utc(value)}")
        elif key.endswith("_ms") and isinstance(value, int):
            parts.append(f"{key} {format_duration(value)}")
        else:
            text = value if isinstance(value, str) and key not in _PAYLOADS else _compact(value)
            parts.append(f"{key} {text if len(text) <= 90 else text[:89] + '…'}")
    return " · ".join(p for p in parts if p)


def _traces(execution: Execution) -> dict[str, dict[str, Any]]:
    """Each recorded traceback parsed, keyed ``<step key>#<attempt>`` (and ``execution``);
    one that repeats an earlier attempt's (same frames) names that attempt instead."""
    found: dict[str, dict[str, Any]] = {}
    for step in execution.steps:
        seen: dict[tuple[tuple[str, int, str], ...], int] = {}
        for attempt in step.attempts:
            if attempt.error is None or not attempt.error.traceback:
                continue
            trace = tracebacks.parse(attempt.error.traceback)
            first = seen.setdefault(trace.signature, attempt.attempt)
            found[f"{step.key}#{attempt.attempt}"] = {
                "trace": trace, "same_as": None if first == attempt.attempt else first}
    if execution.error is not None and execution.error.traceback:
        found["execution"] = {"trace": tracebacks.parse(execution.error.traceback),
                              "same_as": None}
    return found


def format_duration(ms: int | None) -> str:
    """``850 ms``, ``1.25 s``, ``2m 05s``, ``3h 07m``, ``2d 4h``."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _utc(ms: int | None) -> str:
    if ms is None:
        return "—"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + f".{ms % 1000:03d} UTC"


def _iso(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
