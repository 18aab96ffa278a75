"""What a workflow author reads: the context handed to a workflow handler.

    @app.workflow("order_processing", input=Order, output=Receipt)
    async def order_processing(ctx: Context[Env, Order]) -> dict:
        ctx.log("starting", {"order": ctx.input.order_id})
        stock = await ctx.step.run("check-inventory", lambda: check_stock(ctx.input.items))
        await ctx.step.sleep("24h")
        a, b = await ctx.step.parallel("fetch", [fetch_user, fetch_order])
        return {...}

Every step is recorded as events on the log. When an execution resumes (after
a restart, a durable sleep, or a partition move) the handler runs again from
the top and each completed step returns its recorded value without running:
keep code between steps deterministic and put side effects inside steps.
The machinery behind these methods lives in ``engine.execution``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from engine.models import ReceivedEvent

EnvT = TypeVar("EnvT")
InputT = TypeVar("InputT")
T = TypeVar("T")

StepFn = Callable[[], "T | Awaitable[T]"]


class StepRunner(Protocol):
    """The runtime side of :class:`Step` (implemented by the execution runner)."""

    async def run_step(
        self, name: str, fn: Callable[[], Any], *, input: Any, retries: int | None,
        timeout: int | str | None,
    ) -> Any: ...

    async def sleep(self, duration: int | str) -> None: ...

    async def parallel(self, name: str, fns: Sequence[Callable[[], Any]]) -> list[Any]: ...

    def log(self, message: str, data: Any, level: str) -> None: ...

    def patched(self, name: str) -> bool: ...
    async def wait_for_event(self, name: str, event_type: str, match: dict[str, Any] | None,
                             timeout: int | str | None, since: int | datetime | None) -> Any: ...

    async def invoke(self, name: str, binding: str, input: Any, timeout: int | str | None,
                     cancel_with_parent: bool) -> Any: ...


class Step:
    """``ctx.step``: durable steps, sleeps and fan-out."""

    def __init__(self, runner: StepRunner):
        self._runner = runner

    async def run(
        self,
        name: str,
        fn: Callable[[], T] | Callable[[], Awaitable[T]],
        *,
        input: Any = None,
        retries: int | None = None,
        timeout: int | str | None = None,
    ) -> Any:
        """Run ``fn`` once for this execution and record its JSON result.

        Args:
            name: unique within the workflow; a repeated name is keyed ``name#2``.
            fn: sync (run in a thread pool) or async callable taking no arguments.
            input: optional JSON value recorded as the step's input (for the dashboard).
            retries: retries after the first attempt (default: ploy.yaml, else 3).
            timeout: bound on one attempt, ms or a duration string like ``"30s"``.

        Returns:
            The JSON-decoded value ``fn`` returned (a pydantic model comes back as a
            dict), the same on the first run and on replay.

        Raises:
            StepFailedError: every attempt failed (or one raised NonRetryableError).
        """
        return await self._runner.run_step(
            name, fn, input=input, retries=retries, timeout=timeout
        )

    async def sleep(self, duration: int | str) -> None:
        """Pause durably: ms, or a string like ``"30s"``, ``"5m"``, ``"1h30m"``.

        A sleeping execution holds no task or thread; a timer wakes it, after a
        worker restart too. A malformed duration raises ``ValueError``.
        """
        await self._runner.sleep(duration)

    async def parallel(self, name: str, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``fns`` concurrently as steps ``name[0]``, ``name[1]``, ...; results in order.

        Each branch has its own retries. If a branch fails for good, the others
        finish and are recorded, then its StepFailedError is raised.
        """
        return await self._runner.parallel(name, fns)

    async def wait_for_event(
        self,
        name: str,
        *,
        type: str,
        match: dict[str, Any] | None = None,
        timeout: int | str | None = None,
        since: int | datetime | None = None,
    ) -> ReceivedEvent | None:
        """Wait durably for an event of ``type`` whose data matches ``match``.

        Like a sleep, a waiting execution holds no task: it shows as ``waiting``,
        survives restarts and partition moves, and a cancel ends it.

        Args:
            name: unique within the workflow, like a step's.
            type: the event type (a CloudEvents ``type``, or what ``send_event`` names).
            match: dotted paths into the event's data -> the values they must equal,
                e.g. ``{"order_id": ctx.input.order_id}``; None matches any event of the type.
            timeout: ms or a duration string; None waits for ever.
            since: ms since the epoch or a datetime; events appended from then on count
                (default: the execution's start), so an event that came before the wait
                began is still received.

        Returns:
            The event (``id``, ``type``, ``source``, ``time``, ``data``), or None on timeout.
        """
        result: ReceivedEvent | None = await self._runner.wait_for_event(
            name, type, match, timeout, since)
        return result

    async def invoke(
        self,
        name: str,
        *,
        binding: str,
        input: Any = None,
        timeout: int | str | None = None,
        cancel_with_parent: bool = True,
    ) -> Any:
        """Start a child execution of the workflow ``binding`` names and wait durably for
        its output.

        The child's id is derived from this execution and ``name``, so a replay never
        starts a second child. A cancel of this execution cancels the child too, unless
        ``cancel_with_parent=False``. Run several at once with ``asyncio.gather``.

        Raises:
            StepFailedError: the child failed, was cancelled, or did not end in ``timeout``.
            InvalidInputError: ``input`` does not match the child's input model.
        """
        return await self._runner.invoke(name, binding, input, timeout, cancel_with_parent)


class Context(Generic[EnvT, InputT]):
    """The handler's view of its execution."""

    def __init__(self, *, input: InputT, env: EnvT, execution_id: str, workflow: str,
                 runner: StepRunner):
        self.input = input
        self.env = env
        self.execution_id = execution_id
        self.workflow = workflow
        self.step = Step(runner)
        self._runner = runner

    def log(self, message: str, data: Any = None, *, level: str = "info") -> None:
        """Record a log line on the execution (an event) and send it to Python logging.

        On replay, lines already recorded are not recorded again.
        """
        self._runner.log(message, data, level)

    def patched(self, name: str) -> bool:
        """Whether this execution takes the new branch of a code change named ``name``.

            if ctx.patched("new-refund-step"):
                await ctx.step.run("refund-check", check)

        An execution that reaches this call for the first time gets True (and the
        answer is recorded on the log); one that started before the change and
        had already gone past this point gets False, so its replay keeps the old
        branch. Once no execution from before the change runs, the old branch and
        then the call can go (keep the call for as long as executions that took
        it may replay).
        """
        return self._runner.patched(name)
