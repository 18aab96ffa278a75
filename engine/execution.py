"""Replay-or-run of one execution: the machinery behind ``ctx.step``.

A runner holds one execution as a live coroutine. It starts from what the
view recorded (completed steps, attempts, fired sleeps, logged lines), runs the
handler from the top, and for each step:

1. Looks the step's key up in what was recorded: a completed step returns its
   recorded output; a step that failed for good raises its StepFailedError
   again; a step part-way through its retries waits for its ``retry_at`` and
   goes on with the next attempt (invariant 2).
2. Otherwise appends ``StepStarted`` without waiting (the idempotent
   producer keeps it before what follows), waits until every earlier append of
   the run is acknowledged, runs ``fn``, and appends ``StepCompleted``, or
   awaits ``StepFailed`` with ``retry_at`` or ``final``.
3. Goes on with the value in hand: it never waits for its own events to come
   back through the fold, nor, after a completion, for the acknowledgement:
   the completion goes to the broker with the run's next event (the next
   step's start, or the end), and whatever runs a function, waits durably or
   ends the execution waits for it first (``_send``). So a step's function
   never runs on a value the log may not have, and a handler's last step and
   its end cost one round trip.

A durable sleep appends ``SleepScheduled`` and ends the coroutine (Suspend):
the execution holds no task while it sleeps, and ``TimerFired`` resumes it by
replay. A cancel takes effect at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import threading
import traceback as tb
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel

from engine import erasure, models, payloads, waits
from engine.context import Context
from engine.durations import MAX_DURATION_MS, backoff_ms, parse_duration, within_limit
from engine.errors import (
    AppendError,
    NonRetryableError,
    PartitionStalledError,
    PayloadTooDeepError,
    PayloadTooLargeError,
    SerializationError,
    StepFailedError,
    StepTimeoutError,
    SubjectErasedError,
)
from engine.events import (
    Body,
    Event,
    Patched,
    SleepScheduled,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    WaitStarted,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.log import UnencodableEventError
from engine.models import ExecutionStatus, ReceivedEvent
from engine.versioning import Diverged, Replay
from engine.waits import WAIT_KINDS

if TYPE_CHECKING:
    from engine.builder import WorkflowDef
    from engine.runtime import Runtime

logger = logging.getLogger("ploy.runtime")
user_log = logging.getLogger("ploy.workflow")
# A step's completion (or an end) of an output up to this many characters goes to the
# broker with the run's next event (``_send``): encoded (UTF-8, sealed) it stays under
# EventLog.batch_record_bytes. A larger one goes alone.
HELD_OUTPUT_CHARS = 8 * 1024
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Outcome(Enum):
    """How a run ended, for the runtime to act on."""

    ENDED = "ended"  # its end event is on the log
    PAUSED = "paused"  # a durable sleep, a shutdown, a lost partition: resumed by replay
    RETRY_LATER = "retry_later"  # an append failed: run it again by replay, later


class Suspend(BaseException):  # noqa: N818 - a signal, not an error
    """The execution sleeps durably; its coroutine ends without finishing it."""


class Cancelled(BaseException):  # noqa: N818
    """A cancel was requested; no further step starts."""


class _OperatorCompleted(Exception):  # noqa: N818 - a signal inside _step
    """An operator completed the step in flight (``StepResolved``): its output, as JSON."""

    def __init__(self, output: str):
        super().__init__(output)
        self.output = output


class Shutdown(BaseException):  # noqa: N818
    """The worker is stopping; the execution resumes elsewhere or on restart."""


class LogUnavailable(BaseException):  # noqa: N818
    """An append failed (the broker is down or refused it): stop this run, so that
    user code cannot take it for a step's failure; the runtime tries again later.

    ``permanent`` when the broker will refuse the same record every time
    (too large for it, say): retrying the same end event cannot help.
    ``refused``: the event the broker refused, when the runner knows it.
    """

    def __init__(self, message: str, permanent: bool = False, refused: Body | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.refused = refused


# The step attempt a ``ctx.log`` call runs inside, if any: (runner, step key, attempt).
# A context variable, so that it follows a step function into its thread or task
# and parallel branches each see their own.
_IN_STEP: contextvars.ContextVar[tuple[ExecutionRunner, str, int] | None] = (
    contextvars.ContextVar("ploy_in_step", default=None))
RESERVED = ("#", "[", "]", "\x00")  # the engine's own key syntax: name#2, name[0]; NUL


def to_json(value: Any, what: str) -> str:
    """Strict JSON text for a recorded value; pydantic models become dicts."""
    try:
        return json.dumps(value, default=_model_dump, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SerializationError(what, str(exc)) from None


def _model_dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


ERROR_TEXT_LIMIT = 16_384  # bytes of UTF-8, for an error message and for a traceback


def error_fields(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) as recorded in events, each cut to a bounded size
    so that an exception quoting a large payload still fits one record."""
    text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
    return _cut(type(exc).__name__), _cut(str(exc)), _cut(text)


