"""Prometheus metrics of this process, in the text exposition format 0.0.4.

Counters are folds of events: the runtime passes every event its fold
applies (``Runtime._on_applied``) to :meth:`Metrics.observe`, so each worker
counts what it folds, and a step's latency is ``StepCompleted.timestamp -
StepCompleted.started_at``, the times the log has, not a stopwatch around the
call. Events written before this process started are not counted: a worker
that takes a partition over and folds its history does not count it again
(Prometheus counters are per process; ``rate()`` and ``sum()`` across workers
are what to read). Gauges (timers pending, lag, fenced events, runners) are
read from the views when scraped.

The format is written here (a few lines) rather than with ``prometheus_client``:
the engine then needs no extra dependency, and each sample comes from state
the engine already keeps.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from confluent_kafka import TopicPartition

from engine.events import (
    Event,
    StepCompleted,
    StepFailed,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowTriggered,
)

if TYPE_CHECKING:
    from engine.runtime import Runtime
    from engine.view import PartitionView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TIMER_SCAN_LIMIT = 100_000  # timers counted per partition per scrape, at most
_STEP_SUFFIX = re.compile(r"(#\d+|\[\d+\])+$")  # name#2, name[0]: one series per step name

Labels = tuple[tuple[str, str], ...]

# (metric, help) of the counters, by the event that counts them.
_COUNTED: dict[type, tuple[str, str]] = {
    WorkflowTriggered: ("ploy_executions_triggered", "Executions triggered (each "
                        "WorkflowTriggered folded, a repeated idempotency key included)."),
    WorkflowStarted: ("ploy_executions_started", "Executions whose handler began running."),
    WorkflowCompleted: ("ploy_executions_completed", "Executions that completed."),
    WorkflowFailed: ("ploy_executions_failed", "Executions that failed."),
    WorkflowCancelled: ("ploy_executions_cancelled", "Executions cancelled."),
}


class Histogram:
    """Buckets, sum and count of one label set; each value counted in its own bucket
    only (one bisect), made cumulative when rendered."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """The count at or below each bound of BUCKETS_S, as the format wants it."""
        return list(itertools.accumulate(self.counts[:-1]))


class Metrics:
    """What this process folded since it started, and the gauges read at scrape time."""

    def __init__(self, started_ms: int | None = None):
        self.started_ms = int(time.time() * 1000) if started_ms is None else started_ms
        self.counters: dict[str, dict[Labels, int]] = defaultdict(lambda: defaultdict(int))
        self.steps: dict[Labels, Histogram] = defaultdict(Histogram)

    def observe(self, applied: Iterable[tuple[int, Event]]) -> None:
        """Count the events one fold batch applied (on the event loop: cheap, no I/O)."""
        for _, event in applied:
            if event.timestamp < self.started_ms:
                continue
            body = event.body
            counted = _COUNTED.get(type(body))
            workflow = (("workflow", event.workflow),)
            if counted is not None:
                self.counters[counted[0]][workflow] += 1
            elif isinstance(body, StepCompleted | StepFailed):
                self._step(event, body)

    def schedule(self, action: str, name: str, count: int = 1) -> None:
        """A schedule fired or gave fire times up (counted by the worker that did it,
        once: ``observe`` counts no ``ScheduleUpdated``, which every folder sees)."""
        self.counters[f"ploy_schedule_{action}"][(("schedule", name),)] += count

    def _step(self, event: Event, body: StepCompleted | StepFailed) -> None:
        step = _STEP_SUFFIX.sub("", body.step)
        failed = isinstance(body, StepFailed)
        labels = (("workflow", event.workflow), ("step", step),
                  ("outcome", "failed" if failed else "completed"))
        self.steps[labels].observe(max(event.timestamp - body.started_at, 0) / 1000)
        if isinstance(body, StepFailed) and not body.final:
            self.counters["ploy_step_retries"][labels[:2]] += 1

    async def render(self, runtime: Runtime) -> str:
        """The exposition text: the counters, the step histogram, then the gauges."""
        report = await runtime.partitions_report()
        views = {p: v for p, v in runtime.views.items() if runtime.partitions.folds(p)}
        timers = await asyncio.to_thread(lambda: {p: _pending(v) for p, v in views.items()})
        lag = await asyncio.to_thread(_lag, runtime, views)
        return "".join(self._lines(runtime, report, timers, lag))

    def _lines(self, runtime: Runtime, report: list[dict[str, Any]],
               timers: dict[int, int], lag: dict[int, int]) -> Iterator[str]:
        helps = {name: text for name, text in _COUNTED.values()}
        helps.update({
            "ploy_step_retries": "Step attempts that failed and are retried.",
            "ploy_schedule_fired": "Schedule fire times that started an execution.",
            "ploy_schedule_skipped": "Schedule updates that gave fire times up.",
        })
        for name in (*helps, *sorted(set(self.counters) - set(helps))):
            yield from _family(name + "_total", "counter", helps.get(name, name),
                               self.counters.get(name, {}).items())
        yield from self._histogram()
        here = [r for r in report if r["here"]]
        yield from _family("ploy_timers_pending", "gauge",
                           "Durable sleeps waiting for their timer, per partition folded here.",
                           [((("partition", str(p)),), n) for p, n in sorted(timers.items())])
        yield from _family("ploy_partition_lag", "gauge",
                           "Events on the log not yet folded here, per partition folded here.",
                           [((("partition", str(p)),), n) for p, n in sorted(lag.items())])
        yield from _family("ploy_fenced_events_total", "counter",
                           "Events of former owners the fold ignored, per partition.",
                           [((("partition", str(r["partition"])),), r["fenced_events"])
                            for r in here])
        yield from _family("ploy_executions_running", "gauge",
                           "Executions running in this process now.", [((), len(runtime.runners))])
        yield from _family("ploy_partitions_owned", "gauge",
                           "Partitions this process runs.", [((), len(runtime.owned))])
        yield from _family("ploy_executions_held", "gauge",
                           "Executions held until a burst of triggers is answered "
                           "(engine.ingress).", [((), runtime.ingress.held)])

    def _histogram(self) -> Iterator[str]:
        name = "ploy_step_duration_seconds"
        yield f"# HELP {name} Duration of step attempts, from StepStarted to its outcome.\n"
        yield f"# TYPE {name} histogram\n"
        for labels, hist in sorted(self.steps.items()):
            for bound, count in zip(BUCKETS_S, hist.cumulative(), strict=True):
                yield f"{name}_bucket{_labels((*labels, ('le', repr(bound))))} {count}\n"
            yield f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {hist.count}\n"
            yield f"{name}_sum{_labels(labels)} {hist.sum!r}\n"
            yield f"{name}_count{_labels(labels)} {hist.count}\n"


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[tuple[Labels, object]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}\n"
    yield f"# TYPE {name} {kind}\n"
    for labels, value in sorted(samples, key=lambda s: s[0]):
        yield f"{name}{_labels(labels)} {value}\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _lag(runtime: Runtime, views: dict[int, PartitionView]) -> dict[int, int]:
    """High watermark minus the next offset to fold, per partition (one consumer, one
    ListOffsets per partition; an estimate, as the broker reports it)."""
    if not views:
        return {}
    consumer = runtime.log.consumer()
    try:
        lag = {}
        for p, view in views.items():
            _, high = consumer.get_watermark_offsets(TopicPartition(runtime.log.topic, p),
                                                     timeout=runtime.log.connect_timeout_s)
            lag[p] = max(int(high) - view.next_offset, 0)
        return lag
    finally:
        consumer.close()


def _pending(view: PartitionView) -> int:
    """The timers of a partition (bounded count; the fold keeps one key per pending sleep)."""
    return len(view.timers(limit=TIMER_SCAN_LIMIT))
