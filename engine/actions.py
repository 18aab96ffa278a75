"""What an operator does from the dashboard: cancel, trigger, rerun, send an event, complete a
stuck step, retry a step now; pause, resume or trigger a schedule now.

Each action is a plain HTML form POSTed to the server, which answers with a
redirect to the execution (so a reload does not repeat it) or the form again
with its errors. ``engine.http`` guards these routes like the API's writes,
with one addition for browsers: a form carries a CSRF token (:class:`Csrf`),
and a request with a valid token and a valid session (an open loopback server,
or the cookie a token login set) may write without the bearer header.

Every action is recorded on the log by the event it appends (a cancel, a
schedule's pause, resume or trigger name their actor, ``dashboard:admin-token``
or ``dashboard:local``) and logged on ``ploy.dashboard``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from engine import inputform, rerun
from engine.errors import (
    InvalidInputError,
    InvalidKeyError,
    PartitionStalledError,
    PayloadTooLargeError,
    RerunError,
    SubjectErasedError,
    UnknownExecutionError,
)
from engine.schedules import schedule_id

if TYPE_CHECKING:
    from engine.app import Engine
    from engine.dashboard import Dashboard

__all__ = ["NOTICES", "Actions", "Csrf", "form_fields"]

logger = logging.getLogger("ploy.dashboard")

# What an action's redirect may tell the page (by code: the URL carries no text to show).
NOTICES = {
    "cancelled": ("ok", "Cancelled. The reason and who asked are recorded on the log."),
    "not-cancelled": ("bad", "Not cancelled: the execution had already finished."),
    "triggered": ("ok", "Triggered from the dashboard."),
    "rerun": ("ok", "A rerun of the execution this page links to as its source."),
    "not-rerun": ("bad", "Not rerun: only an execution that has ended can be rerun, by the "
                         "process that folds its partition, from a step it started."),
    "event-sent": ("ok", "Event sent. A waiting step that matches it receives it once."),
    "event-refused": ("bad", "Event not sent: its type, id, data (JSON) or size was refused."),
    "event-unknown": ("bad", "Event not sent: no execution has that id."),
    "step-completed": ("ok", "The step is completed with your output; the execution goes on."),
    "retry-now": ("ok", "The step's backoff wait is over: its next attempt starts now."),
    "schedule-paused": ("ok", "Paused. No fire time starts an execution until it is resumed; "
                              "the reason and who asked are recorded on the log."),
    "schedule-resumed": ("ok", "Resumed. It fires from its next fire time on (the fire times "
                               "of the pause are not caught up)."),
    "schedule-triggered": ("ok", "Triggered now: the new execution is the first one it "
                                 "started (it counts for the overlap policy)."),
    "schedule-refused": ("bad", "Not triggered: the schedule's input was refused, or its "
                                "execution's partition is stalled."),
    "step-refused": ("bad", "Not done: a reason is required, the output must be JSON, and "
                            "the step must still be running (or retrying, for retry now)."),
}


# A schedule's form actions (the last part of their path) -> the notice each one shows.
SCHEDULE_ACTIONS = {"pause": "schedule-paused", "resume": "schedule-resumed",
                    "trigger": "schedule-triggered"}


class Csrf:
    """The token a dashboard form carries: an HMAC, under a secret of this process, of
    the browser's session cookie (empty on an open loopback server).

    A page of another site cannot read it (no CORS here, and the dashboard's
    pages cannot be framed), so a form it submits has none; a restart makes the
    pages' tokens stale, which only asks the operator to reload.
    """

    FIELD = "csrf"

    def __init__(self, session_cookie: str):
        self.session_cookie = session_cookie
        self.secret = secrets.token_bytes(32)

    def token(self, request: Request) -> str:
        session = request.cookies.get(self.session_cookie, "")
        return hmac.new(self.secret, b"csrf:" + session.encode(), hashlib.sha256).hexdigest()

    def valid(self, request: Request, supplied: str) -> bool:
        return hmac.compare_digest(supplied.encode(), self.token(request).encode())


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body ({} for any other)."""
    if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    try:
        return dict(parse_qsl(body, keep_blank_values=True, max_num_fields=1000))
    except ValueError:  # more fields than any form of ours has: not one of them
        return {}


def execution_url(base: str, eid: str, notice: str) -> str:
    return f"{base}/executions/{quote(eid, safe='')}?notice={notice}"