def _cut(text: str) -> str:
    """At most ERROR_TEXT_LIMIT bytes of UTF-8 (a lone surrogate becomes its escape)."""
    raw = payloads.utf8(text)
    if len(raw) <= ERROR_TEXT_LIMIT:
        return raw.decode()
    kept = raw[:ERROR_TEXT_LIMIT].decode(errors="ignore")  # never half a character
    return kept + f"... [{len(raw) - len(kept.encode())} more bytes]"


def check_name(name: str, what: str = "step") -> None:
    """A user's step name must not reach the engine's keys (``a#2``, ``p[0]``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {what} name must be a non-empty string, got {name!r}")
    if payloads.has_lone_surrogate(name):
        raise ValueError(f"{what} name {name!r} contains a lone surrogate (not valid Unicode)")
    if any(c in name for c in RESERVED):
        raise ValueError(
            f"{what} name {name!r}: '#', '[', ']' and NUL are reserved for the engine's own "
            "step keys (a repeated name is keyed 'name#2', parallel branches 'name[0]')")


CHILD_ENDED = "ploy.execution.ended"  # the event a child sends its parent when it ends
EVENT_TYPE_LIMIT = 256  # bytes of UTF-8


def check_event_type(event_type: str) -> None:
    """An event type is a non-empty string of valid Unicode, at most 256 bytes, no NUL."""
    if not isinstance(event_type, str) or not event_type.strip():
        raise ValueError(f"an event type must be a non-empty string, got {event_type!r}")
    if payloads.has_lone_surrogate(event_type) or "\x00" in event_type:
        raise ValueError(f"event type {event_type!r} contains a NUL or a lone surrogate")
    if len(event_type.encode()) > EVENT_TYPE_LIMIT:
        raise ValueError(f"an event type is at most {EVENT_TYPE_LIMIT} bytes, got "
                         f"{len(event_type.encode())}")


# What ``since`` may be: ms since the epoch of a time from 1970 to the end of 9999.
_EPOCH_MS_RANGE = range(0, 253_402_300_800_000)


def _epoch_ms(since: int | datetime) -> int:
    """``since`` as ms since the epoch (a datetime without a zone is taken as UTC)."""
    if isinstance(since, datetime):
        aware = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        ms = int(aware.timestamp() * 1000)
    elif isinstance(since, int) and not isinstance(since, bool):
        ms = since
    else:
        raise TypeError(f"since must be ms since the epoch (int) or a datetime, got {since!r}")
    if ms not in _EPOCH_MS_RANGE:
        shown = since if not isinstance(since, int) or abs(since) < 10**30 else "a larger number"
        raise ValueError(f"since must be a time from 1970 to 9999 (ms since the epoch), "
                         f"got {shown}")
    return ms


def match_text(match: dict[str, Any] | None) -> str:
    """The JSON text of a match: an object of dotted paths into the event's data -> values."""
    if match is None:
        return "{}"
    if not isinstance(match, dict):
        raise TypeError(f"match must be a dict of dotted paths to values, got {match!r}")
    for path in match:
        if (not isinstance(path, str) or not path or "\x00" in path
                or any(not part for part in path.split("."))):
            raise ValueError(f"match key {path!r} is not a dotted path like 'order.id'")
    text = to_json(match, "match")
    if payloads.lone_surrogate(text) is not None:
        raise ValueError("match contains a lone surrogate (not valid Unicode)")
    return text


def _as_is(text: str) -> str:
    return text


def received_event(wait: dict[str, Any]) -> ReceivedEvent | None:
    """What a recorded wait returns on replay: its event, None after a timeout; Suspend
    while it still waits (or a cancel ended it: the next checkpoint says so)."""
    status = wait["status"]
    if status == waits.RECEIVED:
        event = wait["event"]
        return ReceivedEvent(id=event["id"], type=event["type"], source=event["source"],
                             time=event["time"], data=models.loads(event["data"]))
    if status == waits.TIMED_OUT:
        return None
    raise Suspend


def child_result(key: str, wait: dict[str, Any],
                 open_text: Callable[[str], str] = _as_is) -> Any:
    """What a recorded invoke returns on replay: the child's output, or StepFailedError.

    ``open_text`` opens the part of the child's notice sealed with its subject's key.
    """
    if wait["status"] == waits.TIMED_OUT:
        raise StepFailedError(key, 1, "StepTimeoutError",
                              f"child execution {wait['child_id']} did not end in time")
    if wait["status"] != waits.RECEIVED:
        raise Suspend
    ended = models.loads(wait["event"]["data"])
    if "sealed" in ended:
        ended.update(json.loads(open_text(ended.pop("sealed"))))
    if ended["status"] == ExecutionStatus.COMPLETED.value:
        return ended["output"]
    error = ended.get("error") or {}
    raise StepFailedError(key, 1, error.get("type", "WorkflowCancelled"),
                          error.get("message") or f"child execution {ended['execution_id']} "
                          f"was {ended['status']}")


