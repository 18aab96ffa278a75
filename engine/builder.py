"""``ploy()``: declare workflows and HTTP routes, then ``.build()`` a worker.

Both forms of the seed work. The chained form::

    worker = (
        ploy()
        .workflow("order_processing", {"input": Order, "output": Receipt}, handler)
        .post("/orders", {"body": NewOrder}, create_order)
        .build()
    )

and the decorator form::

    app = ploy()

    @app.workflow("order_processing", input=Order, output=Receipt)
    async def order_processing(ctx): ...

    worker = app.build()

The file that ploy.yaml names with ``main:`` (default ``worker.py``) exposes
the built worker as the module-level name ``worker``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel

from engine.errors import ConfigError

EnvT = TypeVar("EnvT")
Handler = Callable[..., Any]
F = TypeVar("F", bound=Handler)  # a decorated handler keeps its own type
Spec = Mapping[str, Any]  # the seed's {"input": M, "output": M} / {"params": M, "body": M, ...}
Model = type[BaseModel] | None
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class WorkflowDef:
    """A workflow: its name, its input and output models, its handler."""

    name: str
    handler: Handler
    input: type[BaseModel] | None = None
    output: type[BaseModel] | None = None


@dataclass(frozen=True)
class RouteDef:
    """An HTTP route in the seed's path syntax (``/orders/:id/status``)."""

    method: str
    path: str
    handler: Handler
    params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None


@dataclass(frozen=True)
class Worker:
    """What ``.build()`` returns: every workflow and route of the app."""

    workflows: Mapping[str, WorkflowDef]
    routes: tuple[RouteDef, ...] = ()
    env_type: Any = None

    def workflow(self, name: str) -> WorkflowDef | None:
        return self.workflows.get(name)


