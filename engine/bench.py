"""Benchmarks of the hot path: ``python -m engine.bench [SCENARIO ...] [--quick] [--json PATH]``.

Each scenario runs on a real broker (an embedded Tansu started here, or the
Kafka named by ``KAFKA_BOOTSTRAP_SERVERS``), with a topic prefix of its own and
a state directory under one temporary directory. Every figure is printed as
soon as it is measured, as one machine-readable line::

    scenario=step metric=step_p50 value=1.23 unit=ms

and a table with the targets closes the run. Latencies are p50/p99 of a
sample list; a rate of a repeatable scenario is the median of its repeats.

Scenarios (``--quick`` shrinks every count about 10x, for a CI smoke test):

floor       one ``EventLog.append`` awaited at a time: the baseline of ratios; and one
            after 0.1 s idle (what a client meets at an idle engine: the sleepers of peer)
log         batched appends (append_nowait + flush) and their fold, events/s
step        10 no-op async steps per execution; per-step latency and its ratio to floor
sequential  3-step executions one after another, trigger to completed (get_execution)
throughput  3-step executions all triggered at once: executions/s, steps/s, CPU
rebuild     refold a log of many executions from offset 0 into an empty view
sleepers    executions durably asleep until one wake time: RSS, and wake to all done
events      executions waiting for an event (ctx.step.wait_for_event): latency from an event's
            append (send_event) to the waiting execution's next step, p50/p99, one at a
            time; then 10,000 waiters at once: RSS while they wait, and time until all
            completed once their events are sent
timers      sleepers due one after another over 3 s, on an idle engine and then under a
            steady 3-step load: how late each TimerFired is (and each handler resumes)
long        a 500-step execution: per-step time near step 10 vs near step 500
peer        the workload to compare engines by, against ``ploy dev``'s HTTP front (run as
            a user runs it, with its own embedded broker, on loopback): (a) 3-step
            executions one at a time, trigger to result p50/p99 in one request
            (POST .../trigger/STEPS?wait=30s) and in two (POST, then the result's
            long-poll);
            (b) 1,000 triggered at once, time until all are started and exec/s until
            every result is in; (c) 1 s durable sleeps started 0.1 s apart, how late
            they end; (d) RSS of ploy dev and of its broker. Also the CPU per execution
            of ploy dev, its broker and the client (a lean HTTP/1.1 client, 100
            keep-alive connections), and the append floor of this run (the bench's
            broker).
scale       throughput's executions run by 1, 2 and 4 worker processes (scaled out): CPU
            per execution of every process as ratios to 1 worker, exec/s, the modelled
            cluster ceiling (exec/s per added worker)
failover    2 worker processes; SIGKILL one: time until its executions step again
churn       3 worker slots, one worker SIGKILLed and restarted every 1-2 s for a minute:
            executions and steps completed during the churn, and how long after it all are
rolling     3 workers SIGTERMed together and started again: time until every partition
            is claimed again
flat        due timers and listing pages on a view of 10,000, then 1,000,000 finished
            executions (folded straight into one partition's view, no broker): the
            cost ratio, and the event loop's lag while pages are listed off the loop

The sleepers share one wake time on a :class:`~engine.clock.ManualClock`:
the bench advances it to the wake time once every execution sleeps, so the
figure is the engine's (timer poll, TimerFired, fold, replay, step, completion)
and does not depend on how long triggering took. Their RSS is this process's,
so with other scenarios in the run they run in a fresh child process.

``throughput`` also splits its CPU per execution by thread (event loop, fold
thread, librdkafka, the producer's poll thread) and, with the embedded broker,
the broker's. The ``rebuild`` log is loaded with a lingering producer (see
:func:`rebuild`). Lines starting with ``#`` note the host and its load: the
figures of a busy host are pessimistic. ``--check`` exits 1 when a target is
missed; a scenario that fails always does.

``scale``, ``failover``, ``churn`` and ``rolling`` run the workers as other
processes: the bench writes a small app (ploy.yaml + worker.py) and starts each
worker as ``python -m engine.bench --child-worker DIR`` (``Engine(...,
scale_out=True)`` in the consumer group of the scenario's own topic prefix and
group id, a state directory each, serving its engine API and advertising it as
``ploy worker`` does). Each worker folds only the partitions it owns. This
process triggers through a query-only engine (``runs=False``): in ``scale`` a
routing one, which folds nothing and asks each partition's owner, so no process
folds everything and the CPU summed over the processes is the cluster's; in the
others a read replica (``replica=True``), an observer that folds the log itself
so that its figures (claims, completion times) do not depend on the workers it
kills. A worker leaves when the bench stops it, or by itself once the bench is
gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import collector
from engine.app import Engine, load_app, serving_api
from engine.broker import EmbeddedBroker, wait_for_kafka
from engine.builder import Worker, ploy
from engine.clock import Clock, ManualClock
from engine.events import (
    Body,
    CancelRequested,
    Event,
    SleepScheduled,
    StepCompleted,
    StepStarted,
    TimerFired,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.listing import Cursor, list_page
from engine.log import EventLog
from engine.models import ExecutionSummary
from engine.ownership import GROUP_SETTINGS
from engine.rebuild import rebuild as rebuild_view
from engine.testing import engine_config, unique_prefix
from engine.timers import TimerSchedule
from engine.view import PartitionView

__all__ = ["FULL", "QUICK", "SCENARIOS", "Figure", "Sizes", "Target", "main", "parse_line"]

SCENARIOS = ("floor", "log", "step", "sequential", "throughput", "rebuild", "sleepers", "events",
             "timers", "long", "peer", "scale", "failover", "churn", "rolling", "flat")
NEEDS_FLOOR = ("log", "step", "peer")
# Measures this process's memory: run in a fresh process when other scenarios run too.
ISOLATED = ("sleepers", "events")
LINE_FIELDS = ("scenario", "metric", "value", "unit")
SETTLE_TIMEOUT_S = 300.0
TIMERS_LEAD_MS = 2_000  # timers: the first sleeper is due this long after the bench asks
TIMERS_WINDOW_MS = 3_000  # ... and the last one this much later
TIMERS_LOAD_WAVE = 200  # timers: 3-step executions triggered together, wave after wave
# Producer settings for loading a large log at once (not the engine's: it appends with linger 0).
BULK_LOAD = {"linger.ms": "20", "batch.num.messages": "10000"}

progress = logging.getLogger("ploy.bench")


@dataclass(frozen=True)
class Sizes:
    """The counts of one run (``FULL`` or ``QUICK``)."""

    floor_samples: int
    log_events: int
    log_executions: int
    step_executions: int
    sequential: int
    throughput: int
    rebuild_events: int
    sleepers: int
    long_steps: int
    repeats: int
    scale: int
    failover_executions: int
    failover_steps: int
    failover_step_ms: int
    flat: tuple[int, int] = (10_000, 1_000_000)  # finished executions: the small and big view
    scale_workers: tuple[int, ...] = (1, 2, 4)
    churn_executions: int = 300
    churn_steps: int = 10  # async steps of churn_step_ms each
    churn_step_ms: int = 500
    churn_s: float = 60.0
    rolling_rounds: int = 3
    rolling_timeout_s: float = 240.0  # how long restarted workers may take to claim it all
    timers: int = 300  # sleepers due one after another over TIMERS_WINDOW_MS
    peer_sequential: int = 200
    peer_at_once: int = 1_000
    peer_sleepers: int = 20
    event_latency: int = 200  # events sent one at a time to waiting executions
    event_waiters: int = 10_000  # executions waiting at once


FULL = Sizes(floor_samples=500, log_events=50_000, log_executions=200, step_executions=50,
             sequential=200, throughput=2_000, rebuild_events=200_000, sleepers=10_000,
             long_steps=500, repeats=3, scale=2_000, failover_executions=200,
             failover_steps=20, failover_step_ms=50)
QUICK = Sizes(floor_samples=50, log_events=5_000, log_executions=20, step_executions=5,
              sequential=20, throughput=200, rebuild_events=20_000, sleepers=1_000,
              long_steps=50, repeats=1, scale=300, failover_executions=40,
              failover_steps=20, failover_step_ms=50, flat=(2_000, 50_000),
              churn_executions=100, churn_s=15.0, rolling_rounds=1, rolling_timeout_s=60.0,
              timers=50, peer_sequential=20, peer_at_once=100, peer_sleepers=5,
              event_latency=20, event_waiters=1_000)


@dataclass(frozen=True)
class Target:
    """A bound a figure should keep: ``value <= bound`` or ``value >= bound``."""

    op: str
    bound: float

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"

    @classmethod
    def parse(cls, text: str | None) -> Target | None:
        """The inverse of ``str()``; None for None."""
        if text is None:
            return None
        op, bound = text.split()
        return cls(op, float(bound))


@dataclass(frozen=True)
class Figure:
    """One measured number."""

    scenario: str
    metric: str
    value: float
    unit: str
    target: Target | None = None

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def line(self) -> str:
        return (f"scenario={self.scenario} metric={self.metric} value={self.value:.6g} "
                f"unit={self.unit}")

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "metric": self.metric, "value": self.value,
                "unit": self.unit, "target": None if self.target is None else str(self.target),
                "ok": self.ok}


def parse_line(line: str) -> dict[str, str] | None:
    """The fields of a machine line, or None for any other line."""
    parts = line.split()
    if len(parts) != len(LINE_FIELDS):
        return None
    fields = dict(part.partition("=")[::2] for part in parts)
    return fields if list(fields) == list(LINE_FIELDS) else None


# -- numbers ----------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample list."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return seconds * 1000


def rss_mb() -> float:
    """This process's resident set (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds_of(pid: int | None) -> float | None:
    """User + system CPU seconds of another process (the embedded broker), if readable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THREAD_GROUPS = (("MainThread", "loop"), ("ploy-fold", "fold"), ("rdk:", "librdkafka"),
                 ("ploy-producer", "producer_poll"), ("ploy-step", "step_pool"))


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process: {tid: (group, seconds)}.

    Groups: the event loop, the fold thread, librdkafka's threads, the producer's
    poll thread, the step pool, and everything else.
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        tid = int(task.name)
        name = names.get(tid) or stat[stat.index("(") + 1:stat.rindex(")")]
        group = next((g for prefix, g in THREAD_GROUPS if name.startswith(prefix)), "other")
        fields = stat.rsplit(")", 1)[1].split()
        found[tid] = (group, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return found


def cpu_by_group(before: dict[int, tuple[str, float]],
                 after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent by each thread group between two :func:`thread_cpu` readings."""
    spent: dict[str, float] = {}
    for tid, (group, seconds) in after.items():
        spent[group] = spent.get(group, 0.0) + seconds - before.get(tid, (group, 0.0))[1]
    return spent


# -- the run ----------------------------------------------------------------------


