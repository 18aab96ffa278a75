"""``ctx.env``: the workflow bindings of ploy.yaml, as awaitable objects.

``env.ORDER_FLOW.trigger(input)`` starts an execution of the workflow that
the binding names; ``get_execution`` and ``cancel`` act on one by id.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, Generic, Protocol, TypeVar

from engine.errors import (
    UnknownBindingError,
    WorkflowCancelledError,
    WorkflowFailedError,
)
from engine.models import Execution, ExecutionStatus

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")


class TriggerResult(dict[str, str]):
    """What ``trigger`` returns: the seed's ``{ executionId }`` as ``{"execution_id": ...}``
    (a dict, so ``result["execution_id"]`` works), and a handle on the execution:

        handle = await env.ORDER_FLOW.trigger(order)
        receipt = await handle.result(timeout=30)
    """

    def __init__(self, binding: WorkflowBinding[Any, Any], execution_id: str):
        super().__init__(execution_id=execution_id)
        self._binding = binding

    @property
    def execution_id(self) -> str:
        return self["execution_id"]

    async def result(self, timeout: float = 60.0) -> Any:
        """The execution's output once it has ended; see :meth:`WorkflowBinding.result`."""
        return await self._binding.result(self["execution_id"], timeout=timeout)


class Client(Protocol):
    """What a binding needs from the engine (the runtime implements it)."""

    async def trigger(
        self, workflow: str, input: Any, *, idempotency_key: str | None = None,
        subject: str | None = None,
    ) -> str: ...

    async def get_execution(self, execution_id: str) -> Execution | None: ...

    async def cancel(self, execution_id: str, reason: str | None = None) -> bool: ...

    async def wait_for_end(self, execution_id: str, timeout_s: float) -> Execution | None: ...

    async def send_event(self, event_type: str, data: Any = None, *, id: str | None = None,
                         source: str | None = None, execution_id: str | None = None,
                         workflow: str | None = None) -> dict[str, Any]: ...


class WorkflowBinding(Generic[InputT, OutputT]):
    """One binding: a workflow, reachable by its binding name."""

    def __init__(self, client: Client, binding: str, workflow: str):
        self._client, self.binding, self.workflow = client, binding, workflow

    async def trigger(
        self, input: InputT, *, idempotency_key: str | None = None, subject: str | None = None
    ) -> TriggerResult:
        """Validate ``input`` and start an execution; the same key gives the same execution.

        ``input`` is an instance of the workflow's input model or data that
        validates as one (a dict). ``ploy types`` spells both in ``InputT``
        (``Model | ModelDict``); an untyped ``ctx.env`` takes anything.

        ``subject`` (a user id) seals every payload of the execution with that data
        subject's key, so that ``ploy erase SUBJECT`` makes them unreadable
        everywhere (``engine.erasure``); a child of ``ctx.step.invoke`` inherits it.

        Raises:
            InvalidInputError: the input does not match the workflow's model;
                nothing was appended.
        """
        eid = await self._client.trigger(self.workflow, input, idempotency_key=idempotency_key,
                                         subject=subject)
        return TriggerResult(self, eid)

    async def result(self, execution_id: str, *, timeout: float = 60.0) -> Any:
        """Wait for the execution to end and return its output (JSON-decoded, as recorded).

        The wait is pushed, not polled: it wakes when the fold applies the end event.

        Raises:
            WorkflowFailedError: the execution failed (its error type and message).
            WorkflowCancelledError: it was cancelled.
            TimeoutError: it had not ended after ``timeout`` seconds.
            KeyError: no execution of this workflow has that id.
        """
        execution = await self._client.wait_for_end(execution_id, timeout)
        if execution is None or execution.workflow != self.workflow:
            raise KeyError(f"no execution '{execution_id}' of workflow '{self.workflow}'")
        if execution.status is ExecutionStatus.FAILED:
            error = execution.error
            raise WorkflowFailedError(execution_id, error.type if error else "Error",
                                      error.message if error else "")
        if execution.status is ExecutionStatus.CANCELLED:
            raise WorkflowCancelledError(execution_id, execution.cancel_reason)
        return execution.output

    async def get_execution(self, execution_id: str) -> Execution | None:
        """The execution's durable record, or None for an unknown id.

        Sees every write this process made before the call (read-your-writes).
        """
        execution = await self._client.get_execution(execution_id)
        if execution is not None and execution.workflow != self.workflow:
            return None
        return execution

    async def cancel(self, execution_id: str, reason: str | None = None) -> bool:
        """Stop a queued, running or sleeping execution; False if it had already finished.

        A step that is running finishes and is recorded; no further step starts.
        """
        return await self._client.cancel(execution_id, reason)

    async def send_event(self, execution_id: str, type: str, data: Any = None, *,
                         id: str | None = None) -> str:
        """Send an event to one execution of this workflow (Cloudflare's ``sendEvent``):
        its ``ctx.step.wait_for_event`` of that ``type`` receives it, now or, if it is not
        waiting yet, when it begins to (the lookback). ``id`` makes a repeat a no-op.
        Returns the event's id.

        Raises:
            UnknownExecutionError: no execution of this workflow has that id (nothing sent).
            ValueError: a bad type, id or data (nothing sent).
        """
        sent = await self._client.send_event(type, data, id=id, source=f"binding/{self.binding}",
                                             execution_id=execution_id, workflow=self.workflow)
        return str(sent["id"])

    def __repr__(self) -> str:
        return f"<WorkflowBinding {self.binding} -> {self.workflow}>"


class Env:
    """``ctx.env``: attribute access by binding name; unknown names fail clearly."""

    def __init__(self, bindings: Mapping[str, WorkflowBinding[Any, Any]],
                 client: Client | None = None):
        self._bindings = dict(bindings)
        self._client = client

    async def send_event(self, type: str, data: Any = None, *, id: str | None = None,
                         source: str | None = None) -> str:
        """Send an event to every execution waiting for it (``ctx.step.wait_for_event``
        with this ``type`` and a ``match`` its data meets), now or within their lookback.
        ``id`` (with ``source``) makes a repeat a no-op. Returns the event's id.

        From a workflow, call it inside a step: sending is a side effect.

        Raises:
            ValueError: a bad type, id, source or data (nothing sent).
        """
        if self._client is None:
            raise RuntimeError("this env is not connected to an engine")
        sent = await self._client.send_event(type, data, id=id, source=source or "app")
        return str(sent["id"])

    def __getattr__(self, name: str) -> WorkflowBinding[Any, Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._bindings[name]
        except KeyError:
            raise UnknownBindingError(name, list(self._bindings)) from None

    def __getitem__(self, name: str) -> WorkflowBinding[Any, Any]:
        return self.__getattr__(name)

    def __contains__(self, name: object) -> bool:
        return name in self._bindings

    def __iter__(self) -> Any:
        return iter(self._bindings)

    def __repr__(self) -> str:
        return f"<Env {sorted(self._bindings)}>"


def workflow_named(name: str, env: Env, workflows: Container[str]) -> str:
    """The workflow ``name`` means: itself if a workflow has that name, else a binding's.

    Lets lists be filtered by a binding name (``ORDER_FLOW``) as well as by a
    workflow name (``order_processing``).
    """
    if name not in workflows and name in env:
        return env[name].workflow
    return name
