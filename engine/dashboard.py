"""The dashboard at ``/__ploy/``: executions, and one execution in detail.

Server-rendered Jinja pages (``templates/`` beside this module) that re-fetch
themselves while an execution is live. Everything they show from an
execution is untrusted text: Jinja's autoescape escapes it, and the
Content-Security-Policy of every page runs only the page's own script (by
nonce). Who may see the pages is decided by the guard in ``engine.http``,
which mounts them.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from engine import payloads
from engine.actions import NOTICES, Csrf
from engine.bindings import workflow_named
from engine.listing import Cursor
from engine.models import (
    Execution,
    ExecutionStatus,
    ExecutionSummary,
    HistoryEntry,
    StepRecord,
    loads,
)
from engine.search import LAST, Filters, Found, activity, find, summary_json

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
        found = await self._find(filters, request.query_params.get("before", ""))
        older = None if found.next is None else filters.query(before=str(found.next))
        return self.render(
            "executions.html", rows=[summary_json(s, now) for s in found.executions],
            found=found, filters=filters, workflows=sorted(self.engine.worker.workflows),
            statuses=_statuses(), last_choices=LAST, older=older,
            paged="before" in request.query_params, newest=filters.query(),
            live={"live": True, "refresh_ms": REFRESH_MS, "stream": f"{DASHBOARD}/api/changes"},
            title="Executions", nav="Executions")

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
        eid = request.path_params["id"]
        execution = await self.engine.get_execution(eid)
        if execution is None:
            return self.not_found(f"No execution with id {eid}.")
        history = await self.engine.history(eid) or []
        now = self.engine.runtime.clock.now()
        return self.render(
            "execution.html", ex=execution, elapsed_ms=_elapsed(execution, now),
            notice=NOTICES.get(request.query_params.get("notice", "")),
            csrf=self.csrf.token(request),
            timeline=timeline(execution, now), events=[_event_row(e) for e in history],
            live={"live": not execution.status.terminal, "refresh_ms": REFRESH_MS,
                  # Pushed: the page refreshes when the execution's partition folds an event.
                  "stream": f"{DASHBOARD}/api/executions/{execution.execution_id}/events"},
            title=f"{execution.workflow} · {execution.execution_id[:12]}")


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
                           live={"live": True, "refresh_ms": REFRESH_MS,
                                 "stream": f"{DASHBOARD}/api/changes"})

    async def workers(self, request: Request) -> Response:
        """Who runs each partition, how far behind it is, and what stopped it."""
        report = await self.engine.workers()
        return self.render("workers.html", report=report, health=self.engine.health(),
                           title="Workers and partitions", nav="Workers",
                           live={"live": True, "refresh_ms": REFRESH_MS})


def _elapsed(execution: Execution | ExecutionSummary, now: int) -> int | None:
    """Duration so far: the final one when ended, else since the start."""
    if execution.duration_ms is not None:
        return execution.duration_ms
    if execution.status.terminal:
        return None
    return max(now - (execution.started_at or execution.created_at), 0)


def _event_row(entry: HistoryEntry) -> dict[str, Any]:
    """An event for display: user payloads (JSON text in the event) decoded."""
    body: dict[str, Any] = {}
    for key, value in entry.body.items():
        if key in ("input", "output", "data") and isinstance(value, str):
            try:
                value = loads(value)
            except ValueError:
                pass
        elif key == "traceback" and isinstance(value, str) and value:
            value = f"({value.count(chr(10))} lines: shown with the attempt or the error)"
        body[key] = value
    return {"offset": entry.offset, "partition": entry.partition, "timestamp": entry.timestamp,
            "type": entry.type, "epoch": entry.epoch, "body": body}


MIN_BAR_PCT = 0.6


def timeline(execution: Execution, now: int) -> dict[str, Any]:
    """Bars of the steps and sleeps, to scale: percentages of the execution's span.

    A bar runs from a step's first attempt to its end (now, while it runs); its
    attempts are segments inside it, placed relative to the bar, so retries and
    the backoff waits between them are visible.
    """
    origin = execution.started_at or execution.created_at
    spans = [(s, *_span(s, execution, now)) for s in execution.steps]
    spans = [(s, start, end) for s, start, end in spans if start is not None]
    last = execution.ended_at or (now if not execution.status.terminal else origin)
    end_all = max([last, origin] + [end for _, _, end in spans])
    total = max(end_all - origin, 1)
    bars = []
    for step, start, end in spans:
        assert start is not None
        width = max((end - start) / total * 100, MIN_BAR_PCT)
        left = min(max((start - origin) / total * 100, 0.0), 100 - width)
        bars.append({
            "key": step.key, "name": step.name, "kind": step.kind, "status": step.status,
            "left": round(left, 3), "width": round(width, 3), "duration_ms": end - start,
            "running": step.ended_at is None, "wake_at": step.wake_at,
            "attempts": _segments(step, start, end, now),
        })
    ticks = [{"pct": pct, "label": format_duration(round(total * pct / 100))}
             for pct in (0, 25, 50, 75, 100)]
    return {"bars": bars, "total_ms": total, "ticks": ticks}


def _span(step: StepRecord, execution: Execution, now: int) -> tuple[int | None, int]:
    start = step.started_at
    if step.attempts and step.attempts[0].started_at is not None:
        start = min(start or step.attempts[0].started_at, step.attempts[0].started_at)
    if start is None:
        return None, 0
    if step.ended_at is not None:
        end = step.ended_at
    elif execution.status.terminal:  # ended by a cancel or a crash while the step waited
        ends = [a.ended_at for a in step.attempts if a.ended_at is not None]
        end = execution.ended_at or max(ends, default=start)
    elif step.kind == "sleep" and step.wake_at is not None:
        end = max(step.wake_at, now)
    else:
        end = now
    return start, max(end, start)


def _segments(step: StepRecord, start: int, end: int, now: int) -> list[dict[str, Any]]:
    span = max(end - start, 1)
    segments = []
    for attempt in step.attempts:
        if attempt.started_at is None:
            continue
        a_end = min(attempt.ended_at if attempt.ended_at is not None else now, end)
        width = max((a_end - attempt.started_at) / span * 100, 1.0)
        left = min(max((attempt.started_at - start) / span * 100, 0.0), 100 - width)
        outcome = ("failed" if attempt.error else
                   "running" if attempt.ended_at is None else "completed")
        segments.append({"attempt": attempt.attempt, "left": round(left, 3),
                         "width": round(width, 3), "status": outcome})
    return segments


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
