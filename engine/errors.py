"""Every error ploy-engine raises, under one root.

Each error takes structured arguments, builds its own message, and keeps its
inputs as attributes so callers (CLI, HTTP layer, tests) can act on them.

    PloyError
    ├── ConfigError               ploy.yaml: file, key, line
    ├── UnknownBindingError       env.NAME that ploy.yaml does not bind
    ├── UnknownWorkflowError      a binding naming a workflow the worker lacks
    ├── InvalidInputError         trigger input fails the workflow's input model
    ├── PayloadTooLargeError      an event would not fit a Kafka record
    ├── PayloadTooDeepError       JSON nested deeper than readers take
    ├── UnknownExecutionError     send_event to an id no execution has
    ├── InvalidKeyError           an idempotency key that is not valid Unicode
    ├── DurationError (ValueError) "5 parsecs"
    ├── SerializationError        a step result that is not JSON
    ├── CodecError                corrupt bytes / unknown schema fingerprint
    ├── CorruptEventError         CodecError at a topic/partition/offset
    ├── PartitionStalledError     a trigger to a partition stopped at a corrupt event
    ├── NotStalledError           a skip of a record the partition is not stopped at
    ├── StepNotResolvableError    complete/retry-now of a step not running or retrying
    ├── NotFoldedHereError        a query routed to a process that does not fold its partition
    ├── OwnerUnavailableError     no owner of a partition answers a query
    ├── InvalidTransitionError    the fold met an event its state forbids
    ├── BrokerUnavailableError    bootstrap servers not reachable in time
    ├── AppendError               the broker refused or timed out an append
    ├── StateLockedError          a rebuild met a view a running worker holds
    ├── RebuildError              the log no longer holds every event (retention)
    ├── CommandError              a `ploy` command the user can fix (bad --input, no server)
    ├── ExportError               an export directory that cannot be written or imported
    ├── RerunError                a rerun of a live execution, or from a step it never ran
    ├── SubjectErasedError        a payload sealed with a data subject's key that was erased
    ├── NonRetryableError         raised by user code: fail the step now
    ├── StepTimeoutError          one attempt ran past its timeout
    ├── StepFailedError           a step exhausted its retries
    ├── NonDeterminismError       a replay of new code diverged from the history
    ├── WorkflowFailedError       a result awaited from an execution that failed
    └── WorkflowCancelledError    a result awaited from an execution that was cancelled

Control flow that user code must not swallow (``except Exception``) derives
from ``BaseException`` and lives in the runtime: ``Suspend`` and ``Cancelled``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PloyError(Exception):
    """Root of every error ploy-engine raises on purpose."""


class ConfigError(PloyError):
    """ploy.yaml (or an environment override) is invalid."""

    def __init__(self, file: str, key: str | None, problem: str, line: int | None = None):
        self.file, self.key, self.problem, self.line = file, key, problem, line
        where = file + (f":{line}" if line is not None else "")
        what = f" key '{key}':" if key else ""
        super().__init__(f"{where}:{what} {problem}")


class UnknownBindingError(PloyError, AttributeError):
    """``env.NAME`` names no binding of ploy.yaml."""

    def __init__(self, binding: str, known: list[str]):
        self.binding, self.known = binding, known
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown binding '{binding}' (bound in ploy.yaml: {names})")


class UnknownWorkflowError(PloyError):
    """A name that no ``.workflow(...)`` of the worker defines."""

    def __init__(self, workflow: str, known: list[str], binding: str | None = None):
        self.workflow, self.known, self.binding = workflow, known, binding
        via = f"binding '{binding}' names " if binding else ""
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"{via}unknown workflow '{workflow}' (the worker defines: {names})")


class InvalidInputError(PloyError, ValueError):
    """Trigger input that does not match the workflow's input model; nothing was appended."""

    def __init__(self, workflow: str, errors: list[dict[str, Any]]):
        self.workflow, self.errors = workflow, errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or '<input>'}: {e.get('msg')}"
            for e in errors
        )
        super().__init__(f"invalid input for workflow '{workflow}': {detail}")


class PayloadTooLargeError(PloyError, ValueError):
    """A payload whose event would not fit one Kafka record."""

    def __init__(self, what: str, size: int, limit: int):
        self.what, self.size, self.limit = what, size, limit
        super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes")