@dataclass
class Ploy(Generic[EnvT]):
    """The builder; see the module docstring.

    Each of ``workflow``, ``route`` and ``get``/``post``/``put``/``patch``/
    ``delete`` has two forms, told apart by the handler: given one, it is
    registered and the builder returned (to chain); without one, the method
    returns a decorator that registers the function and returns it unchanged,
    so a type checker keeps the function's type.
    """

    env_type: Any = None
    _workflows: dict[str, WorkflowDef] = field(default_factory=dict)
    _routes: list[RouteDef] = field(default_factory=list)

    @overload
    def workflow(self, name: str, spec: Spec | None = None, handler: None = None, *,
                 input: Model = None, output: Model = None) -> Callable[[F], F]: ...
    @overload
    def workflow(self, name: str, spec: Spec | None, handler: Handler, *,
                 input: Model = None, output: Model = None) -> Ploy[EnvT]: ...
    @overload
    def workflow(self, name: str, spec: Spec | None = None, *, handler: Handler,
                 input: Model = None, output: Model = None) -> Ploy[EnvT]: ...

    def workflow(
        self,
        name: str,
        spec: Spec | None = None,
        handler: Handler | None = None,
        *,
        input: Model = None,
        output: Model = None,
    ) -> Ploy[EnvT] | Callable[[F], F]:
        """Define workflow ``name``; chained when given a handler, else a decorator."""
        spec = dict(spec or {})
        unknown = set(spec) - {"input", "output"}
        if unknown:
            raise TypeError(f"workflow '{name}': unknown spec keys {sorted(unknown)}")
        if name in self._workflows:
            raise ValueError(f"workflow '{name}' is defined twice")
        input_model = input or spec.get("input")
        output_model = output or spec.get("output")

        def register(fn: F) -> F:
            self._workflows[name] = WorkflowDef(name, fn, input_model, output_model)
            return fn

        if handler is not None:
            register(handler)
            return self
        return register

    @overload
    def route(self, method: str, path: str, spec: Spec | None = None, handler: None = None,
              **models: Model) -> Callable[[F], F]: ...
    @overload
    def route(self, method: str, path: str, spec: Spec | None, handler: Handler,
              **models: Model) -> Ploy[EnvT]: ...
    @overload
    def route(self, method: str, path: str, spec: Spec | None = None, *, handler: Handler,
              **models: Model) -> Ploy[EnvT]: ...

    def route(
        self, method: str, path: str, spec: Spec | None = None,
        handler: Handler | None = None, **models: Model,
    ) -> Ploy[EnvT] | Callable[[F], F]:
        """Define an HTTP route; chained when given a handler, else a decorator.

        ``spec`` (or keyword arguments) may name a model for ``params``,
        ``query``, ``body`` and ``response``.
        """
        method = method.upper()
        if method not in HTTP_METHODS:
            raise ValueError(f"unsupported HTTP method {method}")
        merged = {**dict(spec or {}), **models}
        unknown = set(merged) - {"params", "query", "body", "response"}
        if unknown:
            raise TypeError(f"route {method} {path}: unknown spec keys {sorted(unknown)}")

        def register(fn: F) -> F:
            self._routes.append(RouteDef(method, path, fn, **merged))
            return fn

        if handler is not None:
            register(handler)
            return self
        return register

    # The verbs: ``route`` with the method filled in, in the same two forms.

    @overload
    def get(self, path: str, spec: Spec | None = None, handler: None = None,
            **models: Model) -> Callable[[F], F]: ...
    @overload
    def get(self, path: str, spec: Spec | None, handler: Handler,
            **models: Model) -> Ploy[EnvT]: ...
    @overload
    def get(self, path: str, spec: Spec | None = None, *, handler: Handler,
            **models: Model) -> Ploy[EnvT]: ...

    def get(self, path: str, spec: Spec | None = None, handler: Handler | None = None,
            **models: Model) -> Ploy[EnvT] | Callable[[F], F]:
        return self.route("GET", path, spec, handler, **models)

    @overload
    def post(self, path: str, spec: Spec | None = None, handler: None = None,
             **models: Model) -> Callable[[F], F]: ...
    @overload
    def post(self, path: str, spec: Spec | None, handler: Handler,
             **models: Model) -> Ploy[EnvT]: ...
    @overload
    def post(self, path: str, spec: Spec | None = None, *, handler: Handler,
             **models: Model) -> Ploy[EnvT]: ...

    def post(self, path: str, spec: Spec | None = None, handler: Handler | None = None,
             **models: Model) -> Ploy[EnvT] | Callable[[F], F]:
        return self.route("POST", path, spec, handler, **models)

    @overload
    def put(self, path: str, spec: Spec | None = None, handler: None = None,
            **models: Model) -> Callable[[F], F]: ...
    @overload
    def put(self, path: str, spec: Spec | None, handler: Handler,
            **models: Model) -> Ploy[EnvT]: ...
    @overload
    def put(self, path: str, spec: Spec | None = None, *, handler: Handler,
            **models: Model) -> Ploy[EnvT]: ...

    def put(self, path: str, spec: Spec | None = None, handler: Handler | None = None,
            **models: Model) -> Ploy[EnvT] | Callable[[F], F]:
        return self.route("PUT", path, spec, handler, **models)

    @overload
    def patch(self, path: str, spec: Spec | None = None, handler: None = None,
              **models: Model) -> Callable[[F], F]: ...
    @overload
    def patch(self, path: str, spec: Spec | None, handler: Handler,
              **models: Model) -> Ploy[EnvT]: ...
    @overload
    def patch(self, path: str, spec: Spec | None = None, *, handler: Handler,
              **models: Model) -> Ploy[EnvT]: ...

    def patch(self, path: str, spec: Spec | None = None, handler: Handler | None = None,
              **models: Model) -> Ploy[EnvT] | Callable[[F], F]:
        return self.route("PATCH", path, spec, handler, **models)

    @overload
    def delete(self, path: str, spec: Spec | None = None, handler: None = None,
               **models: Model) -> Callable[[F], F]: ...
    @overload
    def delete(self, path: str, spec: Spec | None, handler: Handler,
               **models: Model) -> Ploy[EnvT]: ...
    @overload
    def delete(self, path: str, spec: Spec | None = None, *, handler: Handler,
               **models: Model) -> Ploy[EnvT]: ...

    def delete(self, path: str, spec: Spec | None = None, handler: Handler | None = None,
               **models: Model) -> Ploy[EnvT] | Callable[[F], F]:
        return self.route("DELETE", path, spec, handler, **models)

    def build(self) -> Worker:
        """Freeze what was declared into a :class:`Worker`."""
        return Worker(dict(self._workflows), tuple(self._routes), self.env_type)


def ploy(env_type: Any = None) -> Ploy[Any]:
    """Start building a worker; ``env_type`` types ``ctx.env`` (see ``ploy types``)."""
    return Ploy(env_type)


def load_worker(main: Path) -> Worker:
    """Import the user's main file and return its module-level ``worker``."""
    if not main.is_file():
        raise ConfigError(str(main), "main", "file not found")
    root = str(main.parent.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = f"ploy_main_{abs(hash(str(main.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, main)
    if spec is None or spec.loader is None:
        raise ConfigError(str(main), "main", "cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    worker = getattr(module, "worker", None)
    if not isinstance(worker, Worker):
        raise ConfigError(
            str(main), "main",
            "defines no module-level 'worker = ploy()....build()'",
        )
    return worker