@dataclass
class Bench:
    """What every scenario shares: the broker, a temp root, sizes and the figures so far."""

    servers: str
    root: Path
    sizes: Sizes
    broker_pid: int | None = None
    quick: bool = False
    figures: list[Figure] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed under the table, '# ' first
    floor_p50_ms: float | None = None
    floor_p99_ms: float | None = None
    floor_idle_p50_ms: float | None = None

    def add(self, scenario: str, metric: str, value: float, unit: str,
            target: Target | None = None) -> Figure:
        figure = Figure(scenario, metric, value, unit, target)
        self.figures.append(figure)
        print(figure.line(), flush=True)
        return figure

    def prefix(self, scenario: str) -> str:
        return unique_prefix(f"bench-{scenario}")

    def state_dir(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))

    def event_log(self, scenario: str) -> EventLog:
        return EventLog(self.servers, self.prefix(scenario))

    def broker_cpu(self) -> float | None:
        return cpu_seconds_of(self.broker_pid)


# -- workflows under test ---------------------------------------------------------------


async def _noop() -> None:
    return None


@dataclass
class Probe:
    """What the bench's workflows report from inside: step times and how many ran."""

    step_s: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)  # timed sleepers: resumed after wake_at
    entered: int = 0
    returned: int = 0

    def reset(self) -> None:
        self.step_s.clear()
        self.late_ms.clear()
        self.entered = self.returned = 0


def bench_worker(probe: Probe, clock: Clock | None = None) -> Worker:
    """``steps``: ``input["steps"]`` timed no-op steps; ``sleeper``: sleep to a wake time, step;
    ``timed_sleeper``: sleep to a wake time on the wall clock, note how late it resumed."""

    async def steps(ctx: Any) -> int:
        probe.entered += 1
        times = probe.step_s
        for i in range(ctx.input["steps"]):
            started = time.perf_counter()
            await ctx.step.run(f"s{i}", _noop)
            times.append(time.perf_counter() - started)
        probe.returned += 1
        return int(ctx.input["steps"])

    async def sleeper(ctx: Any) -> bool:
        probe.entered += 1
        now = (clock or Clock()).now()
        await ctx.step.sleep(max(1, int(ctx.input["wake_at"]) - now))
        await ctx.step.run("after", _noop)
        probe.returned += 1
        return True

    async def timed_sleeper(ctx: Any) -> bool:
        wake_at = int(ctx.input["wake_at"])
        await ctx.step.sleep(max(1, wake_at - Clock().now()))
        probe.late_ms.append(time.time() * 1000 - wake_at)  # once: after the replay that woke it
        return True

    app = (ploy().workflow("steps", None, steps).workflow("sleeper", None, sleeper)
           .workflow("timed_sleeper", None, timed_sleeper))
    return app.build()


@asynccontextmanager
async def engine_on(bench: Bench, scenario: str, worker: Worker,
                    clock: Clock | None = None) -> AsyncIterator[Engine]:
    """An engine on a fresh topic and state directory."""
    config = engine_config(bench.servers, bench.prefix(scenario), bench.state_dir(scenario))
    engine = Engine(worker, config, clock=clock)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def trigger_all(engine: Engine, workflow: str, inputs: Sequence[Any],
                      chunk: int = 2_000) -> list[str]:
    """Trigger concurrently (``chunk`` appends in flight at most); the ids in order."""
    runtime = engine.runtime
    ids: list[str] = []
    for start in range(0, len(inputs), chunk):
        ids += await asyncio.gather(
            *(runtime.trigger(workflow, item) for item in inputs[start:start + chunk]))
    return ids


async def settle(engine: Engine, probe: Probe, returned: int, ids: Sequence[str]) -> None:
    """Wait until ``returned`` handlers returned, every runner recorded its end, and the
    view of each partition of ``ids`` folded all of it (read-your-writes)."""
    runtime = engine.runtime
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while probe.returned < returned or runtime.runners:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe.returned} of {returned} handlers returned, "
                               f"{len(runtime.runners)} runners left after "
                               f"{SETTLE_TIMEOUT_S:g} s")
        await asyncio.sleep(0.002)
    one_per_partition = {runtime.log.partition_for(eid): eid for eid in ids}
    await asyncio.gather(*(runtime.get_execution(eid) for eid in one_per_partition.values()))


def statuses(engine: Engine, ids: Sequence[str]) -> Counter[str]:
    """How many of ``ids`` the view has in each status."""
    runtime = engine.runtime
    found: Counter[str] = Counter()
    for eid in ids:
        record = runtime.views[runtime.log.partition_for(eid)].record(eid)
        found[record["status"] if record else "unknown"] += 1
    return found


def expect(engine: Engine, ids: Sequence[str], status: str) -> None:
    found = statuses(engine, ids)
    if found[status] != len(ids):
        raise RuntimeError(f"expected {len(ids)} {status}, the view has {dict(found)}")


# -- synthetic logs ------------------------------------------------------------------


def synthetic_events(total: int, per_execution: int, concurrent: int) -> Iterator[Event]:
    """``total`` events of executions of ``per_execution`` events each, ``concurrent``
    executions interleaved at a time, as a busy worker writes them: trigger, start,
    StepStarted/StepCompleted pairs with small JSON inputs and outputs, completion."""
    per_execution = max(per_execution, 3)
    produced, ts, group = 0, 1_700_000_000_000, 0
    while produced < total:
        count = min(concurrent, math.ceil((total - produced) / per_execution))
        eids = [f"bench-{group}-{n}-{uuid.uuid4().hex[:8]}" for n in range(count)]
        group += 1
        for index in range(per_execution):
            for eid in eids:
                if produced >= total:
                    return
                ts += 1
                yield Event(eid, "steps", ts, _body(index, per_execution, ts))
                produced += 1


def _body(index: int, per_execution: int, ts: int) -> Body:
    if index == 0:
        return WorkflowTriggered('{"order_id":"o-1","amount":30.0}')
    if index == 1:
        return WorkflowStarted("bench:1")
    if index == per_execution - 1:
        return WorkflowCompleted('{"ok":true}')
    step = (index - 2) // 2
    step_input = json.dumps({"n": step})
    if index % 2 == 0:
        return StepStarted(f"step-{step}", 1, step_input)
    output = json.dumps({"id": f"r-{step}", "ok": True})
    return StepCompleted(f"step-{step}", 1, step_input, output, ts - 1)


def append_batched(log: EventLog, events: Iterator[Event] | Sequence[Event]) -> int:
    """append_nowait every event, then flush: how many were appended."""
    count = 0
    for event in events:
        log.append_nowait(event)
        count += 1
    log.flush(120)
    return count


def fold_all(log: EventLog, state: Path) -> tuple[int, float]:
    """Fold the whole topic from offset 0 into empty views under ``state``.

    Returns (events folded, seconds spent inside ``PartitionView.apply``).
    """
    views = {p: PartitionView(state / f"p{p}", log.topic, p, log.codec)
             for p in range(log.partitions)}
    folded, applying = 0, 0.0
    try:
        for batches in log.read_until_end({p: 0 for p in views}):
            for p, records in batches.items():
                started = time.perf_counter()
                applied, failure = views[p].apply(records)
                applying += time.perf_counter() - started
                folded += len(applied)
                if failure is not None:
                    raise failure
    finally:
        for view in views.values():
            view.close()
    shutil.rmtree(state, ignore_errors=True)
    return folded, applying


def timed_fold(bench: Bench, log: EventLog, name: str, expected: int) -> tuple[float, float]:
    """One fold of the whole topic into a fresh directory: (events/s end to end,
    events/s of the time inside ``PartitionView.apply`` alone)."""
    started = time.perf_counter()
    folded, applying = fold_all(log, bench.state_dir(name))
    elapsed = time.perf_counter() - started
    if folded != expected:
        raise RuntimeError(f"folded {folded} events, appended {expected}")
    return folded / elapsed, folded / applying


# -- scenarios ---------------------------------------------------------------------


