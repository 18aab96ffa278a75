"""OpenTelemetry spans of executions: optional (``pip install 'ploy-engine[otel]'``, then
``otel: true`` in ploy.yaml or ``PLOY_OTEL=1``), off by default.

Each span is emitted once, by the process that records what it describes, and
never on replay (a replayed step appends nothing, so it emits nothing):

- ``ploy.trigger <workflow>`` around the append of ``WorkflowTriggered``. Its
  parent is the W3C ``traceparent`` of the HTTP request that triggered (engine
  API or a route of the app), else the current OpenTelemetry span. Its own
  traceparent is recorded in ``WorkflowTriggered.trace_parent``, so the spans
  of the execution, from whichever worker runs it and however much later,
  are its children.
- ``ploy.step <key>``, one per attempt, from its ``StepStarted`` to its
  outcome (status error for a failed attempt), emitted once the outcome is
  acknowledged.
- ``ploy.sleep <key>``, from ``SleepScheduled`` to ``TimerFired``, emitted
  when the timer fires.

No span stays open across a step boundary, a sleep or a restart: a trace is
the trigger and its short children, never one span per execution that a
crash would leave unended. Without OpenTelemetry enabled, the request's
traceparent is still recorded on the execution (for correlation).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from engine import keys
from engine.errors import ConfigError
from engine.events import Body, StepCompleted, StepFailed

if TYPE_CHECKING:
    from engine.view import PartitionView

# The traceparent of the HTTP request being handled (set by TraceparentMiddleware).
TRACE_PARENT: ContextVar[str | None] = ContextVar("ploy_trace_parent", default=None)
_NS = 1_000_000  # ns per ms


class TraceparentMiddleware:
    """Keeps the request's ``traceparent`` header for the triggers made while handling it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"traceparent")
        token = TRACE_PARENT.set(header.decode("latin-1") if header else None)
        try:
            await self.app(scope, receive, send)
        finally:
            TRACE_PARENT.reset(token)


class Tracing:
    """The tracer of this process, or nothing when OpenTelemetry is off."""

    def __init__(self, enabled: bool, provider: Any = None):
        self.tracer: Any = None
        self._waited: set[tuple[str, str]] = set()  # (execution id, wait key): spans emitted
        if not enabled:
            return
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError("ploy.yaml", "otel", "needs OpenTelemetry: "
                              "pip install 'ploy-engine[otel]'") from None
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("ploy")

    @contextlib.contextmanager
    def trigger(self, workflow: str, eid: str,
                trace_parent: str | None = None) -> Iterator[str | None]:
        """Around the append of a trigger: yields the traceparent to record on it."""
        incoming = trace_parent or TRACE_PARENT.get()
        if self.tracer is None:
            yield incoming
            return
        parent = self._context(incoming) if incoming else None  # None: the current span
        with self.tracer.start_as_current_span(
                f"ploy.trigger {workflow}", context=parent,
                attributes={"ploy.workflow": workflow, "ploy.execution_id": eid}) as span:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
            yield carrier.get("traceparent", incoming)

    def recorded(self, record: dict[str, Any], workflow: str, body: Body, now: int) -> None:
        """A runner's append was acknowledged: the span of a step attempt, if it ended one."""
        if self.tracer is None or not isinstance(body, StepCompleted | StepFailed):
            return
        error = f"{body.error_type}: {body.message}" if isinstance(body, StepFailed) else None
        self._span(f"ploy.step {body.step}", record, workflow, body.started_at, now,
                   {"ploy.step": body.step, "ploy.attempt": body.attempt}, error)

    def slept(self, view: PartitionView | None, eid: str, workflow: str, sleep_key: str,
              now: int) -> None:
        """A timer fired (its ``TimerFired`` acknowledged): the span of the sleep."""
        if self.tracer is None or view is None:
            return
        record, sleep = view.record(eid), view.db.get(keys.sleep(eid, sleep_key))
        if record is None or sleep is None:
            return
        if json.loads(sleep).get("kind") != "sleep":
            return  # a wait's timeout: its span comes once the fold has ended it (waited)
        started = int(json.loads(sleep)["started_at"])
        self._span(f"ploy.sleep {sleep_key}", record, workflow, started, now,
                   {"ploy.sleep": sleep_key}, None)

    def waited(self, view: PartitionView | None, eid: str) -> None:
        """The fold may have ended a wait of ``eid`` (an event received, a timeout): the
        span of each ended wait or invoke, once per process."""
        if self.tracer is None or view is None:
            return
        record = view.record(eid)
        if record is None:
            return
        for step in view.steps(eid):
            done = (eid, step["key"])
            if (step["kind"] not in ("wait", "invoke") or step["status"] not in ("received",
                                                                                 "timed_out")
                    or done in self._waited):
                continue
            if len(self._waited) > 100_000:
                self._waited.clear()
            self._waited.add(done)
            event = step.get("event") or {}
            attributes = {"ploy.wait": step["key"], "ploy.event_type": step["event_type"],
                          "ploy.timed_out": step["status"] == "timed_out"}
            if step.get("child_id"):
                attributes["ploy.child_id"] = step["child_id"]
            if event.get("id"):
                attributes["ploy.event_id"] = event["id"]
            self._span(f"ploy.{step['kind']} {step['key']}", record, record["workflow"],
                       int(step["started_at"]), int(step["ended_at"] or step["started_at"]),
                       attributes, None)

    def _span(self, name: str, record: dict[str, Any], workflow: str, start_ms: int,
              end_ms: int, attributes: dict[str, Any], error: str | None) -> None:
        parent = record.get("trace_parent")
        span = self.tracer.start_span(
            name, context=self._context(parent) if parent else None, start_time=start_ms * _NS,
            attributes={"ploy.workflow": workflow, "ploy.execution_id": record["id"],
                        **attributes})
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=max(end_ms, start_ms) * _NS)

    def _context(self, trace_parent: str) -> Any:
        return self._propagator.extract({"traceparent": trace_parent})