class Actions:
    """The endpoints of the dashboard's forms (mounted by ``engine.http`` behind its guard)."""

    def __init__(self, engine: Engine, pages: Dashboard, csrf: Csrf):
        self.engine, self.pages, self.csrf = engine, pages, csrf
        # Who acts, for the audit trail: a browser cannot name itself, only its way in.
        self.actor = "dashboard:" + ("admin-token" if engine.config.http.admin_token
                                     else "local")

    async def cancel(self, request: Request) -> Response:
        """Cancel with the operator's reason, by actor ``dashboard:...``."""
        eid = request.path_params["id"]
        if await self.engine.get_execution(eid) is None:
            return self.pages.not_found(f"No execution with id {eid}.")
        reason = (await form_fields(request)).get("reason", "").strip() or None
        cancelled = await self.engine.cancel(eid, reason, self.actor)
        logger.info("execution %s: cancel from the dashboard (%s): %s", eid,
                    "done" if cancelled else "it had already finished", reason)
        return RedirectResponse(execution_url(self.pages.base, eid,
                                              "cancelled" if cancelled else "not-cancelled"), 303)

    async def rerun(self, request: Request) -> Response:
        """Rerun an ended execution from a step (``engine.rerun``); open the rerun."""
        eid = request.path_params["id"]
        form = await form_fields(request)
        step = form.get("from_step", "") or None
        try:
            made = await rerun.rerun(self.engine.runtime, eid, step, actor=self.actor,
                                     reason=form.get("reason", "").strip() or None)
        except RerunError as exc:
            logger.info("execution %s: rerun from the dashboard refused: %s", eid, exc)
            return RedirectResponse(execution_url(self.pages.base, eid, "not-rerun"), 303)
        if made is None or made.execution_id is None:
            return self.pages.not_found(f"No execution with id {eid}.")
        logger.info("execution %s: rerun from the dashboard as %s (from step %s)", eid,
                    made.execution_id, made.from_step)
        return RedirectResponse(execution_url(self.pages.base, made.execution_id, "rerun"), 303)

    async def send_event(self, request: Request) -> Response:
        """Send an event (type and JSON data) to this execution's waits, or to every
        matching waiter when the form says so."""
        eid = request.path_params["id"]
        form = await form_fields(request)
        target = None if form.get("broadcast") else eid
        try:
            await self._send(form, target)
        except UnknownExecutionError:
            return self.pages.not_found(f"No execution with id {eid}.")
        except (ValueError, TypeError, PayloadTooLargeError):
            return RedirectResponse(execution_url(self.pages.base, eid, "event-refused"), 303)
        return RedirectResponse(execution_url(self.pages.base, eid, "event-sent"), 303)

    async def complete_step(self, request: Request) -> Response:
        """Complete a stuck step with the operator's JSON output and reason."""
        return await self._resolve(request, "complete")

    async def retry_now(self, request: Request) -> Response:
        """End a retrying step's backoff wait, with the operator's reason."""
        return await self._resolve(request, "retry-now")

    async def _resolve(self, request: Request, action: str) -> Response:
        eid = request.path_params["id"]
        form = await form_fields(request)
        step = form.get("step", "")
        try:
            output = json.loads(form.get("output") or "null") if action == "complete" else None
            await self.engine.resolve_step(eid, step, action, output=output,
                                           reason=form.get("reason", ""), actor=self.actor)
        except UnknownExecutionError:
            return self.pages.not_found(f"No execution with id {eid}.")
        except (ValueError, TypeError, PayloadTooLargeError, SubjectErasedError) as exc:
            logger.info("execution %s: %s of step %s refused: %s", eid, action, step, exc)
            return RedirectResponse(execution_url(self.pages.base, eid, "step-refused"), 303)
        logger.info("execution %s: %s of step %s from the dashboard", eid, action, step)
        notice = "step-completed" if action == "complete" else "retry-now"
        return RedirectResponse(execution_url(self.pages.base, eid, notice), 303)

    async def send_any_event(self, request: Request) -> Response:
        """The Events page's form: to every matching waiter, or to the execution named."""
        form = await form_fields(request)
        target = form.get("execution_id", "").strip() or None
        try:
            await self._send(form, target)
        except UnknownExecutionError:
            return RedirectResponse(f"{self.pages.base}/events?notice=event-unknown", 303)
        except (ValueError, TypeError, PayloadTooLargeError):
            return RedirectResponse(f"{self.pages.base}/events?notice=event-refused", 303)
        return RedirectResponse(f"{self.pages.base}/events?notice=event-sent", 303)

    async def _send(self, form: dict[str, str], target: str | None) -> None:
        """``Engine.send_event`` with the form's type, JSON data and id (source: dashboard)."""
        try:
            data = json.loads(form.get("data") or "null")
            sent = await self.engine.send_event(form.get("type", "").strip(), data,
                                                id=form.get("id", "").strip() or None,
                                                source="dashboard", execution_id=target)
        except (ValueError, TypeError, PayloadTooLargeError) as exc:
            logger.info("event from the dashboard refused: %s", exc)
            raise
        logger.info("event %s sent from the dashboard to %s", sent.get("id"),
                    target or "every matching waiter")

    async def schedule(self, request: Request) -> Response:
        """``pause``, ``resume`` or ``trigger`` (now) a schedule with the operator's reason,
        by actor ``dashboard:...``; back to the schedule on the Schedules page."""
        name, verb = request.path_params["name"], request.path_params["action"]
        if self.engine.config.schedule(name) is None:
            return self.pages.not_found(f"No schedule named {name} in ploy.yaml.")
        if verb not in SCHEDULE_ACTIONS:
            return self.pages.not_found(f"A schedule has no action {verb}: only "
                                        f"{', '.join(SCHEDULE_ACTIONS)}.")
        reason = (await form_fields(request)).get("reason", "").strip() or None
        scheduler = self.engine.runtime.schedules
        notice = SCHEDULE_ACTIONS[verb]
        if verb == "trigger":
            try:
                eid = await scheduler.trigger_now(name, self.actor, reason)
            except (InvalidInputError, PayloadTooLargeError, PartitionStalledError) as exc:
                logger.info("schedule %s: trigger now from the dashboard refused: %s", name, exc)
                notice = "schedule-refused"
            else:
                logger.info("schedule %s: triggered now from the dashboard as %s: %s", name,
                            eid, reason)
        else:
            await scheduler.update(name, "paused" if verb == "pause" else "resumed",
                                   self.actor, reason)
            logger.info("schedule %s: %s from the dashboard: %s", name, verb, reason)
        return RedirectResponse(f"{self.pages.base}/schedules?notice={notice}"
                                f"#{schedule_id(name)}", 303)

    async def trigger_form(self, request: Request) -> Response:
        """The form generated from the binding's workflow input schema."""
        binding = request.path_params["binding"]
        if binding not in self.engine.env:
            return self.pages.not_found(f"No binding named {binding} in ploy.yaml.")
        return self._form(request, binding, {}, {})

    async def trigger(self, request: Request) -> Response:
        """Trigger from the submitted form: its errors by field (and nothing appended),
        or a redirect to the new execution."""
        binding = request.path_params["binding"]
        if binding not in self.engine.env:
            return self.pages.not_found(f"No binding named {binding} in ploy.yaml.")
        form = await form_fields(request)
        fields = self._fields(binding)
        data, errors = inputform.read(fields, form)
        if errors:
            return self._form(request, binding, form, errors, code=422)
        key = form.get("idempotency_key", "").strip() or None
        try:
            result = await self.engine.env[binding].trigger(data, idempotency_key=key)
        except InvalidInputError as exc:
            return self._form(request, binding, form,
                              inputform.errors_by_field(exc.errors, fields), code=422)
        except (InvalidKeyError, PayloadTooLargeError, PartitionStalledError) as exc:
            return self._form(request, binding, form, {inputform.FORM_ERROR: str(exc)}, code=422)
        eid = result["execution_id"]
        logger.info("execution %s: triggered from the dashboard (%s)", eid, binding)
        return RedirectResponse(execution_url(self.pages.base, eid, "triggered"), 303)

    def _fields(self, binding: str) -> list[inputform.Field]:
        workflow = self.engine.worker.workflows.get(self.engine.env[binding].workflow)
        model = workflow.input if workflow is not None else None
        return inputform.fields_of(model.model_json_schema() if model is not None else None)

    def _form(self, request: Request, binding: str, values: dict[str, str],
              errors: dict[str, str], code: int = 200) -> Response:
        workflow = self.engine.env[binding].workflow
        context: dict[str, Any] = {
            "binding": binding, "workflow": workflow, "fields": self._fields(binding),
            "values": values, "submitted": bool(values), "errors": errors,
            "form_error": errors.get(inputform.FORM_ERROR), "csrf": self.csrf.token(request),
        }
        return self.pages.render("trigger.html", code=code, title=f"Trigger {binding}",
                                 nav="Workflows", live={"live": False, "refresh_ms": 0},
                                 **context)