async def floor(bench: Bench) -> None:
    """One raw append awaited at a time with the engine's producer."""
    log = await asyncio.to_thread(bench.event_log, "floor")
    try:
        samples: list[float] = []
        for n in range(bench.sizes.floor_samples + 50):
            took = await _timed_append(log)
            if n >= 50:  # the first appends connect and set up the idempotent producer
                samples.append(ms(took))
        idle = [ms(await _timed_append(log, FLOOR_IDLE_S))
                for _ in range(min(FLOOR_IDLE_SAMPLES, bench.sizes.floor_samples // 10))]
    finally:
        await asyncio.to_thread(log.close)
    bench.floor_p50_ms = percentile(samples, 50)
    bench.floor_p99_ms = percentile(samples, 99)
    bench.floor_idle_p50_ms = percentile(idle, 50)
    bench.add("floor", "append_p50", bench.floor_p50_ms, "ms")
    bench.add("floor", "append_p99", bench.floor_p99_ms, "ms")
    bench.add("floor", "samples", len(samples), "count")
    bench.add("floor", "append_after_idle_p50", bench.floor_idle_p50_ms, "ms")


# An append after the process sat idle costs more than one right after another (threads,
# the broker's and librdkafka's, and idle CPUs wake up): the baseline of what a client
# meets at an idle engine, as the peer workload's sleepers do (one every 0.1 s).
FLOOR_IDLE_S = 0.1
FLOOR_IDLE_SAMPLES = 30


async def _timed_append(log: EventLog, idle_s: float = 0.0) -> float:
    """Seconds one append awaited takes (after ``idle_s`` of nothing, if any)."""
    if idle_s:
        await asyncio.sleep(idle_s)
    event = Event(uuid.uuid4().hex, "floor", Clock().now(), WorkflowTriggered("{}"))
    started = time.perf_counter()
    await log.append(event)
    return time.perf_counter() - started


async def log_scenario(bench: Bench) -> None:
    """Batched appends and their fold; append latency is the floor's."""
    sizes = bench.sizes
    per_execution = sizes.log_events // sizes.log_executions
    append_rates: list[float] = []
    fold_rates: list[tuple[float, float]] = []
    for repeat in range(sizes.repeats):
        log = await asyncio.to_thread(bench.event_log, "log")
        try:
            events = list(synthetic_events(sizes.log_events, per_execution,
                                           sizes.log_executions))
            await asyncio.to_thread(log.append_sync, events[0])  # connect first
            started = time.perf_counter()
            count = await asyncio.to_thread(append_batched, log, events[1:])
            append_rates.append(count / (time.perf_counter() - started))
            count += 1
            fold_rates.append(await asyncio.to_thread(timed_fold, bench, log, f"log{repeat}",
                                                      count))
        finally:
            await asyncio.to_thread(log.close)
    bench.add("log", "appended", statistics.median(append_rates), "events/s")
    bench.add("log", "folded", statistics.median(r[0] for r in fold_rates), "events/s")
    bench.add("log", "folded_apply_only", statistics.median(r[1] for r in fold_rates),
              "events/s")
    assert bench.floor_p50_ms is not None and bench.floor_p99_ms is not None
    bench.add("log", "append_p50", bench.floor_p50_ms, "ms")
    bench.add("log", "append_p99", bench.floor_p99_ms, "ms")


async def step(bench: Bench) -> None:
    """Per-step latency of no-op steps, timed around ``ctx.step.run`` in the workflow."""
    probe = Probe()
    async with engine_on(bench, "step", bench_worker(probe)) as engine:
        await _warm_up(engine, probe)
        for _ in range(bench.sizes.step_executions):
            returned = probe.returned
            eid = await engine.runtime.trigger("steps", {"steps": 10})
            await settle(engine, probe, returned + 1, [eid])
        samples = [ms(s) for s in probe.step_s]
    p50 = percentile(samples, 50)
    bench.add("step", "step_p50", p50, "ms")
    bench.add("step", "step_p99", percentile(samples, 99), "ms")
    assert bench.floor_p50_ms is not None
    bench.add("step", "step_p50_over_floor_p50", p50 / bench.floor_p50_ms, "x",
              Target("<=", 3))


async def _warm_up(engine: Engine, probe: Probe) -> None:
    """Run a few executions first; then forget what the probe saw."""
    ids = await trigger_all(engine, "steps", [{"steps": 3}] * 5)
    await settle(engine, probe, 5, ids)
    probe.reset()


async def sequential(bench: Bench) -> None:
    """Trigger-to-completed as get_execution sees it, one execution at a time."""
    probe = Probe()
    samples: list[float] = []
    async with engine_on(bench, "sequential", bench_worker(probe)) as engine:
        runtime = engine.runtime
        await _warm_up(engine, probe)
        for _ in range(bench.sizes.sequential):
            started = time.perf_counter()
            eid = await runtime.trigger("steps", {"steps": 3})
            while True:
                execution = await runtime.get_execution(eid)
                if execution is not None and execution.status.terminal:
                    break
                await asyncio.sleep(0.001)
            samples.append(ms(time.perf_counter() - started))
            if execution.status.value != "completed":
                raise RuntimeError(f"execution {eid} ended {execution.status.value}")
    bench.add("sequential", "trigger_to_completed_p50", percentile(samples, 50), "ms",
              Target("<=", 15))
    bench.add("sequential", "trigger_to_completed_p99", percentile(samples, 99), "ms")


async def throughput(bench: Bench) -> None:
    """Executions of 3 steps, all triggered at once; median over repeats."""
    n = bench.sizes.throughput
    rates: list[float] = []
    cpu: dict[str, list[float]] = {}
    for _ in range(bench.sizes.repeats):
        probe = Probe()
        async with engine_on(bench, "throughput", bench_worker(probe)) as engine:
            await _warm_up(engine, probe)
            cpu0, threads0, broker0 = time.process_time(), thread_cpu(), bench.broker_cpu()
            started = time.perf_counter()
            ids = await trigger_all(engine, "steps", [{"steps": 3}] * n, chunk=n)
            await settle(engine, probe, n, ids)
            elapsed = time.perf_counter() - started
            spent = cpu_by_group(threads0, thread_cpu())
            spent["process"] = time.process_time() - cpu0
            broker1 = bench.broker_cpu()
            if broker0 is not None and broker1 is not None:
                spent["broker"] = broker1 - broker0
            for group, seconds in spent.items():
                cpu.setdefault(group, []).append(ms(seconds / n))
            expect(engine, ids, "completed")
            rates.append(n / elapsed)
    rate = statistics.median(rates)
    bench.add("throughput", "completed", rate, "exec/s", Target(">=", 500))
    bench.add("throughput", "steps", 3 * rate, "steps/s")
    bench.add("throughput", "cpu_per_execution", statistics.median(cpu.pop("process")), "ms")
    for group in ("loop", "fold", "librdkafka", "producer_poll", "step_pool", "other", "broker"):
        if group in cpu:
            bench.add("throughput", f"cpu_{group}_per_execution", statistics.median(cpu[group]),
                      "ms")


async def rebuild(bench: Bench) -> None:
    """Refold a log of many 3-step executions (9 events each) from offset 0.

    The log is loaded with a lingering producer (large record batches), as a
    busy worker's log has them: the embedded broker serves a fetch per record
    batch, at a cost that grows with the partition, so a log of tiny batches
    measures the broker rather than the fold.
    """
    total = bench.sizes.rebuild_events
    prefix = bench.prefix("rebuild")
    loader = await asyncio.to_thread(EventLog, bench.servers, prefix, extra=BULK_LOAD)
    try:
        count = await asyncio.to_thread(append_batched, loader,
                                        synthetic_events(total, 9, 1_000))
    finally:
        await asyncio.to_thread(loader.close)
    log = await asyncio.to_thread(EventLog, bench.servers, prefix)
    try:
        rebuilt = []  # `ploy rebuild`: partitions folded in parallel processes
        for repeat in range(bench.sizes.repeats):
            folded, seconds = await asyncio.to_thread(
                rebuild_view, log, bench.state_dir(f"rebuild-parallel{repeat}"))
            if folded != count:
                raise RuntimeError(f"rebuilt {folded} events, appended {count}")
            rebuilt.append(folded / seconds)
        rates = [await asyncio.to_thread(timed_fold, bench, log, f"rebuild{repeat}", count)
                 for repeat in range(bench.sizes.repeats)]
    finally:
        await asyncio.to_thread(log.close)
    bench.add("rebuild", "events", count, "count")
    bench.add("rebuild", "folded", statistics.median(rebuilt), "events/s",
              Target(">=", 100_000))
    bench.add("rebuild", "folded_one_process", statistics.median(r[0] for r in rates),
              "events/s")
    bench.add("rebuild", "folded_apply_only", statistics.median(r[1] for r in rates),
              "events/s")


async def sleepers(bench: Bench) -> None:
    """Executions asleep until one wake time: memory while asleep, then wake to all done."""
    n = bench.sizes.sleepers
    probe = Probe()
    clock = ManualClock()
    baseline = rss_mb()
    async with engine_on(bench, "sleepers", bench_worker(probe, clock), clock) as engine:
        wake_at = clock.now() + 3_600_000
        started = time.perf_counter()
        ids = await trigger_all(engine, "sleeper", [{"wake_at": wake_at}] * n)
        runtime = engine.runtime
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while probe.entered < n or runtime.runners:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{probe.entered} of {n} sleepers went to sleep")
            await asyncio.sleep(0.01)
        await settle(engine, probe, 0, ids)
        asleep_s = time.perf_counter() - started
        expect(engine, ids, "sleeping")
        rss = rss_mb()
        clock.advance(wake_at - clock.now())
        woke = time.perf_counter()
        await settle(engine, probe, n, ids)
        done_s = time.perf_counter() - woke
        expect(engine, ids, "completed")
    bench.add("sleepers", "executions", n, "count")
    bench.add("sleepers", "all_asleep_after", asleep_s, "s")
    bench.add("sleepers", "rss_while_asleep", rss, "MB", Target("<=", 300))
    bench.add("sleepers", "rss_growth_while_asleep", rss - baseline, "MB")
    bench.add("sleepers", "wake_to_all_completed", done_s, "s", Target("<=", 5))


def event_worker(probe: Probe, resumed: asyncio.Queue[float]) -> Worker:
    """``waiter``: wait for ``bench.event`` matched on ``k``, then a step that notes how long
    after the event's append (its data's ``sent``, wall clock) it began."""

    async def waiter(ctx: Any) -> bool:
        probe.entered += 1
        event = await ctx.step.wait_for_event("e", type="bench.event",
                                              match={"k": ctx.input["k"]})

        async def after() -> None:
            resumed.put_nowait(time.time() * 1000 - event.data["sent"])

        await ctx.step.run("after", after)
        probe.returned += 1
        return True

    return ploy().workflow("waiter", None, waiter).build()


async def events(bench: Bench) -> None:
    """Event append -> the waiter's next step, one at a time; then many waiters at once."""
    probe, resumed = Probe(), asyncio.Queue[float]()
    baseline = rss_mb()
    async with engine_on(bench, "events", event_worker(probe, resumed)) as engine:
        n = bench.sizes.event_latency
        ids = await trigger_all(engine, "waiter", [{"k": f"l{i}"} for i in range(n)])
        await _all_waiting(engine, probe, ids)
        latencies = []
        for i in range(n):
            await engine.send_event("bench.event", {"k": f"l{i}", "sent": time.time() * 1000})
            latencies.append(await asyncio.wait_for(resumed.get(), 30))
        await settle(engine, probe, n, ids)
        bench.add("events", "event_to_next_step_p50", percentile(latencies, 50), "ms")
        bench.add("events", "event_to_next_step_p99", percentile(latencies, 99), "ms")
        probe.reset()
        n = bench.sizes.event_waiters
        started = time.perf_counter()
        ids = await trigger_all(engine, "waiter", [{"k": f"w{i}"} for i in range(n)])
        await _all_waiting(engine, probe, ids)
        waiting_s = time.perf_counter() - started
        rss = rss_mb()
        sent = time.perf_counter()
        for first in range(0, n, 1_000):
            chunk = range(first, min(first + 1_000, n))
            await asyncio.gather(*(engine.send_event(
                "bench.event", {"k": f"w{i}", "sent": time.time() * 1000}) for i in chunk))
        await settle(engine, probe, n, ids)
        done_s = time.perf_counter() - sent
        expect(engine, ids, "completed")
    bench.add("events", "waiters", n, "count")
    bench.add("events", "all_waiting_after", waiting_s, "s")
    bench.add("events", "rss_while_waiting", rss, "MB", Target("<=", 300))
    bench.add("events", "rss_growth_while_waiting", rss - baseline, "MB")
    bench.add("events", "send_to_all_completed", done_s, "s")


async def _all_waiting(engine: Engine, probe: Probe, ids: Sequence[str]) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while probe.entered < len(ids) or engine.runtime.runners:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe.entered} of {len(ids)} waiters began to wait")
        await asyncio.sleep(0.01)
    await settle(engine, probe, 0, ids)
    expect(engine, ids, "waiting")


async def timers(bench: Bench) -> None:
    """Timer lateness: sleepers due one after another over a window, first on an idle
    engine, then while 3-step executions are triggered back to back (the load). Late by:
    the TimerFired event's timestamp (the timer) and the handler's resumption (what a
    workflow sees) after the wake time, on the wall clock."""
    sizes = bench.sizes
    for loaded in (False, True):
        probe = Probe()
        async with engine_on(bench, "timers", bench_worker(probe)) as engine:
            await _warm_up(engine, probe)
            runtime = engine.runtime
            stop = asyncio.Event()
            load = (asyncio.create_task(_steady_load(engine, probe, stop)) if loaded
                    else None)
            first = Clock().now() + TIMERS_LEAD_MS
            gap = TIMERS_WINDOW_MS / sizes.timers
            wakes = [first + int(i * gap) for i in range(sizes.timers)]
            ids = await trigger_all(engine, "timed_sleeper", [{"wake_at": w} for w in wakes])
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while len(probe.late_ms) < len(ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(probe.late_ms)} of {len(ids)} sleepers woke")
                await asyncio.sleep(0.05)
            stop.set()
            done = await load if load is not None else (0, 1.0)
            await settle(engine, probe, probe.returned, ids)
            fired = []
            for eid in ids:
                events = await runtime.history(eid) or []
                wake_at = next(e.body["wake_at"] for e in events if e.type == "SleepScheduled")
                fired.append(next(e.timestamp for e in events if e.type == "TimerFired")
                             - wake_at)
        name = "loaded" if loaded else "idle"
        early = [f for f in fired if f < 0]
        if early:
            raise RuntimeError(f"{len(early)} timers fired early, by up to {-min(early)} ms")
        bench.add("timers", f"{name}_fired_late_p50", percentile(fired, 50), "ms",
                  Target("<=", 5))
        bench.add("timers", f"{name}_fired_late_p99", percentile(fired, 99), "ms",
                  Target("<=", 20) if loaded else None)
        bench.add("timers", f"{name}_resumed_late_p50", percentile(probe.late_ms, 50), "ms")
        bench.add("timers", f"{name}_resumed_late_p99", percentile(probe.late_ms, 99), "ms")
        if loaded:
            bench.add("timers", "load_completed", done[0] / done[1], "exec/s")
    bench.add("timers", "sleepers", sizes.timers, "count")


async def _steady_load(engine: Engine, probe: Probe, stop: asyncio.Event) -> tuple[int, float]:
    """Trigger waves of 3-step executions, each once the last has returned, until
    ``stop``; (executions completed, seconds)."""
    started = time.perf_counter()
    done = 0
    while not stop.is_set():
        target = probe.returned + TIMERS_LOAD_WAVE
        ids = await trigger_all(engine, "steps", [{"steps": 3}] * TIMERS_LOAD_WAVE)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while probe.returned < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load: {len(ids)} executions not done")
            await asyncio.sleep(0.005)
        done += len(ids)
    return done, time.perf_counter() - started


async def long(bench: Bench) -> None:
    """Per-step time near step 10 and near the last step of one long execution."""
    steps = bench.sizes.long_steps
    probe = Probe()
    early: list[float] = []
    late: list[float] = []
    async with engine_on(bench, "long", bench_worker(probe)) as engine:
        await _warm_up(engine, probe)
        for _ in range(bench.sizes.repeats):
            probe.reset()
            eid = await engine.runtime.trigger("steps", {"steps": steps})
            await settle(engine, probe, 1, [eid])
            expect(engine, [eid], "completed")
            times = [ms(s) for s in probe.step_s]
            early += times[4:15]  # steps 5..15
            late += times[-11:]  # the last 11 steps, e.g. 490..500
    first, last = statistics.median(early), statistics.median(late)
    bench.add("long", "steps", steps, "count")
    bench.add("long", "step_near_10", first, "ms")
    bench.add("long", f"step_near_{steps}", last, "ms")
    bench.add("long", "late_over_early", last / first, "x", Target("<=", 2))


# -- scaled out: worker processes ----------------------------------------------------------

CHILD_WORKER = textwrap.dedent('''
    """The bench's workflows, run by worker processes (engine.bench: scale, failover, churn,
    rolling)."""
    import asyncio
    import time

    from engine import ploy

    app = ploy()


    async def _noop():
        return None


    @app.workflow("steps")
    async def steps(ctx):
        for i in range(ctx.input["steps"]):
            await ctx.step.run(f"s{i}", _noop)
        return ctx.input["steps"]


    @app.workflow("busy")
    async def busy(ctx):
        pause = ctx.input["step_ms"] / 1000

        def work():
            time.sleep(pause)  # a sync step: it holds a thread of the step pool

        for i in range(ctx.input["steps"]):
            await ctx.step.run(f"s{i}", work)
        return ctx.input["steps"]


    @app.workflow("paced")
    async def paced(ctx):
        pause = ctx.input["step_ms"] / 1000

        async def wait():
            await asyncio.sleep(pause)  # an async step: it holds no thread

        for i in range(ctx.input["steps"]):
            await ctx.step.run(f"s{i}", wait)
        return ctx.input["steps"]


    worker = app.build()
''').lstrip()
CHILD_CONFIG = "kind: worker\nworkflow:\n  STEPS: steps\n  BUSY: busy\n  PACED: paced\n"
CLAIMS_TIMEOUT_S = 90.0  # workers start, join the group and claim every partition
CLAIMS_STABLE_S = 1.0  # ... and no claim moves for this long
CHILD_STOP_S = 20.0  # SIGTERM, then SIGKILL after this long (a worker's stop grace is 10 s)
POLL_S = 0.02
DRAIN_POLL_S = 0.25  # scale: how often the owners are asked whether anything still runs
IDLE_S = 3.0  # scale: the idle cluster's CPU is sampled this long before each size
CHURN_SETTLE_S = 180.0  # churn: how long after the churn every execution may take to end
TERMINAL = ("completed", "failed", "cancelled")


async def child_worker(directory: Path) -> None:
    """``--child-worker DIR``: run the app in DIR scaled out, serving its engine API on a
    free loopback port and advertising it (as ``ploy worker`` does), until SIGTERM/SIGINT
    or until the process that started it is gone (a killed bench leaves no worker).
    ``PLOY_LOG=INFO`` in the environment logs its ownership changes to its log file."""
    logging.getLogger("ploy").setLevel(os.environ.get("PLOY_LOG", "WARNING").upper())
    worker, config = load_app(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    async with Engine(worker, config, scale_out=True) as engine, serving_api(engine):
        while not stop.is_set() and os.getppid() == parent:
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def _pid_of(worker_id: str | None) -> int | None:
    """The process id in a worker id (``host:pid:random``)."""
    if not worker_id:
        return None
    parts = worker_id.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass
class Cluster:
    """Worker processes of one app on one topic, and this process's query-only engine.

    ``slots`` holds the live worker of each slot; a slot's state directory outlives
    its workers, so a worker restarted in a slot finds its predecessor's views."""

    bench: Bench
    scenario: str
    app: Path
    env: dict[str, str]
    query: Engine
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    slots: list[subprocess.Popen[bytes]] = field(default_factory=list)
    slot_dirs: list[Path] = field(default_factory=list)

    def spawn(self, slot: int | None = None) -> subprocess.Popen[bytes]:
        """Start a worker in ``slot`` (default: a new slot)."""
        if slot is None:
            slot = len(self.slot_dirs)
            self.slot_dirs.append(self.bench.state_dir(f"{self.scenario}-worker{slot}"))
        output = self.log_of(len(self.procs)).open("wb")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.bench", "--child-worker", str(self.app)],
                env={**self.env, "PLOY_STATE_DIR": str(self.slot_dirs[slot])},
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        finally:
            output.close()  # the child has its own copy
        self.procs.append(proc)
        if slot < len(self.slots):
            self.slots[slot] = proc
        else:
            self.slots.append(proc)
        return proc

    async def kill(self, slot: int) -> None:
        """SIGKILL the worker of ``slot`` and reap it."""
        proc = self.slots[slot]
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)

    def log_of(self, n: int) -> Path:
        return self.bench.root / f"{self.scenario}-worker{n}.log"

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.slots if proc.returncode is None]

    def check_alive(self, procs: Sequence[subprocess.Popen[bytes]] | None = None) -> None:
        """Raise with the end of its output if a worker exited."""
        for proc in self.procs if procs is None else procs:
            if proc.poll() is not None:
                n = self.procs.index(proc)
                log = self.log_of(n)
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise RuntimeError(f"worker {n} (pid {proc.pid}) exited {proc.returncode}: "
                                   f"{tail}")

    async def claims(self) -> dict[int, tuple[int | None, int]]:
        """{partition: (pid of the claiming worker or None, epoch)}: the claims on the log
        for a replica, else what the workers' cards say."""
        report = (await self.query.workers())["partitions"]
        return {row["partition"]: (_pid_of(row["worker"]), int(row["epoch"])) for row in report}

    async def wait_claimed(self) -> dict[int, int]:
        """Wait until the live workers, each of them, hold every partition between them,
        and no claim has moved for a while; then {partition: pid}."""
        pids = {proc.pid for proc in self.live()}
        deadline = time.monotonic() + CLAIMS_TIMEOUT_S
        stable: tuple[float, dict[int, tuple[int | None, int]]] | None = None
        while True:
            self.check_alive([proc for proc in self.procs if proc.pid in pids])
            claims = await self.claims()
            holders = {pid for pid, _ in claims.values()}
            if holders == pids:
                if stable is None or stable[1] != claims:
                    stable = (time.monotonic(), claims)
                elif time.monotonic() - stable[0] >= CLAIMS_STABLE_S:
                    return {p: pid for p, (pid, _) in claims.items() if pid is not None}
            else:
                stable = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions not claimed by the {len(pids)} workers after "
                                   f"{CLAIMS_TIMEOUT_S:g} s: {claims}")
            await asyncio.sleep(0.2)

    async def wait_completed(self, ids: Sequence[str],
                             timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Poll ``get_execution`` until every one of ``ids`` is completed (in trigger order:
        one call per completed execution plus one per poll)."""
        deadline = time.monotonic() + timeout_s
        for eid in ids:
            while True:
                execution = await self.query.get_execution(eid)
                if execution is not None and execution.status.terminal:
                    if execution.status.value != "completed":
                        raise RuntimeError(f"execution {eid} ended {execution.status.value}")
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"execution {eid} not completed after {timeout_s:g} s")
                self.check_alive(self.live())
                await asyncio.sleep(POLL_S)

    async def wait_drained(self, ids: Sequence[str]) -> None:
        """Wait until no execution is queued or running, asking the owners' listings every
        ``DRAIN_POLL_S`` (one request per owner per poll, whatever the count of ``ids``).

        One ``get_execution`` per partition first: a routed query carries this process's
        last acknowledged offset there, so each owner has folded every trigger before
        its listing is believed."""
        query = self.query
        one_per_partition = {query.runtime.log.partition_for(eid): eid for eid in ids}
        await asyncio.gather(*(query.get_execution(eid) for eid in one_per_partition.values()))
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            busy = False
            for status in ("running", "queued"):
                if (await query.list_page(status=status, limit=1)).executions:
                    busy = True
                    break
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"executions still run after {SETTLE_TIMEOUT_S:g} s")
            self.check_alive(self.live())
            await asyncio.sleep(DRAIN_POLL_S)

    async def summaries(self, ids: Sequence[str]) -> dict[str, ExecutionSummary]:
        """The listing's summary of each of ``ids`` (newest first, pages of 500, through the
        owners), checked: every one found and completed."""
        wanted = set(ids)
        found: dict[str, ExecutionSummary] = {}
        before: Cursor | None = None
        while len(found) < len(wanted):
            page = await self.query.list_page(before=before, limit=500)
            found.update((s.execution_id, s) for s in page.executions
                         if s.execution_id in wanted)
            if page.next is None:
                break
            before = page.next
        ended = Counter(s.status.value for s in found.values())
        if len(found) != len(wanted) or ended["completed"] != len(wanted):
            raise RuntimeError(f"of {len(wanted)} executions the owners list {len(found)}: "
                               f"{dict(ended)}")
        return found

    def record(self, eid: str) -> dict[str, Any] | None:
        """The execution record in this process's own fold (a replica's)."""
        runtime = self.query.runtime
        return runtime.views[runtime.log.partition_for(eid)].record(eid)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: the live workers together, the broker, this process."""
        found = {"workers": sum(cpu_seconds_of(proc.pid) or 0.0 for proc in self.procs
                                if proc.poll() is None),
                 "query": time.process_time()}
        broker = self.bench.broker_cpu()
        if broker is not None:
            found["broker"] = broker
        return found