class UnknownExecutionError(PloyError, KeyError):
    """An id no execution has (of that workflow, when one is named); nothing was appended."""

    def __init__(self, execution_id: str, workflow: str | None = None):
        self.execution_id, self.workflow = execution_id, workflow
        of = f" of workflow '{workflow}'" if workflow else ""
        super().__init__(f"no execution '{execution_id}'{of}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidKeyError(PloyError, ValueError):
    """An id or key the engine cannot use as given (an idempotency key that is not Unicode)."""

    def __init__(self, what: str, problem: str):
        self.what, self.problem = what, problem
        super().__init__(f"invalid {what}: {problem}")


class PayloadTooDeepError(PloyError, ValueError):
    """A JSON payload nested deeper than the engine's readers accept."""

    def __init__(self, what: str, limit: int):
        self.what, self.limit = what, limit
        super().__init__(f"{what} nests arrays and objects more than {limit} levels deep")


class DurationError(PloyError, ValueError):
    """A duration that is neither int milliseconds nor like '1h30m', or is too long."""

    def __init__(self, value: object, reason: str | None = None):
        self.value = value
        try:
            shown = repr(value)
        except ValueError:  # an int of more digits than Python will print
            shown = "<an int of thousands of digits>"
        if len(shown) > 80:
            shown = shown[:60] + f"... ({len(shown)} characters)"
        super().__init__(
            f"invalid duration {shown}: " + (reason or (
                "use int milliseconds or a string like "
                "'500ms', '30s', '5m', '1h', '1d', '1h30m'"))
        )


class SerializationError(PloyError, TypeError):
    """A value the engine must record is not JSON-serializable."""

    def __init__(self, what: str, cause: str):
        self.what, self.cause = what, cause
        super().__init__(f"{what} is not JSON-serializable: {cause}")


class CodecError(PloyError):
    """Bytes that are not a record of any known event schema."""


class CorruptEventError(PloyError):
    """An undecodable record on the log; its partition stops here."""

    def __init__(self, topic: str, partition: int, offset: int, cause: str):
        self.topic, self.partition, self.offset, self.cause = topic, partition, offset, cause
        super().__init__(
            f"corrupt event at topic '{topic}' partition {partition} offset {offset}: {cause}; "
            "the partition is stopped at this offset"
        )


class PartitionStalledError(PloyError):
    """A trigger routed to a partition whose fold is stopped at a corrupt event.

    Accepting it would hide it: nothing folds or runs there until an operator
    skips the record (``ploy skip``).
    """

    def __init__(self, topic: str, partition: int, offset: int):
        self.topic, self.partition, self.offset = topic, partition, offset
        super().__init__(
            f"partition {partition} of '{topic}' is stopped at the corrupt event at offset "
            f"{offset}; nothing is accepted there until an operator runs "
            f"'ploy skip --partition {partition} --offset {offset} --reason ...'"
        )


class StepNotResolvableError(PloyError, ValueError):
    """An operator's action on a step that is not in a state for it (ended, unknown,
    or an execution that has ended): nothing was appended."""

    def __init__(self, action: str, step: str, execution_id: str, state: str,
                 execution_status: str, wanted: tuple[str, ...]):
        self.action, self.step, self.execution_id = action, step, execution_id
        super().__init__(f"cannot {action} step '{step}' of {execution_id}: {state}, "
                         f"execution is {execution_status} (needs a {' or '.join(wanted)} "
                         "step of an unfinished execution)")


class NotStalledError(PloyError):
    """``ploy skip`` named a record that its partition is not stopped at."""

    def __init__(self, partition: int, offset: int, stalled_at: int | None):
        self.partition, self.offset, self.stalled_at = partition, offset, stalled_at
        where = ("is not stopped" if stalled_at is None
                 else f"is stopped at offset {stalled_at}, not {offset}")
        super().__init__(f"partition {partition} {where}: there is nothing to skip there")


class NotFoldedHereError(PloyError):
    """A query asked this process only (``local``) about a partition it does not fold."""

    def __init__(self, partition: int):
        self.partition = partition
        super().__init__(f"partition {partition} is not folded by this process")


class OwnerUnavailableError(PloyError):
    """No process that folds the partition answered (a move in progress, or no worker)."""

    def __init__(self, partition: int, cause: str):
        self.partition, self.cause = partition, cause
        super().__init__(f"no owner of partition {partition} answers: {cause}")


class InvalidTransitionError(PloyError):
    """The fold met an event that the execution's state does not allow."""

    def __init__(self, execution_id: str, status: str | None, event: str):
        self.execution_id, self.status, self.event = execution_id, status, event
        super().__init__(f"execution {execution_id} in state {status}: cannot apply {event}")


class BrokerUnavailableError(PloyError):
    """Kafka did not answer within the bounded wait."""

    def __init__(self, servers: str, seconds: float, cause: str = ""):
        self.servers, self.seconds, self.cause = servers, seconds, cause
        tail = f" ({cause})" if cause else ""
        super().__init__(f"Kafka at {servers} is not reachable after {seconds:g} s{tail}")


class AppendError(PloyError):
    """The broker did not acknowledge an append.

    ``permanent`` when it refused the record itself (too large, invalid): the
    same record will be refused again, so retrying it cannot help.
    """

    def __init__(self, topic: str, cause: str, permanent: bool = False):
        self.topic, self.cause, self.permanent = topic, cause, permanent
        super().__init__(f"append to '{topic}' failed: {cause}")


class StateLockedError(PloyError):
    """A partition's RocksDB is open in a running process (a worker or ``ploy dev``)."""

    def __init__(self, path: Path, cause: str):
        self.path, self.cause = path, cause
        super().__init__(
            f"the view at {path} is in use by a running worker (RocksDB lock held); "
            "stop it first"
        )


class RebuildError(PloyError):
    """The log cannot give back the whole view: records below ``low_watermark`` are gone."""

    def __init__(self, topic: str, partition: int, low_watermark: int):
        self.topic, self.partition, self.low_watermark = topic, partition, low_watermark
        super().__init__(
            f"cannot rebuild topic '{topic}' partition {partition}: the log starts at offset "
            f"{low_watermark}, not 0 (records were deleted by retention)"
        )


class CommandError(PloyError):
    """A ``ploy`` command cannot go on for a reason its user can fix.

    No ploy.yaml, ``--input`` that is not JSON, an unknown execution id, a
    server that does not answer within the bounded wait: the CLI prints the
    message as one ``ploy: error:`` line and exits 2.
    """

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(problem)


class ExportError(PloyError):
    """``ploy export``/``ploy import`` cannot use ``directory`` (see ``engine.export``)."""

    def __init__(self, directory: Path, problem: str):
        self.directory, self.problem = directory, problem
        super().__init__(f"export {directory}: {problem}")


class RerunError(PloyError):
    """A rerun that cannot be made as asked (``engine.rerun``): the source has not
    ended, or never started ``steps``' missing step."""

    def __init__(self, source: str, problem: str, steps: list[str] | None = None):
        self.source, self.problem, self.steps = source, problem, steps
        super().__init__(f"cannot rerun {source}: {problem}")


class SubjectErasedError(PloyError):
    """The key of data ``subject`` is gone (``ploy erase``): its payloads cannot be read
    or written any more, so the execution ``execution_id`` cannot go on."""

    def __init__(self, subject: str, execution_id: str | None = None):
        self.subject, self.execution_id = subject, execution_id
        of = f" (execution {execution_id})" if execution_id else ""
        super().__init__(f"the key of data subject '{subject}' was erased{of}: its payloads "
                         "can no longer be read")


class NonRetryableError(PloyError):
    """Raise inside a step to fail it at once, without retries."""


class StepTimeoutError(PloyError, TimeoutError):
    """One attempt of a step ran longer than its timeout."""

    def __init__(self, step: str, timeout_ms: int):
        self.step, self.timeout_ms = step, timeout_ms
        super().__init__(f"step '{step}' timed out after {timeout_ms} ms")


class StepFailedError(PloyError):
    """A step failed for good; the workflow may catch this and roll back."""

    def __init__(self, step: str, attempts: int, error_type: str, message: str):
        self.step, self.attempts = step, attempts
        self.error_type, self.message = error_type, message
        plural = "attempt" if attempts == 1 else "attempts"
        super().__init__(f"step '{step}' failed after {attempts} {plural}: {error_type}: {message}")


class WorkflowFailedError(PloyError):
    """An execution ended failed (for callers that wait on a result)."""

    def __init__(self, execution_id: str, error_type: str, message: str):
        self.execution_id, self.error_type, self.message = execution_id, error_type, message
        super().__init__(f"execution {execution_id} failed: {error_type}: {message}")


class WorkflowCancelledError(PloyError):
    """An execution was cancelled (for callers that wait on a result)."""

    def __init__(self, execution_id: str, reason: str | None):
        self.execution_id, self.reason = execution_id, reason
        super().__init__(f"execution {execution_id} was cancelled"
                         + (f": {reason}" if reason else ""))


class NonDeterminismError(PloyError):
    """Replaying an execution, the handler called something its history does not have
    where the history holds calls it has not met (the code changed incompatibly)."""

    def __init__(self, expected_kind: str, expected: str, position: int,
                 found: str | None = None, found_kind: str = "step"):
        self.expected_kind, self.expected = expected_kind, expected
        self.position, self.found, self.found_kind = position, found, found_kind
        what = "the end of the workflow" if found is None else f"{found_kind} '{found}'"
        super().__init__(f"non-determinism: expected {expected_kind} '{expected}' at position "
                         f"{position}, found {what} (the workflow's code changed under a "
                         "running execution; guard the change with ctx.patched)")
