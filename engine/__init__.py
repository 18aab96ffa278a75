"""ploy-engine: durable workflows for Python, event-sourced on Kafka.

The public API, re-exported here; everything else is machinery. Names load on
first use, so ``import engine.events`` (a codec, a connector, a test) does not
pull in Kafka, RocksDB and the HTTP layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.app import Engine, load_app
    from engine.bindings import Env, TriggerResult, WorkflowBinding
    from engine.builder import Ploy, Worker, ploy
    from engine.clock import Clock, ManualClock
    from engine.config import Config, load_config
    from engine.context import Context, Step
    from engine.durations import parse_duration
    from engine.errors import (
        ConfigError,
        InvalidInputError,
        NonDeterminismError,
        NonRetryableError,
        PloyError,
        StepFailedError,
        StepTimeoutError,
        SubjectErasedError,
        UnknownBindingError,
        UnknownExecutionError,
    )
    from engine.http import RequestContext
    from engine.models import (
        Attempt,
        Execution,
        ExecutionStatus,
        LogEntry,
        ReceivedEvent,
        StepRecord,
        WaitInfo,
    )

_WHERE = {
    "Attempt": "engine.models",
    "Clock": "engine.clock",
    "Config": "engine.config",
    "ConfigError": "engine.errors",
    "Context": "engine.context",
    "Engine": "engine.app",
    "Env": "engine.bindings",
    "Execution": "engine.models",
    "ExecutionStatus": "engine.models",
    "InvalidInputError": "engine.errors",
    "LogEntry": "engine.models",
    "ManualClock": "engine.clock",
    "NonDeterminismError": "engine.errors",
    "NonRetryableError": "engine.errors",
    "Ploy": "engine.builder",
    "PloyError": "engine.errors",
    "ReceivedEvent": "engine.models",
    "RequestContext": "engine.http",
    "Step": "engine.context",
    "StepFailedError": "engine.errors",
    "StepRecord": "engine.models",
    "StepTimeoutError": "engine.errors",
    "SubjectErasedError": "engine.errors",
    "TriggerResult": "engine.bindings",
    "UnknownBindingError": "engine.errors",
    "UnknownExecutionError": "engine.errors",
    "WaitInfo": "engine.models",
    "Worker": "engine.builder",
    "WorkflowBinding": "engine.bindings",
    "load_app": "engine.app",
    "load_config": "engine.config",
    "parse_duration": "engine.durations",
    "ploy": "engine.builder",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


__all__ = [
    "Attempt",
    "Clock",
    "Config",
    "ConfigError",
    "Context",
    "Engine",
    "Env",
    "Execution",
    "ExecutionStatus",
    "InvalidInputError",
    "LogEntry",
    "ManualClock",
    "NonDeterminismError",
    "NonRetryableError",
    "Ploy",
    "PloyError",
    "ReceivedEvent",
    "RequestContext",
    "Step",
    "StepFailedError",
    "StepRecord",
    "StepTimeoutError",
    "SubjectErasedError",
    "TriggerResult",
    "UnknownBindingError",
    "UnknownExecutionError",
    "WaitInfo",
    "Worker",
    "WorkflowBinding",
    "load_app",
    "load_config",
    "parse_duration",
    "ploy",
]