def stop_children(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live worker; SIGKILL those that have not exited in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + CHILD_STOP_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            progress.warning("worker pid %d did not stop in %g s: SIGKILL", proc.pid,
                             CHILD_STOP_S)
            proc.kill()
            proc.wait()


@asynccontextmanager
async def cluster(bench: Bench, scenario: str, workers: int, *,
                  replica: bool = False) -> AsyncIterator[Cluster]:
    """``workers`` worker processes on a topic prefix and group of their own, and a
    query-only engine here: routing each query to the partition's owner, or with
    ``replica`` folding every partition itself (an observer that reads the log, not
    the workers); every worker is stopped on the way out, also on failure."""
    prefix = bench.prefix(scenario)
    app = bench.state_dir(f"{scenario}-app")
    (app / "worker.py").write_text(CHILD_WORKER)
    (app / "ploy.yaml").write_text(CHILD_CONFIG)
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bench.servers, "PLOY_TOPIC_PREFIX": prefix,
           "PLOY_GROUP_ID": f"{prefix}.workers",
           "PYTHONPATH": package_root if not path else f"{package_root}{os.pathsep}{path}"}
    worker, config = load_app(app, env={**env, "PLOY_STATE_DIR": str(bench.state_dir(
        f"{scenario}-query"))})
    query = Engine(worker, config, runs=False, replica=replica)
    await query.start()  # creates the topic before any worker asks for it
    group = Cluster(bench, scenario, app, env, query)
    try:
        for _ in range(workers):
            group.spawn()
        yield group
    finally:
        try:
            await asyncio.to_thread(stop_children, group.procs)
        finally:
            await query.stop()