class ExecutionRunner:
    """One execution in memory: its replay state and its live coroutine."""

    def __init__(self, runtime: Runtime, record: dict[str, Any], steps: list[dict[str, Any]],
                 workflow: WorkflowDef, logged: list[str | None] = (),  # type: ignore[assignment]
                 after: tuple[asyncio.Future[tuple[int, int]], Body] | None = None):
        self.runtime = runtime
        self.id: str = record["id"]
        self.record = record
        self.workflow = workflow
        self.recorded = {s["key"]: s for s in steps if s["kind"] == "step"}
        self.sleeps = {s["key"]: s for s in steps if s["kind"] == "sleep"}
        self.waits = {s["key"]: s for s in steps if s["kind"] in WAIT_KINDS}
        self._opening = 0  # waits being opened (parallel invokes): the run ends after them
        # Operator actions on steps in flight (StepResolved, once folded): step key -> output
        # JSON of a completed one; keys whose backoff wait ends now; the task of each call.
        self._operator_outputs: dict[str, str] = {}
        self._retry_now: set[str] = set()
        self._calls: dict[str, asyncio.Task[Any]] = {}
        self._opened = asyncio.Event()
        self.replay = Replay(steps, record.get("patches") or [])  # engine.versioning
        # Log lines are keyed by where they were logged, so a replay records none twice
        # and drops none (a completed step's function does not run on replay).
        self.logged = {p for p in logged if p is not None}
        self._legacy_logs = sum(1 for p in logged if p is None)  # written before positions
        self.cancel_requested = asyncio.Event()
        # Appends sent and not waited for yet (``_send``), in log order, and those held
        # to go with the runner's next one.
        self._unacked: list[tuple[asyncio.Future[tuple[int, int]], Body]] = []
        self._held: list[tuple[Event, bool]] = []  # (event, waited)
        # ``after``: the runtime's append this run follows, sent right before it started
        # (its trigger, its timer's firing). Nothing of the run goes to the producer
        # before it is acknowledged, and a refusal of it stops the run, as one of its own
        # would: a refused trigger leaves no event of an execution the log never had (the
        # fold would stop the partition on it), a refused firing no step start before
        # the sleep's end (a replay would count it as an attempt).
        self._after: asyncio.Future[tuple[int, int]] | None = None
        self._waking: str | None = None  # the sleep that firing ends
        if after is not None:
            self._after = after[0]
            self._unacked.append(after)
            if isinstance(after[1], TimerFired):
                self._waking = after[1].sleep
        self._lost: LogUnavailable | None = None  # refused when released from the loop
        # The offset of this run's last acknowledged append, and whether that covers all
        # it sent: none unanswered, and none that nobody waits for (a start, a log line)
        # after it (``Runtime._appended``: a replay waits for their fold).
        self.acked_to = -1
        self.settled = True
        self._unwaited_last = False  # the last event handed over was one nobody waits for
        self._thread = threading.get_ident()  # the event loop's: _held is its alone
        self._loop = asyncio.get_running_loop()
        if self._after is not None:
            self._after.add_done_callback(lambda _: self._release())
        self._occurrences: dict[str, int] = {}
        self._sleep_count = 0
        self._boundary = 0  # step, sleep and parallel calls made by the handler so far
        self._since_boundary = 0  # workflow-level log lines since the last of them
        self._step_logs: dict[tuple[str, int], int] = {}
        self.cancel_reason: str | None = None
        self.partition = runtime.log.partition_for(self.id)
        # engine.erasure: a subject's payloads are sealed on the way out, opened on replay.
        self.subject: str | None = record.get("subject")
        self._opener = erasure.Opener(runtime.key_store, self.id)
        # The claim this runner was started under: it writes with it, and it stops
        # when its process no longer holds it (even if it claims the partition anew:
        # a runner of the new claim then replays from the view).
        self.epoch = runtime.epoch_of(self.id)

    # -- plumbing ----------------------------------------------------------

    def _event(self, body: Body) -> Event:
        if self.subject is not None:
            body = erasure.seal_body(self.runtime.key_store, self.subject, self.id, body)
        return Event(self.id, self.workflow.name, self.runtime.clock.now(), body,
                     epoch=self.epoch)

    def _open(self, text: str) -> str:
        """A recorded payload as plaintext; SubjectErasedError once its key is gone."""
        if self.subject is None:
            return text
        if text == erasure.ERASED:  # written after its key was gone
            raise SubjectErasedError(self.subject, self.id)
        return self._opener.open(text)

    async def _append(self, body: Body) -> None:
        """Append; return once it, and every append sent before it, is acknowledged."""
        self._release((self._event(body), True))
        await self._acknowledged()

    def _append_nowait(self, body: Body) -> None:
        """Append without ever waiting for it (a start, a log line): held like a completion
        (``_send``), so that a workflow's start, a step's start, and the step's completion
        when it returns at once, go to the broker together with what follows. An async
        step's function starts before its start is handed over: one refused then stops
        the run at its next wait, and the replay runs the function again (as when the
        broker refuses the start later). From another thread (ctx.log in a step's thread)
        the event is held through the loop, so the run's events keep their order."""
        event = self._event(body)
        if threading.get_ident() == self._thread:
            self._hold(event, False)
            return
        try:
            self._loop.call_soon_threadsafe(self._hold, event, False)
        except RuntimeError:  # the loop is closed (shut down): straight to the producer
            try:
                self.runtime.log.append_nowait(event)
            except AppendError as exc:
                raise LogUnavailable(str(exc), exc.permanent, body) from exc

    def _send(self, body: Body) -> None:
        """Append without waiting: the next ``_acknowledged`` waits for it.

        A step's completion is sent so, and the handler goes on with the value at
        once: what it does before its next step's function runs, its next durable
        wait or its end (each waits for the completion first) is the replayable code
        between steps, which nothing outside sees. The event is held until the
        runner's next append (or the loop's next turn), so that the two go to the
        broker together, normally in one record batch (``EventLog.send_all`` says
        what that does and does not promise): a handler's last step and its end cost
        one round trip, not two.
        """
        self._hold(self._event(body), True)

    def _hold(self, event: Event, waited: bool) -> None:
        if not self._held:
            self._loop.call_soon(self._release)
        self._held.append((event, waited))

    def _release(self, *more: tuple[Event, bool]) -> None:
        """Hand what ``_send`` holds, then ``more``, to the producer in one go.

        Nothing more goes out after an append that failed (a gap in the execution's
        history): LogUnavailable instead, as for an append refused at once that nobody
        waits for; the refusals of the others show at ``_acknowledged``. Called without
        ``more`` (from the loop, or before a wait) it never raises: such a refusal is kept
        for the run's next append or wait.
        """
        items = self._held + list(more) if self._held else list(more)
        if not items:
            return
        if not self._may_send(raising=bool(more)):
            self._held = items
            return
        try:
            futures = self.runtime.log.send_all(items)
        except UnencodableEventError as exc:  # nothing was sent
            self._drop_unencodable(exc)  # (one of ``more``: raised, the held ones kept)
            self._release(*more)  # the rest, without it
            return
        self._held = []
        self._unwaited_last = not items[-1][1]
        tracing = self.runtime.tracing.tracer is not None
        refused: LogUnavailable | None = None
        for (event, waited), future in zip(items, futures, strict=True):
            if future is None:
                continue
            if waited:
                if tracing:
                    future.add_done_callback(functools.partial(self._traced, event.body))
                self._unacked.append((future, event.body))
            elif refused is None:
                refused = _unavailable(future, event.body)
        if refused is not None:
            if more:
                raise refused
            self._lost = self._lost or refused

    def _may_send(self, raising: bool) -> bool:
        """False while what the run follows (``after``) is unanswered; False or raised (for
        the caller's own append) once an append of the run failed: nothing follows it."""
        failed = self._failed()
        if failed is not None:
            if raising:
                raise failed
            return False  # (called from the loop, it just keeps them: the run is stopping)
        return self._after is None or self._after.done()  # (released on its answer)

    def _drop_unencodable(self, exc: UnencodableEventError) -> None:
        """A held event that can never be written (a bug upstream) must not stop every
        later append: it is dropped, loudly; if it was a completion, the run stops at
        its next wait, as on a refusal. One the caller passed is the caller's error."""
        dropped = [(e, waited) for e, waited in self._held if e is exc.event]
        if not dropped:
            raise exc
        logger.error("execution %s: %s; dropped", self.id, exc)
        self._held = [(e, waited) for e, waited in self._held if e is not exc.event]
        if dropped[0][1]:
            self._lost = self._lost or LogUnavailable(str(exc), True, exc.event.body)

    def _failed(self) -> LogUnavailable | None:
        """The first append of this run that the broker did not take, if any."""
        if self._lost is not None:
            return self._lost
        for future, body in self._unacked:
            if future.done():
                failure = _unavailable(future, body)
                if failure is not None:
                    return failure
        return None

    def _traced(self, body: Body, future: asyncio.Future[tuple[int, int]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.runtime.tracing.recorded(self.record, self.workflow.name, body,
                                          self.runtime.clock.now())

    async def _acknowledged(self, *, unwaited: bool = True) -> None:
        """Wait until every append sent so far is acknowledged (parallel branches may
        wait for the same ones); LogUnavailable if one was not: the run stops there, as
        it would have at the append itself.

        ``unwaited=False`` (a step about to run): appends nobody waits for (starts, log
        lines) may stay held for the loop's next turn, or the step's completion."""
        if self._after is not None:
            await self._after_runtime()
        if unwaited or any(waited for _, waited in self._held):
            self._release()
        if self._lost is not None:
            raise self._lost
        if not self._unacked:
            return
        for future, body in list(self._unacked):
            try:
                if not future.done():  # shared: a waiter cancelled must not cancel it
                    await asyncio.shield(future)
                if not future.cancelled():
                    future.result()
            except AppendError as exc:
                raise LogUnavailable(str(exc), exc.permanent, body) from exc
        # Only those acknowledged leave, each counted in the run's mark (another branch's
        # too, though not waited for here); one that failed meanwhile (a parallel
        # branch's) stays, for the next wait to raise.
        kept = []
        for future, body in self._unacked:
            if _pending_or_failed(future):
                kept.append((future, body))
            else:
                self._count_acked(future)
        self._unacked = kept

    async def _after_runtime(self) -> None:
        """Wait for the runtime's append this run follows (``after``, if any); raise a
        refusal of it (or of another append of the run) as the run's LogUnavailable."""
        after = self._after
        if after is None:
            return
        if not after.done():
            with contextlib.suppress(AppendError):
                await asyncio.shield(after)
        failed = self._failed()
        if failed is not None:
            raise failed

    def _count_acked(self, future: asyncio.Future[tuple[int, int]]) -> None:
        """An acknowledged append leaves ``_unacked``: the run's mark covers it."""
        if not future.cancelled():
            self.acked_to = max(self.acked_to, future.result()[1])

    async def _settled(self, timeout_s: float = 10.0) -> None:
        """The run stops on a failed append: let the others it sent (parallel branches')
        be answered first, so that a replay started next sees them (bounded)."""
        self._release()  # (without ``more`` it does not raise)
        pending = [f for f, _ in self._unacked if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    def _forget_unacked(self) -> None:
        """The run ends without waiting for what it sent (it stops or shuts down): a
        refusal of one is logged, not an unretrieved exception."""
        self._release()
        self._held = []  # kept back after a failed append: nothing of the run follows it
        if self._unwaited_last:  # its acknowledgement is known to nobody
            self.settled = False
        for future, _ in self._unacked:
            if not future.done():
                self.settled = False
                future.add_done_callback(_retrieve)
            elif not future.cancelled() and future.exception() is None:
                self._count_acked(future)
            # (one that failed: the run stopped on it, or after it, and said so already)
        self._unacked = []

    async def _checkpoint(self) -> None:
        """A step boundary: stop here if cancelled, shutting down, or no longer the owner."""
        if self.cancel_requested.is_set():
            raise Cancelled
        runtime = self.runtime
        if runtime.stopping:
            raise Shutdown
        if self.subject is not None and runtime.key_store.get(self.subject) is None:
            raise SubjectErasedError(self.subject, self.id)  # erased while it ran
        if runtime.scale_out:
            await runtime.ensure_lease()
            if not runtime.may_run(self.partition) or runtime.epoch_of(self.id) != self.epoch:
                raise Shutdown

    def _key(self, name: str) -> str:
        check_name(name)
        self._boundary += 1
        self._since_boundary = 0
        n = self._occurrences.get(name, 0) + 1
        self._occurrences[name] = n
        if n == 1:
            return name
        if n == 2:
            self.log(f"step name '{name}' is used more than once; later ones are keyed "
                     f"'{name}#2', '{name}#3', ... (give each step a unique name)", None,
                     "warning")
        return f"{name}#{n}"

    def _check_size(self, what: str, text: str | None) -> None:
        if text is not None:
            limit = self.runtime.config.max_payload_bytes
            if self.subject is not None:
                limit = erasure.plaintext_limit(limit)  # it is sealed before it is appended
            payloads.check(text, what, limit)

    # -- the handler ----------------------------------------------------------

    async def run(self) -> Outcome:
        """Run the handler to its end, its next durable sleep, a cancel, or shutdown.

        Every append of the run, the end event's too, goes through one path: when
        the log is unavailable the run stops and says ``RETRY_LATER``; the runtime
        then resumes it by replay, so no execution is left ``running`` with nothing
        to resume it.
        """
        try:
            end = await self._handle()
            if end is None:
                await self._acknowledged()
                await self._waits_opened()
                if not self.cancel_requested.is_set():
                    return Outcome.PAUSED
                # A cancel came while it opened a wait (a child's trigger in flight): the
                # execution is cancelled, and this run writes its end (children included).
                end = WorkflowCancelled(self.cancel_reason)
            try:
                await self._end(end)
            except LogUnavailable as exc:
                if not exc.permanent or not isinstance(exc.refused, WorkflowCompleted):
                    raise  # (a step's completion refused: not the output's fault)
                # The broker will never take this output: fail the execution, clearly.
                self._unacked = [(f, b) for f, b in self._unacked if b is not exc.refused]
                refused = AppendError(self.runtime.log.topic, f"the output was refused: {exc}")
                await self._end(WorkflowFailed(*error_fields(refused)))
        except LogUnavailable as exc:
            if isinstance(exc.refused, WorkflowTriggered):  # it ran ahead of its trigger,
                return Outcome.ENDED  # which was refused: its caller has the error
            logger.warning("execution %s: %s; it resumes later", self.id, exc)
            await self._settled()
            return Outcome.RETRY_LATER
        finally:
            self._forget_unacked()
        return Outcome.ENDED

    async def _end(self, end: Body) -> None:
        """Append the end event; a cancelled parent first cancels its children, and a
        child first tells its parent (an event with the child's result, idempotent by
        id), so that a crash in between repeats them, never loses them: the replay
        reaches the same end and does them again."""
        if isinstance(end, WorkflowCancelled):  # its children and parent, then the end,
            await self._acknowledged()
            await self.runtime.record_end(self.record, end)  # tried again while they fail
            return
        if self.record.get("parent_id"):
            await self._acknowledged()  # the parent hears of no end the log may not have
            try:
                await self.runtime.notify_parent(self.record, end)
            except AppendError as exc:
                raise LogUnavailable(str(exc), exc.permanent) from exc
        if isinstance(end, WorkflowCompleted) and len(end.output) > HELD_OUTPUT_CHARS:
            await self._acknowledged()  # too large to share a record batch with the completion
        await self._append(end)

    async def _waits_opened(self) -> None:
        """Parallel waits (``asyncio.gather`` of invokes): the first to suspend ends the
        handler; let the others finish appending what they wait for (bounded)."""
        if self._opening:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while self._opening:
                        self._opened.clear()
                        await self._opened.wait()

    async def _handle(self) -> Body | None:
        """Run the handler; the event that ends the execution, or None if it paused."""
        try:
            if self.record["status"] == "queued":
                version = self.runtime.config.version_for(self.workflow.name)
                self._append_nowait(WorkflowStarted(self.runtime.worker_id, version))
            ctx = Context(input=self._input(), env=self.runtime.env, execution_id=self.id,
                          workflow=self.workflow.name, runner=self)
            result = await self.workflow.handler(ctx)
            self.replay.end()
            await self._checkpoint()
            return WorkflowCompleted(self._output(result))
        except (Suspend, Shutdown):
            return None
        except Cancelled:
            user_log.warning("[%s %s] cancelled: %s", self.workflow.name, self.id,
                             self.cancel_reason or "no reason given",
                             extra={"ended_execution": self.id})
            return WorkflowCancelled(self.cancel_reason)
        except Diverged as diverged:  # new code that does not fit this history: stop it here
            user_log.error("[%s %s] failed: %s", self.workflow.name, self.id, diverged.error)
            return WorkflowFailed(*error_fields(diverged.error))
        except Exception as exc:
            user_log.error("[%s %s] failed: %s: %s", self.workflow.name, self.id,
                           type(exc).__name__, exc, extra={"ended_execution": self.id})
            return WorkflowFailed(*error_fields(exc))

    def _input(self) -> Any:
        data = json.loads(self._open(self.record["input"]))
        model = self.workflow.input
        return model.model_validate(data) if model is not None else data

    def _output(self, result: Any) -> str:
        model = self.workflow.output
        if model is not None:
            if isinstance(result, BaseModel) and not isinstance(result, model):
                result = result.model_dump()
            validated = result if isinstance(result, model) else model.model_validate(result)
            try:
                text = validated.model_dump_json()
            except ValueError as exc:  # pydantic refuses text no UTF-8 encoder takes
                raise SerializationError(f"the output of workflow '{self.workflow.name}'",
                                         str(exc)) from None
        else:
            text = to_json(result, f"the output of workflow '{self.workflow.name}'")
        self._check_size("workflow output", text)
        return text

    # -- ctx.step.run ---------------------------------------------------------

    async def run_step(self, name: str, fn: Callable[[], Any], *, input: Any,
                       retries: int | None, timeout: int | str | None) -> Any:
        await self._checkpoint()
        key = self._key(name)
        self.replay.meet(key)
        return await self._step(key, fn, input, retries, timeout)

    async def _step(self, key: str, fn: Callable[[], Any], input: Any, retries: int | None,
                    timeout: int | str | None) -> Any:
        # (not written to the log: one of over 100 years is as good as none)
        timeout_ms = None if timeout is None else min(parse_duration(timeout, limit=None),
                                                      MAX_DURATION_MS)
        limit = self.runtime.config.retries_for(self.workflow.name) if retries is None else retries
        if limit < 0:
            raise ValueError(f"step '{key}': retries must be >= 0, got {limit}")
        input_json = None if input is None else to_json(input, f"the input of step '{key}'")
        self._check_size(f"the input of step '{key}'", input_json)
        attempt = 1
        recorded = self.recorded.get(key)
        if recorded is not None:
            if recorded["status"] == "completed":
                return json.loads(self._open(recorded["output"]))
            attempt = self._resume_attempt(key, recorded)
            retry_at = recorded["attempts"][-1]["retry_at"] if recorded["attempts"] else None
            if retry_at is not None:
                await self._wait_until(retry_at, key)  # durable: a restart keeps it
        while True:
            if key in self._operator_outputs:
                return json.loads(self._open(self._operator_outputs[key]))
            self._append_nowait(StepStarted(key, attempt, input_json))
            await self._acknowledged(unwaited=False)  # the previous step's completion first
            started_at = self.runtime.clock.now()
            token = _IN_STEP.set((self, key, attempt))
            try:
                value = await self._call(key, fn, timeout_ms)
                output = to_json(value, f"the result of step '{key}'")
                self._check_size(f"the result of step '{key}'", output)
            except _OperatorCompleted as done:  # the fold has it: nothing to append
                _IN_STEP.reset(token)
                return json.loads(self._open(done.output))
            except Exception as exc:
                _IN_STEP.reset(token)
                final = attempt > limit or isinstance(
                    exc, NonRetryableError | SerializationError | PayloadTooLargeError
                    | PayloadTooDeepError)
                now = self.runtime.clock.now()
                retry_at = None if final else now + self._backoff(attempt)
                await self._append(StepFailed(key, attempt, None, *error_fields(exc),
                                              started_at, retry_at, final))
                # The terminal of `ploy dev` shows failures as they are recorded.
                user_log.warning("[%s %s] step '%s' attempt %d failed: %s: %s%s",
                                 self.workflow.name, self.id, key, attempt, type(exc).__name__,
                                 exc, " (final)" if final else
                                 f"; retry in {(retry_at or now) - now} ms")
                if final:
                    raise StepFailedError(key, attempt, type(exc).__name__, str(exc)) from exc
                assert retry_at is not None
                await self._wait_until(retry_at, key)
                attempt += 1
                continue
            _IN_STEP.reset(token)
            completed = StepCompleted(key, attempt, None, output, started_at)
            if len(output) <= HELD_OUTPUT_CHARS:
                self._send(completed)
            else:  # a large one goes alone (see EventLog.send_all)
                await self._append(completed)
            return json.loads(output)

    def _resume_attempt(self, key: str, recorded: dict[str, Any]) -> int:
        """The attempt to run next for a step the log already has attempts of."""
        last = recorded["attempts"][-1] if recorded["attempts"] else None
        if recorded["status"] == "failed" and last is not None and last["error"]:
            err = last["error"]
            raise StepFailedError(key, last["attempt"], err["type"], self._open(err["message"]))
        if last is None:
            return 1
        # The last attempt failed, or it never finished (its worker died): either
        # way it counts, and the next one runs.
        return int(last["attempt"]) + 1

    async def _call(self, key: str, fn: Callable[[], Any], timeout_ms: int | None) -> Any:
        if inspect.iscoroutinefunction(fn):
            work: Any = fn()
        else:
            self._release()  # its start goes before the function runs
            if self._lost is not None:
                raise self._lost
            work = self._in_thread(fn)
        task = asyncio.current_task()
        if task is not None:
            self._calls[key] = task  # an operator's completion cancels the call here
        try:
            if timeout_ms is None:
                return await work
            try:
                return await asyncio.wait_for(work, timeout_ms / 1000)
            except TimeoutError:
                raise StepTimeoutError(key, timeout_ms) from None
        except asyncio.CancelledError:
            output = self._operator_outputs.get(key)
            if output is None or task is None:
                raise
            task.uncancel()  # the attempt is abandoned (a thread finishes on its own)
            raise _OperatorCompleted(output) from None
        finally:
            self._calls.pop(key, None)

    def resolve(self, key: str, action: str, output: str | None) -> None:
        """An operator's ``StepResolved`` was folded: complete the step in flight with
        ``output`` (its call is abandoned), or end its backoff wait now."""
        if action == "complete" and output is not None:
            self._operator_outputs[key] = output
            task = self._calls.get(key)
            if task is not None:
                task.cancel()
        elif action == "retry-now":
            self._retry_now.add(key)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        value = await self.runtime.threads.call(fn)
        if inspect.isawaitable(value):
            value = await value
        return value

    def _backoff(self, attempt: int) -> int:
        b = self.runtime.config.backoff
        return backoff_ms(attempt, b.initial_ms, b.max_ms, b.multiplier)

    async def _wait_until(self, at_ms: int, key: str) -> None:
        """Wait for a retry (cancel, shutdown and an operator's action end the wait early)."""
        while True:
            await self._checkpoint()
            delay = (at_ms - self.runtime.clock.now()) / 1000
            if delay <= 0 or key in self._operator_outputs:
                return
            if key in self._retry_now:
                self._retry_now.discard(key)
                return
            try:
                await asyncio.wait_for(self.cancel_requested.wait(), min(delay, 0.25))
            except TimeoutError:
                pass

    # -- ctx.step.sleep -------------------------------------------------------

    async def sleep(self, duration: int | str) -> None:
        ms = parse_duration(duration, limit=None)  # (limited where it is written: a replay
        # of one recorded before the limit goes on)
        await self._checkpoint()
        self._boundary += 1
        self._since_boundary = 0
        self._sleep_count += 1
        key = f"sleep#{self._sleep_count}"
        self.replay.meet(key, "sleep")
        recorded = self.sleeps.get(key)
        if recorded is not None:
            if recorded["status"] == "completed":
                if key == self._waking:  # woken as its TimerFired went out: on once the
                    await self._after_runtime()  # log has it, and what came before it
                    await self._checkpoint()  # (a cancel written before it)
                return
            raise Suspend  # still waiting for its timer
        await self._append(SleepScheduled(key, ms, self._wake_at(ms, duration)))
        raise Suspend

    # -- ctx.step.wait_for_event and ctx.step.invoke ---------------------------------------

    async def wait_for_event(self, name: str, event_type: str, match: dict[str, Any] | None,
                             timeout: int | str | None,
                             since: int | datetime | None) -> ReceivedEvent | None:
        check_event_type(event_type)
        match_json = match_text(match)
        self._check_size(f"the match of wait '{name}'", match_json)
        timeout_ms = None if timeout is None else parse_duration(timeout, limit=None)
        await self._checkpoint()
        key = self._key(name)
        self.replay.meet(key, "wait")
        wait = self.waits.get(key)
        if wait is not None:
            return received_event(wait)
        since_ms = self.record["created_at"] if since is None else _epoch_ms(since)
        await self._open_wait(WaitStarted(key, event_type, match_json, since_ms,
                                          self._deadline(timeout_ms, timeout)))

    async def invoke(self, name: str, binding: str, input: Any, timeout: int | str | None,
                     cancel_with_parent: bool) -> Any:
        timeout_ms = None if timeout is None else parse_duration(timeout, limit=None)
        target = self.runtime.env[binding]  # UnknownBindingError names the known ones
        await self._checkpoint()
        key = self._key(name)
        self.replay.meet(key, "invoke")
        wait = self.waits.get(key)
        if wait is not None:
            return child_result(key, wait, self._open)
        if timeout is not None and timeout_ms is not None:  # (before its child starts)
            within_limit(timeout_ms, timeout)
        child = [self.runtime.child_id(self.id, key)]

        async def start_child() -> None:
            try:
                child[0] = await self.runtime.trigger_child(
                    target.workflow, input, child[0], self.id, key, self.subject)
            except AppendError as exc:
                raise LogUnavailable(str(exc), exc.permanent) from exc
            except PartitionStalledError as exc:  # until an operator skips its corrupt record
                raise LogUnavailable(str(exc)) from exc

        # The child first: a crash before the wait is recorded replays to here, and the
        # second trigger of the same id changes nothing.
        await self._open_wait(lambda: WaitStarted(
            key, CHILD_ENDED, to_json({"execution_id": child[0]}, "match"),
            self.record["created_at"], self._deadline(timeout_ms, timeout), child[0],
            cancel_with_parent),
            start_child)

    def _deadline(self, timeout_ms: int | None, timeout: int | str | None) -> int | None:
        """When a new wait times out, if it does."""
        if timeout_ms is None or timeout is None:
            return None
        return self._wake_at(timeout_ms, timeout)

    def _wake_at(self, ms: int, value: int | str) -> int:
        """Now plus a duration about to be written (DurationError over 100 years)."""
        return self.runtime.clock.now() + within_limit(ms, value)

    async def _open_wait(self, body: WaitStarted | Callable[[], WaitStarted],
                         first: Callable[[], Awaitable[None]] | None = None) -> NoReturn:
        """Record the wait (after ``first``: starting a child) and suspend: the fold
        delivers its event (or its timer fires)."""
        self._opening += 1
        try:
            if first is not None:
                await self._acknowledged()  # a child starts from durable steps only
                await first()
            await self._append(body if isinstance(body, WaitStarted) else body())
        finally:
            self._opening -= 1
            self._opened.set()
        raise Suspend

    # -- ctx.step.parallel ------------------------------------------------------

    async def parallel(self, name: str, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        await self._checkpoint()
        key = self._key(name)
        self.replay.meet(key, "parallel")
        results = await asyncio.gather(
            *(self._step(f"{key}[{i}]", fn, None, None, None) for i, fn in enumerate(fns)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # Suspend / Cancelled / Shutdown
        for result in results:
            if isinstance(result, Exception):
                raise result
        return list(results)

    # -- ctx.patched ----------------------------------------------------------

    def patched(self, name: str) -> bool:
        """See ``engine.versioning``: the recorded answer, or True with a ``Patched``
        marker (produced before any event of the new branch, on the same partition)."""
        check_name(name, "patch")
        taken = self.replay.patched(name)
        if taken is None:
            self._append_nowait(Patched(name))
            self.replay.patches.add(name)
            taken = True
        return taken

    # -- ctx.log --------------------------------------------------------------

    def log(self, message: str, data: Any, level: str) -> None:
        position = self._log_position()
        if position is None:
            return  # recorded before this replay
        message = str(message)
        data_json = None if data is None else to_json(data, "log data")
        self._check_size("a log line", message if data_json is None else message + data_json)
        user_log.log(_LEVELS.get(level, logging.INFO), "[%s %s] %s%s", self.workflow.name,
                     self.id, message, f" {data_json}" if data_json else "")
        self._append_nowait(WorkflowLog(level, message, data_json, position))

    def _log_position(self) -> str | None:
        """Where this log line is in the workflow, or None if a replay already has it.

        Inside a step attempt: ``<step key>@<attempt>.<n>`` (a completed step does
        not run on replay, so its lines are never met twice). Elsewhere:
        ``w<b>.<n>``, the n-th line after the handler's b-th step, sleep or
        parallel call, which a deterministic handler meets again on replay.
        """
        in_step = _IN_STEP.get()
        if in_step is not None and in_step[0] is self:
            _, key, attempt = in_step
            n = self._step_logs.get((key, attempt), 0)
            self._step_logs[(key, attempt)] = n + 1
            position = f"{key}@{attempt}.{n}"
        else:
            position = f"w{self._boundary}.{self._since_boundary}"
            self._since_boundary += 1
            if self._legacy_logs > 0:  # lines recorded before positions: skip by count
                self._legacy_logs -= 1
                return None
        return None if position in self.logged else position


def _pending_or_failed(future: asyncio.Future[Any]) -> bool:
    return not future.done() or (not future.cancelled() and future.exception() is not None)


def _unavailable(future: asyncio.Future[Any], body: Body) -> LogUnavailable | None:
    """A failed append as the run's LogUnavailable (None: it did not fail)."""
    exc = None if future.cancelled() else future.exception()
    if isinstance(exc, AppendError):
        return LogUnavailable(str(exc), exc.permanent, body)
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("an append was not acknowledged: %s", future.exception())