@dataclass
class ScaleRun:
    """One size of ``scale``: medians over its repeats."""

    workers: int
    rate: float  # completed exec/s
    cpu_ms: dict[str, float]  # ms per execution: workers, query, broker
    idle_ms_per_s: float  # the idle workers' CPU, ms per second

    @property
    def total_ms(self) -> float:
        """Every process of the cluster but the broker: the workers and the query process."""
        return self.cpu_ms["workers"] + self.cpu_ms["query"]


async def scale(bench: Bench) -> None:
    """Throughput's 3-step executions, all triggered at once from this process and run by
    1, 2 and 4 scaled-out worker processes, each folding only what it owns and answering
    this routing query process's questions about it: CPU per execution of every process
    (ratios to 1 worker), completed exec/s, and the cluster ceiling it models."""
    runs = [await _scale_size(bench, workers) for workers in bench.sizes.scale_workers]
    one = runs[0]
    for run in runs[1:]:
        n = run.workers
        bench.add("scale", f"workers_{n}_over_workers_1", run.rate / one.rate, "x")
        bench.add("scale", f"workers_{n}_cpu_ratio", run.total_ms / one.total_ms, "x",
                  Target("<=", 1.25) if n == 4 else None)
        bench.add("scale", f"workers_{n}_worker_cpu_ratio",
                  run.cpu_ms["workers"] / one.cpu_ms["workers"], "x")
    last = runs[-1]
    per_worker = 1000 / last.cpu_ms["workers"]  # a core's ms per second / ms per execution
    bench.add("scale", "ceiling_per_added_worker", per_worker, "exec/s")
    bench.add("scale", f"ceiling_{last.workers}_workers", last.workers * per_worker, "exec/s")
    n = bench.sizes.scale
    bench.notes.append(
        f"scale: {n:,} executions of 3 no-op steps at once, median of {bench.sizes.repeats}, "
        f"{os.cpu_count()} cpus shared by every worker, the query process and the broker; "
        f"cpu = workers + query process (the broker apart); exec/s from the last ended_at")
    bench.notes.append(
        f"scale model: a worker on a core of its own runs 1000 ms/s / the workers' CPU per "
        f"execution at {last.workers} workers ({last.cpu_ms['workers']:.2f} ms) = "
        f"{per_worker:,.0f} exec/s, and an event is folded by its owner only, so each added "
        f"worker adds that much (broker and clients on hosts of their own)")


async def _scale_size(bench: Bench, workers: int) -> ScaleRun:
    n = bench.sizes.scale
    rates: list[float] = []
    cpu: dict[str, list[float]] = {}
    async with cluster(bench, "scale", workers) as group:
        await group.wait_claimed()
        warm = await trigger_all(group.query, "steps", [{"steps": 3}] * 30)
        await group.wait_completed(warm)
        before = group.cpu()
        await asyncio.sleep(IDLE_S)
        idle = ms(group.cpu()["workers"] - before["workers"]) / IDLE_S
        for _ in range(bench.sizes.repeats):
            before = group.cpu()
            started_ms = time.time() * 1000
            ids = await trigger_all(group.query, "steps", [{"steps": 3}] * n, chunk=n)
            await group.wait_drained(ids)
            after = group.cpu()
            summaries = await group.summaries(ids)
            last_ended = max(s.ended_at or 0 for s in summaries.values())
            rates.append(n * 1000 / (last_ended - started_ms))
            for name, seconds in after.items():
                cpu.setdefault(name, []).append(ms((seconds - before[name]) / n))
    run = ScaleRun(workers, statistics.median(rates),
                   {name: statistics.median(v) for name, v in cpu.items()}, idle)
    bench.add("scale", f"workers_{workers}", run.rate, "exec/s")
    for name in ("workers", "query", "broker"):
        if name in run.cpu_ms:
            bench.add("scale", f"workers_{workers}_cpu_{name}_per_execution",
                      run.cpu_ms[name], "ms")
    bench.add("scale", f"workers_{workers}_cpu_per_execution", run.total_ms, "ms")
    bench.add("scale", f"workers_{workers}_idle_cpu", idle, "ms/s")
    return run


async def failover(bench: Bench) -> None:
    """Two workers run long executions; SIGKILL one, then time until every unfinished
    execution of its partitions has recorded a StepCompleted again (by the survivor)."""
    sizes = bench.sizes
    n, steps = sizes.failover_executions, sizes.failover_steps
    async with cluster(bench, "failover", 2, replica=True) as group:
        await group.wait_claimed()
        ids = await trigger_all(group.query, "busy",
                                [{"steps": steps, "step_ms": sizes.failover_step_ms}] * n,
                                chunk=n)
        await _wait_all_stepped(group, ids)
        claims = await group.claims()
        victim, survivor = group.procs
        moved = {p for p, (pid, _) in claims.items() if pid == victim.pid}
        if not moved:
            raise RuntimeError(f"the worker to kill holds no partition: {claims}")
        runtime = group.query.runtime
        waiting = {eid for eid in ids if runtime.log.partition_for(eid) in moved}
        killed_ms = int(time.time() * 1000)
        started = time.perf_counter()
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        claimed_s: float | None = None
        progressed = 0
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while waiting:
            if claimed_s is None:
                now = await group.claims()
                if all(now[p][0] == survivor.pid and now[p][1] > claims[p][1] for p in moved):
                    claimed_s = time.perf_counter() - started
            moving = _progressed_since(group, waiting, killed_ms)
            waiting -= moving.keys()
            progressed += sum(moving.values())
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} executions of the killed worker made no "
                                   f"progress in {SETTLE_TIMEOUT_S:g} s")
            group.check_alive([survivor])
            await asyncio.sleep(POLL_S)
        progress_s = time.perf_counter() - started
        if progressed == 0:
            raise RuntimeError("every execution of the killed worker had finished before the "
                               "kill: give them more steps")
        await group.wait_completed(ids)
    if claimed_s is not None:
        bench.add("failover", "seconds_to_claim", claimed_s, "s")
    bench.add("failover", "seconds_to_progress", progress_s, "s")
    bench.add("failover", "executions_moved", progressed, "count")
    bench.add("failover", "partitions_moved", len(moved), "count")
    bench.notes.append(
        f"failover: session.timeout.ms={GROUP_SETTINGS['session.timeout.ms']} (a dead worker's "
        f"partitions move after it plus a rebalance); {n} executions of {steps} steps of a "
        f"{sizes.failover_step_ms} ms sync sleep on 2 workers, one SIGKILLed once every "
        f"execution ran a step; seconds_to_claim: until the survivor's claims on the killed "
        f"worker's partitions are on the log")


async def _wait_all_stepped(group: Cluster, ids: Sequence[str]) -> None:
    """Wait until every execution is running with its first step recorded (its second
    started), none ended."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        records = [group.record(eid) for eid in ids]
        if any(r is not None and r["status"] in TERMINAL for r in records):
            raise RuntimeError("an execution ended before the kill: give it more steps")
        if all(r is not None and r["seq"] >= 2 for r in records):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the executions did not all start")
        group.check_alive()
        await asyncio.sleep(POLL_S)


def _progressed_since(group: Cluster, ids: set[str], since_ms: int) -> dict[str, bool]:
    """Which of ``ids`` are settled: {id: True} for one with a step completed after
    ``since_ms``, {id: False} for one that had ended by then (nothing to resume)."""
    settled: dict[str, bool] = {}
    for eid in ids:
        record = group.record(eid)
        if record is None:
            continue
        if record["status"] in TERMINAL and record["ended_at"] <= since_ms:
            settled[eid] = False
        elif record["updated_at"] > since_ms and any(
                s["kind"] == "step" and s["status"] == "completed" and s["ended_at"] > since_ms
                for s in group.query.runtime.views[record["partition"]].steps(eid)):
            settled[eid] = True
    return settled


# -- churn and rolling restarts: workers that come and go ---------------------------------

CHURN_SLOTS = 3


async def churn(bench: Bench) -> None:
    """Three worker slots; every 1-2 s one worker is SIGKILLed and a new one started in its
    slot (its state directory kept), for ``churn_s``; the executions were all triggered just
    before the first kill. Counted from the completions' own times (``ended_at``), read
    from a replica here that folds the log itself, so no figure depends on a worker."""
    sizes = bench.sizes
    n, steps, step_ms = sizes.churn_executions, sizes.churn_steps, sizes.churn_step_ms
    rng = random.Random(13)  # the same pauses every run
    async with cluster(bench, "churn", CHURN_SLOTS, replica=True) as group:
        await group.wait_claimed()
        ids = await trigger_all(group.query, "paced", [{"steps": steps, "step_ms": step_ms}] * n)
        started = time.time()
        end = started + sizes.churn_s
        kills = 0
        held: list[float] = []
        sampler = asyncio.create_task(_sample_held(group, held))
        try:
            while (left := end - time.time()) > 0:
                await asyncio.sleep(min(rng.uniform(1.0, 2.0), left))
                if time.time() >= end:
                    break
                slot = kills % CHURN_SLOTS
                await group.kill(slot)
                group.spawn(slot)
                kills += 1
        finally:
            sampler.cancel()
        churn_end = time.time()
        progress.info("churn: %d kills in %.0f s; waiting for the executions", kills,
                      churn_end - started)
        try:
            await group.wait_completed(ids, CHURN_SETTLE_S)
        finally:
            _churn_figures(bench, group, ids, churn_end, steps)
        settled_s = max((group.record(eid) or {}).get("ended_at") or 0 for eid in ids) / 1000
    bench.add("churn", "all_completed_after_churn", max(0.0, settled_s - churn_end), "s")
    bench.add("churn", "kills", kills, "count")
    bench.add("churn", "claimed_by_live_worker_pct", 100 * statistics.mean(held or [0.0]), "%")
    bench.notes.append(
        f"churn: {n} executions of {steps} async steps of {step_ms} ms ({steps * step_ms / 1000:g}"
        f" s each undisturbed), triggered at once on {CHURN_SLOTS} workers; for "
        f"{sizes.churn_s:g} s one worker SIGKILLed and restarted (same state dir) every 1-2 s, "
        f"in turn; completed/steps_done_during_churn from the events' own times; "
        f"claimed_by_live_worker_pct: the partitions whose claim on the log is a live "
        f"worker's, sampled every 0.25 s during the churn")


async def _sample_held(group: Cluster, held: list[float]) -> None:
    """Append, every 0.25 s, the share of partitions whose claim is a live worker's."""
    while True:
        live = {proc.pid for proc in group.live()}
        claims = await group.claims()
        held.append(sum(pid in live for pid, _ in claims.values()) / len(claims))
        await asyncio.sleep(0.25)


def _churn_figures(bench: Bench, group: Cluster, ids: Sequence[str], churn_end: float,
                   steps: int) -> None:
    """Executions and steps that had completed by ``churn_end``, by their events' times."""
    end_ms = churn_end * 1000
    runtime = group.query.runtime
    done = stepped = 0
    for eid in ids:
        record = group.record(eid)
        if record is None:
            continue
        if record["status"] == "completed" and (record["ended_at"] or 0) <= end_ms:
            done += 1
        stepped += sum(1 for s in runtime.views[record["partition"]].steps(eid)
                       if s["kind"] == "step" and s["status"] == "completed"
                       and (s["ended_at"] or 0) <= end_ms)
    bench.add("churn", "completed_during_churn", done, "count")
    bench.add("churn", "completed_during_churn_pct", 100 * done / len(ids), "%")
    bench.add("churn", "steps_done_during_churn_pct", 100 * stepped / (len(ids) * steps), "%")


async def rolling(bench: Bench) -> None:
    """Three workers under a light load; SIGTERM them all, wait until they exited, start
    three again (same state dirs): seconds until every partition is claimed by the new
    ones (claims read from the log by a replica here). Median of ``rolling_rounds``."""
    sizes = bench.sizes
    stops: list[float] = []
    firsts: list[float] = []
    claims: list[float] = []
    async with cluster(bench, "rolling", CHURN_SLOTS, replica=True) as group:
        await group.wait_claimed()
        for round_ in range(sizes.rolling_rounds):
            ids = await trigger_all(group.query, "paced", [{"steps": 10, "step_ms": 300}] * 30)
            await asyncio.sleep(1.0)  # running when the stop comes
            stop_s, first_s, claim_s = await _roll(group, sizes.rolling_timeout_s)
            stops.append(stop_s)
            firsts.append(first_s)
            claims.append(claim_s)
            progress.info("rolling round %d: stopped in %.1f s; after the start, a first claim "
                          "in %.1f s, all claimed in %.1f s", round_ + 1, stop_s, first_s,
                          claim_s)
            if claim_s > sizes.rolling_timeout_s:
                break  # the figure says it; another round would say it again
            await group.wait_completed(ids)
    bench.add("rolling", "seconds_to_stop", statistics.median(stops), "s")
    bench.add("rolling", "seconds_to_first_claim", statistics.median(firsts), "s")
    bench.add("rolling", "seconds_to_claim_all", statistics.median(claims), "s",
              Target("<=", 15))
    bench.add("rolling", "seconds_to_claim_all_max", max(claims), "s")
    bench.add("rolling", "rounds", len(claims), "count")
    bench.notes.append(
        f"rolling: {CHURN_SLOTS} workers with 30 executions running, all SIGTERMed at once, "
        f"started again once exited; seconds_to_claim_all: from the new start until every "
        f"partition's claim on the log is a new worker's (gives up at "
        f"{sizes.rolling_timeout_s:g} s); seconds_to_first_claim: until the first of them")


async def _roll(group: Cluster, timeout_s: float) -> tuple[float, float, float]:
    """Stop every worker gracefully, start as many again: (seconds to stop, seconds from
    the new start until a partition, then every partition, is claimed by a new worker;
    more than ``timeout_s`` if they never were)."""
    old = list(group.slots)
    started = time.perf_counter()
    await asyncio.to_thread(stop_children, old)
    stop_s = time.perf_counter() - started
    fresh = {group.spawn(slot).pid for slot in range(len(old))}
    started = time.perf_counter()
    first: float | None = None
    while (elapsed := time.perf_counter() - started) <= timeout_s:
        mine = [pid in fresh for pid, _ in (await group.claims()).values()]
        if first is None and any(mine):
            first = elapsed
        if all(mine):
            break
        group.check_alive(group.live())
        await asyncio.sleep(0.1)
    return stop_s, elapsed if first is None else first, elapsed


# -- flat: queries whose cost does not grow with history ---------------------------------

FLAT_T0 = 1_700_000_000_000
FLAT_WORKFLOWS = ("orders", "billing", "shipping", "emails")
FLAT_WAVE = 5_000  # executions folded together, each of their transitions in its own batch
FLAT_LIVE = 50  # executions still queued, running and sleeping (50 each), the newest
FLAT_SAMPLES = 200
FLAT_LAG_S = 2.0


def _flat_id(i: int) -> str:
    return f"flat-{i:08d}"


def _flat_workflow(i: int) -> str:
    return FLAT_WORKFLOWS[i % len(FLAT_WORKFLOWS)]


def _flat_created(i: int) -> int:
    return FLAT_T0 + 10 * i


def _flat_end(i: int) -> Body:
    if i % 10 == 3:
        return WorkflowFailed("ValueError", "card declined", "")
    if i % 50 == 7:
        return CancelRequested("operator")
    return WorkflowCompleted('{"ok":true}')


def build_flat_view(path: Path, finished: int) -> PartitionView:
    """A partition's view of ``finished`` executions that each slept once and ended
    (completed; 1 in 10 failed, 1 in 50 cancelled), then ``FLAT_LIVE`` queued, running and
    sleeping ones. Folded a wave at a time with every transition in its own batch, as
    under light load, so each status left and each timer fired leaves a deleted key."""
    view = PartitionView(path, "bench-flat", 0)
    offsets = iter(range(1 << 62))

    def fold(events: Iterator[Event]) -> None:
        _, failure = view.apply([(next(offsets), view.codec.encode(e)) for e in events])
        if failure is not None:
            raise failure

    def at(i: int, dt: int, body: Body) -> Event:
        return Event(_flat_id(i), _flat_workflow(i), _flat_created(i) + dt, body)

    for start in range(0, finished, FLAT_WAVE):
        wave = range(start, min(start + FLAT_WAVE, finished))
        fold(at(i, 0, WorkflowTriggered('{"order_id":"o-1"}')) for i in wave)
        fold(at(i, 1, SleepScheduled("sleep#1", 1, _flat_created(i) + 2)) for i in wave)
        fold(at(i, 2, TimerFired("sleep#1", _flat_created(i) + 2)) for i in wave)
        fold(at(i, 3, _flat_end(i)) for i in wave)
    live = range(finished, finished + 3 * FLAT_LIVE)
    fold(at(i, 0, WorkflowTriggered("{}")) for i in live)
    fold(at(i, 1, WorkflowStarted("bench:1")) for i in live if (i - finished) % 3)
    fold(at(i, 2, SleepScheduled("sleep#1", 86_400_000, _flat_created(i) + 86_400_000))
         for i in live if (i - finished) % 3 == 2)
    return view


def _deep_cursor(finished: int, modulo: int, rest: int) -> Cursor:
    """The cursor of the execution ``i % modulo == rest`` about 90% of the way down."""
    i = finished // 10
    i += (rest - i) % modulo
    return Cursor(_flat_created(i), _flat_id(i))


def _sample_pairs(small: Callable[[], object], big: Callable[[], object],
                  samples: int) -> tuple[list[float], list[float]]:
    """Seconds per call of ``small`` and ``big``, alternated call by call so that both
    see the same load on a shared host (the ratio is then the views', not the host's)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(samples):
        for fn, out in ((small, times[0]), (big, times[1])):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return times


def flat_queries(view: PartitionView, finished: int) -> dict[str, Callable[[], object]]:
    """The listings measured: a status and a workflow filter, first page and deep page."""
    failed_deep = _deep_cursor(finished, 10, 3)
    billing_deep = _deep_cursor(finished, len(FLAT_WORKFLOWS), 1)
    return {
        "list_status_first": lambda: list_page([view], status="failed"),
        "list_status_deep": lambda: list_page([view], status="failed", before=failed_deep),
        "list_workflow_first": lambda: list_page([view], workflow="billing"),
        "list_workflow_deep": lambda: list_page([view], workflow="billing", before=billing_deep),
        "list_both_first": lambda: list_page([view], status="failed", workflow="billing"),
        "list_all_deep": lambda: list_page([view], before=failed_deep),
        "list_all_1000": lambda: list_page([view], limit=1000),
    }


def transient_queries(view: PartitionView) -> dict[str, Callable[[], object]]:
    """What still walks deleted keys: a transient status's index, the timer scan at a claim."""
    return {"list_running_first": lambda: list_page([view], status="running"),
            "timer_load": view.timers}


async def timer_wakes(view: PartitionView, samples: int) -> list[float]:
    """Seconds from folding a timer due now to TimerSchedule appending its TimerFired."""
    fired = asyncio.Event()
    loop = asyncio.get_running_loop()

    def append(*args: Any) -> None:
        loop.call_soon_threadsafe(fired.set)
        loop.call_soon_threadsafe(args[-1], None)  # acknowledged

    schedule = TimerSchedule(Clock(), append, lambda _: True)
    schedule.load(0, view)
    schedule.start()
    codec, offset, waits = view.codec, view.next_offset, []
    try:
        await asyncio.sleep(0.2)  # the load's scan
        for n in range(samples):
            eid, now = f"flat-wake-{offset}-{n}", Clock().now()
            records = [(offset, codec.encode(Event(eid, "orders", now, WorkflowTriggered("{}")))),
                       (offset + 1, codec.encode(Event(eid, "orders", now,
                                                       SleepScheduled("sleep#1", 0, now))))]
            offset += 2
            applied, _ = view.apply(records)
            fired.clear()
            started = time.perf_counter()
            schedule.on_folded(0, applied)
            await asyncio.wait_for(fired.wait(), 5)
            waits.append(time.perf_counter() - started)
            applied, _ = view.apply([(offset, codec.encode(
                Event(eid, "orders", now, TimerFired("sleep#1", now))))])
            offset += 1
            schedule.on_folded(0, applied)
    finally:
        await schedule.stop()
    return waits


async def loop_lag_ms(queries: list[Callable[[], object]]) -> tuple[float, int]:
    """The event loop's longest stall while ``queries`` run off the loop
    (``asyncio.to_thread``), back to back for ``FLAT_LAG_S``: (lag ms, queries run).

    The thread bounds the stall only as far as each RocksDB call is short: rocksdict
    holds the GIL inside an iterator's seek or next, however many deleted keys it skips.
    """
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - started - 0.001)

    task = asyncio.create_task(ticker())
    listed = 0
    deadline = time.monotonic() + FLAT_LAG_S
    while time.monotonic() < deadline:
        await asyncio.to_thread(queries[listed % len(queries)])
        listed += 1
    done.set()
    await task
    return ms(max(lags)), listed


async def flat(bench: Bench) -> None:
    """Due timers and listings on one partition's view of ``flat`` finished executions,
    small and big, sampled alternately: p50/p99 per size, their big/small ratios (goal:
    p99 <= 1.5x) and the event loop's lag while the big view is listed (goal < 20 ms)."""
    sizes = bench.sizes.flat
    views: list[PartitionView] = []
    try:
        for finished in sizes:
            progress.info("flat: folding %d executions into one view", finished)
            started = time.perf_counter()
            path = bench.state_dir(f"flat-{finished}") / "p0"
            views.append(await asyncio.to_thread(build_flat_view, path, finished))
            progress.info("flat: built in %.1f s", time.perf_counter() - started)
        await _flat_figures(bench, views, sizes)
    finally:
        for view in views:
            view.close()
            shutil.rmtree(view.path.parent, ignore_errors=True)


async def _flat_figures(bench: Bench, views: list[PartitionView], sizes: tuple[int, int]) -> None:
    small, big = views
    queries = [flat_queries(v, n) for v, n in zip(views, sizes, strict=True)]
    transient = [transient_queries(v) for v in views]
    former = [lambda v=v: v.due_timers(Clock().now()) for v in views]
    plan = [(name, qs[0][name], qs[1][name], FLAT_SAMPLES, True)
            for qs in [queries] for name in queries[0]]
    plan += [(name, transient[0][name], transient[1][name], 20, False) for name in transient[0]]
    plan.append(("timer_poll_former", former[0], former[1], 10, False))
    for name, fn_small, fn_big, samples, goal in plan:
        await asyncio.to_thread(_sample_pairs, fn_small, fn_big, 5)  # warm the block cache
        pair = await asyncio.to_thread(_sample_pairs, fn_small, fn_big, samples)
        _flat_add(bench, name, sizes, pair, goal)
    wakes: tuple[list[float], list[float]] = ([], [])
    for _ in range(5):  # alternated in rounds, as the queries are
        wakes[0].extend(await timer_wakes(small, FLAT_SAMPLES // 5))
        wakes[1].extend(await timer_wakes(big, FLAT_SAMPLES // 5))
    _flat_add(bench, "timer_wake", sizes, wakes, True)
    idle, _ = await loop_lag_ms([lambda: time.sleep(0)])
    bench.add("flat", "loop_lag_idle", idle, "ms")
    pages = [fn for name, fn in queries[1].items() if name != "list_all_1000"]
    lag, listed = await loop_lag_ms(pages)
    bench.add("flat", f"loop_lag_listing_{sizes[1]}", lag, "ms", Target("<=", 20))
    bench.add("flat", f"pages_listed_during_lag_{sizes[1]}", listed, "pages")
    lag, _ = await loop_lag_ms([queries[1]["list_all_1000"]])
    bench.add("flat", f"loop_lag_listing_1000_rows_{sizes[1]}", lag, "ms")
    lag, _ = await loop_lag_ms(list(transient[1].values()))
    bench.add("flat", f"loop_lag_transient_{sizes[1]}", lag, "ms")
    bench.notes.append(
        "flat: not flat yet, no target: list_running (a transient status's index holds the "
        "deleted keys of every execution that left it, until RocksDB compacts them) and "
        "timer_load (the one timer scan at a claim walks fired timers' deleted keys); "
        "loop_lag_transient is the loop's stall while they run in a thread (rocksdict holds "
        "the GIL inside a seek). timer_poll_former: what the polling TimerService ran every "
        "50 ms per partition. loop_lag_idle: the host's own lag, with nothing listed")


def _flat_add(bench: Bench, name: str, sizes: tuple[int, int],
              pair: tuple[list[float], list[float]], goal: bool) -> None:
    for q in (50, 99):
        small, big = (ms(percentile(times, q)) for times in pair)
        bench.add("flat", f"{name}_p{q}_{sizes[0]}", small, "ms")
        bench.add("flat", f"{name}_p{q}_{sizes[1]}", big, "ms")
        target = Target("<=", 1.5) if goal and q == 99 else None
        bench.add("flat", f"{name}_p{q}_ratio", big / small, "x", target)


# -- the peer workload: what a client of ploy dev's HTTP front sees ----------------------

PEER_WORKER = textwrap.dedent('''
    """The peer workload (engine.bench peer): 3 steps, and one durable sleep."""
    from engine import ploy

    app = ploy()


    @app.workflow("peer_steps")
    async def peer_steps(ctx):
        total = ctx.input["n"]
        for name in ("one", "two", "three"):
            async def add(value=total):
                return value + 1

            total = await ctx.step.run(name, add)
        return total


    @app.workflow("peer_sleep")
    async def peer_sleep(ctx):
        await ctx.step.sleep(ctx.input["ms"])
        return True


    worker = app.build()
''').lstrip()
PEER_CONFIG = "kind: worker\nmain: worker.py\nworkflow:\n  STEPS: peer_steps\n  SLEEP: peer_sleep\n"
PEER_CONNECTIONS = 100  # the client's keep-alive connections, and its requests in flight at most
PEER_START_S = 90.0  # ploy dev: broker, engine and HTTP up
PEER_WAIT = "30s"  # the long-poll's wait per request (202 after it: ask again)
PEER_SLEEP_MS = 1_000
PEER_SLEEPER_GAP_S = 0.1  # the sleepers start this far apart
PEER_WARM_UP = 20
# An idle connection is dropped by the client first: uvicorn closes one after 5 s, and a
# request sent on it as it closes fails.
PEER_KEEPALIVE_S = 2.0


def proc_memory_mb(pid: int | None) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB; NaN when unreadable."""
    found = {"VmRSS:": math.nan, "VmHWM:": math.nan}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (OSError, TypeError):
        lines = []
    for line in lines:
        key = line.split(maxsplit=1)[0] if line else ""
        if key in found:
            found[key] = int(line.split()[1]) / 1024
    return found["VmRSS:"], found["VmHWM:"]


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PeerServer:
    """A ``ploy dev`` of the peer app (its own embedded broker) and its address."""

    process: subprocess.Popen[bytes]
    url: str
    broker_pid: int | None
    log: Path

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (ploy dev, its broker)."""
        return (cpu_seconds_of(self.process.pid) or 0.0, cpu_seconds_of(self.broker_pid) or 0.0)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"ploy dev exited {self.process.returncode}: {tail}")


@asynccontextmanager
async def ploy_dev(bench: Bench) -> AsyncIterator[PeerServer]:
    """``ploy dev`` on the peer app, on loopback, exactly as a user runs it: it starts its
    own embedded broker (the bench's Kafka settings are not passed on)."""
    app = bench.state_dir("peer-app")
    (app / "ploy.yaml").write_text(PEER_CONFIG)
    (app / "worker.py").write_text(PEER_WORKER)
    log = app / "ploy-dev.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "PLOY_"))}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "dev", str(app), "--port", str(port),
             "--log-level", "warning"],
            cwd=app, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    server = PeerServer(process, f"http://127.0.0.1:{port}", None, log)
    try:
        deadline = time.monotonic() + PEER_START_S
        while "press Ctrl-C to stop" not in log.read_text(errors="replace"):
            server.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"ploy dev did not start in {PEER_START_S:g} s")
            await asyncio.sleep(0.05)
        server.broker_pid = next(iter(children_of(process.pid)), None)
        yield server
    finally:
        await asyncio.to_thread(stop_children, [process])


class PeerClient:
    """A lean HTTP/1.1 client: up to ``PEER_CONNECTIONS`` keep-alive connections, one
    request in flight on each (the rest wait for a free one).

    Why not httpx: the client shares the machine's 2 cores with the server and the
    broker, and httpx (httpcore looks at every connection of its pool on each
    request) cost ~2.7 ms of CPU per execution, more than the engine; this client
    costs a tenth of that, so the figures measure the server. It speaks only what
    the workload needs: JSON requests, responses with a Content-Length.
    """

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.prefix = f"{parsed.path.rstrip('/')}/__ploy/api"
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.slots = asyncio.Semaphore(PEER_CONNECTIONS)

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body) of one request. A kept-alive connection the server closed
        while idle (nothing read back) is replaced and the request sent once more."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        async with self.slots:
            for attempt in range(2):
                reader, writer, reused = await self._connection()
                try:
                    writer.write(head.encode() + payload)
                    status, answer = await self._response(reader)
                except BaseException as exc:
                    writer.close()
                    closed_idle = (isinstance(exc, ConnectionError) or (
                        isinstance(exc, asyncio.IncompleteReadError) and not exc.partial))
                    if attempt or not reused or not closed_idle:
                        raise
                    continue
                self.free.append((reader, writer, time.monotonic()))
                return status, answer
        raise AssertionError("unreachable")

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A free kept-alive connection (True: reused), or a new one."""
        now = time.monotonic()
        while self.free:
            reader, writer, idle_since = self.free.pop()
            if now - idle_since < PEER_KEEPALIVE_S:
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, Any]:
        header = await reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        raw = await reader.readexactly(length)
        return status, json.loads(raw) if raw else None

    async def trigger(self, binding: str, value: Any, *, wait: str | None = None
                      ) -> dict[str, Any]:
        """POST .../trigger/{binding}: its 201 answer (with ``wait``: 200 and the ended
        execution if it ended within the wait)."""
        path = f"/trigger/{binding}" + (f"?wait={wait}" if wait else "")
        status, answer = await self._request("POST", path, {"input": value})
        if status not in (200, 201, 202):
            raise RuntimeError(f"trigger {binding}: {status} {answer}")
        return answer  # type: ignore[no-any-return]

    async def call(self, binding: str, value: Any) -> dict[str, Any]:
        """Trigger and wait for the ended execution in one request (``?wait=``); on a
        202 (not ended within the wait) on through the result's long-poll."""
        answer = await self.trigger(binding, value, wait=PEER_WAIT)
        return answer if "status" in answer else await self.result(answer)

    async def result(self, started: dict[str, Any]) -> dict[str, Any]:
        """The ended execution through the long-poll (asked again on each 202)."""
        path = (f"/executions/{started['execution_id']}/result?wait={PEER_WAIT}"
                f"&min_offset={started['offset']}")
        while True:
            status, answer = await self._request("GET", path)
            if status == 200:
                return answer  # type: ignore[no-any-return]
            if status != 202:
                raise RuntimeError(f"result of {started['execution_id']}: {status} {answer}")

    async def history(self, eid: str) -> list[dict[str, Any]]:
        status, answer = await self._request("GET", f"/executions/{eid}/history")
        if status != 200:
            raise RuntimeError(f"history of {eid}: {status} {answer}")
        return answer["events"]  # type: ignore[no-any-return]

    async def run(self, n: int) -> dict[str, Any]:
        """One 3-step execution, trigger to result."""
        execution = await self.result(await self.trigger("STEPS", {"n": n}))
        if execution["status"] != "completed" or execution["output"] != n + 3:
            raise RuntimeError(f"execution {execution['execution_id']} ended "
                               f"{execution['status']} with {execution['output']!r}")
        return execution

    async def aclose(self) -> None:
        for _, writer, _ in self.free:
            writer.close()
        self.free.clear()


async def peer(bench: Bench) -> None:
    """The peer workload against ``ploy dev``'s HTTP front (see the module docstring)."""
    sizes = bench.sizes
    async with ploy_dev(bench) as server:
        client = PeerClient(server.url)
        try:
            await asyncio.gather(*(client.run(i) for i in range(PEER_WARM_UP)))
            await _peer_sequential(bench, client, server, sizes.peer_sequential)
            await _peer_at_once(bench, client, server, sizes.peer_at_once)
            await _peer_sleep(bench, client, server, sizes.peer_sleepers)
        finally:
            await client.aclose()
        server.check_alive()
        rss, peak = proc_memory_mb(server.process.pid)
        broker_rss, broker_peak = proc_memory_mb(server.broker_pid)
    bench.add("peer", "rss_server", rss, "MB", Target("<=", 150))
    bench.add("peer", "rss_server_peak", peak, "MB")
    bench.add("peer", "rss_broker", broker_rss, "MB")
    bench.add("peer", "rss_broker_peak", broker_peak, "MB")
    if bench.floor_p50_ms is not None:
        bench.add("peer", "floor_append_p50", bench.floor_p50_ms, "ms")
    if bench.floor_idle_p50_ms is not None:
        bench.add("peer", "floor_append_after_idle_p50", bench.floor_idle_p50_ms, "ms")


async def _peer_sequential(bench: Bench, client: PeerClient, server: PeerServer,
                           n: int) -> None:
    """(a) one execution at a time, trigger to result: in one request (``POST
    .../trigger/STEPS?wait=30s``, as a synchronous call to the other engines), and in
    two (the trigger, then the result's long-poll)."""
    total: list[float] = []
    two: list[float] = []
    trigger: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        execution = await client.call("STEPS", {"n": i})
        total.append(ms(time.perf_counter() - started))
        if execution.get("status") != "completed":
            raise RuntimeError(f"execution {execution['execution_id']} ended "
                               f"{execution.get('status')}")
    for i in range(n):
        started = time.perf_counter()
        answer = await client.trigger("STEPS", {"n": i})
        triggered = time.perf_counter()
        execution = await client.result(answer)
        two.append(ms(time.perf_counter() - started))
        trigger.append(ms(triggered - started))
        if execution["status"] != "completed":
            raise RuntimeError(f"execution {answer['execution_id']} ended {execution['status']}")
    server.check_alive()
    bench.add("peer", "sequential", n, "count")
    bench.add("peer", "trigger_to_result_p50", percentile(total, 50), "ms", Target("<=", 5))
    bench.add("peer", "trigger_to_result_p99", percentile(total, 99), "ms")
    bench.add("peer", "trigger_then_result_p50", percentile(two, 50), "ms")
    bench.add("peer", "trigger_only_p50", percentile(trigger, 50), "ms")


async def _peer_at_once(bench: Bench, client: PeerClient, server: PeerServer,
                        n: int) -> None:
    """(b) ``n`` triggered at once; then every result through the long-poll."""
    starts: list[float] = []
    rates: list[float] = []
    cpu: dict[str, list[float]] = {"server": [], "broker": [], "client": []}
    for repeat in range(bench.sizes.repeats):
        base = repeat * n
        (server0, broker0), client0 = server.cpu(), time.process_time()
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.trigger("STEPS", {"n": base + i})
                                         for i in range(n)))
        starts.append(time.perf_counter() - started)
        ended = await asyncio.gather(*(client.result(a) for a in answers))
        elapsed = time.perf_counter() - started
        (server1, broker1), client1 = server.cpu(), time.process_time()
        wrong = [e["execution_id"] for e in ended if e["status"] != "completed"]
        if wrong:
            raise RuntimeError(f"{len(wrong)} of {n} did not complete, e.g. {wrong[0]}")
        rates.append(n / elapsed)
        cpu["server"].append(ms((server1 - server0) / n))
        cpu["broker"].append(ms((broker1 - broker0) / n))
        cpu["client"].append(ms((client1 - client0) / n))
    server.check_alive()
    bench.add("peer", "at_once", n, "count")
    bench.add("peer", "start_all", statistics.median(starts), "s", Target("<=", 0.5))
    bench.add("peer", "completed", statistics.median(rates), "exec/s", Target(">=", 466))
    for who, values in cpu.items():
        bench.add("peer", f"cpu_{who}_per_execution", statistics.median(values), "ms")


async def _peer_sleep(bench: Bench, client: PeerClient, server: PeerServer, n: int) -> None:
    """(c) ``n`` executions sleeping durably for 1 s, started ``PEER_SLEEPER_GAP_S`` apart:
    how late each ends as the client sees it (trigger to result in one request, minus
    the sleep), and on
    the log: TimerFired and the end after the sleep's wake time."""

    async def sleeper(delay: float) -> tuple[float, float, float]:
        await asyncio.sleep(delay)
        started = time.perf_counter()
        execution = await client.call("SLEEP", {"ms": PEER_SLEEP_MS})
        seen = ms(time.perf_counter() - started) - PEER_SLEEP_MS
        events = await client.history(execution["execution_id"])
        wake_at = next(e["body"]["wake_at"] for e in events if e["type"] == "SleepScheduled")
        fired = next(e["timestamp"] for e in events if e["type"] == "TimerFired")
        return seen, fired - wake_at, execution["ended_at"] - wake_at

    late = await asyncio.gather(*(sleeper(i * PEER_SLEEPER_GAP_S) for i in range(n)))
    server.check_alive()
    bench.add("peer", "sleepers", n, "count")
    bench.add("peer", "sleep_late_p50", statistics.median(s for s, _, _ in late), "ms",
              Target("<=", 5))
    bench.add("peer", "sleep_late_max", max(s for s, _, _ in late), "ms")
    bench.add("peer", "sleep_timer_fired_late_p50", statistics.median(f for _, f, _ in late),
              "ms")
    bench.add("peer", "sleep_ended_late_p50", statistics.median(e for _, _, e in late), "ms")


RUNNERS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "floor": floor,
    "log": log_scenario,
    "step": step,
    "sequential": sequential,
    "throughput": throughput,
    "rebuild": rebuild,
    "sleepers": sleepers,
    "events": events,
    "timers": timers,
    "long": long,
    "peer": peer,
    "scale": scale,
    "failover": failover,
    "churn": churn,
    "rolling": rolling,
    "flat": flat,
}


# -- output and the command line ---------------------------------------------------------


def table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned, readable table."""
    header = ("scenario", "metric", "value", "unit", "target", "ok?")
    rows = [header] + [
        (f.scenario, f.metric, _readable(f.value), f.unit, str(f.target or ""),
         {True: "yes", False: "NO", None: ""}[f.ok])
        for f in figures
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i == 2 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _readable(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def selected(names: Sequence[str]) -> list[str]:
    """The scenarios to run, in their standard order; the floor first when a ratio needs it."""
    chosen = set(names or SCENARIOS)
    if chosen & set(NEEDS_FLOOR):
        chosen.add("floor")
    return [name for name in SCENARIOS if name in chosen]


@contextmanager
def kafka() -> Iterator[tuple[str, int | None]]:
    """(bootstrap servers, broker pid): KAFKA_BOOTSTRAP_SERVERS, else an embedded broker."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if servers:
        wait_for_kafka(servers, timeout_s=15)
        yield servers, None
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers, broker.pid


async def in_child(bench: Bench, name: str) -> None:
    """Run one scenario in a fresh ``python -m engine.bench`` on the same broker."""
    out = bench.root / f"{name}.json"
    command = [sys.executable, "-m", "engine.bench", name, "--json", str(out)]
    if bench.quick:
        command.append("--quick")
    child = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bench.servers},
        stdout=asyncio.subprocess.DEVNULL)
    await child.wait()
    if not out.is_file():
        raise RuntimeError(f"{' '.join(command)} exited {child.returncode} without figures")
    result = json.loads(out.read_text())
    for f in result["figures"]:
        bench.add(f["scenario"], f["metric"], f["value"], f["unit"], Target.parse(f["target"]))
    if result["errors"]:
        raise RuntimeError("; ".join(result["errors"].values()))


async def run(bench: Bench, names: Sequence[str]) -> None:
    for name in names:
        progress.info("running %s", name)
        started = time.perf_counter()
        try:
            if name in ISOLATED and len(names) > 1:
                await in_child(bench, name)
            else:
                await RUNNERS[name](bench)
        except Exception as exc:  # report and go on with the next scenario
            progress.exception("scenario %s failed", name)
            bench.errors[name] = f"{type(exc).__name__}: {exc}"
        progress.info("%s took %.1f s", name, time.perf_counter() - started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench",
        description="Benchmarks of the engine's hot path (see the module docstring).")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="about 10x smaller counts")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (a failed scenario always does)")
    parser.add_argument("--child-worker", type=Path, metavar="DIR",
                        help="(internal: workers of scale, failover, churn, rolling) run the app "
                             "in DIR as a scaled-out worker serving its API until SIGTERM or "
                             "until its parent is gone")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    return args


def host() -> str:
    """A comment line on the machine: figures on a busy host are pessimistic."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"# host: {os.cpu_count()} cpus, load average {load}, python {sys.version.split()[0]}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    collector.tune_for_serving()  # as ploy dev and ploy worker do: the engines run here
    if args.child_worker is not None:
        asyncio.run(child_worker(args.child_worker))
        return 0
    progress.setLevel(logging.INFO)
    names = selected(args.scenarios)
    sizes = QUICK if args.quick else FULL
    hosts = [host()]
    print(hosts[0], flush=True)
    with kafka() as (servers, pid), tempfile.TemporaryDirectory(prefix="ploy-bench-") as tmp:
        bench = Bench(servers, Path(tmp), sizes, pid, quick=args.quick)
        asyncio.run(run(bench, names))
    hosts.append(host())
    print()
    print(table(bench.figures))
    for note in bench.notes:
        print(f"# {note}")
    print(hosts[1])
    for name, error in bench.errors.items():
        print(f"FAILED {name}: {error}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "quick": args.quick, "scenarios": names, "errors": bench.errors, "host": hosts,
            "notes": bench.notes,
            "figures": [f.as_json() for f in bench.figures]}, indent=2) + "\n")
    missed = any(f.ok is False for f in bench.figures)
    return 1 if bench.errors or (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
